"""The JSON lines sink: one line per record, of the collector's declared schemas; the run ends with a
``losses`` record per collector. Notes for people (losses while running, failures, the summary) go to
stderr, so stdout stays machine-readable."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from bpfscope.runtime.session import Sink, SinkClosed
from bpfscope.sinks.terminal import _close_stdout, note, plain, write_all

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample
    from bpfscope.runtime.losses import Losses
    from bpfscope.sinks.terminal import View


def _default(value: Any) -> Any:
    value = plain(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_default)


class JsonLinesSink(Sink):
    """``view`` (optional) words the summary note on stderr as the terminal would."""

    def __init__(self, stream: TextIO | None = None, view: View | None = None) -> None:
        self.stream = stream or sys.stdout
        self.view = view

    def emit(self, collector: Collector, sample: Sample) -> None:
        text = sample.json_lines()
        if text is None:
            lines = [dumps(record) for record in sample.records()]
            text = "\n".join(lines) + "\n" if lines else ""
        if text:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            write_all(self.stream, text)
        except BrokenPipeError:
            _close_stdout(self.stream)
            raise SinkClosed() from None

    def lost(self, collector: Collector, new: Losses, total: Losses) -> None:
        note(f"{collector.name}: {new.text()} (in all: {total.total})")

    def error(self, collector: Collector, exc: BaseException, retry_in_s: float | None) -> None:
        record = {"record": "error", "ts": time.time(), "collector": collector.name, "error": str(exc)}
        self._write(dumps(record) + "\n")

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        with contextlib.suppress(SinkClosed):
            self._write(dumps(losses.record(collector.name, time.time())) + "\n")
        summary = self.view.summary(collector, losses) if self.view else f"{collector.name}: {losses.text()}"
        note(summary)
