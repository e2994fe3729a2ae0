"""bpfscope trace: one-liners on any tracepoint, without a compiler.

One precompiled program (trace.bpf.c) is configured at load time from the tracepoint's format file:
fields, filter, keys and aggregation are constants the verifier sees, so filtered events cost almost
nothing and no code is generated per query. :class:`TraceCollector` runs one query: an interval
collector when it counts, sums or histograms per key (maps read and differenced each interval), a stream
when it prints each event (a ring buffer). Its records' schema is the query's own (trace_query.py).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.block.disks import DiskNames
from bpfscope.domains.trace.trace_bpftrace import BPFTRACE_SCHEMAS
from bpfscope.domains.trace.trace_query import FieldRef, Limits, Query, query_schema
from bpfscope.engine.tracepoint import Tracepoint, matching, parse_name
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample, wall_clock_offset_ns
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.bpf import BpfObject
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.hist import Histogram
    from bpfscope.runtime.losses import Losses

PERCENTILES = (50, 95, 99)
# Integer fields whose negative values are -errno.
_ERRNO_FIELDS = {"ret", "error", "err", "rc"}
# What an event record (struct tr_event) holds of each builtin, by field kind.
_BUILTIN_COLUMNS = {
    "TR_BUILTIN_PID": "pid",
    "TR_BUILTIN_TID": "tid",
    "TR_BUILTIN_CPU": "cpu",
    "TR_BUILTIN_UID": "uid",
    "TR_BUILTIN_CGROUP": "cgroup",
    "TR_BUILTIN_COMM": "comm",
}

# --list and --info write records too.
TRACEPOINT_SCHEMA = Schema(
    "trace.tracepoint", (Field("tracepoint", "str", label=True),), doc="A tracepoint --list found."
)
FIELD_SCHEMA = Schema(
    "trace.field",
    (
        Field("tracepoint", "str", label=True),
        Field("field", "str", label=True),
        Field("type", "str", doc="its C type, as the format file gives it"),
        Field("offset", "int", "bytes", "in the tracepoint's record"),
        Field("size", "int", "bytes"),
        Field("signed", "bool"),
        Field("reads_as", "str", doc="how bpfscope trace reads it: int, pointer, chararray, dataloc, ..."),
    ),
    doc="A field of a tracepoint, as --info shows it.",
)
# Every record `bpfscope trace` may write besides a query's own (TraceCollector.schemas()).
SCHEMAS = (TRACEPOINT_SCHEMA, FIELD_SCHEMA, *BPFTRACE_SCHEMAS)


class Values:
    """A field's raw value as a person or a JSON reader expects it: hex pointers, device names, errno
    names."""

    def __init__(self) -> None:
        self._disk_name: DiskNames | None = None

    def human(self, ref: FieldRef, value: Any) -> str:
        if isinstance(value, str):
            return value
        if ref.is_pointer or ref.is_dev:
            return self.plain(ref, value)
        if value < 0 and ref.name in _ERRNO_FIELDS and -value in errno.errorcode:
            return f"{value} ({errno.errorcode[-value]})"
        return str(value)

    def plain(self, ref: FieldRef, value: Any) -> Any:
        """JSON keeps numbers as numbers; devices get their name, pointers their hex form."""
        if isinstance(value, str):
            return value
        if ref.is_pointer:
            return f"0x{value & 0xFFFFFFFFFFFFFFFF:x}"
        if ref.is_dev:
            if self._disk_name is None:
                self._disk_name = DiskNames()
            return self._disk_name(value)
        return value


@dataclass(kw_only=True)
class TraceConfig(Config):
    tracepoint: str  # category:name
    count_by: tuple[str, ...] = ()  # key fields (aggregation)
    filter_text: str | None = None  # only events where this holds, in the kernel
    sum_field: str | None = None  # sum, min and max of this field per key
    minmax_field: str | None = None  # min and max of this field per key
    hist_field: str | None = None  # histogram of this field per key
    log2: bool = False  # power-of-two histogram buckets instead of log-linear ones
    print_fields: tuple[str, ...] = ()  # one record per event with these fields (a stream)
    rows: int | None = None  # only the largest keys of each interval (None: all)


def build_query(config: TraceConfig, limits: Limits) -> Query:
    """The configuration as a query; what cannot be asked is a one-line error."""
    query = Query(parse_name(config.tracepoint), limits)
    if config.print_fields and (
        config.count_by or config.sum_field or config.hist_field or config.minmax_field
    ):
        raise BpfscopeError(
            "--print streams events; it does not combine with --count-by, --sum, --hist, --min/--max"
        )
    if config.print_fields:
        query.set_print(list(config.print_fields))
    else:
        query.set_keys(list(config.count_by))
    for spec in (config.sum_field, config.minmax_field):
        if spec:
            query.set_value(spec)
    if config.hist_field:
        query.set_value(config.hist_field, "log2" if config.log2 else "loglin")
    if config.filter_text:
        query.set_filter(config.filter_text)
    return query


def raw_tracepoint_serves(query: Query) -> bool:
    """A query that reads no field of the record (only builtins) can use the raw tracepoint of the same
    event, which costs less. syscalls:* events are built on raw_syscalls and have no raw tracepoint."""
    return query.tracepoint.category != "syscalls" and all(
        ref.kind.startswith("TR_BUILTIN") for ref in query.refs
    )


@dataclass
class Aggregate:
    """One key's events: count, and the value's sum, min, max and histogram where the query has them."""

    key: tuple[Any, ...]
    count: int
    sum: int
    min: int | None
    max: int | None
    hist: Histogram | None = None

    def __sub__(self, before: Aggregate) -> Aggregate:
        """The events since ``before``: counts, sums and histograms subtract exactly; min and max are
        since the start (the kernel keeps no history of them)."""
        hist = self.hist
        if hist is not None and before.hist is not None:
            hist = hist - before.hist
        return Aggregate(self.key, self.count - before.count, self.sum - before.sum, self.min, self.max, hist)

    def percentiles(self) -> list[float | None]:
        """PERCENTILES from the histogram, kept inside the exact min and max the kernel also tracked."""
        if self.hist is None or self.min is None or self.max is None:
            return [None] * len(PERCENTILES)
        values = self.hist.percentiles(PERCENTILES).values()
        return [None if v is None else round(min(max(v, self.min), self.max), 1) for v in values]


def snapshot(obj: BpfObject, query: Query) -> dict[tuple[Any, ...], Aggregate]:
    """Every key's aggregate now (cumulative since attach); per-CPU values summed."""
    from bpfscope.runtime.hist import Histogram

    keys, values = obj.maps["aggs"].items()  # values: one row per CPU
    rows: dict[tuple[Any, ...], Aggregate] = {}
    for raw_key, per_cpu in zip(keys, values, strict=True):
        counts = per_cpu["count"]
        live = counts > 0
        key = query.decode_key(raw_key.tobytes())
        rows[key] = Aggregate(
            key,
            int(counts.sum()),
            int(per_cpu["sum"].sum()),
            int(per_cpu["min"][live].min()) if live.any() else None,
            int(per_cpu["max"][live].max()) if live.any() else None,
        )
    if query.hist:
        hkeys, hvalues = obj.maps[f"hists_{query.hist}"].items()
        for raw_key, value in zip(hkeys, hvalues, strict=True):
            key = query.decode_key(raw_key.tobytes())
            if key in rows:
                rows[key].hist = Histogram(value["slots"], query.hist)  # type: ignore[arg-type]
    return rows


