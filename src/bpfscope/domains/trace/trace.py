"""bpfscope trace: one-liners on any tracepoint, without a compiler.

One precompiled program (trace.bpf.c) is configured at load time from the tracepoint's format file:
fields, filter, keys and aggregation are constants the verifier sees, so filtered events cost almost
nothing and no code is generated per query.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.trace.trace_query import FieldRef, Limits, Query
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.engine.tracepoint import Tracepoint, matching, parse_name
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.stream import stream_events

REQUIRES = ("tracepoint", "ringbuf")
PERCENTILES = (50, 95, 99)
_ERRNO_FIELDS = {"ret", "error", "err", "rc"}


def _disk_names() -> dict[int, str]:
    """Kernel dev_t (major << 20 | minor) -> disk name, from /sys/dev/block."""
    names = {}
    for entry in Path("/sys/dev/block").glob("*:*"):
        major, minor = map(int, entry.name.split(":"))
        uevent = (entry / "uevent").read_text() if (entry / "uevent").exists() else ""
        name = next((line[8:] for line in uevent.splitlines() if line.startswith("DEVNAME=")), entry.name)
        names[major << 20 | minor] = name
    return names


class Formatter:
    """Turns raw values into what a person expects: hex pointers, errno names, disk names."""

    def __init__(self) -> None:
        self._disks: dict[int, str] | None = None

    def human(self, ref: FieldRef, value: Any) -> str:
        if isinstance(value, str):
            return value
        if ref.is_pointer:
            return f"0x{value & 0xFFFFFFFFFFFFFFFF:x}"
        if ref.is_dev:
            if self._disks is None:
                self._disks = _disk_names()
            return self._disks.get(value, f"{value >> 20}:{value & 0xFFFFF}")
        if value < 0 and ref.name in _ERRNO_FIELDS and -value in errno.errorcode:
            return f"{value} ({errno.errorcode[-value]})"
        return str(value)

    def plain(self, ref: FieldRef, value: Any) -> Any:
        """JSON keeps numbers as numbers; devices get their name, pointers their hex form."""
        if isinstance(value, str) or not (ref.is_pointer or ref.is_dev):
            return value
        return self.human(ref, value)


def _build_query(
    obj: BpfObject,
    tp: Tracepoint,
    count_by: list[str],
    filter_text: str | None,
    sum_field: str | None,
    hist_field: str | None,
    minmax_field: str | None,
    log2: bool,
    print_fields: list[str],
) -> Query:
    cfg = obj.rodata.layout.field("cfg").type
    scratch = obj.maps["scratch_map"].value_type
    assert cfg is not None and scratch is not None
    limits = Limits.from_config(cfg, scratch, obj.rodata["tr_key_max"], obj.rodata["tr_key_part_max"])  # type: ignore[arg-type]
    query = Query(tp, limits)
    if print_fields and (count_by or sum_field or hist_field or minmax_field):
        raise BpfscopeError(
            "--print streams events; it does not combine with --count-by, --sum, --hist, --min/--max"
        )
    if print_fields:
        query.set_print(print_fields)
    else:
        query.set_keys(count_by)
    for spec in (sum_field, minmax_field):
        if spec:
            query.set_value(spec)
    if hist_field:
        query.set_value(hist_field, "log2" if log2 else "loglin")
    if filter_text:
        query.set_filter(filter_text)
    return query


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


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
  bpfscope trace raw_syscalls:sys_enter --count-by comm --filter 'id == 39 or id == 110' --top 5
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
    "-c",
    "--count-by",
    "--by",
    "count_by",
    multiple=True,
    metavar="F[,F..]",
    help="Aggregate per key (up to 4 fields).",
)
@click.option(
    "-f", "--filter", "filter_text", metavar="EXPR", help="Only events where EXPR holds (in kernel)."
)
@click.option("--sum", "sum_field", metavar="FIELD", help="Sum a numeric field per key.")
@click.option("--min-max", "minmax_field", metavar="FIELD", help="Min and max of a numeric field per key.")
@click.option("--hist", "hist_field", metavar="FIELD", help="Histogram of a field per key, with percentiles.")
@click.option(
    "--log2", is_flag=True, help="Power-of-two histogram buckets (default: log-linear, 1/16 error)."
)
@click.option(
    "--print", "print_fields", multiple=True, metavar="F[,F..]", help="Print these fields per event."
)
@click.option(
    "--top", type=int, default=20, show_default=True, help="Keys shown per interval, largest first."
)
@click.option(
    "--bpftrace",
    "bpftrace_program",
    metavar="PROGRAM",
    help="Run this bpftrace program (where bpftrace is installed) and show its maps bpfscope's way.",
)
@tool_options
def command(
    opts: RunOptions,
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
    top: int,
    bpftrace_program: str | None,
) -> None:
    """Count, sum, histogram or print any tracepoint's events, filtered in the kernel."""
    out = opts.output
    if list_pattern:
        names = matching(list_pattern)
        if not names:
            raise BpfscopeError(f"no tracepoint matches {list_pattern!r}")
        for name in names:
            out.record({"tracepoint": name}) if opts.as_json else out.line(name)
        return
    if info_name:
        _info(opts, parse_name(info_name))
        return
    if bpftrace_program:
        from bpfscope.domains.trace.trace_bpftrace import run_bpftrace

        run_bpftrace(bpftrace_program, out, opts.duration, top)
        return
    if not tracepoint:
        raise BpfscopeError("name a tracepoint (category:name), or use --list or --info", hint="see --help")
    tp = parse_name(tracepoint)
    require(*REQUIRES)
    with BpfObject(tool_object("trace")) as obj:
        query = _build_query(
            obj,
            tp,
            _split(count_by),
            filter_text,
            sum_field,
            hist_field,
            minmax_field,
            log2,
            _split(print_fields),
        )
        _configure(obj, query, opts)
        raw = _raw_tracepoint_serves(tp, query)
        program = obj.programs["trace_raw_tracepoint" if raw else "trace_tracepoint"]
        for other in obj.programs.values():
            other.autoload = other is program
        obj.load()
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: event times count from here.
        start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if raw:
            program.attach_raw_tracepoint(tp.name)
        else:
            program.attach_tracepoint(tp.category, tp.name)
        if query.printed:
            _stream(obj, query, opts, start_ns, tp)
        else:
            out.note(f"Tracing {tp.full_name}... Ctrl-C to end.")
            _aggregate(obj, query, opts, top)
            out.note(f"trace: {obj.losses()}")


