"""The service map: who calls whom, from the request tables in the store.

Nodes are services. Outside Kubernetes a traced process is named by its command and the address it
listens on (``nginx 10.0.0.2:80``), or the address it calls from when it serves nothing; a peer that was
not traced is its address, named from the DNS answers captured (``db.internal:5432``) when one maps to
it. Edges are a client's requests to a server: requests per second, error rate (HTTP status >= 400, a
PostgreSQL, MySQL or Redis error, a DNS rcode other than NOERROR), p50 and p99 latency, bytes both ways.

When both ends of a connection are traced, each request is in the tables twice (the client's record and
the server's): the two are joined by the connection's addresses and ports, the edge is counted once,
from the server's records (the server's latency), and its client is the traced client process.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

# A socket bound to any address (an unconnected UDP client's) is joined to its peer by ports alone.
WILDCARDS = "('0.0.0.0', '::')"

# Each table's failure: what counts in an edge's error rate.
FAILED = {
    "http_events": "resp_status >= 400",
    "pgsql_events": "error <> ''",
    "redis_events": "error <> ''",
    "mysql_events": "error <> ''",
    "dns_events": "rcode NOT IN ('NOERROR', '')",
}


@dataclass
class Node:
    id: str
    name: str
    pid: int = 0
    traced: bool = False
    endpoints: list[str] = field(default_factory=list)


@dataclass
class Edge:
    source: str
    target: str
    protocol: str
    requests: int
    rps: float
    error_pct: float
    p50_ms: float
    p99_ms: float
    bytes: int


@dataclass
class ServiceMap:
    nodes: list[Node]
    edges: list[Edge]
    window_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [asdict(e) for e in self.edges],
        }

    def rows(self) -> list[list[Any]]:
        names = {n.id: n.name for n in self.nodes}
        return [
            [names[e.source], names[e.target], e.protocol, e.requests, round(e.rps, 2), round(e.error_pct, 2),
             round(e.p50_ms, 3), round(e.p99_ms, 3), e.bytes]
            for e in self.edges
        ]  # fmt: skip

    COLUMNS = ("client", "server", "protocol", "requests", "rps", "error_pct", "p50_ms", "p99_ms", "bytes")


def _union(tables: list[str]) -> str:
    parts = [
        f"SELECT '{t.removesuffix('_events')}' AS protocol, ts, pid, comm, local_addr, local_port, "
        f"remote_addr, remote_port, trace_role, latency, req_bytes + resp_bytes AS bytes, "
        f"({FAILED[t]}) AS failed "
        f'FROM "{t}" WHERE ts >= ? AND ts < ?'
        for t in tables
    ]
    return " UNION ALL ".join(parts)


def build(store: Any, start: float, end: float) -> ServiceMap:
    """The map of the requests completed in [start, end)."""
    present = set(store.tables())
    tables = [t for t in FAILED if t in present]
    if not tables:
        return ServiceMap([], [], end - start)
    con = store.connect(only=sorted({*tables, "dns_events"}))
    try:
        # Every query below reads r: the tables' rows of the window, in one shape.
        r = f"WITH r AS ({_union(tables)}) "
        window = [v for _ in tables for v in (start, end)]
        listening = con.execute(
            r + "SELECT pid, local_addr || ':' || local_port, count(*) FROM r WHERE trace_role = 'server' "
            "GROUP BY ALL ORDER BY 3 DESC, 2",
            window,
        ).fetchall()
        # (an unconnected UDP socket's own address is the wildcard: a resolver's client)
        sql = r + (
            f"SELECT pid, coalesce(min(local_addr) FILTER (WHERE local_addr NOT IN {WILDCARDS}), "
            "min(local_addr)) FROM r WHERE trace_role = 'client' GROUP BY pid"
        )
        calling = dict(con.execute(sql, window).fetchall())
        served: dict[int, list[str]] = defaultdict(list)
        for pid, endpoint, _ in listening:
            served[pid].append(endpoint)
        # A service is a program and where it listens (or calls from when it serves nothing): nginx's
        # workers, PostgreSQL's backend per connection, a server's forked children are one node, and
        # its edges' quantiles are over all their requests.
        places = {pid: served[pid][0] if served.get(pid) else f"({calling.get(pid, '')})"
                  for pid in {*served, *calling}}  # fmt: skip
        values = ", ".join("(?::BIGINT, ?::VARCHAR)" for _ in places) or "(0::BIGINT, ''::VARCHAR)"
        # A server's row is joined to its client's row by the connection (each side's addresses and ports
        # crossed); a client row whose server was not traced makes an edge of its own.
        edges = con.execute(
            r
            + f"""
            , places(pid, place) AS (VALUES {values}),
            s AS (SELECT * FROM r WHERE trace_role = 'server'),
            c AS (SELECT * FROM r WHERE trace_role = 'client'),
            conns AS (SELECT DISTINCT pid AS cpid, comm AS ccomm, local_addr, local_port,
                             remote_addr, remote_port FROM c),
            served AS (
                SELECT s.protocol, s.pid AS spid, s.comm AS scomm, '' AS saddr, 0 AS sport,
                       coalesce(conns.cpid, 0) AS cpid, coalesce(conns.ccomm, '') AS ccomm,
                       s.remote_addr AS caddr, s.latency, s.failed, s.bytes
                FROM s LEFT JOIN conns
                ON (conns.local_addr = s.remote_addr OR conns.local_addr IN {WILDCARDS})
                   AND conns.local_port = s.remote_port
                   AND conns.remote_addr = s.local_addr AND conns.remote_port = s.local_port),
            called AS (
                SELECT c.protocol, 0 AS spid, '' AS scomm, c.remote_addr AS saddr, c.remote_port AS sport,
                       c.pid AS cpid, c.comm AS ccomm, c.local_addr AS caddr, c.latency, c.failed, c.bytes
                FROM c WHERE NOT EXISTS (
                    SELECT 1 FROM s WHERE s.local_addr = c.remote_addr AND s.local_port = c.remote_port
                    AND (s.remote_addr = c.local_addr OR c.local_addr IN {WILDCARDS})
                    AND s.remote_port = c.local_port))
            SELECT e.protocol, e.scomm, coalesce(sp.place, ''), e.saddr, e.sport, e.ccomm,
                   coalesce(cp.place, ''), CASE WHEN e.cpid = 0 THEN e.caddr ELSE '' END,
                   min(e.spid), min(e.cpid), count(*), sum(e.failed::INT),
                   quantile_cont(e.latency, 0.5), quantile_cont(e.latency, 0.99), sum(e.bytes)
            FROM (SELECT * FROM served UNION ALL SELECT * FROM called) e
            LEFT JOIN places sp ON sp.pid = e.spid LEFT JOIN places cp ON cp.pid = e.cpid
            GROUP BY ALL ORDER BY ALL
            """,
            [*window, *(v for item in places.items() for v in item)],
        ).fetchall()
        dns_names = _dns_names(con, start, end) if "dns_events" in present else {}
    finally:
        con.close()
    return _assemble(edges, served, dns_names, end - start)


def _dns_names(con: Any, start: float, end: float) -> dict[str, str]:
    """Address -> the name a captured DNS answer gave it."""
    names: dict[str, str] = {}
    for name, answers in con.execute(
        "SELECT query_name, answers FROM dns_events WHERE ts >= ? AND ts < ? AND rcode = 'NOERROR'",
        [start, end],
    ).fetchall():
        for answer in json.loads(answers) if isinstance(answers, str) else answers:
            kind, _, value = answer.partition(" ")
            if kind in ("A", "AAAA"):
                names[value] = name
    return names


def _assemble(
    rows: list[tuple],
    served: dict[int, list[str]],
    dns_names: dict[str, str],
    window_s: float,
) -> ServiceMap:
    nodes: dict[str, Node] = {}

    def process(comm: str, place: str, pid: int) -> str:
        node_id = f"svc:{comm} {place}"
        if node_id not in nodes:
            nodes[node_id] = Node(node_id, f"{comm} {place}", pid, True, served.get(pid, []))
        return node_id

    def address(addr: str, port: int = 0) -> str:
        endpoint = f"{addr}:{port}" if port else addr
        node_id = f"addr:{endpoint}"
        if node_id not in nodes:
            name = dns_names.get(addr, addr) + (f":{port}" if port else "")
            nodes[node_id] = Node(node_id, name, endpoints=[endpoint])
        return node_id

    edges = []
    for row in rows:
        protocol, scomm, splace, saddr, sport, ccomm, cplace, caddr, spid, cpid = row[:10]
        n, failed, p50, p99, nbytes = row[10:]
        target = process(scomm, splace, spid) if spid else address(saddr, sport)
        source = process(ccomm, cplace, cpid) if cpid else address(caddr)
        rps = n / window_s if window_s > 0 else 0.0
        edges.append(Edge(source, target, protocol, n, rps, 100.0 * (failed or 0) / n, (p50 or 0) / 1e6,
                          (p99 or 0) / 1e6, nbytes or 0))  # fmt: skip
    return ServiceMap(sorted(nodes.values(), key=lambda n: n.id), edges, window_s)


# --- the picture --------------------------------------------------------------------------------------
def _layers(smap: ServiceMap) -> dict[str, int]:
    """Each node's column: its longest path from a node nobody calls."""
    callers = defaultdict(set)
    for e in smap.edges:
        if e.source != e.target:
            callers[e.target].add(e.source)
    depth: dict[str, int] = {}

    def visit(node: str, seen: frozenset[str]) -> int:
        if node not in depth:
            depth[node] = 1 + max((visit(c, seen | {node}) for c in callers[node] - seen), default=-1)
        return depth[node]

    for n in smap.nodes:
        visit(n.id, frozenset())
    return depth


