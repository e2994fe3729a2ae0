#!/usr/bin/env python3
"""A custom tool on bpfscope's Python API: read(2) sizes and latency per process.

    custom_tool.py [-p PID] [--fd N] [--duration S] [--json] [-- COMMAND [ARGS...]]

With a COMMAND it starts the command, traces only that process (from its first instruction: the
command waits until the programs are attached) and reports when it exits. Otherwise it traces every
process (or -p PID) until Ctrl-C, SIGTERM or --duration.

It is written the way every bpfscope tool is (docs/architecture.md): a configuration (ReadsConfig), a
collector that owns the BPF object and returns typed samples (ReadsCollector), a record schema that the
JSON comes from, and a thin view for people; a Session runs it and hands the samples to a sink. The kernel
side is custom_tool.bpf.c, compiled here at start-up with bpfscope.build.compile_bpf (bpfscope's own tools
are compiled once, when the package is built); maps are read as numpy arrays whose layout comes from the
object's BTF.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpfscope.build import BuildError, compile_bpf
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.hist import Histogram
from bpfscope.runtime.schema import COMM, PID, Field, Schema
from bpfscope.runtime.session import Session, stop_on_signals
from bpfscope.sinks.jsonl import JsonLinesSink
from bpfscope.sinks.terminal import Terminal, TerminalSink, View, note

SOURCE = Path(__file__).resolve().with_name("custom_tool.bpf.c")
PERCENTILES = (50, 99)

READS = Schema(
    "custom_tool.reads",
    (
        PID,
        COMM,
        Field("reads", "int", doc="read(2) calls that returned, failed ones included"),
        Field("bytes", "int", "bytes"),
        Field("eof", "int", doc="reads that returned 0"),
        Field("errors", "int", doc="reads that failed"),
        Field("min_size", "int", "bytes", nullable=True),
        Field("max_size", "int", "bytes", nullable=True),
        Field("size", "dict", "bytes", "p50 and p99 of the sizes returned"),
        Field("latency_us", "dict", "us", "p50 and p99 of the time in read(2)"),
        Field("latency_count", "int"),
        Field("size_hist", "dict", doc="the log-linear histogram of sizes"),
    ),
    doc="One process's reads since the tool attached.",
)


@dataclass
class ProcessReads:
    pid: int
    comm: str
    reads: int
    bytes: int
    eof: int
    errors: int
    min_size: int | None
    max_size: int | None
    sizes: Histogram
    latency: Histogram

    def size_percentiles(self) -> dict[str, float | None]:
        """Percentiles of the returned sizes, kept inside the exact smallest and largest read."""
        out: dict[str, float | None] = {}
        for name, value in self.sizes.percentiles(PERCENTILES).items():
            if value is not None and self.min_size is not None and self.max_size is not None:
                value = min(max(value, float(self.min_size)), float(self.max_size))
            out[name] = value
        return out

    def latency_us(self) -> dict[str, float | None]:
        return {
            name: None if ns is None else round(ns / 1000, 3)
            for name, ns in self.latency.percentiles(PERCENTILES).items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "reads": self.reads,
            "bytes": self.bytes,
            "eof": self.eof,
            "errors": self.errors,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "size": self.size_percentiles(),
            "latency_us": self.latency_us(),
            "latency_count": self.latency.total,
            "size_hist": self.sizes.to_dict(),
        }


@dataclass(kw_only=True)
class ReadsConfig(Config):
    fd: int = -1  # only reads of this file descriptor (-1: all)


@dataclass
class ReadsSample(Sample):
    ts: float
    rows: list[ProcessReads]

    def records(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            yield READS.record({"ts": self.ts, **row.to_dict()})


class ReadsCollector(BpfCollector[ReadsConfig]):
    """read(2) per process, counted in the kernel; each sample is the totals since attach."""

    name = "custom_tool"
    requires = ("tracepoint",)  # root (or CAP_BPF + CAP_PERFMON), kernel BTF, tracepoint programs
    _schemas = (READS,)

    def __init__(self, config: ReadsConfig, object_path: Path) -> None:
        super().__init__(config)
        self._object_path = object_path

    def object_path(self) -> Path:  # type: ignore[override]
        return self._object_path  # compiled at start-up, not with the package

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "targ_fd": self.config.fd}

    def sample(self) -> ReadsSample:
        import time

        assert self.obj is not None
        return ReadsSample(time.time(), read_maps(self.obj))


def read_maps(obj: Any) -> list[ProcessReads]:
    """One ProcessReads per process, from the three maps."""
    keys, per_cpu = obj.maps["stats"].items()  # per_cpu: shape (processes, CPUs), BTF-typed fields
    size_keys, size_hists = obj.maps["sizes"].items()
    lat_keys, lat_hists = obj.maps["latency"].items()
    sizes = {int(k): Histogram(v["slots"], "loglin") for k, v in zip(size_keys, size_hists, strict=True)}
    latency = {int(k): Histogram(v["slots"], "loglin") for k, v in zip(lat_keys, lat_hists, strict=True)}
    empty = Histogram(np.zeros(0, dtype=np.uint64), "loglin")
    rows = []
    for key, cpus in zip(keys, per_cpu, strict=True):
        pid = int(key)
        ok = cpus["reads"] > cpus["errors"]  # CPUs that saw a successful read have a real min and max
        comm = next((c.decode(errors="replace") for c in cpus["comm"] if c), "?")
        rows.append(
            ProcessReads(
                pid=pid,
                comm=comm,
                reads=int(cpus["reads"].sum()),
                bytes=int(cpus["bytes"].sum()),
                eof=int(cpus["eof"].sum()),
                errors=int(cpus["errors"].sum()),
                min_size=int(cpus["min_size"][ok].min()) if ok.any() else None,
                max_size=int(cpus["max_size"][ok].max()) if ok.any() else None,
                sizes=sizes.get(pid, empty),
                latency=latency.get(pid, empty),
            )
        )
    return sorted(rows, key=lambda r: r.reads, reverse=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


class ReadsView(View):
    def __init__(self, top: int) -> None:
        self.top = top

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, ReadsSample)
        rows = sample.rows[: self.top]
        term.line(
            f"{'PID':>7} {'COMM':<16} {'READS':>8} {'BYTES':>12} {'EOF':>5} {'ERR':>5}"
            f" {'SIZE p50':>9} {'SIZE p99':>9} {'LAT p50 us':>10} {'LAT p99 us':>10}"
        )
        for row in rows:
            size, lat = row.size_percentiles(), row.latency_us()
            term.line(
                f"{row.pid:>7} {row.comm:<16} {row.reads:>8} {row.bytes:>12} {row.eof:>5} {row.errors:>5}"
                f" {_fmt(size['p50']):>9} {_fmt(size['p99']):>9}"
                f" {_fmt(lat['p50']):>10} {_fmt(lat['p99']):>10}"
            )
        if rows and rows[0].sizes.total:
            term.line(f"\nread sizes of pid {rows[0].pid} ({rows[0].comm}), bytes returned:")
            term.line(rows[0].sizes.ascii("bytes"))


class TopSink(JsonLinesSink):
    """JSON lines of the first ``top`` processes only."""

    def __init__(self, top: int) -> None:
        super().__init__()
        self.top = top

    def emit(self, collector: Any, sample: Sample) -> None:
        assert isinstance(sample, ReadsSample)
        super().emit(collector, ReadsSample(sample.ts, sample.rows[: self.top]))


def start_paused(command: list[str]) -> tuple[int, int]:
    """Fork COMMAND, held before exec until b"go" is written to the returned pipe end. If the pipe is
    closed without it (this process died before attaching), the child exits without running COMMAND."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the go, then become COMMAND
        try:
            os.close(write_end)
            if os.read(read_end, 2) != b"go":
                os._exit(1)
            os.close(read_end)
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"custom_tool: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        finally:
            os._exit(127)
    os.close(read_end)
    return pid, write_end


