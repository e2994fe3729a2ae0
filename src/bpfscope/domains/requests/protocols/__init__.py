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
from functools import partial

from bpfscope.domains.requests.protocols import dns, http1, http2, mysql, postgres, redis
from bpfscope.domains.requests.protocols.base import Exchange, Message, ParseError, Parser

PROTOCOLS = ("http", "dns", "pgsql", "mysql", "redis")
# Ports that name a protocol whose messages carry no signature of their own when a capture begins in
# the middle of a connection (a response first).
PORTS = {5432: "pgsql", 3306: "mysql", 6379: "redis", 53: "dns"}


@dataclass(frozen=True)
class Detected:
    parser: Callable[[], Parser]
    is_request: bool  # the bytes looked at are a request

    @property
    def protocol(self) -> str:
        factory = self.parser
        return getattr(factory, "func", factory).protocol  # type: ignore[union-attr]


def is_tls(data: bytes) -> bool:
    """A TLS record (handshake, alert or application data) of TLS 1.0-1.3: ciphertext, whose plaintext
    comes from the OpenSSL uprobes if at all."""
    return len(data) >= 3 and data[0] in (0x14, 0x15, 0x16, 0x17) and data[1] == 3 and data[2] <= 4


def detect(data: bytes, udp: bool, ports: tuple[int, int]) -> Detected | None:
    """The protocol of a connection whose first captured call carried ``data``; ``ports`` are the
    local and remote port."""
    if not data:
        return None
    if udp:
        query = dns.looks_like_dns(data)
        return None if query is None else Detected(partial(dns.DnsParser, udp=True), query)
    if data.startswith(http2.PREFACE[: min(len(data), len(http2.PREFACE))]) and len(data) >= 8:
        return Detected(http2.Http2Parser, True)
    if http1.looks_like_request(data):
        return Detected(http1.Http1Parser, True)
    if http1.looks_like_response(data):
        return Detected(http1.Http1Parser, False)
    if redis.looks_like_command(data):
        return Detected(redis.RedisParser, True)
    if postgres.looks_like_startup(data):
        return Detected(postgres.PostgresParser, True)
    if postgres.looks_like_frontend(data):
        return Detected(partial(postgres.PostgresParser, after_startup=True), True)
    by_port = {PORTS[p] for p in ports if p in PORTS}
    if "pgsql" in by_port and postgres.looks_like_backend(data):
        return Detected(partial(postgres.PostgresParser, after_startup=True), False)
    if "redis" in by_port and data[:1] in b"+-:$*%~_,#(!=|>":
        return Detected(redis.RedisParser, False)
    # MySQL's packets carry no signature but the connection phase's and a framing that fits.
    if mysql.looks_like_greeting(data):
        return Detected(mysql.MysqlParser, False)
    if mysql.looks_like_handshake_response(data) or mysql.looks_like_command(data):
        return Detected(mysql.MysqlParser, True)
    if "mysql" in by_port and mysql.looks_like_response(data):
        return Detected(mysql.MysqlParser, False)
    if http2.frames_fit(data):
        # HTTP/2 met after its preface (gRPC's long-lived connections): whole frames, end to end. Which
        # side is the client comes from the socket's role when the kernel saw it open.
        return Detected(partial(http2.Http2Parser, mid_connection=True), True)
    # DNS over TCP: a length that is the rest of the call (or port 53), then a DNS message.
    framed = len(data) > 2 and int.from_bytes(data[:2], "big") == len(data) - 2
    if (framed or "dns" in by_port) and len(data) > 2 and (query := dns.looks_like_dns(data[2:])) is not None:
        return Detected(partial(dns.DnsParser, udp=False), query)
    return None


__all__ = ["PROTOCOLS", "Detected", "Exchange", "Message", "ParseError", "Parser", "detect", "is_tls"]
