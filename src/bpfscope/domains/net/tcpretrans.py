"""bpfscope tcpretrans: TCP retransmissions, one line each, or counted per connection with the rate.

The kernel side (tcpretrans.bpf.c) counts retransmitted segments exactly as the kernel does for
/proc/net/snmp RetransSegs and ``ss -ti`` (retrans:N/TOTAL) and names the kind (after a timeout, fast
retransmit, tail loss probe, SYN, SYN-ACK). With -c, each interval gives per connection the segments
retransmitted and the segments sent, the rate's denominator: sent segments are read from sock_diag
(tcp_info's tcpi_segs_out, as ``ss -ti`` shows segs_out) for open connections, in every network namespace
bpfscope finds (diag.py), and from the row a connection leaves in the kernel when it closes. Nothing runs
per segment: a per-segment program cost about 13% of iperf3's throughput over loopback.

:class:`TcpretransCollector` with ``count_mode`` is also the health check's source (health.py: TcpRule),
and the request tracer's conn_stats's, joined by socket cookie (requests/stats.py: without owners or
rates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import click
import numpy as np

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.net import diag
from bpfscope.domains.net.conn import (
    OWNER_FIELDS,
    UNKNOWN_OWNER,
    Conn,
    ConnCollector,
    ConnConfig,
    ConnEventView,
    EventBatch,
    NetnsNames,
    Owner,
    conn_fields,
    owners,
    owners_and_conns,
    socket_owners_from_proc,
    state_field,
    state_name,
)
from bpfscope.runtime.collector import Sample
from bpfscope.runtime.schema import Field, Schema, btf_fields, enum_names
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses

# Open connections whose segments sent sock_diag reports: every state with a full socket and tcp_info
# (LISTEN sends nothing; TIME_WAIT and request socks have no tcp_info; a CLOSE socket's row is the
# kernel side's).
DIAG_STATES = (
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "CLOSE_WAIT",
    "LAST_ACK",
    "CLOSING",
)


@cache
def kinds() -> tuple[str, ...]:
    """enum retrans_kind (tcpretrans.bpf.c), in order: ``other``, ``rto``, ``fast``, ..."""
    return tuple(enum_names(TcpretransCollector.btf().enum("retrans_kind")).values())


@dataclass
class ConnRetrans:
    """One connection's retransmissions and segments sent over an interval."""

    owner: Owner
    conn: Conn
    retrans: int
    segs_out: int
    kinds: dict[str, int] = field(default_factory=dict)
    retrans_total: int = 0  # since tracking began
    segs_out_total: int = 0
    cookie: int = 0  # the socket's (requests' conn_stats joins on it)

    @property
    def retrans_pct(self) -> float | None:
        return 100.0 * self.retrans / self.segs_out if self.segs_out else None

    def describe(self, netns: NetnsNames) -> str:
        who = f"{self.owner.comm} (pid {self.owner.pid})" if self.owner.pid else "unknown process"
        return f"{who} {self.conn.local} -> {self.conn.remote} (netns {netns(self.conn.netns)})"


@dataclass
class RetransSample(Sample):
    """Retransmissions and segments sent per connection over an interval, and connections opened."""

    ts: float
    interval_s: float
    conns: list[ConnRetrans]  # most retransmissions first
    active_opens: int  # connect() calls
    passive_opens: int  # handshakes completed for a listener
    # Cookies whose rows were let go: connections that closed (their counts final), half-open ones whose
    # SYN-ACKs stopped.
    forgotten: frozenset[int] = frozenset()

    @property
    def retrans(self) -> int:
        return sum(c.retrans for c in self.conns)

    @property
    def segs_out(self) -> int:
        return sum(c.segs_out for c in self.conns)

    @property
    def retrans_pct(self) -> float | None:
        return 100.0 * self.retrans / self.segs_out if self.segs_out else None

    def records(self) -> Iterator[dict[str, Any]]:
        common = {"ts": self.ts, "interval_s": self.interval_s}
        per_conn, total = count_schemas()
        for c in self.conns:
            pct = c.retrans_pct
            yield per_conn.record(
                {
                    **common,
                    **c.owner.to_dict(),
                    **c.conn.to_dict(),
                    "retrans": c.retrans,
                    "segs_out": c.segs_out,
                    "retrans_pct": None if pct is None else round(pct, 4),
                    "kinds": c.kinds,
                    "retrans_total": c.retrans_total,
                    "segs_out_total": c.segs_out_total,
                }
            )
        pct = self.retrans_pct
        yield total.record(
            {
                **common,
                "retrans": self.retrans,
                "segs_out": self.segs_out,
                "retrans_pct": None if pct is None else round(pct, 4),
                "active_opens": self.active_opens,
                "passive_opens": self.passive_opens,
            }
        )


