"""The TCP tools against independent truths, on traffic between two network namespaces of our own:
tcptop against iperf3's byte counts, tcpretrans against the namespace's /proc/net/snmp RetransSegs and
`ss -ti`, tcplife against transfers of known size and length, tcpconn against known connects."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import nethelpers as nh
import pytest

from bpfscope.domains.net.health import TcpRule
from bpfscope.domains.net.tcpconn import TcpconnCollector
from bpfscope.domains.net.tcplife import TcplifeCollector
from bpfscope.domains.net.tcpretrans import TcpretransCollector
from bpfscope.domains.net.tcptop import TcptopCollector
from bpfscope.health.verdict import Verdict
from bpfscope.health.window import run_check
from bpfscope.runtime.losses import LOSSES_SCHEMA
from bpfscope.runtime.schema import schema_for


@pytest.fixture(scope="module")
def pair() -> Iterator[nh.NetnsPair]:
    yield from nh.netns_pair()


COLLECTORS = {
    "tcptop": TcptopCollector,
    "tcpretrans": TcpretransCollector,
    "tcplife": TcplifeCollector,
    "tcpconn": TcpconnCollector,
}


class Tool:
    """A bpfscope tool running in the background until stop(); waits for its "Tracing" line."""

    def __init__(self, *args: str) -> None:
        self.name = args[0]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpfscope", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("Tracing"), line + self.proc.stderr.read()

    def stop(self, record: str | None = None) -> list[dict]:
        """The records of kind ``record`` (default: the tool's name) the tool wrote as JSON lines (all of
        them in ``records``), each checked against the tool's declared schemas; the run ends with its
        losses record."""
        time.sleep(0.3)  # the last events reach the ring buffer
        self.proc.send_signal(signal.SIGINT)
        out, self.stderr = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, self.stderr
        self.records = [json.loads(line) for line in out.splitlines()]
        schemas = (*COLLECTORS[self.name].schemas(), LOSSES_SCHEMA)
        for rec in self.records:
            schema = schema_for(schemas, rec)
            assert schema is not None and not schema.check(rec), (rec, schema and schema.check(rec))
        last = self.records[-1] if self.records else {}
        assert last.get("record") == "losses" and last["collector"] == self.name, last
        return [r for r in self.records if r["record"] == (record or self.name)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# One connection sending SIZE bytes in two halves: after each, once the peer has acknowledged everything,
# it prints "sent" and waits for a line on its stdin; then it closes.
TWO_HALVES = """
import fcntl, socket, struct, sys, termios, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(2):
    s.sendall(b"s" * (int(sys.argv[3]) // 2))
    while struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\\0" * 4))[0]:
        time.sleep(0.01)
    print("sent", flush=True)
    sys.stdin.readline()
s.close()
"""


def test_tcpretrans_counts_an_open_connection_from_the_start(pair: nh.NetnsPair) -> None:
    """A connection that retransmitted before tcpretrans -c started counts only what it retransmits after:
    its first row starts from its total at the start (sock_diag), not from 0."""
    port = 41003
    pair.set_loss(3, port)
    server = nh.start_server(pair.server, nh.SERVER_IP, port)
    client = subprocess.Popen(
        nh.in_ns(pair.client, sys.executable, "-c", TWO_HALVES, nh.SERVER_IP, str(port), str(40 << 20)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    counting = None
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "sent"
        ss = nh.sh(*nh.in_ns(pair.client, "ss", "-tiH", "state", "established", f"dport = :{port}")).stdout
        earlier = int(SS_RETRANS.search(ss).group(1)) if SS_RETRANS.search(ss) else 0
        counting = Tool("tcpretrans", "-c", "--json", "1", "--dport", str(port))
        before = pair.retrans_segs(pair.client)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "sent"
        after = pair.retrans_segs(pair.client)
        client.stdin.write("close\n")
        client.stdin.flush()
        client.wait(timeout=10)
        conns = counting.stop("tcpretrans.connection")
    finally:
        pair.clear_loss()
        if counting is not None:
            counting.kill()
        server.kill()
        if client.poll() is None:
            client.kill()
    by_tool = sum(r["retrans"] for r in conns)
    print(f"retransmitted: {earlier} before the start, {after - before} after; tcpretrans -c {by_tool}")
    # 3% loss over each 20 MiB: hundreds of retransmissions in each half (the first, ss's retrans:N/TOTAL).
    assert earlier > 100 and after - before > 100
    assert by_tool == after - before, conns


@pytest.mark.parametrize(("reverse", "ipv6"), [(False, False), (True, True)], ids=["ipv4", "ipv6-reverse"])
def test_tcptop_matches_iperf3(pair: nh.NetnsPair, reverse: bool, ipv6: bool) -> None:
    port = 41001
    tool = Tool("tcptop", "--json", "1", "--lport", str(port))
    tool_remote = Tool("tcptop", "--json", "1", "--dport", str(port))
    try:
        report, client_pid = nh.iperf3(pair, port, 2, reverse=reverse, ipv6=ipv6)
        local, remote = tool.stop(), tool_remote.stop()
    finally:
        tool.kill()
        tool_remote.kill()
    records = local + remote
    # One row per connection and process in each interval: a key with stray bytes (padding) would split
    # a connection over rows, each showing its cumulative bytes as one interval's.
    for recs in (local, remote):
        rows = Counter((r["ts"], r["pid"], r["sport"], r["dport"], r["netns"]) for r in recs)
        assert max(rows.values()) == 1, rows.most_common(1)
    # The data connection is the one that moved the most bytes; iperf3's control connection is tiny.
    per_conn: dict[tuple, list[int]] = {}
    for r in records:
        key = (r["pid"], r["netns"], r["saddr"], r["sport"], r["daddr"], r["dport"])
        totals = per_conn.setdefault(key, [0, 0])
        totals[0] += r["rx_bytes"]
        totals[1] += r["tx_bytes"]
    client_ns = nh.netns_inode(pair.client)
    client = max((k for k in per_conn if k[1] == client_ns), key=lambda k: sum(per_conn[k]))
    server = max((k for k in per_conn if k[1] != client_ns), key=lambda k: sum(per_conn[k]))
    assert client[0] == client_pid and client[5] == port and server[3] == port
    assert ":" in client[2] if ipv6 else "." in client[2]
    sent = report["end"]["sum_sent"]["bytes"]
    received = report["end"]["sum_received"]["bytes"]
    sender, receiver = (server, client) if reverse else (client, server)
    # iperf3 counts its own sends and receives within its test time; the tools count every byte the
    # calls returned on that connection. They differ by iperf3's handshake cookie and, on the receiver,
    # by what arrives after iperf3 stops its clock: far below 1%.
    for ours, theirs in ((per_conn[sender][1], sent), (per_conn[receiver][0], received)):
        assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
    ours_sent, ours_received = per_conn[sender][1], per_conn[receiver][0]
    print(f"tcptop vs iperf3: sent {ours_sent} vs {sent}, received {ours_received} vs {received}")


SS_RETRANS = re.compile(r"retrans:\d+/(\d+)")
SS_SEGS_OUT = re.compile(r"segs_out:(\d+)")


def test_tcpretrans_equals_snmp_and_ss(pair: nh.NetnsPair) -> None:
    port = 41002
    pair.set_loss(3, port)
    server = nh.start_server(pair.server, nh.SERVER_IP, port)
    counting = Tool("tcpretrans", "-c", "--json", "1", "--dport", str(port))
    events = Tool("tcpretrans", "--json", "--dport", str(port))
    client = None
    try:
        before = pair.retrans_segs(pair.client)
        client = subprocess.Popen(
            nh.in_ns(
                pair.client,
                sys.executable,
                "-c",
                nh.CLIENT,
                nh.SERVER_IP,
                str(port),
                "1",
                str(40 << 20),
                "0",
                "0",
                "1",
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        client_pid = int(client.stdout.readline())
        assert client.stdout.readline().strip() == "sent"
        # The connection's own total (retrans:N/TOTAL), read while it is still open.
        ss = nh.sh(*nh.in_ns(pair.client, "ss", "-tiH", "state", "established", f"dport = :{port}")).stdout
        ss_total = int(SS_RETRANS.search(ss).group(1)) if SS_RETRANS.search(ss) else 0
        ss_segs = int(SS_SEGS_OUT.search(ss).group(1))
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done"
        client.wait(timeout=10)
        # New sockets soon take the freed one's address: its counts must survive until they are read.
        nh.run_client(pair.client, nh.SERVER_IP, port, n=100)
        after = pair.retrans_segs(pair.client)
        conns = counting.stop("tcpretrans.connection")
        streamed = events.stop()
    finally:
        pair.clear_loss()
        counting.kill()
        events.kill()
        server.kill()
        if client is not None and client.poll() is None:
            client.kill()
    snmp = after - before
    by_tool = sum(r["retrans"] for r in conns)
    totals = [r for r in counting.records if r["record"] == "tcpretrans.total"]
    by_events = sum(e["segs"] for e in streamed)
    print(f"retransmitted segments: snmp {snmp}, ss {ss_total}, tcpretrans -c {by_tool}, events {by_events}")
    # 3% loss over 40 MiB (~29k segments): hundreds of retransmissions, not a handful.
    assert snmp > 100
    # Nothing else runs in this namespace: its counter is this connection's.
    assert by_tool == snmp == ss_total == by_events, (counting.stderr, events.stderr, conns)
    # Each interval's total is the sum of its connections.
    assert sum(r["retrans"] for r in totals) == by_tool
    assert sum(r["segs_out"] for r in totals) == sum(r["segs_out"] for r in conns)
    assert {r["pid"] for r in conns if r["retrans"]} == {client_pid}
    assert sum(1 for r in conns if r["pid"] != client_pid) >= 100  # the churn was seen
    for key in (
        "pid",
        "comm",
        "netns",
        "saddr",
        "sport",
        "daddr",
        "dport",
        "retrans",
        "segs_out",
        "retrans_pct",
    ):
        assert key in conns[0]
    # The rate's denominator against ss: the segments the connection sent (segs_out) while it was open,
    # plus what it sent after ss read it (the FIN and the ACK of the server's FIN).
    ours = [r for r in conns if r["pid"] == client_pid]
    segs = sum(r["segs_out"] for r in ours)
    assert ss_segs <= segs <= ss_segs + 2, (segs, ss_segs)
    pct = sum(r["retrans"] for r in ours) * 100.0 / segs
    last = max(ours, key=lambda r: r["ts"])
    assert last["segs_out_total"] == segs
    if last["segs_out"]:
        assert last["retrans_pct"] == round(100.0 * last["retrans"] / last["segs_out"], 4)
    print(f"client connection: {segs} segments sent, {pct:.2f}% retransmitted")
    kinds = {e["kind"] for e in streamed}
    assert "fast" in kinds, kinds


def test_tcplife_known_transfers(pair: nh.NetnsPair) -> None:
    port = 41003
    send, reply, hold, n = 3_000_000, 54_321, 0.4, 3
    server = nh.start_server(pair.server, nh.SERVER_IP6, port, reply=reply)
    clients = Tool("tcplife", "--json", "-D", str(port))
    servers = Tool("tcplife", "--json", "-L", str(port))
    hist = Tool("tcplife", "--hist", "--json", "-L", str(port))
    try:
        client_pid = nh.run_client(pair.client, nh.SERVER_IP6, port, n=n, send=send, reply=reply, hold=hold)
        active, passive, lifespans = clients.stop(), servers.stop(), hist.stop("tcplife.lifespan")
    finally:
        for tool in (clients, servers, hist):
            tool.kill()
        server.kill()
    assert len(active) == n and len(passive) == n
    contract = {"pid", "comm", "saddr", "sport", "daddr", "dport", "tx_bytes", "rx_bytes", "duration_ms"}
    assert contract <= set(active[0])
    for r in active:
        assert (r["pid"], r["comm"], r["tx_bytes"], r["rx_bytes"]) == (client_pid, "python", send, reply)
        assert r["daddr"] == nh.SERVER_IP6 and r["dport"] == port
    for r in passive:
        assert (r["pid"], r["tx_bytes"], r["rx_bytes"]) == (server.pid, reply, send)
    # The client holds each connection `hold` seconds after its transfer (a few ms on a veth); allow
    # 300 ms more for scheduling delays on a busy 2-CPU machine.
    for r in active + passive:
        assert hold * 1000 <= r["duration_ms"] <= hold * 1000 + 300, r
    (row,) = lifespans
    assert row["service"] == f"local port {port}" and row["count"] == n
    # The kernel's log-linear histogram has 16 buckets per power of two: a percentile is known to within
    # one bucket, 1/16 of the power of two below it (at most 6.25% of the value).
    bucket = 1 / 16
    assert hold * 1000 * (1 - bucket) <= row["p50_ms"] <= (hold * 1000 + 300) * (1 + bucket)


def test_tcpconn_known_connects(pair: nh.NetnsPair) -> None:
    port, closed_port = 41004, 41005
    server = nh.start_server(pair.server, nh.SERVER_IP, port)
    events = Tool("tcpconn", "--json")
    counts = Tool("tcpconn", "-c", "--json")
    refused = (
        "import socket\n"
        "for _ in range(3):\n"
        "    try:\n"
        f"        socket.create_connection(('{nh.SERVER_IP}', {closed_port}))\n"
        "    except ConnectionRefusedError:\n"
        "        pass\n"
    )
    try:
        ok_pid = nh.run_client(pair.client, nh.SERVER_IP, port, n=5)
        fail = subprocess.run(nh.in_ns(pair.client, sys.executable, "-c", refused), check=True, timeout=30)
        assert fail.returncode == 0
        streamed, counted = events.stop(), counts.stop("tcpconn.count")
    finally:
        events.kill()
        counts.kill()
        server.kill()
    ours = [e for e in streamed if e["dport"] in (port, closed_port) or e["sport"] == port]
    connects = [e for e in ours if e["kind"] == "connect"]
    accepts = [e for e in ours if e["kind"] == "accept"]
    fails = [e for e in ours if e["kind"] == "fail"]
    assert len(connects) == 5 and {e["pid"] for e in connects} == {ok_pid}
    assert len(accepts) == 5 and {e["pid"] for e in accepts} == {server.pid}
    assert len(fails) == 3 and {e["error"] for e in fails} == {"ECONNREFUSED"}
    to_server = [r for r in counted if r["daddr"] == nh.SERVER_IP]
    assert sum(r["count"] for r in to_server if r["kind"] == "connect") == 5
    assert sum(r["count"] for r in to_server if r["kind"] == "fail" and r["error"] == "ECONNREFUSED") == 3


@pytest.fixture(scope="module")
def tcp_rule(pair: nh.NetnsPair) -> Callable[..., TcpRule]:
    """A TCP rule judging only our namespaces (other work on this machine may lose packets), and by
    default the work of this test's own children too (iperf3 runs under the process the rule runs in,
    which bpfscope otherwise leaves out)."""
    ours = {nh.netns_inode(pair.client), nh.netns_inode(pair.server)}
    return lambda include_self=True: TcpRule(include_self=include_self, only_netns=ours)


def _bulk(pair: nh.NetnsPair, port: int, seconds: float) -> threading.Thread:
    """An iperf3 transfer in the background, at 200 Mbit/s: unlimited, it fills the veth's receive
    backlog on a busy machine and the kernel drops (and TCP retransmits) without any rule of ours."""
    thread = threading.Thread(target=nh.iperf3, args=(pair, port, seconds, False, False, "200M"), daemon=True)
    thread.start()
    nh.wait_listening(pair.server, port)
    time.sleep(0.5)  # the transfer is under way when the window opens
    return thread


def test_rule_names_lossy_connection(pair: nh.NetnsPair, tcp_rule: Callable[..., TcpRule]) -> None:
    port = 41006
    pair.set_loss(10, port)
    try:
        thread = _bulk(pair, port, 5)
        report = run_check(3, rules=[tcp_rule(), tcp_rule(include_self=False)])
        thread.join(timeout=30)
    finally:
        pair.clear_loss()
    row, not_ours = (r for r in report.rows if r.metric == "retransmits")
    assert row.verdict is Verdict.PROBLEM, row
    assert f"{nh.SERVER_IP}:{port}" in row.detail and "iperf3" in row.detail, row.detail
    # Left to itself, bpfscope attributes nothing to its own children: their sockets have no owner.
    assert "unknown process" in not_ours.detail and "iperf3" not in not_ours.detail, not_ours.detail


def test_rule_ok_without_loss(pair: nh.NetnsPair, tcp_rule: Callable[..., TcpRule]) -> None:
    thread = _bulk(pair, 41007, 4)
    report = run_check(2, rules=[tcp_rule()])
    thread.join(timeout=30)
    rows = {r.metric: r for r in report.rows}
    assert rows["retransmits"].verdict is Verdict.OK, rows["retransmits"]
    assert rows["connections"].verdict is Verdict.OK


@pytest.mark.parametrize(
    "args",
    [
        ["tcptop", "--lport", "70000"],
        ["tcpretrans", "--dport", "0"],
        ["tcplife", "-p", "999999999"],
        ["tcpconn", "-c", "-1"],
    ],
)
def test_bad_input_one_line(run_cli, args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr


SYN_TIMEOUT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)  # ETIMEDOUT after ~3 s of backoff
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except TimeoutError:
    print("timed out")
"""


def test_connect_timeout_and_syn_retransmit(pair: nh.NetnsPair) -> None:
    port = 41008
    pair.drop_syns(port)
    conns = Tool("tcpconn", "--json", "--dport", str(port))
    retrans = Tool("tcpretrans", "--json", "--dport", str(port))
    try:
        before = pair.retrans_segs(pair.client)
        client = subprocess.run(
            nh.in_ns(pair.client, sys.executable, "-c", SYN_TIMEOUT, nh.SERVER_IP, str(port)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert client.stdout.strip() == "timed out", client
        snmp = pair.retrans_segs(pair.client) - before
        failed, retransmitted = conns.stop(), retrans.stop()
    finally:
        pair.clear_loss()
        conns.kill()
        retrans.kill()
    assert [(e["kind"], e["error"]) for e in failed] == [("fail", "ETIMEDOUT")]
    # TCP_SYNCNT bounds the time (the sum of the backoffs), so the SYN may be retransmitted once or twice.
    assert {(e["kind"], e["state"], e["segs"]) for e in retransmitted} == {("syn", "SYN_SENT", 1)}
    assert len(retransmitted) == snmp >= 1
    assert {e["pid"] for e in retransmitted} == {failed[0]["pid"]} != {0}


def test_pid_and_cgroup_filters(pair: nh.NetnsPair, cgroup) -> None:
    port = 41009
    server = nh.start_server(pair.server, nh.SERVER_IP, port, reply=1000)
    by_pid = Tool("tcpconn", "--json", "-p", str(server.pid))
    by_cgroup = Tool("tcptop", "--json", "1", "--cgroup", str(cgroup))
    try:
        client_pid = nh.run_client(pair.client, nh.SERVER_IP, port, n=2, send=5000, reply=1000, cgroup=cgroup)
        accepts, rows = by_pid.stop(), by_cgroup.stop()
    finally:
        by_pid.kill()
        by_cgroup.kill()
        server.kill()
    # -p: the server's accepts only, not the client's connects (another process).
    assert [(e["kind"], e["pid"]) for e in accepts] == [("accept", server.pid)] * 2
    # --cgroup: the client's two connections only, not the server's side of them.
    assert {r["pid"] for r in rows} == {client_pid}
    assert sum(r["tx_bytes"] for r in rows) == 2 * 5000 and sum(r["rx_bytes"] for r in rows) == 2 * 1000
    assert {r["cgroup"] for r in rows} == {cgroup.stat().st_ino}


def test_synack_retransmit_owned_by_listener(pair: nh.NetnsPair) -> None:
    port = 41010
    # Started before the server: the listener's owner is learnt at listen().
    retrans = Tool("tcpretrans", "--json", "--lport", str(port))
    server = nh.start_server(pair.server, nh.SERVER_IP, port)
    # The client's half of the handshake (its ACK) and its data are dropped: the server, still waiting
    # for the ACK, retransmits its SYN-ACK (after 1 s); then the path heals and the connection completes.
    pair.drop(f"tcp dport {port} tcp flags & syn == 0 drop")
    try:
        before = pair.retrans_segs(pair.server)
        client = threading.Thread(target=nh.run_client, args=(pair.client, nh.SERVER_IP, port, 1, 1000))
        client.start()
        time.sleep(1.6)
        pair.clear_loss()
        client.join(timeout=30)
        snmp = pair.retrans_segs(pair.server) - before
        events = retrans.stop()
    finally:
        pair.clear_loss()
        retrans.kill()
        server.kill()
    synacks = [e for e in events if e["kind"] == "synack"]
    assert synacks and {(e["pid"], e["sport"], e["state"]) for e in synacks} == {
        (server.pid, port, "NEW_SYN_RECV")
    }
    assert {e["daddr"] for e in synacks} == {nh.CLIENT_IP}
    # Everything the server's namespace retransmitted was seen (the server sends nothing else).
    assert sum(e["segs"] for e in events) == snmp


def test_synack_then_data_retransmits_counted_once(pair: nh.NetnsPair) -> None:
    """The socket a handshake makes keeps its request sock's cookie, and starts with the SYN-ACKs in its
    total_retrans: its first retransmission, counted against the SYN-ACK row, counts only itself."""
    port = 41011
    server = nh.start_server(pair.server, nh.SERVER_IP, port, reply=200_000)
    # Counted until the stop, one interval: the SYN-ACK row is still there when the reply is retransmitted.
    counting = Tool("tcpretrans", "-c", "--json", "--lport", str(port))
    try:
        before = pair.retrans_segs(pair.server)
        # The client's ACK and data dropped: the server retransmits its SYN-ACK (after 1 s).
        pair.drop(f"tcp dport {port} tcp flags & syn == 0 drop")
        client = threading.Thread(
            target=nh.run_client, args=(pair.client, nh.SERVER_IP, port, 1, 1000, 200_000)
        )
        client.start()
        time.sleep(1.6)
        # Then only the client's pure ACKs: its data, retransmitted, completes the handshake (at 3.4-3.6 s
        # here), and the server's reply goes unacknowledged until retransmitted (3 s later: the RTO after a
        # SYN-ACK was retransmitted, TCP_TIMEOUT_FALLBACK).
        pair.drop(f"tcp dport {port} tcp flags & (fin | syn | rst) == 0 ip length < 100 drop")
        established: int | None = None
        deadline = time.monotonic() + 15
        while established is None or pair.retrans_segs(pair.server) == established:
            assert time.monotonic() < deadline, "the server's reply was not retransmitted"
            time.sleep(0.1)
            ss = nh.sh(*nh.in_ns(pair.server, "ss", "-Htn", "state", "established", f"sport = :{port}"))
            if established is None and ss.stdout.strip():
                established = pair.retrans_segs(pair.server)  # its SYN-ACKs, all before
        pair.clear_loss()
        client.join(timeout=30)
        time.sleep(0.5)  # the close's last segments
        snmp = pair.retrans_segs(pair.server) - before
        conns = counting.stop("tcpretrans.connection")
    finally:
        pair.clear_loss()
        counting.kill()
        server.kill()
    kinds = Counter()
    for row in conns:
        kinds.update(row["kinds"])
    print(f"server's retransmitted segments: snmp {snmp}, tcpretrans -c {kinds}")
    assert kinds["synack"] >= 1 and sum(kinds.values()) - kinds["synack"] >= 1, kinds
    assert sum(r["retrans"] for r in conns) == snmp, conns


def test_tcptop_peek_once_and_tcpconn_reset() -> None:
    """On loopback, in this process: peeked bytes are received once (tcptop); a connection closed by its
    peer with SO_LINGER 0 (a RST) is a RESET of this process, with ECONNRESET (tcpconn)."""
    import os
    import socket
    import struct

    port = 41011
    top = Tool("tcptop", "--json", "1", "--lport", str(port))
    conns = Tool("tcpconn", "--json", "--dport", str(port))
    try:
        with socket.create_server(("127.0.0.1", port)) as server:
            client = socket.create_connection(("127.0.0.1", port))
            accepted, _ = server.accept()
            client.sendall(b"x" * 1000)
            assert len(accepted.recv(1000, socket.MSG_PEEK)) == 1000
            assert len(accepted.recv(1000)) == 1000
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            accepted.close()
            with pytest.raises(ConnectionResetError):
                client.recv(10)
            client.close()
        rows, events = top.stop(), conns.stop()
    finally:
        top.kill()
        conns.kill()
    assert sum(r["rx_bytes"] for r in rows) == 1000
    kinds = [(e["kind"], e["pid"], e["error"]) for e in events]
    assert kinds == [("connect", os.getpid(), ""), ("reset", os.getpid(), "ECONNRESET")]
