"""sock_diag in every network namespace: the sockets ``ss`` lists, for sockstat (queues and buffers) and
tcpretrans -c (each connection's segments sent, from tcp_info).

sock_diag answers for the namespace its netlink socket was opened in, so each namespace is entered for
the moment it takes to open one (:func:`entered`) and read its socket counts: a family with no socket
there is not asked for (:func:`_may_hold`). Requests are built by pyroute2's message class, sent and
read with the socket module, and their replies decoded here as far as they are read
(:class:`DiagMessage`, at the offsets the kernel's BTF gives). Namespaces are found as ``ip netns`` and
``ss -N`` find them: the root one, the named ones, and those of running processes
(:func:`network_namespaces`).
The kernel's numbers (netlink attributes, SK_MEMINFO_* indices, TCP states) come from its own BTF.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bpfscope.domains.net.conn import tcp_state, tcp_states

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
    socket or a bind mount elsewhere keeps alive, with no process in it, is not found. Within
    :func:`listings_shared`, found once for the block's askers."""
    if _shared_namespaces is not None:
        if not _shared_namespaces:
            _shared_namespaces.extend(_find_namespaces())
        return list(_shared_namespaces)
    return _find_namespaces()


def _find_namespaces() -> list[NetNamespace]:
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


def skmeminfo(raw: bytes | None) -> dict[str, int]:
    """INET_DIAG_SKMEMINFO, the kernel's u32 array in host order, by name (empty when absent)."""
    if not raw:
        return {}
    names = skmeminfo_fields()
    count = min(len(raw) // 4, len(names))
    return dict(zip(names, struct.unpack_from(f"={count}I", raw), strict=False))


def cgroup_id(raw: bytes | None) -> int:
    """INET_DIAG_CGROUP_ID, a u64 in host order (0 when absent)."""
    return int.from_bytes(raw, sys.byteorder) if raw else 0


class TcpInfo:
    """INET_DIAG_INFO of a TCP socket (struct tcp_info), its fields read when asked, at the offsets the
    kernel's BTF gives; a field past what this kernel sent is a KeyError."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __getitem__(self, name: str) -> int:
        field = _tcp_info_fields()[name]
        end = field.offset + field.type.size
        if end > len(self.raw):
            raise KeyError(name)
        return field.type.decode(self.raw[field.offset : end])


def tcp_info(raw: bytes | None) -> TcpInfo | None:
    return TcpInfo(raw) if raw else None


@cache
def _tcp_info_fields() -> dict[str, Any]:
    """struct tcp_info's fields by name (engine.btf's Field: offset, type)."""
    from bpfscope.engine.btf import kernel_btf

    return {f.name: f for f in kernel_btf().struct("tcp_info").fields}


class DiagMessage:
    """One socket of a sock_diag dump: struct inet_diag_msg by its UAPI field names (``idiag_src`` and
    ``idiag_dst`` as text, ports in host order, ``idiag_cookie`` one number, as pyroute2 gives them)
    and its attributes' raw payloads by INET_DIAG_* name (:meth:`attr`; :func:`tcp_info`,
    :func:`skmeminfo` and :func:`cgroup_id` decode them). Decoded here rather than by pyroute2's message
    classes, which took about 90 us a socket, most of a window's listings under a busy mesh."""

    __slots__ = ("attrs", "fields")

    def __init__(self, fields: dict[str, Any], attrs: dict[int, bytes]) -> None:
        self.fields = fields
        self.attrs = attrs  # attribute type -> payload

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def attr(self, name: str) -> bytes | None:
        return self.attrs.get(_kernel_enum("INET_DIAG_INFO")[name])


@dataclass(frozen=True)
class _MsgLayout:
    head: struct.Struct  # struct inet_diag_msg, flat (engine.btf's Struct.unpacker)
    # family, state, sport, dport, src[4], dst[4], cookie[2], rqueue, wqueue, inode
    pick: operator.itemgetter[tuple[Any, ...]]
    size: int  # sizeof(struct inet_diag_msg): its attributes follow


