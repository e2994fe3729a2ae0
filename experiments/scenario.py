"""What the experiments share: bpfscope tools run in the background as a person would run them (with
--json), and PostgreSQL driven as its own user with pgbench's report read back.

Each experiment's run.py puts this directory on sys.path and imports it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent


def remove_cgroups(pids: list[int], dirs: list[Path]) -> None:
    """Kill what is left in an experiment's cgroups, then remove their directories (a cgroup whose
    last task is still exiting refuses rmdir for a moment: retried for up to 5 s)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for d in dirs:
        for _ in range(100):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def bpfscope_cmd() -> list[str]:
    """bpfscope as this Python has it, else the project's environment, else the PATH."""
    if importlib.util.find_spec("bpfscope") is not None:
        return [sys.executable, "-m", "bpfscope"]
    venv = REPO / ".venv" / "bin" / "bpfscope"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("bpfscope")
    if found is None:
        sys.exit("bpfscope is not installed: run ./setup.sh first")
    return [found]


def as_postgres(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], text=True, capture_output=True, **kwargs)


def parse_pgbench(output: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for line in output.splitlines():
        if line.startswith("tps = "):
            result["tps"] = float(line.split()[2])
        elif line.startswith("latency average = "):
            result["latency_ms"] = float(line.split()[3])
        elif line.startswith("latency stddev = "):
            result["latency_stddev_ms"] = float(line.split()[3])
    return result


class Watcher:
    """A bpfscope tool running in the background with --json, writing to a file (a pipe nobody reads
    would block it); its records once it has stopped.

    It is started once ``attached`` shows on its stderr (None: at once). Every record names its schema
    (``record``) and has ``ts``, the wall-clock time of its event or of the end of its interval; with
    ``t0`` (a time.time()), each record also gets ``t``: seconds from t0 to its ``ts``. The ``losses``
    records a tool ends with are kept apart, in :attr:`losses` (collector -> what it lost, by reason),
    so that the records returned are the measurements alone.
    """

    def __init__(
        self,
        *args: str,
        attached: str | None = "Tracing",
        t0: float | None = None,
        exit_codes: tuple[int, ...] = (0,),
    ) -> None:
        self.args = args
        self.exit_codes = exit_codes  # what a run that went well ends with (check: 1 on a PROBLEM)
        self.output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in wait(), after the tool
        # Its own session: a Ctrl-C at the terminal reaches the experiment, which stops its tools in order.
        self.proc = subprocess.Popen(
            [*bpfscope_cmd(), *args, "--json"],
            stdout=self.output,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        if attached is not None:
            line = self.proc.stderr.readline()
            if not line.startswith(attached):
                self.kill()
                raise RuntimeError(f"bpfscope {args[0]} did not start: {line}{self.proc.stderr.read()}")
        self.t0 = t0
        self.losses: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        # On an error elsewhere the tool must not outlive the experiment.
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> list[dict[str, Any]]:
        """SIGINT, as Ctrl-C: the tool prints what it has, then its records."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def wait(self) -> list[dict[str, Any]]:
        """The records of a tool that ends by itself (a count or a duration)."""
        _, err = self.proc.communicate(timeout=300)
        if self.proc.returncode not in self.exit_codes:
            # A tool that failed has measured nothing: no empty list standing for zeros.
            self.output.close()
            tail = " | ".join(err.strip().splitlines()[-3:])
            command = " ".join(self.args)
            raise RuntimeError(f"bpfscope {command} exited with {self.proc.returncode}: {tail}")
        self.output.seek(0)
        records = []
        for line in self.output:
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record["record"] == "losses":
                self.losses[record["collector"]] = {"total": record["total"], "reasons": record["reasons"]}
                continue
            if self.t0 is not None:
                record["t"] = round(record["ts"] - self.t0, 3)
            records.append(record)
        self.output.close()
        return records

    def lost(self) -> dict[str, int]:
        """What the tool's collectors lost, by reason (ring_full, recursion, ...), the reasons with a loss."""
        out: dict[str, int] = {}
        for loss in self.losses.values():
            for reason, count in loss["reasons"].items():
                if count:
                    out[reason] = out.get(reason, 0) + count
        return out
