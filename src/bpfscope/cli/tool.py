"""Conventions every tool shares, set once: ``bpfscope TOOL [options] [interval [count]]``.

Options: -p/--pid, --cgroup, --json, --duration; interval output; Ctrl-C or SIGTERM ends the run with the
final summary. The kernel-side filters for -p and --cgroup live in bpfscope.bpf.h.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from bpfscope.errors import BpfscopeError
from bpfscope.sinks.output import Output


@dataclass
class RunOptions:
    interval: float | None = None
    count: int | None = None
    pid: int | None = None
    cgroup: str | None = None
    as_json: bool = False
    duration: float | None = None

    @cached_property
    def output(self) -> Output:
        return Output(self.as_json)

    def filters(self) -> dict[str, int]:
        """The .rodata values for bpfscope.bpf.h's task filter."""
        return {"bs_targ_tgid": self.pid or 0, "bs_targ_cgroup": cgroup_id(self.cgroup) if self.cgroup else 0}


def cgroup2_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            mounts.append(Path(parts[1]))
    return mounts


def cgroup_id(path: str) -> int:
    """The id bpf_get_current_cgroup_id() returns for a cgroup v2 directory: its inode number."""
    candidates = [Path(path)] + [m / path.lstrip("/") for m in cgroup2_mounts()]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.resolve().is_relative_to(m) for m in cgroup2_mounts()):
            return candidate.stat().st_ino
    raise BpfscopeError(
        f"no cgroup v2 directory {path!r}",
        hint="give a path under " + (", ".join(map(str, cgroup2_mounts())) or "a cgroup2 mount"),
    )


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and value <= 0:
        raise click.BadParameter("must be greater than 0")
    return value


def tool_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options and arguments to a tool's click command; the function gets ``opts``."""
    options = [
        click.argument("count", type=int, required=False, callback=_positive),
        click.argument("interval", type=float, required=False, callback=_positive),
        click.option("--duration", type=float, callback=_positive, help="Stop after this many seconds."),
        click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout instead of tables."),
        click.option("--cgroup", metavar="PATH", help="Only tasks in this cgroup v2 (path under its mount)."),
        click.option("-p", "--pid", type=int, callback=_positive, help="Only this process (tgid)."),
    ]

    def wrapper(**kwargs: Any) -> Any:
        opts = RunOptions(
            interval=kwargs.pop("interval"),
            count=kwargs.pop("count"),
            pid=kwargs.pop("pid"),
            cgroup=kwargs.pop("cgroup"),
            as_json=kwargs.pop("as_json"),
            duration=kwargs.pop("duration"),
        )
        if opts.pid and not Path(f"/proc/{opts.pid}").exists():
            raise BpfscopeError(f"no process with pid {opts.pid}")
        return func(opts=opts, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    for option in options:
        wrapper = option(wrapper)
    return wrapper


class Stop(Exception):
    """Raised from SIGTERM so that every context manager closes and the summary prints."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stop()


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C (or kill -INT) must still end a run.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def ticks(
    opts: RunOptions, note: str | None = None, default_interval: float | None = None
) -> Iterator[float]:
    """Yield seconds since start at each interval until count, then once more at the end (duration over,
    Ctrl-C or SIGTERM), so the last, partial interval is always shown. With no interval it yields once,
    at the end.

    SIGINT and SIGTERM only end the wait (as in core.stream): a signal that arrives while the tool reads
    its maps or prints cannot cut the output short. ``note`` ("Tracing ...") goes to stderr once the
    signals are caught, so that whoever waits for it may stop the tool at once.
    """
    import select

    from bpfscope.runtime.stream import stop_requests

    with stop_requests() as stop:
        if note:
            opts.output.note(note)
        start = time.monotonic()
        interval = opts.interval or default_interval
        deadline = start + opts.duration if opts.duration else None
        next_tick = start + interval if interval else None
        done = 0
        while True:
            wakes = [t for t in (next_tick, deadline) if t is not None]
            timeout = max(0.0, min(wakes) - time.monotonic()) if wakes else None
            if select.select([stop.wake_fd], [], [], timeout)[0] and not stop:
                # Woken by another signal's byte: take it out, or the next wait would not wait.
                os.read(stop.wake_fd, 512)
            now = time.monotonic()
            if stop or (deadline is not None and now >= deadline - 1e-3):
                yield now - start
                return
            if next_tick is not None and now >= next_tick:
                done += 1
                yield now - start
                if opts.count and done >= opts.count:
                    return
                next_tick += interval or 0.0
