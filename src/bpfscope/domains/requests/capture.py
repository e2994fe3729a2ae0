"""From the kernel's records (requests.bpf.c) to requests and responses: connections, their protocol,
their two directions' bytes, parsing and pairing.

A connection is one socket of one process seen through one source: its plain bytes (syscalls) or its
TLS plaintext (OpenSSL). A UDP socket that talks to many peers (a DNS server) is one connection per
peer. Each connection keeps a :class:`~bpfscope.domains.requests.protocols.stream.Stream` per direction,
its parser (chosen from its first bytes) and its pairing; :class:`Tracker` feeds them batch by batch and
returns the exchanges completed, with what it could not parse counted per reason.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from bpfscope.domains.net.conn import address
from bpfscope.domains.requests import protocols
from bpfscope.domains.requests.protocols.base import Exchange, Pairing, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream
from bpfscope.runtime.schema import enum_names

if TYPE_CHECKING:
    from bpfscope.engine.btf import Btf

# Connections kept at once, the least recently used forgotten first; and how long one may stay silent
# before it is forgotten (UDP has no close; a TCP close can be missed when the tool started after it).
MAX_CONNECTIONS = 16384
IDLE_S = 300.0
# Calls looked at before a connection whose bytes fit no protocol is left alone.
DETECT_TRIES = 4
# A TCP connection whose protocol is not known after DETECT_TRIES calls (met in the middle of a large
# body, or a protocol bpfscope does not parse) is probed: the kernel sends its calls' first bytes only,
# until one begins a message (256: the head of a request like GET /path, whole).
PROBE_BYTES = 256
# A connection not parsed (TLS ciphertext, a protocol not asked for: --protocol) has its calls sent with
# one byte of them: their sizes and positions keep conn_stats's bytes right, at a header's cost.
IGNORED_BYTES = 1
IPPROTO_UDP = 17


@dataclass(frozen=True)
class Kinds:
    """The kernel's enums (requests.bpf.c), by value."""

    kind: dict[int, str]
    dir: dict[int, str]
    source: dict[int, str]
    role: dict[int, str]

    @classmethod
    def of(cls, btf: Btf) -> Kinds:
        return cls(*(enum_names(btf.enum(f"bs_req_{name}")) for name in ("kind", "dir", "source", "role")))


def limits(btf: Btf) -> dict[str, int]:
    """enum bs_req_limits: capture_max (the most one record carries), tail (a long call's last bytes),
    skip_min (the fewest bytes of a body still to come for which its calls are skipped)."""
    return {name: value for value, name in enum_names(btf.enum("bs_req_limits")).items()}


@cache
def header_dtype(btf: Btf) -> np.dtype:
    """struct req_event without its payload: the head of every record."""
    event = btf.struct("req_event")
    full = event.dtype
    names = [n for n in full.names if n != "data"]
    return np.dtype(
        {
            "names": names,
            "formats": [full.fields[n][0] for n in names],
            "offsets": [full.fields[n][1] for n in names],
            "itemsize": full.fields["data"][1],
        }
    )


@dataclass(slots=True)
class Call:
    """One call's bytes: ``data`` its first, ``tail`` its last (``size`` in all: what lies between
    was not captured)."""

    ingress: bool
    data: bytes
    size: int
    start_ns: int
    end_ns: int
    tail: bytes
    pos: int | None  # the call's first byte's offset in its direction (TCP), or None


