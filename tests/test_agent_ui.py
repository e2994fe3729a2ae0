"""The agent's web UI in a real headless Chromium (Debian's, driven by Playwright): an agent records a
workload (a real HTTP server and its client, processes started, CPU burnt in one function and then in
another), stops, and a second agent with no collector serves that store, so that each page can be held
to what the store holds: the check's rows, the disk heatmap, the service map, requests and their
filters (an SQL injection through them finds nothing and harms nothing), flame graphs that zoom and
diff, the security feed with lineage. Screenshots go to docs/agent/."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent import RunningAgent, start_agent

from bpfscope.sinks.store import Store

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "agent"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_COMM = "uitest-srv"
SERVER = textwrap.dedent(
    f"""
    import ctypes, http.server
    ctypes.CDLL(None).prctl(15, b"{SERVER_COMM}", 0, 0, 0)
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            status = 503 if self.path.startswith("/fail") else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)
# CPU burnt in one function, then in another: what the flame graph's diff must show.
BURNER = textwrap.dedent(
    """
    import hashlib, sys, time
    def alpha_phase(end):
        h = b"a"
        while time.time() < end:
            h = hashlib.sha256(h).digest()
    def beta_phase(end):
        n = 0
        while time.time() < end:
            n = sum(i * i for i in range(2000))
    seconds = float(sys.argv[1])
    alpha_phase(time.time() + seconds)
    print(time.time(), flush=True)
    beta_phase(time.time() + seconds)
    """
)
PHASE_S = 6.0