def delta(now: dict[tuple[Any, ...], Aggregate], before: dict[tuple[Any, ...], Aggregate]) -> list[Aggregate]:
    """Each key's events since ``before``; keys without any are left out."""
    out = []
    for key, row in now.items():
        prev = before.get(key)
        if prev is None:
            out.append(row)
        elif row.count != prev.count:
            out.append(row - prev)
    return out


@dataclass
class TraceAggregates(Sample):
    """A query's keys over one interval, the largest first (by sum where the query sums, else count)."""

    ts: float
    interval_s: float
    rows: list[Aggregate]
    keys_seen: int  # keys with events in the interval, shown or not
    query: Query
    schema: Schema
    values: Values

    def records(self) -> Iterator[dict[str, Any]]:
        # The schema's fields: ts, interval_s, the keys (named as in the record), then the values.
        query, key_names = self.query, self.schema.names[2 : 2 + len(self.query.keys)]
        for row in self.rows:
            record: dict[str, Any] = {"ts": self.ts, "interval_s": self.interval_s, "count": row.count}
            for name, part, value in zip(key_names, query.keys, row.key, strict=True):
                record[name] = self.values.plain(part.ref, value)
            if query.value is not None:
                record.update(sum=row.sum, min=row.min, max=row.max)
            if query.hist:
                record["hist"] = row.hist.to_dict() if row.hist is not None else None
            yield self.schema.record(record)


