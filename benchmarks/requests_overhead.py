"""What request tracing costs the traced: nginx under wrk (HTTP/1.1 keep-alive, a 3-byte file) and
PostgreSQL under pgbench (select-only, over TCP), each untraced and traced by `bpfscope requests` in the
same run, the cases alternating round by round (medians kept):

- throughput (wrk's requests/s, pgbench's transactions/s) and the share of it kept;
- latency p50 and p99 (wrk --latency's distribution; pgbench's per-transaction log), and what tracing
  added to them;
- BPF time per request: the run time of the tracer's programs (kernel.bpf_stats_enabled, each program's
  fdinfo) over the requests the load generator completed;
- the tracer's CPU (user + system) and RSS (sampled every second: first and last, max), and what it
  lost, by reason, from its final losses record.

The tracer writes JSON lines to a file: every request is parsed, paired and formatted, as it would be
for the store. wrk, nginx, PostgreSQL and the tracer share the machine's CPUs.

    .venv/bin/python benchmarks/requests_overhead.py [--seconds 10] [--rounds 3] [--json]
    .venv/bin/python benchmarks/requests_overhead.py --soak 600      # RSS over 10 minutes of wrk
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
from agent_overhead import bpf_run_ns, cpu_seconds, status_kb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_requests_servers import PG_BIN, free_port, stop, wait_port  # noqa: E402

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@contextlib.contextmanager
def nginx(work: Path) -> Iterator[int]:
    """nginx with one worker on 127.0.0.1: keep-alive, no access log, /small (3 bytes)."""
    root = work / "www"
    root.mkdir(parents=True)
    (root / "small").write_bytes(b"ok\n")
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"user root;\nworker_processes 1;\ndaemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n access_log off;\n keepalive_requests 100000000;\n client_body_temp_path {work}/body;\n"
        f" server {{ listen 127.0.0.1:{port}; location / {{ root {root}; }} }}\n}}\n"
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def postgres(work: Path) -> Iterator[int]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with pgbench's tables at scale 10."""
    data = work / "pg"
    data.mkdir(parents=True)
    for up in (work, work.parent):  # the server runs as postgres
        up.chmod(0o755)
    subprocess.run(["chown", "-R", "postgres", str(data)], check=True)
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c shared_buffers=128MB -c fsync=off"
    pg_ctl = [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-o", options, "-l", str(data / "log"), "-w", "start"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        pgbench(port, "-i", "-q", "-s", "10")
        yield port
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)


def pgbench(port: int, *args: str, cwd: Path | None = None) -> str:
    cmd = ["runuser", "-u", "postgres", "--", "pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
           *args, "postgres"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=cwd).stdout


def wrk(port: int, seconds: int, paced: bool = False) -> dict[str, float]:
    """wrk as fast as four connections go; or ``paced``: eight connections, each waiting 1 ms between a
    response and its next request (wrk's latency starts at the request's write, after the wait)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("function delay() return 1 end\n")
        script.flush()
        pace = ["-c8", "-s", script.name] if paced else ["-c4"]
        out = subprocess.run(
            ["wrk", "-t1", *pace, f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/small"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    lat = {q: float(v) * UNITS[u] for q, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert done and rps, out
    return {"throughput": float(rps.group(1)), "p50_ms": lat["50"], "p99_ms": lat["99"],
            "requests": float(done.group(1))}  # fmt: skip


def select_only(port: int, seconds: int, paced: bool = False) -> dict[str, float]:
    """pgbench -S, 4 clients over TCP, as fast as they go or ``paced`` (-R 2000 transactions/s);
    latencies from its per-transaction log."""
    pace = ["-R", "2000"] if paced else []
    with tempfile.TemporaryDirectory() as logs:
        Path(logs).chmod(0o777)
        log = ["--log", "--log-prefix", f"{logs}/tx"]
        out = pgbench(port, "-S", "-n", "-c4", "-j2", *pace, f"-T{seconds}", *log)
        lat = sorted(int(line.split()[2]) for p in Path(logs).glob("tx*") for line in p.open())
    tps = re.search(r"tps = ([\d.]+)", out)
    assert tps and lat, out
    return {"throughput": float(tps.group(1)), "p50_ms": lat[len(lat) // 2] / 1e3,
            "p99_ms": lat[int(0.99 * len(lat))] / 1e3, "requests": float(len(lat))}  # fmt: skip


class Tracer:
    """`bpfscope requests --json --port PORT` into a temporary file (read at the end for the requests it
    recorded and its losses), its RSS sampled every second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rss_mb: list[float] = []
        self.losses: dict[str, Any] = {}
        self.served = 0  # requests recorded by the server's side

    @contextlib.contextmanager
    def running(self) -> Iterator[Tracer]:
        cmd = [common.bpfscope(), "requests", "--json", "--port", str(self.port)]
        with tempfile.TemporaryFile("w+") as stdout:
            yield from self._run(cmd, stdout)

    def _run(self, cmd: list[str], stdout: Any) -> Iterator[Tracer]:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if not line.startswith("Tracing"):
            raise RuntimeError(f"bpfscope requests did not start: {line}{proc.stderr.read()}")
        self.pid = proc.pid
        done = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(done,), daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            done.set()
            sampler.join()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=120)
            # Only the requests collector's losses record is kept (the rest is each request's JSON).
            stdout.seek(0)
            for line in stdout:
                if '"trace_role": "server"' in line and '_events"' in line:
                    self.served += 1
                elif line.startswith('{"record": "losses"') and '"collector": "requests"' in line:
                    self.losses = json.loads(line)

    def _sample(self, done: threading.Event) -> None:
        while not done.wait(1.0):
            self.rss_mb.append(status_kb(self.pid, "VmRSS") / 1024)

    def usage(self) -> tuple[float, int]:
        """CPU seconds of the process, and its BPF programs' run time (ns)."""
        return cpu_seconds(self.pid), sum(ns for ns, _ in bpf_run_ns(self.pid).values())


