"""HTTP/1.0 and 1.1: request and response heads, bodies framed by Content-Length, chunked encoding or the
connection's close; keep-alive and pipelining (responses come in the order of their requests).

Framing is done here rather than with llhttp (httptools) or h11: those parse a stream they see whole,
while a capture has gaps (a body's bytes counted but not copied, beyond the capture limit) and may begin
in the middle of a message. Bodies are stepped over by count, so a gap inside one costs nothing; a head
cut by the capture limit, or bytes that are not HTTP, cost the bytes the direction holds
(:class:`ParseError`), and the next call starts afresh.
"""

from __future__ import annotations

import contextlib
from collections import deque

from bpfscope.domains.requests.protocols.base import Message, ParseError, Parser
from bpfscope.domains.requests.protocols.stream import MAX_HEAD_BYTES, Stream

METHODS = frozenset(
    b"GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY MOVE LOCK "
    b"UNLOCK".split()
)
# Bytes of a body kept with its message (Pixie's req_body/resp_body are previews too).
BODY_PREVIEW = 512
_CHUNK_LINE_MAX = 1024


def looks_like_request(data: bytes) -> bool:
    method, sep, _ = data[:16].partition(b" ")
    return bool(sep) and method in METHODS


def looks_like_response(data: bytes) -> bool:
    return data.startswith((b"HTTP/1.0 ", b"HTTP/1.1 "))


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ParseError("malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


# Header blocks seen lately, parsed: a client sends the same headers request after request, a server
# the same ones but for its Date, and a dict lookup of the block's bytes costs a fraction of parsing its
# lines (the whole head parse went from about 9 to 3 us for nginx's responses). The dicts are shared
# between messages: nothing changes them once parsed. Cleared when full; blocks up to 2 KiB, so that
# it holds a few MB at most.
_HEADERS_SEEN: dict[bytes, dict[str, str]] = {}
_HEADERS_SEEN_MAX = 1024
_HEADERS_SEEN_BYTES = 2048


# Whole heads seen lately (a client's requests to one URL, a server's responses within a second), each
# with what it says: for a request, (method, fields, body length, chunked); for a response, (fields,
# status, Content-Length or None, chunked); the framing that depends on the request is decided per
# message. A head found here costs a dict copy instead of a parse (replaying paced wrk's calls:
# 13.0 -> 10.4 us per call).
_REQUESTS_SEEN: dict[bytes, tuple] = {}
_RESPONSES_SEEN: dict[bytes, tuple] = {}


def _keep(seen: dict[bytes, tuple], head: bytes, what: tuple) -> None:
    if len(head) <= _HEADERS_SEEN_BYTES:
        if len(seen) >= _HEADERS_SEEN_MAX:
            seen.clear()
        seen[head] = what


def _headers_of(block: bytes) -> dict[str, str]:
    """The headers of a head's lines after the first (``block``: without the final CRLF CRLF)."""
    headers = _HEADERS_SEEN.get(block)
    if headers is None:
        headers = _headers(block.split(b"\r\n")) if block else {}
        if len(block) <= _HEADERS_SEEN_BYTES:
            if len(_HEADERS_SEEN) >= _HEADERS_SEEN_MAX:
                _HEADERS_SEEN.clear()
            _HEADERS_SEEN[block] = headers
    return headers


class _Body:
    """How the rest of a message is framed, and how far it has got."""

    def __init__(self, message: Message, length: int | None, chunked: bool, until_close: bool) -> None:
        self.message = message
        self.left = length or 0  # bytes of the current body part (or chunk, with its CRLF) still to step
        self.chunked = chunked
        self.until_close = until_close
        self.trailer = False  # the last chunk was seen: the trailer section follows
        self.preview = bytearray()
        self.head_size = message.size

    def finish(self, end_ns: int) -> Message:
        self.message.end_ns = end_ns
        self.message.fields["body"] = bytes(self.preview)
        self.message.fields["body_size"] = self.message.size - self.head_size
        return self.message


class _Reader:
    """One direction: heads, then bodies."""

    def __init__(self, requests: bool) -> None:
        self.requests = requests
        self.body: _Body | None = None

    def read(self, stream: Stream, methods: deque[bytes]) -> list[Message]:
        done: list[Message] = []
        while len(stream):
            if self.body is None:
                message = self._head(stream, methods)
                if message is None:
                    break
                if self.body is None:
                    done.append(message)
                    continue
            if self._step_body(stream):
                body = self.body
                assert body is not None
                self.body = None
                done.append(body.finish(stream.last_end_ns))
            else:
                break
        return done

    def _head(self, stream: Stream, methods: deque[bytes]) -> Message | None:
        if stream.at_gap():
            raise ParseError("head not captured")
        view = stream.view()
        end = view.find(b"\r\n\r\n")
        if end < 0:
            check = looks_like_request if self.requests else looks_like_response
            if len(view) >= 16 and not check(view):
                raise ParseError("not an HTTP message")
            if len(view) >= MAX_HEAD_BYTES or stream.gap_at(len(view)):
                raise ParseError("head longer than the capture")
            return None
        start_ns = stream.start_ns()
        head = view[:end]
        seen = (_REQUESTS_SEEN if self.requests else _RESPONSES_SEEN).get(head)
        if seen is None:
            return self._new_head(stream, methods, head, start_ns)
        until_close = False
        if self.requests:
            method, known, body_len, chunked = seen
            methods.append(method)
        else:
            known, status, body_len, chunked = seen
            method = methods.popleft() if methods else b""
            if method == b"HEAD" or status in (204, 304) or (method == b"CONNECT" and status < 300):
                body_len, chunked = 0, False
            elif chunked:
                body_len = 0
            elif body_len is None:
                until_close = True
        return self._message(stream, dict(known), start_ns, end + 4, body_len, chunked, until_close)

    def _new_head(self, stream: Stream, methods: deque[bytes], head: bytes, start_ns: int) -> Message | None:
        """A head not among those seen lately: parsed, and kept when it parses."""
        end = len(head)
        first, _, block = head.partition(b"\r\n")
        headers = _headers_of(block)
        fields: dict = {"headers": headers}
        body_len: int | None = 0
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        until_close = False
        if self.requests:
            parts = first.split(b" ")
            if len(parts) != 3 or parts[0] not in METHODS or not parts[2].startswith(b"HTTP/1."):
                raise ParseError("not a request line")
            fields["method"] = parts[0].decode()
            fields["path"] = parts[1].decode("latin-1")
            fields["minor_version"] = _minor(parts[2])
            methods.append(parts[0])
            if not chunked:
                body_len = _content_length(headers)
            fields["content_type"] = headers.get("content-type", "")
            _keep(_REQUESTS_SEEN, head, (parts[0], dict(fields), body_len, chunked))
        else:
            version, _, rest = first.partition(b" ")
            status_text, _, reason = rest.partition(b" ")
            if not version.startswith(b"HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
                raise ParseError("not a status line")
            status = int(status_text)
            fields["status"] = status
            fields["reason"] = reason.decode("latin-1")
            fields["minor_version"] = _minor(version)
            if 100 <= status < 200 and status != 101:
                # Informational: the real response follows for the same request.
                stream.consume(end + 4)
                return self._head(stream, methods) if len(stream) else None
            fields["content_type"] = headers.get("content-type", "")
            with contextlib.suppress(ParseError):  # (kept only with a Content-Length that parses)
                _keep(_RESPONSES_SEEN, head, (dict(fields), status, _content_length(headers), chunked))
            method = methods.popleft() if methods else b""
            if method == b"HEAD" or status in (204, 304) or (method == b"CONNECT" and status < 300):
                body_len, chunked = 0, False
            elif not chunked:
                body_len = _content_length(headers)
                if body_len is None:
                    until_close = True
        return self._message(stream, fields, start_ns, end + 4, body_len, chunked, until_close)

    def _message(
        self,
        stream: Stream,
        fields: dict,
        start_ns: int,
        head_size: int,
        body_len: int | None,
        chunked: bool,
        until_close: bool,
    ) -> Message:
        stream.consume(head_size)
        message = Message(start_ns, stream.last_end_ns, head_size, fields)
        if chunked or until_close or body_len:
            self.body = _Body(message, body_len, chunked, until_close)
        else:
            fields["body"], fields["body_size"] = b"", 0
        return message

    def _step_body(self, stream: Stream) -> bool:
        """Step through the body as far as the stream goes; True once it ended."""
        body = self.body
        assert body is not None
        while True:
            if body.left:
                self._preview(stream, body)
                moved = stream.consume(body.left)
                body.left -= moved
                body.message.size += moved
                if body.left:
                    stream.skipping(body.left)
                    return False
                if not body.chunked:
                    return True
            if body.until_close:
                return False
            if not len(stream):
                return False
            # Chunked: a size line, or the trailer after the last chunk.
            if stream.at_gap():
                raise ParseError("chunk size not captured")
            view = stream.view(_CHUNK_LINE_MAX)
            eol = view.find(b"\r\n")
            if eol < 0:
                if len(view) >= _CHUNK_LINE_MAX or stream.gap_at(len(view)):
                    raise ParseError("chunk size line not captured")
                return False
            if body.trailer:
                stream.consume(eol + 2)
                body.message.size += eol + 2
                if eol == 0:
                    return True
                continue
            size_text = view[:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ParseError("bad chunk size") from None
            stream.consume(eol + 2)
            body.message.size += eol + 2
            if size == 0:
                body.trailer = True
            else:
                body.left = size + 2

    @staticmethod
    def _preview(stream: Stream, body: _Body) -> None:
        room = BODY_PREVIEW - len(body.preview)
        data_left = body.left - 2 if body.chunked else body.left  # a chunk's CRLF is not body
        if room > 0 and data_left > 0 and not stream.at_gap():
            body.preview += stream.view(min(room, data_left))

    def closed(self, end_ns: int) -> Message | None:
        """The connection closed: a body read until close ends here."""
        body, self.body = self.body, None
        if body is not None and body.until_close:
            return body.finish(end_ns)
        return None


def _minor(version: bytes) -> int:
    return 0 if version.endswith(b".0") else 1


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value.split(",")[0])
    except ValueError:
        raise ParseError("bad Content-Length") from None
    if length < 0:
        raise ParseError("negative Content-Length")
    return length


class Http1Parser(Parser):
    protocol = "http"

    def __init__(self) -> None:
        self._requests = _Reader(requests=True)
        self._responses = _Reader(requests=False)
        # Methods of the requests read, in order: a response to HEAD has no body whatever it says.
        self._methods: deque[bytes] = deque(maxlen=1024)

    def requests(self, stream: Stream) -> list[Message]:
        try:
            return self._requests.read(stream, self._methods)
        except ParseError:
            self._requests.body = None
            raise

    def responses(self, stream: Stream) -> list[Message]:
        try:
            return self._responses.read(stream, self._methods)
        except ParseError:
            self._responses.body = None
            raise

    def closed(self) -> list[Message]:
        message = self._responses.closed(0)
        return [message] if message is not None else []
