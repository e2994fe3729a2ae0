"""Network tracing overhead: iperf3 throughput over loopback and a connection-churn load (many short
connections, conn_churn.c) with nothing attached, with every bpfscope network tool running at once in
its counting mode (tcptop, tcpretrans -c, tcplife --hist, tcpconn -c, sockstat), with one bpftrace program
doing the same work (bytes per socket, retransmits per connection, connection lifetimes, connects and
accepts, buffer-full events), with tcpretrans -c alone (the one tool that reads every connection's
segments sent, for its rate), and with tcplife and tcpconn printing every connection as it happens, each
case in the same run.

Reported: per case, iperf3 Gbit/s and connections per second, as a fraction of the untraced run.

    .venv/bin/python benchmarks/net_overhead.py [--seconds S] [--rounds R] [--json]
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
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

# The same work in bpfscope: every tool in its counting mode, as the bpftrace program counts.
BPFSCOPE_COUNTING = [
    ["tcptop", "1"],
    ["tcpretrans", "-c", "1"],
    ["tcplife", "--hist"],
    ["tcpconn", "-c", "1"],
    ["sockstat", "1"],
]
# Retransmits per connection with their rate, whose denominator (segments sent) once cost a program run
# per segment.
BPFSCOPE_RETRANS_RATE = [["tcpretrans", "-c", "1"]]
# One line per connection opened, accepted and closed, printed as it happens (as BCC's tools do).
BPFSCOPE_PER_EVENT = [["tcplife"], ["tcpconn"]]


@contextlib.contextmanager
def tools(bpfscope: str, commands: list[list[str]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for args in commands:
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
    args = common.overhead_parser(__doc__, seconds=5).parse_args()
    bpfscope, bpftrace = common.bpfscope(), common.bpftrace()
    cases: dict[str, common.Case] = {
        "none": contextlib.nullcontext,
        "bpfscope (5 tools)": lambda: tools(bpfscope, BPFSCOPE_COUNTING),
        "bpftrace (same work)": lambda: common.tracer([bpftrace, "-e", BPFTRACE_PROGRAM], "attached"),
        "bpfscope tcpretrans -c": lambda: tools(bpfscope, BPFSCOPE_RETRANS_RATE),
        "bpfscope per event": lambda: tools(bpfscope, BPFSCOPE_PER_EVENT),
    }
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-") as tmp:
        churn = Path(tmp) / "conn_churn"
        subprocess.run(["gcc", "-O2", "-o", str(churn), str(HERE / "conn_churn.c")], check=True)
        server = subprocess.Popen(
            ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(0.3)
            result = common.alternate(
                cases,
                args.rounds,
                lambda: {"gbps": iperf3_gbps(args.seconds), "conns_per_s": churn_per_s(churn, args.seconds)},
            )
        finally:
            server.terminate()
            server.wait()
    if args.json:
        print(json.dumps(result))
        return
    print(f"iperf3 over loopback and connection churn, {args.seconds} s x {args.rounds} rounds (medians)")
    print(f"{'case':22} {'Gbit/s':>8} {'of none':>8} {'conns/s':>9} {'of none':>8}")
    for name, r in result.items():
        print(
            f"{name:22} {r['gbps']:8.2f} {r['gbps_of_none']:8.1%} {r['conns_per_s']:9.0f} "
            f"{r['conns_per_s_of_none']:8.1%}"
        )


if __name__ == "__main__":
    main()
