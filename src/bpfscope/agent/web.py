"""The agent's web server: the UI (static pages, no build step), a read-only JSON API over the store,
and /metrics for Prometheus.

Read-only by construction: every route is a GET (anything else is 405) and the store is only ever
queried. Every value a request brings into a query is a bound parameter, never SQL text: table and
column names come from this module alone. Off loopback every route but the static pages needs
``Authorization: Bearer TOKEN`` (compared in constant time); the pages carry no data and send the token
from their URL's fragment, which browsers never send to a server.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfscope.sinks.store import Store, retried

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from bpfscope.agent.service import Agent

UI = Path(__file__).with_name("ui")
# How far back a page may look (minutes), and how many rows a table returns at most.
MAX_MINUTES = 7 * 24 * 60
MAX_ROWS = 1000
# DuckDB's memory for one page's query, at most (its default is 80% of the machine's RAM, inside the
# agent's process): a page over a week of requests spills to disk or fails rather than growing the agent.
QUERY_MEMORY_LIMIT = "256MB"
# Scripts inline only in the flame graph's document (the profile domain's self-contained page, shown in
# a srcdoc frame, which inherits this policy); every value is placed with textContent, never as markup.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'"
)


class BadRequest(Exception):
    pass


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return value


def _span(request: Request) -> tuple[float, float]:
    """[start, end) in epoch seconds: ``start``/``end``, or the last ``minutes`` (60 by default)."""
    now = time.time()
    end = _number(request, "end", now, 0, now + 86400)
    minutes = _number(request, "minutes", 60, 1, MAX_MINUTES)
    start = _number(request, "start", end - minutes * 60, 0, end)
    return start, end


class Api:
    """The queries behind the pages, each on a fresh read of the store (files flushed so far)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @property
    def store(self) -> Store:
        return Store(self.agent.config.store.path)

    def _rows(self, table: str, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        """``sql`` over ``table`` (a name from this module), as dictionaries; nothing if it is empty."""
        store = self.store
        if table not in store.tables():
            return []

        def read() -> list[dict[str, Any]]:
            con = store.connect(only=[table], memory_limit=QUERY_MEMORY_LIMIT)
            try:
                cursor = con.execute(sql, params)
                names = [d[0] for d in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            except Exception as exc:  # a table with no file flushed yet has no view
                if "does not exist" in str(exc):
                    return []
                raise
            finally:
                con.close()

        return retried(read)

    def health(self, start: float, end: float) -> dict[str, Any]:
        rows = self._rows(
            "check.row",
            'SELECT ts, resource, metric, value, unit, text, verdict, threshold, detail FROM "check.row" '
            "WHERE ts >= ? AND ts < ? ORDER BY ts",
            [start, end],
        )
        series: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            entry = series.setdefault((r["resource"], r["metric"]), {"history": []})
            entry.update(r)  # the latest row describes the series
            entry["history"].append([r["ts"], r["value"], r["verdict"]])
        # The latest window's verdicts, as `bpfscope check` would print them now (a window's rows share
        # its ts): a series missing from it (a disk gone, a connection closed, a row only a loaded
        # window has) has no verdict now, and showing its last one would pass an old verdict for a
        # current one. Its history stays in the store.
        latest = max((r["ts"] for r in rows), default=None)
        current = [entry for entry in series.values() if entry["ts"] == latest]
        summary = self._rows(
            "check.summary",
            'SELECT ts, summary, problem FROM "check.summary" WHERE ts >= ? AND ts < ? '
            "ORDER BY ts DESC LIMIT 1",
            [start, end],
        )
        return {"rows": current, "summary": summary[0] if summary else None}

    def disks(self, start: float, end: float) -> dict[str, Any]:
        rows = self._rows(
            "agent.disk_latency",
            'SELECT ts, interval_s, disk, count, buckets FROM "agent.disk_latency" '
            "WHERE ts >= ? AND ts < ? ORDER BY ts",
            [start, end],
        )
        disks: dict[str, list[Any]] = defaultdict(list)
        for r in rows:
            buckets = json.loads(r["buckets"]) if isinstance(r["buckets"], str) else r["buckets"]
            disks[r["disk"]].append([r["ts"], r["interval_s"], {int(k): v for k, v in buckets.items()}])
        return {"disks": disks}

    def requests(self, request: Request, start: float, end: float) -> dict[str, Any]:
        """HTTP exchanges, newest first, filtered by the query string (each filter a bound parameter)."""
        where, params = ["ts >= ?", "ts < ?"], [start, end]
        q = request.query_params
        for key, column in (("method", "req_method"), ("comm", "comm"), ("role", "trace_role")):
            if q.get(key):
                where.append(f"{column} = ?")
                params.append(q[key])
        if q.get("status"):
            status = int(_number(request, "status", 0, 100, 599))
            where.append("resp_status = ?")
            params.append(status)
        if q.get("path"):
            where.append("contains(req_path, ?)")
            params.append(q["path"])
        min_ms = _number(request, "min_latency_ms", 0, 0, 3.6e6)
        if min_ms:
            where.append("latency >= ?")
            params.append(int(min_ms * 1e6))
        limit = int(_number(request, "limit", 200, 1, MAX_ROWS))
        rows = self._rows(
            "http_events",
            "SELECT ts, pid, comm, trace_role, remote_addr, remote_port, local_port, req_method, req_path, "
            f'resp_status, latency, req_bytes, resp_bytes FROM "http_events" WHERE {" AND ".join(where)} '
            "ORDER BY ts DESC LIMIT ?",
            [*params, limit],
        )
        return {"requests": rows}

    def services(self, start: float, end: float) -> dict[str, Any]:
        """The service map. A server is a process listening on a port, named ``comm:port`` from its
        server-side records; a client is named after the server it also is, or its process name. An
        edge is a client's requests to a server, with their rate, errors and latency; where only the
        server side was seen, the client is its peer's address."""
        rows = self._rows(
            "http_events",
            "SELECT trace_role, pid, comm, local_port, remote_addr, remote_port, count(*) AS requests, "
            "count(*) FILTER (WHERE resp_status >= 500) AS errors, min(ts) AS first_ts, "
            "quantile_cont(latency, 0.5) AS p50_ns, quantile_cont(latency, 0.99) AS p99_ns "
            'FROM "http_events" WHERE ts >= ? AND ts < ? AND trace_role IN (?, ?) '
            "GROUP BY ALL ORDER BY requests DESC LIMIT ?",
            [start, end, "client", "server", MAX_ROWS],
        )
        servers = {
            r["local_port"]: f"{r['comm']}:{r['local_port']}" for r in rows if r["trace_role"] == "server"
        }
        serving = {r["pid"]: servers[r["local_port"]] for r in rows if r["trace_role"] == "server"}
        called = {r["remote_port"] for r in rows if r["trace_role"] == "client"}
        seconds = max(end - max(start, min((r["first_ts"] for r in rows), default=start)), 1.0)
        edges: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            if r["trace_role"] == "client":
                source = serving.get(r["pid"], r["comm"])
                target = servers.get(r["remote_port"], f"{r['remote_addr']}:{r['remote_port']}")
            elif r["local_port"] not in called:  # a server whose clients were not traced
                source, target = r["remote_addr"], servers[r["local_port"]]
            else:
                continue  # the client side says it
            edge = edges.setdefault(
                (source, target),
                {
                    "source": source,
                    "target": target,
                    "requests": 0,
                    "errors": 0,
                    "p50_ms": 0.0,
                    "p99_ms": 0.0,
                },
            )
            edge["requests"] += r["requests"]
            edge["errors"] += r["errors"]
            edge["p50_ms"] = max(edge["p50_ms"], (r["p50_ns"] or 0) / 1e6)
            edge["p99_ms"] = max(edge["p99_ms"], (r["p99_ns"] or 0) / 1e6)
        for edge in edges.values():
            edge["rate"] = edge["requests"] / seconds
        nodes = sorted({name for edge in edges.values() for name in (edge["source"], edge["target"])})
        return {"nodes": nodes, "edges": list(edges.values())}

    def windows(self, start: float, end: float) -> dict[str, Any]:
        rows = self._rows(
            "profile.window",
            'SELECT ts, interval_s, samples FROM "profile.window" '
            "WHERE profile = ? AND ts >= ? AND ts < ? ORDER BY ts",
            ["cpu", start, end],
        )
        return {"windows": rows}

    def flamegraph(self, request: Request) -> str:
        """The profile domain's flame graph of a time range; with ``base_start``/``base_end`` a
        differential one against that range."""
        from bpfscope.domains.profile import flamegraph
        from bpfscope.domains.profile.diff import from_store

        start, end = _span(request)
        pid = int(_number(request, "pid", 0, 0, 1 << 22)) or None
        profile = from_store(str(self.store.path), f"{start}..{end}", pid)
        clock = [time.strftime("%H:%M:%S", time.localtime(t)) for t in (start, end)]
        title = f"on-CPU, {clock[0]} to {clock[1]}"
        if request.query_params.get("base_start"):
            base_start = _number(request, "base_start", 0, 0, end)
            base_end = _number(request, "base_end", base_start + 60, base_start, end + 86400)
            baseline = from_store(str(self.store.path), f"{base_start}..{base_end}", pid)
            return flamegraph.html(profile, title + " against the baseline", baseline=baseline)
        return flamegraph.html(profile, title)

    def security(self, request: Request, start: float, end: float) -> dict[str, Any]:
        kinds = ("process_exec", "process_exit", "process_tracepoint")
        wanted = request.query_params.get("kind")
        if wanted and wanted not in kinds:
            raise BadRequest(f"kind must be one of {', '.join(kinds)}")
        limit = int(_number(request, "limit", 200, 1, MAX_ROWS))
        text = request.query_params.get("process", "")
        events = []
        for kind in [wanted] if wanted else kinds:
            where, params = "ts >= ? AND ts < ?", [start, end]
            if text:  # only then is each event's JSON read for its command
                binary, arguments = (
                    f"coalesce(json_extract_string(\"{kind}\", '$.process.{key}'), '')"
                    for key in ("binary", "arguments")
                )
                where += f" AND contains({binary} || ' ' || {arguments}, ?)"
                params.append(text)
            # The newest events' times first, then only their bodies: ordering the bodies themselves (an
            # exit with its ancestors is 23 kB) held every candidate row, and after a storm of exits
            # the page failed DuckDB's memory limit (15,000 exits: out of memory at 256 MB; this way
            # 0.04 s). A command filter still reads every body of the span, in DuckDB's vectors of 2,048
            # rows: bounded by that, not by the storm's length.
            table = f'"secure.{kind}"'
            newest = self._rows(
                f"secure.{kind}",
                f"SELECT min(ts) AS since FROM "
                f"(SELECT ts FROM {table} WHERE {where} ORDER BY ts DESC LIMIT ?)",
                [*params, limit],
            )
            if not newest or newest[0]["since"] is None:
                continue
            rows = self._rows(
                f"secure.{kind}",
                f'SELECT ts, "{kind}" AS body FROM {table} '
                f"WHERE {where} AND ts >= ? ORDER BY ts DESC LIMIT ?",
                [*params, newest[0]["since"], limit],
            )
            events += [{"ts": r["ts"], "kind": kind, **json.loads(r["body"])} for r in rows]
        if self.agent.pods is not None:
            events = [self.agent.pods.annotate(e) for e in events]
        events.sort(key=lambda e: -e["ts"])
        return {"events": events[:limit]}

    def status(self) -> dict[str, Any]:
        agent = self.agent
        store = self.store
        return {
            "node": agent.config.node_name,
            "started": agent.started,
            # As the loop last read them (every flush interval): losses() is not for this thread.
            "collectors": agent.states,
            "unavailable": agent.unavailable,
            "kubernetes": None
            if agent.pods is None
            else {"pods": len(agent.pods.pods), "failures": agent.pods.failures},
            "store": {"path": str(store.path), "bytes": store.size(), "tables": store.tables()},
        }


def make_app(agent: Agent, token: str | None) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    api = Api(agent)

    def route(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A GET handler run in a worker thread (DuckDB blocks), its answer as JSON; a bad parameter
        is 400 with the reason."""
        from starlette.concurrency import run_in_threadpool

        async def endpoint(request: Request) -> Response:
            try:
                result = await run_in_threadpool(handler, request)
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return endpoint

    def metrics(request: Request) -> Response:
        if agent.prometheus is None:
            return PlainTextResponse("the Prometheus exporter is off\n", status_code=404)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(agent.prometheus.exposition(), media_type=CONTENT_TYPE_LATEST)

    def flame(request: Request) -> Response:
        return HTMLResponse(api.flamegraph(request))

    class Guard(BaseHTTPMiddleware):
        """The bearer token (when one is set) on everything but the static pages; security headers."""

        async def dispatch(self, request: Request, call_next: Any) -> Response:
            public = request.url.path == "/" or request.url.path.startswith("/ui/")
            if token is not None and not public:
                sent = request.headers.get("authorization", "")
                if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                    return JSONResponse(
                        {"error": "a bearer token is required"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            response = await call_next(request)
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["Cache-Control"] = "no-store"
            return response

    routes = [
        Route("/metrics", route(metrics)),
        Route("/api/status", route(lambda r: api.status())),
        Route("/api/health", route(lambda r: api.health(*_span(r)))),
        Route("/api/disks", route(lambda r: api.disks(*_span(r)))),
        Route("/api/requests", route(lambda r: api.requests(r, *_span(r)))),
        Route("/api/services", route(lambda r: api.services(*_span(r)))),
        Route("/api/profile/windows", route(lambda r: api.windows(*_span(r)))),
        Route("/api/profile/flamegraph", route(flame)),
        Route("/api/security", route(lambda r: api.security(r, *_span(r)))),
    ]
    if agent.config.ui.enabled:
        routes += [
            Route("/", route(lambda r: HTMLResponse((UI / "index.html").read_text()))),
            Mount("/ui", StaticFiles(directory=UI)),
        ]
    return Starlette(routes=routes, middleware=[Middleware(Guard)])


def _server(config: Any) -> Any:
    """uvicorn's server, its housekeeping (the Date header, the check for a stop) once a second
    instead of every 100 ms, and woken at once by :meth:`stop`: with ten wake-ups a second the idle
    agent's web thread took 9-11 CPU ticks a minute (0.08% of a 2-CPU machine), with one 2."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        _wake: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None

        async def main_loop(self) -> None:
            self._wake = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            counter = 0  # a multiple of 10: on_tick does its once-a-second work at every tick
            while not await self.on_tick(counter):
                counter = (counter + 10) % 864000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)

        def stop(self) -> None:
            """From another thread: exit now, not at the next tick."""
            self.should_exit = True
            loop, wake = self._loop, self._wake
            if loop is not None and wake is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed already
                    loop.call_soon_threadsafe(wake.set)

    return Server(config)


class WebServer:
    """uvicorn in a thread, on a socket bound at once (a port in use is a one-line error)."""

    def __init__(self, agent: Agent, host: str, port: int, token: str | None) -> None:
        import uvicorn

        from bpfscope.agent.service import bind

        self.socket = bind(host, port)
        bound_host, bound_port = self.socket.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.address = f"http://{shown}:{bound_port}"
        config = uvicorn.Config(
            make_app(agent, token), log_level="warning", access_log=False, lifespan="off", server_header=False
        )
        self.server = _server(config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="bpfscope-web", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.socket.close()
