"""bpfscope tsa: thread-state accounting. Per interval and per component (a process, a cgroup, a thread,
or the components ``--components`` names), how its threads' time divides between running on a CPU,
waiting for one, and being blocked on the disk (reads; writes and syncs), on the network, on a lock, or
otherwise.

The kernel side (tsa.bpf.c) follows the scheduler (tp_btf/sched_switch, sched_wakeup): per thread, the
time in each state, cumulative, and the state it is in now and since when. Each sample reads every
thread and credits the current state up to the moment of reading, so an interval's states add up to the
interval for every thread that lived through it; threads that exited are counted to their exit, then
forgotten. A thread is followed from its first switch or wakeup after the start (one asleep all along
is not seen). With ``timeline`` (bench) every off-CPU episode also comes through a ring buffer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from bpfscope.cli.options import Run, common_options, option, top_options
from bpfscope.domains.sched import components as comp
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import PACED_DRAIN_S, BpfCollector, Config, Sample
from bpfscope.runtime.schema import CGROUP, COMM, PID, TID, Field, Schema, enum_names
from bpfscope.sinks.terminal import Terminal, View, loadavg
from bpfscope.sources.syscalls import syscall_number

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject

# What a blocked system call waits for (enum bs_tsa_call in tsa.bpf.c), by syscall name. Numbers are the
# architecture's: the kernel's array is filled from these names.
SYSCALLS_BY_CALL = {
    "net": (
        "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg", "accept", "accept4", "connect",
        "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    ),
    "fd_read": ("read", "readv", "pread64", "preadv", "preadv2"),
    "fd_write": ("write", "writev", "pwrite64", "pwritev", "pwritev2"),
    "sync": ("fsync", "fdatasync", "sync_file_range", "sync", "syncfs", "msync"),
    "lock": ("futex", "futex_waitv"),
}  # fmt: skip

GROUPINGS = ("process", "cgroup", "thread")


@cache
def states() -> tuple[str, ...]:
    """The states, in the kernel's order (enum bs_tsa_state, read from the object's BTF)."""
    names = enum_names(TsaCollector.btf().enum("bs_tsa_state"))
    return tuple(names[v] for v in sorted(names) if names[v] != "count")


# What each state means, for schemas and --help.
STATE_DOCS = {
    "cpu": "running on a CPU",
    "runqueue": "runnable, waiting for a CPU (preempted or woken)",
    "disk_read": "blocked on disk I/O (in_iowait) outside writes and syncs: a page cache miss",
    "disk_write": "blocked on disk I/O (in_iowait) in write or fsync-like calls",
    "sync": "blocked in an fsync-like call without in_iowait: the file system's journal",
    "net": "blocked in a socket call or a readiness wait (poll, select, epoll)",
    "lock": "blocked in futex (mutexes, condition variables, semaphores)",
    "other": "blocked otherwise (sleep, pipes, children, page reclaim...)",
}


@cache
def row_schema() -> Schema:
    return Schema(
        "tsa",
        (
            Field("component", "str", label=True, doc="the component: its name, process or cgroup"),
            PID,
            TID,
            COMM,
            CGROUP,
            Field("threads", "int", doc="threads that had time in the interval"),
            Field("wall_ns", "int", "ns", "thread time in the interval: the states' sum"),
            *(Field(f"{s}_ns", "int", "ns", STATE_DOCS.get(s, s)) for s in states()),
            Field(
                "delayed_disk_waits",
                "int",
                doc="disk waits whose block the scheduler completed late (delayed dequeue): the kernel's "
                "delay accounting counts each from the thread's previous disk wait (too long)",
            ),
        ),
        doc="A component's thread time over an interval, by state; pid, tid and cgroup are 0 where the "
        "row is not of one.",
        interval=True,
    )


@dataclass(kw_only=True)
class TsaConfig(Config):
    components: tuple[comp.Component, ...] = ()  # named components (else grouped by `by`)
    by: str = "process"  # process, cgroup or thread
    timeline: bool = False  # send every off-CPU episode too (bench)
    rows: int | None = None


@dataclass
class Threads:
    """Every followed thread at one moment: its identity and its time per state so far (columns in
    states() order), the current state credited up to ``at_ns``."""

    at_ns: int
    tid: np.ndarray
    tgid: np.ndarray
    cgroup: np.ndarray
    exited: np.ndarray
    comm: list[str]
    totals: np.ndarray  # (threads, states) int64 ns
    delayed: np.ndarray  # disk waits whose block the scheduler completed late (tsa.bpf.c)

    def index(self) -> dict[int, int]:
        return {int(t): i for i, t in enumerate(self.tid)}


def read_threads(obj: BpfObject) -> Threads:
    keys, values = obj.maps["threads"].items()
    at = time.monotonic_ns()  # after the read: no state began after it
    n = len(states())
    totals = values["ns"][:, :n].astype(np.int64) if len(values) else np.zeros((0, n), np.int64)
    live = values["exited"] == 0
    rows = np.nonzero(live)[0]
    current = values["state"][rows].astype(np.int64)
    credit = np.maximum(0, at - values["since"][rows].astype(np.int64))
    ok = current < n
    totals[rows[ok], current[ok]] += credit[ok]
    return Threads(
        at,
        keys.astype(np.int64),
        values["tgid"].astype(np.int64),
        values["cgroup"].astype(np.int64),
        ~live,
        [bytes(c).split(b"\0", 1)[0].decode(errors="replace") for c in values["comm"]],
        totals,
        values["delayed_iowaits"].astype(np.int64),
    )


@dataclass
class Row:
    component: str
    pid: int
    tid: int
    comm: str
    cgroup: int
    threads: int
    ns: np.ndarray  # per state
    delayed: int = 0  # disk waits delay accounting misses the start of (tsa.bpf.c)

    @property
    def wall_ns(self) -> int:
        return int(self.ns.sum())

    def share(self, state: str) -> float:
        wall = self.wall_ns
        return self.ns[states().index(state)] / wall if wall else 0.0


@dataclass
class TsaSample(Sample):
    ts: float
    interval_s: float
    rows: list[Row]

    def records(self) -> Iterator[dict[str, Any]]:
        schema = row_schema()
        for r in self.rows:
            yield schema.record(
                {
                    "ts": self.ts,
                    "interval_s": self.interval_s,
                    "component": r.component,
                    "pid": r.pid,
                    "tid": r.tid,
                    "comm": r.comm,
                    "cgroup": r.cgroup,
                    "threads": r.threads,
                    "wall_ns": r.wall_ns,
                    **{f"{s}_ns": int(v) for s, v in zip(states(), r.ns, strict=True)},
                    "delayed_disk_waits": r.delayed,
                }
            )


@dataclass
class Episodes(Sample):
    """Off-CPU episodes (timeline): each thread's time off the CPU, why, and when it was woken."""

    data: np.ndarray  # struct tsa_episode records
    ts: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.data)