@dataclass(eq=False)
class Connection:
    """One socket of one process, through one source (syscalls or TLS), and one peer for UDP."""

    pid: int
    tid: int
    comm: str
    cgroup: int
    fd: int
    cookie: int
    udp: bool
    encrypted: bool
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    role: str  # client, server or unknown, as the kernel saw it open
    parser: Parser | None = None
    requests_ingress: bool = False  # requests are the bytes this process received (it is the server)
    ignored: str = ""  # why the bytes are not parsed: tls, unknown, a protocol not asked for
    undetected: list[Call] = field(default_factory=list)  # calls before the protocol was known
    streams: tuple[Stream, Stream] = field(default_factory=lambda: (Stream(False), Stream(True)))
    pairing: Pairing | None = None
    last_ns: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    opened_ns: int = 0
    counted_sent: int = 0  # bytes already folded into conn_stats (stats.py)
    counted_recv: int = 0
    # skip_until the kernel was told, per direction; and whether it sends only the calls' first bytes
    skips_told: list[int] = field(default_factory=lambda: [0, 0])
    probing: bool = False
    json_parts: tuple[str, str, str] | tuple[()] = ()  # its records' common JSON (encode.py)

    @property
    def protocol(self) -> str:
        return self.parser.protocol if self.parser is not None else self.ignored or "unknown"

    @property
    def trace_role(self) -> str:
        """client when this process sent the requests, server when it answered them."""
        if self.parser is None:
            return self.role
        return "server" if self.requests_ingress else "client"


@dataclass
class Counts:
    """What the tracker could not turn into exchanges, by reason (losses; see Tracker.losses)."""

    parse_errors: int = 0  # bytes that fit their protocol's grammar nowhere: the parser gave up on them
    truncated: int = 0  # heads cut by the capture limit
    unmatched: int = 0  # responses whose request was not seen (captured from mid-connection)
    unanswered: int = 0  # requests whose connection closed or was forgotten before the response
    undetected: int = 0  # connections whose bytes fit no protocol


