"""The experiment's analysis and report: per-hop numbers from what bpfscope and the kernel counted, then
Markdown with pictures."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mesh
import numpy as np

# Retransmits at least this share of a hop's segments are a loss worth naming: clean veths here stay
# under 0.2%, and 1% already costs a bulk TCP flow much of its throughput.
RETRANS_NOTABLE_PCT = 1.0
# A send buffer this full is saturated: the writer is blocked (or told EAGAIN) until the peer acknowledges.
FULL_PCT = 90.0
# tcpretrans -c's record of one connection over an interval (beside tcpretrans.total, all connections).
CONNECTION = "tcpretrans.connection"


def link_of(addr: str) -> mesh.Link | None:
    for link in mesh.LINKS:
        if addr in (link.left_ip, link.right_ip):
            return link
    return None


def side_of(link: mesh.Link, addr: str) -> str:
    return link.left if addr == link.left_ip else link.right


def in_phase(record: dict[str, Any], phase: dict[str, Any], length: float = mesh.TOOL_INTERVAL) -> bool:
    """An interval record at time t covers the ``length`` seconds before it: it belongs to the phase that
    holds its middle, so a record at a phase's edge counts in one phase, never in both."""
    middle = record["t"] - length / 2
    return phase["start"] <= middle < phase["end"]


def _service_of_netns(name: str) -> str:
    return {v: k for k, v in mesh.NETNS.items()}.get(name, name)


