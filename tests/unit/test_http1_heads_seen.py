"""HTTP/1 heads seen before are not parsed again (http1._REQUESTS_SEEN, _RESPONSES_SEEN), but what
depends on the request is still decided per message: the same response head after a GET has a body,
after a HEAD none."""

from __future__ import annotations

from test_protocols import converse

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n"


def test_a_head_seen_before_frames_its_message_by_its_request() -> None:
    calls = []
    for method in ("GET", "HEAD", "GET", "HEAD"):
        calls.append((False, f"{method} /x HTTP/1.1\r\nHost: h\r\n\r\n".encode()))
        calls.append((True, HEAD + (b"hello" if method == "GET" else b"")))
    exchanges, tracker = converse(calls)
    got = [(e.request.fields["method"], e.response.fields["body_size"], e.response.size) for e in exchanges]
    assert got == [("GET", 5, len(HEAD) + 5), ("HEAD", 0, len(HEAD))] * 2
    assert tracker.counts.parse_errors == 0
    # Every message has its own fields (the kept ones are copied), sharing the parsed headers.
    first, third = exchanges[0].response, exchanges[2].response
    assert first.fields is not third.fields and first.fields["headers"] is third.fields["headers"]
