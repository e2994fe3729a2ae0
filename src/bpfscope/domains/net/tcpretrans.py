"""bpfscope tcpretrans: TCP retransmissions, one line each, or counted per connection with the rate.

The kernel side (tcpretrans.bpf.c) counts retransmitted segments exactly as the kernel does for
/proc/net/snmp RetransSegs and ``ss -ti`` (retrans:N/TOTAL), names the kind (after a timeout, fast
retransmit, tail loss probe, SYN, SYN-ACK), and reads the connection's segments sent so that -c can give
the retransmit rate, per connection and in total. :class:`RetransCounter` is also the health check's
source (:class:`TcpProvider`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.net import conn as net
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.health.check import Provider, Row, Threshold, Verdict
from bpfscope.runtime.stream import stream_events

if TYPE_CHECKING:
    import numpy as np

REQUIRES = ("raw_tracepoint", "ringbuf")
# enum kind in tcpretrans.bpf.c, in order.
KINDS = ("other", "rto", "fast", "tlp", "syn", "synack")
KIND_TEXT = {
    "other": "OTHER",
    "rto": "RTO",
    "fast": "FAST",
    "tlp": "TLP",
    "syn": "SYN",
    "synack": "SYNACK",
}


@dataclass
class ConnRetrans:
    """One connection's retransmissions and segments sent over an interval."""

    owner: net.Owner
    conn: net.Conn
    retrans: int
    segs_out: int
    kinds: dict[str, int] = field(default_factory=dict)
    retrans_total: int = 0  # since tracking began
    segs_out_total: int = 0

    @property
    def retrans_pct(self) -> float | None:
        return 100.0 * self.retrans / self.segs_out if self.segs_out else None

    def to_dict(self) -> dict[str, Any]:
        pct = self.retrans_pct
        return {
            **self.owner.to_dict(),
            **self.conn.to_dict(),
            "retrans": self.retrans,
            "segs_out": self.segs_out,
            "retrans_pct": None if pct is None else round(pct, 4),
            "kinds": self.kinds,
            "retrans_total": self.retrans_total,
            "segs_out_total": self.segs_out_total,
        }

    def describe(self, netns: net.NetnsNames) -> str:
        who = f"{self.owner.comm} (pid {self.owner.pid})" if self.owner.pid else "unknown process"
        return f"{who} {self.conn.local} -> {self.conn.remote} (netns {netns(self.conn.netns)})"


@dataclass
class Interval:
    conns: list[ConnRetrans]
    opened_active: int
    opened_passive: int

    @property
    def retrans(self) -> int:
        return sum(c.retrans for c in self.conns)

    @property
    def segs_out(self) -> int:
        return sum(c.segs_out for c in self.conns)

    @property
    def retrans_pct(self) -> float | None:
        return 100.0 * self.retrans / self.segs_out if self.segs_out else None


