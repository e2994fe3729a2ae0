"""A health window: the rules of ``bpfscope check`` over one window, on one session of their collectors.

``bpfscope check`` is one window of ``--duration`` seconds; an experiment opens a window around each
phase of its workload and gets exactly the verdicts a person running ``bpfscope check`` then would::

    with CheckWindow() as window:   # loads every rule's programs: before the window opens
        window.start()              # baselines: the window opens
        ...                         # the workload
        report = window.finish()    # rows and summary over the window

A rule that cannot run here (a requirement unmet, a collector that fails to load) gives one row saying
why, and the others run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bpfscope.domains.net.diag import listings_shared
from bpfscope.health.rule import Rule, default_rules, unmet
from bpfscope.health.verdict import Report, Row
from bpfscope.runtime.session import Session, StopToken

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector, Sample


class CheckWindow:
    """``stop`` (the caller's, which stays the caller's to close) ends :meth:`wait` early."""

    def __init__(
        self,
        rules: Sequence[Rule | type[Rule]] | None = None,
        include_self: bool = False,
        stop: StopToken | None = None,
    ) -> None:
        chosen = default_rules() if rules is None else list(rules)
        self.rules = [r if isinstance(r, Rule) else r(include_self=include_self) for r in chosen]
        self.unavailable: dict[Rule, str] = {}
        self.session: Session | None = None
        self.samples: dict[Collector, Sample] = {}
        self.stop = stop
        self._start = 0.0

    def open(self) -> CheckWindow:
        """Load every rule's collectors (a rule that cannot run is noted, not fatal)."""
        collectors: list[Collector] = []
        for rule in self.rules:
            why = next((w for req in rule.requires if (w := unmet(req)) is not None), None)
            if why is not None:
                self.unavailable[rule] = why
                continue
            try:
                collectors += rule.opened()
            except Exception as exc:  # a collector that cannot even be configured here
                self.unavailable[rule] = str(exc)
        self.session = Session(collectors, on_error="isolate", stop=self.stop)
        self.session.open()
        for rule in self.rules:
            failed = (
                [self.session.failed[c] for c in rule.opened() if c in self.session.failed]
                if (rule not in self.unavailable)
                else []
            )
            if failed:
                self.unavailable[rule] = str(failed[0])
        return self

    def start(self) -> None:
        """The window opens: every collector takes its baseline, after all are loaded."""
        if self.session is None:
            self.open()
        assert self.session is not None
        with listings_shared():  # the rules that list sockets list each namespace's once
            self.session.start()
        self._start = time.monotonic()

    def finish(self) -> Report:
        """The window closes: every rule's rows over it, in the rules' order."""
        report = self.report()
        self.close()
        return report

    def report(self) -> Report:
        """Every rule's rows over the window so far, the window left open: the next report covers what
        follows (the agent's windows follow one another). ``samples`` keeps what the collectors gave."""
        assert self.session is not None, "start() the window first"
        with listings_shared():
            samples = self.samples = self.session.sample()
        now = time.monotonic()
        window_s, self._start = now - self._start, now
        rows: list[Row] = []
        for rule in self.rules:
            if rule in self.unavailable:
                rows.append(Row.unknown(rule.name, self.unavailable[rule]))
            else:
                rows += rule.rows(samples, window_s)
        for rule in self.rules:
            if rule not in self.unavailable:
                rows = rule.refine(rows)
        return Report(rows, window_s)

    def wait(self, duration_s: float) -> None:
        """Let the window run ``duration_s`` seconds (or until the window's ``stop``), with the rings
        drained."""
        assert self.session is not None
        self.session.duration = duration_s
        self.session.loop()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def __enter__(self) -> CheckWindow:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_check(
    duration_s: float,
    rules: Sequence[Rule | type[Rule]] | None = None,
    stop: StopToken | None = None,
    include_self: bool = False,
) -> Report:
    """Every rule over one window of ``duration_s`` seconds (or until ``stop``: the rows of the window so
    far)."""
    with CheckWindow(rules, include_self=include_self, stop=stop) as window:
        window.start()
        window.wait(duration_s)
        return window.finish()
