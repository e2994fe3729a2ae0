"""DNS over UDP (one datagram, one message) and TCP (each message after its two-byte length), decoded
with dnspython; a response is paired with its query by transaction id (per peer: a UDP server's
connection is one per client address).
"""

from __future__ import annotations

import struct
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from bpfscope.domains.requests.protocols.base import Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream

PORT = 53
_HEADER = struct.Struct(">HHHHHH")


def looks_like_dns(data: bytes) -> bool | None:
    """None when the bytes are no DNS message; else whether they are a query."""
    if len(data) < _HEADER.size:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    opcode = (flags >> 11) & 0xF
    if qdcount != 1 or opcode > 5 or ancount > 256 or nscount > 256 or arcount > 256:
        return None
    try:
        dns.message.from_wire(data, question_only=True)
    except (dns.exception.DNSException, ValueError, IndexError, KeyError, UnicodeError):
        return None
    return not flags & 0x8000


def decode(data: bytes) -> dict[str, Any]:
    """A message's fields: id, flags, the question, rcode and answers."""
    try:
        message = dns.message.from_wire(data, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, IndexError, KeyError, UnicodeError, struct.error) as exc:
        raise ParseError(f"not a DNS message: {type(exc).__name__}") from None
    question = message.question[0] if message.question else None
    answers = [
        f"{dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text()}"
        for rrset in message.answer
        for rdata in rrset
    ]
    return {
        "id": message.id,
        "flags": int(message.flags),
        "name": question.name.to_text(omit_final_dot=True) if question is not None else "",
        "type": dns.rdatatype.to_text(question.rdtype) if question is not None else "",
        "rcode": dns.rcode.to_text(message.rcode()),
        "answers": answers,
        "counts": [
            len(message.question),
            len(message.answer),
            len(message.authority),
            len(message.additional),
        ],
    }


class DnsParser(Parser):
    protocol = "dns"
    keyed = True

    def __init__(self, udp: bool = True) -> None:
        self.udp = udp

    def requests(self, stream: Stream) -> list[Message]:
        return self._read(stream)

    def responses(self, stream: Stream) -> list[Message]:
        return self._read(stream)

    def _read(self, stream: Stream) -> list[Message]:
        return self._datagrams(stream) if self.udp else self._framed(stream)

    @staticmethod
    def _datagrams(stream: Stream) -> list[Message]:
        done = []
        while (seg := stream.pop_segment()) is not None:
            if seg.missing:
                raise ParseError("DNS message beyond the capture")
            start = seg.end_ns if stream.ingress else seg.start_ns
            fields = decode(seg.data)
            done.append(Message(start, seg.end_ns, seg.size, fields, key=fields["id"]))
        return done

    @staticmethod
    def _framed(stream: Stream) -> list[Message]:
        done = []
        while len(stream) >= 2:
            if stream.at_gap():
                raise ParseError("DNS length not captured")
            view = stream.view(2 + 0xFFFF)
            if len(view) < 2:
                break
            (length,) = struct.unpack_from(">H", view)
            if len(view) < 2 + length:
                if stream.gap_at(len(view)):
                    raise ParseError("DNS message beyond the capture")
                break
            start = stream.start_ns()
            stream.consume(2 + length)
            fields = decode(view[2 : 2 + length])
            done.append(Message(start, stream.last_end_ns, 2 + length, fields, key=fields["id"]))
        return done
