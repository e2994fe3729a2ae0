"""Network tracing overhead: iperf3 throughput over loopback and a connection-churn load (many short
connections, conn_churn.c) with nothing attached, with every bpfscope network tool running at once
(tcptop, tcpretrans -c, tcplife, tcpconn, sockstat), and with one bpftrace program doing the same work
(bytes per socket, retransmits per connection, connection lifetimes, buffer-full events), each case in
the same run.

Reported: per case, iperf3 Gbit/s and connections per second, as a fraction of the untraced run.

    .venv/bin/python benchmarks/net_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
IPERF_PORT = 44201
CHURN_PORT = 44202

# What the bpfscope tools do, written as bpftrace does it: a sum per socket for throughput (tcptop),
# a count per connection for retransmits (tcpretrans -c), the time from the first state change to close
# per socket (tcplife), counts of connects and accepts (tcpconn), and buffer-full events (sockstat).
BPFTRACE_PROGRAM = """
tracepoint:sock:sock_send_length /args->ret > 0/ { @tx[pid, args->sk] = sum(args->ret); }
tracepoint:sock:sock_recv_length /args->ret > 0/ { @rx[pid, args->sk] = sum(args->ret); }
tracepoint:tcp:tcp_retransmit_skb { @retrans[args->skaddr, args->sport, args->dport] = count(); }
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
    if (@born[args->skaddr] == 0) { @born[args->skaddr] = nsecs; }
    if (args->newstate == 2) { @connects[comm] = count(); }
    if (args->oldstate == 3 && args->newstate == 1) { @accepts[comm] = count(); }
    if (args->newstate == 7) {
        @life_us = hist((nsecs - @born[args->skaddr]) / 1000);
        delete(@born[args->skaddr]);
    }
}
tracepoint:sock:sock_rcvqueue_full { @rcvqueue_full = count(); }
tracepoint:sock:sock_exceed_buf_limit { @buf_limit = count(); }
BEGIN { printf("attached\\n"); }
"""

BPFSCOPE_TOOLS = [
    ["tcptop", "1"],
    ["tcpretrans", "-c", "1"],
    ["tcplife"],
    ["tcpconn"],
    ["sockstat", "1"],
]


@contextlib.contextmanager
def all_tools(bpfscope: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for args in BPFSCOPE_TOOLS:
            stack.enter_context(common.tracer([bpfscope, *args], "Tracing"))
        yield


def iperf3_gbps(seconds: int) -> float:
    result = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def churn_per_s(churn: Path, seconds: int) -> float:
    result = subprocess.run([str(churn), str(CHURN_PORT), str(seconds)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"conn_churn failed: {result.stderr.strip()}")
    return float(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bpfscope, bpftrace = common.bpfscope(), common.bpftrace()
    cases: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "none": contextlib.nullcontext,
        "bpfscope (5 tools)": lambda: all_tools(bpfscope),
        "bpftrace (same work)": lambda: common.tracer([bpftrace, "-e", BPFTRACE_PROGRAM], "attached"),
    }
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-") as tmp:
        churn = Path(tmp) / "conn_churn"
        subprocess.run(["gcc", "-O2", "-o", str(churn), str(HERE / "conn_churn.c")], check=True)
        server = subprocess.Popen(
            ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(0.3)
            gbps: dict[str, list[float]] = {name: [] for name in cases}
            conns: dict[str, list[float]] = {name: [] for name in cases}
            # Rounds alternate the cases so that drift on the machine touches every case alike.
            for _ in range(args.rounds):
                for name, case in cases.items():
                    with case():
                        gbps[name].append(iperf3_gbps(args.seconds))
                        conns[name].append(churn_per_s(churn, args.seconds))
        finally:
            server.terminate()
            server.wait()
    result = {
        name: {
            "gbps": statistics.median(gbps[name]),
            "conns_per_s": statistics.median(conns[name]),
            "gbps_of_none": statistics.median(gbps[name]) / statistics.median(gbps["none"]),
            "conns_of_none": statistics.median(conns[name]) / statistics.median(conns["none"]),
        }
        for name in cases
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"iperf3 over loopback and connection churn, {args.seconds} s x {args.rounds} rounds (medians)")
    print(f"{'case':22} {'Gbit/s':>8} {'of none':>8} {'conns/s':>9} {'of none':>8}")
    for name, r in result.items():
        print(
            f"{name:22} {r['gbps']:8.2f} {r['gbps_of_none']:8.1%} {r['conns_per_s']:9.0f} "
            f"{r['conns_of_none']:8.1%}"
        )


if __name__ == "__main__":
    main()
