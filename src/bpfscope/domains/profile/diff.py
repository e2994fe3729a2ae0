"""bpfscope profile diff A B: what changed between two profiles (before, after).

Both are normalised (each function's share of its profile's samples), so a longer or busier run does
not look like a regression. The terminal shows the functions whose share changed most; ``-o FILE.html``
writes a differential flame graph: sized by B, each frame red where its share grew and blue where it
shrank, both shares in its tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from bpfscope.cli.options import option
from bpfscope.domains.profile import flamegraph, formats
from bpfscope.domains.profile.collect import write_atomically
from bpfscope.domains.profile.profiles import FRAME_SCHEMA, STACK_SCHEMA, WINDOW_SCHEMA, Profile
from bpfscope.errors import BpfscopeError
from bpfscope.sinks.terminal import Terminal, note


@dataclass(frozen=True)
class Change:
    function: str
    before: float  # percent of A's samples with the function on the stack
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


def changes(before: Profile, after: Profile) -> list[Change]:
    """Every function of either profile, the largest change of share first."""
    a, b = before.shares(), after.shares()
    out = [Change(name, a.get(name, 0.0), b.get(name, 0.0)) for name in a.keys() | b.keys()]
    return sorted(out, key=lambda c: (-abs(c.delta), c.function))


def show(before: Profile, after: Profile, term: Terminal, max_rows: int) -> None:
    from rich.markup import escape

    rows = [
        [escape(c.function), f"{c.before:.1f}", f"{c.after:.1f}", f"{c.delta:+.1f}"]
        for c in changes(before, after)[:max_rows]
    ]
    term.line(
        f"before: {before.total_samples} samples; after: {after.total_samples} samples (shares compared)"
    )
    term.table(["FUNCTION", "BEFORE%", "AFTER%", "CHANGE (points)"], rows)


def load(what: str, store: str | None = None, pid: int | None = None) -> Profile:
    """A profile file, or with a store a time range of it (``START..END``)."""
    profile = from_store(store, what, pid) if store else formats.load(what)
    if not profile.samples:
        raise BpfscopeError(f"profile {what} has no samples" + (f" in {store}" if store else ""))
    return profile


def from_store(path: str, span: str, pid: int | None = None) -> Profile:
    """The on-CPU profile of a time range of the store (windows that ended in it), one process's with
    ``pid``."""
    from bpfscope.sinks.store import Store

    start, end = parse_span(span)
    store = Store(path)
    if not store.tables():
        raise BpfscopeError(f"no store at {path}", hint="bpfscope profile --continuous writes one")
    stacks = store.records(STACK_SCHEMA, start, end, *(("pid = ?", [pid]) if pid else ()))
    frames = store.records(FRAME_SCHEMA, start, end)
    windows = store.records(WINDOW_SCHEMA, start, end)
    return Profile.from_records([*frames, *stacks, *windows], kind="cpu")


def parse_span(span: str) -> tuple[float, float]:
    """``START..END``: each a time of today (``14:00``), a date and time (``2026-12-06T14:00``) or
    seconds since the epoch."""
    first, sep, second = span.partition("..")
    if not sep:
        raise BpfscopeError(f"not a time range: {span!r} (say 14:00..14:10)")
    start, end = parse_time(first), parse_time(second)
    if end <= start:
        raise BpfscopeError(f"time range {span!r} ends before it starts")
    return start, end


def parse_time(text: str) -> float:
    from datetime import datetime

    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            clock = datetime.strptime(text, fmt).time()
        except ValueError:
            continue
        return datetime.combine(datetime.now().date(), clock).timestamp()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BpfscopeError(f"not a time: {text!r} (say 14:00, 2026-12-06T14:00 or epoch seconds)") from None


EXAMPLES = """
\b
Examples:
  bpfscope profile diff before.pb.gz after.pb.gz            # the functions whose share changed most
  bpfscope profile diff before.folded after.folded -o d.html # a differential flame graph
  bpfscope profile diff --store /var/lib/bpfscope/store 14:00..14:10 15:00..15:10 -p 1234
"""


@click.command(name="diff", epilog=EXAMPLES)
@click.argument("before", metavar="A")
@click.argument("after", metavar="B")
@click.option("--store", metavar="DIR", help="A and B are time ranges (START..END) of this store.")
@option("pid", help="Only this process (with --store).")
@option("output", help="Write a differential flame graph (HTML) here.")
@option("rows", default=20, help="Functions shown.")
def command(
    before: str, after: str, store: str | None, pid: int | None, output: str | None, max_rows: int
) -> None:
    """Compare two profiles, A before and B after: files (pprof or folded stacks), or with --store two
    time ranges of the history --continuous wrote. Each function's share of its profile, the largest
    changes first; -o FILE writes a differential flame graph."""
    a, b = load(before, store, pid), load(after, store, pid)
    show(a, b, Terminal(), max_rows)
    if output:
        write_atomically(output, flamegraph.html(b, f"{after} against {before}", baseline=a).encode())
        note(f"wrote the differential flame graph to {output}")
