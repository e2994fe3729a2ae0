"""bpfscope requests on data protocols against real servers and their clients' own truth: PostgreSQL
under pgbench (its per-transaction log), errors from psql; Redis under redis-benchmark with pipelining
and a RESP3 client; DNS queries to dnsmasq over UDP and TCP, with known answers and an NXDOMAIN."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

from test_requests_servers import (  # noqa: F401
    DNS_RECORDS,
    Dns,
    Postgres,
    Redis,
    Traced,
    dnsmasq_server,
    postgres_server,
    python_client,
    quantile,
    redis_server,
)

SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid ="


def pgbench_log(directory: Path) -> dict[int, list[tuple[float, int]]]:
    """pgbench --log, per client: (end of the transaction, wall-clock s; its latency, ns), in order.
    Fields: client, transaction, time (us), script, epoch s, us."""
    out: dict[int, list[tuple[float, int]]] = {}
    for path in directory.glob("pgb*"):
        for f in (line.split() for line in path.read_text().splitlines()):
            out.setdefault(int(f[0]), []).append((int(f[4]) + int(f[5]) / 1e6, int(f[2]) * 1000))
    return out


def paired(truth: dict[int, list[tuple[float, int]]], ours: list[dict]) -> list[tuple[int, int]]:
    """(pgbench's latency, ours) for each transaction: each pgbench client is the connection whose
    responses end when its transactions do."""
    by_conn: dict[int, list[dict]] = {}
    for r in sorted(ours, key=lambda r: r["ts"]):
        by_conn.setdefault(r["local_port"], []).append(r)
    pairs = []
    for transactions in truth.values():
        conn = min(by_conn.values(), key=lambda rs: abs(rs[0]["ts"] - transactions[0][0]))
        assert len(conn) == len(transactions)
        pairs += [(t[1], r["latency"]) for t, r in zip(transactions, conn, strict=True)]
    return pairs


def test_pgbench_statements_counted_normalised_and_timed(postgres: Postgres) -> None:
    logs = postgres.data.parent / "log"  # written by pgbench, as postgres
    logs.mkdir()
    logs.chmod(0o777)
    clients, transactions = 2, 300
    with Traced("--port", str(postgres.port)) as traced:
        postgres.run("pgbench", "-n", "-S", "-c", str(clients), "-t", str(transactions), "--log",
                     f"--log-prefix={logs}/pgb", "postgres")  # fmt: skip
    truth = pgbench_log(logs)
    assert sum(map(len, truth.values())) == clients * transactions
    selects = [r for r in traced.table("pgsql_events", trace_role="client") if r["req"].startswith(SELECT)]
    assert len(selects) == clients * transactions
    assert {r["req"] for r in selects} == {f"{SELECT} ?;"}  # literals never leave: normalised
    assert {r["req_cmd"] for r in selects} == {"Query"} and {r["resp"] for r in selects} == {"SELECT 1"}
    assert all(r["rows"] == 1 and r["error"] == "" for r in selects)
    server = [r for r in traced.table("pgsql_events", trace_role="server") if r["req"].startswith(SELECT)]
    assert len(server) == clients * transactions
    # Each statement's latency against pgbench's for its transaction (the statement alone, here): never
    # longer, and shorter only by pgbench's own work around its calls (the medians within 10%).
    pairs = paired(truth, selects)
    assert sum(ours <= theirs + 20_000 for theirs, ours in pairs) >= 0.99 * len(pairs), pairs
    theirs_p50 = quantile([t for t, _ in pairs], 0.5)
    assert abs(quantile([o for _, o in pairs], 0.5) - theirs_p50) <= 0.10 * theirs_p50, pairs
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


def test_pgbench_extended_protocol_and_errors(postgres: Postgres) -> None:
    """pgbench -M prepared parses its statement once per connection and executes it by name; psql's bad
    SQL comes back as an error with its SQLSTATE."""
    with Traced("--port", str(postgres.port), "--no-redact") as traced:
        postgres.run("pgbench", "-n", "-S", "-M", "prepared", "-c", "2", "-t", "200", "postgres")
        bad = postgres.run("psql", "-c", "SELEC 1", "postgres", check=False)
    assert bad.returncode != 0
    executes = [r for r in traced.table("pgsql_events", trace_role="client") if r["req"].startswith(SELECT)]
    # Each connection prepares once (Parse, Describe, Sync: a request of its own), then executes.
    assert Counter(r["req_cmd"] for r in executes) == {"Parse": 2, "Execute": 400}
    assert {r["req"] for r in executes} == {f"{SELECT} $1;"}
    errors = [r for r in traced.table("pgsql_events") if r["error"]]
    assert {r["trace_role"] for r in errors} == {"client", "server"}
    assert all(
        r["req"] == "SELEC 1" and "syntax error" in r["error"] and "(42601)" in r["error"] for r in errors
    )
    startups = [r for r in traced.table("pgsql_events", trace_role="client") if r["req_cmd"] == "Startup"]
    # pgbench's own first connection (it asks the scale), its two clients', and psql's.
    assert Counter(r["comm"] for r in startups) == {"pgbench": 3, "psql": 1}


def test_redis_benchmark_pipelined_commands_counted(redis: Redis) -> None:
    requests = 3000
    with Traced("--port", str(redis.port)) as traced:
        result = subprocess.run(
            ["redis-benchmark", "-p", str(redis.port), "-n", str(requests), "-c", "4", "-P", "16",
             "-t", "set,get", "-q"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    assert "SET" in result.stdout and "GET" in result.stdout
    # The server's own count (redis-benchmark sends whole pipelines: a few more than -n).
    stats = subprocess.run(["redis-cli", "-p", str(redis.port), "INFO", "commandstats"], capture_output=True,
                           text=True, check=True, timeout=30).stdout  # fmt: skip
    calls = {m[0].upper(): int(m[1]) for m in re.findall(r"cmdstat_(set|get):calls=(\d+)", stats)}
    assert calls["SET"] >= requests and calls["GET"] >= requests
    for role in ("client", "server"):
        counts = Counter(r["req_cmd"] for r in traced.table("redis_events", trace_role=role))
        assert counts["SET"] == calls["SET"] and counts["GET"] == calls["GET"], (role, counts, calls)
    sets = traced.table("redis_events", trace_role="server", req_cmd="SET")
    assert {r["resp"] for r in sets} == {"OK"} and {r["req_args"][1] for r in sets} == {"<redacted>"}
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


RESP3_CLIENT = r"""
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
sock.sendall(cmd(b"HELLO", b"3"))
def answer(end, size=0):
    data = b""
    while not data.endswith(end) or len(data) < size:
        data += sock.recv(65536)
answer(b"\r\n", 100)
# A value beyond the capture limit, stepped over by count (what shares a call with it after the limit is
# not captured: these round trips are separate).
big = b"x" * 20000
sock.sendall(cmd(b"HSET", b"h", b"a", b"1", b"b", big))
answer(b":2\r\n")
sock.sendall(cmd(b"HGETALL", b"h"))
answer(b"\r\n", 20000)
sock.sendall(cmd(b"NOSUCH") + b"PING\r\n")
answer(b"+PONG\r\n")
"""


def test_redis_resp3_maps_errors_inline_and_large_values(redis: Redis) -> None:
    with Traced("--port", str(redis.port), "--no-redact") as traced:
        python_client(RESP3_CLIENT, str(redis.port)).communicate(timeout=60)
    server = traced.table("redis_events", trace_role="server")
    assert [r["req_cmd"] for r in server] == ["HELLO", "HSET", "HGETALL", "NOSUCH", "PING"]
    hello, hset, hgetall, nosuch, ping = server
    assert hello["resp"].startswith("[") and hset["resp"] == "2" and hgetall["resp"] == "[2 items]"
    assert hgetall["resp_bytes"] > 20000 and hset["req_bytes"] > 20000
    assert nosuch["error"].startswith("ERR unknown command") and ping["resp"] == "PONG"
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


DNS_CLIENT = r"""
import json, sys
import dns.message, dns.query, dns.rcode
port, names = int(sys.argv[1]), sys.argv[2].split(",")
out = []
for i, name in enumerate(names):
    query = dns.message.make_query(name, "A")
    ask = dns.query.tcp if i % 4 == 3 else dns.query.udp
    answer = ask(query, "127.0.0.1", port=port, timeout=5)
    out.append({"name": name, "rcode": dns.rcode.to_text(answer.rcode()),
                "answers": [f"A {r.to_text()}" for rrset in answer.answer for r in rrset]})
print(json.dumps(out))
"""


def test_dns_queries_answers_and_nxdomain(dnsmasq: Dns) -> None:
    names = [*DNS_RECORDS, "nothing.test"] * 6
    with Traced("--port", str(dnsmasq.port)) as traced:
        client = python_client(DNS_CLIENT, str(dnsmasq.port), ",".join(names))
        out, _ = client.communicate(timeout=60)
    truth = json.loads(out)
    assert {t["rcode"] for t in truth if t["name"] == "nothing.test"} == {"NXDOMAIN"}
    clients = [r for r in traced.table("dns_events", trace_role="client") if r["pid"] == client.pid]
    # dnsmasq answers TCP from a child it forks for the connection: the server is whoever has its port.
    servers = traced.table("dns_events", trace_role="server", local_port=dnsmasq.port)
    for role, seen in (("client", clients), ("server", servers)):
        assert sorted((r["query_name"], r["rcode"], tuple(r["answers"])) for r in seen) == sorted(
            (t["name"], t["rcode"], tuple(t["answers"])) for t in truth
        ), role
        assert all(r["query_type"] == "A" for r in seen)
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)
