"""bpfscope execsnoop: new processes as they start, with their argv, and (with --exits) as they end.

The kernel side (execsnoop.bpf.c) filters and sends one record per exec and per process exit through two
ring buffers; :class:`ExecsnoopCollector` decodes each drain of them into one :class:`ProcessBatch`, the
two streams merged in time order, and the view prints a line per event. It streams until Ctrl-C, SIGTERM
or --duration, and ends with how many events it showed and how many the kernel could not send.
"""

from __future__ import annotations

import errno
import shlex
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample, wall_clock_offset_ns
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses

EXEC_PROGRAMS = {"execve_enter", "execve_exit", "execveat_enter", "execveat_exit"}
EXIT_PROGRAM = "process_exit"


@dataclass(kw_only=True)
class ExecsnoopConfig(Config):
    failures: bool = False  # failed execs too (-x)
    only_failures: bool = False  # failed execs only (--only-fails)
    uid: int | None = None  # only this user's processes (-u)
    name: str | None = None  # only processes whose comm contains this (-n)
    ppid: int | None = None  # only this process and its descendants (--ppid)
    exits: bool = False  # process exits too (--exits)
    max_args: int = 20  # arguments kept per exec; more are marked truncated


@dataclass
class Exec:
    """An exec() as it returned."""

    ts: float  # wall-clock seconds
    pid: int
    ppid: int
    uid: int
    comm: str  # after a successful exec, the new program's
    ret: int
    filename: str  # the path given to exec
    args: list[str] | None  # None: the kernel could not read them
    args_truncated: bool

    @property
    def errno(self) -> str | None:
        return _errno_name(self.ret) if self.ret < 0 else None


@dataclass
class Exit:
    """A process's end: its last thread's exit."""

    ts: float
    pid: int
    ppid: int
    uid: int
    comm: str
    status: int  # as wait(2) gives it: code << 8 | terminating signal, 0x80 if it dumped core
    duration_s: float  # since the process was forked

    @property
    def signal_number(self) -> int:
        return self.status & 0x7F

    @property
    def exit_code(self) -> int | None:
        return None if self.signal_number else (self.status >> 8) & 0xFF

    @property
    def signal(self) -> str | None:
        return _signal_name(self.signal_number) if self.signal_number else None

    @property
    def core_dumped(self) -> bool:
        return bool(self.status & 0x80)


def _errno_name(ret: int) -> str:
    return errno.errorcode.get(-ret, str(ret))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def split_args(raw: bytes, truncated: bool, max_args: int) -> tuple[list[str], bool]:
    """argv from the NUL-separated bytes the kernel copied, at most ``max_args`` of them.

    When the kernel's copy was cut, its last string may be cut too; it is kept (it is what there is)
    and the whole marked truncated.
    """
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        # The NUL that ends the last complete string, not an empty argument.
        parts.pop()
    if len(parts) > max_args:
        parts = parts[:max_args]
        truncated = True
    return [p.decode(errors="replace") for p in parts], truncated


