"""The terminal sink: a tool's view of its samples, for people.

A :class:`View` is the thin part of a tool: it turns the collector's typed samples into lines (streams,
one per event) or tables (intervals; refreshed in place like top where the tool is top-like), and says
the run's summary. :class:`Terminal` is what views draw with: rich tables (rich is imported only when a
table is drawn, so start-up does not pay for it), plain lines, headings, and notes on stderr. Colour
and screen clearing happen only on a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bpfscope.runtime.session import Sink, SinkClosed

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample
    from bpfscope.runtime.losses import Losses
    from bpfscope.runtime.session import Session

CLEAR = "\033[H\033[2J"


def plain(value: Any) -> Any:
    """JSON- and table-safe form of numpy scalars, bytes and the like."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return value


def write_all(stream: TextIO, text: str) -> None:
    """Write ``text`` whole. Python's buffered streams lose the rest of a write to a full pipe that a
    signal interrupts part way (seen: 65,536 of 200,000 bytes arrived after a Ctrl-C): the bytes go out
    through os.write, again until none is left."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # not a file (a StringIO in tests)
        stream.write(text)
        return
    stream.flush()
    view = memoryview(text.encode(errors="replace"))
    while view:
        view = view[os.write(fd, view) :]


def note(text: str) -> None:
    """A message for the person at the terminal, on stderr so that stdout stays clean."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Terminal:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._console = None
        self.tty = self.stream.isatty()

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # Piped output keeps whole columns instead of rich's 80-column default, and no colour.
            width = None if self.tty else 240
            self._console = Console(
                file=self.stream, highlight=False, soft_wrap=True, width=width, no_color=not self.tty
            )
        return self._console

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        title: str | None = None,
        styles: Sequence[str | None] | None = None,
    ) -> None:
        from rich.table import Table

        table = Table(title=title, box=None, header_style="bold", pad_edge=False, title_justify="left")
        for i, col in enumerate(columns):
            # Numbers line up on the right, text on the left, as in iostat and friends.
            cells = [row[i] for row in rows if row[i] is not None]
            numeric = bool(cells) and all(isinstance(plain(c), int | float) for c in cells)
            table.add_column(col, justify="right" if numeric else "left")
        for i, row in enumerate(rows):
            style = styles[i] if styles else None
            table.add_row(*("-" if v is None else str(plain(v)) for v in row), style=style)
        self.console.print(table)

    def line(self, text: str) -> None:
        write_all(self.stream, text + "\n")

    def lines(self, texts: Sequence[str]) -> None:
        if texts:
            write_all(self.stream, "\n".join(texts) + "\n")

    def heading(self, text: str) -> None:
        write_all(self.stream, f"\n{datetime.now():%H:%M:%S} {text}\n")

    def styled(self, text: str, style: str | None) -> None:
        if style and self.tty:
            self.console.print(f"[{style}]{text}[/{style}]", highlight=False)
        else:
            self.line(text)

    def clear(self) -> None:
        write_all(self.stream, CLEAR)

    def flush(self) -> None:
        self.stream.flush()


class View:
    """How a collector's samples look on a terminal. Subclasses implement :meth:`show`; streams set
    ``header``; top-like tools set ``top = True`` (the screen is cleared before each frame on a
    terminal, unless ``noclear``)."""

    header: str | None = None
    top: bool = False
    noclear: bool = False

    def show(self, sample: Sample, term: Terminal) -> None:
        raise NotImplementedError

    def summary(self, collector: Collector, losses: Losses) -> str:
        """The run's last line, on stderr."""
        return f"{collector.name}: {losses.text()}"

    def status(self, collector: Collector, losses: Losses, elapsed_s: float) -> str:
        """A stream's line at each interval."""
        return f"{self.summary(collector, losses)} in {elapsed_s:.1f}s"


def loadavg() -> str:
    return "loadavg: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _close_stdout(stream: TextIO) -> None:
    """The reader went away (``| head``): further writes go nowhere, quietly."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return  # not a file: nothing to redirect
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class TerminalSink(Sink):
    """Samples through a tool's view; losses and the summary as notes on stderr."""

    def __init__(self, view: View, stream: TextIO | None = None) -> None:
        self.view = view
        self.term = Terminal(stream)
        self._header_shown = False

    def open(self, session: Session) -> None:
        if self.view.header and not self._header_shown:
            self._header_shown = True
            self._write(lambda: self.term.line(self.view.header or ""))

    def emit(self, collector: Collector, sample: Sample) -> None:
        def draw() -> None:
            if self.view.top and not self.view.noclear and self.term.tty:
                self.term.clear()
            self.view.show(sample, self.term)

        self._write(draw)

    def _write(self, draw: Any) -> None:
        try:
            draw()
            self.term.flush()
        except BrokenPipeError:
            _close_stdout(self.term.stream)
            raise SinkClosed() from None

    def status(self, collector: Collector, elapsed_s: float) -> None:
        note(self.view.status(collector, collector.losses(), elapsed_s))

    def lost(self, collector: Collector, new: Losses, total: Losses) -> None:
        note(f"{collector.name}: {new.text()} (in all: {total.total})")

    def error(self, collector: Collector, exc: BaseException, retry_in_s: float | None) -> None:
        again = f"; trying again in {retry_in_s:g} s" if retry_in_s else ""
        note(f"{collector.name}: failed: {exc}{again}")

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        note(self.view.summary(collector, losses))
