"""bpfscope sockstat: how full each socket's buffers are, and how often they overflowed, like ss and top.

Two sources, joined by the socket's inode:

* sock_diag (netlink, through pyroute2; diag.py), in every network namespace: per TCP and UDP socket its
  state, addresses, queues (what ``ss -tn`` shows as Recv-Q and Send-Q) and memory (``ss -m``'s skmem:
  receive memory against the receive buffer, queued send memory against the send buffer). Saturation is
  ``rmem_alloc / rcvbuf`` and ``wmem_queued / sndbuf`` in percent: the limits the kernel itself enforces.
  For a listening TCP socket it is the accept queue against its backlog.
* BPF (sockstat.bpf.c): buffer-full events per socket over the interval: sock_rcvqueue_full,
  sock_exceed_buf_limit, and packets dropped for a full socket (kfree_skb with reason SOCKET_RCVBUFF,
  PROTO_MEM, SOCKET_BACKLOG, TCP_ZEROWINDOW, TCP_LISTEN_OVERFLOW). They fire in softirq, where the current
  task is whoever was on the CPU, so the process comes from the socket inode found in /proc/PID/fd.

:class:`SockstatCollector` is the Python API; health.py's SocketBufferRule judges its samples.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import click

from bpfscope.cli.options import Run, common_options, top_options
from bpfscope.domains.net import diag
from bpfscope.domains.net.conn import address, endpoint, state_name
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.losses import Losses
from bpfscope.runtime.schema import COMM, Field, Schema, enum_names
from bpfscope.sinks.terminal import Terminal, View

# TCP states as ss names them (its words; the values are the kernel's, from its BTF). A UDP socket is
# CLOSE ("UNCONN") or, connected, ESTABLISHED.
SS_STATES = {
    "ESTABLISHED": "ESTAB",
    "SYN_SENT": "SYN-SENT",
    "SYN_RECV": "SYN-RECV",
    "FIN_WAIT1": "FIN-WAIT-1",
    "FIN_WAIT2": "FIN-WAIT-2",
    "TIME_WAIT": "TIME-WAIT",
    "CLOSE": "UNCONN",
    "CLOSE_WAIT": "CLOSE-WAIT",
    "LAST_ACK": "LAST-ACK",
    "LISTEN": "LISTEN",
    "CLOSING": "CLOSING",
}
# Every state but TIME-WAIT: a socket in TIME-WAIT has no buffers, and a busy machine has thousands.
LISTED_STATES = tuple(name for name in SS_STATES if name != "TIME_WAIT")
PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}


@cache
def event_names() -> tuple[str, ...]:
    """enum sock_event (sockstat.bpf.c), in order: ``rcvqueue_full``, ``exceed_send``, ..."""
    return tuple(enum_names(SockstatCollector.btf().enum("sock_event")).values())


# --- processes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    """A process that holds a socket open."""

    pid: int
    comm: str


def socket_holders() -> dict[int, list[Holder]]:
    """Socket inode -> the processes holding it open, from /proc/PID/fd (what ``ss -p`` does). A socket
    shared after fork (a listening socket of nginx's workers) has several; the lowest pid comes first."""
    import psutil

    holders: dict[int, list[Holder]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # exited, or a kernel thread
        inodes: dict[int, None] = {}
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = None
        if not inodes:
            continue
        # The name (psutil's: a comm cut at 15 characters completed from the command line) of the
        # processes holding sockets only: psutil.process_iter read every process's, and a look on an
        # idle machine of 77 processes took 4.8-5.6 ms instead of 1.8-2.1 (the health window takes
        # one every 10 s).
        try:
            holder = Holder(pid, psutil.Process(pid).name() or "?")
        except psutil.Error:
            holder = Holder(pid, "?")
        for inode in inodes:
            holders.setdefault(inode, []).append(holder)
    for found in holders.values():
        found.sort(key=lambda h: h.pid)
    return holders


# --- sockets ------------------------------------------------------------------------------------------
@dataclass
class SocketRow:
    """One socket at the end of an interval, with its buffer-full events during it."""

    netns: int
    netns_name: str
    proto: str  # tcp, udp (or the protocol of a socket only the BPF side saw)
    state: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    inode: int
    cgroup: int = 0  # cgroup v2 id of the socket (where it was created)
    recv_q: int = 0  # bytes not yet read (Recv-Q); LISTEN: connections waiting for accept()
    send_q: int = 0  # bytes not yet acknowledged (Send-Q); LISTEN: the backlog
    rmem_alloc: int = 0  # receive memory (skmem r), counted in buffer truesize
    rcvbuf: int = 0  # its limit (skmem rb)
    wmem_queued: int = 0  # send memory queued (skmem w)
    sndbuf: int = 0  # its limit (skmem tb)
    drops: int = 0  # the socket's own drop counter (skmem d), since it was created
    owners: list[Holder] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # buffer-full events in the interval (by BPF)
    in_diag: bool = True  # False: seen only by BPF (closed since, or not TCP/UDP)

    @property
    def listening(self) -> bool:
        return self.state == "LISTEN"

    @property
    def recv_pct(self) -> float:
        """Receive buffer saturation; for a listening socket, the accept queue against its backlog."""
        if self.listening:
            return 100.0 * self.recv_q / self.send_q if self.send_q else 0.0
        return 100.0 * self.rmem_alloc / self.rcvbuf if self.rcvbuf else 0.0

    @property
    def send_pct(self) -> float:
        if self.listening:
            return 0.0
        return 100.0 * self.wmem_queued / self.sndbuf if self.sndbuf else 0.0

    @property
    def saturation(self) -> float:
        return max(self.recv_pct, self.send_pct)

    @property
    def full_events(self) -> int:
        """Packets dropped for a full socket plus memory-limit refusals. A sock_rcvqueue_full is always
        followed by its packet's SOCKET_RCVBUFF drop, so it is shown on its own and not added in."""
        return sum(v for k, v in self.events.items() if k != "rcvqueue_full")

    @property
    def pid(self) -> int | None:
        return self.owners[0].pid if self.owners else None

    @property
    def comm(self) -> str:
        return self.owners[0].comm if self.owners else "-"

    @property
    def local(self) -> str:
        return endpoint(self.saddr, self.sport)

    @property
    def remote(self) -> str:
        return endpoint(self.daddr, self.dport)

    def who(self) -> str:
        """The socket for people: process, addresses, namespace."""
        proc = f"{self.comm}[{self.pid}]" if self.pid else "no process"
        ns = "" if self.netns_name == "host" else f" netns {self.netns_name}"
        return f"{proc} {self.proto} {self.local} -> {self.remote}{ns}"

    def to_dict(self) -> dict[str, Any]:
        counted = {name: self.events.get(name) if self.events else None for name in event_names()}
        return {
            "netns": self.netns,
            "netns_name": self.netns_name,
            "pid": self.pid,
            "comm": self.comm,
            "pids": [o.pid for o in self.owners],
            "proto": self.proto,
            "state": self.state,
            "saddr": self.saddr,
            "sport": self.sport,
            "daddr": self.daddr,
            "dport": self.dport,
            "inode": self.inode,
            "cgroup": self.cgroup,
            "recv_q": self.recv_q,
            "send_q": self.send_q,
            "rmem_alloc": self.rmem_alloc,
            "rcvbuf": self.rcvbuf,
            "recv_pct": round(self.recv_pct, 1),
            "wmem_queued": self.wmem_queued,
            "sndbuf": self.sndbuf,
            "send_pct": round(self.send_pct, 1),
            "drops": self.drops,
            "full_events": self.full_events,
            **counted,
        }


@cache
def row_schema() -> Schema:
    return Schema(
        "sockstat",
        (
            Field("netns", "int", label=True, doc="network namespace inode"),
            Field("netns_name", "str", label=True, doc="host, its ip netns name, or pid N"),
            Field("pid", "int", label=True, nullable=True, doc="the lowest pid holding the socket open"),
            COMM,
            Field("pids", "list", doc="every process holding it open"),
            Field("proto", "str", label=True),
            Field("state", "str", doc="as ss names it (ESTAB, LISTEN, UNCONN, ...)"),
            Field("saddr", "str", label=True),
            Field("sport", "int", label=True),
            Field("daddr", "str", label=True),
            Field("dport", "int", label=True),
            Field("inode", "int", label=True),
            Field("cgroup", "int", label=True, doc="cgroup v2 id the socket was created in (0: unknown)"),
            Field("recv_q", "int", "bytes", "not yet read (Recv-Q); LISTEN: connections waiting"),
            Field("send_q", "int", "bytes", "not yet acknowledged (Send-Q); LISTEN: the backlog"),
            Field("rmem_alloc", "int", "bytes", "receive memory (ss -m r)"),
            Field("rcvbuf", "int", "bytes", "its limit (rb)"),
            Field("recv_pct", "float", "%", "rmem_alloc / rcvbuf; LISTEN: accept queue / backlog"),
            Field("wmem_queued", "int", "bytes", "send memory queued (w)"),
            Field("sndbuf", "int", "bytes", "its limit (tb)"),
            Field("send_pct", "float", "%", "wmem_queued / sndbuf"),
            Field("drops", "int", doc="the socket's own drop counter (d), since it was created"),
            Field("full_events", "int", doc="buffer-full events in the interval (not rcvqueue_full)"),
            *(
                Field(name, "int", nullable=True, doc="in the interval; null: not counted")
                for name in event_names()
            ),
        ),
        doc="One socket at the end of an interval, with its buffer-full events during it.",
        interval=True,
    )


def diag_sockets(ns: diag.NetNamespace, protocols: tuple[str, ...]) -> list[SocketRow]:
    """Every TCP (but TIME-WAIT) and UDP socket of one namespace, IPv4 and IPv6, from sock_diag."""
    states = diag.state_mask(*LISTED_STATES)
    memory = diag.extensions("INET_DIAG_SKMEMINFO")
    listed = diag.sockets(ns, protocols, states, memory) or {}
    return [_diag_row(ns, proto, msg) for proto, messages in listed.items() for msg in messages]


def _diag_row(ns: diag.NetNamespace, proto: str, msg: diag.DiagMessage) -> SocketRow:
    mem = diag.skmeminfo(msg.attr("INET_DIAG_SKMEMINFO"))
    state = msg["idiag_state"]
    words = SS_STATES.get(state_name(state))
    return SocketRow(
        netns=ns.inode,
        netns_name=ns.name,
        proto=proto,
        state=words or (str(state) if proto == "tcp" else "-"),
        saddr=diag.unmapped(msg["idiag_src"]),
        sport=msg["idiag_sport"],
        daddr=diag.unmapped(msg["idiag_dst"]),
        dport=msg["idiag_dport"],
        inode=msg["idiag_inode"],
        cgroup=diag.cgroup_id(msg.attr("INET_DIAG_CGROUP_ID")),
        recv_q=msg["idiag_rqueue"],
        send_q=msg["idiag_wqueue"],
        rmem_alloc=mem.get("rmem_alloc", 0),
        rcvbuf=mem.get("rcvbuf", 0),
        wmem_queued=mem.get("wmem_queued", 0),
        sndbuf=mem.get("sndbuf", 0),
        drops=mem.get("drops", 0),
    )


SORTS = {
    "saturation": lambda r: (r.saturation, r.full_events),
    "recv": lambda r: (r.recv_pct, r.full_events),
    "send": lambda r: (r.send_pct, r.full_events),
    "events": lambda r: (r.full_events, r.saturation),
}


@dataclass(kw_only=True)
class SockstatConfig(Config):
    """Which sockets a sample holds, in which order. -p and --cgroup select by the processes holding a
    socket and the cgroup it was created in, in user space: the events fire in interrupt context."""

    protocols: tuple[str, ...] = ()  # only these (tcp, udp); empty: TCP and UDP, and any socket's events
    ports: tuple[int, ...] = ()  # only sockets with one of these local or remote ports
    min_pct: float = 0.0  # only sockets whose fuller buffer is at least this full (or that overflowed)
    listening: bool = True  # listening sockets too
    sort: str = "saturation"  # the order of a sample's rows (SORTS)
    bpf: bool = True  # count buffer-full events (else sock_diag only: no privilege to load programs)

    def __post_init__(self) -> None:
        for proto in self.protocols:
            if proto not in diag.PROTOCOLS:
                raise BpfscopeError(f"unknown protocol {proto!r}", hint="tcp or udp")
        if self.sort not in SORTS:
            raise BpfscopeError(f"sockstat cannot sort by {self.sort!r}", hint=", ".join(SORTS))

    def selects(self, row: SocketRow, cgroup: int) -> bool:
        """``cgroup``: the id of the configured cgroup (0: any)."""
        if self.protocols and row.proto not in self.protocols:
            return False
        if self.pid is not None and all(o.pid != self.pid for o in row.owners):
            return False
        # The socket's cgroup comes from sock_diag; a socket only BPF saw has none and is left out.
        if cgroup and row.cgroup != cgroup:
            return False
        if self.ports and row.sport not in self.ports and row.dport not in self.ports:
            return False
        if not self.listening and row.listening:
            return False
        return row.saturation >= self.min_pct or row.full_events > 0


@dataclass
class SocketSample(Sample):
    ts: float
    interval_s: float  # over which the events were counted
    rows: list[SocketRow]  # the selected sockets, by the configured sort
    namespaces: list[diag.NetNamespace]
    bpf: bool  # whether buffer-full events were counted

    @property
    def full_events(self) -> int:
        return sum(r.full_events for r in self.rows)

    def events_per_s(self) -> float:
        return self.full_events / self.interval_s if self.interval_s > 0 else 0.0

    def records(self) -> Iterator[dict[str, Any]]:
        schema = row_schema()
        for r in self.rows:
            yield schema.record({"ts": self.ts, "interval_s": self.interval_s, **r.to_dict()})


class SockstatCollector(BpfCollector[SockstatConfig]):
    """Each ``sample()`` lists every TCP and UDP socket of every network namespace with its queues and
    buffers now, and the buffer-full events counted since the previous sample (or ``start()``)::

        with SockstatCollector(SockstatConfig()) as sockets:
            sockets.open(); sockets.start()
            time.sleep(1)
            worst = sockets.sample().rows[0]   # the fullest

    Without ``bpf`` (not root, or no BPF) only sock_diag is read, and no events are counted.
    """

    name = "sockstat"
    bpf_object = "sockstat"
    requires = ("raw_tracepoint",)
    default_interval_s = 1.0
    loss_counters = {"events_dropped": ("map_full", "events not counted (too many sockets)")}

    def __init__(self, config: SockstatConfig) -> None:
        super().__init__(config)
        self.cgroup = config.task_filter()["bs_targ_cgroup"]  # the id of --cgroup (0: any)

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return (row_schema(),)

    def open(self) -> None:
        if self.config.bpf:
            super().open()

    def start(self) -> None:
        self.before = self._counters()[0]
        self.t0 = time.monotonic()

    def sample(self) -> SocketSample:
        counters, described = self._counters()
        now = time.monotonic()
        namespaces = diag.network_namespaces()
        protocols = self.config.protocols or ("tcp", "udp")
        rows = [row for ns in namespaces for row in diag_sockets(ns, protocols)]
        seen = {row.inode for row in rows}
        holders = socket_holders()
        for row in rows:
            row.owners = holders.get(row.inode, [])
            row.events = self._delta(row.inode, counters)
        # Sockets with events that sock_diag did not list: closed since, or of another kind (raw, ICMP).
        names = {ns.inode: ns.name for ns in namespaces}
        for inode, value in described.items():
            events = self._delta(inode, counters)
            if inode not in seen and any(events.values()):
                rows.append(_bpf_row(inode, value, events, names, holders))
        self._forget_closed(counters, seen, holders)
        selected = sorted(
            (r for r in rows if self.config.selects(r, self.cgroup)),
            key=SORTS[self.config.sort],
            reverse=True,
        )
        sample = SocketSample(time.time(), now - self.t0, selected, namespaces, self.obj is not None)
        self.before, self.t0 = counters, now
        return sample

    def losses(self) -> Losses:
        return super().losses() if self.obj is not None else Losses()

    def _counters(self) -> tuple[dict[int, dict[str, int]], dict[int, Any]]:
        """Cumulative counters per socket inode, and what BPF recorded about each socket."""
        if self.obj is None:
            return {}, {}
        keys, values = self.obj.maps["events"].items()
        names = event_names()
        counters: dict[int, dict[str, int]] = {}
        described: dict[int, Any] = {}
        for inode, value in zip(keys["ino"].tolist(), values, strict=True):
            counters[inode] = dict(zip(names, value["counts"].tolist(), strict=True))
            described[inode] = value
        return counters, described

    def _delta(self, inode: int, counters: dict[int, dict[str, int]]) -> dict[str, int]:
        if self.obj is None:
            return {}
        now = counters.get(inode, {})
        before = self.before.get(inode, {})
        return {name: now.get(name, 0) - before.get(name, 0) for name in event_names()}

    def _forget_closed(
        self, counters: dict[int, dict[str, int]], seen: set[int], holders: dict[int, list[Holder]]
    ) -> None:
        """Delete the counters of sockets that are gone and had no event this interval, so that the map
        does not fill over a long run; whatever they counted has been shown already."""
        if self.obj is None:
            return
        for inode, now in list(counters.items()):
            if inode == 0 or inode in seen or inode in holders or now != self.before.get(inode):
                continue
            self.obj.maps["events"].delete(inode)
            del counters[inode]


def _bpf_row(
    inode: int, value: Any, events: dict[str, int], names: dict[int, str], holders: dict[int, list[Holder]]
) -> SocketRow:
    """A socket only the BPF side saw, as it described it."""
    family = int(value["family"])
    netns = int(value["netns"])
    inet = family in (socket.AF_INET, socket.AF_INET6)
    return SocketRow(
        netns=netns,
        netns_name=names.get(netns, str(netns)),
        proto=PROTOCOL_NAMES.get(int(value["protocol"]), str(int(value["protocol"]))),
        state="-",
        saddr=address(family, value["saddr"]) if inet else "-",
        sport=int(value["sport"]),
        daddr=address(family, value["daddr"]) if inet else "-",
        dport=int(value["dport"]),
        inode=inode,
        owners=holders.get(inode, []),
        events=events,
        in_diag=False,
    )


# --- the view -----------------------------------------------------------------------------------------
COLUMNS = [
    ("NETNS", "netns_name"),
    ("PID", "pid"),
    ("COMM", "comm"),
    ("PROTO", "proto"),
    ("STATE", "state"),
    ("LOCAL", "local"),
    ("REMOTE", "remote"),
    ("RECV-Q", "recv_q"),
    ("RMEM", "rmem_alloc"),
    ("RCVBUF", "rcvbuf"),
    ("RECV%", "recv_pct"),
    ("SEND-Q", "send_q"),
    ("WMEM", "wmem_queued"),
    ("SNDBUF", "sndbuf"),
    ("SEND%", "send_pct"),
    ("FULL", "full_events"),
]


class SockstatView(View):
    top = True

    def __init__(self, sort: str, max_rows: int, noclear: bool) -> None:
        self.sort, self.max_rows, self.noclear = sort, max_rows, noclear
        self.start = time.monotonic()

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, SocketSample)
        term.heading(
            f"{time.monotonic() - self.start:.1f}s  {len(sample.rows)} sockets in {len(sample.namespaces)} "
            "network namespaces"
            + (f"; {sample.events_per_s():.1f} buffer-full events/s" if sample.bpf else "")
            + f"  sorted by {self.sort}"
        )
        table = [
            [round(v, 1) if isinstance(v := getattr(r, attr), float) else v for _, attr in COLUMNS]
            for r in sample.rows[: self.max_rows]
        ]
        if table:
            term.table([c for c, _ in COLUMNS], table)
        else:
            term.line("no socket selected")


EXAMPLES = """
\b
Examples:
  bpfscope sockstat                     # every second, the fullest sockets first
  bpfscope sockstat --min-pct 50 5      # sockets at least half full, every 5 seconds
  bpfscope sockstat -s events --proto udp   # UDP sockets that overflowed most
  bpfscope sockstat --port 5432 --json 1 3
  bpfscope sockstat -p 1234 -C 2        # one process's sockets, no screen clearing
"""


@click.command(name="sockstat", epilog=EXAMPLES)
@top_options(
    sorted(SORTS),
    "saturation",
    "Sort by the fuller buffer, the receive or send buffer, or buffer-full events.",
)
@click.option(
    "--proto",
    "protocols",
    type=click.Choice(sorted(diag.PROTOCOLS)),
    multiple=True,
    help="Only this protocol (repeatable; default tcp and udp).",
)
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, help="Local or remote port.")
@click.option(
    "--min-pct",
    type=click.FloatRange(0, 100),
    default=0.0,
    show_default=True,
    help="Only sockets whose fuller buffer is at least this full (or that overflowed).",
)
@click.option("--no-listen", is_flag=True, help="Leave out listening sockets.")
@common_options
def command(
    run: Run,
    sort: str,
    protocols: tuple[str, ...],
    ports: tuple[int, ...],
    min_pct: float,
    no_listen: bool,
    max_rows: int,
    noclear: bool,
) -> None:
    """Socket buffer saturation, per interval (1 s by default), like ss -tmi and top together.

    For every TCP (all states but TIME-WAIT) and UDP socket, IPv4 and IPv6, in every network namespace
    (the root one, those named by `ip netns`, and those of running processes, each once): state,
    addresses, owning process, Recv-Q and Send-Q in bytes, and saturation: receive memory against the
    receive buffer (RECV%) and queued send memory against the send buffer (SEND%), the limits the kernel
    enforces (ss -m: r/rb and w/tb). For a listening socket RECV% is its accept queue against the backlog.

    FULL counts the kernel's buffer-full events on the socket during the interval: packets dropped
    because the socket was full (receive buffer, protocol memory, backlog, closed window, accept queue)
    and sock_exceed_buf_limit (over tcp_mem/udp_mem or the memory cgroup's limit); --json also gives
    each kind, and sock_rcvqueue_full (the datagram drops of raw, ping and other sockets, counted once
    in FULL as their receive-buffer drop). ICMP and raw sockets appear only when they overflowed.

    -p and --cgroup select sockets by the process that holds them and the cgroup they were created in;
    they filter in user space, since the events fire in interrupt context.
    """
    config = run.config(
        SockstatConfig,
        protocols=protocols,
        ports=ports,
        min_pct=min_pct,
        listening=not no_listen,
        sort=sort,
    )
    view = SockstatView(sort, max_rows, noclear)
    run.run(SockstatCollector(config), view, "Tracing socket buffers... Ctrl-C to end.")
