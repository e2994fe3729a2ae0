"""Two network namespaces joined by a veth pair, for the TCP tools' tests: traffic between them is ours
alone (no other test's connections), and packet loss can be induced with nftables inside one of them
without touching the host.

    client netns  bsa-cli  veth bsa-c  10.241.0.1/24  fd41::1/64
    server netns  bsa-srv  veth bsa-s  10.241.0.2/24  fd41::2/64
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLIENT_NS = "bsa-cli"
SERVER_NS = "bsa-srv"
CLIENT_IP = "10.241.0.1"
SERVER_IP = "10.241.0.2"
CLIENT_IP6 = "fd41::1"
SERVER_IP6 = "fd41::2"
LOSS_TABLE = "bsa_loss"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


@dataclass
class NetnsPair:
    client: str = CLIENT_NS
    server: str = SERVER_NS

    def set_loss(self, percent: int, port: int) -> None:
        """Drop ``percent``% of the segments arriving at the server's ``port`` (data, not the ACKs the
        client receives): the client retransmits them. Inside the server netns only. SYNs, FINs and RSTs
        pass, so that every retransmission is of data, while the connection is open."""
        self.drop(
            f"tcp dport {port} tcp flags & (fin | syn | rst) == 0 numgen random mod 100 < {percent} drop"
        )

    def set_reply_loss(self, percent: int, port: int) -> None:
        """Drop ``percent``% of the segments from the server's ``port`` as they arrive in the client netns
        (its replies, and its ACKs of what the client sends): the server retransmits them. SYNs, FINs and
        RSTs pass. Beside set_loss's rule, in the other namespace."""
        self.drop(
            f"tcp sport {port} tcp flags & (fin | syn | rst) == 0 numgen random mod 100 < {percent} drop",
            ns=self.client,
        )

    def drop_syns(self, port: int) -> None:
        """Drop every SYN to the server's ``port``: connects to it time out."""
        self.drop(f"tcp dport {port} tcp flags & (syn | ack) == syn drop")

    def drop(self, rule: str, ns: str | None = None) -> None:
        """An nftables rule (a drop) on the input path of ``ns`` (default: the server's), in its own
        table, replacing the last one there."""
        ns = ns or self.server
        chain = f"chain input {{\n type filter hook input priority 0;\n {rule}\n }}"
        rules = f"table inet {LOSS_TABLE} {{\n {chain}\n}}\n"
        self.clear_loss(ns)
        subprocess.run(in_ns(ns, "nft", "-f", "-"), input=rules, text=True, check=True)

    def clear_loss(self, ns: str | None = None) -> None:
        """Remove the drops of ``ns`` (default: both namespaces')."""
        for one in (ns,) if ns else (self.server, self.client):
            sh(*in_ns(one, "nft", "delete", "table", "inet", LOSS_TABLE), check=False)

    def snmp(self, ns: str) -> dict[str, dict[str, int]]:
        """/proc/net/snmp of a namespace (its own per-netns counters): {"Tcp": {"RetransSegs": n, ...}}."""
        lines = sh(*in_ns(ns, "cat", "/proc/net/snmp")).stdout.splitlines()
        out: dict[str, dict[str, int]] = {}
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            proto, *keys = names.split()
            out[proto.rstrip(":")] = dict(zip(keys, map(int, values.split()[1:]), strict=True))
        return out

    def retrans_segs(self, ns: str) -> int:
        return self.snmp(ns)["Tcp"]["RetransSegs"]


# Connects to a closed port until one is refused (a RST came back): the path works both ways.
WARM_UP = """
import socket, sys, time
for host in sys.argv[1:]:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((host, 9), timeout=0.2).close()
        except ConnectionRefusedError:
            break
        except OSError:
            assert time.monotonic() < deadline, host + " unreachable"
"""


def _cleanup() -> None:
    for ns in (CLIENT_NS, SERVER_NS):
        sh("ip", "netns", "del", ns, check=False)