class RetransBatch(EventBatch):
    """Retransmissions that arrived since the previous drain."""

    def rows(self) -> list[dict[str, Any]]:
        rows = super().rows()
        names = kinds()
        e = self.events
        columns = zip(
            rows,
            e["state"].tolist(),
            e["kind"].tolist(),
            e["segs"].tolist(),
            e["err"].tolist(),
            e["total_retrans"].tolist(),
            e["segs_out"].tolist(),
            strict=True,
        )
        for row, state, kind, segs, err, total, segs_out in columns:
            row.update(
                state=state_name(state),
                kind=names[kind],
                segs=segs,
                err=err,
                total_retrans=total,
                segs_out=segs_out,
            )
        return rows

    def records(self) -> Iterator[dict[str, Any]]:
        schema = event_schema()
        for row in self.rows():
            yield schema.record(row)


@cache
def event_schema() -> Schema:
    btf = TcpretransCollector.btf()
    event = btf.pointee("bs_record__events")
    return Schema(
        "tcpretrans",
        (
            *OWNER_FIELDS,
            *conn_fields(btf),
            state_field(),
            *btf_fields(
                event,
                only=("kind", "segs", "err", "total_retrans", "segs_out"),
                kind={"doc": "after a timeout (rto), fast retransmit, tail loss probe (tlp), syn, synack"},
                segs={"doc": "segments the kernel counted as retransmitted (RetransSegs)"},
                err={"doc": "tcp_retransmit_skb's result: not 0 when the call sent nothing"},
                total_retrans={"doc": "the connection's retransmitted segments so far (ss -ti)"},
                segs_out={"doc": "the connection's segments sent so far"},
            ),
        ),
        doc="A TCP retransmission.",
    )


@cache
def count_schemas() -> tuple[Schema, Schema]:
    rate = Field("retrans_pct", "float", "%", "retransmitted of segments sent", nullable=True)
    retrans = Field("retrans", "int", doc="segments retransmitted in the interval")
    segs_out = Field("segs_out", "int", doc="segments sent in the interval")
    per_conn = Schema(
        "tcpretrans.connection",
        (
            *OWNER_FIELDS,
            *conn_fields(TcpretransCollector.btf()),
            retrans,
            segs_out,
            rate,
            Field("kinds", "dict", doc=f"retransmitted segments by kind ({', '.join(kinds())})"),
            Field("retrans_total", "int", doc="retransmitted since bpfscope began to follow the connection"),
            Field("segs_out_total", "int", doc="sent since bpfscope began to follow the connection"),
        ),
        doc="One connection's retransmissions and segments sent over an interval.",
        interval=True,
    )
    total = Schema(
        "tcpretrans.total",
        (
            retrans,
            segs_out,
            rate,
            Field("active_opens", "int", doc="connect() calls (as /proc/net/snmp ActiveOpens)"),
            Field("passive_opens", "int", doc="connections accepted (as /proc/net/snmp PassiveOpens)"),
        ),
        doc="Every connection together over an interval.",
        interval=True,
    )
    return per_conn, total


@dataclass(kw_only=True)
class TcpretransConfig(ConnConfig):
    count_mode: bool = False  # per connection, with the rate (-c); else each retransmission
    # Count mode's extras, which a join by socket cookie (requests' conn_stats) does without: the
    # sockets' owners (learnt at every TCP send and receive: -p, --cgroup and the process columns) and
    # the open connections' segments sent (sock_diag in every network namespace at each interval: the
    # rate's denominator).
    owners: bool = True
    rates: bool = True
    # Owners learnt at every TCP send and receive too (the last process to use a socket), not only at
    # connect and accept with a look at /proc for the sockets open at the start: two programs on every
    # TCP send and receive of the machine, 0.50% of it under the agent's mesh (36,000 runs a second).
    owners_from_io: bool = True


class _Listed(NamedTuple):
    """An open connection as sock_diag lists it (tcp_info)."""

    segs_out: int
    total_retrans: int
    conn: Conn
    inode: int


