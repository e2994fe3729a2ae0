"""bpfscope iostat: sysstat's ``iostat -x`` per disk, plus what /proc/diskstats cannot show.

From /proc/diskstats, per interval, computed as sysstat 12's ``iostat -x`` computes them (rd_stats.c
``compute_ext_disk_stats`` and iostat.c ``write_ext_stat``), with Δ the change of a counter over the
interval and ``itv`` the interval in seconds:

    r/s     = Δ reads completed / itv                 w/s     = Δ writes completed / itv
    rkB/s   = Δ sectors read / 2 / itv                wkB/s   = Δ sectors written / 2 / itv
    r_await = Δ ms reading / Δ reads (0 if none)      w_await = Δ ms writing / Δ writes (0 if none)
    aqu-sz  = Δ weighted ms doing I/O / (1000 * itv)  (time_in_queue: the time-average of requests
                                                       in flight, scheduler included)
    %util   = Δ ms doing I/O / (1000 * itv) * 100     (io_ticks: the share of the interval with at
                                                       least one request in flight; not clamped)

Sectors are always 512 bytes in diskstats. The one difference from sysstat: ``itv`` is measured with
CLOCK_MONOTONIC when the counters are read, where sysstat takes the difference of /proc/uptime, which
has 10 ms steps (up to 1% of a one-second interval).

From BPF (iostat.bpf.c, on block.bpf.h's request tracking), for request-based disks:

- queue depth on the device, two ways. At each issue to the driver: how many of the disk's requests are
  on the device, this one included, as an exact histogram with its mean and maximum (``depth``, against
  the disk's nr_requests): what each request finds, so requests dispatched in a burst read 1, 2, ... n,
  and completions that come in batches (a throttle, a virtual disk) pull the mean below the steady
  level. And over time (``dev-aqu``): the time-average of requests on the device, what aqu-sz is for
  the whole block layer; aqu-sz minus dev-aqu is the requests waiting in the I/O scheduler or for room
  in the driver (large requests fill a virtio ring long before nr_requests);
- device latency: issue -> completion, as a log-linear histogram (p50, p95, p99 within 1/16);
- who: requests and bytes per submitting process, the busiest few per disk.

And I/O pressure (PSI, /proc/pressure/io): the share of the interval in which some (or all) tasks were
stalled on I/O, from the difference of its ``total``, and the kernel's own 10-second averages.

:class:`DiskCollector` is the collector, used by ``bpfscope check``'s disk rules too::

    with DiskCollector(DiskConfig()) as disks:
        disks.open(); disks.start()
        time.sleep(5)
        sample = disks.sample()            # everything since start()
        print(sample.disks["vda"].r_s, sample.disks["vda"].latency_us(99))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.block import disks as block
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.hist import Histogram

DISKSTATS = Path("/proc/diskstats")
PSI_IO = Path("/proc/pressure/io")
# /proc/diskstats counts in 512-byte sectors whatever the disk's block size.
SECTOR_BYTES = 512
# Time counters (ms) are printed from 32-bit fields by the kernel and wrap; the others are 64-bit.
_WRAP32 = 1 << 32
# Processes listed per disk by default.
TOP_PROCESSES = 3

# /proc/diskstats columns after major, minor and name (Documentation/admin-guide/iostats.rst).
_FIELDS = (
    "rd_ios",
    "rd_merges",
    "rd_sectors",
    "rd_ticks",
    "wr_ios",
    "wr_merges",
    "wr_sectors",
    "wr_ticks",
    "in_flight",
    "io_ticks",
    "time_in_queue",
    "dc_ios",
    "dc_merges",
    "dc_sectors",
    "dc_ticks",
    "fl_ios",
    "fl_ticks",
)
_TICKS = {"rd_ticks", "wr_ticks", "io_ticks", "time_in_queue", "dc_ticks", "fl_ticks"}


@dataclass(frozen=True)
class DiskCounters:
    """One line of /proc/diskstats: cumulative since boot (fields a kernel lacks are 0)."""

    major: int
    minor: int
    name: str
    values: dict[str, int]

    def __getitem__(self, key: str) -> int:
        return self.values[key]

    @property
    def dev(self) -> int:
        return block.mkdev(self.major, self.minor)

    @property
    def used(self) -> bool:
        """Any I/O since boot: the devices sysstat's iostat lists."""
        return any(self.values[k] for k in ("rd_ios", "wr_ios", "dc_ios", "fl_ios"))


