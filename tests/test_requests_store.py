"""bpfscope requests --store, read back with bpfscope query (SQL and PxL-style scripts): the stored
requests are the clients' requests, the HTTP errors by path are theirs, and conn_stats counts the
bytes the clients sent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from test_requests_http import PATHS, run_clients
from test_requests_servers import Nginx, Traced, nginx_server  # noqa: F401

from bpfscope.sinks.store import Store


def query(store: Path, *args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "query", "--store", str(store), "--json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_stored_requests_and_scripts_match_the_clients(nginx: Nginx, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Traced("--port", str(nginx.port), "--store", str(store), "1") as traced:
        _, truth = run_clients(nginx.port, processes=2, count=150)
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)
    (count,) = Store(store).query("SELECT count(*) FROM http_events WHERE trace_role = 'server'")[0]
    assert count == len(truth)
    errors = query(store, "--script", "http_errors")
    expected = Counter((t["path"], t["status"]) for t in truth if t["status"] >= 400)
    assert {(r["req_path"], r["resp_status"]): r["count"] for r in errors} == expected
    assert {r["display"] for r in errors} == {"http_errors"}
    # conn_stats: the server's connections received exactly what the clients sent.
    sent = sum(len(f"GET {p} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer secret\r\n\r\n") for p in
               (t["path"] for t in truth))  # fmt: skip
    rows = query(
        store,
        "SELECT max(bytes_recv) AS recv, max(conn_open) AS opened FROM conn_stats "
        f"WHERE trace_role = 'server' AND remote_port = {nginx.port}",
    )
    assert rows == [{"recv": sent, "opened": 2}]
    assert {r["name"] for r in query(store, "SELECT DISTINCT comm AS name FROM process_stats")} >= {"nginx"}
    stats = query(store, "--script", "service_stats")
    assert [(r["service"], r["requests"]) for r in stats] == [("nginx", len(truth))]
    assert PATHS  # the same paths as the accuracy test
