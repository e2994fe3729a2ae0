"""Output for every tool: rich tables for people, JSON lines for machines.

rich is imported only when a table is drawn, so a tool starts (and attaches) without paying for it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO


def _plain(value: Any) -> Any:
    """JSON-safe form of numpy scalars, bytes and the like."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return value


class Output:
    def __init__(self, as_json: bool = False, stream: TextIO | None = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self._console = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # Piped output keeps whole columns instead of rich's 80-column default.
            width = None if self.stream.isatty() else 240
            self._console = Console(file=self.stream, highlight=False, soft_wrap=True, width=width)
        return self._console

    def record(self, record: dict[str, Any]) -> None:
        """One JSON line (in --json mode)."""
        self.stream.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self.stream.flush()

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        title: str | None = None,
        keys: Sequence[str] | None = None,
        styles: Sequence[str | None] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A table; in --json mode one JSON line per row, keyed by ``keys`` (default: the columns)."""
        if self.as_json:
            names = keys or [c.lower().replace(" ", "_").replace("/", "_per_") for c in columns]
            for row in rows:
                self.record({**(extra or {}), **dict(zip(names, row, strict=True))})
            return
        from rich.table import Table

        table = Table(title=title, box=None, header_style="bold", pad_edge=False, title_justify="left")
        for i, col in enumerate(columns):
            # Numbers line up on the right, text on the left, as in iostat and friends.
            cells = [row[i] for row in rows if row[i] is not None]
            numeric = bool(cells) and all(isinstance(_plain(c), int | float) for c in cells)
            table.add_column(col, justify="right" if numeric else "left")
        for i, row in enumerate(rows):
            style = styles[i] if styles else None
            table.add_row(*(str(_plain(v)) for v in row), style=style)
        self.console.print(table)

    def line(self, text: str) -> None:
        """A plain line of human output (streaming tools print these, one per event)."""
        self.stream.write(text + "\n")

    def heading(self, text: str) -> None:
        if not self.as_json:
            self.stream.write(f"\n{datetime.now():%H:%M:%S} {text}\n")

    def note(self, text: str) -> None:
        """Messages for the person at the terminal, on stderr so JSON on stdout stays clean."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