@dataclass(frozen=True)
class _Counts:
    """A connection's cumulative counts, as one look found them."""

    retrans: int
    segs_out: int
    kinds: tuple[int, ...]
    netns: int


@dataclass
class _Look:
    """Every selected connection, by cookie, at one look."""

    counts: dict[int, _Counts] = field(default_factory=dict)
    who: dict[int, tuple[Owner, Conn]] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)  # rows of closed connections
    half_open: set[int] = field(default_factory=set)  # rows of SYN-ACKs retransmitted
    namespaces: set[int] = field(default_factory=set)  # those sock_diag listed (inodes)


class TcpretransCollector(ConnCollector[TcpretransConfig]):
    """Each TCP retransmission streamed, or (count_mode) per connection over each interval."""

    name = "tcpretrans"
    bpf_object = "tcpretrans"
    loss_counters = {
        "conns_dropped": ("map_full", "retransmitted segments not counted (too many connections)"),
        "closes_dropped": (
            "map_full",
            "closed connections' segments sent not counted (too many connections)",
        ),
    }

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (event_schema(), *count_schemas())

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "count_mode": self.config.count_mode}

    def max_entries(self) -> dict[str, int]:
        # Without owners the LRU map of 65,536 preallocated entries is not used: one instead; nor, out of
        # count mode, the totals at the start.
        unused = {} if self.config.owners else {"bs_owners": 1}
        return unused if self.config.count_mode else {**unused, "retrans_at_start": 1}

    def configure(self) -> None:
        assert self.obj is not None
        unused: tuple[str, ...] = ("bs_owner_",) if not self.config.owners else ()
        if not self.config.owners_from_io:
            unused += ("bs_owner_send", "bs_owner_recv")
        for name, program in self.obj.programs.items():
            if name.startswith(unused):
                program.autoload = False

    def streams_events(self) -> bool:
        return not self.config.count_mode

    def drain(self) -> RetransBatch | None:
        events = self.read_events() if self.rings else None
        return None if events is None else RetransBatch(events, self.wall_offset_ns)

    def not_sent(self) -> int:
        """tcp_retransmit_skb calls the kernel did not count either (not a loss: see tcpretrans.bpf.c)."""
        return int(self.obj.bss["not_sent"]) if self.obj is not None else 0

    # --- count mode ----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.config.count_mode:
            return
        namespaces: set[int] = set()
        listed = _listed_tcp(namespaces)
        self._seed_retrans_at_start(listed)
        if self.config.owners and not self.config.owners_from_io:
            self._seed_owners(listed)
        look = self._look((listed, namespaces) if self.config.rates else None)
        self.before = look.counts
        # Where each connection's totals count from: its segments sent when first seen (0 when opened
        # while tracing).
        self.first_segs_out = {cookie: counts.segs_out for cookie, counts in look.counts.items()}
        self.opens = self._opens()
        self.t0 = time.monotonic()

    def sample(self) -> RetransSample | None:
        if not self.config.count_mode:
            return None
        look = self._look()
        t = time.monotonic()
        for cookie, prev in self.before.items():
            # Its namespace could not be listed this time (its last process exited, say): still open
            # for all we know, and its counts so far must not be counted again when it closes.
            if cookie not in look.counts and prev.netns not in look.namespaces:
                look.counts[cookie] = prev
        none = (0,) * len(kinds())
        conns = []
        for cookie, now in look.counts.items():
            prev = self.before.get(cookie) or _Counts(0, 0, none, now.netns)  # not seen: opened since
            first = self.first_segs_out.setdefault(cookie, 0)
            retrans, segs_out = now.retrans - prev.retrans, now.segs_out - prev.segs_out
            if retrans or segs_out > 0:
                owner, conn = look.who[cookie]
                by_kind = zip(kinds(), now.kinds, prev.kinds, strict=True)
                conns.append(
                    ConnRetrans(
                        owner,
                        conn,
                        retrans,
                        max(segs_out, 0),
                        {name: n - b for name, n, b in by_kind if n - b},
                        now.retrans,
                        now.segs_out - first,
                        cookie,
                    )
                )
        forgotten = self._forget_closed(look)
        opens = self._opens()
        conns.sort(key=lambda c: (c.retrans, c.segs_out), reverse=True)
        sample = RetransSample(
            time.time(),
            t - self.t0,
            conns,
            opens[0] - self.opens[0],
            opens[1] - self.opens[1],
            forgotten,
        )
        self.before, self.opens, self.t0 = look.counts, opens, t
        return sample

    def _seed_retrans_at_start(self, listed: dict[int, _Listed]) -> None:
        """Each open connection's total retransmitted so far, where its first row counts from (see
        tcpretrans.bpf.c): only those that have retransmitted (the others count from 0)."""
        assert self.obj is not None
        at_start = self.obj.maps["retrans_at_start"]
        for cookie, row in listed.items():
            if row.total_retrans:
                at_start.update(cookie, row.total_retrans)

    def _seed_owners(self, listed: dict[int, _Listed]) -> None:
        """The owners of the connections open at the start, from /proc (learnt at connect and accept
        for those that open later)."""
        assert self.obj is not None
        table = self.obj.maps["bs_owners"]
        by_inode = socket_owners_from_proc(None if self.config.include_self else os.getpid())
        value = np.zeros(1, dtype=table.value_dtype)[0]
        for cookie, row in listed.items():
            owner = by_inode.get(row.inode)
            if owner is None:
                continue
            value["tgid"], value["cgroup"], value["comm"] = owner.pid, owner.cgroup, owner.comm.encode()[:15]
            table.update(cookie, value)

    def _look(self, listing: tuple[dict[int, _Listed], set[int]] | None = None) -> _Look:
        """Every selected connection's counts now: open ones from sock_diag (listed first: a connection
        that closes meanwhile has left its row by the time the rows are read; ``listing`` is one just
        made, with the namespaces it listed), those that retransmitted or closed from the kernel's rows."""
        assert self.obj is not None
        look = _Look()
        if listing is not None:
            listed, namespaces = listing
            look.namespaces |= namespaces
        else:
            listed = _listed_tcp(look.namespaces) if self.config.rates else {}
        keys, rows = self.obj.maps["conns"].items()
        known = owners(self.obj)
        columns = zip(
            keys.tolist(),
            owners_and_conns(rows),
            rows["retrans"].tolist(),
            rows["segs_out"].tolist(),
            rows["kinds"].tolist(),
            rows["closed"].tolist(),
            rows["half_open"].tolist(),
            strict=True,
        )
        for cookie, (owner, conn), retrans, segs_out, by_kind, closed, half_open in columns:
            row = listed.pop(cookie, None)
            segs_out = max(segs_out, row.segs_out if row else 0)
            look.counts[cookie] = _Counts(retrans, segs_out, tuple(by_kind), conn.netns)
            look.who[cookie] = (owner if owner.pid else known.get(cookie, UNKNOWN_OWNER), conn)
            if closed:
                look.closed.add(cookie)
            elif half_open:
                look.half_open.add(cookie)
        none = (0,) * len(kinds())
        for cookie, row in listed.items():
            owner = known.get(cookie, UNKNOWN_OWNER)
            if self.config.selects(owner, row.conn):
                look.counts[cookie] = _Counts(0, row.segs_out, none, row.conn.netns)
                look.who[cookie] = (owner, row.conn)
        return look

    def _forget_closed(self, look: _Look) -> frozenset[int]:
        """Delete the rows whose counts have been shown and will not grow: those of closed connections
        at once, and a SYN-ACK row (whose request sock is never seen to close) once it stopped growing.
        Their cookies."""
        assert self.obj is not None
        unchanged = {cookie for cookie in look.half_open if look.counts[cookie] == self.before.get(cookie)}
        gone = frozenset(look.closed | unchanged)
        self.obj.maps["conns"].delete_many(gone)
        for cookie in gone:
            del look.counts[cookie]
        for cookie in self.first_segs_out.keys() - look.counts.keys():
            del self.first_segs_out[cookie]
        return gone

    def _opens(self) -> tuple[int, int]:
        assert self.obj is not None
        return int(self.obj.bss["active_opens"]), int(self.obj.bss["passive_opens"])


