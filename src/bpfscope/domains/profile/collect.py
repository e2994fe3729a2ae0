"""What the profilers share (profile, offcputime): a collector of stacks counted in the kernel (or
unwound here from copies of the user stack), symbolised into one :class:`Profile` per window; the view
of its hottest functions; and the sink that writes the run's profile to a file.

A subclass says how its programs attach (:meth:`StackCollector.attach_programs`) and how a counter of
its ``counts`` map weighs (:meth:`StackCollector.weigh`: samples and nanoseconds).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from bpfscope.domains.profile import formats
from bpfscope.domains.profile.profiles import SCHEMAS, Profile, Thread, unsymbolised_text
from bpfscope.domains.profile.python import EVAL_LOOP
from bpfscope.domains.profile.python import merge as merge_python
from bpfscope.domains.profile.symbols import Frame, Symbolizer
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.losses import Loss, Losses
from bpfscope.runtime.session import Sink
from bpfscope.sinks.terminal import Terminal, View, note

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.cli.options import Run
    from bpfscope.domains.profile.tracker import PythonFrames
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.session import Session

UNWINDERS = ("dwarf", "fp")
# --continuous: one profile per window of this many seconds.
CONTINUOUS_WINDOW_S = 10.0
BPF_MACHINERY = ("bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_", "bpf_get_stack")


@dataclass(kw_only=True)
class StackConfig(Config):
    user: bool = True  # user stacks (--kernel-only turns them off)
    kernel: bool = True  # kernel stacks (--user-only turns them off)
    # dwarf: user stacks copied and unwound here from .eh_frame (right without frame pointers);
    # fp: walked by frame pointers in the kernel (cheaper, wrong where code has none).
    unwind: str = "dwarf"


C = TypeVar("C", bound=StackConfig)


@dataclass
class ProfileSample(Sample):
    ts: float
    interval_s: float
    profile: Profile

    def records(self) -> Iterator[dict[str, Any]]:
        return self.profile.records(self.ts, self.interval_s)


@lru_cache(maxsize=4096)  # a cgroup per job or pod, ever seen: bounded for the always-on agent
def container_of(cgroup: int) -> str | None:
    from bpfscope.sources.cgroups import cgroup_path, container_id

    path = cgroup_path(cgroup) if cgroup else None
    return container_id(path) if path else None


class StackCounts:
    """The counts map read as {key bytes: count}, with its keys decoded where needed (numpy)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys = keys
        self.counts = {keys[i].tobytes(): values[i] for i in range(len(keys))}

    @classmethod
    def read(cls, bpf_map: Any) -> StackCounts:
        keys, values = bpf_map.items()
        return cls(keys, values)

    def since(self, before: dict[bytes, Any], weigh: Any) -> Iterator[tuple[Any, tuple[int, int]]]:
        """(key, (samples, nanoseconds)) of every key counted since ``before``."""
        for i, (raw, value) in enumerate(self.counts.items()):
            samples, ns = weigh(value)
            old_samples, old_ns = weigh(before[raw]) if raw in before else (0, 0)
            if samples > old_samples:
                yield self.keys[i], (samples - old_samples, ns - old_ns)


def symbolise(
    symbols: Symbolizer,
    pid: int,
    user: list[int],
    kernel: list[int],
    python: PythonFrames = (),
) -> tuple[Frame, ...]:
    """Frames root first, the user stack then the kernel's, from addresses leaf first; the Python
    frames (innermost first) in place of the interpreter loop's native frames that ran them."""
    # Every address but the first is a return address: the call is the byte before it.
    frames = [symbols.user_frame(pid, a - (i > 0)) for i, a in enumerate(user)][::-1]
    if python:
        py_frames = [(Frame(name, file, "python"), entry) for name, file, entry in python]
        frames = merge_python(frames, py_frames, lambda f: f.function == EVAL_LOOP)
    kernel_frames = [symbols.kernel_frame(a - (i > 0)) for i, a in enumerate(kernel)]
    # A stack taken in a tracepoint starts in the BPF program that took it: not the traced code's.
    while kernel_frames and kernel_frames[0].function.startswith(BPF_MACHINERY):
        del kernel_frames[0]
    return tuple(frames + kernel_frames[::-1])