def hop_rows(results: dict[str, Any], phase: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per link over one phase: traffic, retransmits, socket buffers, and who is at each end."""
    hops: dict[str, dict[str, Any]] = {
        link.name: {
            "link": link.name,
            "device_mb_s": phase["link_bytes"].get(link.name, 0) / phase_seconds(phase) / 1e6,
            "retrans": 0,
            "segs_out": 0,
            "retrans_by": defaultdict(int),
            "tx_bytes": 0,
            "max_send_pct": 0.0,
            "max_recv_pct": 0.0,
            "send_pct_samples": [],
            "full_events": 0,
            "services": defaultdict(set),
        }
        for link in mesh.LINKS
    }
    for r in results.get("tcpretrans", []):
        link = link_of(r.get("saddr", ""))
        if r["record"] != CONNECTION or link is None or not in_phase(r, phase):
            continue
        hop = hops[link.name]
        hop["retrans"] += r["retrans"]
        hop["segs_out"] += r["segs_out"]
        if r["retrans"]:
            hop["retrans_by"][f"{r['comm'] or '?'} in {side_of(link, r['saddr'])}"] += r["retrans"]
    for r in results.get("tcptop", []):
        link = link_of(r.get("saddr", ""))
        if link is not None and in_phase(r, phase):
            hops[link.name]["tx_bytes"] += r["tx_bytes"]
    per_interval: dict[tuple[str, float], float] = defaultdict(float)
    for r in results.get("sockstat", []):
        link = link_of(r.get("saddr", ""))
        if link is None or not in_phase(r, phase, mesh.SOCKSTAT_INTERVAL):
            continue
        hop = hops[link.name]
        side = _service_of_netns(r["netns_name"])
        hop["services"][side].add(r["comm"])
        hop["full_events"] += r.get("full_events", 0)
        if r["state"] == "LISTEN":
            continue
        hop["max_send_pct"] = max(hop["max_send_pct"], r["send_pct"])
        hop["max_recv_pct"] = max(hop["max_recv_pct"], r["recv_pct"])
        key = (link.name, r["t"])
        per_interval[key] = max(per_interval[key], r["send_pct"])
    for (name, _), pct in per_interval.items():
        hops[name]["send_pct_samples"].append(pct)
    for hop in hops.values():
        hop["retrans_pct"] = 100.0 * hop["retrans"] / hop["segs_out"] if hop["segs_out"] else 0.0
        hop["tcptop_mb_s"] = hop.pop("tx_bytes") / phase_seconds(phase) / 1e6
        samples = hop.pop("send_pct_samples")
        hop["mean_max_send_pct"] = float(np.mean(samples)) if samples else 0.0
        hop["retrans_by"] = dict(hop["retrans_by"])
        hop["full_share_pct"] = 100.0 * sum(p >= FULL_PCT for p in samples) / len(samples) if samples else 0.0
        hop["services"] = {side: sorted(c for c in cs if c != "-") for side, cs in hop["services"].items()}
    return hops


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def phase_seconds(phase: dict[str, Any]) -> float:
    return max(phase["end"] - phase["start"], 1e-9)


def netns_truth(results: dict[str, Any], phase: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per namespace: the kernel's RetransSegs and OutSegs (/proc/net/snmp) against tcpretrans's sum over
    the connections of that namespace."""
    names = {v: k for k, v in results["config"]["netns"].items()}
    inode_to_service: dict[int, str] = {}
    for r in results.get("sockstat", []):
        if r["netns_name"] in names:
            inode_to_service[r["netns"]] = names[r["netns_name"]]
    counted: dict[str, int] = defaultdict(int)
    went_down: dict[str, int] = defaultdict(int)
    for r in results.get("tcpretrans", []):
        if r["record"] == CONNECTION and in_phase(r, phase):
            service = inode_to_service.get(r["netns"])
            if service:
                counted[service] += r["retrans"]
                # A count cannot go down: such a row is the tool's error (a reused socket address).
                went_down[service] += r["retrans"] < 0
    out = {}
    for service, deltas in phase["snmp"].items():
        out[service] = {
            "snmp_retrans": deltas.get("Tcp.RetransSegs", 0),
            "snmp_out": deltas.get("Tcp.OutSegs", 0),
            "snmp_retrans_pct": _pct(deltas.get("Tcp.RetransSegs", 0), deltas.get("Tcp.OutSegs", 0)),
            "tcpretrans": counted.get(service, 0),
            "tcpretrans_rows_down": went_down.get(service, 0),
        }
    return out


def whole_run_truth(results: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """Over the whole run, per namespace: the kernel's RetransSegs against every tcpretrans interval."""
    whole = {"start": -1e9, "end": 1e9, "snmp": results.get("run_snmp", {})}
    return {
        s: {k: row[k] for k in ("snmp_retrans", "tcpretrans", "tcpretrans_rows_down")}
        for s, row in netns_truth(results, whole).items()
    }


def client_latency(results: dict[str, Any], phase: dict[str, Any]) -> dict[str, float]:
    done = [r for r in results.get("client", []) if phase["start"] <= r["t"] < phase["end"]]
    lat = np.array([r["latency_s"] for r in done if r["latency_s"] is not None and r["status"] == 200])
    failed = sum(1 for r in done if r["status"] != 200)
    if not len(lat):
        return {"requests": len(done), "failed": failed}
    ok_bytes = sum(r["bytes"] for r in done if r["status"] == 200)
    return {
        "requests": len(done),
        "failed": failed,
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "max_ms": float(lat.max() * 1000),
        "goodput_mb_s": ok_bytes / phase_seconds(phase) / 1e6,
    }


def _verdicts(phase: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in phase["check"] if r["record"] == "check.row"}


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": []}
    for phase in results["phases"]:
        out["phases"].append(
            {
                "name": phase["name"],
                "hops": hop_rows(results, phase),
                "netns": netns_truth(results, phase),
                "client": client_latency(results, phase),
                "check": _verdicts(phase),
                "fault_dropped": phase["fault_dropped"],
                "mesh_cpu_pct": phase["mesh_cpu_pct"],
            }
        )
    out["whole_run"] = whole_run_truth(results)
    last = out["phases"][-1]
    hops = last["hops"]
    lossy = max(h["retrans_pct"] for h in hops.values()) >= RETRANS_NOTABLE_PCT
    if lossy:
        worst = max(hops.values(), key=lambda h: h["retrans_pct"])
        how = f"retransmits {worst['retrans_pct']:.2f}% of segments (tcpretrans)"
    else:
        # No hop loses packets to speak of (a rate limit queues more than it drops): the hop whose
        # senders' buffers stay full is the one that cannot carry the load.
        worst = max(hops.values(), key=lambda h: (h["full_share_pct"], h["mean_max_send_pct"]))
        how = f"a send buffer >= {FULL_PCT:g}% full at {worst['full_share_pct']:.0f}% of sockstat's looks"
    link = mesh.LINK_BY_NAME[worst["link"]]
    ends = [
        f"{', '.join(worst['services'].get(side, []) or ['?'])} ({mesh.NETNS[side]})"
        for side in (link.left, link.right)
    ]
    cpu = last["check"].get("CPU busy", {})
    ram = last["check"].get("RAM used", {})
    out["worst_hop"] = worst["link"]
    out["worst_hop_services"] = {side: worst["services"].get(side, []) for side in (link.left, link.right)}
    senders = sorted(worst["retrans_by"].items(), key=lambda kv: kv[1], reverse=True) if lossy else []
    out["retransmitting"] = senders[0][0] if senders else None
    sender = f" (retransmitting: {senders[0][0]})" if senders else ""
    out["conclusion"] = (
        f"The slow hop is {worst['link']}: {ends[0]} <-> {ends[1]}; {how}{sender}, "
        f"send buffers up to {worst['max_send_pct']:.0f}% full; "
        f"CPU {cpu.get('text', '?')} ({cpu.get('verdict', '?')}; the mesh's own processes "
        f"{last['mesh_cpu_pct']:.0f}% of one CPU), RAM {ram.get('text', '?')} ({ram.get('verdict', '?')})"
    )
    return out


# --- pictures ---------------------------------------------------------------------------------------


def _phase_marks(ax: Any, results: dict[str, Any]) -> None:
    for phase in results["phases"][1:]:
        ax.axvline(phase["start"], color="red", linestyle="--")
        ax.text(phase["start"], ax.get_ylim()[1], f" {phase['name']}", color="red", va="top")


def _save(
    fig: Any, ax: Any, results: dict[str, Any], path: Path, xlabel: str, ylabel: str, title: str
) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _phase_marks(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_hop_picture(
    results: dict[str, Any], series: dict[str, dict[float, float]], times: list[float]
) -> tuple[Any, Any]:
    """One line per hop over the tool's intervals (an interval without a record of the hop is 0)."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, points in series.items():
        ax.plot(times, [points.get(t, 0) for t in times], marker=".", label=name)
    ax.legend(loc="upper left")
    return fig, ax


def retransmits_picture(results: dict[str, Any], path: Path) -> None:
    """Retransmitted segments per second on each hop (tcpretrans)."""
    series: dict[str, dict[float, float]] = {link.name: defaultdict(float) for link in mesh.LINKS}
    for r in results.get("tcpretrans", []):
        link = link_of(r.get("saddr", ""))
        if r["record"] == CONNECTION and link is not None:
            series[link.name][r["t"]] += r["retrans"]
    times = sorted({r["t"] for r in results.get("tcpretrans", [])})
    fig, ax = _per_hop_picture(results, series, times)
    title = "Retransmits per hop (bpfscope tcpretrans -c, 1 s intervals)"
    _save(fig, ax, results, path, "time (s)", "retransmitted segments / s", title)


def saturation_picture(results: dict[str, Any], path: Path) -> None:
    """The fullest send buffer on each hop, at each look (sockstat)."""
    series: dict[str, dict[float, float]] = {link.name: defaultdict(float) for link in mesh.LINKS}
    for r in results.get("sockstat", []):
        link = link_of(r.get("saddr", ""))
        if link is not None and r["state"] != "LISTEN":
            series[link.name][r["t"]] = max(series[link.name][r["t"]], r["send_pct"])
    times = sorted({r["t"] for r in results.get("sockstat", [])})
    fig, ax = _per_hop_picture(results, series, times)
    ax.set_ylim(0, 105)
    title = "Fullest send buffer per hop (bpfscope sockstat every 0.5 s: wmem_queued / sndbuf)"
    _save(fig, ax, results, path, "time (s)", "fullest send buffer (%)", title)


def latency_picture(results: dict[str, Any], path: Path) -> None:
    """What the users see: each request's latency through the whole mesh."""
    fig, ax = plt.subplots(figsize=(10, 4))
    ok = [r for r in results.get("client", []) if r["status"] == 200 and r["latency_s"] is not None]
    ax.scatter([r["t"] for r in ok], [r["latency_s"] * 1000 for r in ok], s=6, alpha=0.6)
    ax.set_yscale("log")
    title = f"Client: GET of {mesh.RESPONSE_BYTES >> 20} MiB through the mesh, each request"
    _save(fig, ax, results, path, "time (s)", "request latency (ms)", title)


# --- Markdown ---------------------------------------------------------------------------------------


def _hop_table(phase: dict[str, Any]) -> list[str]:
    lines = [
        "| hop | MB/s (veth) | MB/s sent (tcptop) | retrans / segs (tcpretrans) | retrans % | "
        f"fullest send buffer | time a send buffer was >= {FULL_PCT:g}% | buffer-full events | "
        "services (netns) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for hop in phase["hops"].values():
        link = mesh.LINK_BY_NAME[hop["link"]]
        who = "; ".join(
            f"{'/'.join(hop['services'].get(side, [])) or '?'} ({mesh.NETNS[side]})"
            for side in (link.left, link.right)
        )
        lines.append(
            f"| {hop['link']} | {hop['device_mb_s']:.1f} | {hop['tcptop_mb_s']:.1f} | "
            f"{hop['retrans']} / {hop['segs_out']} | {hop['retrans_pct']:.2f} | {hop['max_send_pct']:.0f}% | "
            f"{hop['full_share_pct']:.0f}% | {hop['full_events']} | {who} |"
        )
    return lines


def _netns_table(phase: dict[str, Any]) -> list[str]:
    lines = [
        "| namespace | RetransSegs (/proc/net/snmp) | OutSegs | retrans % | tcpretrans, same namespace |",
        "|---|---|---|---|---|",
    ]
    for service, row in phase["netns"].items():
        lines.append(
            f"| {mesh.NETNS[service]} | {row['snmp_retrans']} | {row['snmp_out']} | "
            f"{row['snmp_retrans_pct']:.2f} | {row['tcpretrans']} |"
        )
    return lines


def _check_table(phase: dict[str, Any]) -> list[str]:
    lines = ["| check | value | verdict | detail |", "|---|---|---|---|"]
    for name, row in phase["check"].items():
        detail = str(row.get("detail", "")).replace("|", "/")
        lines.append(f"| {name} | {row['text']} | {row['verdict']} | {detail} |")
    return lines


def _losses(results: dict[str, Any]) -> str:
    """What the tools could not see, from the losses record each ends its JSON with."""
    lost = [
        f"{tool} {n} ({reason})" for tool, reasons in results["lost"].items() for reason, n in reasons.items()
    ]
    return "The tools lost no event." if not lost else f"Events the tools lost: {', '.join(lost)}."


def write_report(out: Path, results: dict[str, Any]) -> Path:
    retransmits_picture(results, out / "retransmits.png")
    saturation_picture(results, out / "saturation.png")
    latency_picture(results, out / "latency.png")
    analysis = results["analysis"]
    cfg = results["config"]
    lines = [
        "# Network analysis: one hop of a service mesh loses packets",
        "",
        "Made by `experiments/network-analysis/run.py`; every number below was measured in that run.",
        "",
        f"Mesh: client -> gateway (nginx) -> sidecar (haproxy) -> app (nginx; pgbench as its database "
        f"client) -> db (PostgreSQL 15), each in its own network namespace. Load: {cfg['rate']:g} GETs of "
        f"{cfg['response_bytes'] >> 20} MiB a second from {cfg['workers']} client workers, and "
        f"{cfg['db_rate']} read-only transactions a second from the app to its database. Phase 2: "
        f"{cfg['fault']['name']} ("
        + ("nftables numgen" if cfg["fault"]["kind"] == "loss" else "tc tbf")
        + ").",
        "",
        f"**{analysis['conclusion']}**",
        "",
        "## What the users see",
        "",
        "| phase | requests | failed | p50 ms | p99 ms | max ms | goodput MB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in analysis["phases"]:
        c = phase["client"]
        lines.append(
            f"| {phase['name']} | {c['requests']} | {c['failed']} | {c.get('p50_ms', 0):.1f} | "
            f"{c.get('p99_ms', 0):.1f} | {c.get('max_ms', 0):.1f} | {c.get('goodput_mb_s', 0):.1f} |"
        )
    lines.append("")
    for phase in analysis["phases"]:
        lines += [f"## Per hop: {phase['name']}", "", *_hop_table(phase), ""]
        lines += [f"The mesh's own processes used {phase['mesh_cpu_pct']:.0f}% of one CPU.", ""]
        if phase["fault_dropped"]:
            lines += [f"The fault dropped {phase['fault_dropped']} packets (its own counter).", ""]
        lines += [
            "Retransmits per namespace, the kernel's own count beside tcpretrans's:",
            "",
            *_netns_table(phase),
            "",
            f"Health check ({phase['name']}):",
            "",
            *_check_table(phase),
            "",
        ]
    lines += [
        "## The independent truth over the whole run",
        "",
        "Each namespace's RetransSegs (/proc/net/snmp, read before the tools attached and after they",
        "stopped) against the sum of every tcpretrans interval over that namespace's connections:",
        "",
        "| namespace | RetransSegs (/proc/net/snmp) | tcpretrans | tcpretrans rows whose count went down |",
        "|---|---|---|---|",
    ]
    for service, row in analysis["whole_run"].items():
        lines.append(
            f"| {mesh.NETNS[service]} | {row['snmp_retrans']} | {row['tcpretrans']} | "
            f"{row['tcpretrans_rows_down']} |"
        )
    lines += ["", _losses(results), ""]
    lines += [
        "## Pictures",
        "",
        "![retransmits per hop](retransmits.png)",
        "",
        "![send-buffer saturation per hop](saturation.png)",
        "",
        "![request latency](latency.png)",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
