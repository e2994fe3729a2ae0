"""bpfscope offcputime: where threads wait, as the time they spend blocked per stack.

The kernel side (offcputime.bpf.c) follows the scheduler's switches (tp_btf/sched_switch, or the raw
tracepoint where BTF tracepoints are missing): a selected thread that leaves the CPU blocked has its
stacks and the time recorded, and when it runs again the time it was off the CPU is added to them, if it
is at least ``--min-block``. Stacks, symbols and outputs are the profiler's (collect.py): the same
unwinding (``--unwind dwarf`` by default: the user stack is copied as the thread leaves its system call,
when it is the one it blocked with) and the same files (folded stacks count microseconds).

``--wakers`` counts each block's time under the stacks of the task that woke the thread instead (from
``sched_waking``, in the waker's own context, walked by frame pointers: there is no later moment in the
waker's context to copy its stack at), as BCC's wakeuptime does: who ends the waits of the threads
selected, and from where. A wake-up from an interrupt (a timer ending a sleep) counts under the task the
interrupt found running, its kernel stack showing the interrupt; as in wakeuptime, its user stack is
that task's, not a waker's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from bpfscope.cli.options import Run, common_options
from bpfscope.domains.profile.collect import (
    ProfileView,
    StackCollector,
    StackConfig,
    run_profile,
    stack_choice,
    stack_options,
)
from bpfscope.errors import BpfscopeError

# Which scheduler states count (prev_state bits): sleeping (S: TASK_INTERRUPTIBLE), waiting in the
# kernel (D: TASK_UNINTERRUPTIBLE, disk I/O mostly), any blocked state, or also runnable waits after
# preemption (time spent waiting for a CPU).
STATES = {"blocked": (0, False), "sleeping": (1, False), "disk": (2, False), "all": (0, True)}


@dataclass(kw_only=True)
class OffcputimeConfig(StackConfig):
    min_block_us: float = 1.0
    state: str = "blocked"
    wakers: bool = False  # blocked time under the waker's stacks (frame pointers)


class OffcputimeCollector(StackCollector[OffcputimeConfig]):
    """Blocked time per thread and stack; each sample is one window's off-CPU profile."""

    name = "offcputime"
    bpf_object = "offcputime"
    requires = ("raw_tracepoint",)
    kind = "offcpu"
    loss_counters = {
        "counts_dropped": ("map_full", "blocks not counted (too many distinct stacks)"),
        "blocked_dropped": ("map_full", "blocks not timed (too many threads blocked at once)"),
        "ends_unseen": ("unseen", "blocks timed to the thread's next switch out (its switch-in unseen)"),
    }

    def rodata(self) -> dict[str, Any]:
        if self.config.state not in STATES:
            raise BpfscopeError(f"unknown state {self.config.state!r} (one of {', '.join(STATES)})")
        mask, preempted = STATES[self.config.state]
        return {
            **super().rodata(),
            "min_block_ns": int(self.config.min_block_us * 1000),
            "state_mask": mask,
            "with_preempted": preempted,
            "wakers": self.config.wakers,
        }

    @property
    def dwarf(self) -> bool:
        # A waker's stack is taken as it wakes the thread, in its context: walked by frame pointers.
        return super().dwarf and not self.config.wakers

    # The BTF tracepoints where the kernel has them (typed arguments), else the raw ones.
    programs = "btf"

    def autoload(self) -> set[str]:
        kind = self.programs
        if self.config.wakers:
            return {f"switch_{kind}", f"waking_{kind}"}
        return {f"switch_{kind}", f"sys_exit_{kind}"} if self.dwarf else {f"switch_{kind}"}

    def open(self) -> None:
        try:
            super().open()
        except BpfscopeError:
            if self.programs == "raw":
                raise
            self.programs = "raw"  # no BTF tracepoints here (BPF_PROG_TYPE_TRACING cannot be probed)
            super().open()

    def attach_programs(self) -> None:
        assert self.obj is not None
        self.obj.attach()

    def weigh(self, value: Any) -> tuple[int, int]:
        return int(value["blocks"]), int(value["ns"])


EXAMPLES = """
\b
Examples:
  bpfscope offcputime -p 1234 --duration 10        # where one process waits, 10 s
  bpfscope offcputime --state disk -o io.html      # waits in the kernel (disk I/O), a flame graph
  bpfscope offcputime --min-block 1000 --format folded > waits.folded   # blocks of 1 ms or more
  bpfscope offcputime -p 1234 --wakers             # who wakes the process's threads, from where
"""


@click.command(name="offcputime", epilog=EXAMPLES)
@click.option(
    "--min-block",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="US",
    help="Only blocks at least this many microseconds long (filtered in the kernel).",
)
@click.option(
    "--state",
    type=click.Choice(sorted(STATES)),
    default="blocked",
    show_default=True,
    help="Which waits: any blocked state, sleeping (S), in the kernel uninterruptibly (D: disk I/O), "
    "or all (also runnable threads waiting for a CPU after preemption).",
)
@click.option(
    "--wakers",
    is_flag=True,
    help="Count each block under the stacks of the task that woke the thread (its user stack walked "
    "by frame pointers) instead of the blocked thread's own.",
)
@stack_options
@common_options
def command(
    run: Run,
    min_block: float,
    state: str,
    wakers: bool,
    unwind: str,
    kernel_only: bool,
    user_only: bool,
    format: str | None,
    output: str | None,
    max_rows: int,
) -> None:
    """Time spent off the CPU (blocked: sleeping, waiting for I/O, locks, the network) per stack.

    Without -o the functions most waited under are shown (TOTAL%: share of the blocked time with the
    function on the stack). -o FILE writes the profile (folded stacks count microseconds; pprof has an
    offcpu nanoseconds value), in the format its name says (.html, .pb.gz, .folded, .json). With
    --wakers each block counts under the thread that woke it (process, thread and stacks are the
    waker's): who ends the waits, and from where.
    """
    config = run.config(
        OffcputimeConfig,
        min_block_us=min_block,
        state=state,
        wakers=wakers,
        **stack_choice(kernel_only, user_only, unwind),
    )
    what = f"process {run.pid}" if run.pid else "every thread"
    what = f"the wakers of {what}" if wakers else what
    run_profile(
        run,
        OffcputimeCollector(config),
        ProfileView(max_rows),
        output,
        format,
        f"Tracing off-CPU time of {what}... Ctrl-C to end.",
    )
