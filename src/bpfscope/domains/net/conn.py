"""The user-space side of net.bpf.h: connections and owners as the TCP tools show them.

A connection record (struct bs_conn, decoded from the object's BTF) carries family, addresses, ports and
the network namespace inode; an owner (struct bs_owner) the process that used the socket. Here they
become text (``10.0.0.1:80``, ``[fd00::1]:80``), TCP state names (the kernel's own, from its BTF), netns
names (from ``ip netns``) and record fields; and here is what the four TCP tools share: their
configuration's port filters (:class:`ConnConfig`), their collector's base (:class:`ConnCollector`), the
decoding of their ring records (:func:`event_rows`) and the lines their per-event views print
(:class:`ConnEventView`).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample, wall_clock_offset_ns
from bpfscope.runtime.schema import CGROUP, COMM, PID, Field, btf_field
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.bpf import BpfObject
    from bpfscope.engine.btf import Btf
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses

# An IPv4 address mapped into IPv6 (a dual-stack socket talking IPv4): ::ffff:a.b.c.d.
_V4_MAPPED = bytes(10) + b"\xff\xff"


@cache
def tcp_states() -> dict[int, str]:
    """The kernel's TCP states, from its own BTF: value -> name (``ESTABLISHED``, ``SYN_SENT``, ...)."""
    from bpfscope.engine.btf import kernel_btf

    members = kernel_btf().enum_with("TCP_ESTABLISHED")
    return {value: name.removeprefix("TCP_") for name, value in members if name != "TCP_MAX_STATES"}


def state_name(state: int) -> str:
    return tcp_states().get(state, f"STATE_{state}")


def tcp_state(name: str) -> int:
    """A TCP state's value by its name (``LISTEN``)."""
    return next(value for value, known in tcp_states().items() if known == name)


# Addresses repeat (a server, its clients): under a churn of 10,000 connections a second, formatting each
# anew took 14% of tcpretrans -c's time (1.9 of 13.8 s profiled).
@lru_cache(maxsize=4096)
def address(family: int, raw: bytes) -> str:
    """An address from a bs_conn field (16 bytes; IPv4 in the first four). IPv4-mapped IPv6 addresses
    are shown as the IPv4 address, as ss does."""
    # numpy decodes __u8[16] as a bytes string, which drops trailing zero bytes: put them back.
    raw = bytes(raw).ljust(16, b"\0")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class Conn:
    """A connection as the tools print it."""

    saddr: str
    sport: int
    daddr: str
    dport: int
    netns: int

    @classmethod
    def from_record(cls, conn: Any) -> Conn:
        """From a numpy record of struct bs_conn."""
        family = int(conn["family"])
        return cls(
            address(family, conn["saddr"]),
            int(conn["sport"]),
            address(family, conn["daddr"]),
            int(conn["dport"]),
            int(conn["netns"]),
        )

    @property
    def local(self) -> str:
        return endpoint(self.saddr, self.sport)

    @property
    def remote(self) -> str:
        return endpoint(self.daddr, self.dport)

    def to_dict(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "saddr": self.saddr,
            "sport": self.sport,
            "daddr": self.daddr,
            "dport": self.dport,
        }


@dataclass(frozen=True)
class Owner:
    """The process that used a socket last; pid 0 when not known (see net.bpf.h)."""

    pid: int
    comm: str
    cgroup: int

    @classmethod
    def from_record(cls, owner: Any) -> Owner:
        """From a numpy record of struct bs_owner."""
        return cls(int(owner["tgid"]), comm_text(owner["comm"]), int(owner["cgroup"]))

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "cgroup": self.cgroup}


UNKNOWN_OWNER = Owner(0, "", 0)


def comm_text(raw: Any) -> str:
    data = raw.tobytes() if hasattr(raw, "tobytes") else bytes(raw)
    return data.split(b"\0", 1)[0].decode(errors="replace")


def owners(obj: BpfObject) -> dict[int, Owner]:
    """Socket cookie -> owner, as net.bpf.h's bs_owners map holds them now."""
    keys, values = obj.maps["bs_owners"].items()
    columns = zip(
        keys.tolist(),
        values["tgid"].tolist(),
        values["comm"].tolist(),
        values["cgroup"].tolist(),
        strict=True,
    )
    return {
        cookie: Owner(pid, comm.decode(errors="replace"), cgroup) for cookie, pid, comm, cgroup in columns
    }


