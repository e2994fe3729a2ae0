"""The experiment's report: Markdown with pictures, from what bpfscope and pgbench measured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from bpfscope.health.verdict import ms

if TYPE_CHECKING:
    from run import Phase


def heatmap(phases: list[Phase], path: Path) -> None:
    """PostgreSQL's I/Os over time: time on x, log of queue + device time on y, colour the number of I/Os."""
    times, lats = [], []
    for phase in phases:
        for r in phase.biosnoop:
            times.append(r["t"])  # seconds since the experiment's clock started, as phase.start
            lats.append(max(r["latency_ms"] + r["queue_ms"], 1e-3))
    fig, ax = plt.subplots(figsize=(10, 4))
    if times:
        t = np.array(times)
        x_edges = np.arange(0, t.max() + 1, 0.5)
        y_edges = np.logspace(-2, np.log10(max(lats) * 1.5), 40)
        h, _, _ = np.histogram2d(t, np.array(lats), bins=[x_edges, y_edges])
        mesh = ax.pcolormesh(
            x_edges, y_edges, h.T, norm=LogNorm(vmin=1, vmax=max(h.max(), 1)), cmap="viridis"
        )
        fig.colorbar(mesh, ax=ax, label="I/Os per 0.5 s")
        for phase in phases[1:]:
            ax.axvline(phase.start, color="red", linestyle="--")
            ax.text(phase.start, y_edges[-1], f" {phase.name}", color="red", va="top")
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("queue + device time (ms)")
    ax.set_title("PostgreSQL's block I/O latency over time (biosnoop on its cgroup)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histograms(phases: list[Phase], path: Path) -> None:
    """biolatency's distribution per phase, on the same log axis."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for phase in phases:
        for record in _biolatency(phase)[:1]:
            buckets = record["hist"]
            if not buckets:
                continue
            mids = [(b["low"] + b["high"]) / 2 / 1000 for b in buckets]  # buckets of microseconds
            total = sum(b["count"] for b in buckets)
            ax.plot(mids, [b["count"] / total * 100 for b in buckets], marker="o", label=phase.name)
    ax.set_xscale("log")
    ax.set_xlabel("queue + device time (ms)")
    ax.set_ylabel("% of I/Os")
    ax.set_title("All block I/O on vda: latency distribution (biolatency -Q)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_table(phase: Phase) -> list[str]:
    lines = ["| resource | metric | value | verdict | detail |", "|---|---|---|---|---|"]
    for row in phase.check:
        if row["record"] == "check.row":
            lines.append(
                f"| {row['resource']} | {row['metric']} | {row['text']} | {row['verdict']} | "
                f"{row['detail']} |"
            )
    summary = next((r["summary"] for r in phase.check if r["record"] == "check.summary"), "")
    return [*lines, "", f"Summary: **{summary}**"]


def _top_table(phase: Phase, limit: int = 5) -> list[str]:
    rows = [r for r in phase.biotop if r["record"] == "biotop"]
    rows = sorted(rows, key=lambda r: r["read_kb"] + r["write_kb"], reverse=True)[:limit]
    lines = [
        "| pid | comm | disk | reads | writes | read kB | write kB | avg ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pid']} | {r['comm']} | {r['disk']} | {r['reads']} | {r['writes']} | "
            f"{r['read_kb']} | {r['write_kb']} | {r['avg_ms']} | {r['p99_ms']} |"
        )
    return lines


def _postgres_io(phases: list[Phase]) -> list[str]:
    """PostgreSQL's own I/Os (biosnoop, filtered on its cgroup): how long each waited on the disk."""
    lines = ["| phase | I/Os | p50 ms | p99 ms | max ms | slowest kind |", "|---|---|---|---|---|---|"]
    for phase in phases:
        lat = np.array([r["latency_ms"] + r["queue_ms"] for r in phase.biosnoop])
        if not len(lat):
            lines.append(f"| {phase.name} | 0 | - | - | - | - |")
            continue
        slowest = max(phase.biosnoop, key=lambda r: r["latency_ms"])
        kind = f"{slowest['op']} {'/'.join(slowest['flags'])} by {slowest['comm']}".strip()
        lines.append(
            f"| {phase.name} | {len(lat)} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
            f"{lat.max():.2f} | {kind} |"
        )
    return lines


def _biolatency(phase: Phase) -> list[dict[str, Any]]:
    return [r for r in phase.biolatency if r["record"] == "biolatency"]


def _percentiles(phase: Phase) -> str:
    """biolatency's percentiles (its JSON is in microseconds), for people."""
    records = _biolatency(phase)
    record = records[0] if records else {}
    parts = [
        f"{key.removesuffix('_us')} {ms(value)}"
        for key, value in record.items()
        if key.startswith("p") and key.endswith("_us") and value is not None
    ]
    return ", ".join(parts) or "no I/O"


def _losses(phases: list[Phase]) -> str:
    """What the tools could not see, from the losses record each ends its JSON with."""
    lost = [
        f"{tool} {n} ({reason}) in {p.name}"
        for p in phases
        for tool, reasons in p.lost.items()
        for reason, n in reasons.items()
    ]
    if not lost:
        return "The tools lost no event (biosnoop, biolatency and biotop, both phases)."
    return "Events the tools lost: " + ", ".join(lost) + "."


def write_report(out: Path, phases: list[Phase], backup_pid: int, attempts: int = 1) -> Path:
    heatmap(phases, out / "latency_heatmap.png")
    histograms(phases, out / "latency_histograms.png")
    base, loaded = phases[0], phases[-1]
    tps_drop = base.pgbench.get("tps", 0) / max(loaded.pgbench.get("tps", 1), 1e-9)
    lines = [
        "# I/O bottleneck: PostgreSQL slows down while CPU and RAM look fine",
        "",
        "Made by `experiments/io-bottleneck/run.py`; every number below was measured in that run.",
        "",
        f"## PostgreSQL (pgbench, TPC-B-like, {base.pgbench and 'scale 20'}, 4 clients)",
        "",
        "| phase | TPS | average latency (ms) | I/Os seen by biosnoop |",
        "|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.pgbench.get('tps', 0):.0f} | {p.pgbench.get('latency_ms', 0):.2f} | "
            f"{len(p.biosnoop)} |"
        )
    lines += [
        "",
        f"Throughput fell {tps_drop:.1f}x when the backup job (fio, pid {backup_pid}) shared the disk; "
        f"fio wrote {loaded.backup.get('write_mb_s', 0):.0f} MB/s "
        f"({loaded.backup.get('write_iops', 0):.0f} writes a second)."
        + (
            f" It took {attempts} attempts: in the others the backup job did not slow PostgreSQL by half."
            if attempts > 1
            else ""
        ),
        "",
        _losses(phases),
        "",
    ]
    for p in phases:
        lines += [f"## bpfscope check: {p.name}", "", *_check_table(p), ""]
        lines += [f"All I/O on vda, queue + device time (biolatency -Q): {_percentiles(p)}", ""]
    lines += [
        "## PostgreSQL's own I/O (biosnoop on its cgroup; queue and device time)",
        "",
        *_postgres_io(phases),
        "",
        "## Who does the I/O under load (biotop)",
        "",
        *_top_table(loaded),
        "",
    ]
    lines += [
        "## Pictures",
        "",
        "![latency heatmap](latency_heatmap.png)",
        "",
        "![latency histograms](latency_histograms.png)",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
