"""bpfscope syscount: system calls by syscall or process, with error counts and latency percentiles.

Counting and the latency histograms stay in the kernel (syscount.bpf.c); each sample reads the maps and
keeps what changed since the previous one, so nothing falls between two reads. Without an interval the
run is one sample, taken at its end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.counts import Counts
from bpfscope.runtime.schema import COMM, PID, Field, Schema
from bpfscope.sinks.terminal import Terminal, View
from bpfscope.sources.syscalls import syscall_name, syscall_names, syscall_number

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject
    from bpfscope.runtime.hist import Histogram

# Latency percentiles shown and recorded, by their key.
PERCENTILES = {"p50_us": 50.0, "p99_us": 99.0, "p999_us": 99.9}


@dataclass(kw_only=True)
class SyscountConfig(Config):
    per_process: bool = False  # one row per process instead of per syscall (-P)
    latency: bool = False  # measure latency (-L)
    failures: bool = False  # only failed syscalls (-x)
    syscall: str | None = None  # only this syscall, by name
    rows: int | None = None  # only the busiest rows of each sample (None: all)


@dataclass
class SyscallCounts(Counts):
    """A row's counters, as syscount.bpf.c's struct syscall_stats holds them."""

    count: int
    errors: int
    total_ns: int  # time in the calls, with latency


@dataclass
class Row:
    key: int  # the syscall's number, or the process id (per process)
    name: str  # the syscall's name, or the process's comm (per process)
    counts: SyscallCounts
    hist: Histogram | None  # latency in ns, with latency

    def __sub__(self, before: Row) -> Row:
        hist = self.hist
        if hist is not None and before.hist is not None:
            hist = hist - before.hist
        return Row(self.key, self.name, self.counts - before.counts, hist)

    @property
    def avg_us(self) -> float:
        return round(self.counts.total_ns / self.counts.count / 1000, 3) if self.counts.count else 0.0

    def percentiles_us(self) -> dict[str, float | None]:
        """PERCENTILES of the latency; None where no histogram was kept (its map was full)."""
        if self.hist is None:
            return dict.fromkeys(PERCENTILES)
        return {
            key: None if (ns := self.hist.percentile(q)) is None else round(ns / 1000, 3)
            for key, q in PERCENTILES.items()
        }


def snapshot(obj: BpfObject, per_process: bool, latency: bool) -> dict[int, Row]:
    """Every row the maps hold now (cumulative since the programs were attached)."""
    from bpfscope.runtime.hist import Histogram

    hists: dict[int, Histogram] = {}
    if latency:
        hkeys, hvalues = obj.maps["latency"].items()
        hists = {int(k): Histogram(v["slots"], "loglin") for k, v in zip(hkeys, hvalues, strict=True)}
    keys, values = obj.maps["stats"].items()
    rows = {}
    for k, v in zip(keys, values, strict=True):
        key = int(k)
        name = v["comm"].decode(errors="replace") if per_process else syscall_name(key)
        rows[key] = Row(key, name, SyscallCounts.from_record(v), hists.get(key))
    return rows


def delta(now: dict[int, Row], before: dict[int, Row]) -> list[Row]:
    """Each row's calls since ``before``; rows without any are left out."""
    out = []
    for key, row in now.items():
        prev = before.get(key)
        if prev is None:
            out.append(row)
        elif row.counts.count != prev.counts.count:
            out.append(row - prev)
    return out


_COUNTS = (
    Field("count", "int", doc="calls that returned"),
    Field("errors", "int", doc="calls that returned an error (< 0)"),
    Field("avg_us", "float", "us", "mean latency; null without -L", nullable=True),
    *(
        Field(key, "float", "us", f"p{q:g} latency (within 1/16); null without -L", nullable=True)
        for key, q in PERCENTILES.items()
    ),
)
SYSCALL_SCHEMA = Schema(
    "syscount.syscall",
    (Field("syscall", "str", label=True, doc="the syscall's name"), *_COUNTS),
    doc="One syscall's calls over an interval, by every selected process.",
    interval=True,
)
PROCESS_SCHEMA = Schema(
    "syscount.process",
    (PID, COMM, *_COUNTS),
    doc="One process's syscalls over an interval (with -P).",
    interval=True,
)


@dataclass
class SyscountSample(Sample):
    ts: float
    interval_s: float
    rows: list[Row]  # busiest first
    per_process: bool
    latency: bool

    def records(self) -> Iterator[dict[str, Any]]:
        schema = PROCESS_SCHEMA if self.per_process else SYSCALL_SCHEMA
        for r in self.rows:
            keys = {"pid": r.key, "comm": r.name} if self.per_process else {"syscall": r.name}
            latency: dict[str, float | None] = {"avg_us": None, **dict.fromkeys(PERCENTILES)}
            if self.latency:
                latency = {"avg_us": r.avg_us, **r.percentiles_us()}
            yield schema.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    **keys,
                    "count": r.counts.count,
                    "errors": r.counts.errors,
                    **latency,
                }
            )


