"""What the benchmarks share: running a tracer until it has attached, and finding the commands."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def bpfscope() -> str:
    return shutil.which("bpfscope", path=str(Path(sys.executable).parent)) or "bpfscope"


def bpftrace() -> str:
    path = shutil.which("bpftrace")
    if path is None:
        sys.exit("bpftrace is not installed (apt-get install bpftrace)")
    return path


@contextlib.contextmanager
def tracer(cmd: list[str], marker: str, output: list[str] | None = None) -> Iterator[None]:
    """Run a tracer until ``marker`` shows on its stdout or stderr; stop it with SIGINT afterwards.
    Its stdout is discarded (a pipe nobody reads would stall it); its stderr goes to ``output``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL if marker_on_stderr(cmd) else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    streams = [s for s in (proc.stdout, proc.stderr) if s is not None]
    seen = ""
    try:
        # Raw reads: a buffered readline could keep the marker in its buffer, where select never sees it.
        while marker not in seen:
            ready, _, _ = select.select(streams, [], [], 30)
            if not ready or proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} did not attach: {seen}")
            seen += os.read(ready[0].fileno(), 65536).decode(errors="replace")
        if proc.stdout is not None:
            # bpftrace prints its marker on stdout, then nothing until it exits.
            proc.stdout.close()
            proc.stdout = None
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if output is not None:
            output.append(err or "")


def marker_on_stderr(cmd: list[str]) -> bool:
    """bpfscope says "Tracing ..." on stderr; bpftrace's BEGIN prints on stdout."""
    return Path(cmd[0]).name == "bpfscope"
