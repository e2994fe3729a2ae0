"""Record schemas: what a collector's records hold, declared once.

A collector's records leave it as flat dictionaries (one JSON line each, one row of a store table, one
sample of an exported metric). Each kind of record has a :class:`Schema`: its name, which is also the
value of the discriminator key ``record`` in every record of that kind, and its fields, each with a type
and a unit. Fields whose data comes from the kernel are derived from the BPF object's BTF
(:func:`btf_fields`), enum names included, so no C layout, enum or constant is written again in Python.

One vocabulary across tools: every record has ``record`` and ``ts`` (wall-clock seconds since the epoch,
of the event or of the end of the interval); interval records have ``interval_s``; a process is
``pid`` and ``comm``, its cgroup ``cgroup`` (the cgroup v2 id). The conformance test checks every tool's
JSON against its declared schemas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bpfscope.engine.btf import CType, Struct

# The discriminator: every record says which schema it follows.
RECORD_KEY = "record"

# Field types, as JSON and the store see them.
TYPES = ("int", "float", "str", "bool", "enum", "list", "dict")
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "enum": (str,),
    "list": (list,),
    "dict": (dict,),
}


@dataclass(frozen=True)
class Field:
    """One field of a record.

    ``unit`` is what a number counts ("ns", "ms", "s", "bytes", "kB", "pages", "%", "/s", ...);
    ``label`` marks fields that identify a row (pid, comm, disk) rather than measure it: exporters make
    labels of those and values of the rest; ``values`` are an enum's names.
    """

    name: str
    type: str = "int"
    unit: str = ""
    doc: str = ""
    label: bool = False
    nullable: bool = False
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"field {self.name}: unknown type {self.type!r} (one of {', '.join(TYPES)})")

    def check(self, value: Any) -> str | None:
        """Why ``value`` does not fit this field, or None."""
        if value is None:
            return None if self.nullable else f"{self.name} is null"
        if isinstance(value, bool) and self.type in ("int", "float"):
            return f"{self.name} is a bool, not {self.type}"
        if not isinstance(value, _PYTHON_TYPES[self.type]):
            return f"{self.name} is {type(value).__name__}, not {self.type}"
        if self.type == "enum" and self.values and value not in self.values:
            return f"{self.name} is {value!r}, not one of {', '.join(self.values)}"
        return None


TS = Field("ts", "float", "s", "wall-clock time (seconds since the epoch) of the event or interval end")
INTERVAL = Field("interval_s", "float", "s", "length of the interval the record covers")
PID = Field("pid", "int", doc="process id (tgid)", label=True)
TID = Field("tid", "int", doc="thread id", label=True)
COMM = Field("comm", "str", doc="process name (task comm, 15 characters at most)", label=True)
CGROUP = Field("cgroup", "int", doc="cgroup v2 id (the inode number of its directory)", label=True)


@dataclass(frozen=True)
class Schema:
    """The fields of one kind of record, in the order they are written."""

    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    interval: bool = False  # records cover an interval: they carry interval_s
    _by_name: dict[str, Field] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        common = (TS, INTERVAL) if self.interval else (TS,)
        names = {f.name for f in self.fields}
        fields = tuple(c for c in common if c.name not in names) + self.fields
        object.__setattr__(self, "fields", fields)
        seen: set[str] = set()
        for f in fields:
            if f.name in seen or f.name == RECORD_KEY:
                raise ValueError(f"schema {self.name}: field {f.name} twice (or the discriminator's name)")
            seen.add(f.name)
            self._by_name[f.name] = f

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def record(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A record of this schema: the discriminator first, then the fields in schema order (a field
        missing from ``values`` is an error: a schema says what every record holds)."""
        try:
            return {RECORD_KEY: self.name, **{name: values[name] for name in self._by_name}}
        except KeyError as exc:
            raise KeyError(f"record {self.name} lacks field {exc.args[0]}") from None

    def check(self, record: Mapping[str, Any]) -> list[str]:
        """Everything wrong with ``record`` as a record of this schema (empty: it fits)."""
        problems = []
        if record.get(RECORD_KEY) != self.name:
            problems.append(f"{RECORD_KEY} is {record.get(RECORD_KEY)!r}, not {self.name!r}")
        for name in record.keys() - self._by_name.keys() - {RECORD_KEY}:
            problems.append(f"{name} is not a field of {self.name}")
        for f in self.fields:
            if f.name not in record:
                problems.append(f"{f.name} is missing")
            elif (why := f.check(record[f.name])) is not None:
                problems.append(why)
        return problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "fields": [
                {k: v for k, v in vars(f).items() if v not in ("", (), False) or k == "type"}
                for f in self.fields
            ],
        }


def schema_for(schemas: Iterable[Schema], record: Mapping[str, Any]) -> Schema | None:
    name = record.get(RECORD_KEY)
    return next((s for s in schemas if s.name == name), None)


# Units read from a field's name where the C code follows the convention.
_SUFFIX_UNITS = {
    "_ns": "ns",
    "_us": "us",
    "_ms": "ms",
    "_s": "s",
    "_bytes": "bytes",
    "bytes": "bytes",
    "_pages": "pages",
    "_pct": "%",
    "_kb": "kB",
}


def unit_of(name: str) -> str:
    return next((unit for suffix, unit in _SUFFIX_UNITS.items() if name.endswith(suffix)), "")


def btf_field(name: str, ctype: CType, **overrides: Any) -> Field:
    """A field typed from its BTF type: integers as int, char arrays as str, enums as enum with their
    names (each name's common prefix, such as ``BS_KIND_``, taken off and the rest lower-cased)."""
    from bpfscope.engine.btf import Array, Scalar

    if isinstance(ctype, Scalar) and ctype.enum:
        kind, values = "enum", enum_names(ctype.enum).values()
    elif isinstance(ctype, Scalar):
        kind, values = ("float" if ctype.floating else "int"), ()
    elif isinstance(ctype, Array) and ctype.is_string:
        kind, values = "str", ()
    else:
        kind, values = "list", ()
    base = Field(name, kind, unit_of(name), values=tuple(values))
    return replace(base, **overrides)


def btf_fields(
    struct: Struct,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    **overrides: dict[str, Any],
) -> tuple[Field, ...]:
    """Fields of a BTF struct (a ring-buffer event, a map value), in C order: ``only`` picks and orders
    them, ``skip`` leaves some out, and keyword arguments override a field's attributes by name
    (``latency_ns={"doc": "device time"}``)."""
    names = list(only) if only is not None else [f.name for f in struct.fields if f.name not in set(skip)]
    return tuple(btf_field(n, struct.field(n).type, **overrides.get(n, {})) for n in names)


def enum_names(members: Iterable[tuple[str, int]]) -> dict[int, str]:
    """value -> short name for an enum's members: ``BS_KIND_RTO`` -> ``rto`` when every member shares the
    prefix ``BS_KIND_``. The first name wins where two members share a value."""
    members = list(members)
    names = [name for name, _ in members]
    prefix = ""
    if len(names) > 1:
        first = names[0]
        cut = first.rfind("_", 0, min(len(n) for n in names)) + 1
        while cut > 0 and not all(n.startswith(first[:cut]) for n in names):
            cut = first.rfind("_", 0, cut - 1) + 1
        prefix = first[:cut]
    out: dict[int, str] = {}
    for name, value in members:
        out.setdefault(value, name[len(prefix) :].lower() if prefix else name.lower())
    return out