class Connections:
    """Every connection's parsing state, fed call by call (:meth:`data`, :meth:`close`): the part of
    the tracker that knows protocols and nothing of the kernel's records (the unit tests feed it)."""

    def __init__(
        self,
        protocols_wanted: frozenset[str] | None = None,
        skip: Callable[[Connection, bool, int, int], None] | None = None,
        skip_min: int = 0,
    ) -> None:
        self.wanted = protocols_wanted
        # (connection, ingress, until, probe): tell the kernel not to send a direction's calls before
        # `until`, and to copy only `probe` bytes of those it sends (0, 0: everything again); asked when
        # at least skip_min bytes of a body are still to come (the kernel's BS_REQ_SKIP_MIN).
        self.skip = skip
        self.skip_min = skip_min
        self.connections: OrderedDict[tuple, Connection] = OrderedDict()
        # Each socket's connections (a cookie has several: its plain and TLS sources, the peers of a UDP
        # socket, processes sharing it), so that a close finds them without scanning every connection.
        self.by_cookie: dict[int, dict[tuple, None]] = {}  # keys in the order seen
        self.counts = Counts()
        self.closed: list[Connection] = []  # since the last take_closed(): for conn_stats
        self._last_sweep = time.monotonic()

    def take_closed(self) -> list[Connection]:
        closed, self.closed = self.closed, []
        return closed

    def add(self, key: tuple, connection: Connection) -> Connection:
        """A connection seen for the first time (the least recently used forgotten past the limit)."""
        self.connections[key] = connection
        self.by_cookie.setdefault(connection.cookie, {})[key] = None
        if len(self.connections) > MAX_CONNECTIONS:
            self._forget(self._pop(next(iter(self.connections))))
        return connection

    def _pop(self, key: tuple) -> Connection:
        conn = self.connections.pop(key)
        keys = self.by_cookie[conn.cookie]
        keys.pop(key, None)
        if not keys:
            del self.by_cookie[conn.cookie]
        return conn

    def data(
        self,
        conn: Connection,
        ingress: bool,
        data: bytes,
        size: int,
        start: int,
        end: int,
        tail: bytes,
        out: list[tuple[Connection, Exchange]],
        pos: int | None = None,
    ) -> None:
        """One call's bytes: ``data`` its first, ``tail`` its last, ``size`` in all, the first at
        offset ``pos`` of its direction (TCP)."""
        conn.last_ns = end
        # The kernel's position counts the calls it did not send too (a body skipped, a ring full).
        moved = size if pos is None or conn.udp else pos + size
        if ingress:
            conn.bytes_recv = max(conn.bytes_recv + size, moved)
        else:
            conn.bytes_sent = max(conn.bytes_sent + size, moved)
        if conn.ignored:
            return
        if conn.parser is not None and not conn.probing:
            # Most calls: a connection whose protocol is known, parsed at once (no Call).
            self._parse(conn, ingress, data, size, start, end, tail, None if conn.udp else pos, out)
            return
        call = Call(ingress, data, size, start, end, tail, None if conn.udp else pos)
        if conn.probing and conn.parser is not None and not self._resynchronised(conn, call):
            return
        if conn.parser is None:
            # Calls are kept until the protocol is known: a message may begin in a call too short to
            # tell (a DNS server reads the TCP length alone, then the message).
            conn.undetected = [*conn.undetected[-DETECT_TRIES + 1 :], call]
            probing = conn.probing
            if not self._choose(conn, ingress):
                if probing:
                    conn.streams[ingress].discard(size, call.pos)
                return
            calls, conn.undetected = conn.undetected, []
            if probing:
                # This call begins a message; the calls before were the rest of one. Whole calls again.
                conn.probing = False
                self._tell(conn, 0, 0)
                if not self._whole(conn, call):
                    return
                calls = [call]
        else:
            calls = [call]
        for one in calls:
            self._parse(
                conn, one.ingress, one.data, one.size, one.start_ns, one.end_ns, one.tail, one.pos, out
            )

    def _parse(
        self,
        conn: Connection,
        ingress: bool,
        data: bytes,
        size: int,
        start: int,
        end: int,
        tail: bytes,
        pos: int | None,
        out: list[tuple[Connection, Exchange]],
    ) -> None:
        parser, pairing = conn.parser, conn.pairing
        assert parser is not None and pairing is not None
        stream = conn.streams[ingress]
        stream.append(data, size, start, end, tail, pos)
        is_requests = ingress == conn.requests_ingress
        try:
            messages = parser.requests(stream) if is_requests else parser.responses(stream)
        except ParseError as exc:
            if protocols.is_tls(data) and not conn.encrypted:
                # A protocol that went over to TLS (PostgreSQL's SSLRequest, STARTTLS): its plaintext
                # comes through the TLS source, if the process uses OpenSSL.
                self._ignore(conn, "tls")
                return
            elif "captur" in str(exc):
                self.counts.truncated += 1
            else:
                self.counts.parse_errors += 1
            stream.clear()
            pairing.forget()
            self._tell_skip(conn, ingress, stream)
            if not conn.udp and not conn.ignored:
                # Until a call begins a message again (the rest of a body whose head was lost): the
                # kernel sends only the calls' first bytes.
                conn.probing = True
                self._tell(conn, 0, PROBE_BYTES)
            return
        self._tell_skip(conn, ingress, stream)
        for message in messages:
            if is_requests:
                pairing.request(message)
            else:
                request = pairing.response(message)
                if request is not None:
                    out.append((conn, Exchange(parser.protocol, request, message)))

    def _resynchronised(self, conn: Connection, call: Call) -> bool:
        """A probed connection of a known protocol: whether this call begins a message (then the kernel
        sends whole calls again); the calls before are only counted."""
        assert conn.parser is not None
        found = protocols.detect(call.data, conn.udp, (conn.local_port, conn.remote_port))
        stream = conn.streams[call.ingress]
        if found is None or found.protocol != conn.parser.protocol:
            stream.discard(call.size, call.pos)
            return False
        conn.probing = False
        self._tell(conn, 0, 0)
        return self._whole(conn, call)

    def _whole(self, conn: Connection, call: Call) -> bool:
        """Whether a probed call that begins a message was sent whole; if its head was cut at the probe,
        that message is lost (counted) and the next one is parsed."""
        if len(call.data) + len(call.tail) >= call.size:
            return True
        self.counts.truncated += 1
        conn.streams[call.ingress].discard(call.size, call.pos)
        return False

    def _tell_skip(self, conn: Connection, ingress: bool, stream: Stream) -> None:
        """Ask the kernel to keep a long body's calls (stream.skip_until), or to stop skipping."""
        told = conn.skips_told[ingress]
        wanted = stream.skip_until
        if self.skip is None or wanted == told or stream.end is None:
            return
        if wanted and wanted - stream.end < self.skip_min:
            return
        conn.skips_told[ingress] = wanted
        self.skip(conn, ingress, wanted, 0)

    def _tell(self, conn: Connection, until: int, probe: int) -> None:
        """The same skip for both directions of a TCP connection."""
        if self.skip is not None and not conn.udp:
            for ingress in (False, True):
                conn.skips_told[ingress] = until
                self.skip(conn, ingress, until, probe)

    def _ignore(self, conn: Connection, why: str) -> None:
        """Not to be parsed (TLS ciphertext, a protocol not asked for): the kernel stops sending it."""
        conn.ignored = why
        conn.undetected = []
        conn.probing = False
        self._tell(conn, 0, IGNORED_BYTES)

    def _choose(self, conn: Connection, ingress: bool) -> bool:
        """Pick the connection's protocol from the first bytes of the last call's direction; False while
        it cannot."""
        calls = [c for c in conn.undetected if c.ingress == ingress]
        # Probing, a message begins at a call's first byte (the calls before hold the rest of another).
        whole = not conn.probing and all(c.size == len(c.data) for c in calls)
        data = b"".join(c.data for c in calls) if whole else calls[-1].data
        if protocols.is_tls(data) and not conn.encrypted:
            self._ignore(conn, "tls")
            return False
        found = protocols.detect(data, conn.udp, (conn.local_port, conn.remote_port))
        if found is None:
            if len(conn.undetected) >= DETECT_TRIES and not conn.probing:
                self.counts.undetected += 1
                if conn.udp:
                    conn.ignored = "unknown"
                else:
                    conn.probing = True
                    self._tell(conn, 0, PROBE_BYTES)
            return False
        parser = found.parser()
        if self.wanted is not None and parser.protocol not in self.wanted:
            self._ignore(conn, parser.protocol)
            return False
        conn.parser = parser
        conn.pairing = Pairing(parser.keyed)
        if conn.role in ("client", "server") and not conn.udp:
            conn.requests_ingress = conn.role == "server"
        else:
            conn.requests_ingress = ingress == found.is_request
        return True

    # --- ends ---------------------------------------------------------------------------------------
    def close(self, cookie: int, end_ns: int, out: list[tuple[Connection, Exchange]]) -> None:
        for key in list(self.by_cookie.get(cookie, ())):
            conn = self._pop(key)
            if conn.parser is not None and conn.pairing is not None:
                for message in conn.parser.closed():
                    message.end_ns = message.end_ns or end_ns
                    request = conn.pairing.response(message)
                    if request is not None:
                        out.append((conn, Exchange(conn.parser.protocol, request, message)))
            self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        self.closed.append(conn)
        if conn.pairing is not None:
            self.counts.unanswered += len(conn.pairing.pending())
            self.counts.unmatched += conn.pairing.unmatched_responses
            self.counts.unanswered += conn.pairing.dropped_requests
            conn.pairing.unmatched_responses = conn.pairing.dropped_requests = 0

    def _sweep(self, out: list[tuple[Connection, Exchange]]) -> None:
        """Forget connections silent for IDLE_S (checked every few seconds)."""
        now = time.monotonic()
        if now - self._last_sweep < 5.0:
            return
        self._last_sweep = now
        horizon = time.monotonic_ns() - int(IDLE_S * 1e9)
        for key in [k for k, c in self.connections.items() if c.last_ns < horizon]:
            self._forget(self._pop(key))

    def flush(self) -> None:
        """The end of a run: count what is still waiting."""
        for conn in self.connections.values():
            if conn.pairing is not None:
                self.counts.unmatched += conn.pairing.unmatched_responses
                conn.pairing.unmatched_responses = 0

    def iter_connections(self) -> Iterator[Connection]:
        return iter(self.connections.values())


