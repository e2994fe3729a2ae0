"""bpfscope secure's JSON lines: the fast path (each process encoded once, its text reused in every event
that names it) writes exactly what encoding each record would."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bpfscope.domains.security.events import Formatter, SecurityEvent
from bpfscope.domains.security.processes import (
    RECENT_EXITS,
    Process,
    ProcessCache,
    arguments_of,
    intern,
    join_arguments,
)
from bpfscope.domains.security.secure import SecurityBatch
from bpfscope.sinks.jsonl import dumps

NS = tuple(range(4026531835, 4026531845))


def process(pid: int, parent: Process | None, binary: str, *args: str) -> Process:
    access = intern(((1000, 1000, 1000, 1000, 100, 100, 100, 100, 1000, 0), (0x3, 0x3, 0)))
    return Process(
        pid, pid * 1_000_000, binary, join_arguments((binary, *args)), "/home/u", access, NS, 0,
        "execve",
        parent, parent.pid if parent else 0, pid,
    )  # fmt: skip


def events(cache: ProcessCache) -> list[SecurityEvent]:
    init = cache.add(process(1, None, "/sbin/init"))
    shell = cache.add(process(100, init, "/bin/bash", "-l"))
    out = []
    for pid in range(200, 205):
        child = cache.add(process(pid, shell, "/usr/bin/curl", "-s", "http://example.com/a b", ""))
        grandchild = cache.add(process(pid + 1000, child, "/bin/sh", "-c", 'echo "hi"'))
        out.append(SecurityEvent("process_exec", 1_700_000_000_123_456_789 + pid, grandchild))
        out.append(
            SecurityEvent(
                "process_tracepoint", 1_700_000_000_223_456_789 + pid, grandchild, policy="egress",
                tracepoint="syscalls:sys_enter_connect", action="Sigkill",
                args=[{"sockaddr_arg": {"family": "AF_INET", "addr": "10.0.0.1", "port": 443}, "label": "d"}],
            )
        )  # fmt: skip
        out.append(
            SecurityEvent("process_exit", 1_700_000_000_323_456_789 + pid, grandchild, {"signal": "SIGKILL"})
        )
        out.append(SecurityEvent("process_exit", 1_700_000_000_423_456_789 + pid, child, {"status": 0}))
    return out


def test_fast_json_lines_are_the_records_encoded() -> None:
    for ancestors in (True, False):
        cache = ProcessCache(node="node-1")
        batch = SecurityBatch(events(cache), Formatter(cache, ancestors=ancestors))
        expected = "".join(dumps(record) + "\n" for record in batch.records())
        assert batch.json_lines() == expected
        lines = [json.loads(line) for line in batch.json_lines().splitlines()]
        assert [line["record"] for line in lines[:4]] == [
            "secure.process_exec",
            "secure.process_tracepoint",
            "secure.process_exit",
            "secure.process_exit",
        ]
        assert ("ancestors" in lines[0]["process_exec"]) is ancestors


def test_details_that_would_replace_the_lineage_take_the_slow_path() -> None:
    cache = ProcessCache(node="node-1")
    p = cache.add(process(7, None, "/bin/true"))
    batch = SecurityBatch([SecurityEvent("process_exit", 1, p, {"parent": None})], Formatter(cache))
    assert batch.json_lines() == "".join(dumps(record) + "\n" for record in batch.records())


def test_processes_alike_share_their_capabilities_namespaces_and_credentials() -> None:
    """Two processes with the same credentials, capabilities and namespaces share those dictionaries
    (2.6 of a process's 3.3 kB, each made again before), and each reads as it did."""
    formatter = Formatter(ProcessCache("node"))
    a, b = formatter.process(process(7, None, "/bin/a")), formatter.process(process(8, None, "/bin/b"))
    for key in ("cap", "ns", "process_credentials"):
        assert a[key] is b[key], key
    assert a["cap"] == {"effective": ("CAP_CHOWN", "CAP_DAC_OVERRIDE"), "permitted": a["cap"]["effective"],
                        "inheritable": ()}  # fmt: skip
    assert a["ns"]["uts"] == {"inum": NS[0], "is_host": False} and len(a["ns"]) == len(NS)
    users, groups = ("uid", "euid", "suid", "fsuid"), ("gid", "egid", "sgid", "fsgid")
    assert a["process_credentials"] == {**dict.fromkeys(users, 1000), **dict.fromkeys(groups, 100)}
    assert (a["uid"], a["auid"]) == (1000, 1000)


def test_a_hit_read_after_its_process_exited_still_finds_it() -> None:
    """A hit committed between the reads of the two rings comes in the next drain, after its process's
    exit: the process is still found among the last to exit, and a live one comes first."""
    cache = ProcessCache(node="node-1")
    victim = cache.add(process(300, None, "/tmp/kill-at-exec/touch"))
    assert cache.exit(300) is victim and cache.get(300) is None
    assert cache.get_or_exited(300) is victim
    reused = cache.add(process(300, None, "/bin/true"))
    assert cache.get_or_exited(300) is reused
    for pid in range(1000, 2000):  # the kept exits are bounded, the latest always among them
        cache.add(process(pid, None, "/bin/true"))
        cache.exit(pid)
        assert min(pid - 1000 + 1, RECENT_EXITS) <= len(cache.exited) <= 2 * RECENT_EXITS
    assert all(cache.get_or_exited(pid) is not None for pid in range(2000 - RECENT_EXITS, 2000))
    assert cache.get_or_exited(1000) is None


def test_a_clone_sent_after_its_parent_left_finds_the_parent() -> None:
    """The kernel sends a clone's record only when something names it, maybe after its parent exited or
    executed another program: a parent that left children is kept (bounded), by pid and identity."""
    cache = ProcessCache(node="node-1")
    script = cache.add(process(400, None, "/usr/bin/python3"))
    assert cache.exit(400, children_left=True) is script
    for pid in range(2000, 2300):  # many exits since, none of them parents: the parent is still known
        cache.add(process(pid, None, "/bin/true"))
        cache.exit(pid)
    daemon = cache.clone(401, 400, 401_000_000, script.ktime)
    assert daemon.parent is script and daemon.binary == "/usr/bin/python3" and daemon.flags == "clone"
    assert cache.clone(402, 400, 402_000_000, script.ktime + 1).parent is None  # another process's
    shell = cache.add(process(500, None, "/bin/sh"))
    cache.keep_as_parent(500)  # its exec, about to replace it
    env = process(500, None, "/usr/bin/env")
    env.ktime += 1  # a later exec
    cache.add(env)
    assert cache.clone(501, 500, 501_000_000, shell.ktime).parent is shell
    for pid in range(3000, 3000 + 4097):  # bounded
        cache.add(process(pid, None, "/bin/sh"))
        cache.exit(pid, children_left=True)
    assert len(cache.parents_gone) == 4096 and 400 not in cache.parents_gone


ARGUMENT = st.text(alphabet=st.sampled_from("ab é"), max_size=4)


@given(st.lists(ARGUMENT, min_size=1, max_size=5), st.integers(0, 20))
def test_arguments_from_the_kernels_record_are_tetragons(argv: list[str], cut: int) -> None:
    """The fast path (NULs made spaces) gives what joining the split arguments gives, arguments empty,
    with spaces, or cut short included (as the kernel cuts a long command line)."""
    text = "".join(a + "\0" for a in argv)
    for kept in (text, text[: max(1, len(text) - cut)]):
        split = kept.split("\0")
        if split[-1] == "":
            split.pop()
        assert arguments_of(kept) == join_arguments(split)
