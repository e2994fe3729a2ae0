"""The agent with everything on, on a busy machine: the network-analysis mesh under its load (HTTP through
nginx, haproxy and nginx again at 12 responses of 4 MiB a second, pgbench at 100 read-only transactions a
second). Measured over the same window:

- the agent's CPU: its process (user and system, /proc/PID/stat) and its BPF programs in the kernel
  (run_time_ns with kernel.bpf_stats_enabled, the programs bpftool says the agent holds), as a share of
  the whole machine (every CPU);
- its memory: RSS sampled every second (max and last) and the kernel's high-water mark (VmHWM);
- the store's growth, per hour;
- what the collectors lost (agent.collector's running counts at the end);
- the UI: each page loaded in Debian's headless Chromium (navigation to the page drawn), median of
  five loads, from the store this run wrote;
- with ``--soak MINUTES``: RSS every 10 s over the whole run, to show it flat (the first and the last
  fifth compared), and every minute where it is (the rings, heap, other anonymous memory, files);
- with ``--census``: every minute, from a thread inside the agent, Python's allocated blocks, glibc's
  mallinfo2, and the garbage collector's objects counted by type (the types that grew most since the
  first count), to tell live objects from memory the allocators keep. Counting takes the interpreter
  for about half a second a minute. With CENSUS_TRACEMALLOC=1 also the source lines whose allocations
  in use grew most (tracemalloc: it slows the agent down, so its CPU then means nothing).

    .venv/bin/python benchmarks/agent_overhead.py --seconds 120 [--soak 30] [--census] [--json]
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
    return sum(user_system(Path(f"/proc/{pid}/stat")))


def user_system(stat: Path) -> tuple[float, float]:
    """A process's user and system CPU seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


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


def bpf_run_ns(pid: int) -> dict[int, tuple[int, int]]:
    """Time the kernel spent in each BPF program the agent holds open and its runs, by program id (each
    program's fdinfo says its run_time_ns and run_cnt when kernel.bpf_stats_enabled is 1)."""
    programs: dict[int, tuple[int, int]] = {}
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            text = info.read_text()
            prog = re.search(r"^prog_id:\s+(\d+)", text, re.M)
            run = re.search(r"^run_time_ns:\s+(\d+)", text, re.M)
            runs = re.search(r"^run_cnt:\s+(\d+)", text, re.M)
            if prog and run and runs:
                programs[int(prog.group(1))] = (int(run.group(1)), int(runs.group(1)))
    return programs


def program_names() -> dict[int, str]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"]: p.get("name", "?") for p in json.loads(out.stdout)}


COLLECTORS = ("health", "profile", "offcpu", "security", "requests")

# Runs the agent (``python -c CENSUS agent ...``) with a thread that appends a JSON line to the file
# named by BPFSCOPE_CENSUS every CENSUS_EVERY seconds.
CENSUS = """
import collections, ctypes, gc, json, os, re, runpy, sys, threading, time

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

# Python's small-object allocator: its arenas (1 MiB each, freed only when wholly empty) and the
# bytes of the blocks in use in them.
def pymalloc_mb(libc):
    stats = f"/dev/shm/census-{os.getpid()}"
    fp = libc.fopen(stats.encode(), b"w")
    ctypes.pythonapi._PyObject_DebugMallocStats(ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    text = open(stats).read()
    os.unlink(stats)
    wanted = r"^# (arenas allocated current|bytes in allocated blocks) *= *([\\d,]+)"
    found = dict(re.findall(wanted, text, re.M))
    return {
        "arenas": int(found.get("arenas allocated current", "0").replace(",", "")),
        "blocks": round(int(found.get("bytes in allocated blocks", "0").replace(",", "")) / 2**20, 1),
    }

def census(path, every):
    traced = os.environ.get("CENSUS_TRACEMALLOC") == "1"
    if traced:  # where the allocations in use grew, by line (slows the agent down: diagnosis only)
        import tracemalloc
        tracemalloc.start(1)
        base = None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.fopen.restype = ctypes.c_void_p
    first = None
    t0 = time.monotonic()
    while True:
        time.sleep(every)
        objects = gc.get_objects()
        counts = collections.Counter(type(o).__qualname__ for o in objects)
        del objects
        first = first or counts
        info = libc.mallinfo2()
        grew = sorted(counts, key=lambda k: first.get(k, 0) - counts[k])[:15]
        line = {
            "t": round(time.monotonic() - t0),
            "allocated_blocks": sys.getallocatedblocks(),
            "gc_objects": sum(counts.values()),
            "pymalloc_mb": pymalloc_mb(libc),
            "malloc_mb": {
                f: round(getattr(info, f) / 2**20, 1) for f in ("arena", "hblkhd", "uordblks", "fordblks")
            },
            "grew": {k: [first.get(k, 0), counts[k]] for k in grew},
        }
        if traced:
            snap = tracemalloc.take_snapshot()
            base = base or snap
            line["traced_grew_kb"] = [
                [str(d.traceback), round(d.size_diff / 1024), round(d.size / 1024)]
                for d in snap.compare_to(base, "lineno")[:12]
            ]
        with open(path, "a") as out:
            out.write(json.dumps(line) + "\\n")

threading.Thread(
    target=census, args=(os.environ["BPFSCOPE_CENSUS"], float(os.environ.get("CENSUS_EVERY", "60"))),
    daemon=True,
).start()
sys.argv = ["bpfscope", *sys.argv[1:]]
runpy.run_module("bpfscope", run_name="__main__", alter_sys=True)
"""