def read_diskstats(path: Path = DISKSTATS) -> dict[str, DiskCounters]:
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 7:
            continue
        numbers = [int(p) for p in parts[3:]]
        if len(numbers) == 4:
            continue  # a partition line of a 2.6-era kernel: no extended statistics
        values = dict.fromkeys(_FIELDS, 0)
        values.update(zip(_FIELDS, numbers, strict=False))
        out[parts[2]] = DiskCounters(int(parts[0]), int(parts[1]), parts[2], values)
    return out


def _delta(cur: DiskCounters, prev: DiskCounters | None, key: str) -> int:
    if prev is None:
        return cur[key]
    d = cur[key] - prev[key]
    if d < 0 and key in _TICKS:
        d += _WRAP32
    return max(d, 0)


@dataclass(frozen=True)
class PressureSnapshot:
    some_avg10: float
    full_avg10: float
    some_total_us: int
    full_total_us: int


def read_io_pressure(path: Path = PSI_IO) -> PressureSnapshot | None:
    """/proc/pressure/io, or None on a kernel without PSI (or with psi=0)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    values: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        values[kind] = {k: float(v) for k, v in (p.split("=", 1) for p in pairs)}
    some, full = values.get("some", {}), values.get("full", {})
    return PressureSnapshot(
        some.get("avg10", 0.0), full.get("avg10", 0.0), int(some.get("total", 0)), int(full.get("total", 0))
    )


@dataclass(frozen=True)
class IoPressure:
    """I/O pressure over an interval: % of wall time some task (some) or every non-idle task (full)
    was stalled on I/O, and the kernel's decaying 10-second averages at the end of it."""

    some_pct: float
    full_pct: float
    some_avg10: float
    full_avg10: float

    @classmethod
    def between(cls, prev: PressureSnapshot, cur: PressureSnapshot, itv: float) -> IoPressure:
        us = itv * 1e6
        return cls(
            some_pct=min(100.0, max(0.0, (cur.some_total_us - prev.some_total_us) / us * 100)),
            full_pct=min(100.0, max(0.0, (cur.full_total_us - prev.full_total_us) / us * 100)),
            some_avg10=cur.some_avg10,
            full_avg10=cur.full_avg10,
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "some_pct": round(self.some_pct, 2),
            "full_pct": round(self.full_pct, 2),
            "some_avg10": self.some_avg10,
            "full_avg10": self.full_avg10,
        }


@dataclass(frozen=True)
class ProcessIO:
    """One process's requests completed on one disk over an interval."""

    pid: int
    comm: str
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    device_ns: int
    interval_s: float

    @property
    def iops(self) -> float:
        return (self.reads + self.writes) / self.interval_s

    def to_dict(self) -> dict[str, Any]:
        ios = self.reads + self.writes
        return {
            "pid": self.pid,
            "comm": self.comm,
            "r_s": round(self.reads / self.interval_s, 2),
            "w_s": round(self.writes / self.interval_s, 2),
            "rkb_s": round(self.read_bytes / 1024 / self.interval_s, 2),
            "wkb_s": round(self.write_bytes / 1024 / self.interval_s, 2),
            "avg_device_ms": round(self.device_ns / ios / 1e6, 3) if ios else 0.0,
        }


