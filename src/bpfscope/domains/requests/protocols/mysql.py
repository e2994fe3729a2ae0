"""MySQL's and MariaDB's client/server protocol: text queries (COM_QUERY), prepared statements
(COM_STMT_PREPARE, EXECUTE, CLOSE, FETCH), the other commands, and the connection phase.

Every message travels in packets (a 3-byte length, a sequence id, the payload). A command is the
client's packet with sequence id 0; its response is the server's packets up to an OK, ERR or EOF that
ends it, read according to the command it answers: a result set (column count, column definitions,
rows, a terminator), a prepared statement's description, a plain OK. The parser keeps the commands sent
and not yet answered in order, as the server answers them; COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA and
COM_QUIT get no answer, so each is given an empty one in its turn (status NONE) to keep pairing in step.

The connection phase (the server's greeting, the client's handshake response, authentication) is one
exchange, ``Connect``, answered by the OK or ERR that ends it: connection set-up, not a request of the
workload. A capture that begins mid-connection starts at the next response's first packet (sequence id
1) and reads it without knowing its command; whether EOF packets are sent (CLIENT_DEPRECATE_EOF) is
taken from the handshake, else learned from the packets.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from bpfscope.domains.requests.protocols.base import MAX_PENDING, Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream

HEADER = 4
MAX_PAYLOAD = 0xFFFFFF  # a payload this long continues in the next packet
TEXT_KEPT = 4096  # bytes of a packet kept (a statement's text); the rest is counted, not read

# Command bytes -> their names as the server's process list shows them (SHOW PROCESSLIST's Command).
COMMANDS = {
    0x01: "Quit",
    0x02: "Init DB",
    0x03: "Query",
    0x04: "Field List",
    0x05: "Create DB",
    0x06: "Drop DB",
    0x07: "Refresh",
    0x08: "Shutdown",
    0x09: "Statistics",
    0x0A: "Processlist",
    0x0C: "Kill",
    0x0D: "Debug",
    0x0E: "Ping",
    0x11: "Change user",
    0x16: "Prepare",
    0x17: "Execute",
    0x18: "Long Data",
    0x19: "Close stmt",
    0x1A: "Reset stmt",
    0x1B: "Set option",
    0x1C: "Fetch",
    0x1F: "Reset connection",
    0xFA: "Bulk_execute",  # MariaDB
}
QUIT, INIT_DB, QUERY, FIELD_LIST, STATISTICS, CHANGE_USER = 0x01, 0x02, 0x03, 0x04, 0x09, 0x11
PREPARE, EXECUTE, LONG_DATA, CLOSE, FETCH, BULK_EXECUTE = 0x16, 0x17, 0x18, 0x19, 0x1C, 0xFA
CONNECT = -1  # the connection phase, not a command byte
NO_RESPONSE = frozenset({QUIT, LONG_DATA, CLOSE})
# Commands whose text is SQL (normalised in the records).
SQL = frozenset({"Query", "Prepare", "Execute", "Bulk_execute"})

# Capability flags.
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_QUERY_ATTRIBUTES = 1 << 27
# Server status flags.
MORE_RESULTS_EXISTS = 0x0008
CURSOR_EXISTS = 0x0040
# Prepared statements remembered per connection (id -> text).
STATEMENTS_KEPT = 4096
# A statement id that means "the statement just prepared" (MariaDB's pipelined prepare and execute).
LAST_PREPARED = 0xFFFFFFFF
# A row's first byte is never an EOF's or ERR's (but for a value of 2^24 bytes or more).
_NOT_ROWS = (b"\xfe", b"\xff", b"")
_CATALOG = b"\x03def"  # every column definition begins with its catalog, always "def"
# Where a result set's packets may be stepped over blind when the capture cut them.
_ROW_PHASES = frozenset({"columns", "after columns", "rows"})


def _header(data: bytes, at: int = 0) -> tuple[int, int]:
    return int.from_bytes(data[at : at + 3], "little"), data[at + 3]


def _ends_results(data: bytes) -> bool:
    """Whether these bytes end with the EOF (or OK) packet that ends a result set and the response
    (no more results said to follow)."""
    for length in range(5, 16):
        at = len(data) - HEADER - length
        if at < 0:
            return False
        if data[at : at + 3] != bytes((length, 0, 0)) or data[at + HEADER] != 0xFE:
            continue
        payload = data[at + HEADER :]
        if length == 5:
            status = int.from_bytes(payload[3:5], "little")
        else:
            try:
                _, i = lenenc(payload, 1)
                _, i = lenenc(payload, i)
            except ParseError:
                continue
            status = int.from_bytes(payload[i : i + 2], "little")
        return not status & MORE_RESULTS_EXISTS
    return False


def looks_like_greeting(data: bytes) -> bool:
    """The server's first packet: protocol version 10, then its version as text."""
    if len(data) < 12:
        return False
    length, seq = _header(data)
    if seq != 0 or data[4] != 10 or not 20 < length < 512:
        return False
    end = data.find(b"\0", 5, 5 + 64)
    return end > 5 and all(32 <= b < 127 for b in data[5:end]) and data[5:6].isdigit()


