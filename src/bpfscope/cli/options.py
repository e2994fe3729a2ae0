"""One CLI vocabulary: each flag is defined here once, with one meaning in every tool.

    @click.command(name="biotop", epilog=EXAMPLES)
    @option("disk")
    @option("sort", choices=SORTS, default="ios")
    @common_options
    def command(run: Run, disk, sort): ...

:func:`common_options` gives every tool ``-p/--pid``, ``--cgroup``, ``--container``, ``--json``,
``--duration``, ``--include-self`` and the positional ``[interval [count]]``, and hands the command a
:class:`Run`. :func:`option` takes a vocabulary entry; a tool may change its help, default, choices or
metavar, never its flags. Where a BCC tool spells an option otherwise, that spelling stays as an alias in
that tool only (:data:`BCC_ALIASES`). The conformance test holds every registered tool to this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Config
    from bpfscope.runtime.session import Session
    from bpfscope.sinks.terminal import View

F = TypeVar("F", bound=Callable[..., Any])


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and value <= 0:
        raise click.BadParameter("must be greater than 0")
    return value


@dataclass(frozen=True)
class Spec:
    flags: tuple[str, ...]
    dest: str
    help: str
    kwargs: tuple[tuple[str, Any], ...] = ()


def _spec(flags: Sequence[str], dest: str, help: str, **kwargs: Any) -> Spec:
    return Spec(tuple(flags), dest, help, tuple(kwargs.items()))


# name -> the one spelling and meaning of that option.
VOCABULARY: dict[str, Spec] = {
    # Task filters and output: every tool (common_options).
    "pid": _spec(["-p", "--pid"], "pid", "Only this process (tgid).", type=int, callback=_positive),
    "cgroup": _spec(
        ["--cgroup"], "cgroup", "Only tasks in this cgroup v2 (path under its mount).", metavar="PATH"
    ),
    "container": _spec(
        ["--container"], "container", "Only this container's tasks (its id or a prefix).", metavar="ID"
    ),
    "json": _spec(["--json"], "as_json", "JSON lines on stdout instead of tables.", is_flag=True),
    "duration": _spec(
        ["--duration"], "duration", "Stop after this many seconds.", type=float, callback=_positive
    ),
    "include_self": _spec(
        ["--include-self"],
        "include_self",
        "Also watch bpfscope's own process and its children.",
        is_flag=True,
    ),
    # What a tool shows.
    "disk": _spec(["-d", "--disk"], "disk", "Only this disk (vda, /dev/vda or major:minor).", metavar="DISK"),
    "per_disk": _spec(["-D", "--disks"], "per_disk", "One row (or histogram) per disk.", is_flag=True),
    "per_flags": _spec(
        ["-F", "--flags"], "per_flags", "One histogram per operation and flags.", is_flag=True
    ),
    "per_process": _spec(["-P", "--per-process"], "per_process", "One row per process.", is_flag=True),
    "rows": _spec(["-r", "--rows"], "max_rows", "Rows shown.", type=click.IntRange(min=0), show_default=True),
    "sort": _spec(["-s", "--sort"], "sort", "Sort by this column.", show_default=True),
    "noclear": _spec(
        ["-C", "--noclear"], "noclear", "Do not clear the screen between intervals.", is_flag=True
    ),
    "time": _spec(["-T", "--time"], "show_time", "Show the time of day (HH:MM:SS).", is_flag=True),
    "timestamp": _spec(
        ["-t", "--timestamp"], "show_elapsed", "Show seconds since tracing started.", is_flag=True
    ),
    "count": _spec(["-c", "--count"], "count_mode", "Count instead of printing each event.", is_flag=True),
    "latency": _spec(["-L", "--latency"], "latency", "Measure latency.", is_flag=True),
    "queued": _spec(
        ["-Q", "--queued"], "queued", "Include the time queued in the I/O scheduler.", is_flag=True
    ),
    "millis": _spec(["-m", "--milliseconds"], "millis", "Show milliseconds, not microseconds.", is_flag=True),
    "failures": _spec(["-x", "--failures"], "failures", "Failures.", is_flag=True),
    "uid": _spec(
        ["-u", "--uid"], "uid", "Only processes of this user id.", type=click.IntRange(0, 0xFFFFFFFE)
    ),
    "name": _spec(["-n", "--name"], "name", "Only processes whose name contains this.", metavar="NAME"),
    "lport": _spec(
        ["--lport"], "lport", "Only this local port.", type=click.IntRange(1, 65535), metavar="PORT"
    ),
    "dport": _spec(
        ["--dport"], "dport", "Only this remote port.", type=click.IntRange(1, 65535), metavar="PORT"
    ),
    "filter": _spec(
        ["-f", "--filter"], "filter_text", "Only events where EXPR holds (in kernel).", metavar="EXPR"
    ),
    # Tools that write a file (the profilers).
    "output": _spec(["-o", "--output"], "output", "Write to this file.", metavar="FILE"),
    "format": _spec(["--format"], "format", "Format of the output."),
    # Tools that account a system's parts apart (tsa, bench).
    "components": _spec(
        ["--components"], "components", "The components to account apart: NAME=SELECTOR,...", metavar="SPEC"
    ),
}

# (tool, BCC's flag) -> the vocabulary entry it stands for in that tool only.
BCC_ALIASES: dict[tuple[str, str], str] = {
    ("tcplife", "-L"): "lport",
    ("tcplife", "-D"): "dport",
    ("syscount", "--process"): "per_process",
    ("execsnoop", "--fails"): "failures",
    ("syscount", "--top"): "rows",
    ("trace", "--top"): "rows",
}


def option(name: str, *aliases: str, **overrides: Any) -> Callable[[F], F]:
    """A vocabulary entry as a click option. ``aliases`` are BCC spellings declared in BCC_ALIASES;
    ``overrides`` may change help, default, choices (a list: click.Choice), metavar or show_default."""
    spec = VOCABULARY[name]
    allowed = {"help", "default", "choices", "metavar", "show_default", "type", "multiple", "hidden"}
    if not overrides.keys() <= allowed:
        raise TypeError(f"option {name}: cannot override {', '.join(overrides.keys() - allowed)}")
    kwargs = dict(spec.kwargs)
    kwargs["help"] = spec.help
    choices = overrides.pop("choices", None)
    if choices is not None:
        kwargs["type"] = click.Choice(list(choices))
    kwargs.update(overrides)
    return click.option(*spec.flags, *aliases, spec.dest, **kwargs)


@dataclass
class Run:
    """What the shared options give a tool: the task filter for its configuration, the intervals for
    its session, and whether output is JSON."""

    interval: float | None = None
    count: int | None = None
    pid: int | None = None
    cgroup: str | None = None
    as_json: bool = False
    duration: float | None = None
    include_self: bool = False

    def filters(self) -> dict[str, Any]:
        """The Config fields every collector takes."""
        return {"pid": self.pid, "cgroup": self.cgroup, "include_self": self.include_self}

    def config(self, cls: type[Config], **options: Any) -> Any:
        return cls(**self.filters(), **options)

    def session(self, collectors: Sequence[Collector], view: View, stop: Any = None) -> Session:
        from bpfscope.runtime.session import Session

        if self.as_json:
            from bpfscope.sinks.jsonl import JsonLinesSink

            sink: Any = JsonLinesSink(view=view)
        else:
            from bpfscope.sinks.terminal import TerminalSink

            sink = TerminalSink(view)
        return Session(
            collectors,
            [sink],
            interval=self.interval,
            count=self.count,
            duration=self.duration,
            stop=stop,
            from_attach=True,
        )

    def run(self, collector: Collector | Sequence[Collector], view: View, note: str | None = None) -> Session:
        """Run collectors until Ctrl-C, SIGTERM, --duration or the count, with the view on a terminal or
        JSON lines. ``note`` ("Tracing block I/O...") goes to stderr once the programs are attached."""
        from bpfscope.runtime.session import stop_on_signals
        from bpfscope.sinks.terminal import note as say

        collectors = [collector] if not isinstance(collector, Sequence) else list(collector)
        with stop_on_signals() as stop:
            session = self.session(collectors, view, stop)
            session.run(ready=(lambda: say(note)) if note else None)
        return session


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options and arguments every tool takes; the command function gets ``run: Run``."""

    def wrapper(**kwargs: Any) -> Any:
        container = kwargs.pop("container")
        run = Run(
            interval=kwargs.pop("interval"),
            count=kwargs.pop("count"),
            pid=kwargs.pop("pid"),
            cgroup=kwargs.pop("cgroup"),
            as_json=kwargs.pop("as_json"),
            duration=kwargs.pop("duration"),
            include_self=kwargs.pop("include_self"),
        )
        if run.pid and not Path(f"/proc/{run.pid}").exists():
            raise BpfscopeError(f"no process with pid {run.pid}")
        if container:
            if run.cgroup:
                raise BpfscopeError("--cgroup and --container both select a cgroup: give one")
            from bpfscope.sources.cgroups import container_cgroup

            run.cgroup = container_cgroup(container)
        return func(run=run, **kwargs)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    decorators = [
        click.argument("count", type=int, required=False, callback=_positive),
        click.argument("interval", type=float, required=False, callback=_positive),
        option("include_self"),
        option("duration"),
        option("json"),
        option("container"),
        option("cgroup"),
        option("pid"),
    ]
    for decorate in decorators:
        wrapper = decorate(wrapper)
    return wrapper


def top_options(sorts: Sequence[str], default: str, sort_help: str, rows: int = 20) -> Callable[[F], F]:
    """What top-like tools share: ``-s/--sort``, ``-r/--rows`` and ``-C/--noclear``."""

    def decorate(func: F) -> F:
        func = option("noclear")(func)
        func = option("rows", default=rows)(func)
        return option("sort", choices=sorts, default=default, help=sort_help)(func)

    return decorate