def socket_owners_from_proc(leave_out: int | None = None) -> dict[int, Owner]:
    """Socket inode -> a process holding it (the first found), from every process's /proc/PID/fd: the
    owners of sockets opened before tracing started, for tools that learn owners at connect and accept
    only. ``leave_out``: a process left out with its children, as bs_task_is_self leaves bpfscope's.
    Processes that exit meanwhile, or whose fds cannot be read, are skipped."""
    found: dict[int, Owner] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            inodes = [int(link[8:-1]) for link in links if link.startswith("socket:[")]
            if not inodes:
                continue
            if leave_out is not None:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if leave_out in (pid, int(stat[stat.rindex(")") + 2 :].split()[1])):
                    continue
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            path = Path(f"/proc/{pid}/cgroup").read_text().splitlines()[-1].partition("::")[2]
            cgroup = os.stat(f"/sys/fs/cgroup{path}").st_ino if path else 0
        except (OSError, ValueError):
            continue
        owner = Owner(pid, comm, cgroup)
        for inode in inodes:
            found.setdefault(inode, owner)
    return found


def owners_and_conns(records: np.ndarray) -> list[tuple[Owner, Conn]]:
    """The owner and connection of each record with a struct bs_owner ``owner`` and a struct bs_conn
    ``conn`` (ring records, map rows); whole columns become Python lists first (much faster than one
    numpy scalar per field)."""
    owner, conn = records["owner"], records["conn"]
    columns = zip(
        owner["tgid"].tolist(),
        owner["comm"].tolist(),
        owner["cgroup"].tolist(),
        conn["netns"].tolist(),
        conn["family"].tolist(),
        conn["saddr"].tolist(),
        conn["sport"].tolist(),
        conn["daddr"].tolist(),
        conn["dport"].tolist(),
        strict=True,
    )
    return [
        (
            Owner(pid, comm.decode(errors="replace"), cgroup),
            Conn(address(family, saddr), sport, address(family, daddr), dport, netns),
        )
        for pid, comm, cgroup, netns, family, saddr, sport, daddr, dport in columns
    ]


# --- record fields ------------------------------------------------------------------------------------
OWNER_FIELDS = (replace(PID, doc="the socket's owner (tgid); 0 when not known"), COMM, CGROUP)


def conn_fields(btf: Btf) -> tuple[Field, ...]:
    """A connection's fields, typed from struct bs_conn where they are its numbers."""
    conn = btf.struct("bs_conn")
    return (
        btf_field("netns", conn.field("netns").type, label=True, doc="network namespace inode"),
        Field("saddr", "str", label=True, doc="local address"),
        btf_field("sport", conn.field("sport").type, label=True, doc="local port"),
        Field("daddr", "str", label=True, doc="remote address"),
        btf_field("dport", conn.field("dport").type, label=True, doc="remote port"),
    )


def state_field() -> Field:
    return Field("state", "enum", values=tuple(tcp_states().values()), doc="TCP state (the kernel's names)")


