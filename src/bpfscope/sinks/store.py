"""The embedded store: records kept on disk, by kind and by hour, and queried with DuckDB.

Each kind of record (a :class:`~bpfscope.runtime.schema.Schema`) is a table, its columns made from
the schema's fields (int -> BIGINT, float -> DOUBLE, str and enum -> VARCHAR, bool -> BOOLEAN, list
and dict -> their JSON text as VARCHAR, which DuckDB's JSON functions read). A table is a directory
of Parquet files partitioned by hour::

    STORE/profile.stack/date=2026-12-06/hour=14/part-1796520000123-4242.parquet

Why files rather than one database file: DuckDB lets one process hold a database file for writing and
no other process read it meanwhile, while a store must be read (``bpfscope profile diff``, a report)
while the agent writes. A writer buffers records and flushes them every ``flush_s`` seconds as a new
file, written beside its final name and renamed into place (after an fsync), so a reader sees whole
files only, and ``kill -9`` loses at most the records since the last flush, never a file. Once an hour
is over, its files are merged into one (see :meth:`StoreWriter.merge_hours`): a query reads every
file's footer, and the agent flushes a file per table every 10 s. Retention deletes whole hours: older
than ``max_age_s``, then the oldest while the store is larger than ``max_bytes``.

    with Store("/var/lib/bpfscope/store") as store:
        rows = store.query('SELECT pid, sum(samples) FROM "profile.stack" GROUP BY pid')
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bpfscope.errors import BpfscopeError
from bpfscope.runtime.schema import RECORD_KEY, Schema
from bpfscope.runtime.session import Sink

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample
    from bpfscope.runtime.losses import Losses

T = TypeVar("T")

SQL_TYPES = {
    "int": "BIGINT",
    "float": "DOUBLE",
    "str": "VARCHAR",
    "enum": "VARCHAR",
    "bool": "BOOLEAN",
    "list": "JSON",
    "dict": "JSON",
}
# Flushed this often by default: a file per table and minute keeps a day of a continuous profile to
# about 1,500 small files, which DuckDB reads in one scan.
FLUSH_S = 60.0
# The writer's DuckDB memory at most (a flush of the agent's 20,000 pending records needs a few MB;
# beyond this it spills to disk rather than growing the process).
WRITER_MEMORY_LIMIT = "128MB"
# As written: a list or dict as its JSON text in a VARCHAR column (DuckDB's JSON functions and ->>
# take it as they take JSON). A cast to JSON parses every value, 2,048 at a time at about five times
# their size: 3,000 security exits (28 MB of JSON) needed more than 122 MB, and read back as JSON
# lines before, as much. Files written before, with JSON columns, read together with these as JSON.
WRITTEN_TYPES = {**SQL_TYPES, "list": "VARCHAR", "dict": "VARCHAR"}
# A row group of at most 8 MB: DuckDB buffers a row group's column whole (122,880 rows by default), and
# 3,000 security exits of 21 kB each asked for one 70 MB block.
PARQUET = "FORMAT parquet, ROW_GROUP_SIZE_BYTES '8MB'"
# A file holds the rows of at most this much JSON text (their lists and dicts): a table's batch is
# encoded and written one file at a time. In one piece, 30,692 security exits of 23 kB each (705 MB of
# JSON: a test's 30,000 processes ending together) took the agent from 300 MB to 1.0 GB of RSS.
FILE_JSON_BYTES = 16 << 20
# Retention measures the store's size (a stat of every file) this often; between, it counts what it wrote.
RESCAN_S = 600.0
# Retention and the merging of hours run at most this often, not at every flush: each looks at every
# hour of every table (a week of the agent's 18 tables is 3,000 hour directories).
MAINTAIN_S = 60.0
# An hour's files are merged once the hour has been over this long: a flush can still bring it records
# stamped before its end.
MERGE_AFTER_S = 120.0
# One merge reads at most this much Parquet (consecutive files; a larger one stays as it is), and one
# maintenance merges hours for at most this long, the oldest first (a backlog takes several).
MERGE_GROUP_BYTES = 64 << 20
MERGE_BUDGET_S = 0.5
_TABLE = re.compile(r"[a-z][a-z0-9_.]*")


def retried(read: Callable[[], T]) -> T:
    """``read()``, again if a file it listed was gone when it came to open it: an hour merged
    (StoreWriter.merge_hours) or deleted by retention while the query ran."""
    import duckdb

    try:
        return read()
    except duckdb.IOException:
        return read()


def _hour(ts: float) -> tuple[str, str]:
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%H")


def _hour_of(hour: int) -> tuple[str, str]:
    """``_hour`` of an hour since the epoch."""
    return _hour(hour * 3600.0)


class Store:
    """A store directory: tables of records, written by at most one :class:`StoreWriter` at a time and
    read by any number of processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # --- reading -------------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and _TABLE.fullmatch(p.name))

    def connect(self, only: Iterable[str] | None = None, memory_limit: str | None = None) -> Any:
        """An in-memory DuckDB connection with one view per table (its name quoted: "profile.stack"), or
        per table of ``only`` (a query that names its tables need not list every table's files).
        ``memory_limit`` bounds DuckDB's memory (its default is 80% of the machine's): a query past it
        spills to disk or fails, where the process reading would have grown."""
        import duckdb

        con = duckdb.connect(":memory:", config={"memory_limit": memory_limit} if memory_limit else {})
        for table in self.tables() if only is None else [t for t in only if t in self.tables()]:
            files = list((self.path / table).glob("date=*/hour=*/*.parquet"))
            if not files:
                continue
            pattern = str(self.path / table / "date=*" / "hour=*" / "*.parquet").replace("'", "''")
            con.execute(
                f"CREATE VIEW \"{table}\" AS SELECT * FROM read_parquet('{pattern}', "
                "hive_partitioning = true, union_by_name = true)"
            )
        return con

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        def read() -> list[tuple[Any, ...]]:
            con = self.connect()
            try:
                return con.execute(sql, list(params)).fetchall()
            finally:
                con.close()

        return retried(read)

    def records(
        self,
        schema: Schema,
        start: float | None = None,
        end: float | None = None,
        where: str = "",
        params: Iterable[Any] = (),
    ) -> list[dict[str, Any]]:
        """The records of one kind whose ``ts`` is in [start, end), as the collector made them (JSON
        columns decoded)."""
        if schema.name not in self.tables():
            return []
        conditions = [c for c in (where, "ts >= ?" if start else "", "ts < ?" if end else "") if c]
        args = [*params, *([start] if start else []), *([end] if end else [])]
        names = ", ".join(f'"{f.name}"' for f in schema.fields)
        sql = f'SELECT {names} FROM "{schema.name}"' + (
            f" WHERE {' AND '.join(conditions)}" if conditions else ""
        )

        def read() -> list[tuple[Any, ...]]:
            con = self.connect()
            try:
                return con.execute(sql + " ORDER BY ts", args).fetchall()
            finally:
                con.close()

        rows = retried(read)
        decode = [f.type in ("list", "dict") for f in schema.fields]
        out = []
        for row in rows:
            values = {
                f.name: json.loads(v) if json_field and isinstance(v, str) else v
                for f, v, json_field in zip(schema.fields, row, decode, strict=True)
            }
            out.append(schema.record(values))
        return out

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*/date=*/hour=*/*.parquet"))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class StoreWriter:
    """Buffers records of declared schemas and flushes them to the store as Parquet files."""

    def __init__(
        self,
        path: str | Path,
        schemas: Iterable[Schema],
        flush_s: float = FLUSH_S,
        max_age_s: float | None = None,
        max_bytes: int | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.store = Store(path)
        self.store.path.mkdir(parents=True, exist_ok=True)
        self.schemas = {s.name: s for s in schemas}
        for name in self.schemas:
            if not _TABLE.fullmatch(name):
                raise BpfscopeError(f"cannot store records named {name!r}")
        self.flush_s = flush_s
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        # Records buffered at most (None: no limit): past it a flush comes early, so a burst of records
        # costs files, not memory.
        self.max_pending = max_pending
        self.pending_rows = 0
        # By table and hour since the epoch (a record's date and hour strings are made once per hour
        # at the flush, not per record: datetime and strftime were 1.2% of the agent's samples).
        self.pending: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
        self.last_flush = time.monotonic()
        self.files_written = 0
        self.rows_written = 0
        self.dropped_rows = 0  # records a failed write lost (see flush)
        self.failed_writes = 0
        self.last_error = ""
        self._con: Any = None  # one DuckDB connection for every flush (see _connection)
        # The store's size as retention last measured it, plus what was written since: a rescan (a
        # stat of every file) every RESCAN_S, not every flush.
        self._size: int | None = None
        self._size_at = 0.0
        self._maintained = -MAINTAIN_S  # at the first flush, then every MAINTAIN_S
        self._merged: set[Path] = set()  # hours with one file each, merged or not (none to merge)
        self._finish_merges()

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        pending = self.pending
        for record in records:
            schema = self.schemas.get(record.get(RECORD_KEY, ""))
            if schema is None:
                continue  # a kind of record this store was not made for (losses go to the terminal)
            # Kept as they come, not copied: records are made for the sinks and not changed after.
            pending.setdefault((schema.name, int(float(record["ts"]) // 3600)), []).append(record)
            self.pending_rows += 1
        if time.monotonic() - self.last_flush >= self.flush_s or (
            self.max_pending is not None and self.pending_rows >= self.max_pending
        ):
            self.flush()

    def flush(self, maintain_now: bool = False) -> None:
        """Every buffered record to disk (one new file per table and hour), then the retention and the
        merging of hours over, when their minute has come (or now)."""
        import duckdb

        pending, self.pending = self.pending, {}
        self.pending_rows = 0
        self.last_flush = time.monotonic()
        for (table, hour), rows in pending.items():
            schema = self.schemas[table]
            for piece, texts in _pieces(schema, rows, FILE_JSON_BYTES):
                try:
                    self._write(self._connection(), schema, *_hour_of(hour), piece, texts)
                except (duckdb.Error, OSError) as exc:
                    # A file that cannot be written (DuckDB past its memory limit, a full disk) is
                    # counted and the others are written: raised, it ended the agent from whichever
                    # sink's add() had filled the buffer.
                    self._close_connection()  # a fresh one for the next
                    self.dropped_rows += len(piece)
                    self.failed_writes += 1
                    self.last_error = f"{table}: {str(exc).splitlines()[0]}"
        self.maintain(force=maintain_now)

    def maintain(self, force: bool = False) -> None:
        """Retention, then the merging of the hours that are over: every MAINTAIN_S (or now)."""
        if not force and time.monotonic() - self._maintained < MAINTAIN_S:
            return
        self._maintained = time.monotonic()
        self.apply_retention()
        self.merge_hours()

    def _connection(self) -> Any:
        """The writer's DuckDB connection, kept from flush to flush: a new one per flush cost 27 ms of CPU
        (a third of a flush of 5,000 request records), and its buffers came and went from the heap
        every 10 s. One thread (a flush is a few MB, and the agent's other work needs the second CPU
        more than a flush does) and a memory limit: past it DuckDB spills to the store's disk, not RSS."""
        if self._con is None:
            import duckdb

            self._con = duckdb.connect(
                ":memory:",
                config={
                    "threads": 1,
                    "memory_limit": WRITER_MEMORY_LIMIT,
                    "preserve_insertion_order": True,
                    # DuckDB's allocator (its own jemalloc, which malloc_trim does not reach) keeps
                    # freed memory for reuse up to 128-512 MB by default; past 16 MB it gives it back
                    # after the flush.
                    "allocator_flush_threshold": "16MB",
                    "allocator_bulk_deallocation_flush_threshold": "16MB",
                },
            )
        return self._con

    def _close_connection(self) -> None:
        if self._con is not None:
            with contextlib.suppress(Exception):
                self._con.close()
            self._con = None

    def _copy_columns(
        self,
        con: Any,
        schema: Schema,
        rows: list[Mapping[str, Any]],
        written: Path,
        texts: Mapping[str, list[str | None]] | None = None,
    ) -> bool:
        """The rows into ``written`` column by column from memory: half the CPU of a JSON line per
        record read back by DuckDB (58 ms against 118 ms for 5,000 request records), and no file to
        stage. False when a value does not fit its column: the caller goes through JSON."""
        import duckdb

        columns = _columns(schema, rows, texts)
        if columns is None:
            return False
        # A typed array is its column's type already; objects are cast (DuckDB would guess their type).
        cast = ", ".join(
            f'CAST("{f.name}" AS {WRITTEN_TYPES[f.type]}) AS "{f.name}"'
            if columns[f.name].dtype == object
            else f'"{f.name}"'
            for f in schema.fields
        )
        # Found by DuckDB by its name in this frame (a replacement scan): registering and unregistering
        # it cost 0.9 ms of the 2.6 a small file's copy took.
        staged = columns  # noqa: F841
        try:
            con.execute(f"COPY (SELECT {cast} FROM staged) TO '{_quote(written)}' ({PARQUET})")
        except duckdb.Error:
            written.unlink(missing_ok=True)
            return False
        return True

    def _write(
        self,
        con: Any,
        schema: Schema,
        date: str,
        hour: str,
        rows: list[Mapping[str, Any]],
        texts: Mapping[str, list[str | None]] | None = None,
    ) -> None:
        directory = self.store.path / schema.name / f"date={date}" / f"hour={hour}"
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"part-{time.time_ns()}-{os.getpid()}"
        staged = directory / f".{stem}.jsonl"
        written = directory / f".{stem}.parquet.tmp"
        final = directory / f"{stem}.parquet"
        try:
            if not self._copy_columns(con, schema, rows, written, texts):
                nested = {f.name for f in schema.fields if f.type in ("list", "dict")}
                with open(staged, "w") as f:
                    for row in rows:
                        values = {n: row.get(n) for n in schema.names}
                        for n in nested:
                            values[n] = None if values[n] is None else json.dumps(values[n])
                        f.write(json.dumps(values) + "\n")
                columns_sql = ", ".join(f"'{f.name}': '{WRITTEN_TYPES[f.type]}'" for f in schema.fields)
                con.execute(
                    f"COPY (SELECT * FROM read_json('{_quote(staged)}', format = 'newline_delimited', "
                    f"columns = {{{columns_sql}}})) TO '{_quote(written)}' ({PARQUET})"
                )
            # On disk before it has its name: a crash leaves a hidden temporary, never a torn file.
            _fsync(written)
            os.replace(written, final)
            _fsync(directory)
        finally:
            staged.unlink(missing_ok=True)
            written.unlink(missing_ok=True)
        self.files_written += 1
        self.rows_written += len(rows)
        self._merged.discard(directory)  # a late record's file: the hour is merged again
        if self._size is not None:
            with contextlib.suppress(OSError):
                self._size += final.stat().st_size

    # --- retention -----------------------------------------------------------------------------------
    def hours(self) -> list[tuple[float, Path]]:
        """Every hour partition of every table, with the start of its hour (epoch seconds)."""
        out = []
        for hour_dir in self.store.path.glob("*/date=*/hour=*"):
            with contextlib.suppress(ValueError):
                year, month, day = hour_dir.parent.name.removeprefix("date=").split("-")
                hour = int(hour_dir.name.removeprefix("hour="))
                start = datetime(int(year), int(month), int(day), hour, tzinfo=UTC)
                out.append((start.timestamp(), hour_dir))
        return sorted(out)

    def apply_retention(self, now: float | None = None) -> list[Path]:
        """Delete hours past the age limit, then the oldest hours while over the size limit (never the
        current hour)."""
        now = time.time() if now is None else now
        current = datetime.fromtimestamp(now, tz=UTC).replace(minute=0, second=0, microsecond=0)
        removed = []
        hours = [(start, path) for start, path in self.hours() if start < current.timestamp()]
        if self.max_age_s is not None:
            for start, path in list(hours):
                if start + 3600 <= now - self.max_age_s:
                    removed.append(path)
                    hours.remove((start, path))
        if self.max_bytes is not None:
            total = self._store_size(now) - sum(_size(p) for p in removed)
            for _, path in list(hours):
                if total <= self.max_bytes:
                    break
                total -= _size(path)
                removed.append(path)
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the day, once its last hour has gone
        if removed:
            self._size = None
        return removed

    def _store_size(self, now: float) -> int:
        """The store's size: measured (every file's stat) at most every RESCAN_S, counted in between.
        A stat of every file at each flush grew with the store: after an hour of the agent, thousands
        of files every 10 s."""
        if self._size is None or now - self._size_at >= RESCAN_S:
            self._size, self._size_at = self.store.size(), now
        return self._size

    # --- merging -------------------------------------------------------------------------------------
    def merge_hours(self, now: float | None = None, budget_s: float = MERGE_BUDGET_S) -> list[Path]:
        """Merge the files of each hour over for MERGE_AFTER_S into one (by MERGE_GROUP_BYTES of input),
        the oldest first, for at most ``budget_s``. The hours merged.

        A query reads every file's footer: 0.19-0.22 ms a file here, so an hour of the agent's
        10-s flushes (360 files a table) added about 70 ms to every query of the table, a day 1.7 s
        (benchmarks/store_files.py). The merged hour replaces the hour's directory by two renames, so
        a reader sees the hour's files before or after, never both (a query that listed the files
        just before may fail to open one: :func:`retried` runs it again). A merge cut short is finished
        or undone when a writer next opens the store (:meth:`_finish_merges`)."""
        import duckdb

        now = time.time() if now is None else now
        began = time.monotonic()
        merged = []
        hours = self.hours()
        self._merged.intersection_update(hour_dir for _, hour_dir in hours)  # retention's gone
        for start, hour_dir in hours:
            if start + 3600 + MERGE_AFTER_S > now:
                break  # sorted: the rest are later
            if hour_dir in self._merged:
                continue
            if time.monotonic() - began >= budget_s:
                break
            try:
                if self._merge_hour(hour_dir):
                    merged.append(hour_dir)
            except (duckdb.Error, OSError) as exc:
                # The hour as it was, or merged if only the swap failed (tried again once a file is
                # added to it).
                with contextlib.suppress(OSError):
                    self._finish_merge(hour_dir)
                self._close_connection()
                self.last_error = f"merging {hour_dir}: {str(exc).splitlines()[0]}"
            self._merged.add(hour_dir)
        if merged:
            self._size = None  # measured again at the next retention
        return merged

    def _merge_hour(self, hour_dir: Path) -> bool:
        files = sorted(hour_dir.glob("*.parquet"))
        groups = _groups(files, MERGE_GROUP_BYTES)
        if all(len(group) == 1 for group in groups):
            return False
        new, old = _merging(hour_dir)
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for group in groups:
            if len(group) == 1:
                os.link(group[0], new / group[0].name)
                continue
            written = new / f".{group[0].stem}-merged.parquet.tmp"
            listed = ", ".join(f"'{_quote(f)}'" for f in group)
            self._connection().execute(
                f"COPY (SELECT * FROM read_parquet([{listed}], hive_partitioning = false, "
                f"union_by_name = true)) TO '{_quote(written)}' ({PARQUET})"
            )
            _fsync(written)
            os.replace(written, written.with_name(written.name[1:].removesuffix(".tmp")))
        _fsync(new)
        os.rename(hour_dir, old)
        os.rename(new, hour_dir)
        _fsync(hour_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
        return True

    def _finish_merges(self) -> None:
        """Every merge a crash cut short (its directories left beside the hour's)."""
        for leftover in list(self.store.path.glob("*/date=*/.hour=*.*")):
            if leftover.exists():  # else handled with its pair
                self._finish_merge(leftover.with_name(leftover.name[1:].rsplit(".", 1)[0]))

    @staticmethod
    def _finish_merge(hour_dir: Path) -> None:
        """A merge cut short: before the swap, the hour is as it was and the merge is dropped; between
        its two renames (the merged directory is whole by then), the merged hour is put in place."""
        new, old = _merging(hour_dir)
        if not hour_dir.exists() and (new.exists() or old.exists()):
            os.rename(new if new.exists() else old, hour_dir)
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        try:
            self.flush(maintain_now=True)  # a run shorter than MAINTAIN_S keeps its retention too
        finally:
            self._close_connection()


def _pieces(
    schema: Schema, rows: list[Mapping[str, Any]], limit: int = FILE_JSON_BYTES
) -> Iterator[tuple[list[Mapping[str, Any]], dict[str, list[str | None]]]]:
    """The rows in pieces of at most about ``limit`` bytes of JSON text (a piece ends at the row that
    passes it), each with its lists' and dicts' JSON text by field, made once and only for the piece
    being written. A schema without lists or dicts is one piece: its rows are small."""
    nested = [f.name for f in schema.fields if f.type in ("list", "dict")]
    if not nested:
        yield rows, {}
        return
    start, size = 0, 0
    texts: dict[str, list[str | None]] = {name: [] for name in nested}
    for i, row in enumerate(rows):
        for name in nested:
            value = row.get(name)
            text = None if value is None else json.dumps(value)
            texts[name].append(text)
            size += len(text) if text is not None else 0
        if size >= limit:
            yield rows[start : i + 1], texts
            start, size = i + 1, 0
            texts = {name: [] for name in nested}
    if start < len(rows):
        yield rows[start:], texts


def _columns(
    schema: Schema, rows: list[Mapping[str, Any]], texts: Mapping[str, list[str | None]] | None = None
) -> dict[str, Any] | None:
    """The rows as one NumPy array per field, for DuckDB to scan (None: a value NumPy cannot hold as
    its field's type says, and the rows go through JSON instead). A number column with no gap is typed
    (int64, float64); a column with a gap, a string or a JSON column is of Python objects, which
    DuckDB casts to the field's type. ``texts``: the lists' and dicts' JSON text already made."""
    import numpy as np

    out: dict[str, Any] = {}
    try:
        for f in schema.fields:
            if texts is not None and f.name in texts:
                out[f.name] = np.array(texts[f.name], dtype=object)
                continue
            values = [row.get(f.name) for row in rows]
            if f.type in ("list", "dict"):
                values = [None if v is None else json.dumps(v) for v in values]
                out[f.name] = np.array(values, dtype=object)
            elif f.type in ("int", "float", "bool") and None not in values:
                kind = {"int": np.int64, "float": np.float64, "bool": np.bool_}[f.type]
                out[f.name] = np.array(values, dtype=kind)
            elif f.type in ("int", "float", "bool"):
                # With a gap: objects, but each of the field's type (DuckDB guesses an object column's
                # type from its values; a bool among ints, or an int among floats, would sway it).
                convert = {"int": int, "float": float, "bool": bool}[f.type]
                out[f.name] = np.array([None if v is None else convert(v) for v in values], dtype=object)
            else:
                out[f.name] = np.array([None if v is None else str(v) for v in values], dtype=object)
    except (OverflowError, TypeError, ValueError):
        return None
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.parquet"))


def _groups(files: list[Path], limit: int) -> list[list[Path]]:
    """Consecutive files in groups of at most ``limit`` bytes (a larger file alone)."""
    groups: list[list[Path]] = []
    size = 0
    for f in files:
        n = f.stat().st_size
        if not groups or size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += n
    return groups


def _merging(hour_dir: Path) -> tuple[Path, Path]:
    """An hour's merged directory while it is made, and its files while the merged one takes their
    place: hidden, so that neither readers' globs (hour=*) nor the hour listing see them."""
    return hour_dir.with_name(f".{hour_dir.name}.new"), hour_dir.with_name(f".{hour_dir.name}.old")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


class StoreSink(Sink):
    """Every record of the collectors' declared schemas into a store (flushed every ``flush_s``, and at
    the end)."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer

    def emit(self, collector: Collector, sample: Sample) -> None:
        self.writer.add(sample.records())

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def parse_size(text: str) -> int:
    """``500MB``, ``2G``, ``1024`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise BpfscopeError(f"not a size: {text!r} (say 500MB or 2GB)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise BpfscopeError(f"not an age: {text!r} (say 7d, 12h or 30m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


__all__ = ["Store", "StoreSink", "StoreWriter", "parse_age", "parse_size"]