def syscall_filter(name: str) -> int:
    """The number of syscall ``name``; an unknown name is an error with the closest ones."""
    found = syscall_number(name)
    if found is None:
        import difflib

        close = difflib.get_close_matches(name, syscall_names().values(), n=3)
        raise BpfscopeError(
            f"unknown syscall {name!r}", hint=f"did you mean {', '.join(close)}?" if close else None
        )
    return found


class SyscountCollector(BpfCollector[SyscountConfig]):
    """Syscalls counted per syscall or process in the kernel; each sample is the interval's difference."""

    name = "syscount"
    bpf_object = "syscount"
    requires = ("tracepoint",)
    _schemas = (SYSCALL_SCHEMA, PROCESS_SCHEMA)
    loss_counters = {
        "stats_dropped": ("map_full", "syscalls not counted (too many syscalls or processes)"),
        "hists_dropped": ("map_full", "syscalls counted without their latency (too many histograms)"),
        "starts_dropped": ("map_full", "syscalls not counted (too many in flight to time)"),
    }

    def rodata(self) -> dict[str, Any]:
        config = self.config
        values = {
            **super().rodata(),
            "by_process": config.per_process,
            "measure_latency": config.latency,
            "failures_only": config.failures,
        }
        if config.syscall is not None:
            values["targ_syscall"] = syscall_filter(config.syscall)
        return values

    def autoload(self) -> set[str]:
        # Entries are timed only for latency: without it, no program runs at every syscall's entry for
        # nothing, and the entry times and histograms need no memory.
        return {"sys_enter", "sys_exit"} if self.config.latency else {"sys_exit"}

    def max_entries(self) -> dict[str, int]:
        return {} if self.config.latency else {"latency": 1, "start": 1}

    def start(self) -> None:
        assert self.obj is not None
        self.start_from_attach()
        self.before = snapshot(self.obj, self.config.per_process, self.config.latency)

    def start_from_attach(self) -> None:
        self.before: dict[int, Row] = {}
        self.t0 = time.monotonic()

    def sample(self) -> SyscountSample:
        assert self.obj is not None
        config = self.config
        now = snapshot(self.obj, config.per_process, config.latency)
        t = time.monotonic()
        rows = sorted(delta(now, self.before), key=lambda r: (-r.counts.count, r.key))
        if config.rows is not None:
            rows = rows[: config.rows]
        sample = SyscountSample(time.time(), round(t - self.t0, 6), rows, config.per_process, config.latency)
        self.before, self.t0 = now, t
        return sample


class SyscountView(View):
    def __init__(self, per_interval: bool) -> None:
        self.per_interval = per_interval
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, SyscountSample)
        columns = ["PID", "COMM"] if sample.per_process else ["SYSCALL"]
        columns += ["COUNT", "ERRORS"]
        if sample.latency:
            columns += ["AVG us", "P50 us", "P99 us", "P99.9 us"]
        table = []
        for r in sample.rows:
            cells: list[Any] = [r.key, r.name] if sample.per_process else [r.name]
            cells += [r.counts.count, r.counts.errors]
            if sample.latency:
                cells += [r.avg_us, *r.percentiles_us().values()]
            table.append(cells)
        term.heading(f"{time.monotonic() - self.start:.1f}s" if self.per_interval else "total")
        term.table(columns, table)


EXAMPLES = """
\b
Examples:
  bpfscope syscount                 # top syscalls until Ctrl-C
  bpfscope syscount -L 1 5          # with latency percentiles, every second, 5 times
  bpfscope syscount -P --duration 10  # by process for 10 seconds
  bpfscope syscount -x -p 1234      # failed syscalls of one process
  bpfscope syscount --syscall openat -L   # one syscall's latency
"""


@click.command(name="syscount", epilog=EXAMPLES)
@option("per_process", "--process", help="One row per process instead of per syscall.")
@option("latency", help="Measure latency: average and p50/p99/p99.9.")
@option("failures", help="Only failed syscalls.")
@click.option("--syscall", metavar="NAME", help="Only this syscall (e.g. openat).")
@option("rows", "--top", default=10, help="Rows per interval, the most called first.")
@common_options
def command(
    run: Run, per_process: bool, latency: bool, failures: bool, syscall: str | None, max_rows: int
) -> None:
    """System calls counted in the kernel, by syscall (default) or by process.

    Without an interval, one table at the end (Ctrl-C, SIGTERM or --duration); with one, a table per
    interval of what happened in it.
    """
    config = run.config(
        SyscountConfig,
        per_process=per_process,
        latency=latency,
        failures=failures,
        syscall=syscall,
        rows=max_rows,
    )
    view = SyscountView(per_interval=run.interval is not None)
    run.run(SyscountCollector(config), view, "Tracing syscalls... Ctrl-C to end.")
