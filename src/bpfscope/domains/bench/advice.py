"""Advice with its cost: for each lever (more RAM, more IOPS, more CPU) and component, the largest gain at
p99 it can give, its monthly price, and which resource is the bottleneck.

A lever can only remove the part of the p99 band's time it acts on:

- RAM removes disk reads that a larger page cache would have served, and with them the waits for a CPU
  that follow each read (a read the cache serves neither blocks nor has to be woken): the band's
  disk-read time and its run-queue time right after disk reads, times the share of the pages the
  component read from the disk that its memory cgroup had held and evicted (the kernel's workingset
  refaults over the run; where the kernel does not count them, the reads of a block it had read before
  in the run). A refault is a capacity miss, whenever the page was evicted, before the run too; a first
  read (a cold miss) is not, and no RAM removes it. It buys the RAM that covers the working set (what
  the cgroup holds, and the pages it read back) beyond its memory limit, in the table's steps.
- IOPS removes the queueing of disk waits while the volume is at its cap (the component's read IOPS at
  80% of its cgroup's cap or more, or its disk waits mostly queueing under a cap): the band's disk time
  less the device's own time for the I/Os.
- CPU removes run-queue time: the band's time waiting for a CPU.

Levers overlap: RAM removes the waits for a CPU after the reads it saves, which more CPU would also have
shortened. The advice is therefore taken in turn, the best gain per price first, and each lever after it
counts only what the levers before it left (in the disk scenario of experiments/io-aware-benchmark on a
quiet machine, CPU for the database would remove 5.57 ms of a 33.5 ms band by itself, and 0.46 ms after
the RAM, which removes the waits after the reads: not worth buying after it).

Prices come from a table shipped as data (prices.json: public on-demand prices, their source and date),
which ``--prices FILE`` overrides lever by lever. The report also says what CPU and RAM graphs alone
(CPU usage against the limit, memory working set against the limit, as Kubernetes' VPA reads them)
would have bought.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfscope.domains.bench.tree import Node
from bpfscope.errors import BpfscopeError

PRICES = Path(__file__).with_name("prices.json")
LEVERS = ("ram", "iops", "cpu")
# A lever is only advised when it can remove at least this share of the band's time.
MIN_GAIN_SHARE = 0.05
# The read IOPS at which a capped volume counts as saturated, as a share of its cap.
AT_CAP = 0.8
# ... or when at most this share of its disk waits was the device's own time (the rest queued).
QUEUED = 0.5
# What a right-sizer on CPU and RAM graphs alone calls short: CPU busy for this share of its limit,
# working set for this share of its memory limit.
GRAPH_CPU_BUSY = 0.8
GRAPH_MEMORY_FULL = 0.9
PAGE = 4096  # the unit of the kernel's page-cache counters


@dataclass(frozen=True)
class Lever:
    unit: str
    step: float
    monthly_per_unit: float
    basis: str

    @property
    def step_price(self) -> float:
        return self.step * self.monthly_per_unit


@dataclass(frozen=True)
class Prices:
    source: str
    date: str
    currency: str
    levers: dict[str, Lever]


def load_prices(override: str | None = None) -> Prices:
    """The shipped table, with ``override`` (a JSON file of the same form) on top, validated: a bad
    file is a one-line error."""
    table = json.loads(PRICES.read_text())
    if override is not None:
        try:
            given = json.loads(Path(override).read_text())
        except OSError as exc:
            raise BpfscopeError(f"cannot read the price table {override}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise BpfscopeError(f"{override} is not JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(given, dict):
            raise BpfscopeError(f"{override}: a price table is a JSON object")
        unknown = set(given) - set(table)
        if unknown:
            raise BpfscopeError(f"{override}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(table)})")
        levers = given.get("levers", {})
        if not isinstance(levers, dict) or set(levers) - set(LEVERS):
            raise BpfscopeError(f"{override}: levers are {', '.join(LEVERS)}")
        for name, lever in levers.items():
            if not isinstance(lever, dict):
                raise BpfscopeError(f"{override}: lever {name} is not an object")
            table["levers"][name] = {**table["levers"][name], **lever}
        table.update({k: v for k, v in given.items() if k != "levers"})
    levers = {}
    for name in LEVERS:
        spec = table["levers"][name]
        for key in ("step", "monthly_per_unit"):
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise BpfscopeError(f"price of {name}: {key} must be a number above 0, not {value!r}")
        levers[name] = Lever(str(spec.get("unit", "")), float(spec["step"]), float(spec["monthly_per_unit"]),
                             str(spec.get("basis", "")))  # fmt: skip
    return Prices(str(table["source"]), str(table["date"]), str(table["currency"]), levers)


@dataclass
class Usage:
    """What one component used over the run, and its limits: the inputs of the advice beside the
    trees (bench.py gathers them)."""

    cpu_s: float = 0.0  # time on a CPU
    cpus: float | None = None  # its CPU limit (None: the machine's)
    memory_working_set: int | None = None  # usage less inactive file pages, as the VPA reads it
    memory_limit: int | None = None
    reads: int = 0  # block reads it submitted
    read_bytes: int = 0  # the bytes they read
    rereads: int = 0  # of them, of a block it had read before in the run
    read_blocks_bytes: int = 0  # the distinct bytes it read from the disk
    refaults: int | None = None  # file pages its memory cgroup read back after evicting them (None: unknown)
    memory_used: int | None = None  # its memory cgroup's usage at the end
    device_ns: int = 0  # the disk's own time for its reads (issue to completion)
    disk_wait_ns: int = 0  # its threads' disk waits (tsa: the time the reads took them)
    read_iops_cap: int | None = None  # its cgroup's cap on the disk it read from
    pid: int | None = None  # one of its processes (its cgroups hold the limits)
    disk: str | None = None  # MAJOR:MINOR of the disk it read from most


@dataclass
class Advice:
    lever: str
    component: str
    amount: float  # in the lever's unit
    monthly: float  # price of the amount, a month
    gain_ns: float  # p99 band time it can remove, per request, after the advice taken before it
    why: str
    # The share of each of the component's lines (disk_read, runqueue, ...) it removes.
    removes: dict[str, float] = field(default_factory=dict)
    alone_ns: float = 0.0  # what it could remove were it the only lever taken

    def gain_on(self, left: dict[tuple[str, str], float]) -> float:
        """What it removes of the time the levers taken before it left."""
        return sum(share * left.get((self.component, line), 0.0) for line, share in self.removes.items())

    @property
    def gain_per_100(self) -> float:
        """ms of p99 per 100 of the currency a month."""
        return self.gain_ns / 1e6 / self.monthly * 100 if self.monthly else math.inf


@dataclass
class Verdict:
    advice: list[Advice]  # best first (gain per price), only those worth advising
    bottleneck: str  # in words
    graphs: str  # what CPU and RAM graphs alone would have bought
    considered: list[Advice] = field(default_factory=list)  # every lever and component


def _steps(amount: float, lever: Lever) -> float:
    return max(1, math.ceil(amount / lever.step)) * lever.step


def advise(
    band: Node, usage: dict[str, Usage], prices: Prices, window_s: float, machine_cpus: int
) -> Verdict:
    """The advice for the p99 band's tree (averaged per request)."""
    whole = band.time_ns or 1.0
    considered: list[Advice] = []
    for node in band.walk():
        if node.mode in ("client", "untraced"):
            continue
        name = node.component
        use = usage.get(name, Usage())
        disk_read = node.lines.get("disk_read", 0.0)
        disk = disk_read + node.lines.get("disk_write", 0.0)
        ram, iops, cpu = prices.levers["ram"], prices.levers["iops"], prices.levers["cpu"]
        runq = node.lines.get("runqueue", 0.0)
        if disk_read and use.reads:
            share, extra, why = ram_share(use)
            gib = _steps(extra / 2**30, ram)
            gain = (disk_read + node.read_wake_ns) * share
            removes = {"disk_read": share}
            if runq:
                removes["runqueue"] = share * min(1.0, node.read_wake_ns / runq)
            considered.append(Advice("ram", name, gib, gib * ram.monthly_per_unit, gain, why, removes))
        if disk and use.reads and use.read_iops_cap:
            rate = use.reads / window_s
            # The disk waits beyond the device's own time were spent queued at the cap. A throttle
            # lets I/O through in bursts, so a rate below the cap can still be held back by it: mostly
            # queueing says so too.
            device_share = min(1.0, use.device_ns / max(1, use.disk_wait_ns))
            if rate >= AT_CAP * use.read_iops_cap or device_share <= QUEUED:
                amount = _steps(use.read_iops_cap, iops)
                queued = 1 - device_share
                considered.append(Advice(
                    "iops", name, amount, amount * iops.monthly_per_unit, disk * queued,
                    f"it read {rate:.0f} times a second against a cap of {use.read_iops_cap}: its disk waits "
                    f"were {queued:.0%} queueing at the cap", {"disk_read": queued, "disk_write": queued},
                ))  # fmt: skip
        if runq:
            limit = use.cpus or machine_cpus
            considered.append(Advice(
                "cpu", name, cpu.step, cpu.step_price, runq,
                f"it waited for a CPU; it used {use.cpu_s / window_s:.2f} of its {limit:g} CPUs",
                {"runqueue": 1.0},
            ))  # fmt: skip
    worth = _in_turn(band, considered, MIN_GAIN_SHARE * whole)
    return Verdict(worth, _bottleneck(band, considered), _graphs(usage, window_s, machine_cpus), considered)