def _process_name(tgid: int, fallback: str) -> str:
    try:
        return Path(f"/proc/{tgid}/comm").read_text().strip() or fallback
    except OSError:
        return fallback


class TsaCollector(BpfCollector[TsaConfig]):
    """Thread time per state, per component, each interval; episodes too with ``timeline``."""

    name = "tsa"
    bpf_object = "tsa"
    requires = ("raw_tracepoint", "ringbuf")
    default_interval_s = 1.0
    loss_counters = {"threads_dropped": ("map_full", "threads not followed (too many at once)")}

    def drain_every(self) -> float | None:
        # The timeline's episodes are sent from the scheduler's switches: a record that woke the session
        # would make a switch of its own, and another episode.
        return PACED_DRAIN_S if self.config.timeline else None

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (row_schema(),)

    def rodata(self) -> dict[str, Any]:
        import os

        if self.config.by not in GROUPINGS:
            raise BpfscopeError(f"unknown grouping {self.config.by!r} (one of {', '.join(GROUPINGS)})")
        self.resolved = comp.resolve(list(self.config.components)) if self.config.components else None
        return {
            **super().rodata(),
            "have_entry": self.have_entry,
            "bs_by_set": self.resolved is not None,
            "timeline": self.config.timeline,
            "own_tgid": os.getpid(),
        }

    @property
    def have_entry(self) -> bool:
        """Whether the kernel has the tracepoint at __schedule()'s entry (6.16+)."""
        from bpfscope.engine import btf

        try:
            btf.kernel_btf().find("btf_trace_sched_entry_tp", (btf.TYPEDEF,))
        except BpfscopeError:
            return False
        return True

    def autoload(self) -> set[str] | None:
        return None if self.have_entry else {"on_switch", "on_wakeup", "on_wakeup_new"}

    def max_entries(self) -> dict[str, int]:
        return {} if self.config.timeline else {"episodes": 4096}

    def attach(self) -> None:
        assert self.obj is not None
        self.obj.load()
        calls = {name: value for value, name in enum_names(self.btf().enum("bs_tsa_call")).items()}
        table = self.obj.maps["syscall_class"]
        for call, names in SYSCALLS_BY_CALL.items():
            for syscall in names:
                nr = syscall_number(syscall)
                if nr is not None and nr < table.max_entries:
                    table.update(np.uint32(nr), np.uint8(calls[call]))
        if self.resolved is not None:
            for cgroup, index in self.resolved.cgroups.items():
                self.obj.maps["bs_set_cgroups"].update(np.uint64(cgroup), np.uint32(index))
            for tgid, index in self.resolved.tgids.items():
                self.obj.maps["bs_set_tgids"].update(np.uint32(tgid), np.uint32(index))
        self.obj.attach()
        if self.config.timeline:
            self.ring("episodes")

    # --- intervals ---------------------------------------------------------------------------------
    def start(self) -> None:
        assert self.obj is not None
        self.before = read_threads(self.obj)

    def start_from_attach(self) -> None:
        self.start()

    def read(self) -> Threads:
        assert self.obj is not None
        return read_threads(self.obj)

    def sample(self) -> TsaSample:
        now = self.read()
        rows = self.group(now, *since(now, self.before))
        rows.sort(key=lambda r: -r.wall_ns)
        if self.config.rows is not None:
            rows = rows[: self.config.rows]
        # The interval between the two readings: what every live thread's states add up to.
        sample = TsaSample(time.time(), round((now.at_ns - self.before.at_ns) / 1e9, 6), rows)
        self.before = self.forget_exited(now)
        return sample

    def forget_exited(self, now: Threads) -> Threads:
        """Threads that exited are counted to the end: their entries go, and the baseline keeps the
        live ones only."""
        assert self.obj is not None
        gone = now.tid[now.exited]
        if len(gone):
            self.obj.maps["threads"].delete_many(np.asarray(gone, np.uint32))
        keep = ~now.exited
        return Threads(
            now.at_ns,
            now.tid[keep],
            now.tgid[keep],
            now.cgroup[keep],
            now.exited[keep],
            [c for c, k in zip(now.comm, keep, strict=True) if k],
            now.totals[keep],
            now.delayed[keep],
        )

    def component_of(self, tgid: int, cgroup: int) -> int | None:
        """A thread's component index (named components), reading the kernel's process map for the
        processes forked since the start."""
        assert self.resolved is not None
        found = self.resolved.index_of(tgid, cgroup)
        if found is None and self.obj is not None:
            value = self.obj.maps["bs_set_tgids"].lookup(np.uint32(tgid))
            if value is not None:
                found = self.resolved.tgids[tgid] = int(value)
        return found

    def group(self, now: Threads, deltas: np.ndarray, delayed: np.ndarray) -> list[Row]:
        from bpfscope.sources.cgroups import cgroup_path

        rows: dict[Any, Row] = {}
        active = np.nonzero(deltas.any(axis=1))[0]
        for i in active:
            tid, tgid, cgroup = int(now.tid[i]), int(now.tgid[i]), int(now.cgroup[i])
            if self.resolved is not None:
                index = self.component_of(tgid, cgroup)
                if index is None:
                    continue
                key: Any = index
                make = (self.resolved.components[index].name, 0, 0, "", 0)
            elif self.config.by == "thread":
                key, make = tid, (f"{now.comm[i]}/{tid}", tgid, tid, now.comm[i], cgroup)
            elif self.config.by == "cgroup":
                key, make = cgroup, (cgroup_path(cgroup) or str(cgroup), 0, 0, "", cgroup)
            else:
                name = _process_name(tgid, now.comm[i])
                key, make = tgid, (f"{name}/{tgid}", tgid, 0, name, cgroup)
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(*make, threads=0, ns=np.zeros(len(states()), np.int64))
            elif row.cgroup != cgroup:
                row.cgroup = 0  # threads of several cgroups
            row.threads += 1
            row.ns += deltas[i]
            row.delayed += int(delayed[i])
        return list(rows.values())

    # --- the timeline ------------------------------------------------------------------------------
    def drain(self) -> Episodes | None:
        ring = self.rings.get("episodes")
        if ring is None:
            return None
        data = ring.read()
        return Episodes(data) if data is not None and len(data) else None


