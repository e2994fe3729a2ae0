"""bpfscope requests on MySQL's protocol against a real MariaDB server and its clients' own truth: a
Python client (PyMySQL) running known numbers of text queries (timed at its socket), prepared
statements and one bad statement; mariadb-slap's queries against the server's own count; and the
records kept in the store, read back with SQL, a PxL-style script and the service map."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_requests_servers import Traced, free_port, have, python_client, quantile, stop, wait_port
from test_requests_store import query

from bpfscope.domains.requests import redact
from bpfscope.domains.requests.protocols import mysql


@dataclass
class Mariadb:
    port: int
    work: Path

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The mariadb client over TCP (Unix sockets are not captured)."""
        return subprocess.run(
            ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(self.port), "-u", "root", *args],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip

    def status(self, name: str) -> int:
        out = self.client("-N", "-e", f"SHOW GLOBAL STATUS LIKE '{name}'").stdout.split()
        return int(out[1])


@pytest.fixture(scope="module", name="mariadb")
def mariadb_server() -> Iterator[Mariadb]:
    """A throw-away MariaDB on 127.0.0.1 (root without a password, its own data directory and socket),
    with the client's schema."""
    have("mariadbd", "mariadb-install-db", "mariadb", "mariadb-slap")()
    work = Path(tempfile.mkdtemp(prefix="bpfscope-mariadb-"))
    data = work / "data"
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
         "--auth-root-authentication-method=normal", "--skip-test-db"],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", f"--socket={work}/sock",
         f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={work}/pid", "--skip-log-bin",
         "--innodb-buffer-pool-size=32M", f"--log-error={work}/error.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc, timeout=60)
        server = Mariadb(port, work)
        server.client("-e", "CREATE DATABASE shop")
        yield server
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)


# The client: text queries timed at its socket (from before the request's send to after the receive
# that completes the response, as pgbench times its own), a statement prepared once and executed with
# bound values (COM_STMT_PREPARE, EXECUTE, CLOSE, through PyMySQL's packet layer: PyMySQL itself only
# interpolates), a ping, and a bad statement.
CLIENT = r"""
import json, struct, sys, time
import pymysql
from pymysql.constants import COMMAND

port, queries, executes = map(int, sys.argv[1:4])
conn = pymysql.connect(host="127.0.0.1", port=port, user="root", database="shop", autocommit=True)
cur = conn.cursor()
cur.execute("CREATE TABLE IF NOT EXISTS items (id INT PRIMARY KEY, name VARCHAR(32), price INT)")
cur.execute("DELETE FROM items")
for i in range(1, 51):
    cur.execute("INSERT INTO items VALUES (%s, %s, %s)", (i, f"item-{i}", i * 7))
conn.select_db("shop")
sock = conn._sock

def raw(sql):  # (latency, bytes received, rows) of one text query
    payload = b"\x03" + sql.encode()
    data, at, eofs, rows = b"", 0, 0, 0
    t0 = time.perf_counter_ns()
    sock.sendall(len(payload).to_bytes(3, "little") + b"\0" + payload)
    while eofs < 2:
        data += sock.recv(65536)
        t1 = time.perf_counter_ns()  # the receive that completes the response ends it, not the parsing
        while len(data) - at >= 4 and len(data) - at >= 4 + (n := int.from_bytes(data[at:at + 3], "little")):
            packet, at = data[at + 4:at + 4 + n], at + 4 + n
            assert packet[:1] != b"\xff", packet
            if packet[:1] == b"\xfe" and n < 9:
                eofs += 1
            elif eofs == 1:
                rows += 1
    assert at == len(data)
    return t1 - t0, len(data), rows

timings = []
for i in range(queries):
    latency, _, rows = raw(f"SELECT name, price FROM items WHERE id = {i % 50 + 1} AND price > {i % 3}")
    assert rows == 1
    timings.append(latency)
# Result sets longer than the capture (each about 10 kB, in one call): their sizes as received.
big = [raw("SELECT REPEAT('x', 200), id FROM items")[1:] for _ in range(5)]

def packets_until_eof():
    while not conn._read_packet().is_eof_packet():
        pass

conn._execute_command(COMMAND.COM_STMT_PREPARE, "SELECT name FROM items WHERE id <= ?")
stmt, columns, params = struct.unpack_from("<IHH", conn._read_packet().get_all_data(), 1)
for n in (params, columns):
    if n:
        packets_until_eof()
rows = 0
for i in range(executes):
    # One INT parameter: no NULLs, types sent, then its value.
    value = struct.pack("<IBI", stmt, 0, 1) + b"\x00\x01\x03\x00" + struct.pack("<i", i % 5 + 1)
    conn._execute_command(COMMAND.COM_STMT_EXECUTE, value)
    first = conn._read_packet()
    for _ in range(first.read_length_encoded_integer()):
        conn._read_packet()
    conn._read_packet()  # EOF after the columns
    while not conn._read_packet().is_eof_packet():
        rows += 1
conn._execute_command(COMMAND.COM_STMT_CLOSE, struct.pack("<I", stmt))
conn.ping(reconnect=False)
try:
    cur.execute("SELEC 1")
    error = None
except pymysql.err.ProgrammingError as e:
    error = list(e.args)
conn.close()
print(json.dumps({"timings": timings, "big": big, "rows": rows, "error": error}))
"""

