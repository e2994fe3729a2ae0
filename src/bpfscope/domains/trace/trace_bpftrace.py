"""`bpfscope trace --bpftrace PROGRAM`: run bpftrace where it is installed and show its maps the way
bpfscope shows its own (tables, JSON lines). The native engine stays the default; this is for programs
bpfscope's one-liners cannot express."""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from bpfscope.cli.tool import Stop
from bpfscope.errors import BpfscopeError
from bpfscope.sinks.output import Output

_ATTACHED = "bpfscope: bpftrace attached"


def run_bpftrace(program: str, out: Output, duration: float | None, top: int) -> None:
    binary = shutil.which("bpftrace")
    if binary is None:
        raise BpfscopeError("--bpftrace needs bpftrace", hint="install it with `apt-get install bpftrace`")
    # bpftrace announces its probes before it attaches them; BEGIN runs once they are attached. bpftrace
    # 0.17 allows one BEGIN: a program with its own is announced when its probes are (a little early).
    has_begin = "BEGIN" in program
    marked = program if has_begin else f'{program}\nBEGIN {{ printf("{_ATTACHED}\\n"); }}'
    # Its own session: a Ctrl-C at the terminal reaches bpfscope only, which passes it on once.
    proc = subprocess.Popen(
        [binary, "-f", "json", "-e", marked],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + duration if duration else None
    records: list[dict[str, Any]] = []
    try:
        for line in _lines(proc, deadline):
            record = json.loads(line)
            if (record.get("type") == "printf" and record.get("data") == f"{_ATTACHED}\n") or (
                record.get("type") == "attached_probes" and has_begin
            ):
                out.note("Tracing with bpftrace... Ctrl-C to end.")
            elif record.get("type") != "attached_probes":
                records.append(record)
    except (KeyboardInterrupt, Stop):
        # Stopping bpftrace with SIGINT makes it print its maps, then exit.
        proc.send_signal(signal.SIGINT)
        records.extend(json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{"))
    proc.wait()
    stderr = proc.stderr.read()
    errors = _errors(stderr)
    if proc.returncode not in (0, -signal.SIGINT) and not records:
        if not has_begin:
            # Report the error on the user's own text, not on the marker we added to it.
            dry_run = subprocess.run([binary, "-d", "-e", program], capture_output=True, text=True)
            errors = _errors(dry_run.stderr) or errors
        reason = errors[-1] if errors else (stderr.strip().splitlines() or ["no output"])[-1]
        raise BpfscopeError(f"bpftrace failed: {reason}")
    for record in records:
        _show(record, out, top)


def _die_with_parent() -> None:
    """In the child: its own session keeps it from the terminal's Ctrl-C, so if bpfscope itself is
    killed, the kernel must end bpftrace (and its programs) too."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _errors(stderr: str) -> list[str]:
    # bpftrace warns that it cannot raise RLIMIT_MEMLOCK, which this kernel does not need: not an error.
    return [line for line in stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]


def _lines(proc: subprocess.Popen[str], deadline: float | None) -> Iterator[str]:
    """bpftrace's JSON lines until it exits; at the deadline it gets SIGINT and prints its maps."""
    assert proc.stdout is not None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            proc.send_signal(signal.SIGINT)
            deadline = None
            continue
        line = proc.stdout.readline()
        if not line:
            return
        if line.startswith("{"):
            yield line


def _show(record: dict[str, Any], out: Output, top: int) -> None:
    kind, data = record.get("type"), record.get("data")
    if kind == "printf" and isinstance(data, str):
        out.line(data.rstrip("\n")) if not out.as_json else out.record({"printf": data})
    elif kind == "map" and isinstance(data, dict):
        for name, value in data.items():
            if isinstance(value, dict):
                rows = sorted(
                    value.items(), key=lambda kv: kv[1] if isinstance(kv[1], int | float) else 0, reverse=True
                )[:top]
                out.heading(name)
                out.table(
                    ["KEY", "VALUE"],
                    rows,
                    keys=["key", "value"],
                    extra={"map": name} if out.as_json else None,
                )
            else:
                out.record({"map": name, "value": value}) if out.as_json else out.line(f"{name}: {value}")
    elif kind == "hist" and isinstance(data, dict):
        for name, buckets in data.items():
            rows = [(b.get("min"), b.get("max"), b.get("count")) for b in buckets]
            out.heading(name)
            out.table(
                ["LOW", "HIGH", "COUNT"],
                rows,
                keys=["low", "high", "count"],
                extra={"hist": name} if out.as_json else None,
            )