@dataclass
class DiskSample:
    """One disk over one interval: sysstat's extended statistics, BPF's depth, latency and processes."""

    name: str
    dev: int
    interval_s: float
    virtual: bool  # no device behind it in sysfs (loop, zram, device-mapper, md)
    used: bool  # any I/O since boot (sysstat lists only those)
    reads: int
    writes: int
    discards: int
    flushes: int
    r_s: float
    w_s: float
    d_s: float
    f_s: float
    rkb_s: float
    wkb_s: float
    dkb_s: float
    r_await: float  # ms
    w_await: float  # ms
    aqu_sz: float
    util: float  # %
    nr_requests: int | None = None
    scheduler: str | None = None
    # From BPF; None where BPF is off or the disk is bio-based (no requests to see).
    depth: np.ndarray | None = None  # depth[d] = issues that found d requests on the device
    device_aqu_sz: float | None = None  # time-average of requests on the device (issue to completion)
    latency: Histogram | None = None  # ns on the device
    top: list[ProcessIO] = field(default_factory=list)
    process_bytes: int = 0  # moved by every process seen, not only the top ones (bpfscope never counts)

    @property
    def ios(self) -> int:
        return self.reads + self.writes + self.discards + self.flushes

    @property
    def active(self) -> bool:
        return self.ios > 0

    @property
    def depth_samples(self) -> int:
        return int(self.depth.sum()) if self.depth is not None else 0

    @property
    def depth_mean(self) -> float | None:
        if not self.depth_samples:
            return None
        import numpy as np

        assert self.depth is not None
        return float((np.arange(len(self.depth)) * self.depth).sum() / self.depth_samples)

    @property
    def depth_max(self) -> int | None:
        if not self.depth_samples:
            return None
        import numpy as np

        assert self.depth is not None
        return int(np.flatnonzero(self.depth)[-1])

    def latency_us(self, q: float) -> float | None:
        """The q-th percentile of device time, in microseconds (None without BPF data)."""
        if self.latency is None:
            return None
        ns = self.latency.percentile(q)
        return None if ns is None else ns / 1000

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None, digits: int = 2) -> float | None:
            return None if v is None else round(v, digits)

        out: dict[str, Any] = {
            "device": self.name,
            "interval_s": round(self.interval_s, 6),
            "r_s": r(self.r_s),
            "w_s": r(self.w_s),
            "d_s": r(self.d_s),
            "f_s": r(self.f_s),
            "rkb_s": r(self.rkb_s),
            "wkb_s": r(self.wkb_s),
            "dkb_s": r(self.dkb_s),
            "r_await": r(self.r_await, 3),
            "w_await": r(self.w_await, 3),
            "aqu_sz": r(self.aqu_sz, 3),
            "util": r(self.util),
            "nr_requests": self.nr_requests,
            "scheduler": self.scheduler,
        }
        if self.depth is not None:
            import numpy as np

            out["device_aqu_sz"] = r(self.device_aqu_sz, 3)
            out["depth_mean"] = r(self.depth_mean, 3)
            out["depth_max"] = self.depth_max
            out["depth_samples"] = self.depth_samples
            out["depth_hist"] = {str(int(d)): int(self.depth[d]) for d in np.flatnonzero(self.depth)}
        if self.latency is not None:
            out["latency_count"] = self.latency.total
            for q in (50, 95, 99):
                out[f"p{q}_us"] = r(self.latency_us(q), 1)
        if self.depth is not None:
            out["top"] = [p.to_dict() for p in self.top]
        return out


DISK_SCHEMA = Schema(
    "iostat",
    (
        Field("device", "str", label=True),
        Field("r_s", "float", "/s", "reads completed"),
        Field("w_s", "float", "/s", "writes completed"),
        Field("d_s", "float", "/s", "discards completed"),
        Field("f_s", "float", "/s", "flushes completed"),
        Field("rkb_s", "float", "kB/s"),
        Field("wkb_s", "float", "kB/s"),
        Field("dkb_s", "float", "kB/s"),
        Field("r_await", "float", "ms", "mean time per read, scheduler included (diskstats)"),
        Field("w_await", "float", "ms", "mean time per write, scheduler included (diskstats)"),
        Field("aqu_sz", "float", doc="time-average of requests in flight, scheduler included"),
        Field("util", "float", "%", "share of the interval with a request in flight"),
        Field("nr_requests", "int", nullable=True, doc="requests the queue lets in flight"),
        Field("scheduler", "str", nullable=True),
        Field("device_aqu_sz", "float", nullable=True, doc="time-average of requests on the device"),
        Field("depth_mean", "float", nullable=True, doc="requests on the device at each issue, mean"),
        Field("depth_max", "int", nullable=True),
        Field("depth_samples", "int", nullable=True, doc="issues seen"),
        Field("depth_hist", "dict", nullable=True, doc="depth at issue -> issues"),
        Field("latency_count", "int", nullable=True, doc="requests timed on the device"),
        Field("p50_us", "float", "us", nullable=True, doc="device time (issue to completion)"),
        Field("p95_us", "float", "us", nullable=True),
        Field("p99_us", "float", "us", nullable=True),
        Field("top", "list", nullable=True, doc="processes doing the most I/O on the disk"),
        Field("psi_io", "dict", nullable=True, doc="I/O pressure over the interval (machine-wide)"),
    ),
    doc="One disk over one interval: sysstat's iostat -x, and from BPF depth, latency and processes.",
    interval=True,
)


