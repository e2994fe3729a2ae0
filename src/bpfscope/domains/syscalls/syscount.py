"""bpfscope syscount: system calls by syscall or process, with error counts and latency percentiles.

Counting and the latency histograms stay in the kernel (syscount.bpf.c); each interval reads the maps
and shows what changed since the last one, so nothing is lost between reads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.errors import BpfscopeError
from bpfscope.sources.syscalls import syscall_name, syscall_names, syscall_number

REQUIRES = ("tracepoint",)


@dataclass
class Row:
    key: int
    name: str
    count: int
    errors: int
    total_ns: int
    hist: object | None  # Histogram when latency is measured


def _snapshot(obj: BpfObject, by_process: bool, latency: bool) -> dict[int, Row]:
    from bpfscope.runtime.hist import Histogram

    keys, values = obj.maps["stats"].items()
    hists: dict[int, Histogram] = {}
    if latency:
        hkeys, hvalues = obj.maps["latency"].items()
        hists = {int(k): Histogram(v["slots"], "loglin") for k, v in zip(hkeys, hvalues, strict=True)}
    rows = {}
    for k, v in zip(keys, values, strict=True):
        key = int(k)
        name = v["comm"].decode(errors="replace") if by_process else syscall_name(key)
        rows[key] = Row(key, name, int(v["count"]), int(v["errors"]), int(v["total_ns"]), hists.get(key))
    return rows


def _delta(now: dict[int, Row], before: dict[int, Row]) -> list[Row]:
    out = []
    for key, row in now.items():
        prev = before.get(key)
        if prev is None:
            out.append(row)
            continue
        if row.count == prev.count:
            continue
        hist = row.hist - prev.hist if row.hist is not None and prev.hist is not None else row.hist
        out.append(
            Row(
                key,
                row.name,
                row.count - prev.count,
                row.errors - prev.errors,
                row.total_ns - prev.total_ns,
                hist,
            )
        )
    return out


def _report(opts: RunOptions, rows: list[Row], by_process: bool, latency: bool, top: int, title: str) -> None:
    rows = sorted(rows, key=lambda r: r.count, reverse=True)[:top]
    out = opts.output
    first = "PID" if by_process else "SYSCALL"
    columns = [first, "COMM"] if by_process else [first]
    columns += ["COUNT", "ERRORS"]
    keys = ["pid", "comm"] if by_process else ["syscall"]
    keys += ["count", "errors"]
    if latency:
        columns += ["AVG us", "P50 us", "P99 us", "P99.9 us"]
        keys += ["avg_us", "p50_us", "p99_us", "p999_us"]
    table = []
    for r in rows:
        cells: list[object] = [r.key, r.name] if by_process else [r.name]
        cells += [r.count, r.errors]
        if latency:
            pct = r.hist.percentiles((50, 99, 99.9)) if r.hist is not None else {}
            cells += [round(r.total_ns / r.count / 1000, 3) if r.count else 0.0]
            cells += [round(p / 1000, 3) if p is not None else None for p in pct.values()] or [None] * 3
        table.append(cells)
    out.heading(title)
    out.table(columns, table, keys=keys, extra={"interval": title} if opts.as_json else None)


EXAMPLES = """
\b
Examples:
  bpfscope syscount                 # top syscalls until Ctrl-C
  bpfscope syscount -L 1 5          # with latency percentiles, every second, 5 times
  bpfscope syscount -P --duration 10  # by process for 10 seconds
  bpfscope syscount -x -p 1234      # failed syscalls of one process
  bpfscope syscount -s openat -L    # one syscall's latency
"""


@click.command(name="syscount", epilog=EXAMPLES)
@click.option("-P", "--process", "by_process", is_flag=True, help="Count by process instead of syscall.")
@click.option("-L", "--latency", is_flag=True, help="Measure latency: average and p50/p99/p99.9.")
@click.option("-x", "--failures", is_flag=True, help="Only failed syscalls.")
@click.option("-s", "--syscall", metavar="NAME", help="Only this syscall (e.g. openat).")
@click.option("-T", "--top", type=int, default=10, show_default=True, help="Rows per interval.")
@tool_options
def command(
    opts: RunOptions, by_process: bool, latency: bool, failures: bool, syscall: str | None, top: int
) -> None:
    """System calls counted in the kernel, by syscall (default) or by process."""
    nr = -1
    if syscall:
        found = syscall_number(syscall)
        if found is None:
            close = difflib.get_close_matches(syscall, syscall_names().values(), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else None
            raise BpfscopeError(f"unknown syscall {syscall!r}", hint=hint)
        nr = found
    require(*REQUIRES)
    rodata = {
        **opts.filters(),
        "by_process": by_process,
        "measure_latency": latency,
        "failures_only": failures,
        "targ_syscall": nr,
    }
    with BpfObject(tool_object("syscount"), rodata=rodata) as obj:
        obj.attach()
        opts.output.note("Tracing syscalls... Ctrl-C to end.")
        before: dict[int, Row] = {}
        for elapsed in ticks(opts):
            now = _snapshot(obj, by_process, latency)
            if opts.interval:
                _report(opts, _delta(now, before), by_process, latency, top, f"{elapsed:.1f}s")
            before = now
        if not opts.interval:
            _report(opts, list(before.values()), by_process, latency, top, "total")
        opts.output.note(obj.losses())
