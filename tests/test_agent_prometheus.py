"""The agent scraped by a real Prometheus server (Debian's prometheus), with the bearer token it requires,
and asked in PromQL through Prometheus's HTTP API: the check's verdicts, the disks' bytes and device
latency histograms, and the request RED metrics of a real HTTP server whose every request is counted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent import RunningAgent, start_agent

TOKEN = "agent-test-token-0123456789"
REQUESTS = 40
# The HTTP server's process name: its requests are told from anyone else's on this machine.
SERVER_COMM = "promtest-srv"
SERVER = textwrap.dedent(
    f"""
    import ctypes, http.server, sys
    ctypes.CDLL(None).prctl(15, b"{SERVER_COMM}", 0, 0, 0)  # PR_SET_NAME
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            status = 503 if self.path.startswith("/fail") else 200
            body = b"ok" if status == 200 else b"down"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    running = start_agent(
        tmp_path,
        f"token_file: {token}\ncollectors: {{health: {{interval: 1s}}, profile: {{enabled: false}}, "
        "security: {enabled: false}}\n",
        bearer=TOKEN,
    )
    try:
        yield running
    finally:
        running.proc.kill()
        running.proc.wait()


@pytest.fixture
def prometheus(agent: RunningAgent, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    target = agent.address.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            scrape_configs:
              - job_name: bpfscope
                authorization: {{type: Bearer, credentials_file: {tmp_path / "token"}}}
                static_configs: [{{targets: ["{target}"]}}]
            """
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def promql(url: str, query: str) -> list[dict]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}", timeout=10
    ) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(url: str, query: str, ok: object, seconds: float = 45) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        result = promql(url, query)
        if ok(result) or time.monotonic() > deadline:  # type: ignore[operator]
            return result
        time.sleep(0.5)


def test_prometheus_scrapes_the_agent(agent: RunningAgent, prometheus: str) -> None:
    # Without the token the agent refuses; Prometheus scrapes with it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(agent.address + "/metrics", timeout=10)
    assert refused.value.code == 401
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        time.sleep(1.0)  # the tracer follows the listening socket from its first request on
        with socket.create_connection(("127.0.0.1", port)) as conn:  # keep-alive: one connection
            for i in range(REQUESTS):
                path = "/fail" if i % 10 == 0 else f"/ok/{i}"
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                got = b""
                while not got.endswith((b"ok", b"down")):
                    got += conn.recv(4096)
        up = wait_for(prometheus, 'up{job="bpfscope"}', lambda r: r and r[0]["value"][1] == "1")
        assert up and up[0]["value"][1] == "1"
        cpu = wait_for(prometheus, 'bpfscope_health_verdict{resource="CPU",metric="busy"}', bool)
        assert len(cpu) == 1 and cpu[0]["value"][1] in ("0", "1", "2")
        served = f'http_server_request_duration_seconds_count{{service_name="{SERVER_COMM}"}}'
        total = f"sum({served})"
        counted = wait_for(prometheus, total, lambda r: r and float(r[0]["value"][1]) >= REQUESTS)
        assert float(counted[0]["value"][1]) == REQUESTS  # every request, exactly once
        by_status = {
            r["metric"]["http_response_status_code"]: float(r["value"][1])
            for r in promql(prometheus, f"sum by (http_response_status_code) ({served})")
        }
        assert by_status == {"200": REQUESTS * 9 / 10, "503": REQUESTS / 10}
        disks = wait_for(prometheus, 'system_disk_io_bytes_total{disk_io_direction="write"}', bool)
        assert {r["metric"]["system_device"] for r in disks} >= {"vda"}
        p99 = promql(
            prometheus,
            "histogram_quantile(0.99, sum by (le, system_device) "
            "(bpfscope_disk_device_latency_seconds_bucket))",
        )
        assert all(float(r["value"][1]) > 0 for r in p99 if r["value"][1] != "NaN")
        collectors = promql(prometheus, "bpfscope_agent_collector_up")
        assert {r["metric"]["collector"] for r in collectors} >= {"health", "requests"}
    finally:
        server.kill()
        server.wait()
