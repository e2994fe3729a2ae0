"""bpfscope profile: where the CPU goes, as stacks sampled on every CPU.

The kernel side (profile.bpf.c) samples each CPU on the software cpu-clock event (19 Hz by default: a
prime, so it does not beat with periodic work). With ``--unwind fp`` it counts the samples per thread,
user stack (walked by frame pointers) and kernel stack in a map, so only distinct stacks cross to user
space, once per window. With ``--unwind dwarf`` (the default) each sample's user stack is copied and
unwound here from the binaries' .eh_frame (unwind.py), right for code built without frame pointers.
A :class:`~bpfscope.domains.profile.tracker.Tracker` thread holds the memory map of every process
sampled while it lives, so its frames can be named after it exits (collect.py).

Each window (the whole run, or ``interval`` seconds) is a profile of named frames. The terminal shows its
hottest functions; ``-o FILE`` writes the run's profile as folded stacks, pprof, speedscope or an HTML
flame graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import click

from bpfscope.cli.options import Run, common_options
from bpfscope.domains.profile import diff
from bpfscope.domains.profile.collect import (
    CONTINUOUS_WINDOW_S,
    Continuous,
    ProfileView,
    StackCollector,
    StackConfig,
    run_profile,
    stack_choice,
    stack_options,
)
from bpfscope.domains.profile.profiles import Profile
from bpfscope.sinks.store import parse_age, parse_size

DEFAULT_HZ = 19
DEFAULT_STORE = "/var/lib/bpfscope/store"
# A sample's record in the ring with its stack copy, at most (struct user_sample).
RECORD_BYTES = 14 << 10


@dataclass(kw_only=True)
class ProfileConfig(StackConfig):
    frequency_hz: int = DEFAULT_HZ


class ProfileCollector(StackCollector[ProfileConfig]):
    """On-CPU stacks; each sample is one window's profile."""

    name = "profile"
    bpf_object = "profile"
    requires = ("perf_event",)
    kind = "cpu"

    def max_entries(self) -> dict[str, int]:
        """The copies' ring holds a second of samples at the rate asked for (a copy is 9-14 KiB): 1 MiB
        at 19 Hz on 2 CPUs, 32 MiB at 997 Hz; the thread unwinding them reads it 10 times a second."""
        if not self.dwarf:
            return {"user_samples": 4096 * 16}  # unused without copies: its smallest
        wanted = self.config.frequency_hz * (os.cpu_count() or 1) * RECORD_BYTES
        size = 1 << 20
        while size < min(wanted, 32 << 20):
            size <<= 1
        return {"user_samples": size}

    def attach_programs(self) -> None:
        assert self.obj is not None
        self.idle_before = 0
        self.obj.programs["on_sample"].attach_sampling(self.config.frequency_hz)

    @property
    def period_ns(self) -> int:
        return 1_000_000_000 // self.config.frequency_hz

    def weigh(self, value: Any) -> tuple[int, int]:
        samples = int(value)
        return samples, samples * self.period_ns

    def ring_weight(self, samples: int, weight_ns: int) -> int:
        return samples * self.period_ns

    def new_profile(self) -> Profile:
        assert self.obj is not None
        idle = int(self.obj.bss["idle_samples"])
        profile = Profile(
            kind="cpu", frequency_hz=self.config.frequency_hz, idle_samples=idle - self.idle_before
        )
        self.idle_before = idle
        return profile

    def start(self) -> None:
        assert self.obj is not None
        super().start()
        self.idle_before = int(self.obj.bss["idle_samples"])


class ProfileCommand(click.Group):
    """``bpfscope profile [options] [interval [count]]`` profiles; ``bpfscope profile diff A B`` compares
    two profiles. A group whose own arguments are the profiler's, unless the first is a subcommand."""

    allow_interspersed_args = True  # options after [interval [count]], as every tool takes them

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.commands:
            ctx.meta["bpfscope.subcommand"] = (args[0], args[1:])
            return []
        return click.Command.parse_args(self, ctx, args)

    def invoke(self, ctx: click.Context) -> object:
        if "bpfscope.subcommand" in ctx.meta:
            name, args = ctx.meta["bpfscope.subcommand"]
            sub = self.commands[name]
            # Its path is "bpfscope profile diff", without the profiler's own arguments.
            with sub.make_context(f"{ctx.info_name} {name}", args, parent=ctx.parent) as sub_ctx:
                return sub.invoke(sub_ctx)
        return click.Command.invoke(self, ctx)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[OPTIONS] [INTERVAL] [COUNT] | diff A B")


