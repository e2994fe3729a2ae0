"""bpfscope check: over a short window, which resource is the problem?

Every domain's health rules (listed in their manifests) run over one window on the same collectors as
the tools; each gives rows: a metric, its value, a verdict (ok, warn, PROBLEM) against a stated threshold,
and the context that explains it. By default one line per resource (its worst row), fitting 100
columns; ``--verbose`` shows every row with its threshold; ``--json`` everything. The last line names the
resource at fault; the exit status is 1 when any row is a PROBLEM.
"""

from __future__ import annotations

import time

import click

from bpfscope.health.verdict import ROW_SCHEMA, SEVERITY, SUMMARY_SCHEMA, Report, Row, Verdict
from bpfscope.health.window import run_check
from bpfscope.sinks.terminal import Terminal, note

DEFAULT_DURATION_S = 10.0
# What --json prints: one record per row, then the summary.
SCHEMAS = (ROW_SCHEMA, SUMMARY_SCHEMA)
# The compact view fits this many columns: name, value and verdict, then as much detail as fits. The name
# and value columns are as wide as their longest entries, up to these widths (a longer value pushes its
# own line's verdict right rather than every line's detail).
WIDTH = 100
_NAME, _VALUE, _VERDICT = 26, 12, 7

_STYLES = {Verdict.PROBLEM: "bold red", Verdict.WARN: "yellow", Verdict.OK: None, Verdict.UNKNOWN: "dim"}


def lead_rows(report: Report) -> list[Row]:
    """One row per resource: its worst, the first of equals (rules put the telling metric first)."""
    lead: dict[str, Row] = {}
    for row in report.rows:
        best = lead.get(row.resource)
        if best is None or SEVERITY[row.verdict] > SEVERITY[best.verdict]:
            lead[row.resource] = row
    return list(lead.values())


def _fit(text: str, width: int) -> str:
    """Detail cut at a clause boundary ("; ") to fit, or with an ellipsis."""
    if len(text) <= width:
        return text
    cut = text.rfind("; ", 0, width)
    return text[:cut] if cut > width // 2 else text[: width - 1] + "…"


def compact(report: Report, term: Terminal) -> None:
    rows = lead_rows(report)
    name_w = min(_NAME, max((len(r.name) for r in rows), default=0))
    value_w = min(_VALUE, max((len(r.text) for r in rows), default=0))
    for row in rows:
        head = f"{row.name:<{name_w}} {row.text:<{value_w}} {row.verdict.value:<{_VERDICT}}"
        detail = _fit(row.detail, WIDTH - len(head) - 1) if row.verdict is not Verdict.OK else ""
        term.styled(f"{head} {detail}".rstrip(), _STYLES[row.verdict])


def compact_summary(report: Report) -> str:
    """The last line of the compact view: the summary within WIDTH, without the details that the
    resources' lines above already give."""
    return _fit(report.summary(details=False), WIDTH)


def verbose(report: Report, term: Terminal) -> None:
    term.table(
        ["CHECK", "VALUE", "VERDICT", "DETAIL", "THRESHOLD"],
        [
            [r.name, r.text, r.verdict.value, f"({r.detail})" if r.detail else "", r.threshold]
            for r in report.rows
        ],
        styles=[_STYLES[r.verdict] for r in report.rows],
    )


def render(report: Report, as_json: bool = False, detailed: bool = False) -> None:
    if as_json:
        from bpfscope.sinks.jsonl import dumps

        term = Terminal()
        term.lines([dumps(record) for record in report.records(time.time())])
        term.flush()
        return
    term = Terminal()
    (verbose if detailed else compact)(report, term)
    summary = report.summary() if detailed else compact_summary(report)
    term.styled(summary, "bold red" if report.problem else "bold green")
    term.flush()


EXAMPLES = """
\b
Examples:
  bpfscope check                    # ten seconds, then a line per resource
  bpfscope check --verbose          # every metric, with its threshold
  bpfscope check --duration 3 --json
  bpfscope check || echo "something is wrong"

\b
Exit status:
  0  no PROBLEM row (warnings allowed)
  1  at least one PROBLEM row: the last line names the resource
  2  bpfscope could not run (bad input, missing privileges)
"""


@click.command(name="check", epilog=EXAMPLES)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_DURATION_S,
    show_default=True,
    help="Seconds to watch.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Every metric with its threshold, not a line per resource."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per metric, then the summary.")
@click.option("--include-self", is_flag=True, help="Also watch bpfscope's own process and its children.")
def command(duration: float, verbose: bool, as_json: bool, include_self: bool) -> None:
    """Which resource is the problem right now? Watches the machine for --duration seconds and gives
    each resource a verdict (ok, warn, PROBLEM) against stated thresholds: CPU and RAM; per disk its
    device latency p50/p95/p99, IOPS, MB/s, queue depth against nr_requests and %util, with the process
    doing the I/O; the page cache's hit ratio, VFS calls, dirty memory and throttled writers; I/O pressure
    (PSI); TCP connections and retransmits; socket buffers. The last line names the resource at fault, or
    says that no problem was found.
    """
    from bpfscope.runtime.session import stop_on_signals

    if not as_json:
        note(f"Watching for {duration:g} s...")
    with stop_on_signals() as stop:
        report = run_check(duration, stop=stop, include_self=include_self)
    render(report, as_json, verbose)
    if report.problem:
        raise SystemExit(1)
