#!/usr/bin/env python3
"""Pixie's tutorial with `bpfscope requests` and `bpfscope query`: a small multi-service app under load,
every request it makes captured with no change to it, then the questions Pixie's tutorial asks, answered
from the store: the service map, the slowest endpoints and SQL statements, HTTP errors by path, failed
DNS lookups, and "find slow database queries" (p99 per normalised statement over the last 5 minutes,
above 100 ms) as a PxL-style script and as SQL.

    sudo .venv/bin/python experiments/pixie-tutorial/run.py [--seconds S] [--out DIR]

The app is experiments/network-analysis's mesh, each service in its own network namespace:

    client -> gateway (nginx) -> sidecar (haproxy) -> app (nginx) ; the app's workers -> PostgreSQL
                                                                    the app's cache client -> Redis
                                                                    (its address looked up in DNS)

The client asks for /small through the gateway (and, now and then, /missing: a 404); pgbench plays the
app's database client (read-only lookups, and one statement in ten that sleeps 150 ms: the slow query);
a cache client in the app's namespace looks up cache.mesh and a name that does not exist through a local
dnsmasq, then sets and gets keys in Redis. The load lasts --seconds (60; the tests run 8). The report
(report.json, report.md, the service map as SVG and HTML, the store) goes to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy

HERE = Path(__file__).resolve().parent
MESH = HERE.parent / "network-analysis"
sys.path[:0] = [str(HERE.parent), str(MESH)]
import mesh  # noqa: E402
from scenario import bpfscope_cmd  # noqa: E402

from bpfscope.domains.requests import servicemap  # noqa: E402
from bpfscope.domains.requests.scripting import run as run_script  # noqa: E402
from bpfscope.sinks.store import Store  # noqa: E402

# The mesh under names, addresses and ports of its own (bsp-*, 10.245.N.*, 44080...), so that this
# tutorial may run beside the network-analysis experiment.
mesh.NETNS = {s: f"bsp-{s}" for s in mesh.SERVICES}
mesh.PORTS = {s: port + 2000 for s, port in mesh.PORTS.items()}
mesh.Link.subnet = property(lambda link: f"10.245.{link.number}.")  # type: ignore[method-assign,assignment]
mesh.Link.veths = property(lambda link: (f"bsp{link.number}l", f"bsp{link.number}r"))  # type: ignore[method-assign,assignment]
REDIS_PORT = 44379
DNS_PORT = 44053  # the resolver's: port 53 is the whole machine's DNS, which is not the app's
RATE, MISSING_EVERY = 40, 10  # the client's GETs a second; one in ten asks for /missing
DB_RATE, SLOW_SQL_S = 20, 0.15  # pgbench's transactions a second; the slow statement's sleep
CACHE_RATE = 20  # the cache client's rounds a second (a SET and a GET each, pipelined)

# The slow database query: one statement in ten sleeps, as a query on a missing index would.
LOOKUP = "\\set aid random(1, 100000)\n"
FAST_SQL = LOOKUP + "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
SLOW_SQL = LOOKUP + f"SELECT pg_sleep({SLOW_SQL_S}), abalance FROM pgbench_accounts WHERE aid = :aid;\n"

# The app's cache client: every round, a DNS lookup of the cache's name (and, every fifth, of a name that
# does not exist), then a SET and a GET to Redis in one write; its own counts on stdout at the end.
CACHE_CLIENT = r"""
import json, socket, sys, time
import dns.message, dns.query, dns.rcode
rate, seconds, port, dns_port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts = {"lookups": 0, "nxdomain": 0, "commands": 0}
sock = None
start = time.time()
n = 0
while (due := start + n / rate) < start + seconds:
    time.sleep(max(0.0, due - time.time()))
    names = ["cache.mesh"] + (["nosuch.mesh"] if n % 5 == 0 else [])
    for name in names:
        answer = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=dns_port, timeout=2)
        counts["lookups"] += 1
        counts["nxdomain"] += answer.rcode() == dns.rcode.NXDOMAIN
        if name == "cache.mesh" and sock is None:
            sock = socket.create_connection((answer.answer[0][0].address, port))
    key = b"user:%d" % (n % 100)
    sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$2\r\nhi\r\n*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n"
                 % (len(key), key, len(key), key))
    got = b""
    while got.count(b"\r\n") < 3:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit(f"redis closed the connection: {got!r}")
        got += chunk
    counts["commands"] += 2
    n += 1