def record_workload(tmp_path: Path) -> dict[str, Any]:
    """Run the agent with everything on over the workload, then stop it; what the workload did."""
    agent = start_agent(
        tmp_path,
        # DWARF: the flame graphs name the burner's Python functions (frame pointers show the interpreter).
        "collectors: {health: {interval: 1s}, profile: {interval: 2s, unwind: dwarf}}\n",
    )
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        time.sleep(1.0)
        burner = subprocess.Popen(
            [sys.executable, "-c", BURNER, str(PHASE_S)], stdout=subprocess.PIPE, text=True
        )
        phase_a_start = time.time()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for i in range(60):
                path = "/fail" if i % 6 == 0 else f"/ok/{i}"
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                got = b""
                while not got.endswith(b"ok"):
                    got += conn.recv(4096)
        subprocess.run(["/bin/sh", "-c", "/bin/true uitest-marker"], check=True)
        assert burner.stdout is not None
        phase_b_start = float(burner.stdout.readline())
        burner.wait(timeout=60)
        phase_b_end = time.time()
        time.sleep(3)  # the last windows and a flush
    finally:
        server.kill()
        server.wait()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.communicate(timeout=180)
    assert agent.proc.returncode == 0
    return {
        "store": agent.store,
        "port": port,
        "phases": ((phase_a_start, phase_b_start), (phase_b_start, phase_b_end)),
        "burner": burner.pid,
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return record_workload(tmp_path_factory.mktemp("recorded"))


@pytest.fixture(scope="module")
def viewer(recorded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """An agent with no collector, serving the recorded store: the pages show exactly what it holds."""
    tmp = tmp_path_factory.mktemp("viewer")
    config = tmp / "agent.yaml"
    off = "{enabled: false}"
    config.write_text(
        f"listen: 127.0.0.1:0\nstore: {{path: {recorded['store']}}}\ncollectors: {{health: {off}, "
        f"profile: {off}, security: {off}, requests: {off}}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "agent", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    address = line.split("UI and API at ")[1].strip().rstrip("/")
    try:
        yield RunningAgent(proc, address, recorded["store"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)


@pytest.fixture(scope="module")
def page(viewer: RunningAgent) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def show(page: Any, viewer: RunningAgent, name: str) -> None:
    page.goto(f"{viewer.address}/#/{name}")
    page.wait_for_selector(f"body[data-page={name}][data-rendered]:not([data-loading])", timeout=60_000)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")


def changed(page: Any, expression: str, action: Any) -> None:
    """Do ``action`` and wait until ``expression`` (the page's count of drawings) moves on. Polled from
    here: the page's policy forbids the eval that Playwright's in-page waiting would need."""
    before = page.evaluate(expression)
    action()
    deadline = time.monotonic() + 60
    while page.evaluate(expression) == before:
        assert time.monotonic() < deadline, f"{expression} stayed {before}"
        time.sleep(0.05)


def rerender(page: Any, action: Any) -> None:
    changed(page, "document.body.dataset.rendered", action)


def screenshot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def test_health_page_shows_the_stored_verdicts(page: Any, viewer: RunningAgent) -> None:
    show(page, viewer, "health")
    store = Store(viewer.store)
    latest = dict(
        store.query(
            "SELECT resource || ' ' || metric, verdict FROM \"check.row\" "
            'WHERE ts = (SELECT max(ts) FROM "check.row")'
        )
    )
    # The latest window's verdicts, one row per resource and metric: none older (a series missing from
    # that window has no verdict now), none missing.
    shown = page.locator("#health-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.resource + ' ' + r.dataset.metric)"
    )
    assert sorted(shown) == sorted(latest)
    cpu = page.locator('#health-table tr[data-resource="CPU"][data-metric="busy"]')
    assert cpu.locator(".verdict").inner_text() == latest["CPU busy"]
    assert cpu.locator("svg polyline").count() == 1
    summary = store.query('SELECT summary FROM "check.summary" ORDER BY ts DESC LIMIT 1')[0][0]
    assert summary in page.inner_text("#summary")
    screenshot(page, "health")


def test_disk_heatmap_holds_every_timed_request(page: Any, viewer: RunningAgent) -> None:
    show(page, viewer, "disks")
    store = Store(viewer.store)
    (total,) = store.query('SELECT sum(count) FROM "agent.disk_latency" WHERE disk = ?', ["vda"])[0]
    cells = page.locator('.heatmap[data-disk="vda"] rect')
    shown = sum(int(c) for c in cells.evaluate_all("rects => rects.map(r => r.dataset.count)"))
    assert shown == total and total > 0
    screenshot(page, "disks")


def test_service_map_has_the_client_and_server(page: Any, viewer: RunningAgent, recorded: dict) -> None:
    show(page, viewer, "services")
    server = f"{SERVER_COMM}:{recorded['port']}"
    # The client's side of the exchanges, as the store holds them (all 60 on a quiet machine; a machine
    # loaded past what the tracer's ring takes loses some, counted in its losses).
    (called,) = Store(viewer.store).query(
        "SELECT count(*) FROM http_events WHERE trace_role = ? AND remote_port = ?",
        ["client", recorded["port"]],
    )[0]
    edge = page.locator(f'#edges tr[data-target="{server}"]')
    assert edge.count() == 1 and int(edge.get_attribute("data-requests")) == called > 0
    assert page.locator(f'#map line[data-target="{server}"]').count() == 1
    assert page.locator(f'#map circle[data-name="{server}"]').count() == 1
    screenshot(page, "services")


def test_request_filters_filter_and_inject_nothing(page: Any, viewer: RunningAgent) -> None:
    show(page, viewer, "requests")
    store = Store(viewer.store)

    def served(where: str = "", params: tuple = ()) -> int:
        sql = "SELECT count(*) FROM http_events WHERE comm = ? AND trace_role = ?" + where
        return store.query(sql, [SERVER_COMM, "server", *params])[0][0]

    def apply(**filters: str) -> list[str]:
        for name in ("method", "status", "path", "comm", "min_latency_ms"):
            page.fill(f'#filters input[name="{name}"]', filters.get(name, ""))
        page.select_option('#filters select[name="role"]', filters.get("role", ""))
        rerender(page, lambda: page.click("#filters button"))
        return page.locator("#request-table tbody tr").all_inner_texts()

    rows = apply(comm=SERVER_COMM, role="server", status="503")
    failed = served(" AND resp_status = ?", (503,))
    assert len(rows) == failed > 0
    assert page.locator("#request-table td.status").all_inner_texts() == ["503"] * failed
    # A path the store holds (all of /ok/1, /ok/10 ... /ok/19 on a quiet machine).
    (path,) = store.query(
        "SELECT req_path FROM http_events WHERE comm = ? AND req_path LIKE ? ORDER BY ts LIMIT 1",
        [SERVER_COMM, "/ok/%"],
    )[0]
    rows = apply(comm=SERVER_COMM, role="server", path=path)
    assert len(rows) == served(" AND contains(req_path, ?)", (path,)) > 0
    assert all(path in p for p in page.locator("#request-table td.path").all_inner_texts())
    before = served()
    for attack in ("' OR 1=1 --", "%' OR '1'='1", '"; DROP TABLE http_events; --'):
        assert apply(comm=SERVER_COMM, path=attack) == []
        assert apply(method=attack) == []
    assert served() == before > 0  # nothing injected, nothing dropped
    apply(comm=SERVER_COMM)
    screenshot(page, "requests")


def test_flame_graph_zooms_and_diffs(page: Any, viewer: RunningAgent, recorded: dict) -> None:
    show(page, viewer, "profiles")
    (a_start, a_end), (b_start, b_end) = recorded["phases"]

    def local(ts: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))

    def flame(diff: bool) -> Any:
        page.fill('#ranges input[name="start"]', local(b_start))
        page.fill('#ranges input[name="end"]', local(b_end + 2))
        page.set_checked('#ranges input[name="diff"]', diff)
        page.fill('#ranges input[name="base_start"]', local(a_start))
        page.fill('#ranges input[name="base_end"]', local(a_end))
        page.fill('#ranges input[name="pid"]', str(recorded["burner"]))  # the burner alone, however busy
        changed(page, "document.body.dataset.flame || ''", lambda: page.click("#ranges button"))
        return page.frame_locator("#flame")

    frame = flame(diff=False)
    width = frame.locator("#graph").evaluate("g => g.clientWidth")
    beta = frame.locator(".f", has_text="beta_phase").first
    assert beta.evaluate("d => d.getBoundingClientRect().width") < width
    beta.click()  # zoom: the frame now spans the graph
    zoomed = frame.locator(".f", has_text="beta_phase").first
    assert abs(zoomed.evaluate("d => d.getBoundingClientRect().width") - width) < 2
    frame = flame(diff=True)
    assert "red: more than before, blue: less" in frame.locator("#status").inner_text()
    # beta_phase ran only in the newer range: red; alpha_phase only in the baseline is gone from it.
    colour = frame.locator(".f", has_text="beta_phase").first.evaluate("d => d.style.background")
    red, green, blue = (int(v) for v in colour.removeprefix("rgb(").rstrip(")").split(","))
    assert red == 255 and green == blue < 255
    screenshot(page, "flamegraph-diff")


def test_security_feed_with_lineage(page: Any, viewer: RunningAgent) -> None:
    show(page, viewer, "security")
    page.select_option('#security-filters select[name="kind"]', "process_exec")
    page.fill('#security-filters input[name="process"]', "uitest-marker")
    rerender(page, lambda: page.click("#security-filters button"))
    rows = page.locator("#security-table tbody tr")
    assert rows.count() == 2 and all(
        t == "exec" for t in page.locator("#security-table td:nth-child(2)").all_inner_texts()
    )
    marker = page.locator("#security-table tr", has_text="uitest-marker").first
    lineage = marker.locator(".lineage").inner_text()
    assert lineage.endswith("true[" + lineage.rsplit("true[", 1)[1]) and "sh[" in lineage, lineage
    screenshot(page, "security")


def test_tables_were_written(recorded: dict) -> None:
    tables = Store(recorded["store"]).tables()
    assert {"check.row", "agent.disk_latency", "http_events", "profile.stack", "secure.process_exec"} <= set(
        tables
    )
