"""bpfscope execsnoop: new processes as they start, with their argv, and (with --exits) as they end.

The kernel side (execsnoop.bpf.c) filters and sends one record per exec and per process exit through two
ring buffers; this side decodes them in batches, merges the two streams by time and prints a line per
event. It streams until Ctrl-C, SIGTERM or --duration, draining what the kernel had already sent before
it prints the summary, which always says how many events the kernel could not send.
"""

from __future__ import annotations

import errno
import json
import shlex
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.tool import RunOptions, tool_options
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.stream import stream_events

if TYPE_CHECKING:
    import numpy as np

REQUIRES = ("tracepoint", "ringbuf")

EXEC_PROGRAMS = {"execve_enter", "execve_exit", "execveat_enter", "execveat_exit"}
EXIT_PROGRAM = "process_exit"
# Flags of exec_event (execsnoop.bpf.c).
ARGS_TRUNCATED = 1
ARGS_MISSING = 2
# A comm holds at most this many characters (TASK_COMM_LEN - 1).
COMM_MAX = 15
NO_UID = 0xFFFFFFFF


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


# Control characters would break the one-line-per-event output (an argument may hold a newline).
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {ord("\n"): "\\n", ord("\t"): "\\t"}


def _shell_words(args: list[str]) -> str:
    # Quoted only where needed, so that `sh -c 'sleep 1; exit 3'` reads back as one argument.
    return " ".join(shlex.quote(a).translate(_CONTROL) for a in args)