def since(now: Threads, before: Threads) -> tuple[np.ndarray, np.ndarray]:
    """Each thread's time per state, and its delayed disk waits, between two readings (rows of ``now``;
    a thread first seen in ``now`` from when it was first followed)."""
    out, delayed = now.totals.copy(), now.delayed.copy()
    index = before.index()
    for i, tid in enumerate(now.tid.tolist()):
        j = index.get(tid)
        if j is not None:
            out[i] -= before.totals[j]
            delayed[i] -= before.delayed[j]
    return out, delayed


# --- the tool ---------------------------------------------------------------------------------------
SHORT = {
    "cpu": "CPU",
    "runqueue": "RUNQ",
    "disk_read": "DISK_RD",
    "disk_write": "DISK_WR",
    "sync": "SYNC",
    "net": "NET",
    "lock": "LOCK",
    "other": "OTHER",
}
SORTS = ("wall", *SHORT)


class TsaView(View):
    top = True

    def __init__(self, sort: str, max_rows: int, noclear: bool, percent: bool) -> None:
        self.sort = sort
        self.max_rows = max_rows
        self.noclear = noclear
        self.percent = percent

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, TsaSample)
        names = states()
        key = (lambda r: r.wall_ns) if self.sort == "wall" else (lambda r: r.ns[names.index(self.sort)])
        rows = sorted(sample.rows, key=key, reverse=True)[: self.max_rows]
        unit = "%" if self.percent else "ms"
        columns = ["COMPONENT", "THREADS", "WALL ms", *(f"{SHORT.get(s, s.upper())} {unit}" for s in names)]
        table = []
        for r in rows:
            wall = r.wall_ns
            cells = (
                [round(v / wall * 100, 1) if wall else 0.0 for v in r.ns]
                if self.percent
                else [round(v / 1e6, 1) for v in r.ns]
            )
            table.append([r.component, r.threads, round(wall / 1e6, 1), *cells])
        term.heading(f"thread states over {sample.interval_s:.1f}s, {loadavg()}")
        term.table(columns, table)


