"""--components: what a SPEC names, and the one-line errors for what it cannot."""

from __future__ import annotations

import pytest

from bpfscope.domains.sched.components import Component, parse
from bpfscope.errors import BpfscopeError


def test_selectors_and_their_short_forms() -> None:
    spec = "db=comm:postgres, app=cgroup:/bench/app,web=/bench/web,cache=4242,box=container:ab12,x=pid:7"
    assert parse(spec) == [
        Component("db", "comm", "postgres"),
        Component("app", "cgroup", "/bench/app"),
        Component("web", "cgroup", "/bench/web"),
        Component("cache", "pid", "4242"),
        Component("box", "container", "ab12"),
        Component("x", "pid", "7"),
    ]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("db", "not NAME=SELECTOR"),
        ("db=", "not NAME=SELECTOR"),
        ("=comm:x", "component name"),
        ("a b=comm:x", "component name"),
        ("db=pid:0", "not a process id"),
        ("db=pid:x", "not a process id"),
        ("db=comm:postgres,db=comm:redis", "named twice"),
        (" , ", "names no component"),
    ],
)
def test_bad_specs_are_one_line(spec: str, says: str) -> None:
    with pytest.raises(BpfscopeError, match=says) as error:
        parse(spec)
    assert "\n" not in error.value.render()