@cache
def _msg_layout() -> _MsgLayout:
    from bpfscope.engine.btf import kernel_btf

    msg = kernel_btf().struct("inet_diag_msg")
    head, names = msg.unpacker()
    at = {name: i for i, name in enumerate(names)}
    wanted = (
        *("idiag_family", "idiag_state", "id.idiag_sport", "id.idiag_dport"),
        *(f"id.idiag_src[{i}]" for i in range(4)),
        *(f"id.idiag_dst[{i}]" for i in range(4)),
        *("id.idiag_cookie[0]", "id.idiag_cookie[1]", "idiag_rqueue", "idiag_wqueue", "idiag_inode"),
    )
    return _MsgLayout(head, operator.itemgetter(*(at[name] for name in wanted)), msg.size)


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _decode_diag(data: bytes, at: int, end: int) -> DiagMessage:
    """The inet_diag_msg at ``at`` (after its netlink header) and its attributes up to ``end``."""
    layout = _msg_layout()
    family, state, sport, dport, *words = layout.pick(layout.head.unpack_from(data, at))
    low, high, rqueue, wqueue, inode = words[8:]
    fields = {
        "idiag_family": family,
        "idiag_state": state,
        # Ports and addresses are in network order, unpacked as little-endian words: back to bytes.
        "idiag_sport": int.from_bytes(sport.to_bytes(2, "little"), "big"),
        "idiag_dport": int.from_bytes(dport.to_bytes(2, "little"), "big"),
        "idiag_src": _address(family, _WORDS.pack(*words[0:4])),
        "idiag_dst": _address(family, _WORDS.pack(*words[4:8])),
        "idiag_cookie": low | high << 32,
        "idiag_rqueue": rqueue,
        "idiag_wqueue": wqueue,
        "idiag_inode": inode,
    }
    attrs: dict[int, bytes] = {}
    at += layout.size
    while at + 4 <= end:  # struct rtattr: length (with its 4 bytes), type; payloads 4-byte aligned
        length, kind = _RTATTR.unpack_from(data, at)
        if length < 4 or at + length > end:
            break
        attrs[kind & _NLA_TYPE_MASK] = data[at + 4 : at + length]
        at += (length + 3) & ~3
    return DiagMessage(fields, attrs)


_WORDS = struct.Struct("<4I")
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_RTATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER


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
_shared: dict[int, list[DiagMessage] | None] | None = None  # namespace inode -> its TCP listing
# The namespaces found for the block (a stat of every process's: 0.5 ms for 73 processes here).
_shared_namespaces: list[NetNamespace] | None = None


@contextmanager
def listings_shared() -> Iterator[None]:
    """Share each namespace's TCP listing, and the list of namespaces, among the askers of the block
    (the collectors sampled when a window opens or closes): what they are given is a moment older for
    the later ones, never more."""
    global _shared, _shared_namespaces
    outer, outer_namespaces = _shared, _shared_namespaces
    if outer is None:
        _shared, _shared_namespaces = {}, []
    try:
        yield
    finally:
        _shared, _shared_namespaces = outer, outer_namespaces


@cache
def _shared_request() -> tuple[int, int]:
    """The states and extensions a shared TCP listing asks for, as sock_diag's bits."""
    return state_mask(*SHARED_TCP_STATES), extensions(*SHARED_EXTENSIONS)


def sockets(
    ns: NetNamespace, protocols: Iterable[str], states: int, extensions: int
) -> dict[str, list[DiagMessage]] | None:
    """protocol -> the sock_diag messages (:class:`DiagMessage`) of one namespace's sockets of that
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
) -> dict[str, list[DiagMessage]] | None:
    try:
        with entered(ns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            in_use = _in_use()
    except OSError:
        return None
    with sock:
        return {
            proto: [
                msg
                for family in (socket.AF_INET, socket.AF_INET6)
                if _may_hold(in_use, proto, family, states)
                for msg in _dump(sock, family, PROTOCOLS[proto], states, extensions)
            ]
            for proto in protocols
        }


def _in_use() -> dict[str, int]:
    """The current thread's namespace's socket counts from /proc's sockstat and sockstat6: ``TCP`` and
    ``TCP6`` sockets hashed (listening, connecting, connected: what a TCP dump walks to), ``UDP`` and
    ``UDP6`` sockets bound, ``tw`` TCP's TIME-WAIT of both families. Empty when unreadable."""
    counts: dict[str, int] = {}
    for name in ("sockstat", "sockstat6"):
        try:
            text = Path(f"/proc/thread-self/net/{name}").read_text()
        except OSError:
            return {}
        for line in text.splitlines():
            proto, _, fields = line.partition(":")
            words = fields.split()
            for key, value in zip(words[::2], words[1::2], strict=False):
                if key == "inuse":
                    counts[proto] = int(value)
                elif key == "tw" and proto == "TCP":
                    counts["tw"] = int(value)
    return counts


