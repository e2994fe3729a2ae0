"""bpfscope sockstat against the kernel's own accounts of the same sockets.

Every workload runs in a network namespace of its own (``bsbt<pid>``), so that its sockets, ports and
per-namespace counters (/proc/net/snmp, nstat) belong to it alone while other work runs on the machine:
queues and buffers are compared with ``ss -tnm`` run in that namespace, drop counts with the namespace's
SNMP counters and the socket's own drop counter, tracepoint counts with bpftrace on the same run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpfscope.domains.net.health import SocketBufferRule
from bpfscope.domains.net.sockstat import SocketRow, SockstatCollector, SockstatConfig
from bpfscope.health.verdict import Row, Verdict
from bpfscope.health.window import run_check

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
PORT = 42010
MEMCG_V1 = Path("/sys/fs/cgroup/memory")


@contextmanager
def collector(bpf: bool = True) -> Iterator[SockstatCollector]:
    """A sockstat collector, opened (its programs loaded and attached unless ``bpf`` is False)."""
    with SockstatCollector(SockstatConfig(bpf=bpf)) as sockets:
        sockets.open()
        yield sockets


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"bsbt{os.getpid()}"
    subprocess.run([IP, "netns", "add", name], check=True)
    try:
        subprocess.run([IP, "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run([IP, "netns", "del", name], check=False)


class Peer:
    """Python code run inside a namespace. It prints one JSON line when its sockets are set up (its facts:
    pid, ports, ...) and keeps them open until told to end."""

    PRELUDE = "import json, os, socket, sys, time\n"
    EPILOGUE = "\nprint(json.dumps(facts), flush=True)\nsys.stdin.readline()\n"

    def __init__(self, ns: str, code: str, wrapper: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                *(wrapper or []),
                IP,
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                self.PRELUDE + code + self.EPILOGUE,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.end()
            raise AssertionError("the workload did not start")
        self.facts = json.loads(line)

    def end(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("end\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


# A server that accepts and never reads, and a client that writes FILL bytes without blocking (as much
# as fits when FILL is more than fits).
TCP_FILL = """
srv = socket.socket()
srv.bind(("127.0.0.1", {port}))
srv.listen()
cli = socket.create_connection(("127.0.0.1", {port}))
conn, _ = srv.accept()
cli.setblocking(False)
sent = 0
try:
    while sent < {fill}:
        sent += cli.send(b"x" * min(65536, {fill} - sent))
except BlockingIOError:
    pass