@dataclass
class TraceEvents(Sample):
    """Events a --print query received since the previous drain, as the kernel's records (numpy)."""

    events: np.ndarray
    query: Query
    schema: Schema
    values: Values
    wall_offset_ns: int

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> float:  # type: ignore[override]
        return (int(self.events["ts"][-1]) + self.wall_offset_ns) / 1e9

    def rows(self) -> Iterator[tuple[float, list[Any]]]:
        """(wall-clock seconds, the printed fields' raw values) per event; whole columns become Python
        lists first (much faster than one numpy scalar per field)."""
        import numpy as np

        e, query = self.events, self.query
        columns: list[list[Any]] = []
        for ref in query.printed:
            if ref.kind == "TR_BUILTIN_COMM" or ref.is_string:
                where = e["comm"] if ref.kind == "TR_BUILTIN_COMM" else e["strs"][:, query.string_slot(ref)]
                raw = np.ascontiguousarray(where)  # one row of bytes per event
                texts = raw.view(f"S{raw.nbytes // len(raw)}").ravel().tolist()
                columns.append([t.split(b"\0", 1)[0].decode(errors="replace") for t in texts])
            elif ref.kind in _BUILTIN_COLUMNS:
                columns.append(e[_BUILTIN_COLUMNS[ref.kind]].tolist())
            else:
                column = e["vals"][:, query.refs.index(ref)]
                columns.append((column if ref.signed else column.astype(np.uint64)).tolist())
        times = [round((ts + self.wall_offset_ns) / 1e9, 6) for ts in e["ts"].tolist()]
        yield from zip(times, (list(values) for values in zip(*columns, strict=True)), strict=True)

    def records(self) -> Iterator[dict[str, Any]]:
        # The schema's fields: ts, then the printed ones (named as in the record).
        names, refs = self.schema.names[1:], self.query.printed
        for ts, values in self.rows():
            plain = {n: self.values.plain(r, v) for n, r, v in zip(names, refs, values, strict=True)}
            yield self.schema.record({"ts": ts, **plain})


class _QuerySchemas:
    """``schemas()`` of a trace collector: its query's record schema. A query's fields are chosen when it
    runs, so on the class (no query) there is none; the records of --list, --info and --bpftrace are
    the module's SCHEMAS."""

    def __get__(self, collector: TraceCollector | None, owner: type) -> Any:
        if collector is None:
            return lambda: ()
        return lambda: (collector.schema,)


class TraceCollector(BpfCollector[TraceConfig]):
    """One query on one tracepoint: aggregated per key in the kernel (an interval collector), or each
    event printed (a stream)."""

    name = "trace"
    bpf_object = "trace"
    requires = ("tracepoint", "ringbuf")
    loss_counters = {
        "aggs_dropped": ("map_full", "events not counted (too many keys)"),
        "hists_dropped": ("map_full", "events counted without their value in a histogram (too many keys)"),
    }
    schemas = _QuerySchemas()  # type: ignore[assignment]

    def __init__(self, config: TraceConfig) -> None:
        super().__init__(config)
        self.query = build_query(config, Limits.from_btf(self.btf()))
        self.schema = query_schema(self.query)
        self.raw = raw_tracepoint_serves(self.query)
        self.values = Values()
        self.seen = 0  # events printed

    def rodata(self) -> dict[str, Any]:
        return {**super().rodata(), "cfg": self.query.config()}

    def autoload(self) -> set[str]:
        return {"trace_raw_tracepoint" if self.raw else "trace_tracepoint"}

    def max_entries(self) -> dict[str, int]:
        # Only one of the two outputs is used: the other gets the least room it can have.
        sizes = {"aggs": 1} if self.query.printed else {"events": os.sysconf("SC_PAGE_SIZE")}
        if self.query.hist:
            sizes[f"hists_{self.query.hist}"] = 2048
        return sizes

    def configure(self) -> None:
        assert self.obj is not None
        # Keys are laid out per query: the maps' key size is set before load.
        for name in ("aggs", "hists_log2", "hists_loglin"):
            self.obj.maps[name].key_size = self.query.key_size

    def attach(self) -> None:
        assert self.obj is not None
        self.obj.load()
        tp = self.query.tracepoint
        if self.raw:
            self.obj.programs["trace_raw_tracepoint"].attach_raw_tracepoint(tp.name)
        else:
            self.obj.programs["trace_tracepoint"].attach_tracepoint(tp.category, tp.name)
        if self.query.printed:
            self.ring("events")
            self.wall_offset_ns = wall_clock_offset_ns()

    def start(self) -> None:
        assert self.obj is not None
        self.start_from_attach()
        self.before = snapshot(self.obj, self.query)

    def start_from_attach(self) -> None:
        self.before: dict[tuple[Any, ...], Aggregate] = {}
        self.t0 = time.monotonic()

    def sample(self) -> TraceAggregates:
        assert self.obj is not None
        now = snapshot(self.obj, self.query)
        t = time.monotonic()
        value_summed = self.query.value is not None and self.query.hist is None
        rows = sorted(delta(now, self.before), key=lambda r: r.sum if value_summed else r.count, reverse=True)
        shown = rows if self.config.rows is None else rows[: self.config.rows]
        sample = TraceAggregates(
            time.time(), round(t - self.t0, 6), shown, len(rows), self.query, self.schema, self.values
        )
        self.before, self.t0 = now, t
        return sample

    def drain(self) -> TraceEvents | None:
        batch = self.rings["events"].read()
        if not len(batch):
            return None
        self.seen += len(batch)
        return TraceEvents(batch, self.query, self.schema, self.values, self.wall_offset_ns)