def thread_of(pid: int, tid: int, comm: bytes, cgroup: int) -> Thread:
    return Thread(pid, tid, comm.split(b"\0", 1)[0].decode(errors="replace"), cgroup, container_of(cgroup))


def counted_stack(key: Any) -> tuple[Thread, list[int], list[int], tuple[int, ...]]:
    """A key of the counts map: its thread, user and kernel addresses (leaf first), and its Python
    frames as the kernel recorded them (code object addresses, innermost first, bit 0: is_entry)."""
    n_user, n_kernel, n_py = int(key["user_frames"]), int(key["kernel_frames"]), int(key["py_frames"])
    user = key["user"][:n_user].tolist() if n_user > 0 else []
    kernel = key["kernel"][:n_kernel].tolist() if n_kernel > 0 else []
    py = tuple(key["py"][:n_py].tolist()) if n_py > 0 else ()
    thread = thread_of(int(key["tgid"]), int(key["tid"]), bytes(key["comm"]), int(key["cgroup"]))
    return thread, user, kernel, py


class StackCollector(BpfCollector[C]):
    """Stacks counted in the kernel per thread (``counts``), and in DWARF mode unwound here from the
    ``user_samples`` ring; each sample is one window's :class:`Profile`."""

    kind: ClassVar[str] = "cpu"
    _schemas = SCHEMAS
    loss_counters = {"counts_dropped": ("map_full", "stacks not counted (too many distinct stacks)")}

    def rodata(self) -> dict[str, Any]:
        return {
            **super().rodata(),
            "want_user": self.config.user,
            "want_kernel": self.config.kernel,
            "copy_user_stack": self.dwarf,
        }

    @property
    def dwarf(self) -> bool:
        return self.config.user and self.config.unwind == "dwarf"

    def attach(self) -> None:
        from bpfscope.domains.profile.tracker import Tracker

        assert self.obj is not None
        if self.config.unwind not in UNWINDERS:
            raise BpfscopeError(f"unknown unwinder {self.config.unwind!r} (one of {', '.join(UNWINDERS)})")
        self.obj.load()
        self.symbols = Symbolizer(kernel=self.config.kernel, unwind_tables=self.dwarf)
        # Not self.ring(): the tracker's thread reads it, not the session.
        ring = self.obj.ring_buffer("user_samples") if self.dwarf else None
        self.tracker = Tracker(self.obj, self.symbols, ring)
        self.tracker.start(self.config.pid)
        self.attach_programs()
        self.before: dict[bytes, Any] = {}
        self.t0 = time.monotonic()

    def attach_programs(self) -> None:
        raise NotImplementedError

    def weigh(self, value: Any) -> tuple[int, int]:
        """A counter's (samples, nanoseconds)."""
        raise NotImplementedError

    def ring_weight(self, samples: int, weight_ns: int) -> int:
        """The nanoseconds of stacks unwound here (their records carry them, or 0)."""
        return weight_ns

    def new_profile(self) -> Profile:
        return Profile(kind=self.kind)

    def start(self) -> None:
        assert self.obj is not None
        self.start_from_attach()
        self.before = StackCounts.read(self.obj.maps["counts"]).counts

    def start_from_attach(self) -> None:
        self.t0 = time.monotonic()

    def sample(self) -> ProfileSample:
        assert self.obj is not None
        self.tracker.refresh()
        counts = StackCounts.read(self.obj.maps["counts"])
        now = time.monotonic()
        profile = self.new_profile()
        for key, value in counts.since(self.before, self.weigh):
            thread, user, kernel, py = counted_stack(key)
            python = self.tracker.python_frames(thread.pid, py)
            frames = symbolise(self.symbols, thread.pid, user, kernel, python)
            profile.add(thread, frames, *value, self.tracker.exe(thread.pid))
        for (pid, tid, comm, cgroup, user, kernel, py), (
            samples,
            weight,
        ) in self.tracker.take_stacks().items():
            frames = symbolise(self.symbols, pid, list(user), list(kernel), py)
            thread = thread_of(pid, tid, comm, cgroup)
            profile.add(thread, frames, samples, self.ring_weight(samples, weight), self.tracker.exe(pid))
        profile.duration_s = now - self.t0
        profile.start_ts = time.time() - profile.duration_s
        self.forget_idle(counts)
        self.before, self.t0 = counts.counts, now
        self.tracker.forget_exited()
        return ProfileSample(time.time(), profile.duration_s, profile)

    def forget_idle(self, counts: StackCounts) -> None:
        """Keys that counted nothing over a whole window (an exited thread's, a stack not run since) leave
        the kernel's map: it was never emptied, so an always-on profiler's map filled with the stacks of
        every thread it ever saw, and then dropped every new stack (the agent's copy of it grew 1.3 MB a
        minute). A key counted again comes back at its new count, read as new. A sample that lands on an
        idle key between this read and the delete (microseconds, after a window without one) is lost."""
        assert self.obj is not None
        weigh, before = self.weigh, self.before
        idle = [
            raw
            for raw, value in counts.counts.items()
            if raw in before and weigh(value) == weigh(before[raw])
        ]
        if idle:
            self.obj.maps["counts"].delete_many(idle)
            for raw in idle:
                del counts.counts[raw]

    def losses(self) -> Losses:
        losses = super().losses()
        tracker = getattr(self, "tracker", None)
        if self.dwarf and tracker is not None:
            full = "stacks dropped while waiting for a binary to be read (backlog full)"
            pending = "stacks not unwound: their binary was still being read"
            losses += Losses(
                [
                    Loss("map_full:unwind_backlog", tracker.backlog_dropped, full),
                    Loss("unseen:unwind_pending", tracker.gave_up, pending),
                ]
            )
        return losses

    def close(self) -> None:
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.stop()
            self.symbols.close()
        super().close()


