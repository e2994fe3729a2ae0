"""The user-space side of include/net.bpf.h: connections and owners as the TCP tools show them.

A connection record (struct bs_conn, decoded from the object's BTF) carries family, addresses, ports and
the network namespace inode; an owner (struct bs_owner) the process that used the socket. Here they
become text (``10.0.0.1:80``, ``[fd00::1]:80``), TCP state names, netns names (from ``ip netns``), and
the -L/-D port filters' rodata.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bpfscope.errors import BpfscopeError

AF_INET = 2
AF_INET6 = 10

# include/net/tcp_states.h; the values are part of the kernel ABI (inet_sock_set_state reports them).
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}


def state_name(state: int) -> str:
    return TCP_STATES.get(state, f"STATE_{state}")


def address(family: int, raw: bytes) -> str:
    """An address from a bs_conn field (16 bytes; IPv4 in the first four). IPv4-mapped IPv6 addresses
    (a dual-stack socket talking IPv4) are shown as the IPv4 address, as ss does."""
    # numpy decodes __u8[16] as a bytes string, which drops trailing zero bytes: put them back.
    raw = bytes(raw).ljust(16, b"\0")
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    addr = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


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
    pid: int
    comm: str
    cgroup: int

    @classmethod
    def from_record(cls, owner: Any) -> Owner:
        """From a numpy record of struct bs_owner; pid 0 means not known (see net.bpf.h)."""
        return cls(int(owner["tgid"]), comm_text(owner["comm"]), int(owner["cgroup"]))

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "comm": self.comm, "cgroup": self.cgroup}


def comm_text(raw: Any) -> str:
    data = raw.tobytes() if hasattr(raw, "tobytes") else bytes(raw)
    return data.split(b"\0", 1)[0].decode(errors="replace")


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


def port_filters(local_port: int | None, remote_port: int | None) -> dict[str, int]:
    """The .rodata values for net.bpf.h's -L/-D filters."""
    for port, option in ((local_port, "-L"), (remote_port, "-D")):
        if port is not None and not 0 < port < 65536:
            raise BpfscopeError(f"{option} {port}: a port is 1 to 65535")
    return {"bs_targ_lport": local_port or 0, "bs_targ_rport": remote_port or 0}


def port_options(func: Any) -> Any:
    """-L/--lport and -D/--dport click options, passed as ``lport`` and ``dport``."""
    import click

    func = click.option("-D", "--dport", type=int, metavar="PORT", help="Only this remote port.")(func)
    return click.option("-L", "--lport", type=int, metavar="PORT", help="Only this local port.")(func)


class EventLines:
    """The per-event TCP tools' lines: every record has ts, owner and conn (net.bpf.h's types); a tool
    adds its own fields with :meth:`fields` (JSON fields, and the text after the addresses) and names
    their columns in ``columns``."""

    columns = ""

    def __init__(self, as_json: bool, start_ns: int) -> None:
        self.as_json = as_json
        self.start_ns = start_ns
        self.netns = NetnsNames()

    def header(self) -> str:
        return (
            f"{'TIME(s)':<10} {'PID':>7} {'COMM':<15} {'NETNS':<12} {'LADDR:LPORT':<26} {'RADDR:RPORT':<26} "
            + self.columns
        )

    def fields(self, record: Any) -> tuple[dict[str, Any], str]:
        raise NotImplementedError

    def lines(self, batch: Any) -> Iterator[tuple[int, str]]:
        for record in batch:
            ts = int(record["ts"])
            owner = Owner.from_record(record["owner"])
            conn = Conn.from_record(record["conn"])
            extra, text = self.fields(record)
            seconds = (ts - self.start_ns) / 1e9
            if self.as_json:
                fields = {"time": round(seconds, 6), **owner.to_dict(), **conn.to_dict()}
                yield ts, json.dumps({**fields, **extra})
                continue
            yield (
                ts,
                f"{seconds:<10.3f} {owner.pid or '-':>7} {owner.comm or '-':<15} "
                f"{self.netns(conn.netns):<12} {conn.local:<26} {conn.remote:<26} {text}",
            )