class RetransCounter:
    """Per-connection retransmissions and segments sent since the previous call, from a loaded
    tcpretrans object in counting mode. Rows of closed connections are deleted once read unchanged."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.before: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        self.opened = (0, 0)

    def interval(self) -> Interval:
        conns_map = self.obj.maps["conns"]
        keys, values = conns_map.items()
        now: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        out = []
        for k, v in zip(keys.tolist(), values, strict=True):
            kinds = tuple(int(x) for x in v["kinds"])
            seen = (int(v["retrans"]), int(v["segs_out"]), kinds)
            now[k] = seen
            prev = self.before.get(k)
            # A new row: its segments count from when tracking began (0 for a connect() seen).
            base = prev if prev is not None else (0, int(v["segs_out_first"]), (0,) * len(kinds))
            retrans, segs = seen[0] - base[0], seen[1] - base[1]
            if retrans or segs > 0:
                out.append(
                    ConnRetrans(
                        net.Owner.from_record(v["owner"]),
                        net.Conn.from_record(v["conn"]),
                        retrans,
                        max(segs, 0),
                        {name: n - b for name, n, b in zip(KINDS, kinds, base[2], strict=False) if n - b},
                        seen[0],
                        seen[1] - int(v["segs_out_first"]),
                    )
                )
            if int(v["closed"]) and prev == seen:
                conns_map.delete(k)
                del now[k]
        self.before = now
        bss = self.obj.bss
        opened = (int(bss["opened_active"]), int(bss["opened_passive"]))
        active, passive = opened[0] - self.opened[0], opened[1] - self.opened[1]
        self.opened = opened
        return Interval(out, active, passive)


def load(opts_filters: dict[str, int], count_mode: bool) -> BpfObject:
    require(*REQUIRES)
    return BpfObject(tool_object("tcpretrans"), rodata={**opts_filters, "count_mode": count_mode})


# --- Health check -------------------------------------------------------------------------------------
# Retransmitted share of the segments sent. A healthy LAN or data-centre path loses well under 0.1%;
# loss-based congestion control (CUBIC, Reno) gets throughput ~ MSS / (RTT * sqrt(p)) (Mathis et al.),
# so 1% loss already caps a connection at about a tenth of what 0.01% allows: worth a look. At 5% tail
# losses end in retransmission timeouts (hundreds of milliseconds each) and throughput collapses.
RETRANS_WARN_PCT = 1.0
RETRANS_PROBLEM_PCT = 5.0
# A percentage of a handful of segments is noise (one SYN retransmit of a 3-segment connection is 33%):
# a connection is judged alone only past this many segments sent in the window.
RETRANS_MIN_SEGS = 200


class TcpProvider(Provider):
    """TCP connections opened per second, connections active, and the retransmit rate with the worst
    connection named (process and addresses), from tcpretrans's kernel counters."""

    name = "TCP"
    requires = ("bpf",)
    # Network namespaces (inodes) to judge; empty: all. A subclass narrows the check to some
    # namespaces (a container's, a test's own).
    only_netns: ClassVar[frozenset[int]] = frozenset()

    def __init__(self) -> None:
        self.obj: BpfObject | None = None
        self.counter: RetransCounter | None = None

    def prepare(self) -> None:
        self.obj = load({}, count_mode=True)
        self.obj.attach()
        self.counter = RetransCounter(self.obj)

    def start(self) -> None:
        assert self.counter is not None
        self.counter.interval()

    def rows(self, window_s: float) -> list[Row]:
        assert self.counter is not None
        iv = self.counter.interval()
        if self.only_netns:
            iv.conns = [c for c in iv.conns if c.conn.netns in self.only_netns]
        window = max(window_s, 1e-9)
        new_per_s = (iv.opened_active + iv.opened_passive) / window
        active = [c for c in iv.conns if c.segs_out > 0]
        conn_row = Row(
            "TCP",
            "connections",
            new_per_s,
            "/s",
            f"{len(active)} active, {new_per_s:.1f} new/s",
            Verdict.OK,
            "no threshold: normal rates depend on the service",
            f"active: sent segments in the window; {iv.opened_active} connect(), "
            f"{iv.opened_passive} accepted in {window_s:.1f} s",
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
            detail += (
                f"; worst: {worst.describe(net.NetnsNames())} {worst.retrans_pct:.1f}% of {worst.segs_out}"
            )
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

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None


# --- Per-event mode ------------------------------------------------------------------------------------
class Formatter(net.EventLines):
    columns = f"{'STATE':<12} {'KIND':<6} SEGS"

    def fields(self, e: np.ndarray) -> tuple[dict[str, object], str]:
        kind = KINDS[int(e["kind"])] if int(e["kind"]) < len(KINDS) else "other"
        state = net.state_name(int(e["state"]))
        record = {
            "state": state,
            "kind": kind,
            "segs": int(e["segs"]),
            "err": int(e["err"]),
            "total_retrans": int(e["total_retrans"]),
            "segs_out": int(e["segs_out"]),
        }
        return record, f"{state:<12} {KIND_TEXT[kind]:<6} {int(e['segs'])}"


def show_counts(opts: RunOptions, iv: Interval, elapsed: float, netns: net.NetnsNames, max_rows: int) -> None:
    out = opts.output
    conns = sorted(iv.conns, key=lambda c: (c.retrans, c.segs_out), reverse=True)
    if opts.as_json:
        for c in conns:
            out.record({"scope": "connection", "interval": round(elapsed, 3), **c.to_dict()})
        pct = iv.retrans_pct
        out.record(
            {
                "scope": "total",
                "interval": round(elapsed, 3),
                "retrans": iv.retrans,
                "segs_out": iv.segs_out,
                "retrans_pct": None if pct is None else round(pct, 4),
            }
        )
        return
    pct = iv.retrans_pct
    out.heading(
        f"{elapsed:.1f}s  retransmitted {iv.retrans} of {iv.segs_out} segments"
        + ("" if pct is None else f" ({pct:.2f}%)")
    )
    table = [
        [
            c.owner.pid or "-",
            c.owner.comm or "-",
            netns(c.conn.netns),
            c.conn.local,
            c.conn.remote,
            c.retrans,
            c.segs_out,
            "-" if c.retrans_pct is None else round(c.retrans_pct, 2),
            " ".join(f"{KIND_TEXT[k]}:{n}" for k, n in c.kinds.items()),
        ]
        for c in conns[:max_rows]
    ]
    if table:
        out.table(["PID", "COMM", "NETNS", "LADDR", "RADDR", "RETRANS", "SEGS", "%", "KINDS"], table)
    else:
        out.line("no TCP segments sent")
    out.stream.flush()


EXAMPLES = """
\b
Examples:
  bpfscope tcpretrans               # each retransmission until Ctrl-C
  bpfscope tcpretrans -c            # counts per connection, with the rate, at Ctrl-C
  bpfscope tcpretrans -c 5          # the same every 5 seconds
  bpfscope tcpretrans -c --json 1   # JSON lines per connection and interval (and a total)
  bpfscope tcpretrans -D 443 -p 1234
"""


@click.command(name="tcpretrans", epilog=EXAMPLES)
@click.option("-c", "--count", "count_mode", is_flag=True, help="Count per connection, with the rate.")
@click.option(
    "-r", "--rows", "max_rows", type=click.IntRange(min=1), default=20, show_default=True, help="Rows (-c)."
)
@net.port_options
@tool_options
def command(opts: RunOptions, count_mode: bool, max_rows: int, lport: int | None, dport: int | None) -> None:
    """TCP retransmissions: process, addresses, state and kind (RTO: after a timeout, FAST: fast
    retransmit, TLP: tail loss probe, SYN, SYNACK). SEGS is the segments the kernel counted (as in
    /proc/net/snmp RetransSegs and ss -ti).

    With -c, per connection: retransmitted segments, segments sent, and their ratio (%), per interval
    or at the end, with the total over all connections. The process is the socket's owner (see net.bpf.h:
    the last process to connect, accept, send or receive on it); -p and --cgroup select by it.
    """
    rodata = {**opts.filters(), **net.port_filters(lport, dport)}
    with load(rodata, count_mode) as obj:
        obj.attach()
        if count_mode:
            counter = RetransCounter(obj)
            netns = net.NetnsNames()
            for elapsed in ticks(opts, "Tracing TCP retransmissions... Ctrl-C to end."):
                show_counts(opts, counter.interval(), elapsed, netns, max_rows)
        else:
            fmt = Formatter(opts.as_json, time.monotonic_ns())
            stream_events(
                "tcpretrans",
                "TCP retransmissions",
                obj,
                {"retransmissions": obj.ring_buffer("events")},
                lambda ring, batch: fmt.lines(batch),
                opts,
                header=fmt.header(),
            )
        bss = obj.bss
        notes = []
        if int(bss["not_sent"]):
            # Not a loss: the kernel did not count these either (see tcpretrans.bpf.c).
            notes.append(f"{int(bss['not_sent'])} retransmission attempts not sent (host queue busy, ...)")
        if int(bss["conns_dropped"]):
            notes.append(f"{int(bss['conns_dropped'])} segments not counted (too many connections)")
        if count_mode:
            notes.insert(0, obj.losses())  # the stream's own summary has said it otherwise
        if notes:
            opts.output.note("tcpretrans: " + "; ".join(notes))
