"""The service map of experiments/network-analysis's mesh (client -> gateway nginx -> sidecar haproxy
-> app nginx, and the app's pgbench -> PostgreSQL), each service in its own network namespace: exactly
its edges, with the request counts and rates of the clients' own logs (the load generator's JSON lines,
pgbench's per-transaction log) within 5%.

The mesh is the experiment's own code (mesh.py) under other names, addresses and ports (bsr-*,
10.244.N.*, 43080...), so that this test and the experiment's may run on one machine at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_requests_servers import Traced

from bpfscope.domains.requests import servicemap
from bpfscope.sinks.store import Store

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "network-analysis"
SECONDS = 8
RATE = 40  # GETs a second through the gateway
DB_RATE = 50  # pgbench transactions a second


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    sys.path.insert(0, str(EXPERIMENT))
    import mesh as mesh_module

    original = (mesh_module.NETNS, mesh_module.Link.subnet, mesh_module.Link.veths, mesh_module.PORTS)
    mesh_module.NETNS = {s: f"bsr-{s}" for s in mesh_module.SERVICES}
    mesh_module.PORTS = {s: port + 1000 for s, port in mesh_module.PORTS.items()}
    mesh_module.Link.subnet = property(lambda link: f"10.244.{link.number}.")  # type: ignore[method-assign]
    mesh_module.Link.veths = property(lambda link: (f"bsr{link.number}l", f"bsr{link.number}r"))  # type: ignore[method-assign]
    work = Path("/tmp") / f"bpfscope-map-{time.time_ns()}"
    try:
        with mesh_module.topology(), mesh_module.servers(work) as servers:
            mesh_module.pgbench("-i", "-s", "1", "-q").communicate(timeout=120)
            yield mesh_module, servers
    finally:
        mesh_module.NETNS, mesh_module.Link.subnet, mesh_module.Link.veths, mesh_module.PORTS = original
        sys.path.remove(str(EXPERIMENT))
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_service_map_of_the_mesh(mesh: tuple, tmp_path: Path) -> None:
    m, _ = mesh
    store = tmp_path / "store"
    gateway = m.LINK_BY_NAME["client->gateway"]
    url = f"http://{gateway.right_ip}:{m.PORTS['gateway']}/small"
    logs = Path(f"/tmp/bpfscope-map-pgb-{time.time_ns()}")
    logs.mkdir()
    logs.chmod(0o777)
    ports = [arg for port in m.PORTS.values() for arg in ("--port", str(port))]
    with Traced("--store", str(store), "--no-tls", *ports) as traced:
        start = time.time()
        db = m.pgbench(
            "-S", "-c", "2", "-R", str(DB_RATE), "-T", str(SECONDS), "--log", f"--log-prefix={logs}/pgb"
        )
        load = [sys.executable, str(EXPERIMENT / "client.py"), url, str(RATE), "4", str(SECONDS)]
        client = subprocess.run(
            m.in_ns("client", *load), capture_output=True, text=True, timeout=120, check=True
        )
        db.communicate(timeout=120)
        end = time.time()
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)
    requests = [json.loads(line) for line in client.stdout.splitlines() if line.strip()]
    ok = [r for r in requests if r["status"] == 200]
    transactions = sum(len(p.read_text().splitlines()) for p in logs.glob("pgb*"))
    subprocess.run(["rm", "-rf", str(logs)], check=False)
    # (a request still waiting for a worker when the time is up is logged unsent, status 0). pgbench -R
    # starts transactions as a Poisson process: 400 expected, give or take 20 (356 once, in a full run).
    assert len(ok) >= RATE * SECONDS * 0.9 and transactions >= DB_RATE * SECONDS * 0.75

    smap = servicemap.build(Store(store), start - 1, end + 1)
    names = {n.id: n.name for n in smap.nodes}
    edges = {(names[e.source], names[e.target]): e for e in smap.edges}
    addr = {s: m.LINK_BY_NAME[n].right_ip for s, n in
            (("gateway", "client->gateway"), ("sidecar", "gateway->sidecar"), ("app", "sidecar->app"),
             ("db", "app->db"))}  # fmt: skip
    gw, sc, app, pg = (f"{addr[s]}:{m.PORTS[s]}" for s in ("gateway", "sidecar", "app", "db"))
    client_addr, app_addr = gateway.left_ip, m.LINK_BY_NAME["app->db"].left_ip
    assert set(edges) == {
        (f"python ({client_addr})", f"nginx {gw}"),
        (f"nginx {gw}", f"haproxy {sc}"),
        (f"haproxy {sc}", f"nginx {app}"),
        (f"pgbench ({app_addr})", f"postgres {pg}"),
    }
    window = end + 1 - (start - 1)
    for (source, target), edge in edges.items():
        truth = transactions if target.startswith("postgres") else len(ok)
        assert abs(edge.requests - truth) <= 0.05 * truth, (source, target, edge.requests, truth)
        assert abs(edge.rps - truth / window) <= 0.05 * truth / window
        assert edge.error_pct == 0 and edge.p50_ms <= edge.p99_ms
