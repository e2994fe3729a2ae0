"""The soak, short (the 30-minute run is benchmarks/agent_overhead.py --soak 30): the agent with everything
on for 65 seconds under a steady workload (HTTP requests on a keep-alive connection, processes started,
CPU burnt by both), its RSS sampled every two seconds after the warm-up. It stays flat, no collector
fails, and every request and process of the workload is in the store, or counted as lost: on a quiet
machine nothing is lost and all of them are there. (The agent watches the whole machine: on a machine
busy with other traffic it may lose some of it, never silently.)"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_agent import start_agent
from test_agent_prometheus import SERVER, SERVER_COMM

from bpfscope.sinks.store import Store

WARMUP_S, MEASURED_S = 15.0, 50.0


def rss_mb(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def test_short_soak_flat_rss_nothing_lost_silently(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "")
    # Read all along: a pipe nobody reads would stop the agent once full.
    stderr: list[str] = []
    assert agent.proc.stderr is not None
    reader = threading.Thread(target=lambda: stderr.extend(agent.proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    sent = execs = 0
    samples: list[float] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        began = time.monotonic()
        next_sample = began + WARMUP_S
        with socket.create_connection(("127.0.0.1", port)) as conn:
            while time.monotonic() - began < WARMUP_S + MEASURED_S:
                for _ in range(20):  # about 80 requests a second
                    conn.sendall(f"GET /ok/{sent} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    got = b""
                    while not got.endswith(b"ok"):
                        got += conn.recv(4096)
                    sent += 1
                subprocess.run(["/bin/true", f"soak-{execs}"], check=True)
                execs += 1
                if time.monotonic() >= next_sample:
                    samples.append(rss_mb(agent.proc.pid))
                    next_sample += 2.0
                time.sleep(0.2)
        time.sleep(3)  # the last requests reach the store's next flush
    finally:
        server.kill()
        server.wait()
        agent.proc.terminate()
        try:
            agent.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            agent.proc.kill()  # never left running behind a failed test
            agent.proc.wait()
            raise
        reader.join(timeout=10)
    err = "".join(stderr)
    assert agent.proc.returncode == 0, err
    # Flat: the last fifth's median against the first's (medians: a burst of the machine's other traffic
    # decoded at once is not growth).
    fifth = len(samples) // 5
    first, last = statistics.median(samples[:fifth]), statistics.median(samples[-fifth:])
    assert last <= first * 1.10, (first, last, samples)
    store = Store(agent.store)
    lost = dict(store.query('SELECT collector, max(lost) FROM "agent.collector" GROUP BY collector'))
    assert set(lost) == {"health", "profile", "secure", "requests", "store"}, lost
    assert lost["store"] == 0, err  # every batch written
    failures = store.query('SELECT count(*) FROM "agent.event" WHERE kind = ?', ["failed"])[0][0]
    assert failures == 0, err
    served = store.query(
        "SELECT count(*) FROM http_events WHERE comm = ? AND trace_role = ?", [SERVER_COMM, "server"]
    )[0][0]
    assert sent - lost["requests"] <= served <= sent, (sent, served, lost, err)
    arguments = {
        r[0]
        for r in store.query(
            "SELECT json_extract_string(process_exec, '$.process.arguments') FROM \"secure.process_exec\""
        )
    }
    missing = {f"soak-{i}" for i in range(execs)} - arguments
    assert len(missing) <= lost["secure"], (sorted(missing)[:10], lost, err)
