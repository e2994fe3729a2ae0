"""The collector contract: one way to get data out of the kernel, for tools, check, experiments and the
agent alike.

A collector takes a typed configuration (a :class:`Config` dataclass: filters, interval, options), owns
its BPF object(s), and produces :class:`Sample` objects: typed, for the code that uses them (views,
health rules, experiments), and flattened into records of declared schemas for sinks (JSON lines, the
store, exporters). It reports its :class:`~bpfscope.runtime.losses.Losses` and never prints.

Two shapes, which one collector may combine:

- **interval**: ``start()`` takes a baseline, each ``sample()`` returns what happened since the previous
  one (counters read from maps, as differences). Intervals are exact: nothing falls between two reads.
- **stream**: ``fds()`` are ring buffers to wait on, ``drain()`` returns what arrived (decoded in
  batches, never one Python call per event).

The lifecycle, driven by a :class:`~bpfscope.runtime.session.Session` (or by hand)::

    collector = BiotopCollector(BiotopConfig(pid=1234))
    collector.open()      # load and attach: the slow part, before any window opens
    collector.start()     # baseline
    sample = collector.sample()
    collector.close()     # every path; also a context manager
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from bpfscope.runtime.losses import MALFORMED, Loss, Losses, bpf_losses

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject
    from bpfscope.engine.ringbuf import RingBuffer
    from bpfscope.runtime.schema import Schema


# Paced collectors' records wait this long at most before the session reads them: a line on a terminal
# 50 ms late is not seen late, and an idle session wakes 20 times a second.
PACED_DRAIN_S = 0.05


@dataclass(kw_only=True)
class Config:
    """What every collector's configuration holds. A collector's own configuration subclasses it.

    ``pid`` and ``cgroup`` select the tasks watched, in the kernel (bpfscope.bpf.h); ``include_self``
    lets bpfscope watch its own process and its children, which every collector leaves out by default.
    ``interval_s`` is how often an interval collector is sampled when a session runs it (None: the
    session's interval, or once at the end).
    """

    pid: int | None = None
    cgroup: str | None = None
    include_self: bool = False
    interval_s: float | None = None

    def task_filter(self) -> dict[str, int]:
        """The .rodata values of bpfscope.bpf.h's task filter."""
        cgroup = 0
        if self.cgroup:
            from bpfscope.sources.cgroups import cgroup_id

            cgroup = cgroup_id(self.cgroup)
        return {
            "bs_targ_tgid": self.pid or 0,
            "bs_targ_cgroup": cgroup,
            "bs_self_tgid": 0 if self.include_self else os.getpid(),
        }

    def replace(self, **changes: Any) -> Self:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{**values, **changes})


C = TypeVar("C", bound=Config)


class Sample:
    """What a collector produced at one sample or drain. Subclasses are typed for their users and say
    how they flatten into records (:meth:`records`)."""

    ts: float  # wall-clock seconds at the end of the interval (or of the batch)

    def records(self) -> Iterator[dict[str, Any]]:
        """Flat records of the collector's schemas, the discriminator first."""
        return iter(())

    def json_lines(self) -> str | None:
        """The records as JSON lines (each ending in a newline), for a sample that writes them faster
        than one encoding of each record (its parts encoded once and reused); None: the JSON lines sink
        encodes :meth:`records`. Both must give the same records."""
        return None


