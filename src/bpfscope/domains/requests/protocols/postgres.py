"""PostgreSQL's frontend/backend protocol (version 3): the simple query protocol (Query) and the
extended one (Parse, Bind, Describe, Execute, Sync), errors, and the start-up and SSL negotiation.

A request is the client's messages up to a Query or a Sync; its response, the server's up to
ReadyForQuery ('Z'), which the server sends exactly once for each (pipelined extended queries are
answered in order). A statement prepared once and executed many times (pgbench -M prepared) is named
by the text its Parse gave it, remembered per connection.
"""

from __future__ import annotations

import struct

from bpfscope.domains.requests.protocols.base import Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
FRONTEND = frozenset(b"QPBDESCHXpFdcf")
BACKEND = frozenset(b"RSKZTDCEN12nstIAGHWVcdv")
# A message longer than this is not waited for whole: its head is read, the rest stepped over.
MAX_MESSAGE = 1 << 30
TEXT_KEPT = 4096
_LENGTH = struct.Struct(">i")
_SSL_ANSWER, _READY, _DATA_ROW, _COMPLETE, _ERROR = b"sZDCE"


def looks_like_startup(data: bytes) -> bool:
    if len(data) < 8:
        return False
    length, code = struct.unpack_from(">ii", data)
    return (code == PROTOCOL_3 and 8 < length < 10000) or (
        length == 8 and code in (SSL_REQUEST, GSSENC_REQUEST)
    )


def looks_like_frontend(data: bytes) -> bool:
    """A Query or Parse message (mid-connection): its type, a length that fits, then the end of the
    call or the next message's type."""
    if len(data) < 6 or data[0] not in b"QP":
        return False
    (length,) = struct.unpack_from(">i", data, 1)
    return _framed(data, length, FRONTEND)


def looks_like_backend(data: bytes) -> bool:
    if len(data) < 5 or data[0] not in BACKEND:
        return False
    (length,) = struct.unpack_from(">i", data, 1)
    return _framed(data, length, BACKEND)


def _framed(data: bytes, length: int, types: frozenset[int]) -> bool:
    if length < 4:
        return False
    if length + 1 == len(data):
        return True
    return length + 1 < len(data) and data[length + 1] in types


def _cstring(data: bytes, at: int = 0) -> tuple[str, int]:
    end = data.find(b"\0", at)
    if end < 0:
        return data[at:].decode("utf-8", "replace"), len(data)
    return data[at:end].decode("utf-8", "replace"), end + 1


class _Messages:
    """Typed messages out of one direction: (type, the message's first bytes, its length)."""

    def __init__(self, startup: bool) -> None:
        self.startup = startup  # the next message has no type byte
        self.skip = 0  # bytes of a long message still to step over
        self.one_byte = False  # the answer to an SSL or GSS request: one byte, no frame

    def next(self, stream: Stream) -> tuple[int, bytes] | None:
        self.skip = stream.step_over(self.skip)
        if self.skip or not len(stream):
            return None
        if stream.at_gap():
            raise ParseError("message head not captured")
        if self.one_byte:
            self.one_byte = False
            byte = stream.view(1)
            stream.consume(1)
            return ord("s"), byte  # not a backend type: the negotiation's answer
        view = stream.view(TEXT_KEPT + 5)
        if self.startup:
            if len(view) < 8:
                return self._wait(stream, view)
            length, code = struct.unpack_from(">ii", view)
            if length < 8 or length > 10000:
                raise ParseError("bad start-up length")
            kind = {SSL_REQUEST: ord("s"), GSSENC_REQUEST: ord("g"), CANCEL_REQUEST: ord("k")}.get(code, 0)
            if kind == 0 and code != PROTOCOL_3:
                raise ParseError("not a start-up message")
            if len(view) < length:
                return self._wait(stream, view)
            stream.consume(length)
            # After SSL or GSS negotiation a start-up message follows; after start-up, typed messages.
            self.startup = kind in (ord("s"), ord("g"))
            return kind or ord("0"), view[8:length]
        if len(view) < 5:
            return self._wait(stream, view)
        kind = view[0]
        (length,) = struct.unpack_from(">i", view, 1)
        if length < 4 or length > MAX_MESSAGE:
            raise ParseError("bad message length")
        total = length + 1
        if len(view) >= total:
            stream.consume(total)
            return kind, view[5:total]
        if len(view) >= TEXT_KEPT + 5 or stream.gap_at(len(view)):
            # Longer than we keep (or than was captured): its head now, the rest stepped over.
            self.skip = total - stream.consume(total)
            return kind, view[5:]
        return None

    def run(self, stream: Stream) -> list[tuple[int, bytes]]:
        """The whole typed messages at the stream's head that lie in its first call, read at once and
        consumed; empty where :meth:`next` must go one by one (start-up, a long message, a message the
        call does not hold whole, an SSL answer due). A response to pgbench -S is four messages in one
        call: one slice each and one consume for them all, instead of a view and a consume each."""
        segments = stream.segments
        if self.skip or self.startup or self.one_byte or not segments:
            return []
        data = segments[0].data
        at = start = stream.head
        end = len(data)
        out: list[tuple[int, bytes]] = []
        while end - at >= 5:
            (length,) = _LENGTH.unpack_from(data, at + 1)
            total = length + 1
            if length < 4 or total > TEXT_KEPT + 5 or at + total > end:
                break
            out.append((data[at], data[at + 5 : at + total]))
            at += total
        if out:
            stream.consume(at - start)
        return out

    @staticmethod
    def _wait(stream: Stream, view: bytes) -> None:
        if stream.gap_at(len(view)):
            raise ParseError("message head not captured")
        return None


