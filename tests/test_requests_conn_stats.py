"""conn_stats's retransmitted segments against the kernel's own count: HTTP uploads and downloads between
two network namespaces with packet loss, traced by bpfscope requests; each namespace's connections'
retransmits in conn_stats must add up to its /proc/net/snmp RetransSegs, read before the tracer attached
and after it stopped (nothing else runs in either namespace, and both are quiet at the start and end)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import nethelpers as nh
import pytest
from test_requests_servers import Traced

from bpfscope.domains.requests.stats import CONN_STATS

# HTTP/1.1 with keep-alive, a thread per connection: reads each upload, answers with REPLY bytes.
SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"r" * int(sys.argv[3])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
print("ready", flush=True)
server.serve_forever()
"""

# CONNS connections in turn, each POSTing SIZE bytes REQUESTS times and reading the answers, PAUSE
# seconds after each, then closing.
CLIENT = """
import http.client, os, sys, time
host, port, conns, requests, size = sys.argv[1], *map(int, sys.argv[2:6])
pause = float(sys.argv[6])
print(os.getpid(), flush=True)
body = b"q" * size
for _ in range(conns):
    c = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(requests):
        c.request("POST", "/upload", body)
        response = c.getresponse()
        response.read()
        assert response.status == 200, response.status
        time.sleep(pause)
    c.close()
print("done", flush=True)
"""

PORT = 41080
CONNECTIONS = 12
REQUESTS = 4
SIZE = 256 << 10
# Connections open across the tracer's 1 s intervals, and closing in several of them.
PAUSE_S = 0.15


@pytest.fixture(scope="module")
def pair() -> Iterator[nh.NetnsPair]:
    yield from nh.netns_pair()


def busy_sockets(pair: nh.NetnsPair, port: int) -> list[str]:
    """Sockets of the port that may still send (a retransmission timer armed): every state but LISTEN
    and TIME-WAIT (a timewait sock only answers), in either namespace."""
    busy = []
    for ns in (pair.client, pair.server):
        listed = nh.sh(*nh.in_ns(ns, "ss", "-Htan", f"( sport = :{port} or dport = :{port} )")).stdout
        busy += [
            f"{ns}: {line}" for line in listed.splitlines() if line.split()[0] not in ("LISTEN", "TIME-WAIT")
        ]
    return busy


def test_conn_stats_retransmits_equal_each_namespaces_retrans_segs(pair: nh.NetnsPair) -> None:
    server = subprocess.Popen(
        nh.in_ns(pair.server, sys.executable, "-c", SERVER, nh.SERVER_IP, str(PORT), str(SIZE)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # Segments lost both ways: the client retransmits its uploads, the server its answers.
        pair.set_loss(5, PORT)
        pair.set_reply_loss(5, PORT)
        before = {ns: pair.retrans_segs(ns) for ns in (pair.client, pair.server)}
        with Traced("--port", str(PORT), "1") as traced:
            args = (nh.SERVER_IP, str(PORT), str(CONNECTIONS), str(REQUESTS), str(SIZE), str(PAUSE_S))
            client = subprocess.run(
                nh.in_ns(pair.client, sys.executable, "-c", CLIENT, *args),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert client.returncode == 0 and client.stdout.split()[-1] == "done", client.stderr
            client_pid = int(client.stdout.split()[0])
            pair.clear_loss()
            # Quiet at the end: no connection left with anything to retransmit (a FIN whose ACK was lost).
            deadline = time.monotonic() + 10
            while busy_sockets(pair, PORT):
                assert time.monotonic() < deadline, busy_sockets(pair, PORT)
                time.sleep(0.1)
        after = {ns: pair.retrans_segs(ns) for ns in (pair.client, pair.server)}
    finally:
        pair.clear_loss()
        server.kill()
    rows = traced.table("conn_stats")
    assert rows, traced.stderr
    for row in rows:
        assert not CONN_STATS.check(row), (row, CONN_STATS.check(row))
    # Cumulative since the start: every row of the last interval holds its connections' total.
    last = max(r["ts"] for r in rows)
    final = [r for r in rows if r["ts"] == last]
    by_pid = {pid: sum(r["retrans"] for r in final if r["pid"] == pid) for pid in (client_pid, server.pid)}
    snmp = {ns: after[ns] - before[ns] for ns in after}
    print(f"retransmitted segments: client {by_pid[client_pid]} (snmp {snmp[pair.client]}), "
          f"server {by_pid[server.pid]} (snmp {snmp[pair.server]})")  # fmt: skip
    # 5% of the packets of 12 MiB each way: tens to hundreds of segments retransmitted by each side (a
    # dropped packet may be a GSO burst of several segments; 148 to 554 per side in four runs).
    assert snmp[pair.client] > 20 and snmp[pair.server] > 20
    assert by_pid == {client_pid: snmp[pair.client], server.pid: snmp[pair.server]}, final
    # Each connection seen closed, the closes over several intervals (each interval read the counts of
    # connections that closed since the previous one).
    assert sum(r["conn_close"] for r in final if r["pid"] == client_pid) == CONNECTIONS
    closes = {r["conn_close"] for r in rows if r["pid"] == client_pid}
    assert len(closes - {0, CONNECTIONS}) >= 2, closes
    assert traced.all_losses["requests.stats"]["total"] == 0, traced.all_losses