def _raw_tracepoint_serves(tp: Tracepoint, query: Query) -> bool:
    """A query that reads no field of the record (only builtins) can use the raw tracepoint of the same
    event, which costs less. syscalls:* events are built on raw_syscalls and have no raw tracepoint."""
    return tp.category != "syscalls" and all(ref.kind.startswith("TR_BUILTIN") for ref in query.refs)


def _configure(obj: BpfObject, query: Query, opts: RunOptions) -> None:
    obj.rodata["cfg"] = query.config()
    for name, value in opts.filters().items():
        obj.rodata[name] = value
    aggs = obj.maps["aggs"]
    for name in ("aggs", "hists_log2", "hists_loglin"):
        obj.maps[name].key_size = query.key_size
    hist_map = {"log2": "hists_log2", "loglin": "hists_loglin"}.get(query.hist or "")
    if query.printed:
        aggs.max_entries = 1
    else:
        obj.maps["events"].max_entries = os.sysconf("SC_PAGE_SIZE")
    if hist_map:
        obj.maps[hist_map].max_entries = 2048


def _info(opts: RunOptions, tp: Tracepoint) -> None:
    rows = [
        (
            f.name,
            f.type + (f"[{f.count}]" if f.count else ""),
            f.offset,
            f.size,
            "yes" if f.signed else "no",
            f.kind,
        )
        for f in tp.fields
    ]
    opts.output.table(
        ["field", "type", "offset", "size", "signed", "bpfscope reads it as"],
        rows,
        title=tp.full_name,
        extra={"tracepoint": tp.full_name} if opts.as_json else None,
    )


def _stream(obj: BpfObject, query: Query, opts: RunOptions, start_ns: int, tp: Tracepoint) -> None:
    fmt = Formatter()
    names = [ref.name for ref in query.printed]
    header = f"{'TIME(s)':<10} " + " ".join(f"{n:<16}" for n in names[:-1]) + (names[-1] if names else "")

    def render(ring: str, batch: Any) -> Iterator[tuple[int, str]]:
        for event in batch:
            values = [_event_value(query, ref, event) for ref in query.printed]
            ts = int(event["ts"])
            t = (ts - start_ns) / 1e9
            if opts.as_json:
                plain = {n: fmt.plain(r, v) for n, r, v in zip(names, query.printed, values, strict=True)}
                yield ts, json.dumps({"time": round(t, 6), **plain})
            else:
                cells = [fmt.human(r, v) for r, v in zip(query.printed, values, strict=True)]
                yield (
                    ts,
                    f"{t:<10.6f} " + " ".join(f"{c:<16}" for c in cells[:-1]) + (cells[-1] if cells else ""),
                )

    stream_events("trace", tp.full_name, obj, {"events": obj.ring_buffer("events")}, render, opts, header)


def _event_value(query: Query, ref: FieldRef, event: Any) -> Any:
    if ref.kind == "TR_BUILTIN_PID":
        return int(event["pid"])
    if ref.kind == "TR_BUILTIN_TID":
        return int(event["tid"])
    if ref.kind == "TR_BUILTIN_CPU":
        return int(event["cpu"])
    if ref.kind == "TR_BUILTIN_UID":
        return int(event["uid"])
    if ref.kind == "TR_BUILTIN_CGROUP":
        return int(event["cgroup"])
    if ref.kind == "TR_BUILTIN_COMM":
        return event["comm"].decode(errors="replace")
    if ref.is_string:
        raw = event["strs"][query.string_slot(ref)].tobytes()
        return raw.split(b"\0", 1)[0].decode(errors="replace")
    value = int(event["vals"][query.refs.index(ref)])
    return value if ref.signed else value & 0xFFFFFFFFFFFFFFFF