SELECT = "SELECT name, price FROM items WHERE id = ? AND price > ?"
PREPARED = "SELECT name FROM items WHERE id <= ?"
BIG = "SELECT REPEAT(?, ?), id FROM items"


def run_client(port: int, queries: int, executes: int) -> dict:
    proc = python_client(CLIENT, str(port), str(queries), str(executes))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return json.loads(out)


# Plaintext here: --no-tls leaves other processes' OpenSSL calls on a shared machine out of the losses.
def test_statements_counted_normalised_and_timed(mariadb: Mariadb) -> None:
    queries, executes = 400, 150
    with Traced("--no-tls", "--port", str(mariadb.port)) as traced:
        truth = run_client(mariadb.port, queries, executes)
    assert len(truth["timings"]) == queries
    for role in ("client", "server"):
        records = [r for r in traced.table("mysql_events", trace_role=role) if r["comm"] != "mariadb"]
        counts = Counter((r["req_cmd"], r["req_body"]) for r in records)
        assert counts[("Query", SELECT)] == queries, (role, counts)
        assert counts[("Execute", PREPARED)] == executes, (role, counts)
        assert counts[("Prepare", PREPARED)] == counts[("Close stmt", PREPARED)] == 1, (role, counts)
        assert counts[("Ping", "")] == counts[("Init DB", "shop")] == counts[("Connect", "")] == 1, counts
        assert counts[("Quit", "")] == 1, (role, counts)
        assert counts[("Query", "INSERT INTO items VALUES (?, ?, ?)")] == 50, (role, counts)
        # Longer than the capture: counted, with their sizes exact (rows: those before the cut).
        big = [
            (r["resp_bytes"], r["resp_status"], r["resp_body"][:17]) for r in records if r["req_body"] == BIG
        ]
        assert big == [(size, "OK", "Resultset rows >=") for size, _ in truth["big"]]
        assert truth["big"][0][0] > 2 * 4096 and truth["big"][0][1] == 50
        by_cmd = Counter((r["req_cmd"], r["resp_status"]) for r in records)
        assert by_cmd[("Close stmt", "NONE")] == by_cmd[("Quit", "NONE")] == 1
        executed = [r for r in records if r["req_cmd"] == "Execute"]
        assert sum(r["rows"] for r in executed) == truth["rows"]
        assert {r["resp_body"] for r in executed} == {f"Resultset rows = {n}" for n in range(1, 6)}
        assert all(r["rows"] == 1 and r["error"] == "" for r in records if r["req_body"] == SELECT)
        # The bad statement: its error as the server sent it, the part quoting the statement normalised.
        code, message = truth["error"]
        errors = [r for r in records if r["error"]]
        expected = mysql.redact_error(f"ERROR {code} (42000): {message}", redact.normalize_sql)
        got = [(r["req_body"], r["resp_status"], r["error"]) for r in errors]
        assert got == [("SELEC ?", "ERR", expected)]
        assert "near 'SELEC ?'" in errors[0]["resp_body"]
    # Latency against the client's own, statement by statement: never longer, and shorter only by the
    # client's work around its calls (the medians within 10%).
    client = sorted(traced.table("mysql_events", trace_role="client"), key=lambda r: r["ts"])
    ours = [r["latency"] for r in client if r["req_body"] == SELECT]
    pairs = list(zip(truth["timings"], ours, strict=True))
    assert sum(o <= t + 20_000 for t, o in pairs) >= 0.99 * len(pairs), pairs
    theirs_p50 = quantile(truth["timings"], 0.5)
    assert abs(quantile(ours, 0.5) - theirs_p50) <= 0.10 * theirs_p50, (theirs_p50, quantile(ours, 0.5))
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


