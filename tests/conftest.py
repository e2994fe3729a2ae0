"""Shared fixtures: test BPF programs compiled once per session, and the ``bpfscope`` command run as a
subprocess.

Two tiers: tests/unit/ is pure Python and runs anywhere, without root, in seconds; every other test loads
programs into the running kernel, so it runs as root or not at all."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from bpfscope.build import compile_bpf

TESTS_DIR = Path(__file__).resolve().parent
TEST_BPF_DIR = TESTS_DIR / "bpf"

RunCli = Callable[..., "subprocess.CompletedProcess[str]"]


UNIT_DIR = TESTS_DIR / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    kernel_tier = [item for item in items if not Path(item.path).is_relative_to(UNIT_DIR)]
    if kernel_tier:
        pytest.exit(
            f"{len(kernel_tier)} tests load BPF programs and must run as root (tests/unit runs without)",
            returncode=2,
        )


@pytest.fixture(scope="session")
def compile_test_bpf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``(name) -> Path``: tests/bpf/NAME.bpf.c compiled into a session directory, once per name."""
    out_dir = tmp_path_factory.mktemp("bpf")
    built: dict[str, Path] = {}

    def compile_one(name: str) -> Path:
        if name not in built:
            source = TEST_BPF_DIR / f"{name}.bpf.c"
            if not source.exists():
                raise FileNotFoundError(f"no test BPF program {source}")
            built[name] = compile_bpf(source, out_dir / f"{name}.bpf.o")
        return built[name]

    return compile_one


def run_bpfscope(
    *args: str,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m bpfscope ARGS`` from ``/``; ``env`` adds to (or overrides) this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "bpfscope", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={**os.environ, **env} if env is not None else None,
        preexec_fn=preexec,
    )


@pytest.fixture
def run_cli() -> RunCli:
    """``run_cli(*args, env=None, preexec=None) -> CompletedProcess``: the bpfscope command, captured."""
    return run_bpfscope


WORKLOAD_PRELUDE = "import os, sys, time\nsys.stdin.readline()\n"
WORKLOAD_EPILOGUE = '\nprint("done", flush=True)\nsys.stdin.readline()\n'


def _wait_line(stream: IO[str], timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"no {what} within {timeout} s")
    return stream.readline()


def trace_workload(tool_args: list[str], workload: str, timeout: float = 60.0) -> tuple[str, str]:
    """Run a bpfscope tool around a known workload and return its (stdout, stderr).

    The workload is Python code run in a child that waits until the tool has attached; ``{pid}`` in
    ``tool_args`` becomes the child's pid. The tool is stopped with SIGINT once the work is done, as a
    person would with Ctrl-C.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD_PRELUDE + workload + WORKLOAD_EPILOGUE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    args = [a.replace("{pid}", str(child.pid)) for a in tool_args]
    tool = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert tool.stderr is not None
    try:
        attached = _wait_line(tool.stderr, timeout, "sign that the programs are attached")
        assert attached.startswith("Tracing"), attached + tool.stderr.read()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert _wait_line(child.stdout, timeout, "end of the workload").strip() == "done"
        time.sleep(0.1)
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.stdin.write("exit\n")
            child.stdin.close()
            child.wait(timeout=10)
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0, err
    return out, attached + err


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 directory for the test's processes, removed afterwards."""
    from bpfscope.sources.cgroups import cgroup2_mounts

    mounts = cgroup2_mounts()
    if not mounts:
        pytest.fail("no cgroup v2 mount: --cgroup cannot be tested")
    path = mounts[0] / f"bpfscope-test-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        # Its processes have exited by now; an empty cgroup can be removed.
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
