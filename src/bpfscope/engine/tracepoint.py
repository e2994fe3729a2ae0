"""Tracepoints as the kernel describes them: the ``format`` file of each event in tracefs."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import cached_property

from bpfscope.engine import system
from bpfscope.errors import BpfscopeError

_FIELD = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d);"
)


@dataclass(frozen=True)
class TracepointField:
    name: str
    type: str
    offset: int
    size: int
    signed: bool
    # `type name[N]` fields: N elements of size // N bytes.
    count: int | None = None
    # Syscall tracepoints carry their arguments as the user passed them: char pointers into user memory.
    user_memory: bool = False

    @property
    def kind(self) -> str:
        """int, pointer, chararray, dataloc (string in the record), userstr (syscall string argument),
        array (of integers: use name[i]) or unsupported."""
        if self.type.startswith("__data_loc"):
            return "dataloc" if "char" in self.type else "unsupported"
        if self.count is not None:
            return "chararray" if self.type.rstrip().endswith("char") else "array"
        if "*" in self.type:
            is_char_pointer = self.type.replace(" ", "") in ("constchar*", "char*")
            return "userstr" if self.user_memory and is_char_pointer else "pointer"
        return "int" if self.size <= 8 else "unsupported"

    @property
    def is_string(self) -> bool:
        return self.kind in ("chararray", "dataloc", "userstr")


@dataclass(frozen=True)
class Tracepoint:
    category: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.category}:{self.name}"

    @cached_property
    def fields(self) -> list[TracepointField]:
        path = system.ensure_tracefs() / "events" / self.category / self.name / "format"
        try:
            text = path.read_text()
        except OSError as exc:
            raise BpfscopeError(f"cannot read the format of {self.full_name}: {exc.strerror}") from None
        fields = []
        for match in _FIELD.finditer(text):
            decl = match["decl"].strip()
            ctype, _, name = decl.rpartition(" ")
            count = None
            if "[" in name:
                name, _, rest = name.partition("[")
                count = int(rest.rstrip("]")) if rest.rstrip("]").isdigit() else None
            if ctype.startswith("__data_loc") or name.endswith("[]"):
                count = None
            fields.append(
                TracepointField(
                    name=name,
                    type=ctype,
                    offset=int(match["offset"]),
                    size=int(match["size"]),
                    signed=match["signed"] == "1",
                    count=count,
                    user_memory=self.category == "syscalls",
                )
            )
        return fields

    def field(self, name: str) -> TracepointField | None:
        return next((f for f in self.fields if f.name == name), None)


def parse_name(spec: str) -> Tracepoint:
    """``category:name`` (``category/name`` is accepted too) of a tracepoint this kernel has."""
    category, sep, name = spec.replace("/", ":", 1).partition(":")
    if not sep or not category or not name:
        raise BpfscopeError(
            f"{spec!r} is not a tracepoint name", hint="use category:name, e.g. sched:sched_switch"
        )
    system.require_tracepoint(category, name)
    return Tracepoint(category, name)


def matching(pattern: str) -> list[str]:
    """Tracepoints matching a shell pattern (``block:*``, ``*:*openat*``); a bare word matches anywhere."""
    if ":" not in pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return sorted(tp for tp in system.tracepoints() if fnmatch.fnmatchcase(tp, pattern))
