"""sock_diag in every network namespace: the sockets ``ss`` lists, for sockstat (queues and buffers) and
tcpretrans -c (each connection's segments sent, from tcp_info).

sock_diag answers for the namespace its netlink socket was opened in, so each namespace is entered for
the moment it takes to open one (:func:`entered`). Namespaces are found as ``ip netns`` and ``ss -N``
find them: the root one, the named ones, and those of running processes (:func:`network_namespaces`).
The kernel's numbers (netlink attributes, SK_MEMINFO_* indices, TCP states) come from its own BTF.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bpfscope.domains.net.conn import tcp_state

NAMED_NETNS_DIR = Path("/var/run/netns")
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


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

    def add(path: str, name: str) -> None:
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return  # gone meanwhile
        if inode not in found:
            found[inode] = NetNamespace(inode, name, Path(path))

    # Kernel threads (kthreadd is pid 2) live in the initial namespace; pid 1's may be unreadable.
    for root in ("/proc/2/ns/net", "/proc/1/ns/net"):
        add(root, "host")
    add("/proc/self/ns/net", "own")
    if NAMED_NETNS_DIR.is_dir():
        for entry in sorted(os.listdir(NAMED_NETNS_DIR)):
            add(f"{NAMED_NETNS_DIR}/{entry}", entry)
    # One stat per process, with plain strings: 0.18 s for 27,000 processes, where pathlib took 0.52 s.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            add(f"/proc/{pid}/ns/net", f"pid {pid}")
    return list(found.values())


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    # nstype 0: whatever namespace the descriptor is (a network namespace, as opened here).
    if _libc.setns(fd, 0) != 0:
        raise OSError(ctypes.get_errno(), f"setns {what}")


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
            _setns(target, str(ns.path))
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, "back to our own network namespace")
    finally:
        os.close(own)


@cache
def _kernel_enum(member: str) -> dict[str, int]:
    from bpfscope.engine.btf import kernel_btf

    return dict(kernel_btf().enum_with(member))


def extensions(*attributes: str) -> int:
    """The idiag_ext bits that ask for these attributes (``INET_DIAG_INFO``): bit ``attribute - 1``."""
    values = _kernel_enum("INET_DIAG_INFO")
    return sum(1 << (values[name] - 1) for name in attributes)


def state_mask(*states: str) -> int:
    """The idiag_states bits of these TCP states (``ESTABLISHED``)."""
    return sum(1 << tcp_state(name) for name in states)


@cache
def skmeminfo_fields() -> tuple[str, ...]:
    """INET_DIAG_SKMEMINFO's u32 array, in order: ``rmem_alloc``, ``rcvbuf``, ... (SK_MEMINFO_*)."""
    members = sorted(_kernel_enum("SK_MEMINFO_RMEM_ALLOC").items(), key=lambda item: item[1])
    return tuple(name.removeprefix("SK_MEMINFO_").lower() for name, _ in members if name != "SK_MEMINFO_VARS")


def skmeminfo(value: str) -> dict[str, int]:
    """pyroute2 gives INET_DIAG_SKMEMINFO as hex bytes "00:01:..."; the kernel's u32 array in host order."""
    raw = bytes.fromhex(value.replace(":", ""))
    names = skmeminfo_fields()
    count = min(len(raw) // 4, len(names))
    return dict(zip(names, struct.unpack(f"={count}I", raw[: count * 4]), strict=False))


def unmapped(addr: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack socket talking IPv4) as the IPv4 address, as ss shows it."""
    if addr.startswith("::ffff:") and "." in addr:
        return addr[7:]
    return addr


# Within listings_shared(), each namespace's TCP sockets are listed once, in these states with these
# extensions, and each asker is given the states it asked for (an asker wanting more is listed apart).
# A listing request costs the kernel a walk of its whole TCP hash table, per family and per namespace
# (1.5 ms of the request's send here, with three sockets open), and when a health window closes the
# socket-buffer rule (sockstat: memory) and the retransmit rule (tcpretrans: tcp_info) each listed them.
SHARED_TCP_STATES = (
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
)
SHARED_EXTENSIONS = ("INET_DIAG_INFO", "INET_DIAG_SKMEMINFO")
_shared: dict[int, list[Any] | None] | None = None  # namespace inode -> its TCP listing


@contextmanager
def listings_shared() -> Iterator[None]:
    """Share each namespace's TCP listing among the askers of the block (the collectors sampled when a
    window opens or closes): what they are given is a moment older for the later ones, never more."""
    global _shared
    outer = _shared
    if outer is None:
        _shared = {}
    try:
        yield
    finally:
        _shared = outer


@cache
def _shared_request() -> tuple[int, int]:
    """The states and extensions a shared TCP listing asks for, as sock_diag's bits."""
    return state_mask(*SHARED_TCP_STATES), extensions(*SHARED_EXTENSIONS)


def sockets(
    ns: NetNamespace, protocols: Iterable[str], states: int, extensions: int
) -> dict[str, list[Any]] | None:
    """protocol -> the sock_diag messages (pyroute2's inet_diag_msg) of one namespace's sockets of that
    protocol, IPv4 and IPv6, in these states, with these extensions. None for a namespace that went
    away, or that this process may not enter (EPERM, EACCES): the others are still listed."""
    protocols = tuple(protocols)
    shared = _shared
    if shared is None or "tcp" not in protocols:
        return _listed(ns, protocols, states, extensions)
    wide, ask = _shared_request()
    if states & ~wide or extensions & ~ask:
        return _listed(ns, protocols, states, extensions)
    if ns.inode not in shared:
        listed = _listed(ns, ("tcp",), wide, ask)
        shared[ns.inode] = None if listed is None else listed["tcp"]
    tcp = shared[ns.inode]
    others = tuple(p for p in protocols if p != "tcp")
    rest = _listed(ns, others, states, extensions) if others else {}
    if tcp is None or rest is None:
        return None
    rest["tcp"] = [msg for msg in tcp if states >> msg["idiag_state"] & 1]
    return {proto: rest[proto] for proto in protocols}


def _listed(
    ns: NetNamespace, protocols: tuple[str, ...], states: int, extensions: int
) -> dict[str, list[Any]] | None:
    from pyroute2 import DiagSocket

    try:
        with entered(ns):
            diag = DiagSocket()
    except OSError:
        return None
    listed: dict[str, list[Any]] = {}
    with diag:
        diag.bind()
        for proto in protocols:
            listed[proto] = [
                msg
                for family in (socket.AF_INET, socket.AF_INET6)
                for msg in diag.get_sock_stats(
                    family=family, protocol=PROTOCOLS[proto], states=states, extensions=extensions
                )
            ]
    return listed
