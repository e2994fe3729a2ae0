#!/usr/bin/env python3
"""The network analysis experiment: a service mesh slows down, CPU and RAM look fine, one hop loses packets.

One command, as root, after ./setup.sh:

    .venv/bin/python experiments/network-analysis/run.py [--out DIR] [--seconds S] [--loss PCT | --rate MBIT]
        [--link LINK] [--json]

It builds the mesh of mesh.py (client -> gateway nginx -> sidecar haproxy -> app nginx -> PostgreSQL, each
in its own network namespace), drives large responses through it at a steady rate while the app queries
its database, and runs two phases: healthy, then with packet loss injected on one link (the app's
responses to the sidecar, by default), or with --rate that link limited to a rate below the load.
bpfscope watches the whole time: sockstat (socket buffers in every namespace), tcpretrans -c
(retransmits per connection), tcptop (bytes per connection) and the health check (CPU, RAM, socket
buffers, TCP). Each namespace's /proc/net/snmp and each veth's byte counters are read at
the phase boundaries as the independent truth. The report (Markdown with pictures) goes to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import mesh  # noqa: E402
from scenario import Watcher  # noqa: E402

if TYPE_CHECKING:
    from bpfscope.health.window import CheckWindow

# Offered load: 12 responses of 4 MiB a second (about 50 MB/s through three proxies), 8 client workers.
# Well within what two CPUs move through veths (the mesh's own processes use about a third of one CPU for
# it), so that CPU stays unremarkable and the fault is the network.
RATE = 12.0
WORKERS = 8
# The app's database traffic: pgbench's read-only transactions at a steady 100 a second.
DB_RATE = 100
DEFAULT_LOSS_PCT = 5
DEFAULT_LINK = "sidecar->app"


@dataclass
class Phase:
    name: str
    start: float = 0.0
    end: float = 0.0
    snmp: dict[str, dict[str, int]] = field(default_factory=dict)  # service -> counter deltas
    link_bytes: dict[str, int] = field(default_factory=dict)  # link -> bytes both ways on its veth
    check: list[dict[str, Any]] = field(default_factory=list)
    fault_dropped: int = 0  # packets the fault dropped (the nftables rule's or the token bucket's count)
    mesh_cpu_pct: float = 0.0  # CPU used by the mesh's own processes, in % of one CPU

    @property
    def seconds(self) -> float:
        return self.end - self.start


def health_window() -> CheckWindow:
    """bpfscope's health check through the Python API: the rules of `bpfscope check` for CPU, RAM, TCP
    and socket buffers, on one window (its programs load when it is entered, before it opens). The
    mesh's servers, its client and pgbench are this process's children, which bpfscope leaves out of
    what it watches unless told: include_self keeps them in, as `bpfscope check` run beside the
    experiment sees them."""
    from bpfscope.domains.net.health import SocketBufferRule, TcpRule
    from bpfscope.domains.system.health import CpuRule, MemoryRule
    from bpfscope.health.window import CheckWindow

    return CheckWindow([CpuRule, MemoryRule, TcpRule, SocketBufferRule], include_self=True)


def run_phase(phase: Phase, t0: float, seconds: float) -> None:
    phase.start = time.time() - t0
    snmp_before = {s: mesh.snmp(s) for s in mesh.SERVICES}
    bytes_before = {link.name: mesh.link_bytes(link) for link in mesh.LINKS}
    cpu_before = mesh.cpu_seconds()

    def until(t: float) -> float:
        """Seconds from now to ``t`` seconds into the phase."""
        return max(0.0, phase.start + t - (time.time() - t0))

    # The check's window sits inside the phase, clear of its edges (its programs load meanwhile). Its
    # collectors are read when it opens and when it closes, so that every row covers the whole window
    # (none of these rules reads a ring that would need draining in between).
    edge = min(1.0, seconds / 4)
    with health_window() as check:
        time.sleep(until(edge))
        check.start()
        time.sleep(max(until(seconds - edge), 0.5))
        phase.check = check.finish().records(time.time())
    time.sleep(until(seconds))
    cpu_after = mesh.cpu_seconds()
    phase.end = time.time() - t0
    used = sum(t - cpu_before[pid] for pid, t in cpu_after.items() if pid in cpu_before)
    phase.mesh_cpu_pct = 100.0 * used / phase.seconds
    for s in mesh.SERVICES:
        after = mesh.snmp(s)
        phase.snmp[s] = {k: after[k] - snmp_before[s].get(k, 0) for k in after if k.startswith("Tcp.")}
    phase.link_bytes = {link.name: mesh.link_bytes(link) - bytes_before[link.name] for link in mesh.LINKS}


def run_experiment(work: Path, seconds: float, fault: mesh.Fault) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": {
            "seconds": seconds,
            "fault": {"kind": fault.kind, "value": fault.value, "link": fault.link.name, "name": fault.name},
            "rate": RATE,
            "workers": WORKERS,
            "response_bytes": mesh.RESPONSE_BYTES,
            "db_rate": DB_RATE,
            "links": {link.name: {"left": link.left_ip, "right": link.right_ip} for link in mesh.LINKS},
            "netns": mesh.NETNS,
        }
    }
    with mesh.topology(), mesh.servers(work) as group, contextlib.ExitStack() as stack:
        print("mesh up: " + ", ".join(f"{k} pid {v}" for k, v in group.pids().items()), file=sys.stderr)
        init = mesh.pgbench("-i", "-s", "2", "-q")
        init.communicate(timeout=120)
        t0 = time.time()
        total = 2 * seconds + 2
        every = str(mesh.TOOL_INTERVAL)
        # The whole run's kernel counters are read before the tools attach and after they stop: the
        # kernel's window holds the tools', so tcpretrans can never count more than RetransSegs, and what
        # it counts less is what was retransmitted in the quiet seconds between the two (read the other
        # way round, a retransmission timer backed off past the quiet wait below once put tcpretrans 4
        # segments above the kernel's count, in a window the kernel's count did not cover).
        snmp_start = {s: mesh.snmp(s) for s in mesh.SERVICES}
        watchers = {
            "sockstat": stack.enter_context(Watcher("sockstat", "-C", str(mesh.SOCKSTAT_INTERVAL), t0=t0)),
            "tcpretrans": stack.enter_context(Watcher("tcpretrans", "-c", every, t0=t0)),
            "tcptop": stack.enter_context(Watcher("tcptop", "-C", every, t0=t0)),
        }
        db = mesh.pgbench("-S", "-c", "2", "-j", "1", "-R", str(DB_RATE), "-T", str(int(total)))
        stack.callback(lambda: db.poll() is None and os.killpg(db.pid, signal.SIGKILL))
        client = subprocess.Popen(
            mesh.in_ns(
                "client",
                sys.executable,
                str(HERE / "client.py"),
                f"http://{mesh.LINKS[0].right_ip}:{mesh.PORTS['gateway']}/big",
                str(RATE),
                str(WORKERS),
                str(total),
            ),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        stack.callback(lambda: client.poll() is None and os.killpg(client.pid, signal.SIGKILL))
        results["start_gap"] = time.time() - t0
        time.sleep(1)
        healthy = Phase("healthy")
        print(f"phase 1: healthy mesh, {seconds:g} s", file=sys.stderr)
        run_phase(healthy, t0, seconds)
        print(f"phase 2: {fault.name}, {seconds:g} s", file=sys.stderr)
        fault.apply()
        faulty = Phase(fault.name)
        try:
            run_phase(faulty, t0, seconds)
            faulty.fault_dropped = fault.dropped()
        finally:
            fault.clear()
        out, _ = client.communicate(timeout=120)
        results["client"] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for r in results["client"]:
            r["t"] = round(r["t"] - t0, 3)
        db_out, db_err = db.communicate(timeout=60)
        results["db"] = db_out[-600:] + db_err[-300:]
        # The load is over, but a segment lost just before the loss rule went can still wait for its
        # retransmission timer, backed off to a second or more: wait until no namespace's counters have
        # moved for 3 s (15 s at most), so that little is retransmitted between the tools' stop and the
        # last reading of the kernel's counters.
        last = {s: mesh.snmp(s) for s in mesh.SERVICES}
        quiet_since = time.monotonic()
        deadline = quiet_since + 15
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 3:
            time.sleep(0.5)
            now = {s: mesh.snmp(s) for s in mesh.SERVICES}
            if any(now[s].get("Tcp.RetransSegs") != last[s].get("Tcp.RetransSegs") for s in now):
                quiet_since = time.monotonic()
            last = now
        for name, watcher in watchers.items():
            results[name] = watcher.stop()
        ends = {s: mesh.snmp(s) for s in mesh.SERVICES}
        results["run_snmp"] = {}
        for s in mesh.SERVICES:
            end = ends[s]
            deltas = {k: end[k] - snmp_start[s].get(k, 0) for k in end if k.startswith("Tcp.")}
            results["run_snmp"][s] = deltas
        results["lost"] = {name: watcher.lost() for name, watcher in watchers.items()}
        results["phases"] = [asdict(p) for p in (healthy, faulty)]
        results["pids"] = group.pids()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "report", help="Where the report goes.")
    parser.add_argument("--seconds", type=float, default=30, help="Length of each phase.")
    fault = parser.add_mutually_exclusive_group()
    fault.add_argument("--loss", type=int, help=f"Packet loss in percent (default {DEFAULT_LOSS_PCT}).")
    fault.add_argument("--rate", type=int, metavar="MBIT", help="A rate limit instead of loss, in Mbit/s.")
    parser.add_argument(
        "--link", default=DEFAULT_LINK, choices=sorted(mesh.LINK_BY_NAME), help="The link that goes wrong."
    )
    parser.add_argument("--json", action="store_true", help="Also write every measurement to results.json.")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run it as root: it creates network namespaces, starts servers and loads BPF programs")
    for tool in ("nginx", "haproxy", "nft", "pgbench", str(mesh.PG_BIN / "initdb")):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            sys.exit(f"{tool} is missing: run ./setup.sh test (it installs nginx, haproxy, nftables)")
    if args.loss is not None and not 0 < args.loss < 100:
        sys.exit("--loss is a percentage between 1 and 99")
    if args.rate is not None and args.rate <= 0:
        sys.exit("--rate is in Mbit/s, more than 0")
    link = mesh.LINK_BY_NAME[args.link]
    if args.rate:
        fault = mesh.Fault("rate", args.rate, link)
    else:
        fault = mesh.Fault("loss", args.loss or DEFAULT_LOSS_PCT, link)
    mesh.on_signals()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bsb-mesh-", dir="/var/tmp") as tmp:
            results = run_experiment(Path(tmp), args.seconds, fault)
    except KeyboardInterrupt:
        # Every context above has unwound by now: servers stopped, namespaces (and their veths) removed.
        print("interrupted: the mesh is removed, no report written", file=sys.stderr)
        sys.exit(130)
    from report import analyse, write_report

    results["analysis"] = analyse(results)
    report = write_report(args.out, results)
    if args.json:
        (args.out / "results.json").write_text(json.dumps(results))
    print(f"report: {report}", file=sys.stderr)
    print(results["analysis"]["conclusion"], file=sys.stderr)


if __name__ == "__main__":
    main()