EXAMPLES = """
\b
Examples:
  bpfscope tsa                                   # every process, each second, like top
  bpfscope tsa --by cgroup -s disk_read 5        # cgroups by disk-read wait, every 5 s
  bpfscope tsa --components db=comm:postgres,web=cgroup:/web --percent
  bpfscope tsa -p 1234 --by thread --json 1 10   # one process's threads, JSON, 10 intervals
"""


@click.command(name="tsa", epilog=EXAMPLES)
@option(
    "components",
    help="Account these components: NAME=SELECTOR,... where SELECTOR is cgroup:PATH, container:ID, "
    "pid:PID or comm:NAME (their children included).",
)
@click.option(
    "--by",
    type=click.Choice(GROUPINGS),
    default="process",
    show_default=True,
    help="Without --components: one row per process, cgroup or thread.",
)
@click.option("--percent", is_flag=True, help="Show each state as a share of the row's thread time.")
@top_options(SORTS, "wall", "Sort by thread time (wall) or one state's time.")
@common_options
def command(
    run: Run,
    components: str | None,
    by: str,
    percent: bool,
    sort: str,
    max_rows: int,
    noclear: bool,
) -> None:
    """Where threads' time goes, per component: on a CPU, waiting for a CPU (run queue), blocked on the
    disk (reads apart from writes and syncs), on the network, on a lock, or otherwise.

    Each thread's states add up to its time in the interval; a row's WALL is that sum over its threads.
    Disk waits are the kernel's own (in_iowait, as delay accounting counts them); a disk wait in write
    or fsync-like calls is a write, any other a read (a page cache miss: more RAM could remove it).
    """
    config = run.config(
        TsaConfig,
        components=tuple(comp.parse(components)) if components else (),
        by=by,
    )
    run.run(
        TsaCollector(config),
        TsaView(sort, max_rows, noclear, percent),
        "Tracing thread states... Ctrl-C to end.",
    )
