"""Redis: RESP2 and RESP3, commands pipelined or not (a connection answers in order), inline commands.

Each message is walked type by type with a stack of the element counts still expected, so a bulk
string is stepped over by count (its bytes may be beyond the capture limit) and a message may end in a
later call than it began. RESP3 pushes (``>``, out-of-band: invalidations, pub/sub) answer no request
and are skipped. hiredis's reader would parse faster but cannot step over bytes it was not given.
"""

from __future__ import annotations

from bpfscope.domains.requests.protocols.base import Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream

AGGREGATES = frozenset(b"*%~>|")  # array, map, set, push, attribute
BULKS = frozenset(b"$!=")  # bulk string, bulk error, verbatim string
SIMPLES = frozenset(b"+-:_,#(")  # simple string, error, integer, null, double, boolean, big number
_LINE_MAX = 1024
# Arguments of a command kept (their first bytes each).
ARGS_KEPT = 8
ARG_BYTES = 64


def looks_like_command(data: bytes) -> bool:
    return data[:1] == b"*" and data[1:2].isdigit() and b"\r\n$" in data[:32]


class _Reader:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.stack: list[int] = []  # elements still expected at each depth
        self.bulk_left = 0  # bytes of a bulk string (with its CRLF) still to step over
        self.parts: list[tuple[int, bytes]] = []  # (type, first bytes) of the values met, in order
        self.start_ns = 0
        self.size = 0
        self.push = False
        self.attribute = False

    def read(self, stream: Stream, requests: bool) -> list[Message]:
        done: list[Message] = []
        while len(stream):
            if self.bulk_left:
                moved = stream.consume(self.bulk_left)
                self.bulk_left -= moved
                self.size += moved
                if self.bulk_left:
                    stream.skipping(self.bulk_left)
                    break
                self._value_done(stream, done)
                continue
            if stream.at_gap():
                raise ParseError("message not captured")
            view = stream.view(_LINE_MAX)
            eol = view.find(b"\r\n")
            if eol < 0:
                if len(view) >= _LINE_MAX or stream.gap_at(len(view)):
                    raise ParseError("line longer than the capture")
                break
            if not self.stack and not self.parts:
                self.start_ns = stream.start_ns()
            line = view[:eol]
            kind = line[0] if line else 0
            stream.consume(eol + 2)
            self.size += eol + 2
            if kind in AGGREGATES:
                count = _int(line[1:])
                if kind == ord(">") and not self.stack:
                    self.push = True
                if kind == ord("|"):
                    self.attribute = not self.stack
                n = count * 2 if kind in b"%|" else count
                if n <= 0:
                    self.parts.append((kind, b""))
                    self._value_done(stream, done)
                else:
                    self.parts.append((kind, line[1:]))
                    self.stack.append(n)
            elif kind in BULKS:
                length = _int(line[1:])
                if length < 0:
                    self.parts.append((kind, b""))
                    self._value_done(stream, done)
                else:
                    self.bulk_left = length + 2
                    data = stream.view(min(length, ARG_BYTES)) if not stream.at_gap() else b""
                    self.parts.append((kind, data[: min(length, ARG_BYTES)]))
            elif kind in SIMPLES:
                self.parts.append((kind, line[1:]))
                self._value_done(stream, done)
            elif requests and not self.stack and line and line[:1].isalpha():
                # An inline command (telnet style): words on a line.
                self.parts = [(ord("$"), word[:ARG_BYTES]) for word in line.split()[: ARGS_KEPT + 1]]
                self._value_done(stream, done)
            else:
                raise ParseError("not RESP")
        return done

    def _value_done(self, stream: Stream, done: list[Message]) -> bool:
        """A value ended: count it in its aggregate; True when a whole message ended."""
        while self.stack:
            self.stack[-1] -= 1
            if self.stack[-1]:
                return False
            self.stack.pop()
        if self.attribute:
            # An attribute precedes the reply it describes: the message goes on.
            self.attribute = False
            return False
        message = Message(self.start_ns, stream.last_end_ns, self.size, {"parts": self.parts})
        if not self.push:
            done.append(message)
        self._reset()
        return True


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ParseError("bad length") from None


def command(parts: list[tuple[int, bytes]]) -> tuple[str, list[str]]:
    """A request's command name (two words for container commands: CLIENT SETNAME, CONFIG GET) and its
    arguments' first bytes."""
    words = [data.decode("utf-8", "replace") for kind, data in parts if kind in BULKS]
    if not words:
        return "", []
    name = words[0].upper()
    rest = words[1:]
    if (
        name in {"CLIENT", "CONFIG", "CLUSTER", "COMMAND", "SCRIPT", "MEMORY", "OBJECT", "XINFO", "ACL"}
        and rest
    ):
        name, rest = f"{name} {rest[0].upper()}", rest[1:]
    return name, rest[:ARGS_KEPT]


def reply(parts: list[tuple[int, bytes]], keep: bool) -> tuple[str, bool]:
    """A reply as text (values only with --no-redact) and whether it is an error."""
    if not parts:
        return "", False
    kind, data = parts[0]
    text = data.decode("utf-8", "replace")
    if kind in b"-!":
        return text, True
    if kind in b"+:#,(_":
        # Statuses and numbers, not stored values: shown.
        return ("nil" if kind == ord("_") else text), False
    if kind in b"$=":
        return (text if keep else "<bulk>"), False
    if kind in AGGREGATES:
        return f"[{text or 0} items]", False
    return text, False


class RedisParser(Parser):
    protocol = "redis"

    def __init__(self) -> None:
        self._requests = _Reader()
        self._responses = _Reader()

    def requests(self, stream: Stream) -> list[Message]:
        return self._read(self._requests, stream, True)

    def responses(self, stream: Stream) -> list[Message]:
        return self._read(self._responses, stream, False)

    @staticmethod
    def _read(reader: _Reader, stream: Stream, requests: bool) -> list[Message]:
        try:
            return reader.read(stream, requests)
        except ParseError:
            reader._reset()
            raise
