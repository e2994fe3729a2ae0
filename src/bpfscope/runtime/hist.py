"""User-space side of the in-kernel histograms declared in ``include/hist.bpf.h``.

Two slot layouts exist:

``log2``
    libbpf-tools layout: slot 0 holds 0 and 1, slot ``i`` holds ``[2**i, 2**(i+1) - 1]``.
``loglin``
    Log-linear: values below 16 get one exact slot each; above that, every power of
    two is split into 16 linear sub-buckets, so a bucket is at most 1/16 of its
    lower bound wide.

The slot count of a histogram is whatever array the kernel handed over
(``len(counts)``); nothing here assumes the sizes compiled into the BPF objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

HistKind = Literal["log2", "loglin"]

_KINDS: tuple[str, ...] = ("log2", "loglin")

# Mirrors BS_LOGLIN_SUB_BITS: it shapes the slot function itself, so it cannot be
# read from the data the way the slot count can.
_SUB_BITS = 4
_SUB = 1 << _SUB_BITS

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 95, 99, 99.9)


def _as_u64(values: Any) -> np.ndarray:
    """Coerce samples to uint64, refusing anything a __u64 could not hold.

    A plain ``astype`` would wrap negatives and saturate huge floats silently.
    """
    arr = np.asarray(values)
    kind = arr.dtype.kind
    if kind == "u":
        return arr.astype(np.uint64, copy=False)
    if kind in "ib":
        if arr.size and arr.min() < 0:
            raise ValueError("histogram values must be non-negative")
        return arr.astype(np.uint64)
    if kind == "f":
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0):
            raise ValueError("histogram values must be finite and non-negative")
        # 2**64 is exactly representable, so this comparison is exact.
        if arr.size and arr.max() >= 2.0**64:
            raise ValueError("histogram values must fit in 64 bits")
        return np.floor(arr).astype(np.uint64)
    if kind == "O":
        # Python ints beyond int64 arrive as objects when mixed with negatives or
        # other types; numpy raises OverflowError for anything outside uint64.
        try:
            return np.array([int(x) for x in arr.ravel()], dtype=np.uint64).reshape(arr.shape)
        except OverflowError as exc:
            raise ValueError("histogram values must lie in 0..2**64-1") from exc
    raise TypeError(f"cannot build a histogram from {arr.dtype} values")


def _log2_u64(v: np.ndarray) -> np.ndarray:
    """Vectorised ``bs_log2l``: the same branch-free steps, so results match bit for bit."""
    hi = v >> np.uint64(32)
    has_hi = hi != 0
    x = np.where(has_hi, hi, v & np.uint64(0xFFFFFFFF))
    r = (x > 0xFFFF).astype(np.uint64) << np.uint64(4)
    x = x >> r
    for limit, bits in ((0xFF, 3), (0xF, 2), (0x3, 1)):
        shift = (x > limit).astype(np.uint64) << np.uint64(bits)
        x = x >> shift
        r |= shift
    r |= x >> np.uint64(1)
    return r + np.where(has_hi, np.uint64(32), np.uint64(0))


def log2_slot(values: Any) -> np.ndarray:
    """Vectorised ``bs_log2_slot``: log2 slot index of each value (int64 array)."""
    v = _as_u64(values)
    # bs_log2_slot clamps to BS_LOG2_SLOTS - 1 = 63, which floor(log2) of a
    # __u64 never exceeds, so no clamp is needed here.
    return _log2_u64(v).astype(np.int64)


def loglin_slot(values: Any) -> np.ndarray:
    """Vectorised ``bs_loglin_slot``: log-linear slot index of each value (int64 array)."""
    v = _as_u64(values)
    # Computed for every element and then selected, so keep e >= SUB_BITS to avoid
    # uint64 wrap-around in the lanes that take the exact-slot branch.
    e = np.maximum(_log2_u64(v), np.uint64(_SUB_BITS))
    mant = (v >> (e - np.uint64(_SUB_BITS))) & np.uint64(_SUB - 1)
    slot = (e - np.uint64(_SUB_BITS - 1)) * np.uint64(_SUB) + mant
    return np.where(v < _SUB, v, slot).astype(np.int64)


def _check_slot(slot: int) -> int:
    slot = int(slot)
    if slot < 0:
        raise ValueError(f"slot must be non-negative, got {slot}")
    return slot


def log2_bounds(slot: int) -> tuple[int, int]:
    """Inclusive ``(low, high)`` value range of a log2 slot; slot 0 is ``(0, 1)``."""
    slot = _check_slot(slot)
    if slot == 0:
        return 0, 1
    return 1 << slot, (1 << (slot + 1)) - 1


def loglin_bounds(slot: int) -> tuple[int, int]:
    """Inclusive ``(low, high)`` value range of a log-linear slot."""
    slot = _check_slot(slot)
    if slot < _SUB:
        return slot, slot
    e = slot // _SUB + _SUB_BITS - 1
    width = 1 << (e - _SUB_BITS)
    low = (_SUB + slot % _SUB) * width
    return low, low + width - 1


def _bounds_fn(kind: str) -> Callable[[int], tuple[int, int]]:
    return log2_bounds if kind == "log2" else loglin_bounds


def _slot_fn(kind: str) -> Callable[[Any], np.ndarray]:
    return log2_slot if kind == "log2" else loglin_slot


@dataclass(eq=False)
class Histogram:
    """Slot counts of one histogram, as read from a BPF map or built from samples."""

    counts: np.ndarray
    kind: HistKind

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown histogram kind {self.kind!r}; expected one of {_KINDS}")
        counts = np.asarray(self.counts)
        if counts.ndim != 1:
            raise ValueError(f"counts must be one-dimensional, got shape {counts.shape}")
        if counts.dtype.kind in "ib" and counts.size and counts.min() < 0:
            raise ValueError("counts must be non-negative")
        self.counts = counts.astype(np.uint64)

    @classmethod
    def from_values(cls, values: Any, kind: HistKind, nslots: int | None = None) -> Histogram:
        """Bucket user-space samples exactly as the kernel would.

        Without ``nslots`` the array is just long enough for the largest sample.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown histogram kind {kind!r}; expected one of {_KINDS}")
        slots = _slot_fn(kind)(values).ravel()
        needed = int(slots.max()) + 1 if slots.size else 0
        if nslots is None:
            nslots = needed
        elif needed > nslots:
            raise ValueError(f"a sample falls in slot {needed - 1}, beyond nslots={nslots}")
        counts = np.bincount(slots.astype(np.intp), minlength=nslots)
        return cls(counts.astype(np.uint64), kind)

    @property
    def total(self) -> int:
        return int(self.counts.sum(dtype=np.uint64))

    def bounds(self, slot: int) -> tuple[int, int]:
        """Inclusive value range of ``slot`` in this histogram's layout."""
        return _bounds_fn(self.kind)(slot)

    def _nonzero(self) -> np.ndarray:
        return np.flatnonzero(self.counts)

    def merge(self, other: Histogram) -> Histogram:
        """Slot-wise sum; the shorter histogram is treated as zero-padded."""
        if self.kind != other.kind:
            raise ValueError(f"cannot merge a {self.kind} histogram with a {other.kind} one")
        n = max(len(self.counts), len(other.counts))
        counts = np.zeros(n, dtype=np.uint64)
        counts[: len(self.counts)] += self.counts
        counts[: len(other.counts)] += other.counts
        return Histogram(counts, self.kind)

    def __add__(self, other: object) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.merge(other)

    def __sub__(self, other: object) -> Histogram:
        """What was added since ``other``, an earlier snapshot of the same cumulative histogram."""
        if not isinstance(other, Histogram):
            return NotImplemented
        if self.kind != other.kind or len(other.counts) > len(self.counts):
            raise ValueError("can only subtract an earlier snapshot of the same histogram")
        if np.any(other.counts > self.counts[: len(other.counts)]):
            raise ValueError("the subtracted histogram is not an earlier snapshot (a slot decreased)")
        counts = self.counts.copy()
        counts[: len(other.counts)] -= other.counts
        return Histogram(counts, self.kind)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        if self.kind != other.kind:
            return False
        # Trailing empty slots carry no information, so lengths may differ.
        a, b = self._trimmed(), other._trimmed()
        return len(a) == len(b) and bool(np.array_equal(a, b))

    def _trimmed(self) -> np.ndarray:
        nz = self._nonzero()
        return self.counts[: nz[-1] + 1] if nz.size else self.counts[:0]

    def percentile(self, q: float) -> float | None:
        """Estimate the ``q``-th percentile (0..100); ``None`` for an empty histogram.

        The slot holding rank ``q/100 * total`` is located and the rank is
        interpolated linearly across ``[low, high + 1)``, treating samples as
        spread evenly inside the slot.  The result is capped at ``high`` so it never
        leaves the slot, which also makes the exact small-value slots exact.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        total = self.total
        if total == 0:
            return None
        rank = min(q / 100.0 * total, float(total))
        cum = np.cumsum(self.counts, dtype=np.uint64)
        if rank <= 0:
            slot = int(self._nonzero()[0])
            frac = 0.0
        else:
            # First slot whose cumulative count reaches the rank; it cannot be
            # empty because the previous cumulative count is below the rank.
            slot = int(np.searchsorted(cum.astype(np.float64), rank, side="left"))
            slot = min(slot, len(cum) - 1)
            before = int(cum[slot - 1]) if slot else 0
            frac = (rank - before) / int(self.counts[slot])
        low, high = self.bounds(slot)
        value = low + frac * (high + 1 - low)
        return float(min(value, float(high)))

    def percentiles(self, qs: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float | None]:
        """Several percentiles keyed ``"p50"``, ``"p99.9"``, ..."""
        return {f"p{q:g}": self.percentile(q) for q in qs}

    def mean(self) -> float | None:
        """Mean estimated from slot midpoints; ``None`` for an empty histogram."""
        total = self.total
        if total == 0:
            return None
        acc = 0.0
        for slot in self._nonzero():
            low, high = self.bounds(int(slot))
            acc += int(self.counts[slot]) * ((low + high) / 2)
        return acc / total

    def min_bound(self) -> int | None:
        """Lowest value the smallest sample could have had; ``None`` when empty."""
        nz = self._nonzero()
        return self.bounds(int(nz[0]))[0] if nz.size else None

    def max_bound(self) -> int | None:
        """Highest value the largest sample could have had; ``None`` when empty."""
        nz = self._nonzero()
        return self.bounds(int(nz[-1]))[1] if nz.size else None

    def to_log2(self) -> Histogram:
        """Collapse into log2 slots; exact because loglin slots never straddle a power of two."""
        if self.kind == "log2":
            return Histogram(self.counts.copy(), "log2")
        nz = self._nonzero()
        if not nz.size:
            return Histogram(np.zeros(0, dtype=np.uint64), "log2")
        targets: list[int] = []
        for slot in nz:
            low, high = loglin_bounds(int(slot))
            # floor(log2) with log2(0) = 0, valid past 64 bits for over-long arrays.
            lo_slot, hi_slot = max(low.bit_length() - 1, 0), max(high.bit_length() - 1, 0)
            if lo_slot != hi_slot:
                raise AssertionError(f"loglin slot {slot} [{low}, {high}] straddles log2 slots")
            targets.append(lo_slot)
        counts = np.zeros(max(targets) + 1, dtype=np.uint64)
        np.add.at(counts, np.asarray(targets, dtype=np.intp), self.counts[nz])
        return Histogram(counts, "log2")

    def ascii(self, label: str = "value") -> str:
        """Render like libbpf-tools' ``print_log2_hist``; ``""`` for an empty histogram.

        Log-linear histograms are shown through :meth:`to_log2`.  Rows run from
        slot 0 to the last non-empty slot.  No trailing newline.
        """
        hist = self.to_log2()
        counts = [int(c) for c in hist._trimmed()]
        if not counts:
            return ""
        idx_max = len(counts) - 1
        wide = idx_max > 32
        # Past 2**32 the range needs 20 digits, so libbpf-tools widens the column
        # and halves the bar to keep lines readable.
        width = 20 if wide else 10
        stars_max = 20 if wide else 40
        val_max = max(counts)
        lines = [f"{'':{15 if wide else 5}}{label:<{29 if wide else 19}} : count    distribution"]
        for slot, val in enumerate(counts):
            low, high = log2_bounds(slot)
            stars = val * stars_max // val_max
            bar = "*" * stars + " " * (stars_max - stars)
            lines.append(f"{low:>{width}} -> {high:<{width}} : {val:<8} |{bar}|")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: kind, total, percentiles and the non-empty slots."""
        slots: list[dict[str, int]] = []
        for slot in self._nonzero():
            low, high = self.bounds(int(slot))
            slots.append({"low": low, "high": high, "count": int(self.counts[slot])})
        return {
            "kind": self.kind,
            "total": self.total,
            "percentiles": self.percentiles(),
            "slots": slots,
        }
