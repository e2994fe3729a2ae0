"""bpfscope sockstat: how full each socket's buffers are, and how often they overflowed, like ss and top.

Two sources, joined by the socket's inode:

* sock_diag (netlink, through pyroute2), in every network namespace: per TCP and UDP socket its state,
  addresses, queues (what ``ss -tn`` shows as Recv-Q and Send-Q) and memory (``ss -m``'s skmem: receive
  memory against the receive buffer, queued send memory against the send buffer). Saturation is
  ``rmem_alloc / rcvbuf`` and ``wmem_queued / sndbuf`` in percent: the limits the kernel itself enforces.
  For a listening TCP socket it is the accept queue against its backlog.
* BPF (sockstat.bpf.c): buffer-full events per socket over the interval: sock_rcvqueue_full,
  sock_exceed_buf_limit, and packets dropped for a full socket (kfree_skb with reason SOCKET_RCVBUFF,
  PROTO_MEM, SOCKET_BACKLOG, TCP_ZEROWINDOW, TCP_LISTEN_OVERFLOW). They fire in softirq, where the current
  task is whoever was on the CPU, so the process comes from the socket inode found in /proc/PID/fd.

:class:`SocketSampler` is the Python API (the health check's "Socket buffers" rows use it);
:class:`SocketBufferProvider` is that health-check provider.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import click

from bpfscope.cli.tool import RunOptions, cgroup_id, ticks, tool_options
from bpfscope.domains.net import conn as net
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.errors import BpfscopeError
from bpfscope.health.check import Provider, Row, Threshold, Verdict
from bpfscope.runtime.sampler import Sampler
from bpfscope.sinks.top import Screen, top_options

REQUIRES = ("raw_tracepoint",)
DEFAULT_INTERVAL = 1.0
NAMED_NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000

# sock_diag: the INET_DIAG_SKMEMINFO attribute as an extension bit; SK_MEMINFO_* (linux/sock_diag.h).
INET_DIAG_SKMEMINFO_EXT = 1 << (7 - 1)
SK_MEMINFO_FIELDS = (
    "rmem_alloc",
    "rcvbuf",
    "wmem_alloc",
    "sndbuf",
    "fwd_alloc",
    "wmem_queued",
    "optmem",
    "backlog",
    "drops",
)
TCP_STATES = {
    1: "ESTAB",
    2: "SYN-SENT",
    3: "SYN-RECV",
    4: "FIN-WAIT-1",
    5: "FIN-WAIT-2",
    6: "TIME-WAIT",
    7: "UNCONN",
    8: "CLOSE-WAIT",
    9: "LAST-ACK",
    10: "LISTEN",
    11: "CLOSING",
}
TCP_LISTEN = 10
# Every state but TIME-WAIT: a socket in TIME-WAIT has no buffers, and a busy machine has thousands.
DIAG_STATES = ((1 << 12) - 1) & ~(1 << 6)
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}
# The BPF counters (struct sock_events), in the order shown.
EVENT_FIELDS = (
    "rcvqueue_full",
    "exceed_send",
    "exceed_recv",
    "drop_rcvbuf",
    "drop_mem",
    "drop_backlog",
    "drop_zerowin",
    "drop_listen",
)


# --- network namespaces -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetNamespace:
    inode: int
    name: str  # "host", a name from `ip netns`, "pid N" for a namespace only a process holds
    path: Path  # a file that opens it


def network_namespaces() -> list[NetNamespace]:
    """Every network namespace in use: the root one, the named ones (``ip netns``, under /var/run/netns)
    and those of running processes, once each (by the namespace's inode). A namespace that only a
    socket or a bind mount elsewhere keeps alive, with no process in it, is not found."""
    found: dict[int, NetNamespace] = {}

    def add(path: Path, name: str) -> None:
        try:
            inode = path.stat().st_ino
        except OSError:
            return  # gone meanwhile
        found.setdefault(inode, NetNamespace(inode, name, path))

    # Kernel threads (kthreadd is pid 2) live in the initial namespace; pid 1's may be unreadable.
    for root in ("/proc/2/ns/net", "/proc/1/ns/net"):
        add(Path(root), "host")
    add(Path("/proc/self/ns/net"), "own")
    if NAMED_NETNS_DIR.is_dir():
        for entry in sorted(NAMED_NETNS_DIR.iterdir()):
            add(entry, entry.name)
    for pid in _pids():
        add(Path(f"/proc/{pid}/ns/net"), f"pid {pid}")
    return list(found.values())


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def entered(ns: NetNamespace) -> Iterator[None]:
    """Run the block with this thread in ``ns``: sockets created there belong to it for their life."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(ns.path, os.O_RDONLY)
        except OSError as exc:
            raise FileNotFoundError(ns.path) from exc
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns.path}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to our own network namespace")
    finally:
        os.close(own)


