"""sock_diag replies decoded by diag's own decoder never crash on what a datagram may hold: a valid
reply cut anywhere, or any bytes, gives the sockets it holds whole, the dump's end, or an OSError."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfscope.domains.net import diag

SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SOCK_DIAG_BY_FAMILY, NLMSG_DONE = 20, 3


def _reply(port: int, cookie: int, segs_out: int) -> bytes:
    """One socket as the kernel sends it: netlink header, inet_diag_msg, INET_DIAG_INFO (a tcp_info with
    tcpi_segs_out set) and INET_DIAG_CGROUP_ID; then the dump's end. The message's offsets are the UAPI's
    (linux/inet_diag.h), written out here: the decoder takes them from BTF."""
    layout = diag._msg_layout()
    msg = bytearray(layout.size)
    msg[0], msg[1] = socket.AF_INET, 1  # ESTABLISHED
    struct.pack_into(">H", msg, 4, port)
    msg[8:12] = socket.inet_aton("127.0.0.1")
    struct.pack_into("=II", msg, 44, cookie & 0xFFFFFFFF, cookie >> 32)
    field = diag._tcp_info_fields()["tcpi_segs_out"]
    info = bytearray(field.offset + field.type.size)
    info[field.offset :] = field.type.encode(segs_out)
    kinds = diag._kernel_enum("INET_DIAG_INFO")
    attrs = b""
    for kind, payload in (
        (kinds["INET_DIAG_INFO"], bytes(info)),
        (kinds["INET_DIAG_CGROUP_ID"], struct.pack("=Q", 7)),
    ):
        attrs += struct.pack("=HH", 4 + len(payload), kind) + payload
        attrs += b"\0" * (-len(attrs) % 4)
    body = bytes(msg) + attrs
    head = struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, 1, 0)
    return head + body + struct.pack("=IHHIIi", 20, NLMSG_DONE, 2, 1, 0, 0)


def test_a_whole_reply_is_decoded() -> None:
    out: list[diag.DiagMessage] = []
    assert diag._parse_replies(_reply(8080, 1 << 40 | 5, 123), out)
    (msg,) = out
    assert (msg["idiag_sport"], msg["idiag_src"], msg["idiag_cookie"]) == (8080, "127.0.0.1", 1 << 40 | 5)
    info = diag.tcp_info(msg.attr("INET_DIAG_INFO"))
    assert info is not None and info["tcpi_segs_out"] == 123
    assert diag.cgroup_id(msg.attr("INET_DIAG_CGROUP_ID")) == 7


@SETTINGS
@given(st.integers(0, 65535), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.data())
def test_a_reply_cut_anywhere(port: int, cookie: int, segs_out: int, data: st.DataObject) -> None:
    whole = _reply(port, cookie, segs_out)
    cut = whole[: data.draw(st.integers(0, len(whole)))]
    out: list[diag.DiagMessage] = []
    try:
        ended = diag._parse_replies(cut, out)
    except OSError:
        return
    assert not ended or cut == whole
    for msg in out:
        assert msg["idiag_sport"] == port and msg["idiag_cookie"] == cookie


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    out: list[diag.DiagMessage] = []
    try:
        diag._parse_replies(data, out)
    except OSError:
        return
    for msg in out:
        info = diag.tcp_info(msg.attr("INET_DIAG_INFO"))
        if info is not None:
            with contextlib.suppress(KeyError):
                info["tcpi_segs_out"]
        diag.skmeminfo(msg.attr("INET_DIAG_SKMEMINFO"))
        diag.cgroup_id(msg.attr("INET_DIAG_CGROUP_ID"))