def looks_like_handshake_response(data: bytes) -> bool:
    """The client's handshake response (or SSL request): sequence id 1 (2 after a TLS request), 4.1
    capabilities, and 19 bytes of filler that must be zero (MariaDB keeps its own flags in the last 4)."""
    if len(data) < HEADER + 32:
        return False
    length, seq = _header(data)
    caps = int.from_bytes(data[4:8], "little")
    return (
        seq in (1, 2)
        and 32 <= length < 4096
        and bool(caps & CLIENT_PROTOCOL_41)
        and data[HEADER + 9 : HEADER + 28] == bytes(19)
    )


def looks_like_command(data: bytes) -> bool:
    """A command met mid-connection: one packet filling the call (or a statement longer than the
    capture), sequence id 0, a command byte and a payload that fits it."""
    if len(data) < HEADER + 1:
        return False
    length, seq = _header(data)
    if seq != 0 or length + HEADER < len(data):
        return False
    cmd, body = data[HEADER], data[HEADER + 1 :]
    if length + HEADER > len(data) and (cmd not in (QUERY, PREPARE) or len(data) < 64):
        return False  # only a long statement is met cut by the capture
    if cmd in (QUERY, PREPARE):
        text = body.lstrip()
        return bool(text) and (text[:1].isalpha() or text[:1] in (b"(", b"/", b"-")) and _printable(text[:64])
    if cmd == EXECUTE:
        return len(body) >= 9 and body[5:9] == b"\x01\0\0\0"  # iteration count, always 1
    if cmd in (QUIT, STATISTICS, 0x0E, 0x1F, 0x0D):
        return not body
    if cmd == INIT_DB:
        return 0 < len(body) <= 64 and _printable(body)
    if cmd in (CLOSE, 0x1A):
        return len(body) == 4
    return False


def looks_like_response(data: bytes) -> bool:
    """A response's first packet (sequence id 1), filling the call or followed by the next packet (2)."""
    if len(data) < HEADER + 1:
        return False
    length, seq = _header(data)
    if seq != 1 or length == 0:
        return False
    total = HEADER + length
    if total == len(data):
        return True
    return total + HEADER <= len(data) and data[total + 3] == 2


def _printable(data: bytes) -> bool:
    return all(b >= 32 or b in (9, 10, 13) for b in data)


def lenenc(data: bytes, at: int) -> tuple[int, int]:
    """A length-encoded integer at ``at``: (value, offset after it)."""
    if at >= len(data):
        raise ParseError("length cut by the capture")
    first = data[at]
    if first < 0xFB:
        return first, at + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None:
        raise ParseError("not a length-encoded integer")
    if at + 1 + width > len(data):
        raise ParseError("length cut by the capture")
    return int.from_bytes(data[at + 1 : at + 1 + width], "little"), at + 1 + width


def error_text(payload: bytes) -> tuple[int, str]:
    """An ERR packet's code and ``ERROR code (SQLSTATE): message``, as the mysql client prints it."""
    code = int.from_bytes(payload[1:3], "little")
    if payload[3:4] == b"#":
        state, message = payload[4:9].decode("ascii", "replace"), payload[9:]
        return code, f"ERROR {code} ({state}): {message.decode('utf-8', 'replace')}"
    return code, f"ERROR {code}: {payload[3:].decode('utf-8', 'replace')}"


_NEAR = re.compile(r"near '(.*)' at line", re.DOTALL)


def redact_error(error: str, normalize: Any) -> str:
    """A syntax error quotes the statement from where it failed: that part is normalised as the
    statement is (its literals never leave the process)."""
    return _NEAR.sub(lambda m: f"near '{normalize(m.group(1))}' at line", error)


