"""Health rules for the network: TCP connections and retransmits (tcpretrans's counters), and socket
buffers (sockstat's looks and buffer-full events).

Both can be narrowed to some network namespaces (``only_netns``: a container's, a test's own), so that
other work on the machine is not judged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from bpfscope.domains.net.conn import NetnsNames
from bpfscope.domains.net.sockstat import SocketRow, SocketSample, SockstatCollector, SockstatConfig
from bpfscope.domains.net.tcpretrans import RetransSample, TcpretransCollector, TcpretransConfig
from bpfscope.health.rule import Rule, unmet
from bpfscope.health.verdict import Row, Threshold, Verdict, pct
from bpfscope.runtime.collector import Collector, Sample

# Retransmitted share of the segments sent. A healthy LAN or data-centre path loses well under 0.1%;
# loss-based congestion control (CUBIC, Reno) gets throughput ~ MSS / (RTT * sqrt(p)) (Mathis et al.),
# so 1% loss already caps a connection at about a tenth of what 0.01% allows: worth a look. At 5% tail
# losses end in retransmission timeouts (hundreds of milliseconds each) and throughput collapses.
RETRANS_WARN_PCT = 1.0
RETRANS_PROBLEM_PCT = 5.0
# A percentage of a handful of segments is noise (one SYN retransmit of a 3-segment connection is 33%):
# a connection is judged alone only past this many segments sent in the window.
RETRANS_MIN_SEGS = 200

# Receive buffer: data the kernel has taken in (and TCP has acknowledged) that the application has not
# read. TCP advertises what is left of the buffer as its receive window, so at 90% the window is all but
# closed and the sender stalls: the reader cannot keep up. Half full means the reader lags behind; a
# healthy reader keeps its queue near empty.
RECV_WARN_PCT = 50.0
RECV_PROBLEM_PCT = 90.0
# Send buffer: data written and not yet acknowledged. A bulk sender faster than its path fills it by
# design (that is how TCP applies back-pressure), so a full send buffer only warns: it says the path or
# the peer is slower than the writer, and the receiving side's rows say which.
SEND_WARN_PCT = 90.0
# Accept queue against the listen backlog: past the backlog new connections are dropped and clients wait
# for a SYN retransmit (1 s, then 2 s, ...). Half full means accept() falls behind.
ACCEPT_WARN_PCT = 50.0
ACCEPT_PROBLEM_PCT = 90.0
# Buffer-full events: each is a packet dropped (or memory refused) because a socket was full: data lost
# for UDP, a retransmission for TCP. Any sustained rate is worth a look; 50 a second is a stream of
# losses that shows as latency or gaps.
EVENTS_WARN_PER_S = 1.0
EVENTS_PROBLEM_PER_S = 50.0
# Sockets counted as "saturated" in the detail: a buffer at least this full.
SATURATED_PCT = RECV_PROBLEM_PCT


class TcpRule(Rule):
    """TCP connections opened per second, connections active, and the retransmit rate with the worst
    connection named (process and addresses), from tcpretrans's counters. ``only_netns``: the network
    namespaces (inodes) judged; empty: all."""

    name = "TCP"
    requires = ("bpf",)

    def __init__(self, include_self: bool = False, only_netns: Iterable[int] = ()) -> None:
        super().__init__(include_self)
        self.only_netns = frozenset(only_netns)

    def collectors(self) -> list[Collector]:
        # Owners learnt at connect and accept, and from /proc at the start: a window needs the process
        # of a connection that retransmits, not the last one to use each socket of the machine.
        config = TcpretransConfig(count_mode=True, include_self=self.include_self, owners_from_io=False)
        return [TcpretransCollector(config)]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        iv = samples[self.collector]
        assert isinstance(iv, RetransSample)
        if self.only_netns:
            iv = replace(iv, conns=[c for c in iv.conns if c.conn.netns in self.only_netns])
        window = max(window_s, 1e-9)
        new_per_s = (iv.active_opens + iv.passive_opens) / window
        active = [c for c in iv.conns if c.segs_out > 0]
        conn_row = Row(
            "TCP",
            "connections",
            new_per_s,
            "/s",
            f"{new_per_s:.1f} new/s",
            Verdict.OK,
            "no threshold: normal rates depend on the service",
            f"{len(active)} active (sent segments in the window); {iv.active_opens} connect(), "
            f"{iv.passive_opens} accepted in {window_s:.1f} s",
        )
        limit = Threshold(RETRANS_WARN_PCT, RETRANS_PROBLEM_PCT, "%")
        total_pct = iv.retrans_pct
        judged = [c for c in iv.conns if c.segs_out >= RETRANS_MIN_SEGS and c.retrans]
        worst = max(judged, key=lambda c: c.retrans_pct or 0.0, default=None)
        judged_pcts = [p for p in (total_pct if iv.segs_out >= RETRANS_MIN_SEGS else None,) if p is not None]
        if worst is not None and worst.retrans_pct is not None:
            judged_pcts.append(worst.retrans_pct)
        verdict = limit.judge(max(judged_pcts, default=None))
        detail = f"{iv.retrans} of {iv.segs_out} segments sent"
        if worst is not None:
            detail += f"; worst: {worst.describe(NetnsNames())} {worst.retrans_pct:.1f}% of {worst.segs_out}"
        retrans_row = Row(
            "TCP",
            "retransmits",
            total_pct,
            "%",
            "-" if total_pct is None else f"{total_pct:.2f}%",
            verdict,
            f"{limit.describe()} of segments sent (overall, or one connection of >= {RETRANS_MIN_SEGS})",
            detail,
        )
        return [conn_row, retrans_row]


class _TwoLooks(SockstatCollector):
    """The sockets when the window opens too (``opening``), beside the window's sample at its close.
    Windows that follow one another (the agent's) each open with the previous one's closing look."""

    def start(self) -> None:
        super().start()
        self.opening = self.closing = super().sample().rows

    def sample(self) -> SocketSample:
        sample = super().sample()
        self.opening, self.closing = self.closing, sample.rows
        return sample


class SocketBufferRule(Rule):
    """The fullest receive buffer, send buffer and accept queue (each naming its socket and process),
    and the buffer-full events per second over the window. ``only_netns``: the network namespaces
    (inodes) judged; empty: all.

    Queues are looked at when the window opens and when it closes. A socket seen both times is judged by
    the lesser of its two looks, so a queue that stayed full is a PROBLEM and one full for a moment (a
    bulk reader a little behind at one look) is not; a socket seen once (opened or closed within the
    window) can only warn. A queue full only in between is not seen (its events are)."""

    name = "Socket buffers"

    def __init__(self, include_self: bool = False, only_netns: Iterable[int] = ()) -> None:
        super().__init__(include_self)
        self.only_netns = frozenset(only_netns)

    def collectors(self) -> list[Collector]:
        # Without BPF the queues are still read (sock_diag); only the events are not counted.
        config = SockstatConfig(include_self=self.include_self, bpf=unmet("bpf") is None)
        return [_TwoLooks(config)]

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        collector = self.collector
        last = samples[collector]
        assert isinstance(collector, _TwoLooks) and isinstance(last, SocketSample)
        if self.only_netns:
            last = replace(last, rows=[r for r in last.rows if r.netns in self.only_netns])
        looks = [
            [r for r in collector.opening if not self.only_netns or r.netns in self.only_netns],
            last.rows,
        ]
        connected = [[r for r in rows if not r.listening] for rows in looks]
        listening = [[r for r in rows if r.listening and r.proto == "tcp"] for rows in looks]
        res = self.name
        return [
            self._worst_row(res, "recv", connected, lambda r: r.recv_pct, RECV_WARN_PCT, RECV_PROBLEM_PCT),
            self._worst_row(res, "send", connected, lambda r: r.send_pct, SEND_WARN_PCT, None),
            self._worst_row(
                res, "accept queue", listening, lambda r: r.recv_pct, ACCEPT_WARN_PCT, ACCEPT_PROBLEM_PCT
            ),
            self._events_row(res, last),
        ]

    @staticmethod
    def _worst_row(
        res: str,
        metric: str,
        looks: list[list[SocketRow]],
        percent: Callable[[SocketRow], float],
        warn: float,
        problem: float | None,
    ) -> Row:
        first, last = ({r.inode: r for r in rows} for rows in looks)
        # Per socket: the lesser of its two looks, and whether it was seen both times.
        sustained: list[tuple[float, bool, SocketRow]] = []
        for inode, row in {**first, **last}.items():
            both = inode in first and inode in last
            value = min(percent(first[inode]), percent(last[inode])) if both else percent(row)
            sustained.append((value, both, row))
        sockets = max(len(rows) for rows in looks)
        full = sum(1 for value, _, _ in sustained if value >= SATURATED_PCT)
        if problem is None:
            rule = f"warn >= {warn:g}%, never PROBLEM alone"
            judge = Threshold(warn, float("inf"), "%").judge
        else:
            judge = Threshold(warn, problem, "%").judge
            rule = Threshold(warn, problem, "%").describe() + " at both looks"
        name = "accept queue" if metric == "accept queue" else f"{metric} buffer"
        if not sustained:
            return Row(res, name, None, "%", "no sockets", Verdict.OK, rule)
        value, both, worst = max(sustained, key=lambda v: (v[0], v[1]))
        verdict = judge(value)
        if not both and verdict is Verdict.PROBLEM:
            verdict = Verdict.WARN
        seen = "" if both else " (seen once)"
        detail = f"{worst.who()}{seen}; {full} of {sockets} sockets >= {SATURATED_PCT:g}%"
        return Row(res, name, value, "%", pct(value), verdict, rule, detail)

    @staticmethod
    def _events_row(res: str, sample: SocketSample) -> Row:
        limit = Threshold(EVENTS_WARN_PER_S, EVENTS_PROBLEM_PER_S, "/s")
        if not sample.bpf:
            return Row(res, "full events", None, "/s", "-", Verdict.UNKNOWN, "needs BPF", "not counted")
        # Over the collector's own interval, in which the events were counted.
        rate = sample.events_per_s()
        detail = f"{sample.full_events} in {sample.interval_s:.1f} s"
        worst = max(sample.rows, key=lambda r: r.full_events, default=None)
        if worst is not None and worst.full_events:
            kinds = ", ".join(f"{k} {v}" for k, v in worst.events.items() if v)
            detail += f"; most on {worst.who()} ({kinds})"
        verdict = limit.judge(rate)
        return Row(res, "full events", rate, "/s", f"{rate:.1f}/s", verdict, limit.describe(), detail)
