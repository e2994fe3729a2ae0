"""The PxL-style DataFrame API compiled to DuckDB, on a store of known records: filters, new columns,
groupby with quantiles, merge, head, the ready scripts, and values bound as parameters (a value that
looks like SQL stays a value)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bpfscope.domains.requests import pxl, records, scripting, stats
from bpfscope.errors import BpfscopeError
from bpfscope.sinks.store import Store, StoreWriter

NOW = time.time()


def http(i: int, path: str, status: int, latency_ms: float, role: str = "server", age_s: float = 10) -> dict:
    return records.HTTP.record(
        {
            "ts": NOW - age_s, "pid": 10 if role == "server" else 20,
            "comm": "nginx" if role == "server" else "curl",
            "cgroup": 0, "remote_addr": "10.0.0.2", "remote_port": 40000 + i, "local_addr": "10.0.0.1",
            "local_port": 80, "trace_role": role, "encrypted": False, "latency": int(latency_ms * 1e6),
            "req_bytes": 100, "resp_bytes": 200, "major_version": 1, "minor_version": 1, "content_type": "",
            "req_headers": {}, "req_method": "GET", "req_path": path, "req_body": "", "req_body_size": 0,
            "resp_headers": {}, "resp_status": status, "resp_message": "", "resp_body": "",
            "resp_body_size": 0,
        }
    )  # fmt: skip


def pgsql(query: str, latency_ms: float, error: str = "") -> dict:
    return records.PGSQL.record(
        {
            "ts": NOW - 5, "pid": 30, "comm": "postgres", "cgroup": 0, "remote_addr": "10.0.0.3",
            "remote_port": 50000, "local_addr": "10.0.0.4", "local_port": 5432, "trace_role": "server",
            "encrypted": False, "latency": int(latency_ms * 1e6), "req_bytes": 50, "resp_bytes": 60,
            "req_cmd": "Query", "req": query, "resp": error or "SELECT 1", "error": error, "rows": 1,
        }
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    rows = [http(i, "/a", 200, 1 + i % 10) for i in range(100)]
    rows += [http(i, "/b", 404, 2) for i in range(7)] + [http(i, "/c", 503, 50) for i in range(3)]
    rows += [http(0, "/old", 500, 1, age_s=3600)]  # outside -5m
    rows += [http(i, "/a", 200, 1, role="client") for i in range(5)]
    rows += [pgsql("SELECT pg_sleep(?)", 150 + i) for i in range(4)] + [
        pgsql("SELECT ?", 1) for i in range(50)
    ]
    writer = StoreWriter(tmp_path, (*records.SCHEMAS.values(), stats.CONN_STATS, stats.PROCESS_STATS))
    writer.add(rows)
    writer.close()
    return Store(tmp_path)


def run(store: Store, source: str) -> dict[str, list[dict]]:
    return {
        name: [dict(zip(columns, row, strict=True)) for row in rows]
        for name, columns, rows in pxl.run_script(source, store)
    }


def test_filter_columns_groupby_quantiles(store: Store) -> None:
    out = run(
        store,
        """
import px
df = px.DataFrame(table='http_events', start_time='-5m')
df = df[df.trace_role == 'server']
df.failure = df.resp_status >= 400
df = df.groupby(['req_path', 'failure']).agg(n=('latency', px.count), lat=('latency', px.quantiles))
df.p50_ms = px.pluck_float64(df.lat, 'p50') / 1e6
px.display(df.drop('lat').sort('req_path'), 'paths')
""",
    )
    assert [(r["req_path"], r["failure"], r["n"]) for r in out["paths"]] == [
        ("/a", False, 100),
        ("/b", True, 7),
        ("/c", True, 3),
    ]
    assert out["paths"][0]["p50_ms"] == pytest.approx(5.5, abs=0.6)


def test_merge_head_and_time_aliases(store: Store) -> None:
    out = run(
        store,
        """
import px
columns = ['req_path', 'resp_status', 'trace_role']
servers = px.DataFrame(table='http_events', start_time='-5m', select=columns)
servers = servers[servers.trace_role == 'server']
names = px.DataFrame(table='http_events', start_time='-5m')
names = names[names.trace_role == 'client'].groupby('req_path').agg(clients=('latency', px.count))
joined = servers.merge(names, how='inner', left_on='req_path', right_on='req_path', suffixes=['', '_c'])
px.display(joined.head(3), 'joined')
t = px.DataFrame(table='http_events', start_time='-5m')
t.window = px.bin(t.time_, px.seconds(10))
px.display(t.agg(n=('upid', px.count)), 'all')
""",
    )
    assert len(out["joined"]) == 3 and all(r["clients"] == 5 for r in out["joined"])
    assert out["all"] == [{"n": 115}]


def test_values_are_parameters_not_sql(store: Store) -> None:
    out = run(
        store,
        """
import px
df = px.DataFrame(table='http_events')
px.display(df[df.req_path == "/a' OR '1'='1"], 'none')
""",
    )
    assert out["none"] == []
    with pytest.raises(BpfscopeError):
        run(store, "import px\npx.display(px.DataFrame(table='http_events; DROP TABLE x'))")
    with pytest.raises(BpfscopeError):
        run(store, "import px\ndf = px.DataFrame(table='http_events')\npx.display(df[['a\" FROM x --']])")


def test_ready_scripts(store: Store) -> None:
    slow = scripting.run("slow_sql", store)
    assert [(row[0], row[1]) for _, _, rows in slow for row in rows] == [("SELECT pg_sleep(?)", 4)]
    errors = scripting.run("http_errors", store)[0][2]
    assert {(r[0], r[1], r[2]) for r in errors} == {("/b", 404, 7), ("/c", 503, 3)}
    for name in scripting.ready_scripts():
        scripting.run(name, store)  # every ready script runs, on tables present or not


def test_script_mistakes_are_one_line(store: Store) -> None:
    with pytest.raises(BpfscopeError, match="query failed"):
        run(store, "import px\npx.display(px.DataFrame(table='http_events')[['nosuch']])")
    with pytest.raises(BpfscopeError, match="no table"):
        run(store, "import px\npx.display(px.DataFrame(table='nosuch'))")
    with pytest.raises(BpfscopeError, match=":2: invalid syntax"):
        run(store, "import px\ndef (:")
    with pytest.raises(BpfscopeError, match=":3: NameError"):
        run(store, "import px\n\nnosuch.DataFrame()")