def _text(raw: bytes) -> str:
    """A C string from a fixed-size field (the bytes after its NUL are whatever the ring held)."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class ExecsnoopCollector(BpfCollector[ExecsnoopConfig]):
    """Every exec (and process exit, with ``exits``), streamed from two rings merged in time order."""

    name = "execsnoop"
    bpf_object = "execsnoop"
    requires = ("tracepoint", "ringbuf")

    def __init__(self, config: ExecsnoopConfig) -> None:
        super().__init__(config)
        # Events decoded per ring; the rings are named by what their records are.
        self.seen = {"execs": 0, **({"exits": 0} if config.exits else {})}

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (exec_schema(), exit_schema())

    def rodata(self) -> dict[str, Any]:
        config = self.config
        values = {
            **super().rodata(),
            "include_failed": config.failures or config.only_failures,
            "failed_only": config.only_failures,
        }
        # Unset filters keep the defaults execsnoop.bpf.c gives them (no filter).
        if config.uid is not None:
            values["targ_uid"] = config.uid
        if config.ppid is not None:
            if not Path(f"/proc/{config.ppid}").exists():
                raise BpfscopeError(f"no process with pid {config.ppid}")
            values["targ_ppid"] = config.ppid
        if config.name is not None:
            name = self.name_filter(config.name)
            values |= {"targ_name": name, "targ_name_len": len(name)}
        return values

    @classmethod
    def name_filter(cls, name: str) -> bytes:
        """The bytes the kernel looks for in comm; a name that could never match is an error."""
        encoded = name.encode()
        if not encoded:
            raise BpfscopeError("--name must not be empty")
        # comm holds its characters and a NUL.
        longest = cls.btf().pointee("bs_record__execs").field("comm").type.size - 1
        if len(encoded) > longest:
            prefix = encoded[:longest].decode(errors="ignore")
            raise BpfscopeError(
                f"--name {name!r} is longer than {longest} bytes and can never match a process name",
                hint=f"the kernel keeps only the first {longest}: use {prefix!r}",
            )
        return encoded

    def autoload(self) -> set[str]:
        return EXEC_PROGRAMS | ({EXIT_PROGRAM} if self.config.exits else set())

    def attach(self) -> None:
        super().attach()
        for ring in self.seen:
            self.ring(ring)
        self.wall_offset_ns = wall_clock_offset_ns()
        flags = dict(self.btf().enum("exec_args_flag"))
        self.truncated_flag, self.missing_flag = flags["ARGS_TRUNCATED"], flags["ARGS_MISSING"]

    def drain(self) -> ProcessBatch | None:
        execs = self.rings["execs"].read()
        exits = self.rings["exits"].read() if "exits" in self.rings else None
        if not len(execs) and (exits is None or not len(exits)):
            return None
        events: list[Exec | Exit] = list(self._execs(execs))
        self.seen["execs"] += len(execs)
        if exits is not None and len(exits):
            events += self._exits(exits)
            self.seen["exits"] += len(exits)
            events.sort(key=lambda event: event.ts)
        return ProcessBatch(events)

    def _seconds(self, ktime_ns: int) -> float:
        return round((ktime_ns + self.wall_offset_ns) / 1e9, 6)

    def _execs(self, batch: np.ndarray) -> Iterator[Exec]:
        # numpy strips trailing NULs from byte-string fields, and argv may end in empty arguments: the
        # exact bytes come from the records' raw memory, args_size long.
        raw = batch.tobytes()
        stride = batch.dtype.itemsize
        args_offset = batch.dtype.fields["args"][1]
        columns = zip(
            batch["ts"].tolist(),
            batch["pid"].tolist(),
            batch["ppid"].tolist(),
            batch["uid"].tolist(),
            batch["comm"].tolist(),
            batch["ret"].tolist(),
            batch["filename"].tolist(),
            batch["args_size"].tolist(),
            batch["flags"].tolist(),
            strict=True,
        )
        for i, (ts, pid, ppid, uid, comm, ret, filename, size, flags) in enumerate(columns):
            args: list[str] | None = None
            truncated = False
            if not flags & self.missing_flag:
                start = i * stride + args_offset
                args, truncated = split_args(
                    raw[start : start + size], bool(flags & self.truncated_flag), self.config.max_args
                )
            yield Exec(self._seconds(ts), pid, ppid, uid, _text(comm), ret, _text(filename), args, truncated)

    def _exits(self, batch: np.ndarray) -> Iterator[Exit]:
        columns = zip(
            batch["ts"].tolist(),
            batch["pid"].tolist(),
            batch["ppid"].tolist(),
            batch["uid"].tolist(),
            batch["comm"].tolist(),
            batch["exit_code"].tolist(),
            batch["duration_ns"].tolist(),
            strict=True,
        )
        for ts, pid, ppid, uid, comm, status, duration_ns in columns:
            yield Exit(self._seconds(ts), pid, ppid, uid, _text(comm), status, round(duration_ns / 1e9, 6))


UID = Field("uid", "int", doc="user id", label=True)


def _process_fields(event: Any) -> tuple[Field, ...]:
    """What exec and exit records share: who the process is."""
    return (
        PID,
        btf_field("ppid", event.field("ppid").type, doc="parent process id (real parent)", label=True),
        UID,
        COMM,
    )


@cache
def exec_schema() -> Schema:
    event = ExecsnoopCollector.btf().pointee("bs_record__execs")
    return Schema(
        "execsnoop.exec",
        (
            *_process_fields(event),
            btf_field("ret", event.field("ret").type, doc="exec's return value: 0, or -errno"),
            Field("errno", "str", nullable=True, doc="the error's name (ENOENT, ...) when ret < 0"),
            btf_field("filename", event.field("filename").type, doc="the path given to exec"),
            Field("args", "list", nullable=True, doc="argv; null when the kernel could not read it"),
            Field("args_truncated", "bool", doc="argv went on beyond what the kernel kept or --max-args"),
        ),
        doc="An exec() as it returned (failed ones with -x).",
    )


@cache
def exit_schema() -> Schema:
    event = ExecsnoopCollector.btf().pointee("bs_record__exits")
    return Schema(
        "execsnoop.exit",
        (
            *_process_fields(event),
            Field("exit_code", "int", nullable=True, doc="the code it exited with; null if a signal did"),
            Field("signal", "str", nullable=True, doc="the signal that ended it (SIGKILL, ...)"),
            Field("core_dumped", "bool"),
            Field("duration_s", "float", "s", "how long the process ran, since its fork"),
        ),
        doc="A process's end (with --exits).",
    )


@dataclass
class ProcessBatch(Sample):
    """Execs and exits that arrived since the previous drain, in time order."""

    events: list[Exec | Exit]

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> float:  # type: ignore[override]
        return self.events[-1].ts

    def records(self) -> Iterator[dict[str, Any]]:
        execs, exits = exec_schema(), exit_schema()
        for e in self.events:
            common = {"ts": e.ts, "pid": e.pid, "ppid": e.ppid, "uid": e.uid, "comm": e.comm}
            if isinstance(e, Exec):
                yield execs.record(
                    {
                        **common,
                        "ret": e.ret,
                        "errno": e.errno,
                        "filename": e.filename,
                        "args": e.args,
                        "args_truncated": e.args_truncated,
                    }
                )
            else:
                yield exits.record(
                    {
                        **common,
                        "exit_code": e.exit_code,
                        "signal": e.signal,
                        "core_dumped": e.core_dumped,
                        "duration_s": e.duration_s,
                    }
                )


# Control characters would break the one-line-per-event output (an argument may hold a newline).
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {ord("\n"): "\\n", ord("\t"): "\\t"}


def _shell_words(args: list[str]) -> str:
    # Quoted only where needed, so that `sh -c 'sleep 1; exit 3'` reads back as one argument.
    return " ".join(shlex.quote(a).translate(_CONTROL) for a in args)


class ExecsnoopView(View):
    """One line per event; EVENT tells execs from exits when both are shown."""

    def __init__(self, show_time: bool, show_elapsed: bool, show_kind: bool) -> None:
        self.show_time, self.show_elapsed, self.show_kind = show_time, show_elapsed, show_kind
        self.start = time.time()
        cells = []
        if show_time:
            cells.append(f"{'TIME':<8}")
        if show_elapsed:
            cells.append(f"{'TIME(s)':<8}")
        if show_kind:
            cells.append(f"{'EVENT':<5}")
        cells.append(f"{'UID':<6} {'PCOMM':<16} {'PID':<7} {'PPID':<7} {'RET':>6} ARGS")
        self.header = " ".join(cells)

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, ProcessBatch)
        term.lines([self.line(event) for event in sample.events])

    def line(self, e: Exec | Exit) -> str:
        if isinstance(e, Exec):
            kind, shown = "EXEC", e.errno or str(e.ret)
            if e.args is None:
                words = f"{e.filename} [arguments unreadable]" if e.filename else "[arguments unreadable]"
            else:
                words = _shell_words(e.args) + (" ..." if e.args_truncated else "")
        else:
            kind, shown = "EXIT", str(e.exit_code)
            if e.signal:
                shown = e.signal + ("+core" if e.core_dumped else "")
            words = f"[ran {e.duration_s:.3f}s]"
        cells = []
        if self.show_time:
            cells.append(datetime.fromtimestamp(e.ts).strftime("%H:%M:%S"))
        if self.show_elapsed:
            cells.append(f"{e.ts - self.start:<8.3f}")
        if self.show_kind:
            cells.append(f"{kind:<5}")
        cells.append(f"{e.uid:<6} {e.comm:<16} {e.pid:<7} {e.ppid:<7} {shown:>6} {words}")
        return " ".join(cells)

    def summary(self, collector: Collector, losses: Losses) -> str:
        assert isinstance(collector, ExecsnoopCollector)
        counts = ", ".join(f"{n} {ring}" for ring, n in collector.seen.items())
        return f"execsnoop: {counts} traced, {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope execsnoop                  # every exec() until Ctrl-C
  bpfscope execsnoop -x -T            # with failed execs and the time of day
  bpfscope execsnoop --exits -t       # also exits: exit code or signal, and how long it ran
  bpfscope execsnoop --ppid 1234      # only processes started under pid 1234 (any depth up to 16)
  bpfscope execsnoop -u 1000 --json   # one user's processes, JSON lines
  bpfscope execsnoop -n cron          # commands whose name contains "cron"
"""


