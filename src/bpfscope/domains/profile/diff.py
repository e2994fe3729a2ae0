"""bpfscope profile diff A B: what changed between two profiles (before, after).

Both are normalised (each function's share of its profile's samples), so a longer or busier run does
not look like a regression. The terminal shows the functions whose share changed most; ``-o FILE.html``
writes a differential flame graph: sized by B, each frame red where its share grew and blue where it
shrank, both shares in its tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from bpfscope.domains.profile import flamegraph, formats
from bpfscope.domains.profile.collect import write_atomically
from bpfscope.domains.profile.profiles import Profile
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


def load(path: str) -> Profile:
    profile = formats.load(path)
    if not profile.samples:
        raise BpfscopeError(f"profile {path} has no samples")
    return profile


EXAMPLES = """
\b
Examples:
  bpfscope profile diff before.pb.gz after.pb.gz            # the functions whose share changed most
  bpfscope profile diff before.folded after.folded -o d.html # a differential flame graph
"""


@click.command(name="diff", epilog=EXAMPLES)
@click.argument("before", metavar="A")
@click.argument("after", metavar="B")
@click.option("-o", "--output", metavar="FILE", help="Write a differential flame graph (HTML) here.")
@click.option("-r", "--rows", "max_rows", type=click.IntRange(min=0), default=20, show_default=True)
def command(before: str, after: str, output: str | None, max_rows: int) -> None:
    """Compare two profiles (pprof or folded stacks), A before and B after: each function's share of
    its profile, the largest changes first; -o FILE writes a differential flame graph."""
    a, b = load(before), load(after)
    show(a, b, Terminal(), max_rows)
    if output:
        write_atomically(output, flamegraph.html(b, f"{after} against {before}", baseline=a).encode())
        note(f"wrote the differential flame graph to {output}")
