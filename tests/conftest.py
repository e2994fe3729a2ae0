"""Shared fixtures: test BPF programs compiled once per session, and the ``bpfscope`` command run as a
subprocess. The tests load programs into the running kernel, so they run as root or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bpfscope.build import compile_bpf

TESTS_DIR = Path(__file__).resolve().parent
TEST_BPF_DIR = TESTS_DIR / "bpf"

RunCli = Callable[..., "subprocess.CompletedProcess[str]"]


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        pytest.exit("tests must run as root", returncode=2)


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