def wait_for(pid: int, session: Session) -> threading.Thread:
    """End the session when process ``pid`` exits (a child of ours: its exit status is kept)."""
    status: list[int] = []

    def watch() -> None:
        _, wait_status = os.waitpid(pid, 0)
        status.append(os.waitstatus_to_exitcode(wait_status))
        session.stop("the command exited")

    thread = threading.Thread(target=watch, daemon=True)
    thread.status = status  # type: ignore[attr-defined]
    thread.start()
    return thread


def watch_pid(pid: int, session: Session) -> None:
    """End the session when process ``pid`` (not ours) exits: its pidfd becomes readable."""
    fd = os.pidfd_open(pid)

    def watch() -> None:
        import select

        select.select([fd], [], [])
        os.close(fd)
        session.stop("the process exited")

    threading.Thread(target=watch, daemon=True).start()


def run(args: argparse.Namespace) -> int:
    """Trace until the command ends (or the process, Ctrl-C, SIGTERM, --duration); the command's exit
    status, like strace and time, or 0."""
    if args.pid and not Path(f"/proc/{args.pid}").exists():
        raise BpfscopeError(f"no process with pid {args.pid}")
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    child, go = start_paused(command) if command else (None, -1)
    # A command we start is our child: bpfscope leaves its own children out unless asked.
    config = ReadsConfig(pid=child or args.pid, fd=args.fd, include_self=child is not None)
    sink = TopSink(args.rows) if args.json else TerminalSink(ReadsView(args.rows))
    waiter: threading.Thread | None = None
    with tempfile.TemporaryDirectory(prefix="custom_tool.") as tmp, stop_on_signals() as stop:
        try:
            collector = ReadsCollector(config, compile_bpf(SOURCE, Path(tmp) / "custom_tool.bpf.o"))
            # No interval: one sample, the totals, when the run ends.
            session = Session([collector], [sink], duration=args.duration, stop=stop)

            def ready() -> None:
                nonlocal go, waiter
                note("Tracing read()... Ctrl-C to end.")
                if child is not None:
                    os.write(go, b"go")  # the command starts now
                    os.close(go)
                    go = -1
                    waiter = wait_for(child, session)
                elif args.pid:
                    watch_pid(args.pid, session)

            session.run(ready)
        finally:
            if go >= 0:
                os.close(go)  # never let go: the child exits without running the command
            if child is not None and waiter is None:
                os.waitpid(child, 0)
            elif waiter is not None:
                if waiter.is_alive():  # stopped early: do not leave the command behind
                    os.kill(child, signal.SIGTERM)  # type: ignore[arg-type]
                waiter.join()
    status = waiter.status[0] if waiter is not None and waiter.status else 0  # type: ignore[attr-defined]
    if status:
        print(f"custom_tool: the command exited with {status}", file=sys.stderr)
    return status if status > 0 else 128 - status if status < 0 else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="read(2) per process: count, bytes, EOF, errors, size and latency percentiles.",
        epilog="examples:\n"
        "  custom_tool.py -- dd if=/var/tmp/f of=/dev/null bs=64k   # one command, from its start\n"
        "  custom_tool.py --duration 5                             # every process for 5 s\n"
        "  custom_tool.py -p 1234 --fd 0 --json                    # one process's reads of stdin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--pid", type=int, help="only this process (tgid)")
    parser.add_argument("--fd", type=int, default=-1, help="only reads of this file descriptor")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--json", action="store_true", help="one JSON line per process")
    parser.add_argument("-r", "--rows", type=int, default=10, help="processes shown (default 10)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a command to run and trace")
    args = parser.parse_args(argv)
    if args.pid and args.command:
        parser.error("give -p PID or a command, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BpfscopeError, BuildError) as exc:
        print(exc.render() if isinstance(exc, BpfscopeError) else f"custom_tool: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
