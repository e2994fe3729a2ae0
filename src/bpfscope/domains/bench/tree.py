"""Requests joined across components, and where each one's time went: the tree.

The join, as DeepFlow makes it without code changes:

- a client span and a server span are the same request seen from its two ends when the client's
  connection is the server's (addresses and ports crossed) and the server's span lies within the
  client's;
- a client span was made for the server span of its own process that carries the same request id
  (X-Request-ID, traceparent), else for the one its thread was serving when it asked: the server's
  request had arrived and its response had not yet left. A thread that serves several requests at once
  (an event loop) is joined by request id only.

A request's tree: each component's time is its server span (summed when it was called more than once);
its downstream calls are its children; a call's network time is the client's span less the server's.
What the component did itself (its time less its calls) is split by its threads' states: the thread
that served the request where a thread serves one request at a time (per request), else the states of
all the component's threads during those moments, shared with the other requests they served (per
component, said so). A residual line makes every node add up.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from bpfscope.domains.bench.spans import Span
from bpfscope.domains.bench.timeline import Timeline

# A server span may start a little before the client's (a tracer reads clocks at call entry and return).
SLACK_NS = 50_000
# A component is an event loop when more than this share of its spans overlap another on their thread.
LOOP_SHARE = 0.01

# The tree's lines for what a component did itself, from the thread states (tsa's names), in order.
SELF_LINES = {
    "cpu": ("cpu",),
    "runqueue": ("runqueue",),
    "disk_read": ("disk_read",),
    "disk_write": ("disk_write", "sync"),
    "lock": ("lock",),
    "net": ("net",),
    "other": ("other",),
}


def assign_components(spans: Iterable[Span], component_of: Callable[[Span], str | None]) -> None:
    for span in spans:
        span.component = component_of(span)


def link_peers(spans: list[Span]) -> int:
    """Pair each client span with the server span of the same request (both ends traced); returns how
    many were paired."""
    servers: dict[tuple, list[Span]] = defaultdict(list)
    for s in spans:
        if s.role == "server":
            servers[(s.remote, s.local)].append(s)
    starts: dict[tuple, list[int]] = {}
    for key, found in servers.items():
        found.sort(key=lambda s: s.start_ns)
        starts[key] = [s.start_ns for s in found]
    paired = 0
    for c in spans:
        if c.role != "client":
            continue
        key = (c.local, c.remote)
        candidates = servers.get(key)
        if not candidates:
            continue
        i = bisect.bisect_left(starts[key], c.start_ns - SLACK_NS)
        while i < len(candidates) and candidates[i].start_ns <= c.end_ns:
            s = candidates[i]
            if s.peer is None and s.end_ns <= c.end_ns + SLACK_NS:
                s.peer, c.peer = c, s
                paired += 1
                break
            i += 1
    return paired


def event_loops(spans: Iterable[Span]) -> set[str]:
    """Components whose threads serve several requests at once (their spans overlap on a thread)."""
    by_thread: dict[tuple[str, int], list[Span]] = defaultdict(list)
    for s in spans:
        if s.role == "server" and s.component is not None:
            by_thread[(s.component, s.tid)].append(s)
    overlapping: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for (component, _), served in by_thread.items():
        served.sort(key=lambda s: s.start_ns)
        busy_until = 0
        for s in served:
            total[component] += 1
            if s.start_ns < busy_until:
                overlapping[component] += 1
            busy_until = max(busy_until, s.end_ns)
    return {c for c, n in total.items() if overlapping[c] > LOOP_SHARE * n}


class _Served:
    """One process's (or thread's) server spans in time order, to find the one open at a moment."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.starts: list[int] = []

    def sort(self) -> None:
        self.spans.sort(key=lambda s: s.start_ns)
        self.starts = [s.start_ns for s in self.spans]

    def containing(self, c: Span) -> Span | None:
        """The server span open while ``c`` ran (the latest to start before it), if it was."""
        i = bisect.bisect_right(self.starts, c.start_ns) - 1
        if i >= 0 and self.spans[i].end_ns >= c.end_ns:
            return self.spans[i]
        return None


