"""What the samplers behind interval tools and ``bpfscope check`` share.

A sampler owns one BPF object and returns, at each ``sample()``, what happened since the previous one;
its counters are dataclasses of integers that subtract and add field by field (:class:`Counts`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from bpfscope.core.bpf import BpfObject


class Sampler:
    """One BPF object, closed with the sampler, and the one-line loss summary from its .bss counters."""

    obj: BpfObject

    def sample(self) -> Any:
        """What happened since the previous sample."""
        raise NotImplementedError

    def losses(self, counters: dict[str, str]) -> str:
        """``counters``: .bss counter -> what its count means, shown when it is not zero."""
        lost = [f"{self.obj.bss[name]} {what}" for name, what in counters.items() if self.obj.bss[name]]
        return "; ".join([self.obj.losses(), *lost])

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Counts:
    """For a dataclass of integer counters named as the fields of a BPF record: built from a record
    (numpy or dict), subtracted (an interval from two cumulative readings) and added field by field."""

    @classmethod
    def from_record(cls, record: Any) -> Self:
        return cls(**{f.name: int(record[f.name]) for f in fields(cls)})

    def __add__(self, other: Self) -> Self:
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: Self) -> Self:
        return type(self)(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def per_second(self, seconds: float) -> dict[str, float]:
        s = max(seconds, 1e-9)
        return {f.name: getattr(self, f.name) / s for f in fields(self)}

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
