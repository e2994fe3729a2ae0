"""Components: the parts of a system whose time is accounted apart (a gateway, a database, ...), each a
cgroup, a container or a process with the processes it forks.

``--components SPEC`` names them: ``NAME=SELECTOR`` separated by commas, where SELECTOR is
``cgroup:PATH`` (a cgroup v2 directory, absolute or under its mount), ``container:ID``, ``pid:PID`` (the
process, its children now and those it forks later) or ``comm:NAME`` (every process of that name now, and
their children). A bare path is a cgroup, a bare number a pid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bpfscope.errors import BpfscopeError

KINDS = ("cgroup", "container", "pid", "comm")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,31}$")


@dataclass(frozen=True)
class Component:
    name: str
    kind: str  # one of KINDS
    value: str

    def __str__(self) -> str:
        return f"{self.name}={self.kind}:{self.value}"


def parse(spec: str) -> list[Component]:
    """The components a SPEC names, in its order; a bad SPEC is a BpfscopeError (one line)."""
    out: list[Component] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, selector = part.partition("=")
        if not eq or not selector:
            raise BpfscopeError(f"component {part!r} is not NAME=SELECTOR", hint="e.g. db=cgroup:/bench/db")
        if not _NAME.match(name):
            raise BpfscopeError(f"component name {name!r}: letters, digits, '.', '_' and '-', 32 at most")
        kind, colon, value = selector.partition(":")
        if not colon or kind not in KINDS:
            kind, value = ("pid", selector) if selector.isdigit() else ("cgroup", selector)
        if kind == "pid" and not (value.isdigit() and int(value) > 0):
            raise BpfscopeError(f"component {name}: {value!r} is not a process id")
        if any(c.name == name for c in out):
            raise BpfscopeError(f"component {name} is named twice")
        out.append(Component(name, kind, value))
    if not out:
        raise BpfscopeError("--components names no component")
    return out


@dataclass
class Resolved:
    """What the kernel is given: cgroup ids and process ids, each with its component's index."""

    components: list[Component]
    cgroups: dict[int, int] = field(default_factory=dict)  # cgroup v2 id -> index
    tgids: dict[int, int] = field(default_factory=dict)  # process -> index
    paths: dict[int, Path] = field(default_factory=dict)  # index -> its cgroup v2 directory

    def index_of(self, tgid: int, cgroup: int) -> int | None:
        """The component of a process in a cgroup: its cgroup's first (a process moved into a named
        cgroup belongs to it, whoever forked it), else its own."""
        found = self.cgroups.get(cgroup)
        return found if found is not None else self.tgids.get(tgid)


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _with_descendants(roots: list[int], children: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def processes_named(comm: str) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().strip() == comm:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def resolve(components: list[Component]) -> Resolved:
    """Cgroup ids and process ids for the kernel's filter, as the system is now."""
    from bpfscope.sources.cgroups import cgroup_dir, container_cgroup

    resolved = Resolved(components)
    children: dict[int, list[int]] | None = None
    for index, c in enumerate(components):
        if c.kind in ("cgroup", "container"):
            path = cgroup_dir(container_cgroup(c.value) if c.kind == "container" else c.value)
            resolved.cgroups[path.stat().st_ino] = index
            resolved.paths[index] = path
            continue
        roots = [int(c.value)] if c.kind == "pid" else processes_named(c.value)
        if c.kind == "pid" and not Path(f"/proc/{c.value}").exists():
            raise BpfscopeError(f"component {c.name}: no process with pid {c.value}")
        if not roots:
            raise BpfscopeError(f"component {c.name}: no process named {c.value!r}")
        children = children if children is not None else _children()
        for pid in _with_descendants(roots, children):
            resolved.tgids[pid] = index
    return resolved
