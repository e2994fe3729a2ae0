"""What the top-like tools share (biotop, tcptop, filetop, cachetop, sockstat): the -s/-r/-C options, and
a screen that redraws in place on a terminal and prints one table per interval when piped.

In --json mode the tools write their own records (one per row and interval); the screen is for people.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from bpfscope.cli.tool import RunOptions

CLEAR = "\033[H\033[2J"
DEFAULT_ROWS = 20

F = TypeVar("F", bound=Callable[..., Any])


def top_options(sorts: Iterable[str], default: str, sort_help: str) -> Callable[[F], F]:
    """``-s/--sort`` (one of ``sorts``), ``-r/--rows`` (the command's ``max_rows``) and ``-C/--noclear``."""

    def decorate(func: F) -> F:
        func = click.option(
            "-C", "--noclear", is_flag=True, help="Do not clear the screen between intervals."
        )(func)
        func = click.option(
            "-r",
            "--rows",
            "max_rows",
            type=click.IntRange(min=1),
            default=DEFAULT_ROWS,
            show_default=True,
            help="Rows shown.",
        )(func)
        return click.option(
            "-s", "--sort", type=click.Choice(list(sorts)), default=default, show_default=True, help=sort_help
        )(func)

    return decorate


def loadavg() -> str:
    return "loadavg: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Screen:
    """One frame per interval: cleared first on a terminal (unless -C), a heading, then the table."""

    def __init__(self, opts: RunOptions, noclear: bool = False, sort: str = "", max_rows: int = DEFAULT_ROWS):
        self.opts = opts
        self.out = opts.output
        self.sort = sort
        self.max_rows = max_rows
        self.clear = not noclear and not opts.as_json and sys.stdout.isatty()

    def frame(self, heading: str, columns: Sequence[str], table: Sequence[Sequence[Any]], empty: str) -> None:
        """``empty`` stands for a table without rows ("no block I/O"); None cells show as "-"."""
        out = self.out
        if self.clear:
            out.stream.write(CLEAR)
        out.heading(heading)
        if table:
            out.table(columns, [["-" if v is None else v for v in row] for row in table])
        else:
            out.line(empty)
        out.stream.flush()
