"""The protocols bpfscope parses out of captured connections, and how a connection's protocol is told
from its first bytes (:func:`detect`).

Detection looks at the first captured call of a connection, whichever side it came from, and says the
protocol and whether those bytes are a request; well-known ports break ties for protocols whose
messages carry no signature (a DNS header, a MySQL packet). A connection whose first bytes fit nothing
is tried again on its next calls, then left alone (its bytes still counted in conn_stats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bpfscope.domains.requests.protocols import http1
from bpfscope.domains.requests.protocols.base import Exchange, Message, ParseError, Parser

PROTOCOLS = ("http",)


@dataclass(frozen=True)
class Detected:
    parser: Callable[[], Parser]
    is_request: bool  # the bytes looked at are a request


def is_tls(data: bytes) -> bool:
    """A TLS record (handshake, alert or application data) of TLS 1.0-1.3: ciphertext, whose plaintext
    comes from the OpenSSL uprobes if at all."""
    return len(data) >= 3 and data[0] in (0x14, 0x15, 0x16, 0x17) and data[1] == 3 and data[2] <= 4


def detect(data: bytes, udp: bool, ports: tuple[int, int]) -> Detected | None:
    """The protocol of a connection whose first captured call carried ``data``; ``ports`` are the
    local and remote port."""
    if not data:
        return None
    if not udp:
        if http1.looks_like_request(data):
            return Detected(http1.Http1Parser, True)
        if http1.looks_like_response(data):
            return Detected(http1.Http1Parser, False)
    return None


__all__ = ["PROTOCOLS", "Detected", "Exchange", "Message", "ParseError", "Parser", "detect", "is_tls"]
