"""The engine against the real kernel: load, attach, trigger, read; BTF-derived types; ring-buffer
drops; in-kernel histograms; map operations."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bpfscope.engine import bpf
from bpfscope.engine.bpf import BpfObject
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.hist import Histogram


@pytest.fixture
def engine_obj(compile_test_bpf: Callable[[str], Path]) -> Path:
    return compile_test_bpf("engine_test")


@pytest.fixture
def attached(engine_obj: Path) -> Iterator[BpfObject]:
    with BpfObject(engine_obj, rodata={"bs_targ_tgid": os.getpid(), "burst": 1}) as obj:
        obj.attach()
        yield obj


def test_events_decode_as_the_kernel_wrote_them(attached: BpfObject) -> None:
    ring = attached.ring_buffer("events")
    for _ in range(5):
        os.getppid()
    events = ring.poll(1.0)
    assert len(events) == 5
    assert list(events["seq"]) == [0, 1, 2, 3, 4]
    assert set(events["pid"]) == {os.getpid()}
    assert set(events["ppid"]) == {os.getppid()}
    assert set(events["neg"]) == {-os.getpid()}
    assert set(events["flag"]) == {7}
    assert events["comm"][0] == Path("/proc/self/comm").read_bytes().strip()[:15]
    assert events["small"][0].tolist() == [1, 2, 65535]
    assert int(events["big"][0]) == 0xFEDCBA9876543210
    assert ring.consumed == 5 and attached.dropped() == 0 and ring.malformed == 0


def test_dtype_matches_bpftool_btf(engine_obj: Path, attached: BpfObject) -> None:
    """bpftool reads the same BTF independently: offsets and size must agree field by field."""
    dump = json.loads(
        subprocess.run(
            ["bpftool", "btf", "dump", "file", str(engine_obj), "-j"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    event = next(t for t in dump["types"] if t.get("name") == "event" and t["kind"] == "STRUCT")
    dtype = attached.ring_buffer("events").dtype
    assert dtype.itemsize == event["size"]
    assert list(dtype.names) == [m["name"] for m in event["members"]]
    for member in event["members"]:
        assert dtype.fields[member["name"]][1] * 8 == member["bits_offset"]
    assert dtype["neg"] == np.dtype("<i4") and dtype["comm"] == np.dtype("S16")
    assert dtype["small"].shape == (3,) and dtype["small"].base == np.dtype("<u2")


def test_pid_filter_excludes_other_processes(attached: BpfObject) -> None:
    ring = attached.ring_buffer("events")
    subprocess.run(["python3", "-c", "import os; [os.getppid() for _ in range(50)]"], check=True)
    os.getppid()
    events = ring.poll(1.0)
    assert len(events) == 1 and int(events["pid"][0]) == os.getpid()


def test_overflowed_ring_reports_exactly_what_it_lost(engine_obj: Path) -> None:
    # 64 KiB ring, 64-byte records: about 1000 fit; 20 x 4000 events overflow it on purpose.
    with BpfObject(engine_obj, rodata={"bs_targ_tgid": os.getpid(), "burst": 4000}) as obj:
        obj.attach()
        ring = obj.ring_buffer("events")
        for _ in range(20):
            os.getppid()
        seqs = []
        while len(batch := ring.poll(0.2)):
            seqs.append(batch["seq"])
        consumed = int(sum(len(s) for s in seqs))
        produced = obj.bss["produced"]
        assert produced == 80_000
        assert obj.dropped() > 0
        assert obj.dropped() == produced - consumed
        assert len(np.unique(np.concatenate(seqs))) == consumed


def test_ring_keeps_every_event_when_read_in_time(engine_obj: Path) -> None:
    with BpfObject(engine_obj, rodata={"bs_targ_tgid": os.getpid(), "burst": 500}) as obj:
        obj.attach()
        ring = obj.ring_buffer("events")
        batches = []
        for _ in range(200):
            os.getppid()
            batches.append(ring.read())
        batches.append(ring.poll(0.2))
        events = np.concatenate(batches)
        assert len(events) == 100_000 and obj.dropped() == 0
        assert np.array_equal(events["seq"], np.arange(100_000))


def test_fixed_size_records_across_the_rings_end(attached: BpfObject) -> None:
    """48-byte records wrap around the 64 KiB ring 70 times, most of those times across its end (the
    stride does not divide the size): each arrives whole and in order, those across the end as well."""
    ring = attached.ring_buffer("odd")
    attached.bss["odd_burst"] = 250
    batches = []
    for _ in range(400):
        os.getppid()
        batches.append(ring.read())
    attached.bss["odd_burst"] = 0
    attached.ring_buffer("events").read()
    events = np.concatenate(batches)
    assert attached.dropped() == 0 and ring.malformed == 0
    assert np.array_equal(events["seq"], np.arange(100_000))
    assert np.array_equal(events["tail"], ~np.arange(100_000, dtype=np.uint32))
    fill = np.frombuffer(events["fill"].tobytes(), dtype=np.uint8).reshape(-1, 28)
    low = (events["seq"] & 0xFF).astype(np.uint8)
    assert (
        np.array_equal(fill[:, 0], low) and np.array_equal(fill[:, 27], low) and (fill[:, 1:27] == 0xAB).all()
    )


def test_pending_counts_what_a_read_would_take(engine_obj: Path) -> None:
    with BpfObject(engine_obj, rodata={"bs_targ_tgid": os.getpid(), "burst": 300}) as obj:
        obj.attach()
        ring = obj.ring_buffer("events")
        for _ in range(3):
            os.getppid()
        assert ring.pending() == 900 and ring.pending() == 900  # counted, not consumed
        assert len(ring.read()) == 900 and ring.pending() == 0


def test_kernel_histograms_match_user_space(attached: BpfObject) -> None:
    """Values recorded by the BPF side land in the same slots Python computes, and the percentiles
    agree with numpy's on the same samples within the log-linear bucket error."""
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=11, sigma=1.5, size=3000).astype(np.uint64)
    values[:10] = [0, 1, 2, 15, 16, 17, 1 << 20, (1 << 40) + 12345, 999, 2**63 + 5]
    for v in values:
        attached.bss["hist_value"] = int(v)
        os.getppid()
    loglin = Histogram(attached.maps["latency"].lookup(0)["slots"], "loglin")
    log2 = Histogram(attached.maps["latency_log2"].lookup(0)["slots"], "log2")
    assert loglin == Histogram.from_values(values, "loglin")
    assert log2 == Histogram.from_values(values, "log2")
    assert loglin.total == log2.total == len(values)
    for q in (50, 90, 99, 99.9):
        truth = float(np.percentile(values.astype(np.float64), q, method="inverted_cdf"))
        ours = loglin.percentile(q)
        assert ours is not None and abs(ours - truth) <= truth / 16 + 1, q


