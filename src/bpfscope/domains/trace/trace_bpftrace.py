"""`bpfscope trace --bpftrace PROGRAM`: run bpftrace where it is installed and show its maps the way
bpfscope shows its own (tables, JSON lines). The native engine stays the default; this is for programs
bpfscope's one-liners cannot express.

:class:`BpftraceCollector` starts bpftrace when it opens and returns once bpftrace has attached its
probes; its one sample, at the end of the run, is what bpftrace printed, its maps included (bpftrace
prints them when it gets SIGINT, and exits). A program that ends by itself (exit()) ends the run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.losses import RING_FULL, Loss, Losses
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    from bpfscope.cli.options import Run

_ATTACHED = "bpfscope: bpftrace attached"

PRINTF_SCHEMA = Schema(
    "trace.bpftrace.printf", (Field("text", "str", doc="what printf() printed"),), doc="A bpftrace printf."
)
MAP_SCHEMA = Schema(
    "trace.bpftrace.map",
    (
        Field("map", "str", label=True, doc="the map's name (@...)"),
        Field("key", "str", label=True, nullable=True, doc="the entry's key; null for a map without keys"),
        Field("value", "int", doc="the entry's value"),
    ),
    doc="An entry of a bpftrace map, at the end of the run.",
)
HIST_SCHEMA = Schema(
    "trace.bpftrace.hist",
    (
        Field("hist", "str", label=True, doc="the histogram map's name (@...)"),
        Field("key", "str", label=True, nullable=True, doc="the histogram's key; null without keys"),
        Field("low", "int", nullable=True, doc="the bucket's lowest value; null below the first"),
        Field("high", "int", nullable=True, doc="the bucket's highest value; null above the last"),
        Field("count", "int"),
    ),
    doc="A bucket of a bpftrace hist() or lhist(), at the end of the run.",
)
BPFTRACE_SCHEMAS = (PRINTF_SCHEMA, MAP_SCHEMA, HIST_SCHEMA)


@dataclass(kw_only=True)
class BpftraceConfig(Config):
    program: str


@dataclass
class BpftraceOutput(Sample):
    """What bpftrace printed over the run, as bpfscope's records."""

    ts: float
    printfs: list[str] = field(default_factory=list)
    maps: list[tuple[str, str | None, Any]] = field(default_factory=list)  # (map, key, value)
    buckets: list[tuple[str, str | None, int | None, int | None, int]] = field(default_factory=list)

    def records(self) -> Iterator[dict[str, Any]]:
        for text in self.printfs:
            yield PRINTF_SCHEMA.record({"ts": self.ts, "text": text})
        for name, key, value in self.maps:
            yield MAP_SCHEMA.record({"ts": self.ts, "map": name, "key": key, "value": value})
        for name, key, low, high, count in self.buckets:
            yield HIST_SCHEMA.record(
                {"ts": self.ts, "hist": name, "key": key, "low": low, "high": high, "count": count}
            )

    def add(self, record: dict[str, Any]) -> None:
        """One of bpftrace's JSON output records."""
        kind, data = record.get("type"), record.get("data")
        if kind == "printf" and isinstance(data, str):
            self.printfs.append(data.rstrip("\n"))
        elif kind == "map" and isinstance(data, dict):
            for name, value in data.items():
                entries = value.items() if isinstance(value, dict) else [(None, value)]
                self.maps.extend((name, key, v) for key, v in entries)
        elif kind == "hist" and isinstance(data, dict):
            for name, value in data.items():
                by_key = value.items() if isinstance(value, dict) else [(None, value)]
                for key, buckets in by_key:
                    self.buckets.extend(
                        (name, key, b.get("min"), b.get("max"), b.get("count", 0)) for b in buckets
                    )