class Formatter:
    """Turns batches of kernel records into output lines (human or JSON), with their timestamps."""

    def __init__(
        self,
        as_json: bool,
        max_args: int,
        show_time: bool,
        show_elapsed: bool,
        show_kind: bool,
        start_ns: int,
    ) -> None:
        self.as_json = as_json
        self.max_args = max_args
        self.show_time = show_time
        self.show_elapsed = show_elapsed
        self.show_kind = show_kind
        self.start_ns = start_ns
        # bpf_ktime_get_ns() and time.monotonic_ns() are both CLOCK_MONOTONIC: one offset gives wall time.
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()

    def header(self) -> str:
        cells = []
        if self.show_time:
            cells.append(f"{'TIME':<8}")
        if self.show_elapsed:
            cells.append(f"{'TIME(s)':<8}")
        if self.show_kind:
            cells.append(f"{'EVENT':<5}")
        cells.append(f"{'UID':<6} {'PCOMM':<16} {'PID':<7} {'PPID':<7} {'RET':>6} ARGS")
        return " ".join(cells)

    def _prefix(self, ts: int, kind: str) -> str:
        cells = []
        if self.show_time:
            cells.append(datetime.fromtimestamp((ts + self.wall_offset_ns) / 1e9).strftime("%H:%M:%S"))
        if self.show_elapsed:
            cells.append(f"{(ts - self.start_ns) / 1e9:<8.3f}")
        if self.show_kind:
            cells.append(f"{kind:<5}")
        return " ".join(cells) + " " if cells else ""

    def _common(self, kind: str, ts: int, rec: np.void) -> dict[str, Any]:
        return {
            "event": kind,
            "time": round((ts + self.wall_offset_ns) / 1e9, 6),
            "elapsed": round((ts - self.start_ns) / 1e9, 6),
            "pid": int(rec["pid"]),
            "ppid": int(rec["ppid"]),
            "uid": int(rec["uid"]),
            "comm": rec["comm"].decode(errors="replace"),
        }

    def execs(self, batch: np.ndarray) -> Iterator[tuple[int, str]]:
        # numpy strips trailing NULs from byte-string fields, and argv may end in empty arguments:
        # the exact bytes come from the records' raw memory, args_size long.
        raw = batch.tobytes()
        stride = batch.dtype.itemsize
        args_offset = batch.dtype.fields["args"][1]
        for i, rec in enumerate(batch):
            ts = int(rec["ts"])
            ret = int(rec["ret"])
            flags = int(rec["flags"])
            start = i * stride + args_offset
            if flags & ARGS_MISSING:
                args: list[str] | None = None
                truncated = False
            else:
                args, truncated = split_args(
                    raw[start : start + int(rec["args_size"])], bool(flags & ARGS_TRUNCATED), self.max_args
                )
            filename = rec["filename"].split(b"\0", 1)[0].decode(errors="replace")
            if self.as_json:
                record = self._common("exec", ts, rec)
                record.update(
                    ret=ret,
                    errno=_errno_name(ret) if ret < 0 else None,
                    filename=filename,
                    args=args,
                    args_truncated=truncated,
                )
                yield ts, json.dumps(record)
                continue
            if args is None:
                words = f"{filename} [arguments unreadable]" if filename else "[arguments unreadable]"
            else:
                words = _shell_words(args) + (" ..." if truncated else "")
            shown_ret = _errno_name(ret) if ret < 0 else str(ret)
            yield (
                ts,
                (
                    f"{self._prefix(ts, 'EXEC')}{rec['uid']:<6} {rec['comm'].decode(errors='replace'):<16} "
                    f"{rec['pid']:<7} {rec['ppid']:<7} {shown_ret:>6} {words}"
                ),
            )

    def exits(self, batch: np.ndarray) -> Iterator[tuple[int, str]]:
        for rec in batch:
            ts = int(rec["ts"])
            status = int(rec["exit_code"])
            # A wait(2) status: the low 7 bits are the signal that killed it, 0x80 a core dump.
            signo = status & 0x7F
            core = bool(status & 0x80)
            code = (status >> 8) & 0xFF
            duration = int(rec["duration_ns"]) / 1e9
            if self.as_json:
                record = self._common("exit", ts, rec)
                record.update(
                    exit_code=None if signo else code,
                    signal=_signal_name(signo) if signo else None,
                    core_dumped=core,
                    duration=round(duration, 6),
                )
                yield ts, json.dumps(record)
                continue
            shown = (_signal_name(signo) + ("+core" if core else "")) if signo else str(code)
            yield (
                ts,
                (
                    f"{self._prefix(ts, 'EXIT')}{rec['uid']:<6} {rec['comm'].decode(errors='replace'):<16} "
                    f"{rec['pid']:<7} {rec['ppid']:<7} {shown:>6} [ran {duration:.3f}s]"
                ),
            )


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
@click.option("-x", "--fails", is_flag=True, help="Include failed execs (RET shows the errno name).")
@click.option("--only-fails", is_flag=True, help="Only failed execs.")
@click.option("-T", "--time", "show_time", is_flag=True, help="Show the time of day (HH:MM:SS).")
@click.option("-t", "--timestamp", "show_elapsed", is_flag=True, help="Show seconds since tracing started.")
@click.option("-u", "--uid", type=click.IntRange(0, NO_UID - 1), help="Only processes of this user id.")
@click.option(
    "-n",
    "--name",
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
@tool_options
def command(
    opts: RunOptions,
    fails: bool,
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
    name_bytes = name.encode() if name is not None else b""
    if name is not None and not name_bytes:
        raise BpfscopeError("--name must not be empty")
    if len(name_bytes) > COMM_MAX:
        prefix = name_bytes[:COMM_MAX].decode(errors="ignore")
        raise BpfscopeError(
            f"--name {name!r} is longer than {COMM_MAX} bytes and can never match a process name",
            hint=f"the kernel keeps only the first {COMM_MAX}: use {prefix!r}",
        )
    if ppid is not None and not Path(f"/proc/{ppid}").exists():
        raise BpfscopeError(f"no process with pid {ppid}")
    require(*REQUIRES)
    rodata = {
        **opts.filters(),
        "targ_uid": NO_UID if uid is None else uid,
        "targ_ppid": ppid or 0,
        "targ_name": name_bytes,
        "targ_name_len": len(name_bytes),
        "include_failed": fails or only_fails,
        "failed_only": only_fails,
    }
    autoload = EXEC_PROGRAMS | ({EXIT_PROGRAM} if exits else set())
    with BpfObject(tool_object("execsnoop"), rodata=rodata, autoload=autoload) as obj:
        obj.attach()
        rings = {"execs": obj.ring_buffer("events")}
        if exits:
            rings["exits"] = obj.ring_buffer("exits")
        fmt = Formatter(opts.as_json, max_args, show_time, show_elapsed, exits, time.monotonic_ns())

        def render(ring: str, batch: np.ndarray) -> Iterator[tuple[int, str]]:
            return fmt.execs(batch) if ring == "execs" else fmt.exits(batch)

        stream_events("execsnoop", "exec()", obj, rings, render, opts, header=fmt.header())