@dataclass(slots=True)
class Packet:
    seq: int
    length: int  # payload bytes on the wire
    payload: bytes  # its first bytes: all of them unless cut by the capture or longer than TEXT_KEPT
    continued: bool  # the rest of a payload begun in the previous packet (not a packet of its own)


class _Packets:
    """Packets out of one direction; a packet longer than kept (or than captured) is read up to there and
    the rest stepped over."""

    def __init__(self) -> None:
        self.skip = 0
        self.more = False  # the last packet's payload goes on in the next one

    def next(self, stream: Stream) -> Packet | None:
        self.skip = stream.step_over(self.skip)
        if self.skip or not len(stream):
            return None
        if stream.at_gap():
            raise ParseError("packet header not captured")
        view = stream.view(TEXT_KEPT + HEADER)
        if len(view) < HEADER:
            if stream.gap_at(len(view)):
                raise ParseError("packet header not captured")
            return None
        length, seq = _header(view)
        total = HEADER + length
        if len(view) >= total:
            stream.consume(total)
            payload = view[HEADER:total]
        elif len(view) >= TEXT_KEPT + HEADER or stream.gap_at(len(view)):
            self.skip = stream.step_over(total)
            payload = view[HEADER:]
        else:
            return None
        packet = Packet(seq, length, payload, self.more)
        self.more = length == MAX_PAYLOAD
        return packet

    def run(self, stream: Stream) -> list[Packet]:
        """The whole packets at the stream's head that lie in its first call, read at once and consumed
        (the packets of a call share its times); empty where :meth:`next` must go one by one (a packet
        longer than kept, or than the call holds, the rest of one being stepped over). A query's answer
        is often six packets or more in one call."""
        segments = stream.segments
        if self.skip or self.more or not segments:
            return []
        data = segments[0].data
        at = start = stream.head
        end = len(data)
        out: list[Packet] = []
        while end - at >= HEADER:
            length = data[at] | data[at + 1] << 8 | data[at + 2] << 16
            total = HEADER + length
            if total > TEXT_KEPT + HEADER or at + total > end:
                break
            out.append(Packet(data[at + 3], length, data[at + HEADER : at + total], False))
            at += total
        if out:
            stream.consume(at - start)
        return out


