#!/usr/bin/env python3
"""A custom tool on bpfscope's Python API: read(2) sizes and latency per process.

    custom_tool.py [-p PID] [--fd N] [--duration S] [--json] [-- COMMAND [ARGS...]]

With a COMMAND it starts the command, traces only that process (from its first instruction: the
command waits until the programs are attached) and reports when it exits. Otherwise it traces every
process (or -p PID) until Ctrl-C, SIGTERM or --duration.

The kernel side is custom_tool.bpf.c, compiled here at run time with bpfscope.build.compile_bpf into a
temporary directory (bpfscope's own tools are compiled once, when the package is built; an experiment
can do it at start-up). Then the same steps as every bpfscope tool: BpfObject, .rodata filters, load,
attach, and maps read as numpy arrays whose layout comes from the object's BTF.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bpfscope.build import BuildError, compile_bpf
from bpfscope.engine.bpf import BpfObject, require
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.hist import Histogram

SOURCE = Path(__file__).resolve().with_name("custom_tool.bpf.c")
PERCENTILES = (50, 99)


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


def compile_tool(out_dir: Path) -> Path:
    """custom_tool.bpf.c -> OUT_DIR/custom_tool.bpf.o, with bpfscope's headers on the include path."""
    return compile_bpf(SOURCE, out_dir / "custom_tool.bpf.o")


def read_maps(obj: BpfObject) -> list[ProcessReads]:
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


def report(rows: list[ProcessReads], as_json: bool, top: int) -> None:
    if as_json:
        for row in rows[:top]:
            print(json.dumps(row.to_dict()))
        return
    header = (
        f"{'PID':>7} {'COMM':<16} {'READS':>8} {'BYTES':>12} {'EOF':>5} {'ERR':>5}"
        f" {'SIZE p50':>9} {'SIZE p99':>9} {'LAT p50 us':>10} {'LAT p99 us':>10}"
    )
    print(header)
    for row in rows[:top]:
        size, lat = row.size_percentiles(), row.latency_us()
        print(
            f"{row.pid:>7} {row.comm:<16} {row.reads:>8} {row.bytes:>12} {row.eof:>5} {row.errors:>5}"
            f" {_fmt(size['p50']):>9} {_fmt(size['p99']):>9} {_fmt(lat['p50']):>10} {_fmt(lat['p99']):>10}"
        )
    if rows and rows[0].sizes.total:
        print(f"\nread sizes of pid {rows[0].pid} ({rows[0].comm}), bytes returned:")
        print(rows[0].sizes.ascii("bytes"))


class StopFlag:
    """SIGINT and SIGTERM end the run with the report, instead of a traceback."""

    def __init__(self) -> None:
        self.stopped = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True


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


def run(args: argparse.Namespace) -> int:
    """Trace until the command ends (or the process, Ctrl-C, SIGTERM, --duration); the command's exit
    status, like strace and time, or 0."""
    require("tracepoint")  # root (or CAP_BPF + CAP_PERFMON), kernel BTF, tracepoint programs
    if args.pid and not Path(f"/proc/{args.pid}").exists():
        raise BpfscopeError(f"no process with pid {args.pid}")
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    child, go = start_paused(command) if command else (None, -1)
    status = 0
    stop = StopFlag()
    with tempfile.TemporaryDirectory(prefix="custom_tool.") as tmp:
        try:
            obj_path = compile_tool(Path(tmp))
            rodata = {"targ_fd": args.fd, "bs_targ_tgid": child or args.pid or 0}
            with BpfObject(obj_path, rodata=rodata) as obj:
                obj.load()
                obj.attach()
                print("Tracing read()... Ctrl-C to end.", file=sys.stderr, flush=True)
                if child is not None:
                    os.write(go, b"go")  # the command starts now
                    os.close(go)
                    go = -1
                deadline = time.monotonic() + args.duration if args.duration else None
                while not stop.stopped and (deadline is None or time.monotonic() < deadline):
                    if child is not None:
                        done, wait_status = os.waitpid(child, os.WNOHANG)
                        if done:
                            status = os.waitstatus_to_exitcode(wait_status)
                            child = None
                            break
                    elif args.pid and not Path(f"/proc/{args.pid}").exists():
                        break
                    time.sleep(0.05)
                report(read_maps(obj), args.json, args.top)
        finally:
            if child is not None:  # stopped early, or failed before the start: do not leave it behind
                os.kill(child, signal.SIGTERM)
                os.waitpid(child, 0)
            if go >= 0:
                os.close(go)
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
    parser.add_argument("--top", type=int, default=10, help="processes shown (default 10)")
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