def _snapshot(obj: BpfObject, query: Query) -> dict[tuple, dict[str, Any]]:
    from bpfscope.runtime.hist import Histogram

    keys, values = obj.maps["aggs"].items()  # values: one row per CPU
    rows: dict[tuple, dict[str, Any]] = {}
    for raw_key, per_cpu in zip(keys, values, strict=True):
        counts = per_cpu["count"]
        live = counts > 0
        rows[query.decode_key(raw_key.tobytes())] = {
            "count": int(counts.sum()),
            "sum": int(per_cpu["sum"].sum()),
            "min": int(per_cpu["min"][live].min()) if live.any() else None,
            "max": int(per_cpu["max"][live].max()) if live.any() else None,
        }
    if query.hist:
        hkeys, hvalues = obj.maps[f"hists_{query.hist}"].items()
        for raw_key, value in zip(hkeys, hvalues, strict=True):
            key = query.decode_key(raw_key.tobytes())
            if key in rows:
                rows[key]["hist"] = Histogram(value["slots"], query.hist)  # type: ignore[arg-type]
    return rows


def _delta(
    now: dict[tuple, dict[str, Any]], before: dict[tuple, dict[str, Any]]
) -> dict[tuple, dict[str, Any]]:
    """What changed in an interval: counts, sums and histograms subtract exactly; min and max are since
    the start."""
    out = {}
    for key, row in now.items():
        prev = before.get(key)
        if prev is None:
            out[key] = row
        elif row["count"] != prev["count"]:
            diff = {**row, "count": row["count"] - prev["count"], "sum": row["sum"] - prev["sum"]}
            if "hist" in row and "hist" in prev:
                diff["hist"] = row["hist"] - prev["hist"]
            out[key] = diff
    return out


def _aggregate(obj: BpfObject, query: Query, opts: RunOptions, top: int) -> None:
    before: dict[tuple, dict[str, Any]] = {}
    for elapsed in ticks(opts):
        now = _snapshot(obj, query)
        if opts.interval:
            _report(query, _delta(now, before), opts, top, f"{elapsed:.1f}s")
        before = now
    if not opts.interval:
        _report(query, before, opts, top, "total")


def _percentiles(row: dict[str, Any]) -> list[float | None]:
    """Percentiles from the histogram, kept inside the exact min and max the kernel also tracked."""
    if "hist" not in row:
        return [None] * len(PERCENTILES)
    values = row["hist"].percentiles(PERCENTILES).values()
    return [None if v is None else round(min(max(v, row["min"]), row["max"]), 1) for v in values]


def _report(query: Query, rows: dict[tuple, dict[str, Any]], opts: RunOptions, top: int, label: str) -> None:
    out = opts.output
    fmt = Formatter()
    metric = "sum" if query.value is not None and query.hist is None else "count"
    ordered = sorted(rows.items(), key=lambda kv: kv[1][metric], reverse=True)
    shown = ordered[:top]
    key_names = [p.ref.name for p in query.keys]
    columns = [n.upper() for n in key_names] + ["COUNT"]
    if query.value is not None:
        v = query.value.name
        columns += [f"SUM({v})", f"AVG({v})", f"MIN({v})", f"MAX({v})"]
    if query.hist:
        columns += [f"P{q}" for q in PERCENTILES]
    table = []
    for key, row in shown:
        cells: list[Any] = [fmt.human(p.ref, k) for p, k in zip(query.keys, key, strict=True)] + [
            row["count"]
        ]
        if query.value is not None:
            avg = row["sum"] / row["count"] if row["count"] else 0
            cells += [row["sum"], round(avg, 2), row["min"], row["max"]]
        if query.hist:
            cells += _percentiles(row)
        table.append(cells)
    if opts.as_json:
        for key, row in shown:
            record: dict[str, Any] = {"interval": label}
            record.update(
                {n: fmt.plain(p.ref, k) for n, p, k in zip(key_names, query.keys, key, strict=True)}
            )
            record["count"] = row["count"]
            if query.value is not None:
                record.update(sum=row["sum"], min=row["min"], max=row["max"])
            if query.hist and "hist" in row:
                record["hist"] = row["hist"].to_dict()
            out.record(record)
        return
    out.heading(
        f"{query.tracepoint.full_name} {label}" + (f" (top {top} of {len(rows)})" if len(rows) > top else "")
    )
    out.table(columns, table)
    if query.hist:
        for (_, row), cells in zip(shown, table, strict=True):
            if "hist" in row and row["hist"].total:
                title = (
                    ", ".join(f"{n}={c}" for n, c in zip(key_names, cells, strict=False)) or query.value.name
                )
                out.line(f"\n{title}\n{row['hist'].ascii(query.value.name if query.value else 'value')}")