@dataclass
class DiskInterval(Sample):
    """Every disk over one interval, and I/O pressure over the same interval."""

    ts: float
    elapsed_s: float  # since start()
    interval_s: float
    disks: dict[str, DiskSample]
    io_pressure: IoPressure | None
    shown: list[str] = field(default_factory=list)  # the disks a view lists (as iostat lists them)

    def records(self) -> Iterator[dict[str, Any]]:
        psi = self.io_pressure.to_dict() if self.io_pressure else None
        for name in self.shown:
            values = dict.fromkeys(DISK_SCHEMA.names)
            values.update(self.disks[name].to_dict())
            values.update(ts=self.ts, interval_s=round(self.interval_s, 6), psi_io=psi)
            yield DISK_SCHEMA.record(values)


@dataclass
class _Snapshot:
    t_ns: int
    diskstats: dict[str, DiskCounters]
    psi: PressureSnapshot | None
    map_t_ns: int = 0  # when the maps were read (CLOCK_MONOTONIC, bpf_ktime_get_ns's clock)
    disk_maps: dict[int, Any] = field(default_factory=dict)  # dev -> map value record
    procs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (dev, tgid) -> map value record


@dataclass(kw_only=True)
class DiskConfig(Config):
    disk: str | None = None  # only this disk (-d)
    bpf: bool = True  # queue depth, device latency and processes from BPF; without, diskstats and PSI only
    top: int = TOP_PROCESSES  # processes kept per disk