def test_map_operations(attached: BpfObject) -> None:
    counts = attached.maps["counts"]
    for v in (3, 3, 3, 5):
        attached.bss["hist_value"] = v
        os.getppid()
    assert counts.lookup(3) == 3 and counts.lookup(5) == 1 and counts.lookup(4) is None
    counts.update(100, 42)
    assert counts.lookup(100) == 42
    keys, values = counts.items()
    assert dict(zip(keys.tolist(), values.tolist(), strict=True)) == {3: 3, 5: 1, 100: 42}
    assert sorted(int.from_bytes(k, "little") for k in counts.keys_bytes()) == [3, 5, 100]
    assert counts.delete(100) and not counts.delete(100)
    for key in range(200, 260):
        counts.update(key, key)
    # One system call for many keys; a key already gone does not stop the others.
    assert counts.delete_many([*range(200, 230), 999, *range(230, 250)]) == 50
    assert sorted(counts.items()[0].tolist()) == [3, 5, *range(250, 260)]
    counts.clear()
    assert len(counts.items()[0]) == 0


def test_batch_lookup_reads_many_entries(attached: BpfObject) -> None:
    counts = attached.maps["counts"]
    for k in range(1000):
        counts.update(k, k * 7)
    keys, values = counts.items()
    assert len(keys) == 1000
    assert dict(zip(keys.tolist(), values.tolist(), strict=True)) == {k: k * 7 for k in range(1000)}


