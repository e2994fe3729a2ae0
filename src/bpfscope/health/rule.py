"""The health rule contract: one resource's rows in ``bpfscope check``, from the same collectors as the
tools.

A rule names the requirements it cannot run without, creates the collectors it needs (with the window's
task filter), and turns their samples over the window into rows. Rules live in their domain's
``health.py`` and are listed in the domain's manifest (``RULES``)::

    class PageCacheRule(Rule):
        name = "Page cache"
        requires = ("bpf",)

        def collectors(self) -> list[Collector]:
            return [CachestatCollector(CachestatConfig(include_self=self.include_self))]

        def rows(self, samples, window_s) -> list[Row]:
            sample = samples[self.collector]   # what the collector saw over the window
            ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    from bpfscope.health.verdict import Row
    from bpfscope.runtime.collector import Collector, Sample


def _require_bpf() -> str | None:
    from bpfscope.engine.bpf import require

    try:
        require("raw_tracepoint")
    except BpfscopeError as exc:
        return str(exc)
    return None


def _require_psi() -> str | None:
    from pathlib import Path

    psi = Path("/proc/pressure/io")
    return None if psi.exists() else f"{psi} is missing (kernel without PSI, or booted with psi=0)"


# Requirement name -> a check returning None when met, or why not.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {"bpf": _require_bpf, "psi": _require_psi}


def unmet(requirement: str) -> str | None:
    return REQUIREMENTS[requirement]()


class Rule:
    """Base of every health rule. ``include_self`` is passed on to the rule's collectors (bpfscope
    leaves itself out unless asked)."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, include_self: bool = False) -> None:
        self.include_self = include_self
        self._collectors: list[Collector] | None = None

    def collectors(self) -> list[Collector]:
        """The collectors this rule reads; called once per window."""
        return []

    @property
    def collector(self) -> Collector:
        """The rule's first collector (most rules have one)."""
        return self.opened()[0]

    def opened(self) -> list[Collector]:
        if self._collectors is None:
            self._collectors = self.collectors()
        return self._collectors

    def rows(self, samples: Mapping[Collector, Sample], window_s: float) -> list[Row]:
        raise NotImplementedError

    def refine(self, rows: list[Row]) -> list[Row]:
        """Called with every rule's rows once all are known: a rule may judge its rows again in their
        light (a disk never idle while tasks stall on I/O is saturated)."""
        return rows


def default_rules() -> list[type[Rule]]:
    """The rules of ``bpfscope check``, in the order their rows are shown, from the domains' manifests."""
    from bpfscope import domains

    classes = []
    for entry in domains.rules():
        module, name = entry.path.split(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes
