"""experiments/pixie-tutorial end to end, in its short mode (8 s of load): the app's service map has
exactly its edges, with the load generators' own counts; HTTP errors by path, failed DNS lookups and the
slow SQL statement are found, each counted as its client counted it; the seed's "slow database queries"
gives the same answer as a PxL-style script and as SQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "experiments" / "pixie-tutorial" / "run.py"


def test_tutorial_answers_pixies_questions(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(RUN), "--seconds", "8", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    clients, answers = report["clients"], report["answers"]
    assert report["lost"] == {}, report["lost"]

    # The service map: exactly the app's edges, each with the requests its client made.
    http = clients["http"]
    # (status 0: a request still waiting for a worker when the time was up, never sent)
    assert set(http) == {"/small", "/missing"}, http
    assert set(http["/small"]) <= {"200", "0"} and set(http["/missing"]) <= {"404", "0"}, http
    gets = http["/small"]["200"] + http["/missing"]["404"]
    # (client program, server program, protocol): requests, by the client's own count
    truth = {
        ("python", "nginx", "http"): gets,  # the load generator to the gateway
        ("nginx", "haproxy", "http"): gets,
        ("haproxy", "nginx", "http"): gets,  # the sidecar to the app
        # (and each of pgbench's five connections' SSLRequest and startup: four clients and its first)
        ("pgbench", "postgres", "pgsql"): clients["sql"]["transactions"] + 2 * 5,
        ("python", "redis-server", "redis"): clients["cache"]["commands"],  # the cache client
        ("python", "dnsmasq", "dns"): clients["cache"]["lookups"],
    }
    columns = answers["service_map"]["columns"]
    edges = {}
    for row in answers["service_map"]["rows"]:
        edge = dict(zip(columns, row, strict=True))
        edges[(edge["client"].split()[0], edge["server"].split()[0], edge["protocol"])] = edge
    assert set(edges) == set(truth) and len(answers["service_map"]["rows"]) == len(truth), edges
    for key, expected in truth.items():
        assert abs(edges[key]["requests"] - expected) <= 0.05 * expected, (key, edges[key], expected)
        failed = {"http": http["/missing"]["404"], "dns": clients["cache"]["nxdomain"]}.get(key[2], 0)
        errors = 100.0 * failed / expected
        assert abs(edges[key]["error_pct"] - errors) <= 0.5, (key, edges[key], errors)

    # HTTP errors by path: /missing's 404s, once per server on the way (gateway, sidecar, app).
    errors = {(row[0], row[1]): row[2] for row in answers["http_errors"]["rows"]}
    assert errors == {("/missing", 404): 3 * http["/missing"]["404"]}, errors

    # Failed lookups: the name that does not exist, as often as the client asked.
    failures = answers["dns_failures"]["rows"]
    assert failures == [["nosuch.mesh", "A", "NXDOMAIN", clients["cache"]["nxdomain"]]], failures

    # Slow database queries: the sleeping statement alone, its p99 as pgbench timed it; the script and the
    # SQL agree.
    (query, count, p99_ms), *rest = answers["slow_queries"]["rows"]
    assert not rest and "pg_sleep" in query and "?" in query and count == clients["sql"]["slow"], query
    assert (
        p99_ms > 100 and abs(p99_ms - clients["sql"]["slow_p99_ms"]) <= 0.10 * clients["sql"]["slow_p99_ms"]
    )
    assert answers["slow_queries_sql"]["rows"] == [[query, count, p99_ms]]

    # The slowest endpoint is the app's only path with a body; the report and the pictures are written.
    assert (tmp_path / "service-map.svg").read_text().startswith("<svg")
    assert "service_map" in (tmp_path / "report.md").read_text()