def _listed_tcp(namespaces: set[int]) -> dict[int, _Listed]:
    """cookie -> (segments sent, segments retransmitted, connection, socket inode) of every open TCP
    connection sock_diag lists, in every network namespace found; adds the namespaces it could list to
    ``namespaces``."""
    states = diag.state_mask(*DIAG_STATES)
    ask = diag.extensions("INET_DIAG_INFO")
    out: dict[int, _Listed] = {}
    for ns in diag.network_namespaces():
        listed = diag.sockets(ns, ("tcp",), states, ask)
        if listed is None:
            continue
        namespaces.add(ns.inode)
        for msg in listed["tcp"]:
            info = diag.tcp_info(msg.attr("INET_DIAG_INFO"))
            if info is None:
                continue
            conn = Conn(
                diag.unmapped(msg["idiag_src"]),
                msg["idiag_sport"],
                diag.unmapped(msg["idiag_dst"]),
                msg["idiag_dport"],
                ns.inode,
            )
            out[msg["idiag_cookie"]] = _Listed(
                info["tcpi_segs_out"], info["tcpi_total_retrans"], conn, msg["idiag_inode"]
            )
    return out


# --- views --------------------------------------------------------------------------------------------
class RetransEventView(ConnEventView):
    columns = f"{'STATE':<12} {'KIND':<6} SEGS"
    what = "retransmissions"

    def text(self, row: dict[str, Any]) -> str:
        return f"{row['state']:<12} {row['kind'].upper():<6} {row['segs']}"

    def summary(self, collector: Collector, losses: Losses) -> str:
        return super().summary(collector, losses) + _not_sent(collector)