class DiskCollector(BpfCollector[DiskConfig]):
    """Every whole disk (or one, ``disk``) at each ``sample()``: what changed since the previous one (or
    since ``start()``).

    With ``bpf`` (the default, as root) queue depth, device latency and processes come from the kernel;
    without, only /proc/diskstats and PSI are read, which needs no privilege. Disks are whole disks; the
    task filters do not apply to them, but bpfscope's own I/O is never named among the processes.
    """

    name = "iostat"
    bpf_object = "iostat"
    # BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
    requires = ("raw_tracepoint",)
    _schemas = (DISK_SCHEMA,)
    loss_counters = {
        "unseen_ends": ("unseen", "request ends unseen (depth corrected)"),
        "bs_rq_unseen": ("unseen", "requests completed unseen (no program ran at completion)"),
    }

    def __init__(self, config: DiskConfig) -> None:
        super().__init__(config)
        self.disk = block.resolve_disk(config.disk) if config.disk else None
        self._prev: _Snapshot | None = None
        self._start_ns = 0
        self._whole = block.disks()
        self._limits: dict[str, block.QueueLimits | None] = {}

    def rodata(self) -> dict[str, Any]:
        return {
            "bs_targ_dev": self.disk.dev if self.disk else 0,
            "bs_self_tgid": super().rodata()["bs_self_tgid"],
        }

    def autoload(self) -> set[str]:
        return block.programs(queue_time=False) | {"rq_requeue"}

    def open(self) -> None:
        # A bio-based disk (zram, device-mapper) has no requests for the programs to see.
        if self.config.bpf and (self.disk is None or block.request_based(self.disk.name)):
            super().open()
            # The first read of a map builds its numpy layout from BTF: not inside the first interval.
            self._snapshot()

    def start(self) -> None:
        self._prev = self._snapshot()
        self._start_ns = self._prev.t_ns

    def losses(self) -> Losses:
        return super().losses() if self.obj is not None else Losses()

    def _snapshot(self) -> _Snapshot:
        snap = _Snapshot(time.monotonic_ns(), read_diskstats(), read_io_pressure())
        if self.obj is not None:
            snap.map_t_ns = time.monotonic_ns()
            keys, values = self.obj.maps["disks"].items()
            snap.disk_maps = {int(k): v for k, v in zip(keys, values, strict=True)}
            pkeys, pvalues = self.obj.maps["procs"].items()
            snap.procs = {(int(k["dev"]), int(k["tgid"])): v for k, v in zip(pkeys, pvalues, strict=True)}
        return snap

    def _limits_of(self, name: str) -> block.QueueLimits | None:
        if name not in self._limits:
            try:
                self._limits[name] = block.queue_limits(name)
            except BpfscopeError:
                self._limits[name] = None
        return self._limits[name]

    def sample(self) -> DiskInterval:
        """What every disk did since the previous sample (or start())."""
        if self._prev is None:
            raise RuntimeError("DiskCollector.sample() before start()")
        cur = self._snapshot()
        prev = self._prev
        self._prev = cur
        itv = max((cur.t_ns - prev.t_ns) / 1e9, 1e-9)
        disks = {}
        for name, counters in cur.diskstats.items():
            dev = counters.dev
            if dev not in self._whole:
                self._whole = block.disks()  # a disk plugged in since: look again once
                if dev not in self._whole:
                    continue  # a partition
            if self.disk is not None and dev != self.disk.dev:
                continue
            disks[name] = self._disk(name, counters, prev, cur, itv)
        psi = IoPressure.between(prev.psi, cur.psi, itv) if prev.psi and cur.psi else None
        # The disks iostat lists: those with any I/O since boot, or the one -d names.
        shown = sorted(name for name, d in disks.items() if d.used or self.disk is not None)
        return DiskInterval(time.time(), (cur.t_ns - self._start_ns) / 1e9, itv, disks, psi, shown)

    def _disk(
        self, name: str, counters: DiskCounters, prev: _Snapshot, cur: _Snapshot, itv: float
    ) -> DiskSample:
        before = prev.diskstats.get(name)

        def d(key: str) -> int:
            return _delta(counters, before, key)

        reads, writes = d("rd_ios"), d("wr_ios")
        limits = self._limits_of(name)
        sample = DiskSample(
            name=name,
            dev=counters.dev,
            interval_s=itv,
            virtual=not (block.SYS_BLOCK / name / "device").exists(),
            used=counters.used,
            reads=reads,
            writes=writes,
            discards=d("dc_ios"),
            flushes=d("fl_ios"),
            r_s=reads / itv,
            w_s=writes / itv,
            d_s=d("dc_ios") / itv,
            f_s=d("fl_ios") / itv,
            rkb_s=d("rd_sectors") * SECTOR_BYTES / 1024 / itv,
            wkb_s=d("wr_sectors") * SECTOR_BYTES / 1024 / itv,
            dkb_s=d("dc_sectors") * SECTOR_BYTES / 1024 / itv,
            r_await=d("rd_ticks") / reads if reads else 0.0,
            w_await=d("wr_ticks") / writes if writes else 0.0,
            aqu_sz=d("time_in_queue") / (1000 * itv),
            util=d("io_ticks") / (1000 * itv) * 100,
            nr_requests=limits.nr_requests if limits else None,
            scheduler=limits.scheduler if limits else None,
        )
        if self.obj is not None and block.request_based(name):
            self._add_bpf(sample, prev, cur, itv)
        return sample

    def _add_bpf(self, sample: DiskSample, prev: _Snapshot, cur: _Snapshot, itv: float) -> None:
        import numpy as np

        from bpfscope.runtime.hist import Histogram

        now, before = cur.disk_maps.get(sample.dev), prev.disk_maps.get(sample.dev)
        if now is None:
            sample.depth = np.zeros(1, dtype=np.uint64)
            sample.latency = Histogram(np.zeros(1, dtype=np.uint64), "loglin")
            sample.device_aqu_sz = 0.0
        else:
            depth = now["depth"].astype(np.uint64)
            latency = Histogram(now["latency"]["slots"], "loglin")
            if before is not None:
                depth = depth - before["depth"].astype(np.uint64)
                latency = latency - Histogram(before["latency"]["slots"], "loglin")
            sample.depth, sample.latency = depth, latency
            span = cur.map_t_ns - prev.map_t_ns
            if span > 0:
                sample.device_aqu_sz = (
                    _depth_integral(now, cur.map_t_ns) - _depth_integral(before, prev.map_t_ns)
                ) / span
        procs = []
        for (dev, tgid), v in cur.procs.items():
            if dev != sample.dev:
                continue
            old = prev.procs.get((dev, tgid))
            counts = {k: int(v[k]) for k in ("reads", "writes", "read_bytes", "write_bytes", "device_ns")}
            if (
                old is not None
                and int(old["reads"]) <= counts["reads"]
                and int(old["writes"]) <= counts["writes"]
            ):
                counts = {k: counts[k] - int(old[k]) for k in counts}
            # else: new, or evicted from the LRU map and back since: all it has is this interval's.
            if counts["reads"] or counts["writes"]:
                comm = v["comm"].split(b"\0", 1)[0].decode(errors="replace")
                procs.append(ProcessIO(tgid, comm, **counts, interval_s=itv))
        procs.sort(key=lambda p: (p.reads + p.writes, p.read_bytes + p.write_bytes), reverse=True)
        sample.top = procs[: self.config.top]
        sample.process_bytes = sum(p.read_bytes + p.write_bytes for p in procs)


def _depth_integral(value: Any, t_ns: int) -> int:
    """Requests on the device integrated over time (request-ns) up to t_ns: the kernel keeps it up to the
    last change of depth, and the depth has held since."""
    if value is None:
        return 0
    total, changed, inflight = int(value["depth_ns"]), int(value["changed_ns"]), int(value["inflight"])
    if changed and t_ns > changed and inflight > 0:
        total += (t_ns - changed) * inflight
    return total