def measure(load: Any, port: int, seconds: int, traced: bool) -> dict[str, float]:
    if not traced:
        return load(port, seconds)
    tracer = Tracer(port)
    with tracer.running():
        cpu0, bpf0 = tracer.usage()
        got = load(port, seconds)
        cpu1, bpf1 = tracer.usage()
    got["bpf_us_per_request"] = (bpf1 - bpf0) / 1e3 / got["requests"]
    got["tracer_cpu_pct"] = 100 * (cpu1 - cpu0) / seconds
    # (what a request costs the tracer: the figure the machine's load moves least)
    got["tracer_cpu_us_per_request"] = (cpu1 - cpu0) * 1e6 / got["requests"]
    got["rss_max_mb"] = max(tracer.rss_mb, default=0.0)
    reasons = tracer.losses.get("reasons", {})
    got["traced_pct"] = 100 * tracer.served / got["requests"]
    got["lost"] = float(sum(v for k, v in reasons.items() if k not in ("unanswered", "unmatched")))
    return got


def compare(load: Any, port: int, seconds: int, rounds: int) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {"untraced": [], "traced": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(measure(load, port, seconds, name == "traced"))
    out = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, rs in runs.items():
        for k in ("throughput", "p50_ms", "p99_ms"):
            # (the rounds' spread, for the reading of a noisy machine)
            out[name][f"{k}_min"], out[name][f"{k}_max"] = min(r[k] for r in rs), max(r[k] for r in rs)
    base, traced = out["untraced"], out["traced"]
    traced["kept_pct"] = 100 * traced["throughput"] / base["throughput"]
    traced["added_p50_us"] = 1e3 * (traced["p50_ms"] - base["p50_ms"])
    traced["added_p99_us"] = 1e3 * (traced["p99_ms"] - base["p99_ms"])
    return out


def soak(port: int, seconds: int) -> dict[str, Any]:
    """RSS while wrk runs for ``seconds``: every second, the first and last fifth's medians."""
    tracer = Tracer(port)
    with tracer.running():
        got = wrk(port, seconds, paced=True)
    rss = tracer.rss_mb
    fifth = max(1, len(rss) // 5)
    return {"seconds": seconds, "requests_per_s": got["throughput"],
            "rss_first_mb": statistics.median(rss[:fifth]), "rss_last_mb": statistics.median(rss[-fifth:]),
            "rss_max_mb": max(rss), "rss": rss, "lost": tracer.losses.get("reasons", {})}  # fmt: skip


CASES = {
    "nginx": ("nginx", functools.partial(wrk, paced=False)),
    "nginx paced": ("nginx", functools.partial(wrk, paced=True)),
    "pgbench -S": ("postgres", functools.partial(select_only, paced=False)),
    "pgbench -S -R 2000": ("postgres", functools.partial(select_only, paced=True)),
}


def main() -> None:
    parser = common.overhead_parser(__doc__, 10)
    parser.add_argument("--soak", type=int, default=0, help="Seconds of paced wrk, RSS sampled.")
    parser.add_argument("--only", choices=("nginx", "postgres"), help="One of the two servers.")
    args = parser.parse_args()
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text()
    stats.write_text("1\n")
    result: dict[str, Any] = {}
    servers = {"nginx": nginx, "postgres": postgres}
    try:
        with tempfile.TemporaryDirectory(prefix="bpfscope-reqbench-") as tmp:
            for server, start in servers.items():
                if args.only not in (None, server):
                    continue
                with start(Path(tmp) / server) as port:
                    for name, (on, load) in CASES.items():
                        if on == server:
                            result[name] = compare(load, port, args.seconds, args.rounds)
                    if args.soak and server == "nginx":
                        result["soak"] = soak(port, args.soak)
    finally:
        stats.write_text(before)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        "| load | untraced /s | traced /s | kept | p50 untraced -> traced | p99 untraced -> traced | "
        "BPF per request | tracer CPU | tracer CPU per request | tracer RSS max | requests recorded | "
        "events lost |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in CASES:
        if name not in result:
            continue
        base, traced = result[name]["untraced"], result[name]["traced"]
        print(f"| {name} | {base['throughput']:,.0f} | {traced['throughput']:,.0f} | "
              f"{traced['kept_pct']:.1f}% | "
              f"{base['p50_ms'] * 1e3:.0f} -> {traced['p50_ms'] * 1e3:.0f} us | "
              f"{base['p99_ms'] * 1e3:.0f} -> {traced['p99_ms'] * 1e3:.0f} us | "
              f"{traced['bpf_us_per_request']:.2f} us | {traced['tracer_cpu_pct']:.0f}% | "
              f"{traced['tracer_cpu_us_per_request']:.0f} us | "
              f"{traced['rss_max_mb']:.0f} MB | {traced['traced_pct']:.1f}% | "
              f"{traced['lost']:,.0f} |")  # fmt: skip
    if "soak" in result:
        soaked = {k: v for k, v in result["soak"].items() if k != "rss"}
        print("soak:", json.dumps(soaked))


if __name__ == "__main__":
    main()
