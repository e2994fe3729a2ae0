"""The tools the ``bpfscope`` command knows, built from the domains' manifests (and the health check's),
so that no list is kept by hand. Manifests import nothing, and a tool's module is imported only when it
runs: start-up stays short."""

from __future__ import annotations

import importlib
from functools import cache

import click

from bpfscope import agent, domains, health
from bpfscope.domains import ToolEntry

_extra: dict[str, ToolEntry] = {}


def _layers() -> dict[str, ToolEntry]:
    tools = {}
    for package in (health, agent):
        layer = package.__name__.rpartition(".")[2]
        for name, summary in package.TOOLS.items():
            tools[name] = ToolEntry(name, f"{package.__name__}.{name}", summary, layer)
    return tools


@cache
def _known() -> dict[str, ToolEntry]:
    return {**domains.tools(), **_layers()}


def tools() -> dict[str, ToolEntry]:
    return {**_known(), **_extra}


def entry(name: str) -> ToolEntry | None:
    """The tool ``name``, as ``tools()[name]`` but reading only its own domain's manifest."""
    return _extra.get(name) or _layers().get(name) or domains.tool(name)


def register(name: str, module: str, summary: str) -> None:
    """Add a tool from outside the domains (tests, plug-ins)."""
    _extra[name] = ToolEntry(name, module, summary, "extra")


def command(name: str) -> click.Command | None:
    found = entry(name)
    if found is None:
        return None
    cmd = importlib.import_module(found.module).command
    # The manifest's summary is the one description of the tool: `bpfscope --help` lists it.
    cmd.short_help = found.summary
    return cmd