print(json.dumps(counts))
"""

# The seed's example as SQL over the store: p99 per normalised statement (the server's records) over the
# last 5 minutes, above 100 ms. The PxL-style script is the ready one, slow_sql.
SLOW_QUERIES_SQL = (HERE / "slow_queries.sql").read_text()


def spawn(service: str, cmd: list[str], quiet: bool = False) -> subprocess.Popen[str]:
    """A program in a service's namespace: its stdout kept (a load generator's counts) or discarded."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(mesh.in_ns(service, *cmd), stdout=out, stderr=out, text=True,
                            start_new_session=True)  # fmt: skip


@contextlib.contextmanager
def extras(work: Path) -> Iterator[None]:
    """Redis beside PostgreSQL (in the db's namespace) and dnsmasq in the app's, naming the cache."""
    db = mesh.LINK_BY_NAME["app->db"].right_ip
    redis = ["redis-server", "--port", str(REDIS_PORT), "--bind", db, "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--dir", str(work)]  # fmt: skip
    dnsmasq = ["dnsmasq", "--keep-in-foreground", f"--port={DNS_PORT}", "--listen-address=127.0.0.1",
               "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/mesh/", "--user=root",
               f"--host-record=cache.mesh,{db}", f"--host-record=db.mesh,{db}"]  # fmt: skip
    procs = [spawn("db", redis, quiet=True), spawn("app", dnsmasq, quiet=True)]
    try:
        deadline = time.monotonic() + 20
        while "LISTEN" not in mesh.run(*mesh.in_ns("db", "ss", "-tln", f"sport = :{REDIS_PORT}")).stdout:
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def traced(store: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    """bpfscope requests on the mesh's ports, Redis's and DNS's, every record into the store."""
    ports = [*mesh.PORTS.values(), REDIS_PORT, DNS_PORT]
    # (--no-tls: the app speaks no TLS, and OpenSSL's calls in the machine's other processes, whose
    # sockets the tracer never saw, would only be counted as plaintext it could not place)
    cmd = [*bpfscope_cmd(), "requests", "--store", str(store), "--json", "--no-tls",
           *(arg for port in ports for arg in ("--port", str(port)))]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if not line.startswith("Tracing"):
            raise RuntimeError(f"bpfscope requests did not start: {line}{proc.stderr.read()}")
        try:
            yield proc
        finally:
            time.sleep(0.5)  # the last responses' calls return
            proc.send_signal(signal.SIGINT)
            proc.stderr.read()
            proc.wait(timeout=120)


def load(work: Path, seconds: float) -> dict[str, Any]:
    """The three loads at once; each one's own count of what it did."""
    gateway = mesh.LINK_BY_NAME["client->gateway"].right_ip
    base = f"http://{gateway}:{mesh.PORTS['gateway']}"
    client = [sys.executable, str(MESH / "client.py")]
    small = spawn(
        "client", [*client, f"{base}/small", str(RATE * (1 - 1 / MISSING_EVERY)), "4", str(seconds)]
    )
    missing = spawn("client", [*client, f"{base}/missing", str(RATE / MISSING_EVERY), "1", str(seconds)])
    scripts = work / "sql"
    scripts.mkdir(exist_ok=True)
    scripts.chmod(0o755)
    (scripts / "fast.sql").write_text(FAST_SQL)
    (scripts / "slow.sql").write_text(SLOW_SQL)
    logs = work / "pgbench-log"
    logs.mkdir(exist_ok=True)
    logs.chmod(0o777)
    db = mesh.pgbench("-n", "-c", "4", "-R", str(DB_RATE), "-T", str(int(seconds)),
                      "-f", f"{scripts}/fast.sql@9", "-f", f"{scripts}/slow.sql@1",
                      "--log", f"--log-prefix={logs}/tx")  # fmt: skip
    cache = spawn(
        "app",
        [sys.executable, "-c", CACHE_CLIENT, str(CACHE_RATE), str(seconds), str(REDIS_PORT), str(DNS_PORT)],
    )
    small_out, _ = small.communicate(timeout=seconds + 120)
    missing_out, _ = missing.communicate(timeout=seconds + 120)
    _, db_err = db.communicate(timeout=seconds + 120)
    cache_out, cache_err = cache.communicate(timeout=seconds + 60)
    if db.returncode or cache.returncode:
        raise RuntimeError(f"the load failed: {db_err[-2000:]}{cache_err[-2000:]}")
    statuses: dict[str, dict[int, int]] = {}
    for path, out in (("/small", small_out), ("/missing", missing_out)):
        for line in out.splitlines():
            status = json.loads(line)["status"]
            statuses.setdefault(path, {}).setdefault(status, 0)
            statuses[path][status] += 1
    # pgbench's per-transaction log: client, transaction, latency (us), script number, epoch s, us, lag (us)
    tx = [line.split() for p in logs.glob("tx*") for line in p.read_text().splitlines()]
    # (with -R, a transaction's time includes how late it started: its schedule lag, the 7th field)
    slow = sorted(int(t[2]) - int(t[6]) for t in tx if t[3] == "1")
    return {
        "http": statuses,
        "sql": {
            "transactions": len(tx),
            "slow": len(slow),
            # (interpolated between ranks, as DuckDB's quantile_cont and px.quantiles do)
            "slow_p99_ms": float(numpy.quantile(slow, 0.99)) / 1e3 if slow else None,
        },
        "cache": json.loads(cache_out),
    }


def table(columns: list[str], rows: list[Any]) -> str:
    def cell(v: Any) -> str:
        return f"{v:,.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def questions(store: Store, start: float, end: float, out: Path) -> dict[str, Any]:
    """Pixie's tutorial's questions, answered from the store as a user would ask them."""
    smap = servicemap.build(store, start, end)
    (out / "service-map.svg").write_text(servicemap.svg(smap))
    (out / "service-map.html").write_text(servicemap.page(smap))
    answers: dict[str, Any] = {"service_map": {"columns": list(smap.COLUMNS), "rows": smap.rows()}}
    for script in ("slow_requests", "http_errors", "slow_sql", "dns_failures", "service_stats"):
        for name, columns, rows in run_script(script, store):
            answers[name] = {"columns": columns, "rows": [list(r) for r in rows]}
    con = store.connect()
    try:
        cursor = con.execute(SLOW_QUERIES_SQL)
        answers["slow_queries_sql"] = {"columns": [d[0] for d in cursor.description],
                                       "rows": [list(r) for r in cursor.fetchall()]}  # fmt: skip
    finally:
        con.close()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load lasts")
    parser.add_argument("--out", type=Path, default=HERE / "report")
    args = parser.parse_args()
    mesh.on_signals()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    subprocess.run(["rm", "-rf", str(store)], check=True)
    work = Path(f"/tmp/bpfscope-pixie-{time.time_ns()}")
    report: dict[str, Any] = {"seconds": args.seconds}
    try:
        with mesh.topology(), mesh.servers(work), extras(work):
            init = mesh.pgbench("-i", "-s", "1", "-q")
            init.communicate(timeout=120)
            print(f"the app is up; {args.seconds:.0f} s of load, traced", file=sys.stderr)
            with traced(store, out / "requests.jsonl"):
                start = time.time()
                report["clients"] = load(work, args.seconds)
                end = time.time()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    losses = [
        json.loads(line) for line in (out / "requests.jsonl").open() if line.startswith('{"record": "losses"')
    ]
    report["lost"] = {k: v for r in losses for k, v in r["reasons"].items() if v}
    report["window"] = [start, end]
    report["answers"] = questions(Store(store), start - 1, end + 1, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    md = [f"# Pixie's tutorial, answered by bpfscope ({args.seconds:.0f} s of load)\n",
          f"What the load generators counted: `{json.dumps(report['clients'])}`\n",
          f"Lost by the tracer, by reason: `{json.dumps(report['lost'])}`\n",
          "![service map](service-map.svg)\n"]  # fmt: skip
    for name, answer in report["answers"].items():
        md += [f"## {name}\n", table(answer["columns"], answer["rows"][:15]), ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"report: {out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
