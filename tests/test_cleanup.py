"""Nothing bpfscope loads outlives it: not after a normal exit, not after SIGTERM or Ctrl-C, not even
after ``kill -9``. bpfscope pins nothing, so its programs, links and maps live only as long as the file
descriptors (and memory mappings) of the process that made them.

A child process loads and attaches tests/bpf/engine_test.bpf.c; the ids of what it holds are read from
its /proc/PID/fdinfo (exact even while other processes load the same program) and checked against
``bpftool ... show --json`` while it runs and after it is stopped."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROG_NAME = "on_getppid"
# The kernel keeps 15 characters of a program's or map's name.
KERNEL_NAME_LEN = 15
OUR_MAPS = {"events", "counts"}
BPFFS = Path("/sys/fs/bpf")
RELEASE_TIMEOUT = 5.0
START_TIMEOUT = 30.0

# Holds the object for its whole life and never closes it: only the kernel can clean up after kill -9.
KILLED_CHILD = """
import sys, time
from bpfscope.engine.bpf import BpfObject

obj = BpfObject(sys.argv[1])
obj.attach()
obj.ring_buffer("events")  # memory mappings of the ring buffer
obj.dropped()  # and of .bss
print("attached", flush=True)
while True:
    time.sleep(1)
"""

# Stopped by SIGTERM or SIGINT as the CLI is: the `with` block closes everything, then the process
# stays alive (until its stdin closes) so that the test sees the cleanup was not the kernel's.
STOPPED_CHILD = """
import signal, sys, time
from bpfscope.engine.bpf import BpfObject
from bpfscope.cli.main import Stop, install_signal_handlers

install_signal_handlers()
# Python only raises KeyboardInterrupt if SIGINT was not ignored when it started (as in a background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    with BpfObject(sys.argv[1]) as obj:
        obj.attach()
        obj.ring_buffer("events")
        obj.dropped()
        print("attached", flush=True)
        while True:
            time.sleep(0.05)
except (Stop, KeyboardInterrupt) as exc:
    print("stopped by", type(exc).__name__, flush=True)
print("closed", flush=True)
sys.stdin.read()
"""


@dataclass
class Held:
    """BPF objects one process holds file descriptors to, by id."""

    progs: set[int] = field(default_factory=set)
    maps: set[int] = field(default_factory=set)
    links: set[int] = field(default_factory=set)
    btfs: set[int] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.progs or self.maps or self.links or self.btfs)


def _fdinfo_ids(pid: int | str, fd: str) -> dict[str, int]:
    ids = {}
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("prog_id", "map_id", "link_id", "btf_id"):
            ids[key] = int(value)
    return ids


def held_by(pid: int | str) -> Held:
    held = Held()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            ids = _fdinfo_ids(pid, fd)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if target == "anon_inode:bpf-prog":
            held.progs.add(ids["prog_id"])
        elif target == "anon_inode:bpf-map":
            held.maps.add(ids["map_id"])
        elif target == "anon_inode:bpf_link":
            held.links.add(ids["link_id"])
            if "prog_id" in ids:
                held.progs.add(ids["prog_id"])
        elif target == "anon_inode:btf":
            held.btfs.add(ids["btf_id"])
    return held


def progs_held_by_any_process() -> set[int]:
    progs: set[int] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            progs |= held_by(pid).progs
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return progs


def bpf_mappings(pid: int) -> list[str]:
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "anon_inode:bpf" in line]


def bpftool(kind: str) -> dict[int, str]:
    """``bpftool KIND show --json`` as {id: name}."""
    result = subprocess.run(
        ["bpftool", kind, "show", "--json"], capture_output=True, text=True, check=True, timeout=30
    )
    return {entry["id"]: entry.get("name", "") for entry in json.loads(result.stdout or "[]")}


def pinned() -> set[Path]:
    return set(BPFFS.rglob("*"))


def ours(names: dict[int, str], wanted: str) -> set[int]:
    return {i for i, name in names.items() if name == wanted[:KERNEL_NAME_LEN]}


class Child:
    """A python -c child whose stdout lines arrive on a queue, so that waiting for one can time out."""

    def __init__(self, code: str, obj: Path, stderr_path: Path, stdin: int) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(obj)],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd="/",
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, wanted: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"child never printed {wanted!r}; stderr:\n{self.stderr_path.read_text()}")
            if line.startswith(wanted):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def engine_obj(compile_test_bpf: Callable[[str], Path]) -> Path:
    return compile_test_bpf("engine_test")


@pytest.fixture
def start_child(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(code: str, obj: Path, stdin: int = subprocess.DEVNULL) -> Child:
        child = Child(code, obj, tmp_path / f"stderr{len(children)}", stdin)
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


@dataclass
class Snapshot:
    progs: dict[int, str]
    pins: set[Path]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(bpftool("prog"), pinned())


def check_attached(child: Child, before: Snapshot) -> Held:
    """What the child holds, checked against bpftool's view: our program, attached, with our maps."""
    child.expect("attached")
    held = held_by(child.pid)
    progs, maps, links = bpftool("prog"), bpftool("map"), bpftool("link")
    assert held.progs, "the child holds no BPF program"
    assert {progs.get(i) for i in held.progs} == {PROG_NAME[:KERNEL_NAME_LEN]}
    assert held.progs <= ours(progs, PROG_NAME) - before.progs.keys()
    assert {maps.get(i) for i in held.maps} >= OUR_MAPS
    assert held.links and held.links <= links.keys(), "the program is loaded but not attached"
    assert bpf_mappings(child.pid), "the ring buffer and .bss are not memory-mapped"
    assert pinned() == before.pins, "something was pinned under /sys/fs/bpf"
    return held


