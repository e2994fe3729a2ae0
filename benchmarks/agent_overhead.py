"""The agent with everything on, on a busy machine: the network-analysis mesh under its load (HTTP through
nginx, haproxy and nginx again at 12 responses of 4 MiB a second, pgbench at 100 read-only transactions a
second). Measured over the same window:

- the agent's CPU: its process (user + system, /proc/PID/stat) and its BPF programs in the kernel
  (run_time_ns with kernel.bpf_stats_enabled, the programs bpftool says the agent holds), as a share of
  the whole machine (every CPU);
- its memory: RSS sampled every second (max and last) and the kernel's high-water mark (VmHWM);
- the store's growth, per hour;
- what the collectors lost (agent.collector's running counts at the end);
- the UI: each page loaded in Debian's headless Chromium (navigation to the page drawn), median of
  five loads, from the store this run wrote;
- with ``--soak MINUTES``: RSS every 10 s over the whole run, to show it flat (the first and the last
  fifth compared).

    .venv/bin/python benchmarks/agent_overhead.py --seconds 120 [--soak 30] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MESH = ROOT / "experiments" / "network-analysis"
sys.path[:0] = [str(MESH), str(MESH.parent)]

import mesh  # noqa: E402

from bpfscope.sinks.store import Store  # noqa: E402

RATE, WORKERS, DB_RATE = 12.0, 8, 100  # the network-analysis experiment's load
PAGES = ("health", "disks", "services", "requests", "profiles", "security")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kb(pid: int, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def rss_parts_mb(pid: int) -> dict[str, float]:
    """Where the RSS is: the BPF maps mapped in (the rings, whose data pages are mapped twice and
    counted twice), the heap, other anonymous memory (Python's arenas, DuckDB's allocator, large
    arrays), and files (libraries); with the proportional size (PSS), which counts a ring's pages once."""
    parts = {"bpf_maps": 0, "heap": 0, "anonymous": 0, "files": 0}
    kind = "files"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not line[:1].isupper():  # a mapping's first line: its range, then its name
            name = head[5] if len(head) > 5 else ""
            kind = (
                "bpf_maps"
                if "bpf" in name
                else "heap"
                if name == "[heap]"
                else "anonymous"
                if not name or name.startswith("[")
                else "files"
            )
        elif head[0] == "Rss:":
            parts[kind] += int(head[1])
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    pss = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
    out = {k: round(v / 1024, 1) for k, v in parts.items()}
    out["pss"] = round(int(pss.group(1)) / 1024, 1) if pss else 0.0
    return out


def bpf_run_ns(pid: int) -> dict[int, int]:
    """Time the kernel spent in each BPF program the agent holds open, by program id (each program's
    fdinfo says its run_time_ns when kernel.bpf_stats_enabled is 1)."""
    programs: dict[int, int] = {}
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            text = info.read_text()
            prog = re.search(r"^prog_id:\s+(\d+)", text, re.M)
            run = re.search(r"^run_time_ns:\s+(\d+)", text, re.M)
            if prog and run:
                programs[int(prog.group(1))] = int(run.group(1))
    return programs