def start_agent(
    store: Path, only: list[str] | None = None, unwind: str | None = None, census: Path | None = None
) -> tuple[subprocess.Popen[str], str, list[str]]:
    """The agent with every default (everything on), or with ``only`` these collectors; with
    ``census``, counting its objects into that file every minute."""
    config = store.parent / "agent.yaml"
    text = f"listen: 127.0.0.1:0\nstore: {{path: {store}}}\n"
    sections = {c: f"enabled: {str(c in only).lower()}" for c in COLLECTORS} if only else {}
    if unwind:
        sections["profile"] = ", ".join(filter(None, [sections.get("profile"), f"unwind: {unwind}"]))
    if sections:
        text += "collectors:\n" + "".join(f"  {c}: {{{v}}}\n" for c, v in sections.items())
    config.write_text(text)
    command = ["-c", CENSUS] if census else ["-m", "bpfscope"]
    env = {**os.environ, "BPFSCOPE_CENSUS": str(census)} if census else None
    proc = subprocess.Popen(
        [sys.executable, *command, "agent", "--config", str(config)],
        env=env,
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
    seconds: float,
    soak_minutes: float | None,
    only: list[str] | None = None,
    unwind: str | None = None,
    census: bool = False,
    programs: int = 8,
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
        census_file = Path(tmp) / "census.jsonl" if census else None
        agent, address, stderr = start_agent(store, only, unwind, census_file)
        stack.callback(lambda: agent.poll() is None and agent.kill())
        time.sleep(warmup)
        user0 = user_system(Path(f"/proc/{agent.pid}/stat"))[0]
        cpu0, bpf0, t0, size0 = (
            cpu_seconds(agent.pid),
            bpf_run_ns(agent.pid),
            time.monotonic(),
            Store(store).size(),
        )
        rss: list[tuple[float, int]] = []
        parts: list[dict[str, float]] = []
        every = 10.0 if soak_minutes else 1.0
        while time.monotonic() - t0 < measured:
            now = round(time.monotonic() - t0, 1)
            rss.append((now, status_kb(agent.pid, "VmRSS")))
            if soak_minutes and now >= 60 * len(parts):
                parts.append({"t": now, **rss_parts_mb(agent.pid)})
            time.sleep(every)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(agent.pid) - cpu0
        user = user_system(Path(f"/proc/{agent.pid}/stat"))[0] - user0
        bpf1 = bpf_run_ns(agent.pid)
        spent = {i: ns - bpf0.get(i, (0, 0))[0] for i, (ns, _) in bpf1.items()}
        runs = {i: cnt - bpf0.get(i, (0, 0))[1] for i, (_, cnt) in bpf1.items()}
        bpf = sum(spent.values()) / 1e9
        names = program_names()
        by_name: dict[str, list[float]] = {}
        for i, ns in spent.items():
            total = by_name.setdefault(names.get(i, str(i)), [0.0, 0])
            total[0] += ns / 1e9
            total[1] += runs[i]
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:programs]
        results["bpf_top_pct_of_machine"] = {
            n: round(100 * t / (elapsed * (os.cpu_count() or 1)), 2) for n, (t, _) in top
        }
        # Runs a second and ns a run: what a program costs each time, apart from how often it runs.
        results["bpf_top_runs"] = {
            n: {"per_s": round(cnt / elapsed), "ns_per_run": round(1e9 * t / cnt) if cnt else 0}
            for n, (t, cnt) in top
        }
        machine = elapsed * (os.cpu_count() or 1)
        results["cpu_pct_of_machine"] = {
            "agent_process": round(100 * cpu / machine, 2),
            "bpf_programs": round(100 * bpf / machine, 2),
            "total": round(100 * (cpu + bpf) / machine, 2),
            "agent_user": round(100 * user / machine, 2),
            "agent_system": round(100 * (cpu - user) / machine, 2),
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
            results["rss_per_minute_mb"] = [
                round(statistics.mean(kb for t, kb in rss if m * 60 <= t < (m + 1) * 60) / 1024, 1)
                for m in range(int(measured // 60))
            ]
            results["rss_parts_per_minute_mb"] = parts
        if census_file and census_file.exists():
            results["census"] = [json.loads(line) for line in census_file.read_text().splitlines()]
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
        lines = "".join(stderr).strip().splitlines()
        results["summary"] = lines[-1]
        results["stderr_tail"] = lines[-40:]  # losses as they were reported, by collector and reason
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
    parser.add_argument(
        "--census", action="store_true", help="count the agent's objects every minute (see above)"
    )
    parser.add_argument(
        "--programs",
        type=int,
        default=8,
        help="how many of the agent's BPF programs to list, the costliest first (a name held by two "
        "objects, such as enter_writev, is their sum)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.seconds, args.soak, args.only, args.unwind, args.census, args.programs)
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
