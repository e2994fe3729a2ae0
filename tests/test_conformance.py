"""Every registered tool keeps the contract, on the real kernel: ``--help`` has examples, ``--json`` emits
records of the schemas its collectors declare (and ends with its losses), a bad option or value exits 2
with one line, and SIGINT ends a run with its final summary.

The tools run while a small workload touches every family (execs, file reads and writes with fsync, a
direct read, a TCP connection on loopback, syscalls), so that each has something to report.
"""

from __future__ import annotations

import importlib
import inspect
import json
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfscope.cli import registry
from bpfscope.runtime.collector import Collector
from bpfscope.runtime.losses import LOSSES_SCHEMA
from bpfscope.runtime.schema import Schema

TOOLS = sorted(registry.tools())

# How each tool is run for a JSON check: short, and with something to report.
JSON_RUNS: dict[str, list[list[str]]] = {
    "biosnoop": [["--duration", "2"]],
    "biolatency": [["--duration", "2"], ["-D", "-F", "1", "2"]],
    "biotop": [["1", "2"]],
    "iostat": [["1", "2"]],
    "tcptop": [["1", "2"]],
    "tcpretrans": [["--duration", "2"], ["-c", "1", "2"]],
    "tcplife": [["--duration", "2"], ["--hist", "1", "2"]],
    "tcpconn": [["--duration", "2"], ["-c", "1", "2"]],
    "sockstat": [["1", "2"]],
    "cachestat": [["-r", "3", "1", "2"]],
    "cachetop": [["1", "2"]],
    "fincore": [["/etc/passwd", "/etc/hostname"]],
    "vfsstat": [["1", "2"], ["-P", "1", "2"]],
    "filetop": [["1", "2"]],
    "writeback": [["1", "2"]],
    "execsnoop": [["--exits", "--duration", "2"]],
    "secure": [["--duration", "2"]],
    "syscount": [["1", "2"], ["-P", "-L", "1", "2"]],
    "trace": [["syscalls:sys_enter_getppid", "--count-by", "comm", "1", "2"]],
    "doctor": [[]],
    "check": [["--duration", "2"]],
    "profile": [["--duration", "2"], ["--frequency", "99", "1", "2"]],
    "offcputime": [["--duration", "2"], ["--unwind", "fp", "1", "2"]],
    "requests": [["--duration", "2"]],
    "agent": [["--duration", "4", "--listen", "127.0.0.1:0", "--store", "/var/tmp/bpfscope-conformance"]],
    "query": [["--tables", "--store", "/var/tmp"]],
    "tsa": [["1", "2"], ["--by", "cgroup", "--percent", "1", "2"]],
    "bench": [["--duration", "2"]],
}
# Tools whose runs end by themselves (no interval or Ctrl-C to wait for).
ONE_SHOT = {"fincore", "doctor", "query"}
# Every record a workload of a few seconds must produce, by tool (the others may rightly be empty:
# no retransmit on loopback, no buffer full).
MUST_REPORT = {
    "biosnoop",
    "biolatency",
    "iostat",
    "tcptop",
    "tcplife",
    "tcpconn",
    "sockstat",
    "cachestat",
    "fincore",
    "vfsstat",
    "filetop",
    "execsnoop",
    "secure",
    "syscount",
    "trace",
    "doctor",
    "check",
    "profile",
    "offcputime",
    "agent",
    "tsa",
    "bench",
}

WORKLOAD = textwrap.dedent(
    """
    import os, socket, subprocess, sys, time
    path = sys.argv[1]
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(16)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        subprocess.run(["/bin/true"])
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20)); f.flush(); os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 1 << 16)
            os.readv(fd, [buf])
        finally:
            os.close(fd)
        os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        with open(path, "rb") as f:
            f.read()
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        client.sendall(b"x" * 65536); peer.recv(65536)
        client.close(); peer.close()
        for _ in range(100):
            os.getppid()
        time.sleep(0.05)
    """
)


@pytest.fixture(scope="module")
def workload() -> Iterator[None]:
    """The workload, for the whole module (each tool samples a few seconds of it)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(Path(tmp) / "data"), "600"])
        try:
            yield
        finally:
            proc.kill()
            proc.wait()


def _query_schemas() -> tuple[Schema, ...]:
    """A trace query's records have the schema of that query: the collector built as JSON_RUNS runs it."""
    from bpfscope.domains.trace.trace import TraceCollector, TraceConfig

    config = TraceConfig(tracepoint="syscalls:sys_enter_getppid", count_by=("comm",))
    return tuple(TraceCollector(config).schemas())


# Tools whose schemas depend on the run's arguments.
RUN_SCHEMAS = {"trace": _query_schemas}


def schemas_of(tool: str) -> dict[str, Schema]:
    """The schemas a tool's JSON may hold: its module's SCHEMAS, or those its collectors declare."""
    module = importlib.import_module(registry.tools()[tool].module)
    declared = list(getattr(module, "SCHEMAS", ()))
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Collector) and cls.__module__ == module.__name__:
            declared += cls.schemas()
    if tool in RUN_SCHEMAS:
        declared += RUN_SCHEMAS[tool]()
    assert declared, f"{tool} declares no schema"
    return {s.name: s for s in [*declared, LOSSES_SCHEMA]}


def bpfscope(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpfscope", *args], capture_output=True, text=True, timeout=timeout, cwd="/"
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_help_has_examples(tool: str) -> None:
    result = bpfscope(tool, "--help")
    assert result.returncode == 0, result.stderr
    assert "Examples:" in result.stdout and f"bpfscope {tool}" in result.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_json_is_records_of_the_declared_schemas(tool: str, workload: None) -> None:
    schemas = schemas_of(tool)
    for args in JSON_RUNS[tool]:
        result = bpfscope(tool, *args, "--json")
        assert result.returncode in (0, 1), f"{tool} {args}: {result.stderr}"  # check: 1 is a PROBLEM
        assert "Traceback" not in result.stderr, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        own = [r for r in records if r.get("record") != "losses"]
        if tool in MUST_REPORT:
            assert own, f"{tool} {args} reported nothing: {result.stderr}"
        for record in records:
            schema = schemas.get(record.get("record", ""))
            assert schema is not None, f"{tool}: record {record.get('record')!r} is not declared"
            assert schema.check(record) == [], (tool, args, schema.check(record), record)
        if tool not in ("check", "doctor", "fincore", "query"):
            assert records and records[-1]["record"] == "losses", (
                f"{tool} {args}: no losses record at the end"
            )


@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_option_is_one_line_and_exit_2(tool: str) -> None:
    for args in (["--no-such-option"], ["--duration", "-1"]):
        result = bpfscope(tool, *args)
        assert result.returncode == 2, (tool, args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bpfscope: error: "), (tool, args, result.stderr)


@pytest.mark.parametrize("tool", sorted(set(TOOLS) - ONE_SHOT))
def test_sigint_ends_with_the_final_summary(tool: str) -> None:
    args = {
        "trace": ["syscalls:sys_enter_getppid", "--count-by", "comm"],
        "agent": ["--listen", "127.0.0.1:0", "--store", "/var/tmp/bpfscope-conformance"],
    }.get(tool, [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", tool, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, f"{tool} did not start"
        first = proc.stderr.readline()
        assert first.startswith(("Tracing", "Watching")), first + proc.stderr.read()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 1), err
    assert "Traceback" not in err, err
    if tool == "check":
        assert out.strip().splitlines()[-1].startswith(("no problem found", "PROBLEM")), out
    else:
        assert err.strip().splitlines()[-1].startswith(f"{tool}: "), err
