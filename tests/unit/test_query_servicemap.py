"""The service map from known records: both ends traced (joined by the connection, counted once), a
server whose clients were not traced, a client whose server was not (named from a DNS answer), error
rates, quantiles, rates over the window, and the picture."""

from __future__ import annotations

import time
from pathlib import Path

from test_query_pxl import http, pgsql

from bpfscope.domains.requests import records, servicemap, stats
from bpfscope.sinks.store import Store, StoreWriter

NOW = time.time()


def conn(record: dict, **fields: object) -> dict:
    return {**record, **fields}


def test_edges_nodes_rates_and_picture(tmp_path: Path) -> None:
    rows = []
    # A client (pid 20, 10.0.0.2) calling nginx (pid 10, 10.0.0.1:80) over one connection: both traced.
    for i in range(100):
        server = http(0, "/a", 500 if i < 5 else 200, 1 + i / 100)
        rows.append(conn(server, remote_addr="10.0.0.2", remote_port=40000))
        client = http(0, "/a", server["resp_status"], 2, role="client")
        rows.append(
            conn(client, local_addr="10.0.0.2", local_port=40000, remote_addr="10.0.0.1", remote_port=80)
        )
    # nginx's own untraced clients.
    rows += [conn(http(i, "/b", 200, 3), remote_addr="192.0.2.7", remote_port=50000 + i) for i in range(20)]
    # nginx calling a database that was not traced, known by a DNS answer.
    db = conn(pgsql("SELECT ?", 4), pid=10, comm="nginx", trace_role="client", local_addr="10.0.0.1",
              local_port=41000, remote_addr="10.9.9.9", remote_port=5432)  # fmt: skip
    rows += [db] * 30
    rows.append(records.DNS.record({**{k: db[k] for k in records.DNS.names if k in db}, "req_bytes": 1,
                "resp_bytes": 1, "req_header": {}, "req_body": {}, "resp_header": {}, "resp_body": {},
                "query_name": "db.internal", "query_type": "A", "rcode": "NOERROR",
                "answers": ["A 10.9.9.9"], "remote_addr": "10.0.0.53", "remote_port": 53}))  # fmt: skip
    writer = StoreWriter(tmp_path, (*records.SCHEMAS.values(), stats.CONN_STATS))
    writer.add(rows)
    writer.close()
    smap = servicemap.build(Store(tmp_path), NOW - 60, NOW)
    names = {n.id: n.name for n in smap.nodes}
    got = {(names[e.source], names[e.target], e.protocol): e for e in smap.edges}
    assert set(got) == {
        ("curl (10.0.0.2)", "nginx 10.0.0.1:80", "http"),
        ("192.0.2.7", "nginx 10.0.0.1:80", "http"),
        ("nginx 10.0.0.1:80", "db.internal:5432", "pgsql"),
        ("nginx 10.0.0.1:80", "10.0.0.53:53", "dns"),
    }
    both = got[("curl (10.0.0.2)", "nginx 10.0.0.1:80", "http")]
    assert both.requests == 100 and both.error_pct == 5.0  # once, not twice
    assert both.rps == 100 / 60 and abs(both.p50_ms - 1.495) < 0.01  # the server's latencies
    assert got[("192.0.2.7", "nginx 10.0.0.1:80", "http")].requests == 20
    assert got[("nginx 10.0.0.1:80", "db.internal:5432", "pgsql")].requests == 30
    picture = servicemap.svg(smap)
    assert picture.startswith("<svg") and "db.internal" in picture and picture.count("<line") == 4
    assert "<table>" in servicemap.page(smap)
