"""bpfscope bench: where each millisecond of a request goes, per component and per resource.

It runs a workload (``-- COMMAND``, the load generator: its requests are the end-to-end ones) or watches
a running system for a window, with two collectors at once: the request tracer (requests domain: every
request and response with its thread) and thread-state accounting with its timeline (tsa, sched domain:
every thread's time off the CPU, and why). Then it joins each request to the work it caused downstream
(tree.py) and prints the tree of two latency bands, the requests between p98.5 and p99.5 and those
around the median: per component its time, of which CPU, run queue, disk reads, disk writes, locks,
network, and a residual so that the lines add up.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.bench import advice, tree
from bpfscope.domains.bench.limits import Limits
from bpfscope.domains.bench.spans import CallThreads, Span, span_of
from bpfscope.domains.bench.timeline import Timeline
from bpfscope.domains.block import disks as disk_dev
from bpfscope.domains.block.biosnoop import BiosnoopCollector, BiosnoopConfig
from bpfscope.domains.sched import components as comp
from bpfscope.domains.sched import tsa
from bpfscope.domains.sched.tsa import TsaCollector, TsaConfig
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import PACED_DRAIN_S, Collector, Config, Sample
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View, note

# The bands: the tail the p99 is made of, and the median's neighbourhood (p99s do not add up along a
# path; the requests around a quantile do).
BANDS = {"p99": (0.985, 0.995), "p50": (0.495, 0.505)}
# Requests whose trees make the "all" band at most (an even sample beyond).
ALL_SAMPLE = 5000
# Bytes of each socket call the request tracer copies: headers, request ids and statements fit.
CAPTURE_BYTES = 2048


@dataclass(kw_only=True)
class BenchConfig(Config):
    components: tuple[comp.Component, ...] = ()  # else one component per process name
    entry: str | None = None  # the component requests enter by (else the one most requests enter)
    warmup_s: float = 0.0  # requests that began this soon after the start are left out
    client_pids: frozenset[int] = frozenset()  # the workload's processes: clients, not components
    prices: str | None = None  # a price table overriding the shipped one's levers


@dataclass
class Progress(Sample):
    """What a drain brought (the report comes at the end)."""

    spans: int
    episodes: int
    ts: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return self.spans + self.episodes


def _set_requests() -> type:
    from bpfscope.domains.requests.requests import RequestsCollector

    class SetRequests(RequestsCollector):
        """The request tracer on tsa's set of tasks (the components and the workload): the two objects
        share the set's maps, which tsa keeps as processes fork. Its wake-ups are paced, as the
        timeline's: a benchmark's requests come a few hundred a second, each record's wake-up would land
        in the call of the component it times."""

        paced_drain_s = PACED_DRAIN_S

        def __init__(self, config: Any, tsa: TsaCollector) -> None:
            super().__init__(config)
            self.tsa = tsa

        @classmethod
        def object_path(cls) -> Path:
            return RequestsCollector.object_path()

        def rodata(self) -> dict[str, Any]:
            return {**super().rodata(), "bs_by_set": self.tsa.resolved is not None}

        def configure(self) -> None:
            super().configure()
            assert self.obj is not None and self.tsa.obj is not None
            if self.tsa.resolved is not None:
                for name in ("bs_set_tgids", "bs_set_cgroups"):
                    self.obj.maps[name].reuse(self.tsa.obj.maps[name])

    return SetRequests


class BenchCollector(Collector[BenchConfig]):
    """The request tracer and tsa's timeline, run together; :meth:`report` joins and splits."""

    name = "bench"
    requires = ("raw_tracepoint", "ringbuf")
    paced_drain_s = PACED_DRAIN_S  # its request tracer's and timeline's are

    def __init__(self, config: BenchConfig) -> None:
        from bpfscope.domains.requests.requests import RequestsConfig

        super().__init__(config)
        filters = {"pid": config.pid, "cgroup": config.cgroup, "include_self": config.include_self}
        followed = config.components
        if followed and config.client_pids:
            # The workload's threads too: what a client did while its request was out is its own.
            followed += tuple(comp.Component(f"client{pid}", "pid", str(pid)) for pid in config.client_pids)
        self.tsa = TsaCollector(TsaConfig(**filters, components=followed, timeline=True))
        self.requests = _set_requests()(RequestsConfig(**filters, capture_bytes=CAPTURE_BYTES), self.tsa)
        # Every block I/O with its submitter: what the RAM and IOPS levers act on.
        self.blocks = BiosnoopCollector(BiosnoopConfig(**filters))
        self.prices = advice.load_prices(config.prices)  # before anything loads: a bad file is an error
        self.ios: list[np.ndarray] = []
        self.spans: list[Span] = []
        self.timeline = Timeline()
        self.threads: dict[int, tuple[int, int]] = {}  # tid -> (tgid, cgroup), read at the end
        self.processes: list[tsa.Row] = []  # each component process's thread time over the run
        self._names: dict[int, str | None] = {}
        self.refaults_before: dict[Path, int] = {}  # memory cgroup -> its refaults when tracing began
        self.started_ns = 0
        self.stopped_ns = 0  # when tracing stopped (the drain after it is not part of the run)
        self.ended_ns = 0

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return SCHEMAS

    def open(self) -> None:
        from bpfscope.domains.requests.capture import header_dtype

        try:
            self.tsa.open()
            self.requests.open()
            self.blocks.open()
        except BaseException:
            self.close()
            raise
        self.calls = CallThreads(header_dtype(self.requests.btf()))

    def start(self) -> None:
        self.tsa.start()
        for tid, since in zip(self.tsa.before.tid.tolist(), self._since_ns(), strict=True):
            self.timeline.seen(tid, since)
        self.refaults_before = _refaults(set(self.tsa.before.tgid.tolist()))
        self.started_ns = time.monotonic_ns()

    def _since_ns(self) -> list[int]:
        assert self.tsa.obj is not None
        keys, values = self.tsa.obj.maps["threads"].items()
        since = dict(zip(keys.tolist(), values["since"].tolist(), strict=True))
        return [since.get(t, self.started_ns) for t in self.tsa.before.tid.tolist()]

    def fds(self) -> list[int]:
        return self.tsa.fds() + self.requests.fds() + self.blocks.fds()

    def drain(self) -> Progress | None:
        ios = self.blocks.drain()
        if ios is not None:
            self.ios.append(ios.events[ios.events["op"] == _read_op()])
        episodes = self.tsa.drain()
        if episodes is not None:
            self.timeline.add(episodes.data)
        raw = self.requests.rings["events"].read_sized()
        spans = 0
        if raw:
            self.calls.note(raw)
            for conn, exchange in self.requests.tracker.feed(raw):
                span = span_of(conn, exchange, self.calls)
                if span is not None:
                    span.component = self.component_of(span.pid, span.cgroup, span.comm)
                    self.spans.append(span)
                    spans += 1
        if episodes is None and not raw:
            return None
        return Progress(spans, len(episodes) if episodes is not None else 0)

    def component_of(self, pid: int, cgroup: int, comm: str = "") -> str | None:
        """A process's component: the one --components names, else its name; None for the workload's
        own processes (the clients) and processes no component holds."""
        if pid in self._names:
            return self._names[pid]
        name: str | None
        if self._is_client(pid):
            name = None
        elif self.config.components:
            index = self.tsa.component_of(pid, cgroup)
            named = self.config.components
            name = named[index].name if index is not None and index < len(named) else None
        else:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip() or comm
            except OSError:
                name = comm or None
        self._names[pid] = name
        return name

    def _is_client(self, pid: int) -> bool:
        clients = self.config.client_pids
        while pid > 1 and clients:
            if pid in clients:
                return True
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return False
        return False

    def read_threads(self) -> None:
        """The end: every followed thread (for event loops), each component process's time over the run,
        and the episodes still open (a thread off the CPU now has not sent its episode)."""
        assert self.tsa.obj is not None
        last = self.tsa.read()
        self.ended_ns = last.at_ns
        self.processes = self._processes(last)
        keys, values = self.tsa.obj.maps["threads"].items()
        self.threads = {
            tid: (int(v["tgid"]), int(v["cgroup"])) for tid, v in zip(keys.tolist(), values, strict=True)
        }
        open_ = values[(values["state"] != 0) & (values["exited"] == 0)]
        if len(open_):
            episodes = np.zeros(len(open_), dtype=self.tsa.rings["episodes"].dtype)
            episodes["off_ns"] = open_["off_ns"]
            episodes["wake_ns"] = np.where(open_["wake_ns"] > 0, open_["wake_ns"], self.ended_ns)
            episodes["on_ns"] = self.ended_ns
            episodes["tid"] = keys[(values["state"] != 0) & (values["exited"] == 0)]
            episodes["tgid"] = open_["tgid"]
            episodes["state"] = open_["blocked"]
            self.timeline.add(episodes)

    def _processes(self, last: tsa.Threads) -> list[tsa.Row]:
        deltas, delayed = tsa.since(last, self.tsa.before)
        rows: dict[int, tsa.Row] = {}
        for i in np.nonzero(deltas.any(axis=1))[0].tolist():
            tgid, cgroup = int(last.tgid[i]), int(last.cgroup[i])
            name = self.component_of(tgid, cgroup, last.comm[i])
            if name is None:
                continue
            row = rows.get(tgid)
            if row is None:
                row = rows[tgid] = tsa.Row(name, tgid, 0, last.comm[i], cgroup, 0, np.zeros_like(deltas[i]))
            row.threads += 1
            row.ns += deltas[i]
            row.delayed += int(delayed[i])
        return sorted(rows.values(), key=lambda r: (r.component, r.pid))

    def losses(self) -> Losses:
        return self.tsa.losses() + self.requests.losses() + self.blocks.losses()

    def close(self) -> None:
        self.blocks.close()
        self.requests.close()
        self.tsa.close()

    # --- the analysis ------------------------------------------------------------------------------
    def report(self) -> BenchReport:
        if not self.threads:
            self.read_threads()
        spans = self.spans
        tree.link_peers(spans)
        loops = tree.event_loops(spans)
        tree.link_parents(spans, loops)
        threads_of: dict[str, list[int]] = {}
        for tid, (tgid, cgroup) in self.threads.items():
            name = self.component_of(tgid, cgroup)
            if name is not None:
                threads_of.setdefault(name, []).append(tid)
        ctx = tree.Context(self.timeline, loops, threads_of)
        entry = self.config.entry or _busiest_entry(spans)
        after = self.started_ns + int(self.config.warmup_s * 1e9)
        roots = [s for s in spans if _is_root(s, entry) and s.start_ns >= after]
        requests = [((r.peer or r).latency_ns, r) for r in roots]
        latencies = [lat for lat, _ in requests]
        bands = {}
        for name, (low, high) in BANDS.items():
            chosen = tree.band(requests, low, high)
            trees = [tree.request_tree(r, ctx) for r in chosen]
            bands[name] = Band(name, low, high, len(chosen), tree.average(trees))
        # Every request's tree, averaged: from an even sample of them when there are many (a request's
        # tree costs its spans' timelines; an average of 5,000 is within a few % of the whole).
        step = max(1, len(requests) // ALL_SAMPLE)
        every = tree.average([tree.request_tree(r, ctx) for _, r in requests[::step]])
        # The window the requests span (the drain after the workload ended is not part of it).
        window = (max(r.end_ns for r in roots) - min(r.start_ns for r in roots)) / 1e9 if roots else 0.0
        window = max(window, 1e-3)
        # Use (CPU, reads) is counted over the whole run: rates are over it too.
        run_s = max(1e-3, ((self.stopped_ns or self.ended_ns) - self.started_ns) / 1e9)
        usage = self.usage()
        verdict = advice.advise(bands["p99"].tree, usage, self.prices, run_s, os.cpu_count() or 1)
        return BenchReport(
            ts=time.time(),
            entry=entry or "",
            requests=len(requests),
            window_s=window,
            p50_ns=tree.quantile(latencies, 0.5),
            p99_ns=tree.quantile(latencies, 0.99),
            loops=sorted(loops),
            joined=_joined_share(roots),
            bands=bands,
            every=every,
            processes=self.processes,
            run_s=run_s,
            verdict=verdict,
            prices=self.prices,
            usage=usage,
        )

    def usage(self) -> dict[str, advice.Usage]:
        """Each component's use of the run and its limits (the advice's inputs): CPU and disk-wait time
        from tsa, reads from the block tracer (re-reads of a block it had read before in the run, the
        distinct bytes read, the device's own time), refaults and limits from its cgroups."""
        out: dict[str, advice.Usage] = {}
        names = tsa.states()
        for row in self.processes:
            use = out.setdefault(row.component, advice.Usage())
            use.cpu_s += float(row.ns[names.index("cpu")]) / 1e9
            use.disk_wait_ns += int(sum(row.ns[names.index(s)] for s in ("disk_read", "disk_write", "sync")))
            use.pid = use.pid or row.pid
        cgroup_of = {tgid: cgroup for tgid, cgroup in self.threads.values()}
        ios = np.concatenate(self.ios) if self.ios else None
        if ios is not None and len(ios):
            ios = ios[np.argsort(ios["ts"], kind="stable")]
            component = [self.component_of(t, cgroup_of.get(t, 0)) for t in ios["tgid"].tolist()]
            seen: dict[str, set[tuple[int, int]]] = {}
            disks: dict[str, dict[int, int]] = {}
            for name, dev, sector, size, latency in zip(
                component,
                ios["dev"].tolist(),
                ios["sector"].tolist(),
                ios["bytes"].tolist(),
                ios["latency_ns"].tolist(),
                strict=True,
            ):
                if name is None or name not in out:
                    continue
                use = out[name]
                use.reads += 1
                use.read_bytes += size
                use.device_ns += latency
                key = (dev, sector)
                blocks = seen.setdefault(name, set())
                if key in blocks:
                    use.rereads += 1
                else:
                    blocks.add(key)
                    use.read_blocks_bytes += size
                counts = disks.setdefault(name, {})
                counts[dev] = counts.get(dev, 0) + 1
            for name, counts in disks.items():
                dev = max(counts, key=counts.__getitem__)
                out[name].disk = f"{disk_dev.dev_major(dev)}:{disk_dev.dev_minor(dev)}"
        for use in out.values():
            if use.pid is None:
                continue
            try:
                limits = Limits.of_pid(use.pid)
                use.cpus = limits.cpus()
                use.memory_limit = limits.memory_bytes()
                if limits.memory is not None:
                    use.memory_working_set = limits.working_set()
                    use.memory_used = limits.memory_used()
                    before, now = self.refaults_before.get(limits.memory), limits.refaults()
                    if before is not None and now is not None:
                        use.refaults = now - before
                use.read_iops_cap = limits.read_iops(use.disk) if use.disk else None
            except (BpfscopeError, OSError, ValueError):
                pass  # the process is gone: no limits known
        return out


def _refaults(tgids: set[int]) -> dict[Path, int]:
    """Each memory cgroup of these processes -> its refaults now."""
    out: dict[Path, int] = {}
    for tgid in tgids:
        with contextlib.suppress(BpfscopeError, OSError, ValueError):
            memory = Limits.of_pid(tgid).memory
            if memory is not None and memory not in out:
                value = Limits(memory, None, None).refaults()
                if value is not None:
                    out[memory] = value
    return out


def _read_op() -> int:
    return next(v for v, name in disk_dev.op_names().items() if name == "Read")


def _is_root(span: Span, entry: str | None) -> bool:
    """A request entering the system: the entry component's server span, sent by no component."""
    return (
        span.role == "server"
        and span.component == entry
        and (span.peer is None or span.peer.component is None)
    )


def _busiest_entry(spans: list[Span]) -> str | None:
    counts: dict[str, int] = {}
    for s in spans:
        if s.component is not None and _is_root(s, s.component):
            counts[s.component] = counts.get(s.component, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def _joined_share(roots: list[Span]) -> float:
    """The share of calls made below the entry that reached a traced server (or are to a peer no
    component holds): how much of the trees is joined."""
    calls = joined = 0
    todo = list(roots)
    while todo:
        server = todo.pop()
        for c in server.children:
            calls += 1
            if c.peer is not None:
                joined += 1
                todo.append(c.peer)
    return joined / calls if calls else 1.0


# --- records ---------------------------------------------------------------------------------------
LINE_FIELDS = tuple(f"{line}_ms" for line in tree.SELF_LINES)
NODE = Schema(
    "bench.node",
    (
        Field("band", "str", label=True, doc="p99 (requests between p98.5 and p99.5), p50, or all"),
        Field("path", "str", label=True, doc="components from the entry down, joined by /"),
        Field("component", "str", label=True, doc="the component (or an untraced peer's address)"),
        Field("mode", "str", doc="per request, per component (event loop), client, or untraced"),
        Field("requests", "int", doc="requests in the band"),
        Field("calls", "float", doc="calls to the component per request"),
        Field("time_ms", "float", "ms", "the component's time per request: its lines, network and calls"),
        *(Field(name, "float", "ms", f"its own time, {name[:-3]}") for name in LINE_FIELDS),
        Field("residual_ms", "float", "ms", "what no thread state explains (so the lines add up)"),
        Field("network_ms", "float", "ms", "to its downstream calls: their client time less server time"),
        Field(
            "read_wake_ms",
            "float",
            "ms",
            "of runqueue_ms, the waits for a CPU right after disk reads (a reader's own clock counts them "
            "in its reads)",
        ),
    ),
    doc="One component of a band's averaged request tree.",
)
SUMMARY = Schema(
    "bench.summary",
    (
        Field("entry", "str", doc="the component the requests entered by"),
        Field("requests", "int", doc="end-to-end requests measured"),
        Field("window_s", "float", "s", "the measured window"),
        Field("p50_ms", "float", "ms", "end-to-end median, as the client saw it when traced"),
        Field("p99_ms", "float", "ms", "end-to-end p99"),
        Field("joined_pct", "float", "%", "calls below the entry joined to a traced server"),
        Field("event_loops", "list", doc="components split per component (their threads serve many)"),
        Field("bottleneck", "str", doc="the resource most of the p99 band's time went to, in words"),
        Field(
            "graphs_would_buy", "str", doc="what CPU and RAM graphs alone (usage against limits) would buy"
        ),
        Field("prices", "str", doc="the price table's source"),
        Field("prices_date", "str", doc="the date of its prices"),
    ),
    doc="The run: its requests, their end-to-end latency, the bottleneck.",
)
ADVICE = Schema(
    "bench.advice",
    (
        Field("lever", "str", label=True, doc="ram, iops or cpu"),
        Field("component", "str", label=True, doc="the component it is bought for"),
        Field("advised", "bool", doc="worth it: it removes at least 5% of the p99 band's time"),
        Field("amount", "float", doc="how much, in unit"),
        Field("unit", "str", doc="GiB, IOPS, vCPU"),
        Field("monthly", "float", doc="its price a month, in currency"),
        Field("currency", "str", doc="the price table's currency"),
        Field(
            "gain_ms",
            "float",
            "ms",
            "the p99 band's time per request it can remove, at most, after the advice before it",
        ),
        Field("alone_ms", "float", "ms", "what it could remove were it the only lever taken"),
        Field("ms_per_100", "float", "ms", "gain per 100 of the currency a month"),
        Field("why", "str", doc="what the gain is made of"),
    ),
    doc="One lever for one component: what it can remove from the p99 band and what it costs.",
)
SCHEMAS: tuple[Schema, ...] = (SUMMARY, NODE, ADVICE, tsa.row_schema())  # and VERIFY, below


@dataclass
class Band:
    name: str
    low: float
    high: float
    requests: int
    tree: tree.Node


@dataclass
class BenchReport(Sample):
    ts: float
    entry: str
    requests: int
    window_s: float
    p50_ns: float
    p99_ns: float
    loops: list[str]
    joined: float
    bands: dict[str, Band]
    every: tree.Node
    processes: list[tsa.Row]  # each component process's thread time over the whole run
    run_s: float
    verdict: advice.Verdict
    prices: advice.Prices
    usage: dict[str, advice.Usage]

    def records(self) -> Iterator[dict[str, Any]]:
        yield SUMMARY.record(
            {
                "ts": self.ts,
                "entry": self.entry,
                "requests": self.requests,
                "window_s": round(self.window_s, 3),
                "p50_ms": round(self.p50_ns / 1e6, 3),
                "p99_ms": round(self.p99_ns / 1e6, 3),
                "joined_pct": round(self.joined * 100, 2),
                "event_loops": self.loops,
                "bottleneck": self.verdict.bottleneck,
                "graphs_would_buy": self.verdict.graphs,
                "prices": self.prices.source,
                "prices_date": self.prices.date,
            }
        )
        # The advice worth taking first, best first; then the levers considered and not worth it.
        advised = {id(a) for a in self.verdict.advice}
        rest = [a for a in self.verdict.considered if id(a) not in advised]
        for a in [*self.verdict.advice, *rest]:
            fields = advice.as_dict(a, self.prices)
            yield ADVICE.record({"ts": self.ts, **fields, "advised": id(a) in advised})
        for band in [*self.bands.values(), Band("all", 0, 1, self.requests, self.every)]:
            yield from _node_records(self.ts, band, band.tree, "")
        yield from tsa.TsaSample(self.ts, round(self.run_s, 6), self.processes).records()

    def node(self, band: str, component: str) -> tree.Node | None:
        root = self.every if band == "all" else self.bands[band].tree
        return root.find(component)


def _node_records(ts: float, band: Band, node: tree.Node, parent: str) -> Iterator[dict[str, Any]]:
    path = f"{parent}/{node.component}" if parent else node.component
    ms = {f"{k}_ms": round(v / 1e6, 4) for k, v in node.lines.items()}
    yield NODE.record(
        {
            "ts": ts,
            "band": band.name,
            "path": path,
            "component": node.component,
            "mode": node.mode,
            "requests": band.requests,
            "calls": round(node.calls, 3),
            "time_ms": round(node.time_ns / 1e6, 4),
            **{name: ms.get(name, 0.0) for name in LINE_FIELDS},
            "residual_ms": ms.get("residual_ms", 0.0),
            "network_ms": round(node.network_ns / 1e6, 4),
            "read_wake_ms": round(node.read_wake_ns / 1e6, 4),
        }
    )
    for child in node.children.values():
        yield from _node_records(ts, band, child, path)


# --- the view --------------------------------------------------------------------------------------
LABELS = {
    "cpu": "CPU",
    "runqueue": "run queue (waiting for a CPU)",
    "disk_read": "disk reads",
    "disk_write": "disk writes and syncs",
    "lock": "locks",
    "net": "network (its own sockets)",
    "other": "other waits",
    "residual": "residual",
}


class BenchView(View):
    def show(self, sample: Sample, term: Terminal) -> None:
        if not isinstance(sample, BenchReport):
            return
        r = sample
        if not r.requests:
            term.line("bench: no request entered a component (is the workload's traffic over TCP?)")
            return
        term.line(
            f"{r.requests} requests in {r.window_s:.1f} s ({r.requests / r.window_s:.1f}/s) entering by "
            f"{r.entry}: end-to-end p50 {r.p50_ns / 1e6:.2f} ms, p99 {r.p99_ns / 1e6:.2f} ms; "
            f"{r.joined * 100:.1f}% of calls joined downstream"
        )
        for band in r.bands.values():
            top = band.tree
            term.line(
                f"\nBand {band.name} (p{band.low * 100:g}-p{band.high * 100:g}: {band.requests} requests, "
                f"{top.time_ns / 1e6:.2f} ms on average)"
            )
            rows: list[list[Any]] = []
            _rows(top, 0, top.time_ns, rows)
            term.table(["", "ms", "%", ""], rows)
        v = r.verdict
        term.line(f"\nBottleneck: {v.bottleneck}.")
        if v.advice:
            rows = []
            for a in v.advice:
                lever = r.prices.levers[a.lever]
                rows.append([
                    a.lever, a.component, f"{a.amount:g} {lever.unit}", f"{a.monthly:.2f}",
                    _ms(a.gain_ns), round(a.gain_per_100, 2), a.why,
                ])  # fmt: skip
            term.table(
                ["lever", "for", "amount", f"{r.prices.currency}/month", "p99 -ms", "ms/100", "why"], rows
            )
        else:
            term.line("No lever removes 5% of the p99 band's time: nothing to buy.")
        advised = {id(a) for a in v.advice}
        for a in v.considered:
            if id(a) not in advised:
                after = " after the advice above" if v.advice else ""
                term.line(
                    f"Not worth it: {a.lever} for {a.component} (p99 -{_ms(a.gain_ns)} ms, less than "
                    f"{advice.MIN_GAIN_SHARE:.0%} of the band{after})."
                )
        idle = sorted({a.lever for a in v.considered} ^ set(advice.LEVERS))
        if idle:
            term.line(f"Would buy nothing here: {', '.join(idle)} (none of the band's time is theirs).")
        term.line(f"On CPU and RAM graphs alone one would buy: {v.graphs}.")
        term.line(f"Prices: {r.prices.source}, as of {r.prices.date} (--prices FILE overrides).")
        if r.loops:
            term.line(
                f"\nPer component: {', '.join(r.loops)} serve many requests on a thread (event loops): "
                "their own time is split by what their threads did during it, shared with the other "
                "requests; the other components, by the thread that served the request."
            )


def _rows(node: tree.Node, depth: int, whole: float, rows: list[list[Any]]) -> None:
    pad = "  " * depth
    calls = f" x{node.calls:.1f}" if node.calls > 1.05 else ""
    rows.append([f"{pad}{node.component}{calls}", _ms(node.time_ns), _pct(node.time_ns, whole), node.mode])
    for key, label in LABELS.items():
        value = node.lines.get(key, 0.0)
        if abs(value) >= 5e3 or key == "residual":
            rows.append([f"{pad}  {label}", _ms(value), _pct(value, whole), ""])
        if key == "runqueue" and node.read_wake_ns >= 5e3:
            # A part of the run queue the disk reads caused (RAM's lever removes it with them).
            wake = node.read_wake_ns
            rows.append([f"{pad}    of which right after disk reads", _ms(wake), _pct(wake, whole), ""])
    if node.network_ns or node.children:
        rows.append([f"{pad}  network to its calls", _ms(node.network_ns), _pct(node.network_ns, whole), ""])
    for child in sorted(node.children.values(), key=lambda c: -c.time_ns):
        _rows(child, depth + 1, whole, rows)


def _ms(ns: float) -> float:
    return round(ns / 1e6, 2)


def _pct(ns: float, whole: float) -> float:
    return round(ns / whole * 100, 1) if whole else 0.0


# --- running it ------------------------------------------------------------------------------------
class CommandAfterDashes(click.Command):
    """``bpfscope bench [OPTIONS] [interval [count]] -- COMMAND...``: what follows ``--`` is the workload,
    left whole (its own options are not bench's)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["bench.workload"] = args[cut + 1 :]
            args = args[:cut]
        return super().parse_args(ctx, args)


def run_bench(run: Run, config: BenchConfig, workload: Sequence[str], verify: bool = False) -> BenchReport:
    """Trace while the workload runs (or for the window), then print the report; with ``verify``, run
    the workload again with the first advice emulated by a cgroup limit and print predicted against
    measured p99. Returns the first run's report."""
    from bpfscope.runtime.session import stop_on_signals

    with stop_on_signals() as stop:
        report = _traced(run, config, workload, stop, BenchView())
    if verify and stop.reason not in ("SIGINT", "SIGTERM"):
        with stop_on_signals() as again:  # a fresh token: the first workload's end set the other
            _verify(run, config, workload, again, report)
    return report


def _traced(
    run: Run, config: BenchConfig, workload: Sequence[str], stop: Any, view: View, emit: bool = True
) -> BenchReport:
    """One traced run; ``emit`` False keeps its report from the sinks (the replay of --verify, whose
    p99 is all that is shown)."""
    collector = BenchCollector(config)
    session = run.session([collector], view, stop)
    child = None
    try:
        session.open()
        session.start()
        child = _start(workload, stop, run.as_json) if workload else None
        running = f" while {workload[0]} runs" if workload else ""
        note(f"Tracing requests and thread states{running}... Ctrl-C to end.")
        session.loop()
        collector.stopped_ns = time.monotonic_ns()
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        session.drain()
        collector.read_threads()
        report = collector.report()
        for sink in session.sinks if emit else ():
            sink.emit(collector, report)
        session.finish()
    finally:
        session.close()
    if child is not None and child.returncode not in (0, -15):
        raise BpfscopeError(f"the workload exited with {child.returncode}")
    return report


# --- the counterfactual ----------------------------------------------------------------------------
VERIFY = Schema(
    "bench.verify",
    (
        Field("lever", "str", label=True, doc="the advice replayed: ram, iops or cpu"),
        Field("component", "str", label=True, doc="the component whose limit was raised"),
        Field("limit", "str", doc="the cgroup limit changed, from -> to"),
        Field("before_p99_ms", "float", "ms", "end-to-end p99 of the first run"),
        Field("predicted_p99_ms", "float", "ms", "the first run's p99 less the advice's gain"),
        Field("measured_p99_ms", "float", "ms", "end-to-end p99 of the replay with the change"),
        Field("confirmed", "bool", doc="the replay gained at least half the predicted gain"),
    ),
    doc="The first advice, replayed with its change emulated by a cgroup limit.",
)


@dataclass
class Verified(Sample):
    ts: float
    lever: str
    component: str
    limit: str
    before_ns: float
    predicted_ns: float
    measured_ns: float

    @property
    def confirmed(self) -> bool:
        return self.before_ns - self.measured_ns >= 0.5 * (self.before_ns - self.predicted_ns)

    def records(self) -> Iterator[dict[str, Any]]:
        yield VERIFY.record(
            {
                "ts": self.ts,
                "lever": self.lever,
                "component": self.component,
                "limit": self.limit,
                "before_p99_ms": round(self.before_ns / 1e6, 3),
                "predicted_p99_ms": round(self.predicted_ns / 1e6, 3),
                "measured_p99_ms": round(self.measured_ns / 1e6, 3),
                "confirmed": self.confirmed,
            }
        )


class VerifyView(View):
    def show(self, sample: Sample, term: Terminal) -> None:
        if not isinstance(sample, Verified):
            return
        v = sample
        verdict = "confirmed" if v.confirmed else "withdrawn"
        term.line(
            f"\nVerify: {v.lever} for {v.component} ({v.limit}): p99 {v.before_ns / 1e6:.2f} ms before, "
            f"{v.predicted_ns / 1e6:.2f} ms predicted, {v.measured_ns / 1e6:.2f} ms measured: "
            f"advice {verdict}."
        )


def _change(lever: str, amount: float, limits: Limits, disk: str | None) -> tuple[str, Any, Any]:
    """(words, how to apply, how to undo) for raising a component's limit by the advice's amount; a
    change that cannot be emulated (no limit to raise) is a BpfscopeError."""
    if lever == "ram":
        before = limits.memory_bytes() if limits.memory is not None else None
        if before is None:
            raise BpfscopeError("no memory limit to raise")
        after = before + int(amount * 2**30)
        words = f"memory limit {before >> 20} -> {after >> 20} MiB"

        def apply() -> None:
            # A larger cache would have been warm when the requests came: raising the limit alone
            # leaves it as cold as the smaller one left it, and a short replay would measure the cache
            # filling up. So the files the component reads are read into its cache first, up to the
            # RAM bought (its open files on the disk it read from: a database's tables and indexes).
            limits.set_memory_bytes(after)
            if disk is not None:
                warmed = limits.warm(limits.open_files(disk), after - limits.memory_used())
                note(f"Warmed its cache with {warmed >> 20} MiB of the files it holds open on {disk}.")

        return words, apply, lambda: limits.set_memory_bytes(before)
    if lever == "iops":
        cap = limits.read_iops(disk) if disk and limits.io is not None else None
        if cap is None or disk is None:
            raise BpfscopeError("no read IOPS cap to raise")
        raised = cap + int(amount)
        words = f"read IOPS cap on {disk} {cap} -> {raised}"
        return words, lambda: limits.set_read_iops(disk, raised), lambda: limits.set_read_iops(disk, cap)
    cpus = limits.cpus() if limits.cpu is not None else None
    if cpus is None:
        raise BpfscopeError("no CPU quota to raise")
    more = cpus + amount
    words = f"CPU quota {cpus:g} -> {more:g} CPUs"
    return words, lambda: limits.set_cpus(more), lambda: limits.set_cpus(cpus)


def _verify(run: Run, config: BenchConfig, workload: Sequence[str], stop: Any, report: BenchReport) -> None:
    if not report.verdict.advice:
        note("--verify: no advice to verify")
        return
    # The first advice whose change a cgroup limit can emulate (a limit the component runs under).
    change, reasons = None, []
    for best in report.verdict.advice:
        use = report.usage.get(best.component, advice.Usage())
        try:
            if use.pid is None:
                raise BpfscopeError(f"no process of {best.component} to find its cgroups")
            change = _change(best.lever, best.amount, Limits.of_pid(use.pid), use.disk)
            break
        except BpfscopeError as exc:
            reasons.append(f"{best.lever} for {best.component}: {exc}")
    if change is None:
        note(f"--verify: no advice can be emulated ({'; '.join(reasons)})")
        return
    words, apply, undo = change
    note(f"Verifying: {words}, the workload again...")
    apply()
    try:
        again = _traced(run, config, workload, stop, VerifyView(), emit=False)
    finally:
        undo()
    verified = Verified(
        time.time(),
        best.lever,
        best.component,
        words,
        report.p99_ns,
        report.p99_ns - best.gain_ns,
        again.p99_ns,
    )
    from bpfscope.sinks.jsonl import JsonLinesSink
    from bpfscope.sinks.terminal import TerminalSink

    sink = JsonLinesSink() if run.as_json else TerminalSink(VerifyView())
    sink.emit(BenchCollector(config), verified)


def _start(workload: Sequence[str], stop: Any, as_json: bool) -> subprocess.Popen:
    try:
        # With --json stdout is bench's records: the workload's own output goes to stderr.
        child = subprocess.Popen(list(workload), stdout=sys.stderr if as_json else None)
    except OSError as exc:
        raise BpfscopeError(f"cannot run {workload[0]}: {exc.strerror}") from None

    def wait() -> None:
        child.wait()
        stop.set("workload done")

    threading.Thread(target=wait, daemon=True).start()
    return child


EXAMPLES = """
\b
Examples:
  bpfscope bench -- pgbench -h 127.0.0.1 -S -T 30 postgres      # pgbench's queries, PostgreSQL's tree
  bpfscope bench --components gw=comm:nginx,app=cgroup:/app,db=comm:postgres -- ./load.py
  bpfscope bench --duration 60 --entry gw --components gw=comm:nginx,db=comm:postgres
  bpfscope bench --json --warmup 5 -- wrk -d 30s http://127.0.0.1:8080/
"""


@click.command(name="bench", cls=CommandAfterDashes, epilog=EXAMPLES)
@option(
    "components",
    help="The components: NAME=SELECTOR,... where SELECTOR is cgroup:PATH, container:ID, pid:PID or "
    "comm:NAME (children included). Default: one component per process name.",
)
@click.option(
    "--entry", metavar="NAME", help="The component requests enter by (default: the one most enter by)."
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="S",
    help="Leave out requests that began in the first S seconds (caches warming up).",
)
@click.option(
    "--prices",
    metavar="FILE",
    help="A price table (JSON, the shipped prices.json's form) overriding the shipped one, lever by lever.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Then run the workload again with the first advice emulated by a cgroup limit (memory, read "
    "IOPS, CPU quota), and print predicted against measured p99.",
)
@common_options
def command(
    run: Run, components: str | None, entry: str | None, warmup: float, prices: str | None, verify: bool
) -> None:
    """Where each millisecond of a request goes: per component (gateway, sidecar, app, database, ...)
    its time, of which CPU, run queue, disk reads, disk writes, locks and network, for the requests
    around p99 (p98.5-p99.5) and around the median.

    Runs the workload after `--` (a load generator: its requests are the end-to-end ones) and traces
    until it exits, or watches for --duration. Requests are joined downstream as DeepFlow does: the
    same connection seen from both ends, and the calls a thread makes while it serves a request (or
    the request's X-Request-ID / traceparent).
    """
    ctx = click.get_current_context()
    workload = ctx.meta.get("bench.workload", [])
    parsed = tuple(comp.parse(components)) if components else ()
    if entry is not None and parsed and entry not in {c.name for c in parsed}:
        raise BpfscopeError(f"--entry {entry} is not one of the components")
    config = run.config(
        BenchConfig,
        components=parsed,
        entry=entry,
        warmup_s=warmup,
        client_pids=frozenset(),
        prices=prices,
    )
    advice.load_prices(prices)  # a bad table is an error before anything runs
    if workload:
        # The workload is bench's child: it is watched (include_self), bench itself still is not.
        config = config.replace(include_self=True, client_pids=frozenset({os.getpid()}))
    if verify and not workload:
        raise BpfscopeError("--verify replays a workload: give it after --")
    run_bench(run, config, workload, verify)