# --- processes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    pid: int
    comm: str


def socket_owners() -> dict[int, list[Owner]]:
    """Socket inode -> the processes holding it open, from /proc/PID/fd (what ``ss -p`` does). A socket
    shared after fork (a listening socket of nginx's workers) has several; the lowest pid comes first."""
    import psutil

    owners: dict[int, list[Owner]] = {}
    for proc in psutil.process_iter(["name"]):
        fd_dir = f"/proc/{proc.pid}/fd"
        try:
            entries = list(os.scandir(fd_dir))
        except OSError:
            continue  # exited, or a kernel thread
        seen: set[int] = set()
        for entry in entries:
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode not in seen:
                    seen.add(inode)
                    owners.setdefault(inode, []).append(Owner(proc.pid, proc.info["name"] or "?"))
    for holders in owners.values():
        holders.sort(key=lambda o: o.pid)
    return owners


# --- sockets ----------------------------------------------------------------------------------------------


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
    owners: list[Owner] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # buffer-full events in the interval
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
        return net.endpoint(self.saddr, self.sport)

    @property
    def remote(self) -> str:
        return net.endpoint(self.daddr, self.dport)

    def who(self) -> str:
        """The socket for people: process, addresses, namespace."""
        proc = f"{self.comm}[{self.pid}]" if self.pid else "no process"
        ns = "" if self.netns_name == "host" else f" netns {self.netns_name}"
        return f"{proc} {self.proto} {self.local} -> {self.remote}{ns}"

    def to_dict(self) -> dict[str, Any]:
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
            **self.events,
        }


