"""The store on real files: tables made from schemas, records back as they went in, retention by age
and by size, readers in other processes while a writer writes, and a writer killed with SIGKILL (at
most its last flush lost, never a torn file)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bpfscope.errors import BpfscopeError
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks import store as store_mod
from bpfscope.sinks.store import Store, StoreWriter, parse_age, parse_size

SCHEMA = Schema(
    "test.row",
    (
        Field("pid", "int", label=True),
        Field("name", "str"),
        Field("share", "float", nullable=True),
        Field("ok", "bool"),
        Field("frames", "list"),
        Field("reasons", "dict"),
    ),
    interval=True,
)
HOUR = 3600.0
BASE = 1_796_000_000.0 - 1_796_000_000.0 % HOUR  # the start of an hour


def row(ts: float, pid: int = 1) -> dict:
    return SCHEMA.record(
        {
            "ts": ts,
            "interval_s": 10.0,
            "pid": pid,
            "name": "a'b",
            "share": None if pid % 2 else 0.5,
            "ok": True,
            "frames": [3, 2, 1],
            "reasons": {"stripped": 2},
        }
    )


def test_records_come_back_as_they_went_in(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path, [SCHEMA])
    records = [row(BASE + i, pid=i) for i in range(5)]
    writer.add(records)
    writer.flush()
    store = Store(tmp_path)
    assert store.tables() == ["test.row"]
    assert store.records(SCHEMA) == records
    assert store.records(SCHEMA, start=BASE + 1, end=BASE + 3) == records[1:3]
    assert store.records(SCHEMA, where="pid = ?", params=[4]) == records[4:]
    columns = dict(store.query('SELECT column_name, column_type FROM (DESCRIBE "test.row")'))
    assert columns["pid"] == "BIGINT" and columns["share"] == "DOUBLE" and columns["ok"] == "BOOLEAN"


GAPS = Schema(
    "test.gaps",
    (
        Field("n", "int", nullable=True),
        Field("big", "int"),
        Field("share", "float", nullable=True),
        Field("ok", "bool", nullable=True),
        Field("name", "str", nullable=True),
        Field("frames", "list", nullable=True),
    ),
)


@pytest.mark.parametrize("staging", ["columns", "json"])
def test_gaps_and_wide_values_either_way(
    tmp_path: Path, staging: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records go to DuckDB as NumPy columns, or as JSON lines when a value does not fit its column:
    either way they come back as they went in (gaps, 64-bit values, a column with no value at all)."""
    if staging == "json":
        monkeypatch.setattr(store_mod, "_columns", lambda schema, rows, texts=None: None)
    records = [
        GAPS.record(
            {
                "ts": BASE + i,
                "n": None if i % 2 else i,
                "big": 2**62 + i,
                "share": None if i == 1 else i / 4,
                "ok": None if i == 2 else bool(i % 3),
                "name": None,
                "frames": None if i == 3 else [i, "x"],
            }
        )
        for i in range(1500)  # past DuckDB's sample of an object column's values
    ]
    writer = StoreWriter(tmp_path, [GAPS])
    writer.add(records)
    writer.close()
    assert Store(tmp_path).records(GAPS) == records


def test_partitions_by_hour_and_keeps_by_age_and_size(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path, [SCHEMA])
    for hour in range(5):
        writer.add([row(BASE + hour * HOUR + i) for i in range(200)])
        writer.flush()
    assert len(writer.hours()) == 5
    writer.max_age_s = 2 * HOUR
    removed = writer.apply_retention(now=BASE + 4 * HOUR + 10)
    # Hours wholly older than two hours go: 0 and 1 (hour 2 ended 2 hours before hour 4 began + 10 s).
    assert len(removed) == 2 and len(writer.hours()) == 3
    writer.max_age_s = None
    one_hour = writer.store.size() // 3
    writer.max_bytes = one_hour + one_hour // 2
    writer.apply_retention(now=BASE + 4 * HOUR + 10)
    # The oldest go first, never the current hour.
    assert [start for start, _ in writer.hours()] == [BASE + 4 * HOUR]