def svg(smap: ServiceMap) -> str:
    """The map as an SVG picture: services in columns, left to right as requests flow, each edge labelled
    with its rate, errors and p99."""
    depth = _layers(smap)
    columns: dict[int, list[Node]] = defaultdict(list)
    for node in smap.nodes:
        columns[depth[node.id]].append(node)
    box_w, box_h, gap_x, gap_y, margin = 220, 54, 130, 40, 30
    place: dict[str, tuple[int, int]] = {}
    for col, nodes in sorted(columns.items()):
        for row, node in enumerate(nodes):
            place[node.id] = (margin + col * (box_w + gap_x), margin + row * (box_h + gap_y))
    width = margin * 2 + (max(columns, default=0) + 1) * (box_w + gap_x) - gap_x
    height = margin * 2 + max((len(v) for v in columns.values()), default=1) * (box_h + gap_y) - gap_y + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    ]
    for e in smap.edges:
        (x1, y1), (x2, y2) = place[e.source], place[e.target]
        sx, sy, tx, ty = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        colour = "#c0392b" if e.error_pct >= 5 else "#555"
        label = f"{e.protocol} {e.rps:.1f}/s err {e.error_pct:.1f}% p99 {e.p99_ms:.1f} ms"
        out.append(f'<line x1="{sx}" y1="{sy}" x2="{tx}" y2="{ty}" stroke="{colour}" stroke-width="2" '
                   'marker-end="url(#arrow)"/>')  # fmt: skip
        out.append(f'<text x="{(sx + tx) / 2}" y="{(sy + ty) / 2 - 6}" text-anchor="middle" fill="{colour}">'
                   f"{html.escape(label)}</text>")  # fmt: skip
    for node in smap.nodes:
        x, y = place[node.id]
        fill = "#eaf2fb" if node.traced else "#f4f4f4"
        name, _, where = node.name.partition(" ")
        out.append(
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="8" fill="{fill}" stroke="#34495e"/>'
        )
        out.append(f'<text x="{x + box_w / 2}" y="{y + 22}" text-anchor="middle" font-weight="bold">'
                   f"{html.escape(name)}</text>")  # fmt: skip
        out.append(f'<text x="{x + box_w / 2}" y="{y + 40}" text-anchor="middle">{html.escape(where)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def page(smap: ServiceMap, title: str = "Service map") -> str:
    """An HTML page: the picture and the table of edges."""
    head = "".join(f"<th>{c}</th>" for c in ServiceMap.COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in smap.rows()
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(smap.nodes)} services, {len(smap.edges)} edges over "
        f"{smap.window_s:.0f} s</p>{svg(smap)}<table><tr>{head}</tr>{body}</table></body></html>"
    )


__all__ = ["Edge", "Node", "ServiceMap", "build", "page", "svg"]