class ProfileView(View):
    """The hottest functions of each window, with what stayed unnamed and how many stacks reached
    their root."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, ProfileSample)
        show_profile(sample.profile, term, self.max_rows)


def show_profile(profile: Profile, term: Terminal, max_rows: int) -> None:
    total = sum(profile.value(k) for k in profile.samples)
    what = "samples" if profile.kind == "cpu" else "us blocked"
    term.heading(
        f"{total} {what} in {profile.duration_s:.1f}s"
        + (f" at {profile.frequency_hz} Hz, {profile.idle_samples} idle" if profile.kind == "cpu" else "")
    )
    from rich.markup import escape

    rows = [
        [
            f"{100 * n / total:.1f}" if total else "0",
            f"{100 * own / total:.1f}" if total else "0",
            escape(fn),  # [kernel], [vdso] are names, not markup
            escape(module),
        ]
        for fn, module, own, n in profile.functions()[:max_rows]
    ]
    if rows:
        term.table(["TOTAL%", "SELF%", "FUNCTION", "MODULE"], rows)
    else:
        term.line("no samples")
    term.line(unsymbolised_text(profile.unsymbolised))
    for exe, (reached, stacks) in sorted(profile.roots.items(), key=lambda kv: -kv[1][1])[:max_rows]:
        term.line(
            f"{exe}: {reached} of {stacks} samples' stacks reached their root ({100 * reached / stacks:.1f}%)"
        )


class ProfileFileSink(Sink):
    """Adds every window up and writes the run's profile at the end: to ``path`` (replaced whole, never
    half-written), or to stdout."""

    def __init__(self, path: str | None, fmt: str, title: str) -> None:
        self.path, self.fmt, self.title = path, fmt, title
        self.profile: Profile | None = None

    def emit(self, collector: Collector, sample: Sample) -> None:
        assert isinstance(sample, ProfileSample)
        if self.profile is None:
            self.profile = Profile(kind=sample.profile.kind)
        self.profile.merge(sample.profile)

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        profile = self.profile or Profile()
        data = formats.render(profile, self.fmt, self.title)
        if self.path is None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return
        write_atomically(self.path, data)
        note(f"wrote {self.fmt} profile of {profile.total_samples} samples to {self.path}")


def write_atomically(path: str, data: bytes) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BpfscopeError(f"cannot write {path}: {exc.strerror}") from None


class ProfileSummary(View):
    """The view when the profile goes to a file or stdout: only the last line, on stderr."""

    def show(self, sample: Sample, term: Terminal) -> None:
        return

    def summary(self, collector: Collector, losses: Losses) -> str:
        return f"{collector.name}: {losses.text()}"


@dataclass
class Continuous:
    """--continuous: a profile per window into the store, kept by age and size."""

    store: str
    max_age_s: float
    max_bytes: int
    window_s: float = CONTINUOUS_WINDOW_S


def run_profile(
    run: Run,
    collector: Collector,
    view: View,
    output: str | None,
    fmt: str | None,
    note_text: str,
    continuous: Continuous | None = None,
) -> Session:
    """Run the collector with the view (or JSON lines), and the file sink where a file or a format was
    asked for (without ``-o`` a format other than the terminal's goes to stdout), or the store."""
    from bpfscope.runtime.session import Session, stop_on_signals
    from bpfscope.sinks.jsonl import JsonLinesSink
    from bpfscope.sinks.terminal import TerminalSink

    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True) if Path(output).parent != Path() else None
    sinks: list[Sink] = []
    if continuous is not None:
        from bpfscope.sinks.store import StoreSink, StoreWriter

        if output is not None or fmt is not None:
            raise BpfscopeError("--continuous writes to the store: -o and --format are for one profile")
        writer = StoreWriter(
            continuous.store,
            collector.schemas(),
            max_age_s=continuous.max_age_s,
            max_bytes=continuous.max_bytes,
        )
        sinks.append(StoreSink(writer))
        run.interval = run.interval or continuous.window_s
    to_file = output is not None or fmt is not None
    if run.as_json:
        if fmt is not None and output is None:
            raise BpfscopeError("--json and --format both write to stdout: give -o FILE for the format")
        sinks.append(JsonLinesSink(view=view))
    elif to_file and output is None:
        sinks.append(TerminalSink(ProfileSummary(), stream=sys.stderr))
    else:
        sinks.append(TerminalSink(view))
    if to_file:
        fmt = formats.format_for(output, fmt)
        sinks.append(ProfileFileSink(output, fmt, f"bpfscope {collector.name}"))
    with stop_on_signals() as stop:
        session = Session(
            [collector],
            sinks,
            interval=run.interval,
            count=run.count,
            duration=run.duration,
            stop=stop,
            from_attach=True,
        )
        session.run(ready=lambda: note(note_text))
    return session


def stack_options(func: Any) -> Any:
    """The options both profilers take: --unwind, --kernel-only, --user-only, --format, -o, -r."""
    import click

    from bpfscope.cli.options import option

    for decorate in reversed(
        [
            click.option(
                "--unwind",
                type=click.Choice(UNWINDERS),
                default="dwarf",
                show_default=True,
                help="User stacks: copied and unwound from .eh_frame (right without frame pointers), or "
                "walked by frame pointers in the kernel (cheaper; code built without them loses callers).",
            ),
            click.option("--kernel-only", is_flag=True, help="Kernel stacks only."),
            click.option("--user-only", is_flag=True, help="User stacks only."),
            option("format", choices=formats.FORMATS),
            option("output"),
            option("rows", default=20, help="Functions shown."),
        ]
    ):
        func = decorate(func)
    return func


def stack_choice(kernel_only: bool, user_only: bool, unwind: str) -> dict[str, Any]:
    """The StackConfig fields from the shared options."""
    if kernel_only and user_only:
        raise BpfscopeError("--kernel-only and --user-only leave nothing to sample: give one")
    return {"user": not kernel_only, "kernel": not user_only, "unwind": unwind}
