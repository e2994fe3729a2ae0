"""experiments/parca-tutorial end to end, in its short mode (4 s a phase): each service's hot path found
in one profile of the machine, the optimisation seen in the diff and in the load generator's own
count of requests, and the service that is slow while idle found off the CPU, its blocked time
checked against the upstream's delay and the clients' own clocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "experiments" / "parca-tutorial" / "run.py"


def test_tutorial_finds_hot_paths_the_optimisation_and_the_wait(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(RUN), "--seconds", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # Each service's own hot function is on most of its samples (the services spend 75-90% of their
    # CPU under it, timed apart), whatever the language and however it was built.
    hot = report["hot_paths"]
    assert hot["lost"] == {}, hot["lost"]
    for name, found in hot["services"].items():
        assert found["samples"] >= 20 and found["requests_per_s"] > 0, (name, found)
        assert found["hot_pct"] >= 50, (name, found)
    images = hot["services"]["images"]
    assert images["self"][0][0] == "checksum_slow", images["self"]

    # Before and after: the slow checksum gone from the profile, the fast one in its place, and the
    # service answering faster by the load generator's count.
    before, after = report["before_after"]["before"], report["before_after"]["after"]
    assert before["hot_pct"] >= 50 and after["hot_pct"] == 0, (before, after)
    assert after["shares"].get("checksum_fast", 0) > 20, after["shares"]
    assert after["requests_per_s"] > 1.5 * before["requests_per_s"], (before, after)
    assert "checksum_slow" in report["before_after"]["diff_table"]
    assert (tmp_path / "images-diff.html").read_text().startswith("<!DOCTYPE html>")

    # Off the CPU: pricing is busy for a small part of a CPU, yet each request waits under fetch_rates
    # at least the upstream's delay, and no longer than the client saw the whole request take.
    off = report["off_cpu"]
    assert off["lost"] == {}, off["lost"]
    assert off["cpu_pct"] < 50, off
    assert 0.95 * off["upstream_delay_ms"] <= off["fetch_rates_ms_per_request"] <= off["latency_ms"], off
    assert off["fetch_rates_blocked_s"] >= 0.8 * off["blocked_s"], off

    # The pictures, taken by headless Chromium.
    assert len(report["pictures"]) == 6, report["pictures"]
    for name in report["pictures"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
