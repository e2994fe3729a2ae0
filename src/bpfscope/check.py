"""bpfscope check: over a short window, is CPU, RAM or a disk the problem?

Each resource gives rows: a metric, its value, a verdict (ok, warn, PROBLEM) against thresholds stated
on the row, and the context that explains it. A last line names the resource at fault, or says no problem
was found; the exit status is 1 when any row is a PROBLEM.

Rows come from providers, listed in :data:`PROVIDER_PATHS`. A provider declares the requirements it cannot run
without, gets ready (loads its BPF programs) before the window, takes its starting snapshot when the
window opens and returns its rows when it closes. Adding a resource (network, page cache) is adding a
provider class to the list::

    class NetworkProvider(Provider):
        name = "Network"
        requires = ("bpf",)

        def start(self) -> None: ...                       # baseline at the window's start
        def rows(self, window_s: float) -> list[Row]: ...  # verdicts at its end

The numbers come from the same collectors as the tools: disks from ``iostat``'s :class:`DiskSampler`
(sysstat's formulas on /proc/diskstats, device latency and depth at issue from BPF), CPU and RAM from psutil,
I/O pressure from /proc/pressure/io.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import click

from bpfscope.core.output import Output
from bpfscope.core.tool import Stop
from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    from bpfscope.core.sampler import Sampler
    from bpfscope.tools.iostat import DiskSample, DiskSampler, PressureSnapshot

DEFAULT_DURATION_S = 10.0

# --- Thresholds -------------------------------------------------------------------------------------
# CPU busy over the window: everything but idle and iowait, over all CPUs (what top and psutil show).
# Past 80% a burst has no headroom left; past 95% runnable tasks queue for a CPU and every latency on the
# machine grows with that queue.
CPU_WARN_PCT = 80.0
CPU_PROBLEM_PCT = 95.0
# RAM used: (total - available) / total, psutil's figure. "available" already counts the page cache the
# kernel can reclaim, so this is memory it cannot get back without swapping or killing. Past 85% the page
# cache that spares the disks is being squeezed out; past 95% reclaim stalls and the OOM killer are near.
RAM_WARN_PCT = 85.0
RAM_PROBLEM_PCT = 95.0
# p99 device time of a disk (issue to completion). SSDs, NVMe and virtual disks answer in well under a
# millisecond and a spinning disk in 5-15 ms (seek and rotation): a p99 of 20 ms is slow for anything but
# a busy HDD, and 100 ms is a request stuck behind a long queue, a throttled or a failing device on any.
DISK_P99_WARN_MS = 20.0
DISK_P99_PROBLEM_MS = 100.0
# A percentile of a handful of requests is one request's latency: below this many in the window a slow
# disk only warns (one slow flush on an idle disk is not a problem).
DISK_MIN_REQUESTS = 20
# Queue depth (aqu-sz: the time-average of requests from allocation to completion, scheduler included) as
# a share of nr_requests, which bounds exactly those requests. At nr_requests, submitters sleep for a free
# request and the queue adds latency of its own; half full means the disk is fed faster than it drains.
DISK_DEPTH_WARN_FRAC = 0.5
DISK_DEPTH_PROBLEM_FRAC = 0.9
# %util, the share of time with a request in flight: 100% means never idle, not saturated, for disks that
# serve requests in parallel (SSD, NVMe, virtio, RAID), so on its own it only warns.
DISK_UTIL_WARN_PCT = 90.0
# PSI io "some": share of the window in which at least one task was stalled waiting for I/O. 10% is
# slowness people notice; past 30% waiting for I/O is what the machine mostly does.
PSI_IO_WARN_PCT = 10.0
PSI_IO_PROBLEM_PCT = 30.0


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    PROBLEM = "PROBLEM"
    UNKNOWN = "n/a"  # the provider could not run here (the row says why)


_SEVERITY = {Verdict.UNKNOWN: 0, Verdict.OK: 0, Verdict.WARN: 1, Verdict.PROBLEM: 2}


@dataclass(frozen=True)
class Threshold:
    """warn and PROBLEM levels of a metric where higher is worse."""

    warn: float
    problem: float
    unit: str

    def judge(self, value: float | None) -> Verdict:
        if value is None:
            return Verdict.OK
        if value >= self.problem:
            return Verdict.PROBLEM
        if value >= self.warn:
            return Verdict.WARN
        return Verdict.OK

    def describe(self) -> str:
        return f"warn >= {_num(self.warn)}{self.unit}, PROBLEM >= {_num(self.problem)}{self.unit}"


def _num(v: float) -> str:
    return f"{v:g}" if v < 1e6 else f"{v:.3g}"


@dataclass
class Row:
    resource: str  # "CPU", "RAM", "Disk vda", "I/O pressure"
    metric: str  # "busy", "p99 latency", ...
    value: float | None  # in ``unit``; None when there is nothing to measure (an idle disk's latency)
    unit: str
    text: str  # value for people
    verdict: Verdict
    threshold: str  # the rule behind the verdict
    detail: str = ""  # context that explains the value
    # A symptom (I/O pressure) points at a cause elsewhere; the summary names causes first.
    symptom: bool = False

    @property
    def name(self) -> str:
        return f"{self.resource} {self.metric}".strip()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        return {"kind": "row", "name": self.name, **out}


class Provider:
    """One resource's rows. Subclasses set ``name`` and ``requires`` and implement start() and rows()."""

    name: ClassVar[str] = ""
    # Requirements (keys of REQUIREMENTS) without which the provider cannot run at all.
    requires: ClassVar[tuple[str, ...]] = ()

    def prepare(self) -> None:
        """The slow part (loading BPF programs), done before the window opens."""

    def start(self) -> None:
        """Baseline snapshot: the window opens."""

    def rows(self, window_s: float) -> list[Row]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what prepare() took; called on every path."""


class SamplerProvider(Provider):
    """A ``bpfscope check`` provider on a sampler: loaded and attached before the window, sampled at its
    start (what came before is dropped) and at its end."""

    sampler_class: ClassVar[type[Sampler]]

    def __init__(self) -> None:
        self._sampler: Sampler | None = None

    def prepare(self) -> None:
        self._sampler = self.sampler_class()
        self._sampler.obj.attach()

    def sample(self) -> Any:
        assert self._sampler is not None
        return self._sampler.sample()

    def start(self) -> None:
        self.sample()

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()


def _require_bpf() -> str | None:
    from bpfscope.core.bpf import require

    try:
        require("raw_tracepoint")
    except BpfscopeError as exc:
        return str(exc)
    return None


def _require_psi() -> str | None:
    from bpfscope.tools.iostat import PSI_IO

    return None if PSI_IO.exists() else f"{PSI_IO} is missing (kernel without PSI, or booted with psi=0)"


# Requirement name -> check returning None when met, or why not.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {"bpf": _require_bpf, "psi": _require_psi}


def _pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms" if ms >= 0.1 else f"{us:.0f} us"


class CpuProvider(Provider):
    name = "CPU"

    def start(self) -> None:
        import psutil

        self._before = psutil.cpu_times()

    def rows(self, window_s: float) -> list[Row]:
        import psutil

        after = psutil.cpu_times()
        delta = {f: max(0.0, getattr(after, f) - getattr(self._before, f)) for f in after._fields}
        # user and nice already include guest time (as psutil counts it).
        total = sum(v for f, v in delta.items() if f not in ("guest", "guest_nice")) or 1e-9
        idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
        busy = max(0.0, 100.0 * (total - idle) / total)

        def share(*fields: str) -> float:
            return 100.0 * sum(delta.get(f, 0.0) for f in fields) / total

        detail = (
            f"user {_pct(share('user', 'nice'))}, system {_pct(share('system', 'irq', 'softirq'))}, "
            f"iowait {_pct(share('iowait'))}, steal {_pct(share('steal'))}; {psutil.cpu_count()} CPUs"
        )
        limit = Threshold(CPU_WARN_PCT, CPU_PROBLEM_PCT, "%")
        return [
            Row(
                "CPU",
                "busy",
                busy,
                "%",
                _pct(busy),
                limit.judge(busy),
                limit.describe(),
                detail,
            )
        ]


class MemoryProvider(Provider):
    name = "RAM"

    def rows(self, window_s: float) -> list[Row]:
        import psutil

        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        gib = 1 << 30
        detail = f"available {vm.available / gib:.1f} of {vm.total / gib:.1f} GiB"
        if swap.total:
            detail += f"; swap {swap.percent:.0f}% used"
        limit = Threshold(RAM_WARN_PCT, RAM_PROBLEM_PCT, "%")
        return [
            Row(
                "RAM",
                "used",
                vm.percent,
                "%",
                _pct(vm.percent),
                limit.judge(vm.percent),
                limit.describe(),
                detail,
            )
        ]


class DiskProvider(Provider):
    """Rows per disk: real disks always (one row when idle), virtual ones (loop, zram, device-mapper) when
    they did I/O."""

    name = "Disk"

    def __init__(self) -> None:
        self._sampler: DiskSampler | None = None
        self._no_bpf: str | None = None

    def prepare(self) -> None:
        from bpfscope.tools.iostat import DiskSampler

        # Without BPF the disks are still judged, on diskstats' mean await instead of the p99.
        self._no_bpf = _require_bpf()
        self._sampler = DiskSampler(bpf=self._no_bpf is None)
        self._sampler.start()

    def start(self) -> None:
        assert self._sampler is not None
        self._sampler.sample()  # what came before the window is dropped

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()

    def rows(self, window_s: float) -> list[Row]:
        assert self._sampler is not None
        sample = self._sampler.sample()
        shown = [d for d in sample.disks.values() if not d.virtual or d.active]
        rows: list[Row] = []
        for disk in sorted(shown, key=lambda d: (d.virtual, d.name)):
            rows += self._disk_rows(disk)
        return rows

    def _disk_rows(self, disk: DiskSample) -> list[Row]:
        res = f"Disk {disk.name}"
        depth = disk.aqu_sz if disk.active else None
        context = [f"{_pct(disk.util)} util"]
        if depth is not None:
            context.append(f"queue depth {depth:.0f}")

        rows = [self._latency_row(res, disk, context)]
        if not disk.active:
            return rows  # an idle disk: one row, so that the busy ones stand out
        rows.append(
            Row(
                res,
                "IOPS r/w",
                disk.r_s + disk.w_s,
                "/s",
                f"{disk.r_s:.0f} / {disk.w_s:.0f}",
                Verdict.OK,
                "no limit: load, not a fault",
            )
        )
        mbs = (disk.rkb_s + disk.wkb_s) / 1024
        rows.append(
            Row(
                res,
                "MB/s",
                mbs,
                "MB/s",
                f"{mbs:.1f}",
                Verdict.OK,
                "no limit: load, not a fault",
                f"read {disk.rkb_s / 1024:.1f}, write {disk.wkb_s / 1024:.1f}",
            )
        )
        rows.append(self._depth_row(res, disk, depth))
        util_verdict = Verdict.WARN if disk.util >= DISK_UTIL_WARN_PCT else Verdict.OK
        rows.append(
            Row(
                res,
                "%util",
                disk.util,
                "%",
                _pct(disk.util),
                util_verdict,
                f"warn >= {DISK_UTIL_WARN_PCT:g}%, never PROBLEM alone",
            )
        )
        return rows

    def _latency_row(self, res: str, disk: DiskSample, context: list[str]) -> Row:
        limit = Threshold(DISK_P99_WARN_MS, DISK_P99_PROBLEM_MS, " ms")
        metric = "p99" if disk.latency is not None else "await"
        if not disk.active:
            return Row(
                res, metric, None, "ms", "no I/O", Verdict.OK, limit.describe(), "idle over the window"
            )
        if disk.latency is not None:
            count = disk.latency.total
            p99 = disk.latency_us(99)
            value = None if p99 is None else p99 / 1000
            detail = [f"p50 {_ms(disk.latency_us(50))}", f"p95 {_ms(disk.latency_us(95))}", *context]
            # None: no request was both issued and completed while we watched.
            text = _ms(p99)
        else:
            # No BPF (or a bio-based disk): diskstats' mean time per request, scheduler included.
            count = disk.reads + disk.writes
            await_ms = (disk.r_await * disk.reads + disk.w_await * disk.writes) / count if count else None
            value = await_ms
            detail = [*context, "mean await: " + ("no BPF" if self._no_bpf else "bio-based disk")]
            text = "-" if await_ms is None else _ms(await_ms * 1000)
        verdict = limit.judge(value)
        if verdict is Verdict.PROBLEM and count < DISK_MIN_REQUESTS:
            verdict = Verdict.WARN
            detail.append(f"only {count} requests")
        return Row(res, metric, value, "ms", text, verdict, limit.describe(), "; ".join(detail))

    def _depth_row(self, res: str, disk: DiskSample, depth: float | None) -> Row:
        nr = disk.nr_requests
        text = "-" if depth is None else f"{depth:.1f}"
        detail = []
        if disk.depth_mean is not None:
            # BPF's view: requests already on the device as each one was issued to it.
            detail.append(f"on device at issue: mean {disk.depth_mean:.1f}, max {disk.depth_max}")
        if nr:
            detail.append(f"nr_requests {nr}")
            limit = Threshold(DISK_DEPTH_WARN_FRAC * nr, DISK_DEPTH_PROBLEM_FRAC * nr, "")
            verdict = limit.judge(depth)
            rule = (
                f"warn >= {DISK_DEPTH_WARN_FRAC:.0%}, PROBLEM >= {DISK_DEPTH_PROBLEM_FRAC:.0%} of nr_requests"
            )
        else:
            verdict, rule = Verdict.OK, "no nr_requests (bio-based disk)"
        return Row(res, "queue depth", depth, "", text, verdict, rule, "; ".join(detail))


class IoPressureProvider(Provider):
    """PSI io: a symptom (tasks waiting for I/O) whose cause is a disk, a throttle or remote storage."""

    name = "I/O pressure"
    requires = ("psi",)

    def start(self) -> None:
        from bpfscope.tools.iostat import read_io_pressure

        self._before: PressureSnapshot | None = read_io_pressure()
        self._t0 = time.monotonic()

    def rows(self, window_s: float) -> list[Row]:
        from bpfscope.tools.iostat import IoPressure, read_io_pressure

        after = read_io_pressure()
        if self._before is None or after is None:
            return []
        p = IoPressure.between(self._before, after, time.monotonic() - self._t0)
        limit = Threshold(PSI_IO_WARN_PCT, PSI_IO_PROBLEM_PCT, "%")
        return [
            Row(
                "PSI io",
                "some",
                p.some_pct,
                "%",
                _pct(p.some_pct),
                limit.judge(p.some_pct),
                limit.describe() + " of the window",
                f"full {_pct(p.full_pct)}; avg10 some {p.some_avg10:.1f}%, full {p.full_avg10:.1f}%",
                symptom=True,
            )
        ]


# The providers `bpfscope check` runs, in the order their rows are shown: "module:Class". Providers of
# other resources live beside the tools whose collectors they share, and those modules import this one,
# so the list is resolved on first use (``PROVIDERS``, through the module's __getattr__).
PROVIDER_PATHS = [
    "bpfscope.check:CpuProvider",
    "bpfscope.check:MemoryProvider",
    "bpfscope.check:DiskProvider",
    "bpfscope.tools.cachestat:PageCacheProvider",
    "bpfscope.tools.vfsstat:VfsProvider",
    "bpfscope.tools.writeback:WritebackProvider",
    "bpfscope.check:IoPressureProvider",
    "bpfscope.tools.tcpretrans:TcpProvider",
    "bpfscope.tools.sockstat:SocketBufferProvider",
]


def default_providers() -> list[type[Provider]]:
    import importlib

    classes = []
    for path in PROVIDER_PATHS:
        module, name = path.split(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def __getattr__(name: str) -> Any:
    if name == "PROVIDERS":
        return default_providers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Report:
    rows: list[Row]
    window_s: float

    @property
    def problem(self) -> bool:
        return any(r.verdict is Verdict.PROBLEM for r in self.rows)

    def summary(self) -> str:
        """One line: the resource at fault (causes before symptoms), or that none was found."""
        bad = [r for r in self.rows if r.verdict is Verdict.PROBLEM]
        if not bad:
            warned = [r.name for r in self.rows if r.verdict is Verdict.WARN]
            return "no problem found" + (f" (warnings: {', '.join(warned)})" if warned else "")
        causes = [r for r in bad if not r.symptom]
        symptoms = [r for r in bad if r.symptom]
        if not causes:
            worst = symptoms[0]
            # Nothing is past its PROBLEM level, but what warns (a page cache that misses, a busy disk)
            # adds up to the stall: name it rather than guess at causes out of sight.
            suspects = [r for r in self.rows if r.verdict is Verdict.WARN and not r.symptom]
            if suspects:
                return f"PROBLEM: {worst.name} {worst.text}; nothing else past its PROBLEM level, but " + (
                    ", ".join(
                        f"{r.name} {r.text} warns" + (f" ({r.detail})" if r.detail else "") for r in suspects
                    )
                )
            return (
                f"PROBLEM: {worst.name} {worst.text}, but no disk is slow: tasks wait on I/O elsewhere "
                "(an I/O throttle such as io.max or blkio.throttle, network storage, or swap)"
            )
        parts = []
        for resource in dict.fromkeys(r.resource for r in causes):
            # The resource's first PROBLEM row: providers put the telling metric first.
            lead = next(r for r in causes if r.resource == resource)
            parts.append(f"{lead.name} {lead.text}" + (f" ({lead.detail})" if lead.detail else ""))
        line = "PROBLEM: " + ", ".join(parts)
        if symptoms:
            line += "; " + ", ".join(f"{s.name} {s.text}" for s in symptoms)
        return line

    def exit_code(self) -> int:
        return 1 if self.problem else 0


def run_check(
    duration_s: float = DEFAULT_DURATION_S, providers: list[type[Provider]] | None = None
) -> Report:
    """Run every provider over one window of ``duration_s`` seconds (Ctrl-C or SIGTERM ends it early, with
    the rows of the window so far). Rows keep the providers' order."""
    classes = default_providers() if providers is None else providers
    # One slot per provider: a row saying why it could not run, or the provider itself.
    slots: list[Row | Provider] = []
    try:
        for cls in classes:
            missing = next((why for req in cls.requires if (why := REQUIREMENTS[req]()) is not None), None)
            if missing:
                slots.append(Row(cls.name, "", None, "", "-", Verdict.UNKNOWN, "cannot run here", missing))
                continue
            provider = cls()
            slots.append(provider)  # closed in the end whatever happens
            try:
                provider.prepare()
            except BpfscopeError as exc:
                # One resource that cannot be watched here must not hide the others.
                provider.close()
                slots[-1] = Row(cls.name, "", None, "", "-", Verdict.UNKNOWN, "cannot run here", str(exc))
        ready = [s for s in slots if isinstance(s, Provider)]
        # Every window opens after every provider is ready, so loading BPF programs is in none of them.
        for provider in ready:
            provider.start()
        start = time.monotonic()
        with contextlib.suppress(KeyboardInterrupt, Stop):
            time.sleep(duration_s)
        window = time.monotonic() - start
        rows: list[Row] = []
        for slot in slots:
            rows += slot.rows(window) if isinstance(slot, Provider) else [slot]
    finally:
        for slot in slots:
            if isinstance(slot, Provider):
                slot.close()
    return Report(_saturated_disks(rows), window)