def assert_released(held: Held, before: Snapshot) -> None:
    """Every id the child held disappears from bpftool, and no program of ours is left that no process
    holds (a leak: loaded, not pinned, yet alive). The kernel frees them shortly after the last fd."""
    deadline = time.monotonic() + RELEASE_TIMEOUT
    while True:
        remaining = {
            "prog": held.progs & bpftool("prog").keys(),
            "map": held.maps & bpftool("map").keys(),
            "link": held.links & bpftool("link").keys(),
            "btf": held.btfs & bpftool("btf").keys(),
        }
        new_progs = ours(bpftool("prog"), PROG_NAME) - before.progs.keys()
        orphans = new_progs - progs_held_by_any_process()
        if not any(remaining.values()) and not orphans:
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"still in the kernel after {RELEASE_TIMEOUT}s: {remaining}, orphan programs {orphans}"
            )
        time.sleep(0.1)
    assert pinned() == before.pins


def test_kill_9_leaves_nothing_attached(start_child: Callable[..., Child], engine_obj: Path) -> None:
    before = Snapshot.take()
    child = start_child(KILLED_CHILD, engine_obj)
    held = check_attached(child, before)
    child.proc.send_signal(signal.SIGKILL)
    assert child.proc.wait(timeout=10) == -signal.SIGKILL
    assert_released(held, before)


@pytest.mark.parametrize(
    ("signum", "raised"),
    [
        pytest.param(signal.SIGTERM, "Stop", id="SIGTERM"),
        pytest.param(signal.SIGINT, "KeyboardInterrupt", id="SIGINT"),
    ],
)
def test_signal_closes_everything_before_exit(
    start_child: Callable[..., Child], engine_obj: Path, signum: int, raised: str
) -> None:
    before = Snapshot.take()
    child = start_child(STOPPED_CHILD, engine_obj, stdin=subprocess.PIPE)
    held = check_attached(child, before)
    child.proc.send_signal(signum)
    assert child.expect("stopped by", timeout=10) == f"stopped by {raised}"
    child.expect("closed", timeout=10)
    # Still running: whatever is gone now was released by bpfscope, not by the kernel at exit.
    assert child.proc.poll() is None
    assert held_by(child.pid).empty()
    assert bpf_mappings(child.pid) == []
    assert_released(held, before)
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    assert child.proc.wait(timeout=10) == 0, child.stderr_path.read_text()
    assert child.stderr_path.read_text() == ""
