"""The experiment's report: Markdown, a picture of TPS and hit ratio against RAM, and the point where adding
RAM stops paying, all from the measurements in results (run.py's dictionary, also results.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PAGE = 4096
# Where adding RAM stops paying: the cache holds (nearly) everything the workload reads...
PLATEAU_HIT_RATIO = 99.0
# ...and no larger limit buys 15% more throughput. Once the data is cached, TPS is bounded by the CPUs, which
# this 2-CPU machine shares with other programs: between windows at 100% hit ratio, their share moved TPS
# by up to about 15% in our runs, so a smaller gain cannot be told from them.
PLATEAU_GAIN = 0.15


def hit_ratio(setting: dict[str, Any]) -> float | None:
    """bpfscope cachestat's hit ratio (None: no lookups in the window)."""
    return setting["cache"]["hit_ratio"]


def per_second(setting: dict[str, Any], value: float | None) -> float:
    return (value or 0) / setting["seconds"] if setting["seconds"] else 0.0


def transactions(setting: dict[str, Any]) -> float:
    """Transactions in the window: the mean of pgbench's seconds times the window (the TPS shown is their
    median, which one slow second moves less)."""
    seconds = setting["pgbench"].get("tps_per_second") or [setting["tps"]]
    return sum(seconds) / len(seconds) * setting["seconds"]


def per_tx(setting: dict[str, Any], value: float | None) -> float:
    count = transactions(setting)
    return (value or 0) / count if count else 0.0


def disk_reads_per_1k_tx(setting: dict[str, Any]) -> float:
    return 1000 * per_tx(setting, setting["cgroup_read_ios"])


