"""bpfscope doctor against independent facts of this machine, and tools' declared requirements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpfscope.engine import bpf, libbpf
from bpfscope.errors import MissingCapability


@pytest.fixture(scope="module")
def doctor() -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "doctor", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["record"] for r in records} == {"doctor"}, records
    return {row["name"]: row for row in records}


def test_reports_every_capability(doctor: dict[str, dict]) -> None:
    expected = {
        "libbpf",
        "BTF",
        "tracefs",
        "PSI",
        "cgroup v1",
        "cgroup v2",
        "tracepoint",
        "raw_tracepoint",
        "tp_btf",
        "perf_event",
        "uprobe",
        "kprobe",
        "fentry",
        "lsm",
        "ringbuf",
        "bpf_send_signal",
        "cgroup connect4",
        "cgroup connect6",
        "cgroup sendmsg4",
        "cgroup sendmsg6",
    }
    assert set(doctor) == expected


def test_cgroup_socket_hooks_refuse_what_they_are_told_to(doctor: dict[str, dict]) -> None:
    """What bpfscope secure's Block rules stand on (measured here: cgroup/connect4 refusals work); the
    probe refused the doctor's own connect or send, and nobody else's."""
    for name in ("cgroup connect4", "cgroup connect6", "cgroup sendmsg4", "cgroup sendmsg6"):
        assert doctor[name]["ok"], doctor[name]
        assert doctor[name]["needed"] is False


def test_what_bpfscope_needs_works_here(doctor: dict[str, dict]) -> None:
    for name in (
        "tracepoint",
        "raw_tracepoint",
        "tp_btf",
        "perf_event",
        "uprobe",
        "ringbuf",
        "bpf_send_signal",
    ):
        assert doctor[name]["ok"], doctor[name]
        assert doctor[name]["needed"]


def test_verdicts_agree_with_the_kernel(doctor: dict[str, dict]) -> None:
    # kprobe_events exists in tracefs exactly when the kernel has kprobe-based events.
    assert doctor["kprobe"]["ok"] == Path("/sys/kernel/tracing/kprobe_events").exists()
    lsm = Path("/sys/kernel/security/lsm")
    active = lsm.read_text().split(",") if lsm.exists() else []
    assert doctor["lsm"]["ok"] == ("bpf" in active)
    assert doctor["BTF"]["ok"] == Path("/sys/kernel/btf/vmlinux").exists()
    assert doctor["PSI"]["ok"] == Path("/proc/pressure/io").exists()
    assert doctor["libbpf"]["detail"].startswith("{}.{}".format(*libbpf.version()))
    tracepoints = sum(1 for p in Path("/sys/kernel/tracing/events").glob("*/*") if p.is_dir())
    assert f"{tracepoints} tracepoints" in doctor["tracefs"]["detail"]


def test_human_table(doctor: dict[str, dict]) -> None:
    result = subprocess.run([sys.executable, "-m", "bpfscope", "doctor"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in doctor:
        assert name in result.stdout


def test_missing_requirement_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpf, "probe_ringbuf", lambda: False)
    with pytest.raises(MissingCapability, match="lacks ringbuf"):
        bpf.require("tracepoint", "ringbuf")
    bpf.require("tracepoint", "perf_event", "raw_tracepoint")
