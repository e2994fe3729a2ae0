"""What every protocol parser shares: messages, the parser contract, and pairing.

A :class:`Parser` belongs to one connection. It reads each direction's :class:`Stream` and returns the
complete messages it found (:meth:`Parser.requests`, :meth:`Parser.responses`); a message carries its
first and last byte's times, its size on the wire and its protocol fields. :class:`Pairing` matches
responses to requests, in order (HTTP/1.x, PostgreSQL, MySQL, Redis: a connection answers its requests
in the order they came, pipelined or not) or by key (HTTP/2 stream id, DNS transaction id).

Parsers never raise anything but :class:`ParseError` (fuzzed: tests/unit/test_protocols_fuzz.py), and
a :class:`ParseError` costs only the bytes the direction held: the connection goes on from its next call.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bpfscope.domains.requests.protocols.stream import Stream

# Requests kept waiting for their response per connection: a server that never answers (or answers in a
# call the capture missed) must not hold memory.
MAX_PENDING = 1024


class ParseError(Exception):
    """The bytes are not a message of this protocol (garbage, a capture that began mid-message, a head
    cut by the capture limit)."""


@dataclass(slots=True)
class Message:
    start_ns: int  # the first byte's call entry (a request sent) or return (a request received)
    end_ns: int  # the last byte's call return
    size: int  # bytes on the wire, head and body
    fields: dict[str, Any] = field(default_factory=dict)
    key: Any = None  # pairing key (stream id, transaction id); None: in order
    truncated: bool = False  # bytes of the head were not captured


@dataclass(slots=True)
class Exchange:
    """A request and its response (None when the connection closed first)."""

    protocol: str
    request: Message
    response: Message | None

    @property
    def latency_ns(self) -> int:
        if self.response is None:
            return 0
        return max(0, self.response.end_ns - self.request.start_ns)


class Parser:
    """One connection's parser. Subclasses set ``protocol`` and implement the two readers; ``keyed``
    parsers give every message a pairing key."""

    protocol: ClassVar[str] = ""
    keyed: ClassVar[bool] = False
    # Datagram protocols see each call whole (DNS over UDP): the reader then reads segments.
    datagrams: ClassVar[bool] = False

    def requests(self, stream: Stream) -> list[Message]:
        raise NotImplementedError

    def responses(self, stream: Stream) -> list[Message]:
        raise NotImplementedError

    def closed(self) -> list[Message]:
        """Responses that end when the connection does (an HTTP/1.0 body read until close)."""
        return []


class Pairing:
    """Matches responses to requests, in order or by key; counts what it could not match."""

    def __init__(self, keyed: bool) -> None:
        self.keyed = keyed
        self.in_order: deque[Message] = deque()
        self.by_key: OrderedDict[Any, Message] = OrderedDict()
        self.unmatched_responses = 0
        self.dropped_requests = 0

    def request(self, message: Message) -> None:
        if self.keyed:
            self.by_key[message.key] = message
            if len(self.by_key) > MAX_PENDING:
                self.by_key.popitem(last=False)
                self.dropped_requests += 1
        else:
            self.in_order.append(message)
            if len(self.in_order) > MAX_PENDING:
                self.in_order.popleft()
                self.dropped_requests += 1

    def response(self, message: Message) -> Message | None:
        """The request this response answers, or None (its request was before the capture began)."""
        if self.keyed:
            request = self.by_key.pop(message.key, None)
        else:
            request = self.in_order.popleft() if self.in_order else None
        if request is None:
            self.unmatched_responses += 1
        return request

    def pending(self) -> list[Message]:
        """Requests still waiting (the connection closed)."""
        out = [*self.in_order, *self.by_key.values()]
        self.in_order.clear()
        self.by_key.clear()
        return out

    def forget(self) -> None:
        """After a parse error on one side, in-order pairing is no longer trustworthy."""
        self.dropped_requests += len(self.in_order)
        self.in_order.clear()