def _saturated_disks(rows: list[Row]) -> list[Row]:
    """A disk never idle while tasks stall on I/O is the cause of that stall: the disk is saturated, even
    if each request is fast once on the device (the waiting happens in the queue before it)."""
    stalled = any(r.symptom and r.resource == "PSI io" and r.verdict is Verdict.PROBLEM for r in rows)
    if not stalled:
        return rows
    busy = [r for r in rows if r.metric == "%util" and r.value is not None and r.value >= DISK_UTIL_WARN_PCT]
    for row in busy:
        row.verdict = Verdict.PROBLEM
        row.threshold = f">= {DISK_UTIL_WARN_PCT:g}% while I/O pressure is a PROBLEM: saturated"
        depth = next((r for r in rows if r.resource == row.resource and r.metric == "queue depth"), None)
        row.detail = "saturated: tasks wait for this disk" + (f"; queue depth {depth.text}" if depth else "")
    return rows


_STYLES = {Verdict.PROBLEM: "bold red", Verdict.WARN: "yellow", Verdict.OK: None, Verdict.UNKNOWN: "dim"}


def render(report: Report, out: Output) -> None:
    if out.as_json:
        for row in report.rows:
            out.record(row.to_dict())
        out.record(
            {
                "kind": "summary",
                "summary": report.summary(),
                "problem": report.problem,
                "window_s": round(report.window_s, 3),
                "exit_code": report.exit_code(),
            }
        )
        return
    # The culprit first within its resource would reorder the resources; instead each row is coloured by
    # its verdict and the summary names the culprit.
    out.table(
        ["CHECK", "VALUE", "VERDICT", "DETAIL", "THRESHOLD"],
        [
            [r.name, r.text, r.verdict.value, f"({r.detail})" if r.detail else "", r.threshold]
            for r in report.rows
        ],
        styles=[_STYLES[r.verdict] for r in report.rows],
    )
    style = "bold red" if report.problem else "bold green"
    out.console.print(f"[{style}]{report.summary()}[/{style}]", highlight=False)


EXAMPLES = """
\b
Examples:
  bpfscope check                    # ten seconds, then a verdict per resource
  bpfscope check --duration 3 --json
  bpfscope check || echo "something is wrong"

\b
Exit status:
  0  no PROBLEM row (warnings allowed)
  1  at least one PROBLEM row: the last line names the resource
  2  bpfscope could not run (bad input, missing privileges)
"""


@click.command(name="check", epilog=EXAMPLES)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_DURATION_S,
    show_default=True,
    help="Seconds to watch.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per row, then the summary.")
def command(duration: float, as_json: bool) -> None:
    """Is CPU, RAM or a disk the problem right now? Watches the machine for --duration seconds and gives
    each metric a verdict (ok, warn, PROBLEM) against a stated threshold: CPU and RAM use, and per disk
    the device latency p50/p95/p99, IOPS, MB/s, queue depth against nr_requests and %util, then I/O
    pressure (PSI). The last line names the resource at fault, or says that no problem was found.
    """
    out = Output(as_json)
    if not as_json:
        out.note(f"Watching for {duration:g} s...")
    report = run_check(duration)
    render(report, out)
    if report.problem:
        raise SystemExit(1)