def program_names() -> dict[int, str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"]: p.get("name", "?") for p in json.loads(out.stdout)}


COLLECTORS = ("health", "profile", "offcpu", "security", "requests")


def start_agent(
    store: Path, only: list[str] | None = None, unwind: str | None = None
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """The agent with every default (everything on), or with ``only`` these collectors."""
    config = store.parent / "agent.yaml"
    text = f"listen: 127.0.0.1:0\nstore: {{path: {store}}}\n"
    sections = {c: f"enabled: {str(c in only).lower()}" for c in COLLECTORS} if only else {}
    if unwind:
        sections["profile"] = ", ".join(filter(None, [sections.get("profile"), f"unwind: {unwind}"]))
    if sections:
        text += "collectors:\n" + "".join(f"  {c}: {{{v}}}\n" for c, v in sections.items())
    config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "agent", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while line.startswith("agent: "):
        print(line.rstrip(), file=sys.stderr)
        line = proc.stderr.readline()
    match = re.search(r"UI and API at (\S+)/", line)
    if not match:
        proc.kill()
        sys.exit(f"the agent did not start: {line}")
    # Read all along: over a soak, a pipe nobody reads would fill and stop the agent.
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, match.group(1), stderr


def page_loads(address: str, rounds: int = 5) -> dict[str, float]:
    """Median milliseconds from navigation to the page drawn with its data, per page."""
    from playwright.sync_api import sync_playwright

    out: dict[str, float] = {}
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page()
        for name in PAGES:
            times = []
            for _ in range(rounds):
                began = time.perf_counter()
                page.goto(f"{address}/?r={time.time()}#/{name}")
                page.wait_for_selector(f"body[data-page={name}][data-rendered]", timeout=120_000)
                times.append((time.perf_counter() - began) * 1000)
            out[name] = round(statistics.median(times), 1)
        browser.close()
    return out


def run(
    seconds: float, soak_minutes: float | None, only: list[str] | None = None, unwind: str | None = None
) -> dict[str, Any]:
    warmup = 20.0
    measured = soak_minutes * 60 if soak_minutes else seconds
    results: dict[str, Any] = {
        "seconds": measured,
        "cpus": os.cpu_count(),
        "collectors": only or "all",
        "unwind": unwind or "default",
    }
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1\n")
    with (
        tempfile.TemporaryDirectory(dir="/var/tmp") as tmp,
        mesh.topology(),
        mesh.servers(Path(tmp)),
        contextlib.ExitStack() as stack,
    ):
        init = mesh.pgbench("-i", "-s", "2", "-q")
        init.communicate(timeout=120)
        total = warmup + measured + 10
        db = mesh.pgbench("-S", "-c", "2", "-j", "1", "-R", str(DB_RATE), "-T", str(int(total)))
        stack.callback(lambda: db.poll() is None and os.killpg(db.pid, signal.SIGKILL))
        url = f"http://{mesh.LINKS[0].right_ip}:{mesh.PORTS['gateway']}/big"
        client = subprocess.Popen(
            mesh.in_ns(
                "client", sys.executable, str(MESH / "client.py"), url, str(RATE), str(WORKERS), str(total)
            ),
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        stack.callback(lambda: client.poll() is None and os.killpg(client.pid, signal.SIGKILL))
        store = Path(tmp) / "store"
        agent, address, stderr = start_agent(store, only, unwind)
        stack.callback(lambda: agent.poll() is None and agent.kill())
        time.sleep(warmup)
        cpu0, bpf0, t0, size0 = (
            cpu_seconds(agent.pid),
            bpf_run_ns(agent.pid),
            time.monotonic(),
            Store(store).size(),
        )
        rss: list[tuple[float, int]] = []
        every = 10.0 if soak_minutes else 1.0
        while time.monotonic() - t0 < measured:
            rss.append((round(time.monotonic() - t0, 1), status_kb(agent.pid, "VmRSS")))
            time.sleep(every)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(agent.pid) - cpu0
        bpf1 = bpf_run_ns(agent.pid)
        spent = {i: ns - bpf0.get(i, 0) for i, ns in bpf1.items()}
        bpf = sum(spent.values()) / 1e9
        names = program_names()
        by_name: dict[str, float] = {}
        for i, ns in spent.items():
            by_name[names.get(i, str(i))] = by_name.get(names.get(i, str(i)), 0.0) + ns / 1e9
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
        results["bpf_top_pct_of_machine"] = {
            n: round(100 * t / (elapsed * (os.cpu_count() or 1)), 2) for n, t in top
        }
        machine = elapsed * (os.cpu_count() or 1)
        results["cpu_pct_of_machine"] = {
            "agent_process": round(100 * cpu / machine, 2),
            "bpf_programs": round(100 * bpf / machine, 2),
            "total": round(100 * (cpu + bpf) / machine, 2),
        }
        results["rss_mb"] = {
            "max": round(max(kb for _, kb in rss) / 1024, 1),
            "last": round(rss[-1][1] / 1024, 1),
            "high_water": round(status_kb(agent.pid, "VmHWM") / 1024, 1),
            "at_end": rss_parts_mb(agent.pid),
        }
        if soak_minutes:
            fifth = max(1, len(rss) // 5)
            results["rss_mb"]["first_fifth_mean"] = round(
                statistics.mean(kb for _, kb in rss[:fifth]) / 1024, 1
            )
            results["rss_mb"]["last_fifth_mean"] = round(
                statistics.mean(kb for _, kb in rss[-fifth:]) / 1024, 1
            )
            results["rss_series_mb"] = [(t, round(kb / 1024, 1)) for t, kb in rss]
        results["store"] = {
            "growth_mb_per_hour": round((Store(store).size() - size0) / elapsed * 3600 / 2**20, 1),
            "tables": len(Store(store).tables()),
        }
        if agent.poll() is not None:  # it died: say how, keep what was measured
            time.sleep(0.5)
            results["agent_died"] = {"returncode": agent.returncode, "stderr": stderr[-20:]}
            return results
        results["ui_page_load_ms"] = page_loads(address)
        agent.send_signal(signal.SIGTERM)
        began = time.monotonic()
        agent.wait(timeout=600)
        results["stop_s"] = round(time.monotonic() - began, 1)
        time.sleep(0.5)  # the reader's last lines
        results["summary"] = "".join(stderr).strip().splitlines()[-1]
        lost = Store(store).query(
            'SELECT collector, max(lost), max(failures) FROM "agent.collector" GROUP BY collector ORDER BY 1'
        )
        results["lost"] = {name: {"lost": n, "failures": f} for name, n, f in lost}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120, help="measured window (after 20 s of warm-up)")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="a soak of this many minutes instead")
    parser.add_argument(
        "--only", action="append", choices=COLLECTORS, help="run only this collector (repeat)"
    )
    parser.add_argument(
        "--unwind", choices=("dwarf", "fp"), help="the profiler's unwinder (default: the agent's)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.seconds, args.soak, args.only, args.unwind)
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