# --- network namespaces -------------------------------------------------------------------------------
def netns_inode(pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@cache
def host_netns() -> int:
    """The namespace bpfscope runs in (init's, usually; /proc/1 may not be readable in a container)."""
    return netns_inode()


def netns_names() -> dict[int, str]:
    """netns inode -> name, for the namespaces `ip netns add` created (bind mounts in /run/netns)."""
    names = {}
    run = Path("/run/netns")
    if run.is_dir():
        for entry in run.iterdir():
            try:
                names[entry.stat().st_ino] = entry.name
            except OSError:
                continue
    return names


class NetnsNames:
    """inode -> short label: "host" for bpfscope's own namespace, the `ip netns` name, else the inode."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, inode: int) -> str:
        if inode == host_netns():
            return "host"
        if inode not in self._names:
            self._names.update(netns_names())
        return self._names.get(inode, str(inode))


# --- configuration and collector ----------------------------------------------------------------------
def port_filters(lport: int | None, dport: int | None) -> dict[str, int]:
    """The .rodata values for net.bpf.h's --lport/--dport filters."""
    for port, option in ((lport, "--lport"), (dport, "--dport")):
        if port is not None and not 0 < port < 65536:
            raise BpfscopeError(f"{option} {port}: a port is 1 to 65535")
    return {"bs_targ_lport": lport or 0, "bs_targ_rport": dport or 0}


@dataclass(kw_only=True)
class ConnConfig(Config):
    """A TCP tool's configuration: -p and --cgroup select by the socket's owner; the ports select the
    connection."""

    lport: int | None = None  # only this local port (--lport)
    dport: int | None = None  # only this remote port (--dport)

    @cached_property
    def owner_filter(self) -> tuple[int, int]:
        """The -p and --cgroup targets (tgid, cgroup id; 0: any)."""
        targets = self.task_filter()
        return targets["bs_targ_tgid"], targets["bs_targ_cgroup"]

    def selects(self, owner: Owner, conn: Conn) -> bool:
        """The kernel's filters (bs_owner_selected, bs_conn_selected), for connections user space found
        itself. An unknown owner passes only when no task filter is set."""
        tgid, cgroup = self.owner_filter
        if (tgid or cgroup) and not owner.pid:
            return False
        if (tgid and owner.pid != tgid) or (cgroup and owner.cgroup != cgroup):
            return False
        return (not self.lport or conn.sport == self.lport) and (not self.dport or conn.dport == self.dport)


CC = TypeVar("CC", bound=ConnConfig)


class ConnCollector(BpfCollector[CC]):
    """A TCP tool's collector: the port filters beside the task filter; a per-event tool streams its
    ``events`` ring (:meth:`read_events`)."""

    # BTF tracepoints are BPF_PROG_TYPE_TRACING, which libbpf cannot probe alone: raw tracepoints stand
    # in; the owner programs at accept() are syscall tracepoints.
    requires = ("raw_tracepoint", "tracepoint", "ringbuf")

    def __init__(self, config: CC) -> None:
        super().__init__(config)
        self.seen = 0  # records streamed
        self.wall_offset_ns = 0

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), **port_filters(self.config.lport, self.config.dport)}

    def streams_events(self) -> bool:
        """Whether the tool sends a record per event (else it counts in maps)."""
        return True

    def attach(self) -> None:
        super().attach()
        self.wall_offset_ns = wall_clock_offset_ns()
        if self.streams_events():
            self.ring("events")

    def read_events(self) -> np.ndarray | None:
        batch = self.rings["events"].read()
        if not len(batch):
            return None
        self.seen += len(batch)
        return batch


def event_rows(events: np.ndarray, wall_offset_ns: int) -> list[dict[str, Any]]:
    """What every TCP ring record has (ts, owner, conn) as record fields."""
    return [
        {"ts": round((ts + wall_offset_ns) / 1e9, 6), **owner.to_dict(), **conn.to_dict()}
        for ts, (owner, conn) in zip(events["ts"].tolist(), owners_and_conns(events), strict=True)
    ]


class EventBatch(Sample):
    """Records that arrived since the previous drain; subclasses say what each adds (:meth:`rows`)."""

    def __init__(self, events: np.ndarray, wall_offset_ns: int) -> None:
        self.events = events
        self.wall_offset_ns = wall_offset_ns

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> float:  # type: ignore[override]
        return (int(self.events["ts"][-1]) + self.wall_offset_ns) / 1e9

    def rows(self) -> list[dict[str, Any]]:
        return event_rows(self.events, self.wall_offset_ns)


class ConnEventView(View):
    """The per-event TCP tools' lines: time since start, owner, namespace and addresses, then the tool's
    own columns (``columns`` names them, :meth:`text` fills them); ``what`` names the events counted in
    the summary."""

    columns = ""
    what = "events"

    def __init__(self) -> None:
        self.start = time.time()
        self.netns = NetnsNames()
        self.header = (
            f"{'TIME(s)':<10} {'PID':>7} {'COMM':<15} {'NETNS':<12} {'LADDR:LPORT':<26} {'RADDR:RPORT':<26} "
            + self.columns
        )

    def text(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, EventBatch)
        term.lines(
            [
                f"{r['ts'] - self.start:<10.3f} {r['pid'] or '-':>7} {r['comm'] or '-':<15} "
                f"{self.netns(r['netns']):<12} {endpoint(r['saddr'], r['sport']):<26} "
                f"{endpoint(r['daddr'], r['dport']):<26} {self.text(r)}"
                for r in sample.rows()
            ]
        )

    def summary(self, collector: Collector, losses: Losses) -> str:
        seen = getattr(collector, "seen", 0)
        return f"{collector.name}: {seen} {self.what} traced, {losses.text()}"