def _in_turn(band: Node, considered: list[Advice], floor_ns: float) -> list[Advice]:
    """The levers worth taking, in the order to take them: each time the best gain per price on what
    the levers before it left, while one removes at least ``floor_ns``. Each lever's ``gain_ns`` becomes
    its gain after those taken before it (for one not taken: after all of them); ``alone_ns`` keeps what
    it removes by itself."""
    left = {(node.component, line): ns for node in band.walk() for line, ns in node.lines.items()}
    for a in considered:
        a.alone_ns = a.gain_ns
    taken: list[Advice] = []
    pool = list(considered)
    while pool:
        for a in pool:
            a.gain_ns = a.gain_on(left) if a.removes else a.alone_ns
        best = max(pool, key=lambda a: (a.gain_ns >= floor_ns, a.gain_per_100))
        if best.gain_ns < floor_ns:
            break
        taken.append(best)
        pool.remove(best)
        for line, share in best.removes.items():
            key = (best.component, line)
            if key in left:
                left[key] *= 1 - share
    for a in pool:
        if taken and a.gain_ns < a.alone_ns * 0.999:
            before = ", ".join(f"{t.lever} for {t.component}" for t in taken)
            a.why += f"; {a.alone_ns / 1e6:.2f} ms by itself, {a.gain_ns / 1e6:.2f} ms after {before}"
    return taken


