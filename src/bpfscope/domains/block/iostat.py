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

The collector is a Python API, used by ``bpfscope check`` too::

    with DiskSampler() as sampler:
        sampler.start()
        time.sleep(5)
        sample = sampler.sample()          # everything since start()
        print(sample.disks["vda"].r_s, sample.disks["vda"].latency_us(99))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.block import disks as block
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.runtime.hist import Histogram

# BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand in.
REQUIRES = ("raw_tracepoint",)

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


@dataclass
class Sample:
    """Every disk over one interval, and I/O pressure over the same interval."""

    elapsed_s: float  # since start()
    interval_s: float
    disks: dict[str, DiskSample]
    io_pressure: IoPressure | None


@dataclass
class _Snapshot:
    t_ns: int
    diskstats: dict[str, DiskCounters]
    psi: PressureSnapshot | None
    map_t_ns: int = 0  # when the maps were read (CLOCK_MONOTONIC, bpf_ktime_get_ns's clock)
    disk_maps: dict[int, Any] = field(default_factory=dict)  # dev -> map value record
    procs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (dev, tgid) -> map value record


class DiskSampler:
    """Samples every whole disk (or one, ``disk``) each time ``sample()`` is called: what changed since the
    previous call (or since ``start()``).

    With ``bpf`` (the default, as root) queue depth, device latency and processes come from the kernel;
    without, only /proc/diskstats and PSI are read, which needs no privilege.
    """

    def __init__(self, disk: str | None = None, bpf: bool = True, top: int = TOP_PROCESSES) -> None:
        self.disk = block.resolve_disk(disk) if disk else None
        self.bpf = bpf
        self.top = top
        self._obj: BpfObject | None = None
        self._prev: _Snapshot | None = None
        self._start_ns = 0
        self._whole = block.disks()
        self._limits: dict[str, block.QueueLimits | None] = {}

    def start(self) -> DiskSampler:
        # A bio-based disk (zram, device-mapper) has no requests for the programs to see.
        wanted = self.bpf and (self.disk is None or block.request_based(self.disk.name))
        if wanted and self._obj is None:
            require(*REQUIRES)
            autoload = block.programs(queue_time=False) | {"rq_requeue"}
            rodata = {"bs_targ_dev": self.disk.dev if self.disk else 0}
            self._obj = BpfObject(tool_object("iostat"), rodata=rodata, autoload=autoload)
            try:
                self._obj.attach()
            except BaseException:
                self.close()
                raise
            # The first read of a map builds its numpy layout from BTF: not inside the first interval.
            self._snapshot()
        self._prev = self._snapshot()
        self._start_ns = self._prev.t_ns
        return self

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> DiskSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def losses(self) -> str | None:
        """The BPF side's losses for a tool's last line: events the kernel skipped, and request ends
        that were never seen (those requests were taken off the queue depth when found out)."""
        if self._obj is None:
            return None
        return f"{self._obj.losses()}, {self._obj.bss['unseen_ends']} request ends unseen (depth corrected)"

    def _snapshot(self) -> _Snapshot:
        snap = _Snapshot(time.monotonic_ns(), read_diskstats(), read_io_pressure())
        if self._obj is not None:
            snap.map_t_ns = time.monotonic_ns()
            keys, values = self._obj.maps["disks"].items()
            snap.disk_maps = {int(k): v for k, v in zip(keys, values, strict=True)}
            pkeys, pvalues = self._obj.maps["procs"].items()
            snap.procs = {(int(k["dev"]), int(k["tgid"])): v for k, v in zip(pkeys, pvalues, strict=True)}
        return snap

    def _limits_of(self, name: str) -> block.QueueLimits | None:
        if name not in self._limits:
            try:
                self._limits[name] = block.queue_limits(name)
            except BpfscopeError:
                self._limits[name] = None
        return self._limits[name]

    def sample(self) -> Sample:
        """What every disk did since the previous sample (or start())."""
        if self._prev is None:
            raise RuntimeError("DiskSampler.sample() before start()")
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
        return Sample((cur.t_ns - self._start_ns) / 1e9, itv, disks, psi)

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
        if self._obj is not None and block.request_based(name):
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
        sample.top = procs[: self.top]


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


def _report(opts: RunOptions, sample: Sample, show: list[DiskSample], interval: int | str) -> None:
    out = opts.output
    if opts.as_json:
        psi = sample.io_pressure.to_dict() if sample.io_pressure else None
        for disk in show:
            out.record(
                {
                    "interval": interval,
                    "elapsed_s": round(sample.elapsed_s, 3),
                    **disk.to_dict(),
                    "psi_io": psi,
                }
            )
        return
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
@click.option("-d", "--disk", metavar="DISK", help="Only this disk (vda, /dev/vda or major:minor).")
@click.option(
    "-T",
    "--top",
    type=click.IntRange(min=0),
    default=TOP_PROCESSES,
    show_default=True,
    help="Processes listed per disk in --json (the table shows the first).",
)
@tool_options
def command(opts: RunOptions, disk: str | None, top: int) -> None:
    """Per disk and interval: sysstat's iostat -x figures (r/s, w/s, rkB/s, wkB/s, r_await, w_await,
    aqu-sz, %util, computed from /proc/diskstats exactly as iostat does), and from BPF what iostat cannot
    show: the queue depth on the device (dev-aqu, its time-average; depth and max, what each request found
    there when issued, against nr_requests), device latency percentiles (issue to completion) and the
    process doing the most I/O. I/O pressure (PSI) heads each interval.

    Disks are listed as iostat lists them: those with any I/O since boot, or the one -d names. -p and
    --cgroup do not apply: disks are shown whole.
    """
    if opts.pid or opts.cgroup:
        raise BpfscopeError(
            "iostat reports whole disks, not processes",
            hint="for one process's I/O use biotop or biosnoop -p",
        )
    with DiskSampler(disk, top=top) as sampler:
        sampler.start()
        # The note follows the first reading at once: a peer sampling alongside (as the tests run
        # sysstat) can start on it with interval boundaries a few milliseconds apart.
        intervals = ticks(opts, "Tracing block I/O... Ctrl-C to end.")
        for n, _elapsed in enumerate(intervals, 1):
            sample = sampler.sample()
            show = [d for d in sample.disks.values() if d.used or disk]
            show.sort(key=lambda d: d.name)
            _report(opts, sample, show, n if opts.interval else "total")
        losses = sampler.losses()
        if losses:
            opts.output.note(losses)
