"""What the health window's socket listings cost: the socket-buffer rule (sockstat: every TCP and UDP
socket with its memory) and the retransmit rule (tcpretrans: every TCP connection's tcp_info) list each
network namespace's sockets through sock_diag when a window closes. Measured: the CPU time (user and
system: a listing request's walk of the kernel's socket tables is the requester's system time) of both
listings over every namespace, each rule listing on its own and the two sharing one TCP listing per
namespace (diag.listings_shared, as the health window now does), alternating, over NAMESPACES network
namespaces made for the run (each with a listener and CONNECTIONS connections on its loopback).

    .venv/bin/python benchmarks/socket_listing.py [--namespaces 6] [--connections 20] [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

from bpfscope.domains.net import diag
from bpfscope.domains.net.sockstat import diag_sockets
from bpfscope.domains.net.tcpretrans import _listed_tcp


@contextlib.contextmanager
def namespaces(count: int, connections: int) -> Iterator[list[socket.socket]]:
    """``count`` network namespaces, each with its loopback up, a listener and ``connections``
    connections to it (both ends held open here)."""
    names = [f"bpfscope-bench-{os.getpid()}-{i}" for i in range(count)]
    held: list[socket.socket] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            ns = diag.NetNamespace(
                os.stat(f"/var/run/netns/{name}").st_ino, name, diag.NAMED_NETNS_DIR / name
            )
            with diag.entered(ns):
                listener = socket.create_server(("127.0.0.1", 0))
                held.append(listener)
                for _ in range(connections):
                    held.append(socket.create_connection(listener.getsockname()))
                    held.append(listener.accept()[0])
        yield held
    finally:
        for s in held:
            s.close()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def both_listings() -> None:
    """The window's two listings: sockstat's rows and tcpretrans's segments sent, every namespace."""
    for ns in diag.network_namespaces():
        diag_sockets(ns, ("tcp", "udp"))
    _listed_tcp(set())


def shared() -> None:
    with diag.listings_shared():
        both_listings()


def cpu_ms(work: Callable[[], None]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--namespaces", type=int, default=6)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with namespaces(args.namespaces, args.connections):
        found = len(diag.network_namespaces())
        both_listings()  # warm: imports, BTF
        apart, together = [], []
        for _ in range(args.rounds):
            apart.append(cpu_ms(both_listings))
            together.append(cpu_ms(shared))
    a, t = statistics.median(apart), statistics.median(together)
    print(
        f"{found} namespaces, {args.connections} connections each; "
        f"medians of {args.rounds} rounds, CPU ms a window:"
    )
    print(f"  each rule listing on its own: {a:.1f} ms")
    print(f"  one TCP listing shared:       {t:.1f} ms ({t / a:.2f}x)")


if __name__ == "__main__":
    main()