class BpftraceCollector(Collector[BpftraceConfig]):
    """bpftrace running a program, its output read back as JSON."""

    name = "trace"
    _schemas = BPFTRACE_SCHEMAS

    def __init__(self, config: BpftraceConfig, ended: Callable[[], None] | None = None) -> None:
        """``ended`` is called (from another thread) when bpftrace exits before the run is over."""
        super().__init__(config)
        self.ended = ended
        self.proc: subprocess.Popen[str] | None = None
        self.early: list[str] = []  # what the program printed before it attached (its own BEGIN)
        self.lines: list[str] = []  # bpftrace's JSON lines after it attached, read by self.reader
        self.reader: threading.Thread | None = None
        self.stopping = False  # the run is over: bpftrace was told to print its maps and exit
        self.lost = 0  # events bpftrace says it lost

    def open(self) -> None:
        binary = shutil.which("bpftrace")
        if binary is None:
            raise BpfscopeError(
                "--bpftrace needs bpftrace", hint="install it with `apt-get install bpftrace`"
            )
        program = self.config.program
        # bpftrace announces its probes before it attaches them; BEGIN runs once they are attached.
        # bpftrace 0.17 allows one BEGIN: a program with its own is taken as attached when its probes
        # are announced (a little early).
        has_begin = "BEGIN" in program
        marked = program if has_begin else f'{program}\nBEGIN {{ printf("{_ATTACHED}\\n"); }}'
        # Its own session: a Ctrl-C at the terminal reaches bpfscope only, which passes it on once.
        self.proc = subprocess.Popen(
            [binary, "-f", "json", "-e", marked],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("type") == "attached_probes":
                if has_begin:
                    break
            elif record.get("type") == "printf" and record.get("data") == f"{_ATTACHED}\n":
                break
            elif record:
                self.early.append(line)
        else:
            self._failed(binary, program, has_begin)
        # The rest is read as it comes, so that a program that prints a lot never blocks on a full pipe.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.lines.extend(self.proc.stdout)
        # The output ends when bpftrace exits: told to (sample()), or by itself (its program's exit()).
        if not self.stopping and self.ended is not None:
            self.ended()

    def _failed(self, binary: str, program: str, has_begin: bool) -> None:
        """bpftrace exited before it attached: its error, on the user's own text (not on our marker)."""
        assert self.proc is not None and self.proc.stderr is not None
        self.proc.wait()
        errors = _errors(self.proc.stderr.read())
        if not has_begin:
            dry_run = subprocess.run([binary, "-d", "-e", program], capture_output=True, text=True)
            errors = _errors(dry_run.stderr) or errors
        raise BpfscopeError(f"bpftrace failed: {errors[-1] if errors else 'it exited without output'}")

    def sample(self) -> BpftraceOutput:
        """The run is over: bpftrace prints its maps on SIGINT, then exits."""
        assert self.proc is not None and self.reader is not None
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait()
        self.reader.join()
        output = BpftraceOutput(time.time())
        for line in [*self.early, *self.lines]:
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("type") == "lost_events":
                self.lost += int(record.get("data", {}).get("events", 0))
            output.add(record)
        return output

    def losses(self) -> Losses:
        return Losses([Loss(RING_FULL, self.lost, "events lost (bpftrace's output buffer full)")])

    def close(self) -> None:
        if self.proc is None:
            return
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # Its output ends with it: the reader is done before the pipes close under it.
        if self.reader is not None:
            self.reader.join()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.proc = None


def _die_with_parent() -> None:
    """In the child: its own session keeps it from the terminal's Ctrl-C, so if bpfscope itself is
    killed, the kernel must end bpftrace (and its programs) too."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _errors(stderr: str) -> list[str]:
    # bpftrace warns that it cannot raise RLIMIT_MEMLOCK, which this kernel does not need: not an error.
    return [line for line in stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]


class BpftraceView(View):
    """printf lines, then each map as a table of its largest entries, and each histogram's buckets."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, BpftraceOutput)
        term.lines(sample.printfs)
        maps: dict[str, list[tuple[str | None, Any]]] = {}
        for name, key, value in sample.maps:
            maps.setdefault(name, []).append((key, value))
        for name, entries in maps.items():
            if entries == [(None, entries[0][1])]:
                term.line(f"{name}: {entries[0][1]}")
                continue
            entries.sort(key=lambda kv: kv[1] if isinstance(kv[1], int | float) else 0, reverse=True)
            term.heading(name)
            term.table(["KEY", "VALUE"], entries[: self.max_rows])
        hists: dict[tuple[str, str | None], list[tuple[int | None, int | None, int]]] = {}
        for name, key, low, high, count in sample.buckets:
            hists.setdefault((name, key), []).append((low, high, count))
        for (name, key), buckets in hists.items():
            term.heading(name if key is None else f"{name}[{key}]")
            term.table(["LOW", "HIGH", "COUNT"], buckets)


def run_bpftrace(run: Run, program: str, max_rows: int) -> None:
    """Run ``program`` until Ctrl-C, SIGTERM or --duration, then show what it printed."""
    if run.pid or run.cgroup or run.interval:
        raise BpfscopeError(
            "--bpftrace runs the program as written: it takes no -p, --cgroup, --container or interval",
            hint="filter in the program (e.g. /pid == 1234/) and print its maps with interval probes",
        )
    from bpfscope.runtime.session import stop_on_signals
    from bpfscope.sinks.terminal import note

    # Run.run's loop, with the stop token also handed to the collector: bpftrace may end the run itself.
    with stop_on_signals() as stop:
        config = run.config(BpftraceConfig, program=program)
        collector = BpftraceCollector(config, ended=lambda: stop.set("bpftrace exited"))
        session = run.session([collector], BpftraceView(max_rows), stop)
        session.run(ready=lambda: note("Tracing with bpftrace... Ctrl-C to end."))
