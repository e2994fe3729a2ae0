"""One CLI vocabulary: a flag means one thing in every tool, and every tool shares the common options.

The vocabulary (cli/options.py) defines each shared flag once; BCC spellings that differ stay as aliases
in their tool only (BCC_ALIASES). This walks every tool the registry knows, without running any.
"""

from __future__ import annotations

import click
import pytest

from bpfscope.cli import registry
from bpfscope.cli.options import BCC_ALIASES, VOCABULARY

COMMON = ("pid", "cgroup", "container", "json", "duration", "include_self")
# Tools that are not collectors over the task filters: they say so in their help.
NOT_FILTERED = {"check", "doctor", "fincore", "agent", "query"}


def _commands() -> dict[str, click.Command]:
    return {name: registry.command(name) for name in sorted(registry.tools())}


def _flags_of_vocabulary() -> dict[str, str]:
    return {flag: name for name, spec in VOCABULARY.items() for flag in spec.flags}


@pytest.mark.parametrize("tool", sorted(registry.tools()))
def test_flags_mean_what_the_vocabulary_says(tool: str) -> None:
    command = registry.command(tool)
    assert command is not None
    owner = _flags_of_vocabulary()
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        flags = [*param.opts, *param.secondary_opts]
        entries = {owner[f] for f in flags if f in owner and (tool, f) not in BCC_ALIASES}
        assert len(entries) <= 1, f"{tool}: {flags} mixes vocabulary entries {entries}"
        if not entries:
            short = [f for f in flags if len(f) == 2 and (tool, f) not in BCC_ALIASES]
            assert not short or not any(f in owner for f in short), f"{tool}: {flags}"
            continue
        (entry,) = entries
        spec = VOCABULARY[entry]
        aliases = {f for f in flags if (tool, f) in BCC_ALIASES}
        assert set(flags) - aliases == set(spec.flags), f"{tool}: {flags} should be {spec.flags}"
        assert all(BCC_ALIASES[(tool, f)] == entry for f in aliases), f"{tool}: {aliases}"
        assert param.name == spec.dest, f"{tool}: {flags} goes to {param.name}, not {spec.dest}"


def test_a_short_flag_has_one_meaning_across_tools() -> None:
    meaning: dict[str, set[str]] = {}
    for tool, command in _commands().items():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            longs = [f for f in param.opts if f.startswith("--")]
            for flag in param.opts:
                if len(flag) == 2 and (tool, flag) not in BCC_ALIASES:
                    meaning.setdefault(flag, set()).add(longs[0] if longs else flag)
    mixed = {flag: longs for flag, longs in meaning.items() if len(longs) > 1}
    assert not mixed, mixed


@pytest.mark.parametrize("tool", sorted(set(registry.tools()) - NOT_FILTERED))
def test_every_tool_takes_the_common_options(tool: str) -> None:
    command = registry.command(tool)
    assert command is not None
    names = {p.name for p in command.params}
    assert {VOCABULARY[name].dest for name in COMMON} <= names, tool
    assert {"interval", "count"} <= names, tool


@pytest.mark.parametrize("tool", sorted(registry.tools()))
def test_help_has_examples(tool: str) -> None:
    command = registry.command(tool)
    assert command is not None
    assert command.epilog and "Examples:" in command.epilog, tool
    assert command.help and len(command.help) > 40, tool
    # The manifest's summary is the one line `bpfscope --help` shows.
    assert command.short_help == registry.tools()[tool].summary


def test_bcc_aliases_name_real_tools_and_entries() -> None:
    for (tool, flag), entry in BCC_ALIASES.items():
        assert tool in registry.tools(), tool
        assert entry in VOCABULARY and flag not in VOCABULARY[entry].flags


def test_a_tool_is_found_from_its_own_domain_as_from_the_whole_registry() -> None:
    # The command runs one tool and reads only its domain's manifest (start-up); it must find what the
    # whole registry lists.
    for name, entry in registry.tools().items():
        assert registry.entry(name) == entry
    assert registry.entry("no-such-tool") is None