def _may_hold(in_use: dict[str, int], proto: str, family: int, states: int) -> bool:
    """Whether a dump of this protocol and family can list anything: a TCP dump walks the kernel's whole
    established hash table whatever it finds (about 1.1 ms here, 262,144 buckets), so a family with no
    socket in the namespace (most namespaces have no IPv6 ones) is not asked for. TIME-WAIT sockets are
    counted apart, and for both families at once; a state no count covers (TCP's bound-inactive) is
    always asked for."""
    counted = proto.upper() + ("6" if family == socket.AF_INET6 else "")
    if counted not in in_use:
        return True
    if proto == "tcp":
        uncounted, time_wait, syn_recv = _tcp_state_bits()
        if states & uncounted:
            return True
        if states & time_wait and in_use.get("tw", 1):
            return True
        # A connection an IPv6 listener takes from an IPv4 client is an IPv4 request until accepted.
        if states & syn_recv and family == socket.AF_INET and in_use.get("TCP6", 1):
            return True
    return in_use[counted] > 0


@cache
def _tcp_state_bits() -> tuple[int, int, int]:
    """idiag_states bits: of the states sockstat's counts do not cover (any but TIME-WAIT and the
    request sockets of SYN-RECV, which are counted with their listener), of TIME-WAIT, of SYN-RECV."""
    counted = {"ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE", "CLOSE_WAIT"}
    counted |= {"LAST_ACK", "LISTEN", "CLOSING", "TIME_WAIT", "NEW_SYN_RECV"}
    every = set(tcp_states().values())
    return state_mask(*(every - counted)), state_mask("TIME_WAIT"), state_mask("SYN_RECV", "NEW_SYN_RECV")


NETLINK_SOCK_DIAG = 4  # <linux/netlink.h>: a #define, absent from BTF
# A dump's replies come a datagram at a time, sized by the kernel to the reader's buffer up to 32 KiB
# (netlink_dump): a receive of 64 KiB takes a whole one, never a cut one.
RECV_BYTES = 1 << 16


def _dump(sock: socket.socket, family: int, protocol: int, states: int, extensions: int) -> list[DiagMessage]:
    """The sockets of one family and protocol in these states: a sock_diag dump on ``sock`` (a
    NETLINK_SOCK_DIAG socket). The request is built by pyroute2's class, sent and its replies read here
    with the socket module: pyroute2's DiagSocket runs an asyncio loop through each request, which took
    four fifths of a listing's user time (16.6 -> 3.7 ms for 7 namespaces)."""
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

    req = inet_diag_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    req["sdiag_family"] = family
    req["sdiag_protocol"] = protocol
    req["idiag_states"] = states
    req["idiag_ext"] = extensions
    req.encode()
    sock.send(req.data)
    out: list[DiagMessage] = []
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            raise OSError(errno.EPROTO, "sock_diag: the replies stopped before the dump's end")
        if _parse_replies(data, out):
            return out


def _parse_replies(data: bytes, out: list[DiagMessage]) -> bool:
    """The sockets of one datagram of a dump's replies, appended to ``out``; True at the dump's end."""
    from pyroute2.netlink import NLMSG_DONE, NLMSG_ERROR
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY

    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > len(data):
            raise OSError(errno.EPROTO, "sock_diag: a reply cut short")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:  # struct nlmsgerr: the negative errno after the header
            if length < _NLMSGHDR.size + 4:
                raise OSError(errno.EPROTO, "sock_diag: an error reply cut short")
            code = -struct.unpack_from("=i", data, at + _NLMSGHDR.size)[0]
            raise OSError(code, f"sock_diag: {os.strerror(code)}")
        if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _msg_layout().size:
            out.append(_decode_diag(data, at + _NLMSGHDR.size, at + length))
        at += (length + 3) & ~3
    return False