def netns_pair() -> Iterator[NetnsPair]:
    """Create the pair (removing a leftover of an interrupted run first), yield it, remove it."""
    _cleanup()
    try:
        for ns in (CLIENT_NS, SERVER_NS):
            sh("ip", "netns", "add", ns)
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
        sh(
            "ip",
            "link",
            "add",
            "bsa-c",
            "netns",
            CLIENT_NS,
            "type",
            "veth",
            "peer",
            "bsa-s",
            "netns",
            SERVER_NS,
        )
        for ns, dev, ip4, ip6 in (
            (CLIENT_NS, "bsa-c", CLIENT_IP, CLIENT_IP6),
            (SERVER_NS, "bsa-s", SERVER_IP, SERVER_IP6),
        ):
            sh(*in_ns(ns, "ip", "addr", "add", f"{ip4}/24", "dev", dev))
            sh(*in_ns(ns, "ip", "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad"))
            sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
        # Until the veth carrier is up and the neighbours are resolved, a first SYN can be lost (and
        # retransmitted a second later): a connection's duration would then include that second.
        sh(*in_ns(CLIENT_NS, sys.executable, "-c", WARM_UP, SERVER_IP, SERVER_IP6))
        yield NetnsPair()
    finally:
        _cleanup()


def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sh(*in_ns(ns, "ss", "-Htln", f"sport = :{port}")).stdout.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} in {ns}")


def iperf3(
    pair: NetnsPair,
    port: int,
    seconds: float,
    reverse: bool = False,
    ipv6: bool = False,
    bitrate: str | None = None,
) -> tuple[dict, int]:
    """One iperf3 test from the client netns to a one-off server in the server netns, at ``bitrate``
    (iperf3 -b) if given: (its -J report, the client's pid)."""
    server = subprocess.Popen(
        in_ns(pair.server, "iperf3", "-s", "-1", "-p", str(port)), stdout=subprocess.DEVNULL
    )
    try:
        wait_listening(pair.server, port)
        args = ["iperf3", "-J", "-c", SERVER_IP6 if ipv6 else SERVER_IP, "-p", str(port), "-t", str(seconds)]
        args += ["-b", bitrate] if bitrate else []
        client = subprocess.Popen(
            in_ns(pair.client, *args, *(["-R"] if reverse else [])), stdout=subprocess.PIPE
        )
        out, _ = client.communicate(timeout=seconds + 30)
        assert client.returncode == 0, out
        return json.loads(out), client.pid
    finally:
        server.wait(timeout=10)


# A server for known workloads: accepts connections one after another; each sends REPLY bytes, then
# reads until the client closes, then closes. Prints "ready" once listening.
SERVER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(128)
reply = b"r" * int(sys.argv[3])
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    if reply:
        conn.sendall(reply)
    while conn.recv(1 << 16):
        pass
    conn.close()
"""

# A client: N connections in turn, each sending SEND bytes, reading REPLY bytes, holding it HOLD
# seconds, then closing. Waits for a line on stdin before the first close when asked (so that a test
# can read `ss` while the connection is open). Prints its pid first.
CLIENT = """
import fcntl, os, socket, struct, sys, termios, time
host, port, n, send, reply, hold, pause = sys.argv[1:8]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
print(os.getpid(), flush=True)
for _ in range(int(n)):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"s" * int(send))
    got = 0
    while got < int(reply):
        got += len(s.recv(1 << 16))
    time.sleep(float(hold))
    if pause == "1":
        # Wait until the peer acknowledged everything (SIOCOUTQ: bytes not yet acked), so that no
        # retransmission can happen after the test reads the connection's counters.
        while struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\\0" * 4))[0]:
            time.sleep(0.01)
        print("sent", flush=True)
        sys.stdin.readline()
    s.close()
print("done", flush=True)
"""


def start_server(ns: str, host: str, port: int, reply: int = 0) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        in_ns(ns, sys.executable, "-c", SERVER, host, str(port), str(reply)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def run_client(
    ns: str,
    host: str,
    port: int,
    n: int = 1,
    send: int = 0,
    reply: int = 0,
    hold: float = 0.0,
    cgroup: Path | None = None,
) -> int:
    """Run the client to its end (in ``cgroup`` if given); its pid."""

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    args = [str(a) for a in (host, port, n, send, reply, hold, 0)]
    out = subprocess.run(
        in_ns(ns, sys.executable, "-c", CLIENT, *args),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=enter_cgroup,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[-1] == "done", out.stdout
    return int(lines[0])
