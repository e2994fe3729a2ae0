"""experiments/tetragon-tutorial end to end: the web app attacked while observed, then while enforced, and
each phase's outcome as the enforcement semantics say it must be."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "experiments" / "tetragon-tutorial" / "run.py"


def test_tutorial_observes_then_enforces(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(RUN), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    observe, enforce = report["observe"], report["enforce"]

    def seen(phase: dict, policy: str, event: str, action: str) -> bool:
        return any((h["policy"], h["event"], h["action"]) == (policy, event, action) for h in phase["hits"])

    # Observed: every attack went through, and each was reported with the app in its lineage.
    assert observe["c2_connections"] == 1 and observe["reverse_shell_connections"] == 1
    assert all(r == ["exit 0"] for r in observe["responses"].values()), observe["responses"]
    assert seen(observe, "sensitive-files", "sys_exit_openat", "post")
    assert seen(observe, "webapp", "sched_process_exec", "post")
    assert seen(observe, "webapp", "sys_enter_connect", "post")
    assert seen(observe, "network-and-escape", "sys_enter_dup2", "post")
    # Enforced: the dropper killed before it ran, the exfiltration refused before any packet, the
    # reverse shell killed after its SYN (the listener got the connection, no shell got the socket).
    assert enforce["responses"]["dropper"] == ["exit 137"]
    assert enforce["responses"]["exfiltration"] == ["exit 1"]
    assert enforce["responses"]["reverse-shell"] == ["exit 137"]
    assert enforce["c2_connections"] == 0
    assert enforce["reverse_shell_connections"] == 1
    assert seen(enforce, "webapp", "sched_process_exec", "sigkill")
    assert seen(enforce, "webapp", "sys_enter_connect", "block")
    assert seen(enforce, "webapp", "sys_enter_connect", "sigkill")
    assert not any(h["event"] == "sys_enter_dup2" for h in enforce["hits"])
    assert "== enforce: C2 connections 0" in result.stdout
