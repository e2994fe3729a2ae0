"""HTTP/2 and gRPC: frames, header blocks decoded with ``hpack``, each stream's request and response
(HEADERS, DATA and trailers up to END_STREAM, or RST_STREAM) paired by stream id.

A capture that begins in the middle of a connection has missed the HPACK dynamic table's first
entries. The table here (:class:`_CaptureTable`) trusts only the entries it saw added since it began
(or since a header block it could not read): a field that refers to an older one is ``<unknown>``, and
the count of such fields is kept. New entries go to the table's front, so a connection's later requests
decode whole again as their fields are added; streams are paired by id whatever the headers say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpack import Decoder
from hpack.exceptions import HPACKError, InvalidTableIndexError
from hpack.table import HeaderTable

from bpfscope.domains.requests.protocols.base import Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import Stream

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
# Frames larger than this are not a protocol's: SETTINGS_MAX_FRAME_SIZE is at most 2^24 - 1.
MAX_FRAME = (1 << 24) - 1
UNKNOWN = "<unknown>"
STATIC_ENTRIES = 61
# Streams half-assembled at once per direction: a stream whose end was never captured is forgotten.
MAX_STREAMS = 1024


class _CaptureTable(HeaderTable):
    """An HPACK dynamic table that may have begun before the capture (see the module's text)."""

    def __init__(self, trusted: int | None) -> None:
        super().__init__()
        self.trusted = trusted  # dynamic entries known good, newest first (None: all)
        self.unknown = 0

    def add(self, name: bytes, value: bytes) -> None:
        super().add(name, value)
        if self.trusted is not None:
            self.trusted += 1

    def get_by_index(self, index: int) -> tuple[bytes, bytes]:
        if self.trusted is not None and index > STATIC_ENTRIES + self.trusted:
            self.unknown += 1
            return UNKNOWN.encode(), UNKNOWN.encode()
        try:
            return super().get_by_index(index)
        except InvalidTableIndexError:
            self.unknown += 1
            return UNKNOWN.encode(), UNKNOWN.encode()


def frames_fit(data: bytes) -> bool:
    """The bytes are whole HTTP/2 frames, end to end (a connection met after its preface)."""
    at, count = 0, 0
    while at + FRAME_HEADER <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        kind, stream_id = data[at + 3], int.from_bytes(data[at + 5 : at + 9], "big")
        if kind > CONTINUATION or stream_id >> 31:
            return False
        if kind in (DATA, HEADERS, RST_STREAM, CONTINUATION, PRIORITY) and stream_id == 0:
            return False
        if kind in (SETTINGS, PING, GOAWAY) and stream_id != 0:
            return False
        at += FRAME_HEADER + length
        count += 1
    return count > 0 and at == len(data)


@dataclass
class _Assembly:
    """A stream's message being put together from its frames."""

    start_ns: int
    size: int = 0
    block: bytearray = field(default_factory=bytearray)  # a header block until END_HEADERS
    headers: dict[str, str] = field(default_factory=dict)
    body_size: int = 0
    body: bytearray = field(default_factory=bytearray)
    end_stream: bool = False  # seen on the HEADERS whose block is still being assembled


class _Reader:
    def __init__(self, preface: bool, trusted: int | None) -> None:
        self.preface = preface  # the client's preface may still come
        self.saw_preface = False
        self.decoder = Decoder()
        self.table = _CaptureTable(trusted)
        self.decoder.header_table = self.table
        self.decoder.max_header_list_size = 1 << 20
        self.streams: dict[int, _Assembly] = {}
        self.decoder.max_allowed_table_size = 1 << 20  # whatever the peers agreed on
        self.skip = 0  # payload bytes of the current frame still to step over
        self.skip_stream = 0
        self.skip_data = False  # the skipped bytes are DATA: counted as body
        self.end_after_skip = False  # the frame ends its stream (END_STREAM on DATA)

    def read(self, stream: Stream) -> list[Message]:
        done: list[Message] = []
        while len(stream) or (self.end_after_skip and not self.skip):
            if self.skip or self.end_after_skip:
                moved = stream.consume(self.skip)
                self.skip -= moved
                assembly = self.streams.get(self.skip_stream)
                if assembly is not None:
                    assembly.size += moved
                    if self.skip_data:
                        assembly.body_size += moved
                if self.skip:
                    stream.skipping(self.skip)
                    break
                if self.end_after_skip:
                    self.end_after_skip = False
                    message = self._finish(self.skip_stream, stream)
                    if message is not None:
                        done.append(message)
                continue
            if stream.at_gap():
                raise ParseError("frame header not captured")
            if self.preface:
                view = stream.view(len(PREFACE))
                if len(view) < len(PREFACE):
                    if not PREFACE.startswith(view) or stream.gap_at(len(view)):
                        raise ParseError("not the HTTP/2 preface")
                    break
                if view != PREFACE:
                    self.preface = False  # met after its preface
                else:
                    # The connection's very start: every table entry will be seen.
                    stream.consume(len(PREFACE))
                    self.preface = False
                    self.saw_preface = True
                    self.table.trusted = None
                    continue
            view = stream.view(FRAME_HEADER)
            if len(view) < FRAME_HEADER:
                if stream.gap_at(len(view)):
                    raise ParseError("frame header not captured")
                break
            length = int.from_bytes(view[:3], "big")
            kind, flags = view[3], view[4]
            stream_id = int.from_bytes(view[5:9], "big") & 0x7FFFFFFF
            if kind > CONTINUATION:
                raise ParseError("not an HTTP/2 frame")
            if kind in (HEADERS, CONTINUATION, RST_STREAM):
                whole = stream.view(FRAME_HEADER + length)
                if len(whole) < FRAME_HEADER + length:
                    if stream.gap_at(len(whole)):
                        # A header block not captured: the HPACK table can no longer be trusted.
                        self.table.trusted = 0
                        self._forget(stream_id)
                        stream.consume(FRAME_HEADER)
                        self.skip, self.skip_stream, self.skip_data = length, stream_id, False
                        continue
                    break
                start_ns = stream.start_ns()
                stream.consume(FRAME_HEADER + length)
                message = self._frame(kind, flags, stream_id, whole[FRAME_HEADER:], start_ns, stream)
                if message is not None:
                    done.append(message)
                continue
            # DATA and the rest: the header now, the payload stepped over (DATA's first bytes kept).
            stream.consume(FRAME_HEADER)
            assembly = self.streams.get(stream_id) if kind == DATA else None
            if assembly is not None:
                assembly.size += FRAME_HEADER
                if len(assembly.body) < 512 and not stream.at_gap():
                    assembly.body += stream.view(min(length, 512 - len(assembly.body)))
            self.skip, self.skip_stream, self.skip_data = length, stream_id, kind == DATA
            self.end_after_skip = kind == DATA and bool(flags & END_STREAM)
        return done

    def _frame(
        self, kind: int, flags: int, stream_id: int, payload: bytes, start_ns: int, stream: Stream
    ) -> Message | None:
        if kind == RST_STREAM:
            assembly = self.streams.get(stream_id) or self._open(stream_id, start_ns)
            code = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else 0
            assembly.headers.setdefault("rst_stream", str(code))
            return self._finish(stream_id, stream)
        assembly = self.streams.get(stream_id)
        if kind == HEADERS:
            if assembly is None:
                assembly = self._open(stream_id, start_ns)
            if flags & PADDED and payload:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            assembly.end_stream = bool(flags & END_STREAM)
        elif assembly is None:
            return None  # a CONTINUATION of a block whose HEADERS was not seen
        assembly.size += FRAME_HEADER + len(payload)
        assembly.block += payload
        if not flags & END_HEADERS:
            return None
        try:
            decoded = self.decoder.decode(bytes(assembly.block))
        except (HPACKError, ValueError, IndexError, UnicodeDecodeError):
            self.table.trusted = 0
            decoded = []
        assembly.block.clear()
        for name, value in decoded:
            assembly.headers.setdefault(str(name), str(value))
        if assembly.end_stream:
            return self._finish(stream_id, stream)
        return None

    def _open(self, stream_id: int, start_ns: int) -> _Assembly:
        if len(self.streams) >= MAX_STREAMS:
            self.streams.pop(next(iter(self.streams)))
        assembly = self.streams[stream_id] = _Assembly(start_ns)
        return assembly

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def _finish(self, stream_id: int, stream: Stream) -> Message | None:
        assembly = self.streams.pop(stream_id, None)
        if assembly is None:
            return None
        fields: dict[str, Any] = {"headers": assembly.headers, "body": bytes(assembly.body)}
        fields["body_size"] = assembly.body_size
        return Message(assembly.start_ns, stream.last_end_ns, assembly.size, fields, key=stream_id)


class Http2Parser(Parser):
    protocol = "http"
    keyed = True

    def __init__(self, mid_connection: bool = False) -> None:
        # Met mid-connection, no dynamic table entry is known; from the preface on, all are (a server's
        # SETTINGS may be the first thing seen of a new connection: the client's preface then follows).
        trusted = 0 if mid_connection else None
        self._requests = _Reader(preface=True, trusted=trusted)
        self._responses = _Reader(preface=False, trusted=trusted)

    @property
    def unknown_fields(self) -> int:
        return self._requests.table.unknown + self._responses.table.unknown

    def requests(self, stream: Stream) -> list[Message]:
        messages = self._read(self._requests, stream)
        if self._requests.saw_preface:
            self._requests.saw_preface = False
            self._responses.table.trusted = None
        return [_request(m) for m in messages]

    def responses(self, stream: Stream) -> list[Message]:
        return [_response(m) for m in self._read(self._responses, stream)]

    @staticmethod
    def _read(reader: _Reader, stream: Stream) -> list[Message]:
        try:
            return reader.read(stream)
        except ParseError:
            reader.skip = 0
            reader.end_after_skip = False
            reader.streams.clear()
            reader.table.trusted = 0
            raise


def _request(message: Message) -> Message:
    headers = message.fields["headers"]
    message.fields.update(
        method=headers.pop(":method", UNKNOWN),
        path=headers.pop(":path", UNKNOWN),
        major_version=2,
        minor_version=0,
    )
    headers.pop(":scheme", None)
    if ":authority" in headers:
        headers["host"] = headers.pop(":authority")
    return message


def _response(message: Message) -> Message:
    headers = message.fields["headers"]
    status = headers.pop(":status", "0")
    message.fields.update(
        status=int(status) if status.isdigit() else 0,
        reason=headers.get("grpc-message", ""),
        content_type=headers.get("content-type", ""),
    )
    return message