def ram_share(use: Usage) -> tuple[float, int, str]:
    """(the share of the component's disk reads a larger cache would have served, the bytes of memory
    that cache needs beyond its limit, why), from its memory cgroup's refaults when the kernel counts
    them, else from its re-reads within the run.

    Refaults cost two reads of memory.stat per component (no tracing), and see evictions from before
    the run, which re-reads within the run cannot: with 64 MiB for a 160 MiB file read once, 3,000
    random 8 KiB reads brought 3,620 pages back from the disk and the cgroup counted 3,620 refaults;
    in experiments/io-aware-benchmark's disk scenario (6 s), the database's 9,556 reads brought in
    20,539 pages, all refaults. Tracing evictions (filemap:mm_filemap_delete_from_page_cache) would
    cost an event per page and still miss those before the run. Block reads and refaults are both
    pages, read-ahead included. A cgroup shared with others (the root's) counts their refaults too:
    the share is at most 1."""
    if use.refaults is not None and use.read_bytes:
        pages = use.read_bytes / PAGE
        share = min(1.0, use.refaults / pages)
        back = int(min(use.refaults * PAGE, use.read_bytes))
        held = use.memory_used or 0
        # The working set is at least what the cgroup holds and what it read back; a cache that holds
        # it needs that much beyond the limit (without a limit, the pages it read back).
        need = held + back - use.memory_limit if use.memory_limit else back
        working = f"{(held + back) / 2**20:.0f} MiB" if use.memory_limit else f"{back / 2**20:.0f} MiB more"
        limit = (
            f"its {use.memory_limit / 2**20:.0f} MiB limit" if use.memory_limit else "the machine's memory"
        )
        why = (
            f"{share:.0%} of the {pages:.0f} pages its {use.reads} disk reads brought in were pages "
            f"{limit} had evicted (refaults); its working set is at least {working}"
        )
        return share, max(need, back), why
    share = use.rereads / use.reads if use.reads else 0.0
    why = (
        f"{share:.0%} of its {use.reads} disk reads read a block it had read before in the run; "
        f"the {use.read_blocks_bytes / 2**20:.0f} MiB it read would stay cached"
    )
    return share, use.read_blocks_bytes, why


