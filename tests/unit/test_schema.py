"""Record schemas and losses: declared once, typed from BTF where the data comes from the kernel, and
checked against records."""

from __future__ import annotations

import pytest

from bpfscope.engine.btf import Array, Scalar, Struct
from bpfscope.engine.btf import Field as BtfField
from bpfscope.runtime.losses import LOSSES_SCHEMA, Loss, Losses
from bpfscope.runtime.schema import COMM, PID, Field, Schema, btf_field, btf_fields, enum_names, unit_of

SCHEMA = Schema("thing", (PID, COMM, Field("latency_ms", "float", "ms", nullable=True)), interval=True)


def test_common_fields_lead_every_record() -> None:
    assert SCHEMA.names == ["ts", "interval_s", "pid", "comm", "latency_ms"]
    record = SCHEMA.record({"pid": 1, "comm": "init", "latency_ms": None, "ts": 1.5, "interval_s": 1.0})
    assert list(record) == ["record", "ts", "interval_s", "pid", "comm", "latency_ms"]
    assert record["record"] == "thing" and SCHEMA.check(record) == []


def test_a_record_missing_a_field_is_refused() -> None:
    with pytest.raises(KeyError, match="lacks field comm"):
        SCHEMA.record({"pid": 1, "ts": 1.0, "interval_s": 1.0, "latency_ms": 2.0})


def test_check_names_every_problem() -> None:
    bad = {"record": "other", "ts": "now", "interval_s": 1.0, "pid": True, "comm": "x", "extra": 1}
    problems = SCHEMA.check(bad)
    assert "record is 'other', not 'thing'" in problems
    assert "extra is not a field of thing" in problems
    assert "ts is str, not float" in problems
    assert "pid is a bool, not int" in problems
    assert "latency_ms is missing" in problems


def test_enum_values_are_checked() -> None:
    schema = Schema("e", (Field("kind", "enum", values=("rto", "fast")),))
    assert schema.check({"record": "e", "ts": 0.0, "kind": "rto"}) == []
    assert schema.check({"record": "e", "ts": 0.0, "kind": "slow"}) == [
        "kind is 'slow', not one of rto, fast"
    ]


def test_a_field_twice_is_a_declaration_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        Schema("dup", (PID, PID))
    with pytest.raises(ValueError, match="unknown type"):
        Field("x", "number")


def test_enum_names_drop_the_common_prefix() -> None:
    assert enum_names([("BS_KIND_OTHER", 0), ("BS_KIND_RTO", 1), ("BS_KIND_FAST", 2)]) == {
        0: "other",
        1: "rto",
        2: "fast",
    }
    assert enum_names([("REQ_OP_READ", 0), ("REQ_OP_WRITE", 1), ("REQ_OP_ZONE_RESET_ALL", 19)]) == {
        0: "read",
        1: "write",
        19: "zone_reset_all",
    }
    # Prefixes end at a word boundary, and the first of equal values wins.
    assert enum_names([("TCP_SYN_SENT", 2), ("TCP_SYN_RECV", 3), ("TCP_SYNONYM", 2)]) == {
        2: "syn_sent",
        3: "syn_recv",
    }


def test_fields_typed_from_btf() -> None:
    u32 = Scalar(size=4)
    kind = Scalar(size=4, enum=(("BS_KIND_RTO", 1), ("BS_KIND_FAST", 2)))
    comm = Array(Scalar(size=1, signed=True, char=True), 16)
    struct = Struct(
        "event",
        32,
        (
            BtfField("latency_ns", 0, Scalar(size=8)),
            BtfField("kind", 8, kind),
            BtfField("pid", 12, u32),
            BtfField("comm", 16, comm),
        ),
    )
    fields = {f.name: f for f in btf_fields(struct, pid={"label": True})}
    assert fields["latency_ns"].type == "int" and fields["latency_ns"].unit == "ns"
    assert fields["kind"].type == "enum" and fields["kind"].values == ("rto", "fast")
    assert fields["comm"].type == "str"
    assert fields["pid"].label
    assert [f.name for f in btf_fields(struct, only=["comm", "pid"])] == ["comm", "pid"]
    assert btf_field("size_bytes", u32).unit == "bytes"
    assert unit_of("read_kb") == "kB" and unit_of("pid") == ""


def test_a_structs_head_unpacks_flat_and_equals_its_numpy_decoding() -> None:
    """Struct.unpacker: nested structs and arrays flattened, padding skipped, stopped before a field;
    the values are numpy's for the same bytes."""
    import numpy as np

    u8, u32, u64 = Scalar(size=1), Scalar(size=4), Scalar(size=8)
    creds = Struct("creds", 16, (BtfField("uid", 0, u32), BtfField("cap", 8, u64)))
    record = Struct(
        "record",
        64,
        (
            BtfField("kind", 0, u8),
            BtfField("delta", 4, Scalar(size=4, signed=True)),
            BtfField("creds", 8, creds),
            BtfField("ns", 24, Array(u32, 3)),
            BtfField("comm", 36, Array(Scalar(size=1, char=True), 4)),
            BtfField("binary", 40, Array(Scalar(size=1, char=True), 24)),
        ),
    )
    head, names = record.unpacker(upto="binary")
    assert head.size == 40
    assert names == ("kind", "delta", "creds.uid", "creds.cap", "ns[0]", "ns[1]", "ns[2]", "comm")
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, 64 * 3, dtype=np.uint8).tobytes()
    decoded = np.frombuffer(raw, dtype=record.dtype)
    for row, values in zip(
        decoded, head.iter_unpack(b"".join(raw[i : i + 40] for i in (0, 64, 128))), strict=True
    ):
        assert values[:2] == (row["kind"], row["delta"])
        assert values[2:4] == (row["creds"]["uid"], row["creds"]["cap"])
        assert list(values[4:7]) == row["ns"].tolist() and values[7] == bytes(row["comm"]).ljust(4, b"\0")
    assert record.unpacker()[0].size == 64


def test_losses_by_reason() -> None:
    before = Losses([Loss("ring_full", 2, "events lost (ring buffer full)"), Loss("recursion", 0, "missed")])
    after = Losses(
        [
            Loss("ring_full", 5, "events lost (ring buffer full)"),
            Loss("recursion", 0, "missed"),
            Loss("map_full:rows_dropped", 1, "rows not counted"),
        ]
    )
    assert after.total == 6 and after["ring_full"] == 5
    new = after.since(before)
    assert new.counts() == {"ring_full": 3, "map_full:rows_dropped": 1}
    # Always the counted reasons, even at zero; others only when something was lost.
    assert before.text() == "2 events lost (ring buffer full), 0 missed"
    record = after.record("biotop", 12.5)
    assert LOSSES_SCHEMA.check(record) == [] and record["reasons"]["ring_full"] == 5