class MysqlParser(Parser):
    protocol = "mysql"

    def __init__(self) -> None:
        self._client = _Packets()
        self._server = _Packets()
        # Commands sent and not yet answered, in order: (command, the request).
        self._pending: deque[tuple[int, Message]] = deque()
        self._request: Message | None = None  # a command whose payload goes on in the next packet
        self._last_request: Message | None = None  # where the client's continuation packets count
        self._response: Message | None = None
        self._command: int | None = None  # what the response being read answers (None: not known)
        self._phase = ""
        self._left = 0  # column or parameter definitions still to come
        self._columns = 0  # a prepared statement's columns, after its parameters
        self._statements: OrderedDict[int, str] = OrderedDict()
        self._last_prepared = ""
        self._server_caps: int | None = None
        self._client_caps: int | None = None
        self._tls = False  # a TLS request was sent: what follows is ciphertext
        self._learned_eof: bool | None = None  # CLIENT_DEPRECATE_EOF as the packets showed it

    @property
    def _deprecate_eof(self) -> bool | None:
        """Whether result sets and statement descriptions come without EOF packets; None: not known."""
        if self._client_caps is None:
            return self._learned_eof
        caps = self._client_caps & (self._server_caps if self._server_caps is not None else ~0)
        return bool(caps & CLIENT_DEPRECATE_EOF)

    def _reset(self) -> None:
        """After a parse error: the capture forgets the requests waiting, so do we."""
        self._pending.clear()
        self._request = self._response = self._last_request = None
        self._phase = ""

    # --- both directions ------------------------------------------------------------------------------
    def requests(self, stream: Stream) -> list[Message]:
        return self._read(stream, server=False)

    def responses(self, stream: Stream) -> list[Message]:
        return self._read(stream, server=True)

    def _read(self, stream: Stream, server: bool) -> list[Message]:
        done: list[Message] = []
        packets = self._server if server else self._client
        handle = self._server_packet if server else self._client_packet
        try:
            if server:
                self._answer_silent(done)
            while True:
                if server and self._blind(stream, done):
                    continue
                start_ns = stream.start_ns()
                batch = packets.run(stream)
                if not batch:
                    if self._tls and len(stream):
                        raise ParseError("TLS after the SSL request")
                    packet = packets.next(stream)
                    if packet is None:
                        return done
                    batch = [packet]
                for packet in batch:
                    if self._tls:
                        raise ParseError("TLS after the SSL request")
                    handle(packet, start_ns, stream, done)
        except ParseError:
            if server:
                self._server = _Packets()
            else:
                self._client = _Packets()
            self._reset()
            raise

    # --- the client's packets -------------------------------------------------------------------------
    def _client_packet(self, packet: Packet, start_ns: int, stream: Stream, done: list[Message]) -> None:
        size = HEADER + packet.length
        if packet.continued:
            if self._request is not None:
                self._request.size += size
                if not self._client.more:
                    self._sent(self._request, stream, done)
            elif self._last_request is not None:
                self._last_request.size += size
            return
        payload = packet.payload
        if packet.seq != 0:
            if packet.seq in (1, 2) and looks_like_handshake_response(
                packet.length.to_bytes(3, "little") + bytes([packet.seq]) + payload
            ):
                self._client_caps = int.from_bytes(payload[:4], "little")
                if packet.length == 32 and self._client_caps & CLIENT_SSL:
                    self._tls = True  # the handshake goes on inside TLS
                    return
                connect = Message(start_ns, 0, size, {"cmd": "Connect", "query": ""})
                self._pending_add(CONNECT, connect)
                self._sent(connect, stream, done)
            elif self._last_request is not None:
                # Authentication data, a LOCAL INFILE's file: part of the exchange under way.
                self._last_request.size += size
            else:
                raise ParseError("a packet out of step")  # the rest of something the capture missed
            return
        if not payload:
            raise ParseError("empty command")
        cmd = payload[0]
        name = COMMANDS.get(cmd)
        if name is None:
            raise ParseError("not a MySQL command")
        fields: dict[str, Any] = {"cmd": name, "query": ""}
        body = payload[1:]
        if cmd in (QUERY, PREPARE):
            if cmd == QUERY and self._client_caps and self._client_caps & CLIENT_QUERY_ATTRIBUTES:
                # MySQL 8's query attributes precede the text: none is the usual case (0, then 1 set).
                body = body[2:] if body[:2] == b"\x00\x01" else body
            fields["query"] = body.decode("utf-8", "replace")
            if cmd == PREPARE:
                self._last_prepared = fields["query"]
        elif cmd in (EXECUTE, CLOSE, LONG_DATA, FETCH, 0x1A, BULK_EXECUTE) and len(body) >= 4:
            stmt = int.from_bytes(body[:4], "little")
            fields["stmt_id"] = stmt
            text = self._last_prepared if stmt == LAST_PREPARED else self._statements.get(stmt, "")
            fields["query"] = text
            if cmd == CLOSE:
                self._statements.pop(stmt, None)
        elif cmd in (INIT_DB, FIELD_LIST):
            # A schema or table: names, not data.
            fields["query"] = body.split(b"\0", 1)[0].decode("utf-8", "replace")
        message = Message(start_ns, 0, size, fields)
        self._pending_add(cmd, message)
        if self._client.more:
            self._request = message
        else:
            self._sent(message, stream, done)

    def _pending_add(self, cmd: int, message: Message) -> None:
        self._pending.append((cmd, message))
        if len(self._pending) > MAX_PENDING:
            self._pending.popleft()

    def _sent(self, message: Message, stream: Stream, done: list[Message]) -> None:
        message.end_ns = stream.last_end_ns
        self._request = None
        self._last_request = message
        done.append(message)

    # --- the server's packets -------------------------------------------------------------------------
    def closed(self) -> list[Message]:
        """The commands that get no answer, sent last (COM_QUIT): answered by the close. A statement's
        description that waited for an EOF that was never to come ends where its last packet did."""
        done: list[Message] = []
        if self._response is not None and self._phase.endswith(" eof"):
            done.append(self._response)
            self._response = None
            self._phase = ""
            if self._pending:
                self._pending.popleft()
        self._answer_silent(done, at_close=True)
        return done

    def _answer_silent(self, done: list[Message], at_close: bool = False) -> None:
        while self._response is None and self._pending and self._pending[0][0] in NO_RESPONSE:
            _, request = self._pending.popleft()
            end = 0 if at_close and request.fields["cmd"] == "Quit" else request.end_ns
            done.append(Message(request.end_ns, end, 0, {"status": "NONE", "error": "", "rows": 0}))

    def _server_packet(self, packet: Packet, start_ns: int, stream: Stream, done: list[Message]) -> None:
        response = self._response
        if (
            response is not None
            and self._phase == "rows"
            and packet.payload[:1] not in _NOT_ROWS
            and not packet.continued
        ):
            # A row (most packets of a result set): counted here, without the steps of the others.
            response.fields["rows"] += 1
            response.size += HEADER + packet.length
            response.end_ns = stream.last_end_ns
            return
        if packet.continued:
            if self._response is not None:
                self._response.size += HEADER + packet.length
                self._response.end_ns = stream.last_end_ns
            return
        if self._response is None:
            if not self._pending and packet.seq == 0 and packet.payload[:1] == b"\x0a":
                self._greeting(packet.payload)
                return
            self._command = self._pending[0][0] if self._pending else None
            if packet.seq != 1 and self._command != CONNECT:
                # Every response begins at sequence id 1: this is the rest of one whose beginning the
                # capture did not see (or garbage); the capture resynchronises at a call that begins one.
                raise ParseError("a response out of step")
            self._response = Message(start_ns, 0, 0, {"status": "OK", "error": "", "rows": 0, "columns": 0})
            self._phase = "first"
        outcome = self._step(packet)
        response = self._response
        assert response is not None
        if outcome == "before":
            # The response ended with the packet before this one (learned only now): this one begins
            # the next response.
            self._finish(done)
            self._server_packet(packet, start_ns, stream, done)
            return
        response.size += HEADER + packet.length
        response.end_ns = stream.last_end_ns
        if outcome == "end":
            self._finish(done)

    def _blind(self, stream: Stream, done: list[Message]) -> bool:
        """A result set whose next packet was not captured (rows longer than the capture): where its
        packets begin is lost, so every byte until its end is the result's, and its end is a call that
        ends with the terminator (the kernel captures each call's last bytes too). Its size stays
        exact; its rows are those before the cut."""
        response = self._response
        if response is None or self._server.skip or not len(stream):
            return False
        if self._phase != "blind" and not (self._phase in _ROW_PHASES and stream.at_gap()):
            return False
        if len(self._pending) > 1:
            # The client sent its next command: the end went by uncaptured (a call lost), and where the
            # next response begins is not known either.
            raise ParseError("a result set's end not captured")
        last = stream.segments[-1]
        ended = not last.missing and _ends_results(last.data)
        response.size += stream.consume(len(stream))
        response.end_ns = stream.last_end_ns
        response.fields["cut"] = True
        self._server.more = False
        self._phase = "blind"
        if ended:
            self._finish(done)
        return True

    def _finish(self, done: list[Message]) -> None:
        assert self._response is not None
        done.append(self._response)
        self._response = None
        self._phase = ""
        if self._command is not None and self._pending:
            self._pending.popleft()
        self._answer_silent(done)

    def _greeting(self, payload: bytes) -> None:
        end = payload.find(b"\0", 1)
        at = end + 1 + 4 + 8 + 1  # connection id, first part of the scramble, filler
        if end < 0 or len(payload) < at + 7:
            return
        low = int.from_bytes(payload[at : at + 2], "little")
        high = int.from_bytes(payload[at + 5 : at + 7], "little")
        self._server_caps = low | high << 16

    def _step(self, packet: Packet) -> str:
        """One packet of the response under way: ``more`` (the response goes on), ``end`` (this
        packet ends it) or ``before`` (it ended with the previous packet)."""
        fields = self._response.fields  # type: ignore[union-attr]
        p = packet.payload
        first = p[0] if p else -1
        # An EOF, or an OK in its place (CLIENT_DEPRECATE_EOF). A row may begin with 0xFE only for a value
        # of 2^24 bytes or more, whose packet is a full one.
        terminator = first == 0xFE and packet.length < MAX_PAYLOAD
        phase, cmd = self._phase, self._command
        if first == 0xFF:
            code, text = error_text(p)
            if code == 0xFFFF:
                return "more"  # MariaDB's progress report, not an error
            fields["status"], fields["error"] = "ERR", text
            return "end"
        if phase == "first":
            if cmd in (CONNECT, CHANGE_USER):
                return "end" if first == 0 else "more"  # an auth switch or more auth data before the OK
            if cmd == STATISTICS:
                fields["info"] = p.decode("utf-8", "replace")
                return "end"
            if first == 0 and cmd == PREPARE:
                return self._prepared(p)
            if cmd == FETCH and not terminator:
                # Rows of a cursor (binary rows begin with 0, as an OK would), up to an EOF.
                fields["rows"] += 1
                self._phase = "rows"
                return "more"
            if first == 0 or terminator:
                return self._results_end(p, packet.length)
            if first == 0xFB:
                self._phase = "infile"  # the client sends a file, the server says OK
                return "more"
            if cmd == FIELD_LIST:
                self._phase = "definitions"
                return "more"
            count, at = lenenc(p, 0)
            if count == 0:
                raise ParseError("a result set of no column")
            fields["columns"] = count
            # MariaDB's cached metadata and MySQL's optional metadata: a byte saying whether the column
            # definitions follow.
            self._left = 0 if p[at : at + 1] == b"\0" else count
            self._phase = "columns" if self._left else "after columns"
            return "more"
        if phase in ("columns", "parameters", "statement columns"):
            if len(p) >= 4 and not p.startswith(_CATALOG):
                raise ParseError("not a column definition")
            self._left -= 1
            if self._left > 0:
                return "more"
            if phase == "columns":
                self._phase = "after columns"
                return "more"
            return self._definitions_done(phase)
        if phase == "after columns":
            if terminator and packet.length <= 5:
                self._learned_eof = False
                if int.from_bytes(p[3:5], "little") & CURSOR_EXISTS:
                    return "end"  # rows come with COM_STMT_FETCH
                self._phase = "rows"
                return "more"
            if terminator:
                return self._results_end(p, packet.length)
            self._learned_eof = True
            fields["rows"] += 1
            self._phase = "rows"
            return "more"
        if phase == "rows":
            if terminator:
                return self._results_end(p, packet.length)
            fields["rows"] += 1
            return "more"
        if phase in ("parameters eof", "statement columns eof"):
            if terminator:
                self._learned_eof = False
                if phase == "parameters eof" and self._columns:
                    self._left, self._phase = self._columns, "statement columns"
                    return "more"
                return "end"
            self._learned_eof = True
            if phase == "parameters eof" and self._columns:
                # No EOF: this packet is the first column's definition.
                self._left, self._phase = self._columns, "statement columns"
                return self._step(packet)
            return "before"
        if phase == "definitions":
            return "end" if terminator else "more"
        if phase == "infile":
            return "end" if first == 0 else "more"
        raise ParseError(f"no phase {phase}")

    def _prepared(self, p: bytes) -> str:
        """COM_STMT_PREPARE's OK: the statement's id (its text remembered for its executions), then its
        parameters' and columns' definitions."""
        if len(p) < 9:
            raise ParseError("statement description cut by the capture")
        stmt = int.from_bytes(p[1:5], "little")
        columns, params = int.from_bytes(p[5:7], "little"), int.from_bytes(p[7:9], "little")
        if self._pending and self._pending[0][0] == PREPARE:
            self._statements[stmt] = self._pending[0][1].fields["query"]
            while len(self._statements) > STATEMENTS_KEPT:
                self._statements.popitem(last=False)
        self._response.fields["columns"] = columns  # type: ignore[union-attr]
        self._columns = columns
        if params:
            self._left, self._phase = params, "parameters"
            return "more"
        if columns:
            self._left, self._phase = columns, "statement columns"
            return "more"
        return "end"

    def _definitions_done(self, phase: str) -> str:
        """A prepared statement's parameters or columns are described: an EOF follows unless the
        connection deprecated it; when that is not known, the next packet tells."""
        eof = self._deprecate_eof
        if eof is None or eof is False:
            self._phase = "parameters eof" if phase == "parameters" else "statement columns eof"
            return "more"
        if phase == "parameters" and self._columns:
            self._left, self._phase = self._columns, "statement columns"
            return "more"
        return "end"

    def _results_end(self, p: bytes, length: int) -> str:
        """An OK or EOF ending a result (or being the whole response): another result follows when the
        server says so (multi-statements, stored procedures)."""
        if p[:1] == b"\xfe" and length <= 5:
            status = int.from_bytes(p[3:5], "little")
        else:
            try:
                _, at = lenenc(p, 1)  # affected rows
                _, at = lenenc(p, at)  # last insert id
            except ParseError:
                return "end"
            status = int.from_bytes(p[at : at + 2], "little")
        if status & MORE_RESULTS_EXISTS:
            self._phase = "first"
            return "more"
        return "end"