def _skmeminfo(value: str) -> dict[str, int]:
    """pyroute2 gives INET_DIAG_SKMEMINFO as hex bytes "00:01:..."; the kernel's u32 array in host order."""
    raw = bytes.fromhex(value.replace(":", ""))
    count = min(len(raw) // 4, len(SK_MEMINFO_FIELDS))
    return dict(zip(SK_MEMINFO_FIELDS, struct.unpack(f"={count}I", raw[: count * 4]), strict=False))


def diag_sockets(ns: NetNamespace, protocols: Iterable[str]) -> list[SocketRow]:
    """Every TCP (but TIME-WAIT) and UDP socket of one namespace, IPv4 and IPv6, from sock_diag."""
    from pyroute2 import DiagSocket

    try:
        with entered(ns):
            diag = DiagSocket()
    except OSError:
        # The namespace went away, or this process may not enter it (EPERM, EACCES): its sockets are
        # not listed, the others are.
        return []
    rows = []
    with diag:
        diag.bind()
        for proto in protocols:
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(
                    family=family,
                    protocol=PROTOCOLS[proto],
                    states=DIAG_STATES,
                    extensions=INET_DIAG_SKMEMINFO_EXT,
                ):
                    rows.append(_diag_row(ns, proto, msg))
    return rows


def _diag_row(ns: NetNamespace, proto: str, msg: Any) -> SocketRow:
    mem = _skmeminfo(msg.get_attr("INET_DIAG_SKMEMINFO") or "")
    state = msg["idiag_state"]
    return SocketRow(
        netns=ns.inode,
        netns_name=ns.name,
        proto=proto,
        state=TCP_STATES.get(state, str(state)) if proto == "tcp" else TCP_STATES.get(state, "-"),
        saddr=_unmapped(msg["idiag_src"]),
        sport=msg["idiag_sport"],
        daddr=_unmapped(msg["idiag_dst"]),
        dport=msg["idiag_dport"],
        inode=msg["idiag_inode"],
        cgroup=msg.get_attr("INET_DIAG_CGROUP_ID") or 0,
        recv_q=msg["idiag_rqueue"],
        send_q=msg["idiag_wqueue"],
        rmem_alloc=mem.get("rmem_alloc", 0),
        rcvbuf=mem.get("rcvbuf", 0),
        wmem_queued=mem.get("wmem_queued", 0),
        sndbuf=mem.get("sndbuf", 0),
        drops=mem.get("drops", 0),
    )


def _unmapped(addr: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack socket talking IPv4) as the IPv4 address, as ss shows it."""
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


@dataclass
class SocketSample:
    rows: list[SocketRow]  # every socket found, plus those only the BPF side saw this interval
    window_s: float
    namespaces: list[NetNamespace]
    bpf: bool  # whether buffer-full events were counted

    @property
    def full_events(self) -> int:
        return sum(r.full_events for r in self.rows)

    def events_per_s(self) -> float:
        return self.full_events / self.window_s if self.window_s > 0 else 0.0


class SocketSampler(Sampler):
    """Each ``sample()`` lists every TCP and UDP socket of every network namespace with its queues and
    buffers now, and the buffer-full events counted since the previous call (or ``start()``).

        with SocketSampler() as sampler:
            sampler.start()
            time.sleep(1)
            worst = max(sampler.sample().rows, key=lambda r: r.recv_pct)

    Without ``bpf`` (not root, or no BPF) only sock_diag is read, and no events are counted.
    """

    def __init__(self, protocols: Iterable[str] = ("tcp", "udp"), bpf: bool = True) -> None:
        self.protocols = tuple(protocols)
        for proto in self.protocols:
            if proto not in PROTOCOLS:
                raise BpfscopeError(f"unknown protocol {proto!r}", hint="tcp or udp")
        self.bpf = bpf
        self._obj: BpfObject | None = None
        self._prev_events: dict[int, dict[str, int]] = {}
        self._prev_t = time.monotonic()

    def start(self) -> SocketSampler:
        if self.bpf and self._obj is None:
            require(*REQUIRES)
            self._obj = BpfObject(tool_object("sockstat"))
            try:
                self._obj.attach()
            except BaseException:
                self.close()
                raise
        self._prev_events = self._read_events()[0]
        self._prev_t = time.monotonic()
        return self

    @property
    def obj(self) -> BpfObject:
        assert self._obj is not None, "no BPF object: started without bpf"
        return self._obj

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def losses(self) -> str:
        if self._obj is None:
            return "no events counted (no BPF)"
        return super().losses({"events_dropped": "events not counted (too many sockets)"})

    def _read_events(self) -> tuple[dict[int, dict[str, int]], dict[int, Any]]:
        """Cumulative counters per socket inode, and what BPF recorded about each socket."""
        if self._obj is None:
            return {}, {}
        keys, values = self._obj.maps["events"].items()
        counters: dict[int, dict[str, int]] = {}
        described: dict[int, Any] = {}
        for k, v in zip(keys, values, strict=True):
            inode = int(k["ino"])
            counters[inode] = {name: int(v[name]) for name in EVENT_FIELDS}
            described[inode] = v
        return counters, described

    def sample(self) -> SocketSample:
        counters, described = self._read_events()
        now = time.monotonic()
        window, self._prev_t = now - self._prev_t, now
        namespaces = network_namespaces()
        names = {ns.inode: ns.name for ns in namespaces}
        owners = socket_owners()
        rows: list[SocketRow] = []
        for ns in namespaces:
            rows += diag_sockets(ns, self.protocols)
        seen = set()
        for row in rows:
            seen.add(row.inode)
            row.owners = owners.get(row.inode, [])
            row.events = self._delta(row.inode, counters)
        # Sockets with events that sock_diag did not list: closed since, or of another kind (raw, ICMP).
        for inode, value in described.items():
            events = self._delta(inode, counters)
            if inode in seen or not any(events.values()):
                continue
            rows.append(self._bpf_row(inode, value, events, names, owners))
        self._forget_closed(counters, seen, owners)
        self._prev_events = counters
        return SocketSample(rows, window, namespaces, self._obj is not None)

    def _delta(self, inode: int, counters: dict[int, dict[str, int]]) -> dict[str, int]:
        now = counters.get(inode)
        if now is None:
            return {}
        before = self._prev_events.get(inode, {})
        return {name: now[name] - before.get(name, 0) for name in EVENT_FIELDS}

    @staticmethod
    def _bpf_row(
        inode: int, value: Any, events: dict[str, int], names: dict[int, str], owners: dict[int, list[Owner]]
    ) -> SocketRow:
        family = int(value["family"])
        netns = int(value["netns"])
        return SocketRow(
            netns=netns,
            netns_name=names.get(netns, str(netns)),
            proto=PROTOCOL_NAMES.get(int(value["protocol"]), str(int(value["protocol"]))),
            state="-",
            saddr=net.address(family, value["saddr"]) if family in (net.AF_INET, net.AF_INET6) else "-",
            sport=int(value["sport"]),
            daddr=net.address(family, value["daddr"]) if family in (net.AF_INET, net.AF_INET6) else "-",
            dport=int(value["dport"]),
            inode=inode,
            owners=owners.get(inode, []),
            events=events,
            in_diag=False,
        )

    def _forget_closed(
        self, counters: dict[int, dict[str, int]], seen: set[int], owners: dict[int, list[Owner]]
    ) -> None:
        """Delete the counters of sockets that are gone and had no event this interval, so that the map
        does not fill over a long run; whatever they counted has been shown already."""
        if self._obj is None:
            return
        import numpy as np

        for inode, now in list(counters.items()):
            if inode == 0 or inode in seen or inode in owners or now != self._prev_events.get(inode):
                continue
            key = np.zeros(1, dtype=self._obj.maps["events"].key_dtype)
            key["ino"] = inode
            self._obj.maps["events"].delete(key.tobytes())
            del counters[inode]


# --- selection and display ----------------------------------------------------------------------------

SORTS = {
    "saturation": lambda r: (r.saturation, r.full_events),
    "recv": lambda r: (r.recv_pct, r.full_events),
    "send": lambda r: (r.send_pct, r.full_events),
    "events": lambda r: (r.full_events, r.saturation),
}


@dataclass
class Selection:
    pid: int | None = None
    cgroup: int | None = None
    ports: tuple[int, ...] = ()
    min_pct: float = 0.0
    listening: bool = True
    protocols: tuple[str, ...] = ()

    def __call__(self, row: SocketRow) -> bool:
        if self.protocols and row.proto not in self.protocols:
            return False
        if self.pid is not None and all(o.pid != self.pid for o in row.owners):
            return False
        # The socket's cgroup comes from sock_diag; a socket only BPF saw has none and is left out.
        if self.cgroup is not None and row.cgroup != self.cgroup:
            return False
        if self.ports and row.sport not in self.ports and row.dport not in self.ports:
            return False
        if not self.listening and row.listening:
            return False
        return row.saturation >= self.min_pct or row.full_events > 0


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


def show(
    opts: RunOptions,
    screen: Screen,
    rows: list[SocketRow],
    sample: SocketSample,
    sort: str,
    max_rows: int,
    elapsed: float,
) -> None:
    rows = sorted(rows, key=SORTS[sort], reverse=True)
    if opts.as_json:
        for r in rows:
            opts.output.record({"interval": round(elapsed, 3), **r.to_dict()})
        return
    heading = (
        f"{elapsed:.1f}s  {len(rows)} sockets in {len(sample.namespaces)} network namespaces"
        + (f"; {sample.events_per_s():.1f} buffer-full events/s" if sample.bpf else "")
        + f"  sorted by {sort}"
    )
    table = [
        [round(v, 1) if isinstance(v := getattr(r, attr), float) else v for _, attr in COLUMNS]
        for r in rows[:max_rows]
    ]
    screen.frame(heading, [c for c, _ in COLUMNS], table, "no socket selected")


EXAMPLES = """
\b
Examples:
  bpfscope sockstat                     # every second, the fullest sockets first
  bpfscope sockstat --min-pct 50 5      # sockets at least half full, every 5 seconds
  bpfscope sockstat -s events -P udp    # UDP sockets that overflowed most
  bpfscope sockstat --port 5432 --json 1 3
  bpfscope sockstat -p 1234 -C 2        # one process's sockets, no screen clearing
"""


@click.command(name="sockstat", epilog=EXAMPLES)
@top_options(
    SORTS, "saturation", "Sort by the fuller buffer, the receive or send buffer, or buffer-full events."
)
@click.option(
    "-P",
    "--proto",
    "protocols",
    type=click.Choice(sorted(PROTOCOLS)),
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
@tool_options
def command(
    opts: RunOptions,
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
    selection = Selection(
        pid=opts.pid,
        cgroup=cgroup_id(opts.cgroup) if opts.cgroup else None,
        ports=ports,
        min_pct=min_pct,
        listening=not no_listen,
        protocols=protocols,
    )
    screen = Screen(opts, noclear)
    with SocketSampler(protocols or ("tcp", "udp")) as sampler:
        sampler.start()
        note = "Tracing socket buffers... Ctrl-C to end."
        for elapsed in ticks(opts, note, DEFAULT_INTERVAL):
            sample = sampler.sample()
            show(opts, screen, [r for r in sample.rows if selection(r)], sample, sort, max_rows, elapsed)
        opts.output.note(f"sockstat: {sampler.losses()}")


# --- health check -------------------------------------------------------------------------------------

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


def _pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


class SocketBufferProvider(Provider):
    """Health-check rows: the fullest receive buffer, send buffer and accept queue (each naming its
    socket and process), and the buffer-full events per second over the window.

    Queues are looked at when the window opens and when it closes. A socket seen both times is judged by
    the lesser of its two looks, so a queue that stayed full is a PROBLEM and one full for a moment (a
    bulk reader a little behind at one look) is not; a socket seen once (opened or closed within the
    window) can only warn. A queue full only in between is not seen (its events are)."""

    name = "Socket buffers"
    # Network namespaces (inodes) to judge; empty: all. A subclass narrows the check to some namespaces
    # (a container's, a test's own), as TcpProvider does.
    only_netns: ClassVar[frozenset[int]] = frozenset()

    def __init__(self) -> None:
        self._sampler: SocketSampler | None = None
        self._first: SocketSample | None = None

    def prepare(self) -> None:
        from bpfscope.health.check import _require_bpf

        self._sampler = SocketSampler(bpf=_require_bpf() is None)
        self._sampler.start()

    def start(self) -> None:
        assert self._sampler is not None
        self._first = self._sampler.sample()

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()

    def rows(self, window_s: float) -> list[Row]:
        assert self._sampler is not None and self._first is not None
        last = self._sampler.sample()
        if self.only_netns:
            for sample in (self._first, last):
                sample.rows = [r for r in sample.rows if r.netns in self.only_netns]
        looks = [self._first.rows, last.rows]
        connected = [[r for r in rows if not r.listening] for rows in looks]
        listening = [[r for r in rows if r.listening and r.proto == "tcp"] for rows in looks]
        res = self.name
        out = [
            self._worst_row(res, "recv", connected, lambda r: r.recv_pct, RECV_WARN_PCT, RECV_PROBLEM_PCT),
            self._worst_row(res, "send", connected, lambda r: r.send_pct, SEND_WARN_PCT, None),
            self._worst_row(
                res, "accept queue", listening, lambda r: r.recv_pct, ACCEPT_WARN_PCT, ACCEPT_PROBLEM_PCT
            ),
        ]
        out.append(self._events_row(res, last))
        return out

    @staticmethod
    def _worst_row(
        res: str,
        metric: str,
        looks: list[list[SocketRow]],
        pct: Any,
        warn: float,
        problem: float | None,
    ) -> Row:
        first, last = ({r.inode: r for r in rows} for rows in looks)
        # Per socket: the lesser of its two looks, and whether it was seen both times.
        sustained: list[tuple[float, bool, SocketRow]] = []
        for inode, row in {**first, **last}.items():
            both = inode in first and inode in last
            value = min(pct(first[inode]), pct(last[inode])) if both else pct(row)
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
        return Row(res, name, value, "%", _pct(value), verdict, rule, detail)

    @staticmethod
    def _events_row(res: str, sample: SocketSample) -> Row:
        limit = Threshold(EVENTS_WARN_PER_S, EVENTS_PROBLEM_PER_S, "/s")
        if not sample.bpf:
            return Row(res, "full events", None, "/s", "-", Verdict.UNKNOWN, "needs BPF", "not counted")
        # Over the sampler's own interval, in which the events were counted.
        rate = sample.events_per_s()
        detail = f"{sample.full_events} in {sample.window_s:.1f} s"
        worst = max(sample.rows, key=lambda r: r.full_events, default=None)
        if worst is not None and worst.full_events:
            kinds = ", ".join(f"{k} {v}" for k, v in worst.events.items() if v)
            detail += f"; most on {worst.who()} ({kinds})"
        verdict = limit.judge(rate)
        return Row(res, "full events", rate, "/s", f"{rate:.1f}/s", verdict, limit.describe(), detail)
