"""Real servers and clients for the request-tracing tests (nginx, PostgreSQL, Redis, dnsmasq), and
``bpfscope requests`` run around a workload. Helpers only: the tests are in test_requests_*.py."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Nginx:
    port: int
    root: Path
    proc: subprocess.Popen
    tls_port: int = 0

    @property
    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


NGINX_LOCATIONS = """
    location = /hello { return 200 "hello\\n"; }
    location = /missing { return 404; }
    location = /fail { return 503 "unavailable\\n"; }
    location / { root %(root)s; }
"""


@pytest.fixture(name="nginx")
def nginx_server(tmp_path: Path) -> Iterator[Nginx]:
    """nginx on 127.0.0.1 (one worker), HTTP/1.1 keep-alive, and HTTPS on a second port with a
    self-signed certificate; files: /small (3 bytes), /page (20 kB), /big (1 MB)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "small").write_bytes(b"ok\n")
    (root / "page").write_bytes(os.urandom(20_000))
    (root / "big").write_bytes(os.urandom(1_000_000))
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port, tls_port = free_port(), free_port()
    locations = NGINX_LOCATIONS % {"root": root}
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"user root;\nworker_processes 1;\ndaemon off;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log warn;\nevents {{ worker_connections 4096; }}\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp_path}/body;\n"
        f" proxy_temp_path {tmp_path}/proxy;\n fastcgi_temp_path {tmp_path}/fcgi;\n"
        f" uwsgi_temp_path {tmp_path}/uwsgi;\n scgi_temp_path {tmp_path}/scgi;\n"
        " keepalive_requests 1000000;\n keepalive_timeout 120s;\n"
        f" server {{\n  listen 127.0.0.1:{port};\n{locations}\n }}\n"
        f" server {{\n  listen 127.0.0.1:{tls_port} ssl;\n  ssl_certificate {cert};\n"
        f"  ssl_certificate_key {key};\n{locations}\n }}\n}}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc)
        wait_port(tls_port, proc)
        yield Nginx(port, root, proc, tls_port)
    finally:
        stop(proc)


class Traced:
    """``bpfscope requests --json ARGS`` around a workload: started, waited for, stopped with SIGINT."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.records: list[dict] = []
        self.losses: dict = {}  # the requests collector's losses record
        self.all_losses: dict[str, dict] = {}  # every collector's
        self.stderr = ""

    def __enter__(self) -> Traced:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpfscope", "requests", "--json", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None and self.proc.stdout is not None
        # Read as it comes: a full pipe would stall the tool (and its ring) behind the test.
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._lines.extend, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        ready, _, _ = select.select([self.proc.stderr], [], [], 60)
        line = self.proc.stderr.readline() if ready else ""
        if not line.startswith("Tracing"):
            self.proc.kill()
            raise AssertionError(f"bpfscope requests did not start: {line}{self.proc.stderr.read()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            # What the workload's last calls sent is in the ring before the stop (a ring is read to its
            # end on the way out; this only lets the last calls return).
            time.sleep(0.3)
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=120)
        self._reader.join(timeout=60)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        for line in self._lines:
            record = json.loads(line)
            if record["record"] == "losses":
                self.all_losses[record["collector"]] = record
                self.losses = self.all_losses.get("requests", {})
            else:
                self.records.append(record)

    def table(self, name: str, **where: object) -> list[dict]:
        return [r for r in self.records if r["record"] == name and all(r[k] == v for k, v in where.items())]


def python_client(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def have(*commands: str) -> Callable[[], None]:
    missing = [c for c in commands if shutil.which(c) is None and not Path(c).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: ./setup.sh test installs them")
    return lambda: None


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen


@pytest.fixture(name="redis")
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        yield Redis(port, proc)
    finally:
        stop(proc)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Postgres:
    port: int
    data: Path

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A client program as the postgres user, connected over TCP (Unix sockets are not captured)."""
        args = [*cmd, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            capture_output=True, text=True, check=check, timeout=300, cwd=cwd,
        )  # fmt: skip


@pytest.fixture(scope="module", name="postgres")
def postgres_server() -> Iterator[Postgres]:
    """A throw-away PostgreSQL 15 cluster on 127.0.0.1 (trust), with pgbench's tables (in /tmp: pytest's
    own directories are root's alone, and the server runs as postgres)."""
    work = Path(tempfile.mkdtemp(prefix="bpfscope-pg-"))
    work.chmod(0o755)
    data = work / "data"
    data.mkdir()
    shutil.chown(data, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c shared_buffers=32MB -c fsync=off"
    pg_ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-o", options, "-l", str(data / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    server = Postgres(port, data)
    try:
        server.run("pgbench", "-i", "-q", "-s", "1", "postgres")
        yield server
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Dns:
    port: int
    proc: subprocess.Popen


# What the resolver knows: every other name under .test does not exist (NXDOMAIN).
DNS_RECORDS = {"web.test": "10.1.2.3", "db.test": "10.1.2.4"}


@pytest.fixture(name="dnsmasq")
def dnsmasq_server() -> Iterator[Dns]:
    port = free_port()
    hosts = [f"--host-record={name},{addr}" for name, addr in DNS_RECORDS.items()]
    proc = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--port", str(port), "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/test/", "--user=root", *hosts],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        yield Dns(port, proc)
    finally:
        stop(proc)