def _columns(cells: list[str]) -> str:
    return " ".join(f"{c:<16}" for c in cells[:-1]) + (cells[-1] if cells else "")


class TraceView(View):
    """Printed events as lines; aggregates as a table per interval, with each key's histogram."""

    def __init__(self, query: Query, per_interval: bool) -> None:
        self.query, self.per_interval = query, per_interval
        self.start = time.time()
        if query.printed:
            self.header = f"{'TIME(s)':<10} " + _columns([ref.name for ref in query.printed])

    def show(self, sample: Sample, term: Terminal) -> None:
        if isinstance(sample, TraceEvents):
            term.lines(
                [
                    f"{ts - self.start:<10.6f} "
                    + _columns(
                        [sample.values.human(r, v) for r, v in zip(self.query.printed, values, strict=True)]
                    )
                    for ts, values in sample.rows()
                ]
            )
            return
        assert isinstance(sample, TraceAggregates)
        query = self.query
        label = f"{time.time() - self.start:.1f}s" if self.per_interval else "total"
        top = (
            f" (top {len(sample.rows)} of {sample.keys_seen})" if sample.keys_seen > len(sample.rows) else ""
        )
        key_names = [part.ref.name for part in query.keys]
        columns = [name.upper() for name in key_names] + ["COUNT"]
        if query.value is not None:
            v = query.value.name
            columns += [f"SUM({v})", f"AVG({v})", f"MIN({v})", f"MAX({v})"]
        if query.hist:
            columns += [f"P{q}" for q in PERCENTILES]
        table = []
        for row in sample.rows:
            cells: list[Any] = [
                sample.values.human(p.ref, k) for p, k in zip(query.keys, row.key, strict=True)
            ]
            cells.append(row.count)
            if query.value is not None:
                cells += [row.sum, round(row.sum / row.count, 2) if row.count else 0, row.min, row.max]
            if query.hist:
                cells += row.percentiles()
            table.append(cells)
        term.heading(f"{query.tracepoint.full_name} {label}{top}")
        term.table(columns, table)
        value_name = query.value.name if query.value is not None else "value"
        for row, cells in zip(sample.rows, table, strict=True):
            if row.hist is not None and row.hist.total:
                title = ", ".join(f"{n}={c}" for n, c in zip(key_names, cells, strict=False)) or value_name
                term.line(f"\n{title}\n{row.hist.ascii(value_name)}")

    def summary(self, collector: Collector, losses: Losses) -> str:
        assert isinstance(collector, TraceCollector)
        traced = f"{collector.seen} events traced, " if self.query.printed else ""
        return f"trace: {traced}{losses.text()}"


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _list(pattern: str, as_json: bool) -> None:
    names = matching(pattern)
    if not names:
        raise BpfscopeError(f"no tracepoint matches {pattern!r}")
    if as_json:
        _write_records(TRACEPOINT_SCHEMA, [{"tracepoint": name} for name in names])
    else:
        Terminal().lines(names)


def _info(tp: Tracepoint, as_json: bool) -> None:
    fields = [
        {
            "field": f.name,
            "type": f.type + (f"[{f.count}]" if f.count else ""),
            "offset": f.offset,
            "size": f.size,
            "signed": f.signed,
            "reads_as": f.kind,
        }
        for f in tp.fields
    ]
    if as_json:
        _write_records(FIELD_SCHEMA, [{"tracepoint": tp.full_name, **f} for f in fields])
        return
    columns = ["field", "type", "offset", "size", "signed", "bpfscope reads it as"]
    rows = [
        [f["field"], f["type"], f["offset"], f["size"], "yes" if f["signed"] else "no", f["reads_as"]]
        for f in fields
    ]
    Terminal().table(columns, rows, title=tp.full_name)