def _bottleneck(band: Node, considered: list[Advice]) -> str:
    totals: dict[str, float] = {}
    for node in band.walk():
        if node.mode in ("client", "untraced"):
            continue
        for line, key in (("disk_read", "disk"), ("disk_write", "disk"), ("runqueue", "CPU"),
                          ("cpu", "CPU"), ("lock", "locks")):  # fmt: skip
            totals[key] = totals.get(key, 0.0) + node.lines.get(line, 0.0)
        totals["network"] = totals.get("network", 0.0) + node.network_ns + node.lines.get("net", 0.0)
    if not totals:
        return "no component's time was measured"
    resource = max(totals, key=totals.__getitem__)
    share = totals[resource] / (band.time_ns or 1.0)
    best = max(considered, key=lambda a: a.gain_ns, default=None)
    where = f"; most of it in {best.component}" if best is not None and best.gain_ns else ""
    return f"{resource} ({share:.0%} of the p99 band's time){where}"


def _graphs(usage: dict[str, Usage], window_s: float, machine_cpus: int) -> str:
    """What a right-sizer reading CPU and RAM graphs alone would buy."""
    buys = []
    for name, use in sorted(usage.items()):
        limit = use.cpus or machine_cpus
        busy = use.cpu_s / window_s / limit if window_s else 0.0
        if busy >= GRAPH_CPU_BUSY:
            buys.append(f"more CPU for {name} ({busy:.0%} of its {limit:g} CPUs busy)")
        if use.memory_limit and use.memory_working_set is not None:
            full = use.memory_working_set / use.memory_limit
            if full >= GRAPH_MEMORY_FULL:
                buys.append(f"more RAM for {name} (working set {full:.0%} of its limit)")
    return "; ".join(buys) if buys else "nothing (no component near its CPU or memory limit)"


def as_dict(advice: Advice, prices: Prices) -> dict[str, Any]:
    lever = prices.levers[advice.lever]
    return {
        "lever": advice.lever,
        "component": advice.component,
        "amount": advice.amount,
        "unit": lever.unit,
        "monthly": round(advice.monthly, 2),
        "currency": prices.currency,
        "gain_ms": round(advice.gain_ns / 1e6, 3),
        "alone_ms": round(advice.alone_ns / 1e6, 3),
        "ms_per_100": round(advice.gain_per_100, 3),
        "why": advice.why,
    }
