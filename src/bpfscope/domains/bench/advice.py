"""Advice with its cost: for each lever (more RAM, more IOPS, more CPU) and component, the largest gain at
p99 it can give, its monthly price, and which resource is the bottleneck.

A lever can only remove the part of the p99 band's time it acts on:

- RAM removes disk reads that a larger page cache would hold: the band's disk-read time, times the
  share of the component's reads that read a block it had read before in the run (a cache of the blocks
  it read would have held them). It buys the RAM those blocks take, in the table's steps.
- IOPS removes the queueing of disk waits while the volume is at its cap (the component's read IOPS at
  80% of its cgroup's cap or more, or its disk waits mostly queueing under a cap): the band's disk time
  less the device's own time for the I/Os.
- CPU removes run-queue time: the band's time waiting for a CPU.

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
    rereads: int = 0  # of them, of a block it had read before in the run
    read_blocks_bytes: int = 0  # the distinct bytes it read from the disk
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
    gain_ns: float  # p99 band time it can remove, per request
    why: str

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
        if disk_read and use.reads:
            share = use.rereads / use.reads
            gib = _steps(use.read_blocks_bytes / 2**30, ram)
            considered.append(Advice(
                "ram", name, gib, gib * ram.monthly_per_unit, disk_read * share,
                f"{share:.0%} of its {use.reads} disk reads read a block it had read before in the run; "
                f"the {use.read_blocks_bytes / 2**20:.0f} MiB it read would stay cached",
            ))  # fmt: skip
        if disk and use.reads and use.read_iops_cap:
            rate = use.reads / window_s
            # The disk waits beyond the device's own time were spent queued at the cap. A throttle
            # lets I/O through in bursts, so a rate below the cap can still be held back by it: mostly
            # queueing says so too.
            device_share = min(1.0, use.device_ns / max(1, use.disk_wait_ns))
            if rate >= AT_CAP * use.read_iops_cap or device_share <= QUEUED:
                amount = _steps(use.read_iops_cap, iops)
                considered.append(Advice(
                    "iops", name, amount, amount * iops.monthly_per_unit, disk * (1 - device_share),
                    f"it read {rate:.0f} times a second against a cap of {use.read_iops_cap}: its disk waits "
                    f"were {1 - device_share:.0%} queueing at the cap",
                ))  # fmt: skip
        runq = node.lines.get("runqueue", 0.0)
        if runq:
            limit = use.cpus or machine_cpus
            considered.append(Advice(
                "cpu", name, cpu.step, cpu.step_price, runq,
                f"it waited for a CPU; it used {use.cpu_s / window_s:.2f} of its {limit:g} CPUs",
            ))  # fmt: skip
    worth = [a for a in considered if a.gain_ns >= MIN_GAIN_SHARE * whole]
    worth.sort(key=lambda a: -a.gain_per_100)
    return Verdict(worth, _bottleneck(band, considered), _graphs(usage, window_s, machine_cpus), considered)


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
        "ms_per_100": round(advice.gain_per_100, 3),
        "why": advice.why,
    }
