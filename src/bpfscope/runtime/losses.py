"""Losses: what a collector could not see or count, by reason. Nothing is lost silently.

Every collector reports its losses; the session shows them while it runs (rate-limited) and at the end,
and JSON output ends with a ``losses`` record per collector. For BPF collectors :func:`bpf_losses` reads
them from the object itself:

- ``ring_full``: events a ring buffer had no room for (``bs_dropped``, counted by ``bs_reserve``);
- ``recursion``: events the kernel ran no program for because another BPF program was running on that
  CPU (each program's ``recursion_misses``);
- ``map_full``: every ``.bss`` counter named ``*_dropped`` (by convention: things a full map could not
  hold, counted by ``bs_insert``);
- ``unread_at_stop``: records still in a ring when a stop ended the final drain (a ring refilled as
  fast as it is read is not read forever: the session reads for a bounded time, then counts the rest);
- and counters a collector names itself (requests whose completion was never seen, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bpfscope.runtime.schema import Field, Schema

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject

RING_FULL = "ring_full"
RECURSION = "recursion"
MAP_FULL = "map_full"
UNSEEN = "unseen"
MALFORMED = "malformed"
UNREAD_AT_STOP = "unread_at_stop"

# Shown even at zero: a reader should see that these were counted and none was lost.
ALWAYS_SHOWN = (RING_FULL, RECURSION)
DROP_COUNTER = "bs_dropped"

LOSSES_SCHEMA = Schema(
    "losses",
    (
        Field("collector", "str", label=True, doc="the collector whose losses these are"),
        Field("total", "int", doc="everything lost, all reasons"),
        Field("reasons", "dict", doc="reason -> count (ring_full, recursion, map_full:NAME, unseen:NAME)"),
    ),
    doc="What a collector could not see or count, at the end of a run.",
)


@dataclass(frozen=True)
class Loss:
    reason: str  # ring_full, recursion, map_full:<counter>, unseen:<counter>, ...
    count: int
    what: str  # for people: "events lost (ring buffer full)"

    def text(self) -> str:
        return f"{self.count} {self.what}"


class Losses:
    """A collector's losses, in the order they were declared."""

    def __init__(self, items: Iterable[Loss] = ()) -> None:
        self.items = list(items)

    def __iter__(self) -> Iterator[Loss]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"Losses({self.counts()})"

    def __add__(self, other: Losses) -> Losses:
        return Losses([*self.items, *other.items])

    def __getitem__(self, reason: str) -> int:
        return sum(loss.count for loss in self.items if loss.reason == reason)

    @property
    def total(self) -> int:
        return sum(loss.count for loss in self.items)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for loss in self.items:
            out[loss.reason] = out.get(loss.reason, 0) + loss.count
        return out

    def text(self) -> str:
        """One line for a tool's summary: the always-counted reasons, and any other that is not zero."""
        shown = [loss for loss in self.items if loss.count or loss.reason in ALWAYS_SHOWN]
        return ", ".join(loss.text() for loss in shown) if shown else "nothing lost"

    def since(self, before: Losses) -> Losses:
        """What was lost after ``before`` was read (for reports while running)."""
        old = before.counts()
        return Losses(
            Loss(loss.reason, loss.count - old.get(loss.reason, 0), loss.what)
            for loss in self.items
            if loss.count > old.get(loss.reason, 0)
        )

    def record(self, collector: str, ts: float) -> dict[str, Any]:
        return LOSSES_SCHEMA.record(
            {"ts": ts, "collector": collector, "total": self.total, "reasons": self.counts()}
        )


def bpf_losses(obj: BpfObject, counters: Mapping[str, tuple[str, str]] | None = None) -> Losses:
    """The losses a BPF object counts. ``counters`` names more ``.bss`` counters, as
    ``{counter: (reason, what)}`` (``{"unseen_ends": ("unseen", "request ends unseen")}``), and gives
    ``*_dropped`` counters words better than their names."""
    counters = dict(counters or {})
    items: list[Loss] = []
    bss = obj.bss if obj.has_section(".bss") else None
    if obj.has_ring_buffer():
        dropped = int(bss[DROP_COUNTER]) if bss is not None and DROP_COUNTER in bss else 0
        items.append(Loss(RING_FULL, dropped, "events lost (ring buffer full)"))
    items.append(Loss(RECURSION, obj.missed(), "events missed (kernel skipped the program)"))
    if bss is not None:
        names = [n for n in bss.layout.names if n.endswith("_dropped") and n != DROP_COUNTER]
        names += [n for n in counters if n not in names]
        for name in names:
            reason, what = counters.get(name, (MAP_FULL, f"not counted: map full ({name})"))
            items.append(Loss(f"{reason}:{name}" if ":" not in reason else reason, int(bss[name]), what))
    return Losses(items)