time.sleep(0.3)  # the last segments reach the receiver, or its window closes
facts = {{"pid": os.getpid(), "sent": sent, "client_port": cli.getsockname()[1]}}
"""


def ss(ns: str, *filters: str) -> list[dict[str, int | str]]:
    """``ss -tnm`` in ``ns``: Recv-Q, Send-Q, ports and the skmem fields of each socket."""
    out = subprocess.run(
        [IP, "netns", "exec", ns, "ss", "-tnmH", *filters], capture_output=True, text=True, check=True
    ).stdout
    sockets = []
    for head, mem in zip(*[iter(out.strip().splitlines())] * 2, strict=True):
        parts = head.split()
        if not parts[0].isdigit():
            parts = parts[1:]  # the State column, there unless a state filter was given
        skmem = dict(re.findall(r"([a-z]+)(\d+)", mem.split("skmem:(")[1].split(")")[0]))
        sockets.append(
            {
                "recv_q": int(parts[0]),
                "send_q": int(parts[1]),
                "local": parts[2],
                "remote": parts[3],
                **{k: int(v) for k, v in skmem.items()},
            }
        )
    return sockets


def ns_rows(rows: list[SocketRow], ns: str) -> list[SocketRow]:
    return [r for r in rows if r.netns_name == ns]


def test_queues_and_saturation_are_what_ss_shows(netns: str) -> None:
    """50,000 bytes fit in the receive buffer: the receive queue is exactly that, as ss shows it; the
    process and namespace are those of the server, in a namespace other than ours."""
    with collector(bpf=False) as sockets, Peer(netns, TCP_FILL.format(port=PORT, fill=50_000)) as peer:
        sockets.start()
        rows = ns_rows(sockets.sample().rows, netns)
        kernel = ss(netns, "state", "established", f"sport = :{PORT}")
    [server] = [r for r in rows if r.sport == PORT and r.state == "ESTAB"]
    [truth] = kernel
    assert server.recv_q == peer.facts["sent"] == 50_000 == truth["recv_q"]
    assert (server.rmem_alloc, server.rcvbuf) == (truth["r"], truth["rb"])
    assert server.recv_pct == pytest.approx(100 * truth["r"] / truth["rb"])
    assert 0 < server.recv_pct < 90  # it fits
    assert server.dport == peer.facts["client_port"] and server.daddr == "127.0.0.1"
    assert server.pid == peer.facts["pid"] and server.comm.startswith("python")
    assert server.netns != os.stat("/proc/self/ns/net").st_ino
    [listener] = [r for r in rows if r.state == "LISTEN"]
    assert listener.pid == peer.facts["pid"] and listener.recv_q == 0 and listener.recv_pct == 0


def test_full_buffers_on_both_sides(netns: str) -> None:
    """More than fits: the receiver's buffer is full and the sender's send queue holds the rest."""
    with collector(bpf=False) as sockets, Peer(netns, TCP_FILL.format(port=PORT, fill=50 << 20)) as peer:
        sockets.start()
        rows = ns_rows(sockets.sample().rows, netns)
        receiver_ss = ss(netns, "state", "established", f"sport = :{PORT}")[0]
        sender_ss = ss(netns, "state", "established", f"dport = :{PORT}")[0]
    receiver = next(r for r in rows if r.sport == PORT and r.state == "ESTAB")
    sender = next(r for r in rows if r.dport == PORT)
    # A stalled connection does not move: both reads see the same numbers.
    assert (receiver.recv_q, receiver.rmem_alloc, receiver.rcvbuf) == (
        receiver_ss["recv_q"],
        receiver_ss["r"],
        receiver_ss["rb"],
    )
    assert (sender.send_q, sender.wmem_queued, sender.sndbuf) == (
        sender_ss["send_q"],
        sender_ss["w"],
        sender_ss["tb"],
    )
    # Everything written is either in the receiver's queue or in the sender's.
    assert receiver.recv_q + sender.send_q == peer.facts["sent"]
    # The window closes when what is left of the buffer is smaller than a segment: at least 90% full.
    assert receiver.recv_pct >= 90
    assert sender.send_pct == pytest.approx(100 * sender_ss["w"] / sender_ss["tb"]) and sender.send_pct > 50


def snmp(ns: str, path: str = "/proc/net/snmp") -> dict[str, int]:
    """The namespace's counters, as "Udp.RcvbufErrors" -> value (also /proc/net/netstat's TcpExt)."""
    text = subprocess.run([IP, "netns", "exec", ns, "cat", path], capture_output=True, text=True).stdout
    lines = text.splitlines()
    counters = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        group = names.split(":")[0]
        for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
            counters[f"{group}.{name}"] = int(value)
    return counters


UDP_FLOOD = """
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
rx.bind(("127.0.0.1", {port}))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({bursts}):
    for _ in range({count}):
        tx.sendto(b"y" * 1000, ("127.0.0.1", {port}))
    time.sleep({pause})
facts = {{"pid": os.getpid()}}
"""


def test_udp_overflow_counted_per_socket(netns: str) -> None:
    """1000 datagrams of 1000 bytes into a 4 KiB receive buffer that nobody reads: all but the few that
    fit are dropped. Each drop is a SOCKET_RCVBUFF drop counted on the receiving socket, as many as the
    namespace's Udp RcvbufErrors and the socket's own drop counter (ss -m's d)."""
    before = snmp(netns)
    with collector() as sockets:
        sockets.start()
        with Peer(netns, UDP_FLOOD.format(port=PORT, count=1000, bursts=1, pause=0)) as peer:
            rows = ns_rows(sockets.sample().rows, netns)
            after = snmp(netns)
    [rx] = [r for r in rows if r.proto == "udp" and r.sport == PORT]
    errors = after["Udp.RcvbufErrors"] - before["Udp.RcvbufErrors"]
    assert 900 < errors < 1000
    assert rx.events["drop_rcvbuf"] == errors == rx.drops == rx.full_events
    assert rx.events["rcvqueue_full"] == 0  # UDP checks its buffer itself
    assert rx.pid == peer.facts["pid"]
    assert rx.recv_pct > 50  # a few datagrams fill 4 KiB (twice that, as the kernel doubles it)


def bpftrace_count(program: str) -> subprocess.Popen[str]:
    tracer = subprocess.Popen(
        ["bpftrace", "-e", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert tracer.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = tracer.stdout.readline()
        if line.startswith("Attaching"):
            return tracer
        if not line and tracer.poll() is not None:
            break
    tracer.kill()
    raise AssertionError("bpftrace did not attach")


def bpftrace_result(tracer: subprocess.Popen[str]) -> dict[str, int]:
    tracer.send_signal(signal.SIGINT)  # bpftrace prints its maps as it exits
    out, _ = tracer.communicate(timeout=30)
    # "@name: N" or "@name[key]: N" -> {"name": N} or {"name[key]": N}
    return {m[0]: int(m[1]) for m in re.findall(r"^@(\w+(?:\[\d+\])?): (\d+)$", out, re.MULTILINE)}


# ICMP echo replies to a ping socket whose 2345-byte receive buffer (4690 once doubled) nobody reads:
# ping sockets queue through sock_queue_rcv_skb, which fires sock_rcvqueue_full. The odd size lets bpftrace
# pick out this socket's events among any others on the machine.
PING_FLOOD = """
open("/proc/sys/net/ipv4/ping_group_range", "w").write("0 0")
ping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
ping.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2345)
for seq in range(500):
    ping.sendto(bytes([8, 0, 0, 0, 0, 0, seq >> 8, seq & 255]) + b"z" * 200, ("127.0.0.1", 0))
time.sleep(0.2)
facts = {"pid": os.getpid(), "rcvbuf": ping.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
         "inode": os.fstat(ping.fileno()).st_ino}
"""


def test_rcvqueue_full_matches_bpftrace(netns: str) -> None:
    tracer = bpftrace_count(
        "tracepoint:sock:sock_rcvqueue_full /args->sk_rcvbuf == 4690/ { @full = count(); }"
    )
    try:
        with collector() as sockets:
            sockets.start()
            with Peer(netns, PING_FLOOD) as peer:
                rows = sockets.sample().rows
    finally:
        counted = bpftrace_result(tracer)
    assert peer.facts["rcvbuf"] == 4690
    # Not a TCP or UDP socket: known from the BPF side alone, named through /proc/PID/fd.
    [ping] = [r for r in rows if r.inode == peer.facts["inode"]]
    assert ping.proto == "icmp" and not ping.in_diag
    assert ping.pid == peer.facts["pid"] and ping.netns_name == netns
    assert 400 < ping.events["rcvqueue_full"] == counted["full"]
    # Each refused reply is also dropped as SOCKET_RCVBUFF, and counted once in the total.
    assert ping.events["drop_rcvbuf"] == ping.full_events == counted["full"]


TCP_MANY_FILLS = """
srv = socket.socket()
srv.bind(("127.0.0.1", {port}))
srv.listen()
pairs = []
for _ in range(4):
    cli = socket.create_connection(("127.0.0.1", {port}))
    pairs.append((cli, srv.accept()[0]))
    cli.setblocking(False)
for cli, _ in pairs:
    try:
        while True:
            cli.send(b"x" * 65536)
    except BlockingIOError:
        pass
time.sleep(0.5)
facts = {{"pid": os.getpid()}}
"""


@pytest.mark.skipif(
    not (MEMCG_V1 / "memory.kmem.tcp.limit_in_bytes").exists(), reason="no cgroup v1 TCP memory limit"
)
def test_memory_limit_events(netns: str) -> None:
    """Four stalled connections in a memory cgroup whose TCP memory is limited to 256 KiB: the receivers
    run into the limit (sock_exceed_buf_limit, receive side) and segments are dropped for want of memory
    (PROTO_MEM drops, which the namespace counts as TcpExt TCPRcvQDrop, or TCPOFODrop out of order)."""
    cgroup = MEMCG_V1 / f"bsbmem{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.kmem.tcp.limit_in_bytes").write_text(str(256 << 10))
        join = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "join"]
        # No other socket on the machine is near a memory limit: bpftrace's global count is this run's.
        tracer = bpftrace_count("tracepoint:sock:sock_exceed_buf_limit { @exceed[args->kind] = count(); }")
        before = snmp(netns, "/proc/net/netstat")
        try:
            with collector() as sockets:
                sockets.start()
                with Peer(netns, TCP_MANY_FILLS.format(port=PORT), wrapper=join) as peer:
                    # The senders retransmit what was dropped for as long as the limit holds: lift it, so
                    # that the next retransmissions are taken in and the counts stop moving before all
                    # three (sockstat, bpftrace, the namespace's counters) are read.
                    (cgroup / "memory.kmem.tcp.limit_in_bytes").write_text(str(1 << 30))
                    time.sleep(1.0)
                    rows = ns_rows(sockets.sample().rows, netns)
                    after = snmp(netns, "/proc/net/netstat")
        finally:
            counted = bpftrace_result(tracer)
    finally:
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    mine = [r for r in rows if r.pid == peer.facts["pid"]]
    exceed_recv = sum(r.events.get("exceed_recv", 0) for r in mine)
    exceed_send = sum(r.events.get("exceed_send", 0) for r in mine)
    # The tracepoint's kind: 0 is SK_MEM_SEND, 1 SK_MEM_RECV.
    assert exceed_recv > 0 and exceed_recv == counted.get("exceed[1]", -1), counted
    assert exceed_send == counted.get("exceed[0]", 0)
    drops = sum(r.events.get("drop_mem", 0) for r in mine)
    kernel = sum(after[k] - before[k] for k in ("TcpExt.TCPRcvQDrop", "TcpExt.TCPOFODrop"))
    assert drops == kernel


def records(stdout: str) -> list[dict]:
    """The socket records of sockstat's JSON lines, each of its schema; the run ends with its losses."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines[-1]["record"] == "losses", lines[-1]
    (schema,) = SockstatCollector.schemas()
    rows = [r for r in lines if r["record"] == schema.name]
    assert all(not schema.check(r) for r in rows), [schema.check(r) for r in rows]
    assert len(rows) == len(lines) - 1
    return rows


def test_cli_json_and_filters(netns: str, run_cli) -> None:
    with Peer(netns, TCP_FILL.format(port=PORT, fill=50 << 20)) as peer:
        result = run_cli("sockstat", "--json", "--port", str(PORT), "-p", str(peer.facts["pid"]), "0.5", "1")
        full = run_cli("sockstat", "--json", "--min-pct", "90", "--no-listen", "0.5", "1")
    assert result.returncode == 0, result.stderr
    rows = records(result.stdout)
    # The listener, the server's end and the client's end: all three sockets of the workload, no others.
    assert len(rows) == 3 and {r["pid"] for r in rows} == {peer.facts["pid"]}
    assert {r["state"] for r in rows} == {"LISTEN", "ESTAB"}
    assert all(r["netns_name"] == netns for r in rows)
    assert rows[0]["recv_pct"] >= 90 and rows[0]["sport"] == PORT  # sorted: the full one first
    keys = {"pid", "comm", "netns", "saddr", "sport", "daddr", "dport", "recv_q", "recv_pct", "send_pct"}
    assert keys <= set(rows[0])
    over = records(full.stdout)
    assert over and all(max(r["recv_pct"], r["send_pct"]) >= 90 or r["full_events"] for r in over)
    assert any(r["pid"] == peer.facts["pid"] and r["sport"] == PORT for r in over)


def test_cgroup_filter(netns: str, cgroup: Path, run_cli) -> None:
    """--cgroup selects the sockets created in that cgroup (v2), whichever namespace they are in."""
    join = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "join"]
    with Peer(netns, TCP_FILL.format(port=PORT, fill=50_000), wrapper=join) as peer:
        result = run_cli("sockstat", "--json", "--cgroup", str(cgroup), "0.5", "1")
    assert result.returncode == 0, result.stderr
    rows = records(result.stdout)
    assert len(rows) == 3 and {r["pid"] for r in rows} == {peer.facts["pid"]}
    assert {r["cgroup"] for r in rows} == {cgroup.stat().st_ino}


def test_table_for_people(run_cli) -> None:
    result = run_cli("sockstat", "-C", "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    assert "Tracing socket buffers" in result.stderr
    assert "RECV%" in result.stdout and "network namespaces" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port"),
        (["--min-pct", "101"], "--min-pct"),
        (["--proto", "sctp"], "--proto"),
        (["-p", "999999999"], "no process"),
        (["--cgroup", "/bsb-no-such-cgroup"], "no cgroup v2 directory"),
        (["-s", "nonsense"], "--sort"),
    ],
)
def test_bad_input(run_cli, args: list[str], message: str) -> None:
    result = run_cli("sockstat", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_health_check_names_the_full_socket(netns: str) -> None:
    """A reader that stopped reading is a PROBLEM on the receive buffer, named by process and namespace;
    a UDP flood during the window shows as buffer-full events per second."""
    stalled = Peer(netns, TCP_FILL.format(port=PORT, fill=50 << 20))
    # Only this test's namespace: other work on the machine may have full sockets of its own.
    ours = SocketBufferRule(only_netns={os.stat(f"/run/netns/{netns}").st_ino})

    try:
        # 750 datagrams a second for 5 s, from before the window opens to after it closes, whenever the
        # provider has finished loading its programs.
        flood = UDP_FLOOD.format(port=PORT + 1, count=75, bursts=50, pause=0.1)
        flooder = subprocess.Popen(
            [IP, "netns", "exec", netns, sys.executable, "-c", "import os, socket, time\n" + flood],
            stdout=subprocess.DEVNULL,
        )
        try:
            report = run_check(3, rules=[ours])
        finally:
            flooder.wait(timeout=30)
    finally:
        stalled.end()
    rows = {r.metric: r for r in report.rows}
    recv = rows["recv buffer"]
    assert recv.verdict is Verdict.PROBLEM and recv.value is not None and recv.value >= 90
    assert f"[{stalled.facts['pid']}]" in recv.detail and f"netns {netns}" in recv.detail
    assert "90%" in recv.threshold
    assert rows["send buffer"].verdict in (Verdict.OK, Verdict.WARN)  # never PROBLEM alone
    events = rows["full events"]
    # About 750 datagrams a second into a 4 KiB buffer: far more than 50 drops a second.
    assert events.value is not None and events.value > 50 and events.verdict is Verdict.PROBLEM
    assert "drop_rcvbuf" in events.detail
    assert report.problem


def test_health_check_judges_a_queue_that_stayed_full() -> None:
    """Two looks, at the window's start and end: full at both is a PROBLEM, full at one (a bulk reader a
    little behind at that moment, or a socket opened within the window) only warns."""

    def look(inode: int, rmem: int) -> SocketRow:
        return SocketRow(
            1, "test", "tcp", "ESTAB", "10.0.0.1", 1, "10.0.0.2", 2, inode, rmem_alloc=rmem, rcvbuf=1000
        )

    def recv_row(first: list[SocketRow], last: list[SocketRow]) -> Row:
        return SocketBufferRule._worst_row(
            "Socket buffers", "recv", [first, last], lambda r: r.recv_pct, 50, 90
        )

    stayed = recv_row([look(7, 950)], [look(7, 990)])
    assert (stayed.value, stayed.verdict) == (95.0, Verdict.PROBLEM), stayed
    moment = recv_row([look(7, 100)], [look(7, 990)])
    assert (moment.value, moment.verdict) == (10.0, Verdict.OK), moment
    new = recv_row([], [look(8, 990)])
    assert (new.value, new.verdict) == (99.0, Verdict.WARN) and "seen once" in new.detail, new


def test_window_rules_share_one_tcp_listing(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within diag.listings_shared() (a health window's start and close), sockstat's rows and
    tcpretrans's listed connections are what they are listed apart, from one TCP listing a namespace
    instead of one each."""
    from bpfscope.domains.net import diag
    from bpfscope.domains.net.sockstat import diag_sockets
    from bpfscope.domains.net.tcpretrans import _listed_tcp

    requests: list[tuple[int, tuple[str, ...]]] = []
    listed = diag._listed

    def counted(ns: diag.NetNamespace, protocols: tuple[str, ...], states: int, extensions: int) -> object:
        requests.append((ns.inode, protocols))
        return listed(ns, protocols, states, extensions)

    monkeypatch.setattr(diag, "_listed", counted)
    inode = os.stat(f"/run/netns/{netns}").st_ino

    def window() -> tuple[list[tuple[object, ...]], dict[int, object]]:
        ours = next(ns for ns in diag.network_namespaces() if ns.inode == inode)
        rows = sorted(
            (r.proto, r.state, r.sport, r.dport, r.recv_q) for r in diag_sockets(ours, ("tcp", "udp"))
        )
        listed = _listed_tcp(set())
        conns = {cookie: row.conn for cookie, row in listed.items() if row.conn.netns == inode}
        return rows, conns

    with Peer(netns, TCP_FILL.format(port=PORT, fill=50_000)):
        apart = window()
        tcp_apart = sum("tcp" in p for ns, p in requests if ns == inode)
        requests.clear()
        with diag.listings_shared():
            shared = window()
        tcp_shared = sum("tcp" in p for ns, p in requests if ns == inode)
    assert apart == shared
    assert len(shared[0]) == 3 and len(shared[1]) == 2  # the listener and both ends; no UDP socket
    assert (tcp_apart, tcp_shared) == (2, 1)