class Collector(Generic[C]):
    """Base of every collector. Subclasses set ``name``, ``schemas`` (or override :meth:`schemas`),
    ``requires`` (what `bpfscope.engine.bpf.require` checks before loading) and implement what their
    shape needs."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    # Sampled every this many seconds when neither the configuration nor the session says otherwise
    # (top-like tools refresh every second); None: once, at the end of the run.
    default_interval_s: ClassVar[float | None] = None
    # Stream collectors whose programs run inside the watched tasks' own calls, at modest rates: their
    # records do not wake the session (bpfscope.bpf.h's bs_paced_wakeup), which drains them this often
    # (seconds; PACED_DRAIN_S) instead, and at once when a ring is a quarter full. None: every record
    # may wake it.
    paced_drain_s: ClassVar[float | None] = None
    # Paced drains that find nothing come further apart, twice as far each time up to this many
    # seconds, and back to paced_drain_s at the first record (None: always paced_drain_s). For the
    # agent, whose records wait for the store's flush anyway: see session.py's _Slot.idle_drains.
    paced_idle_max_s: float | None = None
    _schemas: ClassVar[tuple[Schema, ...]] = ()

    def __init__(self, config: C) -> None:
        self.config = config

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        """The kinds of record this collector emits (may read the BPF object's BTF: no privilege needed)."""
        return cls._schemas

    # --- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Load and attach (the slow part). Raise BpfscopeError for what the user can fix."""

    def start(self) -> None:
        """Take the baseline: what happened before is not part of the first sample."""

    def start_from_attach(self) -> None:
        """Start counting from when the programs were attached, without reading a baseline (a tool run
        from the command line: its first interval is everything since attach, and it need not import
        what reading maps takes before it says it is tracing). By default the same as start()."""
        self.start()

    def sample(self) -> Sample | None:
        """Interval collectors: what happened since the previous sample (or start)."""
        return None

    def fds(self) -> list[int]:
        """Stream collectors: file descriptors to wait on (ring buffers)."""
        return []

    def drain(self) -> Sample | None:
        """Stream collectors: what has arrived; never blocks."""
        return None

    def drain_every(self) -> float | None:
        """Seconds between drains the session makes on its own (paced wake-ups), or None."""
        return self.paced_drain_s

    def losses(self) -> Losses:
        return Losses()

    def unread(self) -> int:
        """Stream collectors: records their rings hold that were not read (asked at the end of a run,
        when a stop cut the final drain short: they are reported as lost, never dropped silently)."""
        return 0

    def done(self) -> bool:
        """Whether the collector has nothing more to give (a program it runs has exited): a session
        whose collectors are all done ends."""
        return False

    def close(self) -> None:
        """Release everything open() took; safe to call twice and after a failed open()."""

    # --- conveniences --------------------------------------------------------------------------------
    @property
    def interval_s(self) -> float | None:
        return self.config.interval_s or self.default_interval_s

    @property
    def streams(self) -> bool:
        return bool(self.fds())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BpfCollector(Collector[C]):
    """A collector on one BPF object of its domain: ``bpf_object`` names it (``NAME.bpf.o`` beside the
    collector's module), ``loss_counters`` describes its .bss loss counters for :func:`bpf_losses`.

    Subclasses implement :meth:`load` (or set ``rodata``/``autoload`` through it) and read ``self.obj``.
    """

    bpf_object: ClassVar[str] = ""
    loss_counters: ClassVar[Mapping[str, tuple[str, str]]] = {}

    def __init__(self, config: C) -> None:
        super().__init__(config)
        self.obj: BpfObject | None = None
        self.rings: dict[str, RingBuffer] = {}

    @classmethod
    def object_path(cls) -> Path:
        import sys

        return Path(sys.modules[cls.__module__].__file__ or "").with_name(f"{cls.bpf_object}.bpf.o")

    @classmethod
    def btf(cls):
        """The object's BTF, read from the file (no privilege, nothing loaded)."""
        from bpfscope.engine.btf import object_btf

        return object_btf(cls.object_path())

    def rodata(self) -> dict[str, Any]:
        """The object's configuration: the task filter and the wake-up pacing, plus what a subclass
        adds."""
        paced = {"bs_paced_wakeup": True} if self.drain_every() is not None else {}
        return {**self.config.task_filter(), **paced}

    def autoload(self) -> set[str] | None:
        """The programs to load (None: all)."""
        return None

    def max_entries(self) -> dict[str, int]:
        return {}

    def open(self) -> None:
        from bpfscope.engine.bpf import BpfObject, require

        require(*self.requires)
        self.obj = BpfObject(
            self.object_path(),
            rodata=self.rodata(),
            autoload=self.autoload(),
            max_entries=self.max_entries(),
        )
        try:
            self.configure()
            self.attach()
        except BaseException:
            self.close()
            raise

    def configure(self) -> None:
        """Between opening the object and loading it: map sizes and layouts a configuration decides."""

    def attach(self) -> None:
        """Attach the programs (all autoattach ones by default) and open the rings."""
        assert self.obj is not None
        self.obj.attach()

    def ring(self, name: str) -> RingBuffer:
        assert self.obj is not None
        ring = self.rings.get(name) or self.obj.ring_buffer(name)
        self.rings[name] = ring
        return ring

    def fds(self) -> list[int]:
        return [ring.fileno() for ring in self.rings.values()]

    def unread(self) -> int:
        return sum(ring.pending() for ring in self.rings.values())

    def losses(self) -> Losses:
        if self.obj is None:
            return Losses()
        losses = bpf_losses(self.obj, self.loss_counters)
        malformed = sum(ring.malformed for ring in self.rings.values())
        if malformed:
            # Records of another size than the ring's struct: a bug in the BPF program, never decoded.
            losses = losses + Losses([Loss(MALFORMED, malformed, "malformed records skipped")])
        return losses

    def close(self) -> None:
        self.rings.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None


def wall_clock_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get wall-clock nanoseconds."""
    return time.time_ns() - time.monotonic_ns()