def plateau(settings: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The smallest RAM limit whose hit ratio is at least PLATEAU_HIT_RATIO and past which no larger limit
    beats the best TPS measured up to it by PLATEAU_GAIN or more; with the sentence that states it. The
    best so far, rather than the previous step alone, keeps one window slowed by other programs from
    passing for a gain at the next step."""
    ordered = sorted(settings, key=lambda s: s["limit_mb"])
    criterion = (
        f"hit ratio >= {PLATEAU_HIT_RATIO:.0f}%, and no larger limit {100 * PLATEAU_GAIN:.0f}% faster than "
        "the best up to it"
    )
    for i, setting in enumerate(ordered):
        ratio = hit_ratio(setting)
        if ratio is None or ratio < PLATEAU_HIT_RATIO:
            continue
        best = max(s["tps"] for s in ordered[: i + 1])
        later = ordered[i + 1 :]
        gain = max((s["tps"] / best - 1 for s in later), default=None) if best else None
        if gain is None:
            return setting, (
                f"Adding RAM stops paying at **{setting['limit_mb']} MB**, the largest limit tried: its hit "
                f"ratio is {ratio:.1f}%, so the cache already holds what the workload reads ({criterion})."
            )
        if gain < PLATEAU_GAIN:
            return setting, (
                f"Adding RAM stops paying at **{setting['limit_mb']} MB**: the hit ratio is {ratio:.1f}% "
                f"there, and the fastest larger limit was {max(gain, 0.0):.1%} faster ({criterion})."
            )
    last = ordered[-1]
    return None, (
        f"Adding RAM still paid at the largest limit tried ({last['limit_mb']} MB, hit ratio "
        f"{_pct(hit_ratio(last))}): the plateau ({criterion}) lies beyond it."
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def picture(results: dict[str, Any], knee: dict[str, Any] | None, path: Path) -> None:
    settings = sorted(results["settings"], key=lambda s: s["limit_mb"])
    limits = [s["limit_mb"] for s in settings]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(limits, [s["tps"] for s in settings], "o-", color="tab:blue", label="TPS (pgbench -S)")
    top.set_ylabel("transactions per second", color="tab:blue")
    top.set_ylim(bottom=0)
    ratio_axis = top.twinx()
    ratios = [s["cache"]["hit_ratio"] for s in settings]
    ratio_axis.plot(limits, ratios, "s-", color="tab:red", label="hit ratio (bpfscope cachestat)")
    truths = [s["truth_hit_ratio"] for s in settings]
    ratio_axis.plot(limits, truths, "x--", color="tab:orange", label="hit ratio (/proc/PID/io and blkio)")
    ratio_axis.set_ylabel("page-cache hit ratio (%)", color="tab:red")
    ratio_axis.set_ylim(0, 105)
    for axis in (top, bottom):
        axis.axvline(results["data_mb"], color="grey", linestyle=":")
        if knee is not None:
            axis.axvline(knee["limit_mb"], color="green", linestyle="--")
    top.text(results["data_mb"], 0, " data set", color="grey", va="bottom")
    if knee is not None:
        top.text(knee["limit_mb"], top.get_ylim()[1] * 0.35, " more RAM stops paying", color="green")
    handles = top.get_legend_handles_labels()[0] + ratio_axis.get_legend_handles_labels()[0]
    top.legend(handles=handles, loc="upper left", fontsize="small")
    top.set_title("PostgreSQL select-only workload against the RAM its cgroup may use")

    vfs = [per_tx(s, s["vfs_reads"]) for s in settings]
    bottom.plot(limits, vfs, "s-", label="VFS reads (bpfscope vfsstat)")
    lookups = [per_tx(s, s["cache"]["lookups"]) for s in settings]
    bottom.plot(limits, lookups, "D-", label="page-cache lookups, pages (bpfscope cachestat)")
    misses = [per_tx(s, s["cache"]["misses"]) for s in settings]
    bottom.plot(limits, misses, "^-", label="page-cache misses, pages (bpfscope cachestat)")
    disk = [per_tx(s, s["cgroup_read_ios"]) for s in settings]
    bottom.plot(limits, disk, "o-", label="disk reads (cgroup blkio)")
    bottom.set_ylabel("per transaction")
    bottom.set_xlabel("RAM limit of the server's memory cgroup (MB)")
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _service_table(settings: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| RAM limit | TPS | latency avg | hit ratio | disk reads/s: server (whole disk) | "
        "disk reads per 1000 tx | VFS reads/s | CPU busy (of it, other programs) | RAM used (system) | "
        "server's cgroup used |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        full = 100 * s["memory_after"]["usage_in_bytes"] / (s["limit_mb"] << 20)
        ram = f"{s['ram_used_pct']:.0f}% ({s['ram_available_gb']:.1f} GiB available)"
        vfs = f"{per_second(s, s['vfs_reads']):.0f}"
        cpu = f"{s['cpu_busy_pct']:.0f}% ({s['cpu_others_pct']:.0f}%)"
        lines.append(
            f"| {s['limit_mb']} MB | {s['tps']:.0f} | {s['pgbench'].get('latency_ms', 0):.3f} ms | "
            f"{_pct(hit_ratio(s))} | {per_second(s, s['cgroup_read_ios']):.0f} "
            f"({per_second(s, s['disk_read_ios']):.0f}) | "
            f"{disk_reads_per_1k_tx(s):.0f} | {vfs} | {cpu} | {ram} | {full:.0f}% |"
        )
    return lines


def _agreement_table(settings: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| RAM limit | lookups/s (bpfscope) | of which page faults | pages read calls returned/s (rchar) | "
        "misses/s (bpfscope) | "
        "pages read from disk/s (blkio) | hit ratio (bpfscope) | hit ratio (independent) | difference | "
        "VFS reads/s (bpfscope) | read calls/s (syscr) | cgroup cache |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        cache = s["cache"]
        faults = per_second(s, cache["fault_pages"])
        ours, truth = cache["hit_ratio"], s["truth_hit_ratio"]
        diff = f"{ours - truth:+.2f} pts" if ours is not None and truth is not None else "-"
        vfs = f"{per_second(s, s['vfs_reads']):.0f}"
        lines.append(
            f"| {s['limit_mb']} MB | {per_second(s, cache['lookups']):.0f} | {faults:.0f} | "
            f"{per_second(s, s['proc_io']['rchar'] / PAGE):.0f} | {per_second(s, cache['misses']):.0f} | "
            f"{per_second(s, s['cgroup_read_bytes'] / PAGE):.0f} | {_pct(ours)} | {_pct(truth)} | {diff} | "
            f"{vfs} | {per_second(s, s['proc_io']['syscr']):.0f} | "
            f"{s['memory_after'].get('cache', 0) / (1 << 20):.0f} MB |"
        )
    return lines


def _check_table(settings: list[dict[str, Any]]) -> list[str]:
    """bpfscope check over each window: CPU, RAM and the page cache beside each other, and its summary."""
    shown = (("CPU", "busy"), ("RAM", "used"), ("Page cache", "hit ratio"))
    lines = [
        "| RAM limit | " + " | ".join(f"{r} {m}" for r, m in shown) + " | summary |",
        "|---:|" + "---|" * (len(shown) + 1),
    ]
    for s in settings:
        rows = {(r["resource"], r["metric"]): r for r in s["check"] if r["record"] == "check.row"}
        cells = [f"{rows[k]['text']} {rows[k]['verdict']}" if k in rows else "-" for k in shown]
        summary = next((r["summary"] for r in s["check"] if r["record"] == "check.summary"), "")
        lines.append(f"| {s['limit_mb']} MB | " + " | ".join(cells) + f" | {summary} |")
    return lines


def _cli_table(settings: list[dict[str, Any]]) -> list[str]:
    """The seconds `bpfscope cachestat --json --cgroup PATH 1` printed inside each window, added up,
    beside the collector's figure for the whole window."""
    lines = [
        "| RAM limit | seconds | lookups/s | misses/s | hit ratio (CLI) | hit ratio (whole window) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        records = s["cachestat_cli"]
        seconds = sum(r["interval_s"] for r in records)
        lookups, misses = sum(r["lookups"] for r in records), sum(r["misses"] for r in records)
        ratio = 100.0 * (lookups - misses) / lookups if lookups else None
        rate = 1 / seconds if seconds else 0.0
        lines.append(
            f"| {s['limit_mb']} MB | {seconds:.1f} | {lookups * rate:.0f} | {misses * rate:.0f} | "
            f"{_pct(ratio)} | {_pct(s['cache']['hit_ratio'])} |"
        )
    return lines


def _cli_section(settings: list[dict[str, Any]]) -> list[str]:
    keys = ("lookups", "hits", "misses", "hit_ratio", "cached_mb")
    first = [{k: r[k] for k in keys} for r in settings[0]["cachestat_cli"][:3]]
    return [
        "## `bpfscope cachestat --cgroup` as a person runs it",
        "",
        "`bpfscope cachestat --json --cgroup CGROUP 1` ran beside the collector, on the server's cgroup v2 "
        f"directory, one line a second. Its first lines at {settings[0]['limit_mb']} MB:",
        "",
        "```",
        *(json.dumps(r) for r in first),
        "```",
        "",
        "Its seconds inside each window, added up:",
        "",
        *_cli_table(settings),
        "",
    ]


def write_report(out: Path, results: dict[str, Any]) -> Path:
    settings = sorted(results["settings"], key=lambda s: s["limit_mb"])
    knee, knee_sentence = plateau(settings)
    picture(results, knee, out / "tps_hit_ratio_vs_ram.png")
    small, large = settings[0], settings[-1]
    mode = results["mode"]
    lines = [
        "# Cache analysis: a database slowed by a page cache too small for its data",
        "",
        "Made by `experiments/cache-analysis/run.py`; every number below was measured in that run.",
        "",
        f"PostgreSQL 15 with shared_buffers {results['shared_buffers']}, pgbench select-only (`-S`, "
        f"{results['clients']} clients) on pgbench's tables at scale {mode['scale']}: "
        f"{results['data_mb']:.0f} MB of table and index. The server runs in a memory cgroup; each row is "
        f"one RAM limit, with the cache emptied, refilled and warmed ({mode['warmup']} s) before a "
        f"{mode['seconds']} s window measured in the middle of a pgbench run.",
        "",
        "## What the service and a dashboard see",
        "",
        *_service_table(settings),
        "",
        knee_sentence,
        "",
        f"From {small['limit_mb']} MB to {large['limit_mb']} MB of RAM, TPS went from {small['tps']:.0f} to "
        f"{large['tps']:.0f} ({large['tps'] / max(small['tps'], 1e-9):.1f}x), the hit ratio from "
        f"{_pct(hit_ratio(small))} to {_pct(hit_ratio(large))}, and disk reads per 1000 transactions from "
        f"{disk_reads_per_1k_tx(small):.0f} to {disk_reads_per_1k_tx(large):.0f}. The machine's RAM used "
        f"stayed at {small['ram_used_pct']:.0f}-{large['ram_used_pct']:.0f}% with "
        f"{small['ram_available_gb']:.0f} GiB available: a dashboard shows plenty of free memory while the "
        "server's own cgroup is full of cache and misses.",
        "",
        "## What `bpfscope check` says over the same windows",
        "",
        "System-wide, as a person on the machine would run it (`bpfscope check --duration "
        f"{mode['seconds']}`), with the page cache beside CPU and RAM.",
        "",
        *_check_table(settings),
        "",
        "## bpfscope against the independent truth",
        "",
        "bpfscope counts page-cache lookups and misses (cachestat) and read calls (vfsstat) in the kernel, "
        "for the server's cgroup alone, over the same window as the independent counters, which need no "
        "BPF: each server process's I/O accounting in /proc/PID/io (rchar: bytes its read calls returned; "
        "syscr: its read calls) and the bytes the cgroup read from disk (blkio). The independent hit ratio "
        "is 100 * (1 - disk bytes / rchar): it counts read calls only, where bpfscope also counts the pages "
        "the server's page faults look up (its binary and libraries, evicted under a small limit and mapped "
        "again). `cgroup cache` is the page cache charged to the server (memory.stat).",
        "",
        *_agreement_table(settings),
        "",
        *_cli_section(settings),
        "## Picture",
        "",
        "![TPS and hit ratio against RAM](tps_hit_ratio_vs_ram.png)",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


if __name__ == "__main__":
    # Render again from a run's results.json (run.py --json), into the same directory.
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS_JSON")
    results_path = Path(sys.argv[1])
    print(write_report(results_path.parent, json.loads(results_path.read_text())))