def _write_records(schema: Schema, values: list[dict[str, Any]]) -> None:
    """Records of ``schema`` as JSON lines, all of this moment."""
    from bpfscope.sinks.jsonl import dumps

    now = time.time()
    Terminal().lines([dumps(schema.record({"ts": now, **v})) for v in values])


EXAMPLES = """
\b
Examples:
  bpfscope trace --list 'block:*'
  bpfscope trace --info syscalls:sys_enter_openat
  bpfscope trace block:block_rq_issue --count-by comm
  bpfscope trace block:block_rq_complete --hist nr_sector --by dev
  bpfscope trace syscalls:sys_enter_openat --filter 'comm == "nginx"' --print pid,comm,filename
  bpfscope trace sched:sched_process_exec --print pid,filename --duration 10
  bpfscope trace net:net_dev_xmit --sum len --count-by dev 1 5
  bpfscope trace raw_syscalls:sys_enter --count-by comm --filter 'id == 39 or id == 110' -r 5
\b
Fields are the tracepoint's (see --info; args[2] indexes an array); the builtins pid, tid, uid, comm,
cgroup and cpu work everywhere (a tracepoint field of the same name wins). Filters compare fields with
numbers or "strings" (==, !=, <, <=, >, >=) joined by and/or/not, and run in the kernel.
"""


@click.command(name="trace", epilog=EXAMPLES)
@click.argument("tracepoint", required=False)
@click.option("--list", "list_pattern", metavar="PATTERN", help="List tracepoints matching a pattern.")
@click.option("--info", "info_name", metavar="TRACEPOINT", help="Show a tracepoint's fields.")
@click.option(
    "--count-by",
    "--by",
    "count_by",
    multiple=True,
    metavar="F[,F..]",
    help="Aggregate per key (up to 4 fields).",
)
@option("filter")
@click.option("--sum", "sum_field", metavar="FIELD", help="Sum a numeric field per key.")
@click.option("--min-max", "minmax_field", metavar="FIELD", help="Min and max of a numeric field per key.")
@click.option("--hist", "hist_field", metavar="FIELD", help="Histogram of a field per key, with percentiles.")
@click.option(
    "--log2", is_flag=True, help="Power-of-two histogram buckets (default: log-linear, 1/16 error)."
)
@click.option(
    "--print", "print_fields", multiple=True, metavar="F[,F..]", help="Print these fields per event."
)
@option("rows", "--top", default=20, help="Keys shown per interval, largest first.")
@click.option(
    "--bpftrace",
    "bpftrace_program",
    metavar="PROGRAM",
    help="Run this bpftrace program (where bpftrace is installed) and show its maps bpfscope's way.",
)
@common_options
def command(
    run: Run,
    tracepoint: str | None,
    list_pattern: str | None,
    info_name: str | None,
    count_by: tuple[str, ...],
    filter_text: str | None,
    sum_field: str | None,
    minmax_field: str | None,
    hist_field: str | None,
    log2: bool,
    print_fields: tuple[str, ...],
    max_rows: int,
    bpftrace_program: str | None,
) -> None:
    """Count, sum, histogram or print any tracepoint's events, filtered in the kernel.

    Without an interval, one table at the end (Ctrl-C, SIGTERM or --duration); with one, a table per
    interval of what happened in it. --print streams one line per event.
    """
    if list_pattern:
        _list(list_pattern, run.as_json)
        return
    if info_name:
        _info(parse_name(info_name), run.as_json)
        return
    if bpftrace_program:
        from bpfscope.domains.trace.trace_bpftrace import run_bpftrace

        run_bpftrace(run, bpftrace_program, max_rows)
        return
    if not tracepoint:
        raise BpfscopeError("name a tracepoint (category:name), or use --list or --info", hint="see --help")
    config = run.config(
        TraceConfig,
        tracepoint=tracepoint,
        count_by=tuple(_split(count_by)),
        filter_text=filter_text,
        sum_field=sum_field,
        minmax_field=minmax_field,
        hist_field=hist_field,
        log2=log2,
        print_fields=tuple(_split(print_fields)),
        rows=max_rows,
    )
    collector = TraceCollector(config)
    view = TraceView(collector.query, per_interval=run.interval is not None)
    run.run(collector, view, f"Tracing {collector.query.tracepoint.full_name}... Ctrl-C to end.")