def _files_by_hour(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in root.glob("*/date=*/hour=*/*.parquet"):
        out[f.parent.name] = out.get(f.parent.name, 0) + 1
    return out


def _write_hours(writer: StoreWriter, hours: int, flushes: int) -> list[dict]:
    """``flushes`` files in each of ``hours`` hours from BASE: the records written, in time order."""
    records = []
    for hour in range(hours):
        for flush in range(flushes):
            batch = [row(BASE + hour * HOUR + flush * 10 + i, pid=flush * 10 + i) for i in range(5)]
            writer.add(batch)
            writer.flush()
            records += batch
    return records


def test_an_hour_over_is_merged_into_one_file_that_reads_the_same(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path, [SCHEMA])
    records = _write_hours(writer, hours=2, flushes=4)
    first, second = sorted(_files_by_hour(tmp_path))
    assert _files_by_hour(tmp_path) == {first: 4, second: 4}
    # The second hour has not been over for MERGE_AFTER_S yet: a flush may still bring it records.
    merged = writer.merge_hours(now=BASE + 2 * HOUR + store_mod.MERGE_AFTER_S - 1)
    assert [p.name for p in merged] == [first]
    assert _files_by_hour(tmp_path) == {first: 1, second: 4}
    assert Store(tmp_path).records(SCHEMA) == records
    assert [p.name for p in writer.merge_hours(now=BASE + 3 * HOUR)] == [second]
    assert writer.merge_hours(now=BASE + 3 * HOUR) == []  # nothing new
    # A late record of the first hour: a second file there, merged again.
    late = row(BASE + 35.5, pid=99)
    writer.add([late])
    writer.flush()
    assert [p.name for p in writer.merge_hours(now=BASE + 3 * HOUR)] == [first]
    assert _files_by_hour(tmp_path) == {first: 1, second: 1}
    assert Store(tmp_path).records(SCHEMA) == sorted([*records, late], key=lambda r: r["ts"])
    assert not [p for p in tmp_path.rglob(".*")]  # no directory or file of the merge left


class _Killed(BaseException):
    """The writer killed at a step of a merge."""


@pytest.mark.parametrize("cut", ["before the swap", "between the renames", "after the swap"])
def test_a_merge_cut_short_is_undone_or_finished_by_the_next_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    writer = StoreWriter(tmp_path, [SCHEMA])
    records = _write_hours(writer, hours=1, flushes=3)
    renames = []

    def rename(src: Path, dst: Path) -> None:
        renames.append(dst)
        if (cut == "before the swap" and len(renames) == 1) or (
            cut == "between the renames" and len(renames) == 2
        ):
            raise _Killed
        os_rename(src, dst)

    def rmtree(path: Path, ignore_errors: bool = False) -> None:
        if cut == "after the swap" and path.name.endswith(".old"):
            raise _Killed
        shutil_rmtree(path, ignore_errors=ignore_errors)

    os_rename, shutil_rmtree = store_mod.os.rename, store_mod.shutil.rmtree
    monkeypatch.setattr(store_mod.os, "rename", rename)
    monkeypatch.setattr(store_mod.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        writer.merge_hours(now=BASE + 2 * HOUR)
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob(".*") if p.is_dir()]  # the merge's directories left
    StoreWriter(tmp_path, [SCHEMA])  # the next writer
    assert not [p for p in tmp_path.rglob(".*")]
    assert list(_files_by_hour(tmp_path).values()) == [3 if cut == "before the swap" else 1]
    assert Store(tmp_path).records(SCHEMA) == records


def test_a_merge_that_fails_leaves_the_hour_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write of the merged file drops the merge; a failed swap puts the merged hour in place."""
    import duckdb

    writer = StoreWriter(tmp_path, [SCHEMA])
    records = _write_hours(writer, hours=1, flushes=3)
    os_rename, connection = store_mod.os.rename, writer._connection
    renames = []

    def rename(src: Path, dst: Path) -> None:
        renames.append(dst)
        if len(renames) == 2:  # the merged directory into the hour's place
            raise OSError("test")
        os_rename(src, dst)

    class Failing:
        def execute(self, sql: str) -> None:
            raise duckdb.IOException("IO Error: test")

    monkeypatch.setattr(writer, "_connection", Failing)
    assert writer.merge_hours(now=BASE + 2 * HOUR) == []
    assert writer.last_error.endswith("IO Error: test")
    assert list(_files_by_hour(tmp_path).values()) == [3]
    monkeypatch.setattr(writer, "_connection", connection)
    writer.add([row(BASE + 100, pid=42)])  # a new file: the hour is tried again
    writer.flush()
    records = sorted([*records, row(BASE + 100, pid=42)], key=lambda r: r["ts"])
    monkeypatch.setattr(store_mod.os, "rename", rename)
    assert writer.merge_hours(now=BASE + 2 * HOUR) == []
    monkeypatch.undo()
    assert writer.last_error.endswith("test") and len(renames) == 3
    assert list(_files_by_hour(tmp_path).values()) == [1]
    assert not [p for p in tmp_path.rglob(".*")]
    assert Store(tmp_path).records(SCHEMA) == records


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store import SCHEMA, row
    from bpfscope.sinks.store import StoreWriter
    writer = StoreWriter(sys.argv[1], [SCHEMA], flush_s=0.05)
    print("ready", flush=True)
    i = 0
    while True:
        writer.add([row(time.time(), pid=i) for _ in range(50)])
        i += 1
        time.sleep(0.01)
    """
)