class Tracker(Connections):
    """:meth:`feed` takes a batch of ring records and returns the exchanges they completed."""

    def __init__(
        self,
        btf: Btf,
        wall_offset_ns: int,
        protocols_wanted: frozenset[str] | None = None,
        skip: Callable[[Connection, bool, int, int], None] | None = None,
    ) -> None:
        super().__init__(protocols_wanted, skip, limits(btf)["skip_min"])
        self.kinds = Kinds.of(btf)
        self.dtype = header_dtype(btf)
        self.head_size = self.dtype.itemsize
        self.ring = limits(btf)["tail"]
        self.wall_offset_ns = wall_offset_ns
        self.records = 0
        self._data_kind = next(v for v, n in self.kinds.kind.items() if n == "data")
        self._ingress = next(v for v, n in self.kinds.dir.items() if n == "ingress")
        self._tls = next(v for v, n in self.kinds.source.items() if n == "tls")

    # --- records ------------------------------------------------------------------------------------
    def feed(self, records: list[bytes]) -> list[tuple[Connection, Exchange]]:
        if not records:
            return []
        self.records += len(records)
        head_size = self.head_size
        heads = np.frombuffer(b"".join(r[:head_size] for r in records), dtype=self.dtype)
        conn = heads["conn"]
        columns = zip(
            heads["kind"].tolist(),
            heads["tgid"].tolist(),
            heads["cookie"].tolist(),
            heads["source"].tolist(),
            heads["protocol"].tolist(),
            conn["daddr"].tolist(),
            conn["dport"].tolist(),
            heads["dir"].tolist(),
            heads["size"].tolist(),
            heads["len"].tolist(),
            heads["tail"].tolist(),
            heads["start_ns"].tolist(),
            heads["end_ns"].tolist(),
            heads["pos"].tolist(),
            strict=True,
        )
        out: list[tuple[Connection, Exchange]] = []
        for i, row in enumerate(columns):
            kind, tgid, cookie, source, proto, daddr, dport, ingress, size, length, tail, start, end, pos = (
                row
            )
            udp = proto == IPPROTO_UDP
            tls = source == self._tls  # plain calls and sendfile are one stream, TLS plaintext another
            key = (tgid, cookie, tls, daddr, dport) if udp else (tgid, cookie, tls)
            if kind != self._data_kind:
                self.close(cookie, end, out)
                continue
            connection = self.connections.get(key)
            if connection is None:
                connection = self._open(key, heads[i], udp, tls)
            else:
                self.connections.move_to_end(key)
            data = records[i][head_size : head_size + length]
            tail_bytes = b""
            if tail:
                # The ring after the head: the call's byte x at x % ring (requests.bpf.c, ring_put).
                ring, data = data[-self.ring :], data[: -self.ring]
                first = (size - tail) % self.ring
                tail_bytes = (ring[first:] + ring[:first])[:tail]
            self.data(connection, ingress == self._ingress, data, size, start, end, tail_bytes, out, pos)
        self._sweep(out)
        return out

    def wall_s(self, mono_ns: int) -> float:
        # To the microsecond in integers: round(x / 1e9, 6) took 0.54 us a call, and a float of x / 1e9
        # has no room for today's nanoseconds (it made 546,900.478 us into 546,901).
        return (mono_ns + self.wall_offset_ns + 500) // 1000 / 1e6

    def _open(self, key: tuple, head: Any, udp: bool, encrypted: bool) -> Connection:
        conn = head["conn"]
        family = int(conn["family"])
        connection = Connection(
            pid=int(head["tgid"]),
            tid=int(head["tid"]),
            comm=bytes(head["comm"]).split(b"\0", 1)[0].decode(errors="replace"),
            cgroup=int(head["cgroup"]),
            fd=int(head["fd"]),
            cookie=int(head["cookie"]),
            udp=udp,
            encrypted=encrypted,
            local_addr=address(family, conn["saddr"]),
            local_port=int(conn["sport"]),
            remote_addr=address(family, conn["daddr"]),
            remote_port=int(conn["dport"]),
            role=self.kinds.role.get(int(head["role"]), "unknown"),
            opened_ns=int(head["start_ns"]),
        )
        return self.add(key, connection)
