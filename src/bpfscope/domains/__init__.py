"""The domains: each a family of tools with its BPF header, its Python helpers, its tools (a collector and
a thin view each) and its health rules, side by side.

A domain's ``__init__`` is its manifest and imports nothing: ``TOOLS`` maps each tool's name to its
one-line summary (the tool is the module of that name in the domain, with a click ``command``), ``RULES``
lists its health rules for ``bpfscope check`` as ``(order, "module:Class")``, rows shown by order across
domains. The CLI and the health check are built from these manifests, so adding a tool or a rule is
adding it here, beside its code.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ToolEntry:
    name: str
    module: str  # bpfscope.domains.DOMAIN.NAME
    summary: str
    domain: str


@dataclass(frozen=True)
class RuleEntry:
    order: int
    path: str  # bpfscope.domains.DOMAIN.MODULE:Class
    domain: str


@cache
def names() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


def manifest(domain: str) -> object:
    return importlib.import_module(f"{__name__}.{domain}")


def tools() -> dict[str, ToolEntry]:
    out: dict[str, ToolEntry] = {}
    for domain in names():
        for name, summary in getattr(manifest(domain), "TOOLS", {}).items():
            if name in out:
                raise RuntimeError(f"tool {name} is in domains {out[name].domain} and {domain}")
            out[name] = ToolEntry(name, f"{__name__}.{domain}.{name}", summary, domain)
    return out


def tool(name: str) -> ToolEntry | None:
    """The tool ``name``, reading only the manifest of the domain that holds its module: running one tool
    needs no other manifest."""
    for domain in names():
        if os.path.exists(os.path.join(__path__[0], domain, f"{name}.py")):
            summary = getattr(manifest(domain), "TOOLS", {}).get(name)
            if summary is not None:
                return ToolEntry(name, f"{__name__}.{domain}.{name}", summary, domain)
    return None


def rules() -> list[RuleEntry]:
    entries = [
        RuleEntry(order, f"{__name__}.{domain}.{path}", domain)
        for domain in names()
        for order, path in getattr(manifest(domain), "RULES", ())
    ]
    return sorted(entries, key=lambda e: e.order)