def link_parents(spans: list[Span], loops: set[str]) -> None:
    """Each client span's parent: the server span of its process it was made for (module text)."""
    by_id: dict[tuple[int, str], _Served] = defaultdict(_Served)
    by_thread: dict[tuple[int, int], _Served] = defaultdict(_Served)
    for s in spans:
        if s.role != "server":
            continue
        if s.request_id:
            by_id[(s.pid, s.request_id)].spans.append(s)
        by_thread[(s.pid, s.tid)].spans.append(s)
    for served in [*by_thread.values(), *by_id.values()]:
        served.sort()
    for c in spans:
        if c.role != "client":
            continue
        parent = None
        if c.request_id and (found := by_id.get((c.pid, c.request_id))) is not None:
            parent = found.containing(c)
        if parent is None and c.component not in loops and (found := by_thread.get((c.pid, c.tid))):
            parent = found.containing(c)
        if parent is not None:
            c.parent = parent
            parent.children.append(c)


# --- the tree of one request ----------------------------------------------------------------------
@dataclass
class Node:
    """A component's part of a request (or of a band of requests, averaged): ``time_ns`` adds up to
    its lines, its network and its children's times."""

    component: str
    mode: str  # per request, per component (event loop), client, untraced
    calls: float = 0.0
    time_ns: float = 0.0
    lines: dict[str, float] = field(default_factory=dict)  # SELF_LINES' keys, and residual
    network_ns: float = 0.0  # to its downstream calls: their client time less their server time
    read_wake_ns: float = 0.0  # of its run-queue line, the waits for a CPU right after disk reads
    children: dict[str, Node] = field(default_factory=dict)

    def child(self, component: str, mode: str) -> Node:
        node = self.children.get(component)
        if node is None:
            node = self.children[component] = Node(component, mode)
        return node

    def add(self, other: Node, weight: float = 1.0) -> None:
        self.calls += other.calls * weight
        self.time_ns += other.time_ns * weight
        self.network_ns += other.network_ns * weight
        self.read_wake_ns += other.read_wake_ns * weight
        for k, v in other.lines.items():
            self.lines[k] = self.lines.get(k, 0.0) + v * weight
        for name, c in other.children.items():
            self.child(name, c.mode).add(c, weight)

    def find(self, component: str) -> Node | None:
        if self.component == component:
            return self
        for c in self.children.values():
            found = c.find(component)
            if found is not None:
                return found
        return None

    def walk(self) -> Iterable[Node]:
        yield self
        for c in self.children.values():
            yield from c.walk()


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(span: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    start, end = span
    out = []
    for a, b in _union(holes):
        if a > start:
            out.append((start, min(a, end)))
        start = max(start, b)
    if start < end:
        out.append((start, end))
    return [(a, b) for a, b in out if b > a]


@dataclass
class Context:
    """What splitting a component's own time needs: the timelines, which components are event loops,
    and each component's threads (for event loops)."""

    timeline: Timeline
    loops: set[str]
    threads: dict[str, list[int]]


def _states(tid: int, intervals: list[tuple[int, int]], component: str | None, ctx: Context) -> np.ndarray:
    """Time per state (float ns) over intervals: the thread's, or for an event loop its component's
    threads' during the same moments, scaled to the intervals' length (what is unknown is left out)."""
    if component not in ctx.loops:
        return ctx.timeline.states(tid, intervals)[0].astype(float)
    total = np.zeros(len(ctx.timeline.names) + 1, np.int64)
    for thread in ctx.threads.get(component or "", [tid]):
        total += ctx.timeline.states(thread, intervals)[0]
    whole = total.sum()
    length = sum(b - a for a, b in intervals)
    whole = total[:-1].sum()  # the states (the last slot is a part of the run queue's)
    return total / whole * length if whole else np.zeros(len(total))


@dataclass
class Work:
    """What a node's thread did: its span, from when the work began (a server's thread woken for the
    request, a little before its read returned), and the calls it made (each client span with the
    server's span when traced)."""

    span: Span
    start_ns: int
    calls: list[tuple[Span, Span | None]]


def _server_start(server: Span, sent_ns: int, ctx: Context) -> int:
    """When a server's thread began on a request: if it was blocked on its socket and woken after the
    request was sent, at that wakeup (its wait for a CPU and the read's return are the server's, not
    the network's); else when its read returned."""
    if server.component in ctx.loops:
        return server.start_ns
    woken = ctx.timeline.woken_before(server.tid, server.start_ns, "net")
    return woken if woken is not None and sent_ns <= woken < server.start_ns else server.start_ns


def _split(node: Node, work: Work, ctx: Context) -> None:
    """Fill a node's lines and children. Its own time outside its calls goes to its lines, by its
    thread's states; inside a call, the time the downstream server did not cover (the hop) is network
    where the thread waited on its socket, and its other states (CPU, run queue, a lock: the reply had
    come and the thread could not take it) go to its lines."""
    names = ctx.timeline.names
    span = work.span
    starts = [_server_start(server, c.start_ns, ctx) if server else c.start_ns for c, server in work.calls]
    outside = _minus((work.start_ns, span.end_ns), [(c.start_ns, c.end_ns) for c, _ in work.calls])
    hops: list[tuple[int, int]] = []
    for (c, server), begun in zip(work.calls, starts, strict=True):
        hops += _minus((c.start_ns, c.end_ns), [(begun, server.end_ns)]) if server else []
    own = _states(span.tid, outside, node.component, ctx)
    if node.component in ctx.loops:
        node.network_ns = float(sum(b - a for a, b in hops))
    else:
        hop = _states(span.tid, hops, node.component, ctx)
        node.network_ns = float(hop[names.index("net")])
        hop[names.index("net")] = 0
        own += hop
    node.lines = {line: float(sum(own[names.index(s)] for s in parts)) for line, parts in SELF_LINES.items()}
    node.read_wake_ns = float(own[-1])
    below = 0.0
    for (c, server), begun in zip(work.calls, starts, strict=True):
        if server is not None:
            child = server_node(server, ctx, begun)
        else:
            child = Node(f"{c.remote[0]}:{c.remote[1]}", "untraced", 1, c.latency_ns)
        node.child(child.component, child.mode).add(child)
        below += child.time_ns
    # What no state explains: time before a thread was first seen, and calls made in parallel (their
    # times overlap: negative).
    node.lines["residual"] = node.time_ns - sum(node.lines.values()) - node.network_ns - below


def _calls(span: Span) -> list[tuple[Span, Span | None]]:
    return [
        (c, c.peer if c.peer is not None and c.peer.component is not None else None) for c in span.children
    ]


def server_node(span: Span, ctx: Context, start_ns: int | None = None) -> Node:
    """One server span (its work begun at ``start_ns``) and what it called, as a tree."""
    start = span.start_ns if start_ns is None else start_ns
    component = span.component or span.comm
    mode = "per component" if component in ctx.loops else "per request"
    node = Node(component, mode, 1, span.end_ns - start)
    _split(node, Work(span, start, _calls(span)), ctx)
    return node


def request_tree(root: Span, ctx: Context) -> Node:
    """The tree of one end-to-end request: ``root`` is the entry component's server span; when the
    client that sent it is traced, the tree starts at the client's view of it."""
    client = root.peer
    if client is None:
        return server_node(root, ctx)
    top = Node("end-to-end", "client", 1, client.latency_ns)
    _split(top, Work(client, client.start_ns, [(client, root)]), ctx)
    return top


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank: the least value with at least q of them at or below it)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0.0


def band(requests: list[tuple[float, Span]], low: float, high: float) -> list[Span]:
    """The requests whose end-to-end latency lies between the low and high quantiles (inclusive)."""
    latencies = [lat for lat, _ in requests]
    lo, hi = quantile(latencies, low), quantile(latencies, high)
    return [root for lat, root in requests if lo <= lat <= hi]


def average(trees: list[Node]) -> Node:
    """The band's tree: every node averaged over its requests (sums of averages add up as the sums)."""
    if not trees:
        return Node("end-to-end", "client")
    out = Node(trees[0].component, trees[0].mode)
    for t in trees:
        out.add(t, 1.0 / len(trees))
    return out
