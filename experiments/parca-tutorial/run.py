#!/usr/bin/env python3
"""Parca's tutorial with `bpfscope profile`: four services (Go, Rust, C, Python) under load, their hot
paths found from one profile of the whole machine, an optimisation shown before and after as a
differential flame graph, and a service that is slow while its CPU is idle found off the CPU.

    sudo .venv/bin/python experiments/parca-tutorial/run.py [--seconds S] [--out DIR] [--no-pictures]

Everything runs on this machine, on 127.0.0.1: the services (built here with Debian's go, rustc and
gcc; the Python one on Debian's python3.11), an upstream "rates" service that answers in 25 ms, and
load generators (two keep-alive clients per service). Each phase lasts --seconds (15; the tests run 4).
The report (report.json, the profiles, the flame graphs as HTML and as PNG screenshots taken by
headless Chromium) goes to --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from scenario import Watcher, bpfscope_cmd  # noqa: E402

# The project's environment (.venv/bin/python) has bpfscope: its profiles are read with its own model.
from bpfscope.domains.profile import flamegraph  # noqa: E402
from bpfscope.domains.profile.profiles import Profile  # noqa: E402

SERVICES = HERE / "services"
# What the upstream rates service makes every quote wait (seconds).
RATES_DELAY_S = 0.025
# 99 Hz: enough samples per service in a short phase (an always-on profiler runs at 19).
FREQUENCY = "99"


@dataclass(frozen=True)
class Service:
    name: str
    language: str
    path: str  # what the load generator asks for
    hot: str  # the function its hot path runs through (as bpfscope names it)


CATALOG = Service("catalog", "Go", "/search?q=red+steel+lamp", "main.rankProducts")
PRICING = Service("pricing", "Rust", "/quote", "pricing::price_basket")
IMAGES = Service("images", "C", "/thumbnail", "checksum_slow")
ORDERS = Service("orders", "Python", "/invoice", "render_invoice")


def build(work: Path) -> dict[str, list[str]]:
    """Each service's command line, less its ports."""
    env = {**os.environ, "GOCACHE": str(work / "go-cache"), "GOPATH": str(work / "go"), "HOME": str(work)}
    subprocess.run(
        ["go", "build", "-o", str(work / "catalog"), str(SERVICES / "catalog.go")], check=True, env=env
    )
    # Release builds, as shipped: no frame pointers in either.
    subprocess.run(
        ["rustc", "-C", "opt-level=3", "-o", str(work / "pricing"), str(SERVICES / "pricing.rs")], check=True
    )
    subprocess.run(
        ["gcc", "-O2", "-g", "-fomit-frame-pointer", "-pthread", "-o", str(work / "images"),
         str(SERVICES / "images.c")],
        check=True,
    )  # fmt: skip
    return {
        "catalog": [str(work / "catalog")],
        "pricing": [str(work / "pricing")],
        "images": [str(work / "images")],
        "orders": ["/usr/bin/python3.11", str(SERVICES / "orders.py")],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rates(socketserver.ThreadingTCPServer):
    """The upstream pricing asks for the day's rate: a line in, a line out, RATES_DELAY_S later."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RatesHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class RatesHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        time.sleep(RATES_DELAY_S)
        self.wfile.write(b"107\n")


@dataclass
class Running:
    """A service started, and the load on it: clients asking in a loop, each answer timed."""

    service: Service
    proc: subprocess.Popen[bytes]
    port: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    clients: list[threading.Thread] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def load(self, clients: int = 2) -> None:
        for _ in range(clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.clients.append(thread)

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                conn.request("GET", self.service.path)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                time.sleep(0.05)
                continue
            self.latencies.append(time.perf_counter() - t)

    def mark(self) -> tuple[int, float, float]:
        """(requests answered, CPU seconds of the service, time): taken at a phase's ends."""
        return len(self.latencies), cpu_seconds(self.pid), time.monotonic()

    def since(self, mark: tuple[int, float, float]) -> dict[str, float]:
        """Requests per second, mean latency and the service's CPU (percent of one CPU) since a mark."""
        done, cpu, t = mark
        latencies = self.latencies[done:]
        elapsed = time.monotonic() - t
        return {
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "latency_ms": round(1000 * sum(latencies) / len(latencies), 2) if latencies else 0.0,
            "cpu_pct": round(100 * (cpu_seconds(self.pid) - cpu) / elapsed, 1),
        }

    def end(self) -> None:
        self.stop.set()
        for thread in self.clients:
            thread.join(timeout=15)
        self.proc.kill()
        self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User and system time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(service: Service, command: list[str], *extra: str, env: dict[str, str] | None = None) -> Running:
    port = free_port()
    proc = subprocess.Popen([*command, str(port), *extra], env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{service.name} did not start") from None
            time.sleep(0.05)
    running = Running(service, proc, port)
    running.load()
    return running


def profile_of(records: list[dict[str, Any]], kind: str = "cpu") -> Profile:
    return Profile.from_records(records, kind=kind)


def hottest(profile: Profile, pid: int, hot: str = "") -> dict[str, Any]:
    """A service's hottest functions: by total (on the stack) and by self (where the CPU was), and the
    percent of its samples with ``hot`` on the stack."""
    mine = profile.of_process(pid)
    total = sum(mine.value(key) for key in mine.samples)  # samples on-CPU, microseconds off
    if not total:
        return {"samples": 0, "shares": {}, "self": [], "hot_pct": 0.0}
    functions = mine.functions()
    by_self = sorted(functions, key=lambda r: -r[2])
    return {
        "samples": mine.total_samples,
        "shares": {fn: round(100 * n / total, 1) for fn, _, _, n in functions[:12]},
        "self": [[fn, module, round(100 * own / total, 1)] for fn, module, own, _ in by_self[:5]],
        "hot_pct": round(mine.shares().get(hot, 0.0), 1),
    }


def write_graph(profile: Profile, path: Path, title: str, baseline: Profile | None = None) -> None:
    path.write_text(flamegraph.html(profile, title, baseline=baseline))


def screenshot(page: Path, png: Path) -> bool:
    """A PNG of an HTML page, from headless Chromium (False where there is none)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        return False
    with tempfile.TemporaryDirectory() as profile_dir:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", f"--user-data-dir={profile_dir}", "--hide-scrollbars",
             "--window-size=1200,640", "--virtual-time-budget=3000", f"--screenshot={png}",
             page.resolve().as_uri()],
            capture_output=True,
            timeout=120,
            check=False,
        )  # fmt: skip
    return png.exists()


def phase_hot_paths(services: list[Running], seconds: float, out: Path) -> dict[str, Any]:
    """One profile of the whole machine; each service's part of it."""
    marks = {s.service.name: s.mark() for s in services}
    with Watcher(
        "profile", "--frequency", FREQUENCY, "--duration", str(seconds), "-o", str(out / "machine.pb.gz")
    ) as watcher:
        profile = profile_of(watcher.wait())
    result: dict[str, Any] = {"lost": watcher.lost(), "services": {}}
    for s in services:
        found = {**hottest(profile, s.pid, s.service.hot), **s.since(marks[s.service.name])}
        found["language"] = s.service.language
        found["hot"] = s.service.hot
        # Per executable (every python3.11 of the machine together): [stacks that reached their root, all].
        found["reached_root"] = profile.roots.get(Path(s.proc.args[0]).name, [0, 0])
        result["services"][s.service.name] = found
        write_graph(profile.of_process(s.pid), out / f"{s.service.name}.html",
                    f"{s.service.name} ({s.service.language}): on-CPU")  # fmt: skip
    return result


def phase_before_after(
    images: Running, command: list[str], seconds: float, out: Path
) -> tuple[Running, dict[str, Any]]:
    """The images service profiled as it is, then with its fast checksum (CHECKSUM=fast); the diff."""
    result: dict[str, Any] = {}
    profiles = {}
    for label in ("before", "after"):
        if label == "after":
            images.end()
            images = start(IMAGES, command, env={"CHECKSUM": "fast"})
            time.sleep(0.5)
        mark = images.mark()
        with Watcher(
            "profile", "-p", str(images.pid), "--frequency", FREQUENCY, "--duration", str(seconds),
            "-o", str(out / f"images-{label}.pb.gz"),
        ) as watcher:  # fmt: skip
            profiles[label] = profile_of(watcher.wait())
        result[label] = {**hottest(profiles[label], images.pid, "checksum_slow"), **images.since(mark)}
    diff = subprocess.run(
        [*bpfscope_cmd(), "profile", "diff", str(out / "images-before.pb.gz"),
         str(out / "images-after.pb.gz"), "-o", str(out / "images-diff.html"), "--rows", "8"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    result["diff_table"] = diff.stdout
    before_rate, after_rate = result["before"]["requests_per_s"], result["after"]["requests_per_s"]
    result["speedup"] = round(after_rate / max(before_rate, 0.1), 2)
    return images, result


def phase_off_cpu(pricing: Running, seconds: float, out: Path) -> dict[str, Any]:
    """pricing's threads on and off the CPU at once: little CPU, and its requests' time blocked under
    fetch_rates."""
    mark = pricing.mark()
    common = ["-p", str(pricing.pid), "--duration", str(seconds)]
    with (
        Watcher("offcputime", *common, "-o", str(out / "pricing-offcpu.pb.gz")) as off,
        Watcher("profile", *common, "--frequency", FREQUENCY) as on,
    ):
        blocked = profile_of(off.wait(), kind="offcpu")
        on_cpu = profile_of(on.wait())
    load = pricing.since(mark)
    requests = load["requests_per_s"] * seconds
    write_graph(blocked, out / "pricing-offcpu.html", "pricing (Rust): off-CPU time")
    under: dict[str, float] = {}
    for (_, frames), ns in blocked.weights.items():
        for name in {f.function for f in frames} & {"fetch_rates", "pricing::fetch_rates", "pricing::serve"}:
            under[name] = under.get(name, 0) + ns
    fetch_ns = under.get("pricing::fetch_rates", 0)
    return {
        **load,
        "blocked_s": round(sum(blocked.weights.values()) / 1e9, 3),
        "fetch_rates_blocked_s": round(fetch_ns / 1e9, 3),
        "fetch_rates_ms_per_request": round(fetch_ns / 1e6 / requests, 2) if requests else 0.0,
        "upstream_delay_ms": 1000 * RATES_DELAY_S,
        "offcpu_top": hottest(blocked, pricing.pid)["shares"],
        "oncpu_top": hottest(on_cpu, pricing.pid)["shares"],
        "lost": {**off.lost(), **on.lost()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--out", type=Path, default=HERE / "report")
    parser.add_argument("--no-pictures", action="store_true", help="no PNG screenshots of the graphs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run.py: run as root (bpfscope loads BPF programs)")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seconds": args.seconds, "frequency_hz": int(FREQUENCY)}
    rates = Rates()
    running: list[Running] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="parca-tutorial-") as work:
        commands = build(Path(work))
        try:
            running = [
                start(CATALOG, commands["catalog"]),
                start(PRICING, commands["pricing"], str(rates.port)),
                start(IMAGES, commands["images"]),
                start(ORDERS, commands["orders"]),
            ]
            time.sleep(1)  # every service warm (the Go one builds its catalogue)
            print(f"== hot paths: the whole machine for {args.seconds:g} s at {FREQUENCY} Hz", flush=True)
            report["hot_paths"] = phase_hot_paths(running, args.seconds, args.out)
            for name, found in report["hot_paths"]["services"].items():
                top = ", ".join(f"{fn} {pct}%" for fn, _, pct in found["self"][:3])
                print(f"   {name:8} {found['language']:6} {found['hot']} on {found['hot_pct']}% of "
                      f"{found['samples']} samples; most CPU in: {top}")  # fmt: skip
            print("== before/after: images with CHECKSUM=fast", flush=True)
            running[2], report["before_after"] = phase_before_after(
                running[2], commands["images"], args.seconds, args.out
            )
            ba = report["before_after"]
            print(f"   {ba['before']['requests_per_s']} -> {ba['after']['requests_per_s']} requests/s "
                  f"({ba['speedup']}x)\n{ba['diff_table']}")  # fmt: skip
            print("== off-CPU: pricing, slow while idle", flush=True)
            report["off_cpu"] = off = phase_off_cpu(running[1], args.seconds, args.out)
            print(f"   {off['latency_ms']} ms a request at {off['cpu_pct']}% of a CPU; "
                  f"{off['fetch_rates_ms_per_request']} ms of each blocked under fetch_rates")  # fmt: skip
        finally:
            for service in running:
                service.end()
            rates.shutdown()
    if not args.no_pictures:
        pages = ["images.html", "catalog.html", "pricing.html", "orders.html", "images-diff.html",
                 "pricing-offcpu.html"]  # fmt: skip
        report["pictures"] = [
            f"{Path(page).stem}.png"
            for page in pages
            if screenshot(args.out / page, args.out / f"{Path(page).stem}.png")
        ]
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report in {args.out}")


if __name__ == "__main__":
    main()
