"""Counter arithmetic for interval samples: dataclasses of integer counters, named as the fields of a BPF
record, that subtract (an interval from two cumulative readings) and add field by field."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Self


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