EXAMPLES = """
\b
Examples:
  bpfscope profile --duration 30                # hottest functions of the whole machine over 30 s
  bpfscope profile -p 1234 -o cpu.html          # one process; an interactive flame graph
  bpfscope profile --frequency 99 -o cpu.pb.gz  # pprof, for go tool pprof, Pyroscope or Parca
  bpfscope profile --format folded > out.folded # folded stacks for flamegraph.pl or inferno
  bpfscope profile --kernel-only 10 3           # kernel stacks, a profile every 10 s, 3 times
  bpfscope profile diff before.pb.gz after.pb.gz -o diff.html   # what changed, as a flame graph
  bpfscope profile --continuous --keep 3d       # always on: a profile every 10 s into the store
  bpfscope profile diff --store /var/lib/bpfscope/store 14:00..14:10 15:00..15:10 -p 1234
"""


@click.group(name="profile", cls=ProfileCommand, epilog=EXAMPLES, invoke_without_command=True)
@click.option(
    "--frequency",
    type=click.IntRange(1, 1000),
    default=DEFAULT_HZ,
    show_default=True,
    metavar="HZ",
    help="Samples per second on each CPU (19 costs least; 49 or 99 for short runs).",
)
@click.option(
    "--continuous",
    is_flag=True,
    help="Run until stopped, writing a profile every 10 s (or every interval) into the store.",
)
@click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    metavar="DIR",
    help="The store --continuous writes to (and profile diff --store reads).",
)
@click.option("--keep", default="7d", show_default=True, metavar="AGE", help="Keep this long (--continuous).")
@click.option(
    "--max-size",
    default="1GB",
    show_default=True,
    metavar="SIZE",
    help="Keep at most this much (--continuous).",
)
@stack_options
@common_options
def command(
    run: Run,
    frequency: int,
    continuous: bool,
    store: str,
    keep: str,
    max_size: str,
    unwind: str,
    kernel_only: bool,
    user_only: bool,
    format: str | None,
    output: str | None,
    max_rows: int,
) -> None:
    """Sample the stacks of every CPU (or of -p, --cgroup, --container) and show where the CPU goes.

    User stacks are unwound from the binaries' .eh_frame (right without frame pointers; Go by its own
    tables), or with --unwind fp walked by frame pointers and counted in the kernel (cheapest); either
    way CPython 3.11's Python functions stand in place of the interpreter's frames. Without -o the
    hottest functions are shown (TOTAL%: samples with the function on the stack; SELF%: samples in the
    function itself), with the reasons any frame stayed unnamed and, per executable, how many stacks
    reached their root. An interval gives one profile per interval; --continuous writes one every 10 s
    into the store. -o FILE writes the run's profile; its format follows the file's name (.html, .pb.gz,
    .folded, .json for speedscope) unless --format says otherwise. `bpfscope profile diff A B` compares
    two profiles.
    """
    config = run.config(ProfileConfig, frequency_hz=frequency, **stack_choice(kernel_only, user_only, unwind))
    what = f"process {run.pid}" if run.pid else "every CPU"
    kept = Continuous(store, parse_age(keep), parse_size(max_size)) if continuous else None
    where = f", a profile every {run.interval or CONTINUOUS_WINDOW_S:g} s into {store}" if continuous else ""
    run_profile(
        run,
        ProfileCollector(config),
        ProfileView(max_rows),
        output,
        format,
        f"Tracing on-CPU stacks of {what} at {frequency} Hz{where}... Ctrl-C to end.",
        kept,
    )


command.add_command(diff.command)