def _not_sent(collector: Collector) -> str:
    not_sent = collector.not_sent() if isinstance(collector, TcpretransCollector) else 0
    # Not a loss: the kernel did not count these either (see tcpretrans.bpf.c).
    return f"; {not_sent} retransmission attempts not sent (host queue busy, ...)" if not_sent else ""


class RetransCountView(View):
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.start = time.monotonic()
        self.netns = NetnsNames()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, RetransSample)
        pct = sample.retrans_pct
        term.heading(
            f"{time.monotonic() - self.start:.1f}s  retransmitted {sample.retrans} of {sample.segs_out} "
            "segments" + ("" if pct is None else f" ({pct:.2f}%)")
        )
        table = [
            [
                c.owner.pid or "-",
                c.owner.comm or "-",
                self.netns(c.conn.netns),
                c.conn.local,
                c.conn.remote,
                c.retrans,
                c.segs_out,
                "-" if c.retrans_pct is None else round(c.retrans_pct, 2),
                " ".join(f"{k.upper()}:{n}" for k, n in c.kinds.items()),
            ]
            for c in sample.conns[: self.max_rows]
        ]
        if table:
            term.table(["PID", "COMM", "NETNS", "LADDR", "RADDR", "RETRANS", "SEGS", "%", "KINDS"], table)
        else:
            term.line("no TCP segments sent")

    def summary(self, collector: Collector, losses: Losses) -> str:
        return super().summary(collector, losses) + _not_sent(collector)


EXAMPLES = """
\b
Examples:
  bpfscope tcpretrans               # each retransmission until Ctrl-C
  bpfscope tcpretrans -c            # counts per connection, with the rate, at Ctrl-C
  bpfscope tcpretrans -c 5          # the same every 5 seconds
  bpfscope tcpretrans -c --json 1   # JSON lines per connection and interval (and a total)
  bpfscope tcpretrans --dport 443 -p 1234
"""


@click.command(name="tcpretrans", epilog=EXAMPLES)
@option("count", help="Count per connection, with the rate.")
@option("rows", default=20, help="Rows shown (-c).")
@option("lport")
@option("dport")
@common_options
def command(run: Run, count_mode: bool, max_rows: int, lport: int | None, dport: int | None) -> None:
    """TCP retransmissions: process, addresses, state and kind (RTO: after a timeout, FAST: fast
    retransmit, TLP: tail loss probe, SYN, SYNACK). SEGS is the segments the kernel counted (as in
    /proc/net/snmp RetransSegs and ss -ti).

    With -c, per connection: retransmitted segments, segments sent, and their ratio (%), per interval
    or at the end, with the total over all connections. Segments sent are read with sock_diag (as ss -ti
    shows segs_out) in every network namespace of a running process or named by ip netns. The process is
    the socket's owner (see net.bpf.h: the last process to connect, accept, send or receive on it); -p
    and --cgroup select by it.
    """
    config = run.config(TcpretransConfig, count_mode=count_mode, lport=lport, dport=dport)
    view = RetransCountView(max_rows) if count_mode else RetransEventView()
    run.run(TcpretransCollector(config), view, "Tracing TCP retransmissions... Ctrl-C to end.")