@click.command(name="execsnoop", epilog=EXAMPLES)
@option("failures", "--fails", help="Include failed execs (RET shows the errno name).")
@click.option("--only-fails", is_flag=True, help="Only failed execs.")
@option("time")
@option("timestamp")
@option("uid")
@option(
    "name",
    help="Only processes whose name (comm, at most 15 characters: the new program's after an exec) "
    "contains this; matched in the kernel.",
)
@click.option(
    "--ppid", type=click.IntRange(min=1), help="Only this process and its descendants (up to 16 levels)."
)
@click.option("--exits", is_flag=True, help="Also show process exits: exit code or signal, and run time.")
@click.option(
    "--max-args",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Arguments shown per exec (the kernel keeps up to 4 KiB of them); more are marked '...'.",
)
@common_options
def command(
    run: Run,
    failures: bool,
    only_fails: bool,
    show_time: bool,
    show_elapsed: bool,
    uid: int | None,
    name: str | None,
    ppid: int | None,
    exits: bool,
    max_args: int,
) -> None:
    """New processes as they start: pid, parent, user, return value and argv; exits with --exits.

    Interval and count, if given, print a status line on stderr per interval and end the run after
    count intervals.
    """
    config = run.config(
        ExecsnoopConfig,
        failures=failures,
        only_failures=only_fails,
        uid=uid,
        name=name,
        ppid=ppid,
        exits=exits,
        max_args=max_args,
    )
    view = ExecsnoopView(show_time, show_elapsed, show_kind=exits)
    run.run(ExecsnoopCollector(config), view, "Tracing exec()... Ctrl-C to end.")