READER = """import sys
from bpfscope.sinks.store import Store
print(Store(sys.argv[1]).query('SELECT count(*) FROM "test.row"')[0][0])
"""


def test_readers_while_a_writer_writes_and_after_kill_9(tmp_path: Path) -> None:
    script = WRITER.format(tests=str(Path(__file__).parent))
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        counts = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            # Another process reads whole files only, however the writer is placed.
            out = subprocess.run(
                [sys.executable, "-c", READER, str(tmp_path)], capture_output=True, text=True, timeout=60
            )
            if out.returncode == 0:
                counts.append(int(out.stdout))
            else:
                assert "test.row" in out.stderr, out.stderr  # no file flushed yet: no view
        assert counts and all(n % 50 == 0 for n in counts) and counts == sorted(counts), counts
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
    left = [p.name for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".parquet")]
    store = Store(tmp_path)
    total = store.query('SELECT count(*) FROM "test.row"')[0][0]
    assert total >= counts[-1] and total % 50 == 0
    # Only hidden temporaries may remain of the flush the kill cut short; readers never see them.
    assert all(name.startswith(".") for name in left), left


def test_sizes_and_ages() -> None:
    assert parse_size("500MB") == 500 << 20 and parse_size("2g") == 2 << 30 and parse_size("1024") == 1024
    assert parse_age("7d") == 7 * 86400 and parse_age("30m") == 1800 and parse_age("90") == 90
    for bad in ("lots", "-1d"):
        with pytest.raises(BpfscopeError):
            parse_age(bad)
    with pytest.raises(BpfscopeError):
        parse_size("big")


def test_a_batch_that_cannot_be_written_is_counted_and_the_others_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb

    other = Schema("test.other", (Field("n", "int"),))
    writer = StoreWriter(tmp_path, [SCHEMA, other])
    write = writer._write

    def failing(con: object, schema: Schema, date: str, hour: str, rows: list, texts: dict) -> None:
        if schema is SCHEMA:
            raise duckdb.OutOfMemoryException("Out of Memory Error: test")
        write(con, schema, date, hour, rows, texts)

    monkeypatch.setattr(writer, "_write", failing)
    writer.add([row(BASE + i, pid=i) for i in range(3)])
    writer.add([other.record({"ts": BASE, "n": 7})])
    writer.flush()
    assert (writer.dropped_rows, writer.failed_writes) == (3, 1)
    assert writer.last_error == "test.row: Out of Memory Error: test"
    assert Store(tmp_path).query('SELECT n FROM "test.other"') == [(7,)]


def test_a_large_batch_is_written_in_pieces_of_bounded_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table's batch is encoded and written a file at a time, each of at most about FILE_JSON_BYTES of
    JSON text: an exec storm's exits in one piece were 705 MB of JSON at once. Every record comes back
    in order, and a piece that cannot be written loses only its own rows (counted)."""
    import duckdb

    big = {"process": {"binary": "/usr/bin/x", "arguments": "y" * 900}}
    records = [BIG.record({"ts": BASE + i, "n": i, "body": big}) for i in range(100)]
    size = len(json.dumps(big))
    monkeypatch.setattr(store_mod, "FILE_JSON_BYTES", 10 * size)
    pieces = list(store_mod._pieces(BIG, records, 10 * size))
    assert [len(rows) for rows, _ in pieces] == [10] * 10
    assert all(texts["body"] == [json.dumps(big)] * 10 for _, texts in pieces)
    plain = Schema("test.plain", (Field("n", "int"),))
    assert [
        len(rows) for rows, _ in store_mod._pieces(plain, [plain.record({"ts": BASE, "n": 1})] * 7, 1)
    ] == [7]

    writer = StoreWriter(tmp_path, [BIG])
    write, calls = writer._write, []

    def third_fails(con: object, schema: Schema, date: str, hour: str, rows: list, texts: dict) -> None:
        calls.append(len(rows))
        if len(calls) == 3:
            raise duckdb.OutOfMemoryException("Out of Memory Error: test")
        write(con, schema, date, hour, rows, texts)

    monkeypatch.setattr(writer, "_write", third_fails)
    writer.add(records)
    writer.flush()
    assert calls == [10] * 10
    assert (writer.files_written, writer.rows_written, writer.dropped_rows) == (9, 90, 10)
    assert Store(tmp_path).records(BIG) == records[:20] + records[30:]


BIG = Schema("test.big", (Field("n", "int"), Field("body", "dict")))
