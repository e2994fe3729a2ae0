"""The agent on the real kernel, as a person runs it: started as a command, read while it writes (bpfscope
query in other processes, the API), stopped with SIGTERM, and killed with SIGKILL mid-write, after
which the store opens whole and holds every event older than one flush interval."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfscope.sinks.store import Store

FLUSH_S = 2.0


@dataclass
class RunningAgent:
    proc: subprocess.Popen[str]
    address: str
    store: Path
    bearer: str | None = None

    def open(self, path: str) -> bytes:
        headers = {"Authorization": f"Bearer {self.bearer}"} if self.bearer else {}
        request = urllib.request.Request(self.address + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> dict:
        return json.loads(self.open(path))


def start_agent(tmp_path: Path, config: str, bearer: str | None = None) -> RunningAgent:
    path = tmp_path / "agent.yaml"
    store = tmp_path / "store"
    path.write_text(f"listen: 127.0.0.1:0\nstore: {{path: {store}, flush: {FLUSH_S}s}}\n{config}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "agent", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], 120)
    assert ready, "the agent did not start"
    line = proc.stderr.readline()
    while line.startswith("agent: "):  # a collector that failed to open, reported before the start
        line = proc.stderr.readline()
    match = re.search(r"UI and API at (http://[0-9.]+:\d+)/", line)
    assert line.startswith("Watching: ") and match, line + (
        proc.stderr.read() if proc.poll() is not None else ""
    )
    return RunningAgent(proc, match.group(1), store, bearer)


@pytest.fixture
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningAgent]:
    running = start_agent(tmp_path, request.param)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait()


def query(store: Path, sql: str) -> list[dict]:
    """bpfscope query in its own process, as a person reads the store while the agent writes."""
    out = subprocess.run(
        [sys.executable, "-m", "bpfscope", "query", "--store", str(store), "--json", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


HEALTH_ONLY = "collectors: {health: {interval: 1s}, profile: {enabled: false}, security: {enabled: false}, "
HEALTH_ONLY += "requests: {enabled: false}}\n"


@pytest.mark.parametrize("agent", [HEALTH_ONLY], indirect=True)
def test_the_check_always_on_read_while_it_writes(agent: RunningAgent) -> None:
    counts: list[int] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len([c for c in counts if c]) < 3:
        flushed = list(agent.store.glob("check.row/*/*/*.parquet"))
        rows = query(agent.store, 'SELECT count(*) AS n FROM "check.row"') if flushed else []
        counts.append(rows[0]["n"] if rows else 0)
        time.sleep(FLUSH_S / 2)
    # Readers in other processes see the table grow, one whole flush at a time.
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    health = agent.get("/api/health?minutes=5")
    rows = {(r["resource"], r["metric"]): r for r in health["rows"]}
    assert ("CPU", "busy") in rows and ("RAM", "used") in rows
    assert (
        rows["CPU", "busy"]["verdict"] in ("ok", "warn", "PROBLEM")
        and len(rows["CPU", "busy"]["history"]) >= 2
    )
    assert any(resource.startswith("Disk ") for resource, _ in rows)
    assert health["summary"]["summary"]
    status = agent.get("/api/status")
    assert [c["collector"] for c in status["collectors"]] == ["health", "store"]
    assert status["collectors"][0]["state"] == "running"
    # Read-only: nothing but GET.
    post = urllib.request.Request(agent.address + "/api/health", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 405
    agent.proc.send_signal(signal.SIGTERM)
    _, err = agent.proc.communicate(timeout=60)
    assert agent.proc.returncode == 0, err
    assert err.strip().splitlines()[-1].startswith("agent: ") and "Traceback" not in err
    kinds = [r["kind"] for r in query(agent.store, 'SELECT kind FROM "agent.event" ORDER BY ts')]
    assert kinds == ["start", "stop"]


SECURITY_ONLY = (
    "collectors: {health: {enabled: false}, profile: {enabled: false}, requests: {enabled: false}}\n"
)


@pytest.mark.parametrize("agent", [SECURITY_ONLY], indirect=True)
def test_kill_9_loses_at_most_the_last_flush_interval(agent: RunningAgent, tmp_path: Path) -> None:
    """Processes started every 20 ms, each named by its argument; the agent killed mid-run. Every one
    started more than a flush interval (and a second of slack for the ring's drain) before the kill is
    in the store, and every file of the store reads whole."""
    started: dict[str, float] = {}
    end = time.monotonic() + 4 * FLUSH_S + 0.5
    i = 0
    while time.monotonic() < end:
        marker = f"agent-crash-{os.getpid()}-{i}"
        subprocess.run(["/bin/true", marker], check=True)
        started[marker] = time.time()
        i += 1
        time.sleep(0.02)
    killed_at = time.time()
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    store = Store(agent.store)
    stored = set()
    for row in store.query('SELECT process_exec FROM "secure.process_exec"'):
        arguments = json.loads(row[0])["process"].get("arguments", "")
        stored.add(arguments)
    due = [m for m, t in started.items() if t < killed_at - FLUSH_S - 1.0]
    assert len(due) >= 100 and not [m for m in due if m not in stored], len(due)
    # No file is torn: each one opens and counts (hidden temporaries of the cut flush are never read).
    for path in agent.store.glob("*/date=*/hour=*/*.parquet"):
        assert store.query(f"SELECT count(*) FROM read_parquet('{path}')")[0][0] >= 1
    assert all(
        p.name.startswith(".") for p in agent.store.rglob("*") if p.is_file() and p.suffix != ".parquet"
    )