def _fmt_ms(us: float | None) -> str | None:
    return None if us is None else f"{us / 1000:.3f}"


class IostatView(View):
    """One table per interval; "total" when the run is one report (no interval given)."""

    def __init__(self, intervals: bool) -> None:
        self.intervals = intervals
        self.shown = 0

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, DiskInterval)
        self.shown += 1
        label = self.shown if self.intervals else "total"
        _report(term, sample, [sample.disks[name] for name in sample.shown], label)

    def summary(self, collector: Collector, losses: Losses) -> str:
        return f"iostat: {losses.text()}"


def _report(out: Terminal, sample: DiskInterval, show: list[DiskSample], interval: int | str) -> None:
    heading = f"interval {interval} ({sample.interval_s:.2f} s)"
    if sample.io_pressure:
        p = sample.io_pressure
        heading += (
            f"  I/O pressure: some {p.some_pct:.1f}% (avg10 {p.some_avg10:.1f}), "
            f"full {p.full_pct:.1f}% (avg10 {p.full_avg10:.1f})"
        )
    out.heading(heading)
    columns = ["DEVICE", "r/s", "w/s", "rkB/s", "wkB/s", "r_await", "w_await", "aqu-sz", "%util"]
    bpf = any(d.depth is not None for d in show)
    if bpf:
        columns += ["dev-aqu", "depth", "max", "nr_req", "p50 ms", "p99 ms", "top process"]
    rows, styles = [], []
    for disk in show:
        row: list[Any] = [
            disk.name,
            round(disk.r_s, 2),
            round(disk.w_s, 2),
            round(disk.rkb_s, 2),
            round(disk.wkb_s, 2),
            round(disk.r_await, 2),
            round(disk.w_await, 2),
            round(disk.aqu_sz, 2),
            round(disk.util, 2),
        ]
        if bpf:
            mean = disk.depth_mean
            top = disk.top[0] if disk.top else None
            row += [
                None if disk.device_aqu_sz is None else round(disk.device_aqu_sz, 2),
                None if mean is None else round(mean, 1),
                disk.depth_max,
                disk.nr_requests,
                _fmt_ms(disk.latency_us(50)),
                _fmt_ms(disk.latency_us(99)),
                f"{top.comm}[{top.pid}] {top.iops:.0f}/s" if top else None,
            ]
        rows.append([("-" if v is None else v) for v in row])
        saturated = disk.util >= 90 or (
            disk.nr_requests and disk.depth_max is not None and disk.depth_max >= disk.nr_requests
        )
        styles.append("bold red" if saturated else None)
    out.table(columns, rows, styles=styles)


EXAMPLES = """
\b
Examples:
  bpfscope iostat 1                 # every disk, every second, until Ctrl-C
  bpfscope iostat -d vda 1 10       # one disk, ten one-second intervals
  bpfscope iostat --json 2 5        # JSON lines: one per disk per interval
  bpfscope iostat --duration 30     # one report for the whole 30 seconds
"""


@click.command(name="iostat", epilog=EXAMPLES)
@option("disk")
@option(
    "rows", default=TOP_PROCESSES, help="Processes listed per disk in --json (the table shows the first)."
)
@common_options
def command(run: Run, disk: str | None, max_rows: int) -> None:
    """Per disk and interval: sysstat's iostat -x figures (r/s, w/s, rkB/s, wkB/s, r_await, w_await,
    aqu-sz, %util, computed from /proc/diskstats exactly as iostat does), and from BPF what iostat cannot
    show: the queue depth on the device (dev-aqu, its time-average; depth and max, what each request found
    there when issued, against nr_requests), device latency percentiles (issue to completion) and the
    process doing the most I/O. I/O pressure (PSI) heads each interval.

    Disks are listed as iostat lists them: those with any I/O since boot, or the one -d names. -p and
    --cgroup do not apply: disks are shown whole.
    """
    if run.pid or run.cgroup:
        raise BpfscopeError(
            "iostat reports whole disks, not processes",
            hint="for one process's I/O use biotop or biosnoop -p",
        )
    config = DiskConfig(disk=disk, top=max_rows, include_self=run.include_self)
    # The note follows the first reading at once: a peer sampling alongside (as the tests run sysstat)
    # can start on it with interval boundaries a few milliseconds apart.
    run.run(
        DiskCollector(config), IostatView(run.interval is not None), "Tracing block I/O... Ctrl-C to end."
    )