class PostgresParser(Parser):
    protocol = "pgsql"

    def __init__(self, after_startup: bool = False) -> None:
        self._front = _Messages(startup=not after_startup)
        self._back = _Messages(startup=False)
        self._request: Message | None = None
        self._response: Message | None = None
        self._statements: dict[str, str] = {}  # prepared statement name -> its text
        self._portals: dict[str, str] = {}
        self._negotiations = 0  # SSL/GSS requests whose one-byte answer is due

    def requests(self, stream: Stream) -> list[Message]:
        done: list[Message] = []
        while True:
            start_ns = stream.start_ns()
            messages = self._front.run(stream)
            if not messages:
                try:
                    message = self._front.next(stream)
                except ParseError:
                    self._request = None
                    self._front = _Messages(startup=False)
                    raise
                if message is None:
                    return done
                messages = [message]
            for kind, body in messages:
                if self._request is None:
                    self._request = Message(start_ns, 0, 0, {"cmd": "", "query": "", "steps": []})
                req = self._request
                req.size += len(body) + 5
                self._frontend(kind, body, req.fields)
                if kind in b"QSsgk0X":  # Query, Sync, the start-up messages, Terminate: one request
                    req.end_ns = stream.last_end_ns
                    if kind == ord("s") or kind == ord("g"):
                        self._negotiations += 1
                    if kind != ord("X"):  # Terminate gets no answer
                        done.append(req)
                    self._request = None

    def _frontend(self, kind: int, body: bytes, fields: dict) -> None:
        steps: list = fields["steps"]
        if kind == ord("Q"):
            fields["cmd"], fields["query"] = "Query", _cstring(body)[0]
        elif kind == ord("P"):
            name, at = _cstring(body)
            text = _cstring(body, at)[0]
            self._statements[name] = text
            fields["query"] = fields["query"] or text
            fields["cmd"] = fields["cmd"] or "Parse"
        elif kind == ord("B"):
            portal, at = _cstring(body)
            statement = _cstring(body, at)[0]
            self._portals[portal] = self._statements.get(statement, "")
        elif kind == ord("E"):
            portal = _cstring(body)[0]
            fields["cmd"] = "Execute"
            fields["query"] = fields["query"] or self._portals.get(portal, "")
        elif kind == ord("0"):
            fields["cmd"] = "Startup"
        elif kind in b"sg":
            fields["cmd"] = "SSLRequest" if kind == ord("s") else "GSSENCRequest"
        elif kind == ord("k"):
            fields["cmd"] = "CancelRequest"
        steps.append(chr(kind))

    def responses(self, stream: Stream) -> list[Message]:
        done: list[Message] = []
        while True:
            if self._negotiations and not self._back.skip:
                self._back.one_byte = True
            start_ns = stream.start_ns()
            messages = self._back.run(stream)
            if not messages:
                try:
                    message = self._back.next(stream)
                except ParseError:
                    self._response = None
                    raise
                if message is None:
                    return done
                messages = [message]
            for kind, body in messages:
                if self._response is None:
                    self._response = Message(start_ns, 0, 0, {"tags": [], "error": "", "rows": 0})
                resp = self._response
                negotiation = kind == _SSL_ANSWER and self._negotiations
                resp.size += len(body) + (1 if negotiation else 5)
                fields = resp.fields
                if negotiation:
                    self._negotiations -= 1
                    fields["tags"].append("SSL " + ("accepted" if body == b"S" else "refused"))
                    kind = _READY
                elif kind == _DATA_ROW:
                    fields["rows"] += 1
                elif kind == _COMPLETE:
                    fields["tags"].append(_cstring(body)[0])
                elif kind == _ERROR:
                    fields["error"] = _error_text(body)
                if kind == _READY:
                    resp.end_ns = stream.last_end_ns
                    done.append(resp)
                    self._response = None


def _error_text(body: bytes) -> str:
    """ErrorResponse fields: severity (S), SQLSTATE (C), message (M)."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(body) and body[at]:
        code = chr(body[at])
        value, at = _cstring(body, at + 1)
        fields[code] = value
    return f"{fields.get('S', 'ERROR')}: {fields.get('M', '')} ({fields.get('C', '')})"
