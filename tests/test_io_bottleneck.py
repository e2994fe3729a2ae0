"""The I/O bottleneck experiment end to end: PostgreSQL alone, then beside a backup job on the same disk.
bpfscope must show the disk as the problem while CPU and RAM stay fine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "io-bottleneck" / "run.py"


def test_experiment_finds_the_saturated_disk(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXPERIMENT), "--seconds", "10", "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    phases = {p["name"]: p for p in json.loads((tmp_path / "results.json").read_text())["phases"]}
    base, loaded = phases["baseline"], phases["under load"]
    # The database slows down a lot (the experiment repeats the phase when the backup job did not slow
    # it: the premise, not bpfscope)...
    assert loaded["pgbench"]["tps"] < base["pgbench"]["tps"] / 2
    assert loaded["backup"]["write_mb_s"] > 0 and loaded["backup"]["write_iops"] > 0
    # ...while CPU and RAM are not the problem, and the check names the disk.
    rows = [r for r in loaded["check"] if r["record"] == "check.row"]
    verdicts = {(r["resource"], r["metric"]): r["verdict"] for r in rows}
    assert verdicts[("CPU", "busy")] != "PROBLEM" and verdicts[("RAM", "used")] == "ok"
    summary = next(r["summary"] for r in loaded["check"] if r["record"] == "check.summary")
    assert summary.startswith("PROBLEM: Disk vda"), summary
    base_summary = next(r["summary"] for r in base["check"] if r["record"] == "check.summary")
    assert "Disk vda" not in base_summary, base_summary
    # biotop names the backup job as the process doing the I/O.
    biotop = [r for r in loaded["biotop"] if r["record"] == "biotop"]
    top = max(biotop, key=lambda r: r["read_kb"] + r["write_kb"])
    assert top["comm"] == "fio"
    for picture in ("latency_heatmap.png", "latency_histograms.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
    assert "PostgreSQL's own I/O" in (tmp_path / "report.md").read_text()