def test_batch_lookup_grows_from_small_batches(attached: BpfObject, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches sized as for large entries: the first holds 16, each next one twice as many; every entry
    # is read once.
    monkeypatch.setattr(bpf, "_BATCH_START_BYTES", 0)
    counts = attached.maps["counts"]
    for k in range(1000):
        counts.update(k, k * 3)
    keys, values = counts.items()
    assert sorted(keys.tolist()) == list(range(1000))
    assert dict(zip(keys.tolist(), values.tolist(), strict=True)) == {k: k * 3 for k in range(1000)}


def test_recursion_misses_read_as_the_whole_info_says(attached: BpfObject) -> None:
    # Read again and again from the same buffer: the kernel reads the array lengths to fill from it
    # (a program with maps has nr_map_ids), so a buffer left as the last call filled it fails.
    assert any(p.info()["nr_map_ids"] for p in attached.programs.values())
    for program in attached.programs.values():
        info = program.info()
        for _ in range(3):
            assert program.missed == info["recursion_misses"]
    assert attached.missed() == sum(p.info()["recursion_misses"] for p in attached.programs.values())


def test_percpu_values_have_one_row_per_cpu(attached: BpfObject) -> None:
    for _ in range(10):
        os.getppid()
    per_cpu = attached.maps["percpu_hits"].lookup(0)
    assert per_cpu.shape == (os.cpu_count(),)
    assert int(per_cpu.sum()) == 10


def test_rodata_is_configuration_before_load_only(engine_obj: Path) -> None:
    with BpfObject(engine_obj, rodata={"burst": 9}) as obj:
        assert obj.rodata["burst"] == 9
        obj.load()
        assert obj.rodata["burst"] == 9
        with pytest.raises(BpfscopeError, match="read-only"):
            obj.rodata["burst"] = 3


def _prog_ids(name: str) -> set[int]:
    progs = json.loads(
        subprocess.run(["bpftool", "prog", "show", "-j"], check=True, capture_output=True).stdout
    )
    return {p["id"] for p in progs if p.get("name") == name}


def test_close_detaches(engine_obj: Path) -> None:
    before = _prog_ids("on_getppid")
    obj = BpfObject(engine_obj, rodata={"bs_targ_tgid": os.getpid()})
    obj.attach()
    os.getppid()
    assert obj.bss["produced"] == 1
    ours = _prog_ids("on_getppid") - before
    assert len(ours) == 1
    obj.close()
    obj.close()  # idempotent
    assert not ours & _prog_ids("on_getppid")


def test_variable_length_records_arrive_at_their_length(attached: BpfObject) -> None:
    """BS_RINGBUF_VAR: records cut to their length (bs_output) arrive zero-padded to the full struct,
    each with its length, byte for byte what the kernel sent."""
    ring = attached.ring_buffer("varlen")
    assert ring.variable
    lengths = [1, 7, 100, 255, 0]
    for n in lengths:
        attached.bss["var_len"] = n
        os.getppid()
    attached.bss["var_len"] = 0
    records = ring.poll(1.0)
    sent = [n for n in lengths if n]  # 0 sends nothing
    assert list(records["len"]) == sent
    assert list(records["_size"]) == [4 + n for n in sent]
    for record, n in zip(records, sent, strict=True):
        data = bytes(record["data"]).ljust(256, b"\0")
        assert data[:n] == bytes(range(1, n + 1)) and data[n:] == bytes(256 - n)
    assert ring.malformed == 0 and attached.dropped() == 0


def test_variable_length_records_across_the_rings_end(attached: BpfObject) -> None:
    """Records of every length wrap around the 64 KiB ring many times: each arrives whole, the ones
    across the ring's end joined from its two pieces."""
    ring, fixed = attached.ring_buffer("varlen"), attached.ring_buffer("events")
    sent: list[int] = []
    got: list[bytes] = []
    for i in range(3000):
        n = 1 + (i * 37) % 255
        attached.bss["var_len"] = n
        os.getppid()
        sent.append(n)
        if i % 50 == 49:
            got.extend(ring.read_sized())
            fixed.read()  # each call also sends a fixed-size event: read, not to fill that ring
    attached.bss["var_len"] = 0
    got.extend(ring.read_sized())
    assert attached.dropped() == 0 and ring.malformed == 0
    assert [len(record) for record in got] == [4 + n for n in sent]
    for record, n in zip(got, sent, strict=True):
        assert int.from_bytes(record[:4], "little") == n and record[4:] == bytes(range(1, n + 1))


def test_enums_are_read_from_btf(attached: BpfObject) -> None:
    assert attached.btf.enum("test_kind") == (("TEST_KIND_FIRST", 1), ("TEST_KIND_SECOND", 5))