# A listener and both ends of a connection of one family, and a bound UDP socket of the other.
ONE_FAMILY_EACH = """
tcp_family, tcp_host, udp_family, udp_host = {families}
srv = socket.socket(tcp_family)
srv.bind((tcp_host, {port}))
srv.listen()
cli = socket.create_connection((tcp_host, {port}))
conn, _ = srv.accept()
udp = socket.socket(udp_family, socket.SOCK_DGRAM)
udp.bind((udp_host, {port}))
facts = {{"pid": os.getpid()}}
"""
V4 = ("socket.AF_INET", '"127.0.0.1"')
V6 = ("socket.AF_INET6", '"::1"')


def test_a_family_without_sockets_is_not_walked(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP dump walks the kernel's whole established hash, whatever it finds: a family the namespace's
    sockstat counts say has no socket is not asked for. What is listed is still every socket ss lists."""
    from bpfscope.domains.net import diag
    from bpfscope.domains.net.sockstat import diag_sockets

    asked: list[tuple[int, int]] = []
    dump = diag._dump

    def counted(sock: object, family: int, protocol: int, states: int, extensions: int) -> list[object]:
        asked.append((family, protocol))
        return dump(sock, family, protocol, states, extensions)  # type: ignore[arg-type]

    monkeypatch.setattr(diag, "_dump", counted)
    inode = os.stat(f"/run/netns/{netns}").st_ino

    def listed(tcp: tuple[str, str], udp: tuple[str, str]) -> tuple[list[tuple[object, ...]], list[object]]:
        asked.clear()
        families = f"{tcp[0]}, {tcp[1]}, {udp[0]}, {udp[1]}"
        with Peer(netns, ONE_FAMILY_EACH.format(families=families, port=PORT)):
            ours = next(ns for ns in diag.network_namespaces() if ns.inode == inode)
            rows = sorted((r.proto, r.saddr, r.sport, r.dport) for r in diag_sockets(ours, ("tcp", "udp")))
            out = subprocess.run(
                [IP, "netns", "exec", netns, "ss", "-tuanH", "exclude", "time-wait"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        shown = []
        for line in out.strip().splitlines():
            proto, _, _, _, local, remote = line.split()[:6]
            address, _, port = local.rpartition(":")
            remote_port = remote.rpartition(":")[2].replace("*", "0")
            shown.append((proto, address.strip("[]"), int(port), int(remote_port)))
        assert rows == sorted(shown)
        assert len(rows) == 4  # the listener, both ends, the UDP socket
        return rows, sorted(asked)

    tcp, udp, inet, inet6 = socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.AF_INET, socket.AF_INET6
    _, asked_v4 = listed(V4, V6)
    assert asked_v4 == sorted([(inet, tcp), (inet6, udp)])
    # The first connection's ends closed (TIME-WAIT at most) before the next listing, which ss's is
    # compared with a moment apart.
    for _ in range(50):
        left = subprocess.run(
            [IP, "netns", "exec", netns, "ss", "-tanH", "exclude", "time-wait"],
            capture_output=True,
            text=True,
        )
        if not left.stdout.strip():
            break
        time.sleep(0.1)
    # An IPv6 listener can hold IPv4 clients' connection requests (SYN-RECV): IPv4 is asked too.
    rows, asked_v6 = listed(V6, V4)
    assert asked_v6 == sorted([(inet, tcp), (inet6, tcp), (inet, udp)])
    assert ("tcp", "::1", PORT, 0) in rows


def test_diag_messages_decoded_as_pyroute2_decodes_them(netns: str) -> None:
    """A dump's replies decoded by diag's own decoder (the offsets from BTF) and by pyroute2's message
    classes, datagram by datagram: every field and attribute diag reads is the same, for TCP with
    tcp_info and memory and for UDP, IPv4 and IPv6."""
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, MarshalDiag, inet_diag_msg, inet_diag_req

    from bpfscope.domains.net import diag

    ours = next(ns for ns in diag.network_namespaces() if ns.inode == os.stat(f"/run/netns/{netns}").st_ino)
    every_state = (1 << 16) - 1
    ask = diag.extensions("INET_DIAG_INFO", "INET_DIAG_SKMEMINFO")  # the cgroup comes unasked
    # Every scalar of tcp_info both know (pyroute2 reads the byte of two 4-bit fields as one of them).
    known = diag._tcp_info_fields()
    tcp_fields = [name for name, code in inet_diag_msg.tcp_info.fields if code in "BIQ" and name in known]
    assert {"tcpi_segs_out", "tcpi_total_retrans", "tcpi_rtt"} <= set(tcp_fields)
    fields = ("idiag_family", "idiag_state", "idiag_sport", "idiag_dport", "idiag_src", "idiag_dst",
              "idiag_cookie", "idiag_rqueue", "idiag_wqueue", "idiag_inode")  # fmt: skip
    compared = {"tcp": 0, "udp": 0}
    families = f"{V4[0]}, {V4[1]}, {V6[0]}, {V6[1]}"
    with Peer(netns, ONE_FAMILY_EACH.format(families=families, port=PORT)), diag.entered(ours):
        for proto, family in itertools.product(("tcp", "udp"), (socket.AF_INET, socket.AF_INET6)):
            req = inet_diag_req()
            req["header"]["type"] = SOCK_DIAG_BY_FAMILY
            req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
            req["sdiag_family"], req["sdiag_protocol"] = family, diag.PROTOCOLS[proto]
            req["idiag_states"], req["idiag_ext"] = every_state, ask
            req.encode()
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, diag.NETLINK_SOCK_DIAG) as sock:
                sock.send(req.data)
                done = False
                while not done:
                    data = sock.recv(diag.RECV_BYTES)
                    decoded: list[diag.DiagMessage] = []
                    done = diag._parse_replies(data, decoded)
                    theirs = [
                        m for m in MarshalDiag().parse(data) if m["header"]["type"] == SOCK_DIAG_BY_FAMILY
                    ]
                    assert len(decoded) == len(theirs)
                    for mine, their in zip(decoded, theirs, strict=True):
                        assert {f: mine[f] for f in fields} == {f: their[f] for f in fields}
                        memory = their.get_attr("INET_DIAG_SKMEMINFO")
                        assert diag.skmeminfo(mine.attr("INET_DIAG_SKMEMINFO")) == diag.skmeminfo(
                            bytes.fromhex(memory.replace(":", "")) if memory else None
                        )
                        cgroup = their.get_attr("INET_DIAG_CGROUP_ID")
                        assert diag.cgroup_id(mine.attr("INET_DIAG_CGROUP_ID")) == cgroup > 0
                        info, their_info = (
                            diag.tcp_info(mine.attr("INET_DIAG_INFO")),
                            their.get_attr("INET_DIAG_INFO"),
                        )
                        assert (info is None) == (their_info is None) == (proto == "udp")
                        if info is not None:
                            assert {f: info[f] for f in tcp_fields} == {f: their_info[f] for f in tcp_fields}
                        compared[proto] += 1
    # TCP: the listener and both ends, in one family; UDP: the bound socket, in the other.
    assert compared == {"tcp": 3, "udp": 1}, compared


def test_window_rules_find_the_namespaces_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within diag.listings_shared() the namespaces are found once for every asker (each finding stats
    every process's namespace), and again for the next block."""
    from bpfscope.domains.net import diag

    found: list[int] = []
    find = diag._find_namespaces

    def counted() -> list[diag.NetNamespace]:
        found.append(1)
        return find()

    monkeypatch.setattr(diag, "_find_namespaces", counted)
    for _ in range(2):
        with diag.listings_shared():
            first, second = diag.network_namespaces(), diag.network_namespaces()
        assert first == second and any(ns.name == "host" for ns in first)
    assert len(found) == 2
    diag.network_namespaces()
    assert len(found) == 3