def test_mariadb_slap_queries_counted(mariadb: Mariadb) -> None:
    clients, iterations = 2, 25
    before = mariadb.status("Com_select")
    with Traced("--no-tls", "--port", str(mariadb.port), "--protocol", "mysql") as traced:
        subprocess.run(
            ["mariadb-slap", "--no-defaults", "-h", "127.0.0.1", "-P", str(mariadb.port), "-u", "root",
             "--create-schema=shop", f"--concurrency={clients}", f"--iterations={iterations}",
             "--query=SELECT 1"],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
    selects = mariadb.status("Com_select") - before  # the server's own count (SHOW STATUS is not one)
    assert selects == clients * iterations
    for role in ("client", "server"):
        got = [r for r in traced.table("mysql_events", trace_role=role) if r["req_body"] == "SELECT ?"]
        assert len(got) == selects and {r["comm"] for r in got} <= {"mariadb-slap", "mariadbd"}
        # Each iteration connects each client anew: one connection phase for each, and slap's own.
        connects = traced.table("mysql_events", trace_role=role, req_cmd="Connect", resp_status="OK")
        assert len(connects) >= selects
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


PXL = """
import px
df = px.DataFrame(table="mysql_events", start_time="-5m")
df = df[df.trace_role == "server"]
df = df.groupby("req_cmd").agg(count=("latency", px.count))
px.display(df, "commands")
"""


def test_stored_queried_and_mapped(mariadb: Mariadb, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ("--no-tls", "--port", str(mariadb.port), "--protocol", "mysql", "--store", str(store))
    with Traced(*args) as traced:
        truth = run_client(mariadb.port, 30, 20)
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)
    rows = query(store, "SELECT count(*) AS n FROM mysql_events WHERE trace_role = 'server' AND "
                 f"req_cmd = 'Execute' AND req_body = '{PREPARED}'")  # fmt: skip
    assert rows == [{"n": 20}]
    script = tmp_path / "commands.py"
    script.write_text(PXL)
    commands = {r["req_cmd"]: r["count"] for r in query(store, "--script", str(script))}
    assert commands["Query"] >= 30 + 50 + 1 and commands["Execute"] == 20 and commands["Ping"] == 1
    # The service map: one edge, the client to MariaDB, with the bad statement as its error.
    (smap,) = query(store, "--map")
    edges = [e for e in smap["edges"] if e["protocol"] == "mysql"]
    assert len(edges) == 1, smap
    total = edges[0]["requests"]
    assert total == sum(commands.values())
    assert edges[0]["error_pct"] == pytest.approx(100 / total, rel=0.01)
    assert truth["error"][0] == 1064
