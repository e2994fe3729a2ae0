"""The network analysis experiment end to end (short phases): a service mesh in network namespaces, then
packet loss on one link. bpfscope must name that hop and the services on it, with the other hops near
zero and CPU and RAM not the problem; and the experiment must leave nothing behind, Ctrl-C included."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "network-analysis" / "run.py"
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"


def mesh_namespaces() -> list[str]:
    names = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout.split()
    return [n for n in names if n.startswith("bsb-")]


def test_experiment_names_the_lossy_hop(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXPERIMENT), "--seconds", "10", "--loss", "5", "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not mesh_namespaces()
    results = json.loads((tmp_path / "results.json").read_text())
    analysis = results["analysis"]
    healthy, lossy = analysis["phases"]

    # The hop, and who is on it: haproxy (the sidecar) receives the app's responses from nginx.
    assert analysis["worst_hop"] == "sidecar->app", analysis["conclusion"]
    assert analysis["worst_hop_services"] == {"sidecar": ["haproxy"], "app": ["nginx"]}
    assert "bsb-sidecar" in analysis["conclusion"] and "bsb-app" in analysis["conclusion"]

    # 5% of the packets dropped: about 5% of the segments retransmitted (5.1% to 5.2% measured). Clean
    # veths retransmit a little under a busy machine's scheduling (up to 0.15% measured): below 1%.
    assert analysis["retransmitting"] == "nginx in app"
    assert lossy["hops"]["sidecar->app"]["retrans_pct"] > 2
    for name, hop in lossy["hops"].items():
        if name != "sidecar->app":
            assert hop["retrans_pct"] < 1, (name, hop)
    assert all(hop["retrans_pct"] < 1 for hop in healthy["hops"].values()), healthy["hops"]
    # Over the whole run, tcpretrans's count is the kernel's, namespace by namespace. The kernel's
    # counters are read before the tools attach and after they stop: a count above the kernel's is the
    # tool's error; below it, only what a retransmission timer sent in the quiet seconds between (none
    # in most runs). A row whose count went down (a connection's count lost to another's) is a defect.
    for service, row in analysis["whole_run"].items():
        assert row["tcpretrans_rows_down"] == 0, (service, row)
        missed = row["snmp_retrans"] - row["tcpretrans"]
        assert 0 <= missed <= max(2, 0.0001 * row["snmp_retrans"]), (service, row)
    # The namespaces' own counters say the same, whatever the tools: the app's namespace (the sender on
    # the lossy link) retransmits far more than any other.
    app = lossy["netns"]["app"]["snmp_retrans_pct"]
    assert app > 2 and all(v["snmp_retrans_pct"] < 1 for k, v in lossy["netns"].items() if k != "app")

    # Socket buffers: the app's send buffers (a fixed 512 KiB, smaller than a response) fill up on the
    # lossy hop: measured over 10 s phases, the fullest was over 90% in 9% to 62% of sockstat's looks,
    # against 0% to 5% before the loss in most runs. On a busy machine the healthy phase fills them too
    # (its consumer waits for a CPU): it had them over 90% in 50% of its looks once, as many as the lossy
    # phase, and in 4 of 7 once, against 45% lossy; and its mean fill was the higher once (71.8% against
    # 62.1%). So the lossy phase is not compared with the healthy one here: the lossy hop's buffers
    # reach 90%, and no other hop's stay full more often.
    hop = lossy["hops"]["sidecar->app"]
    assert hop["max_send_pct"] >= 90, hop
    assert hop["full_share_pct"] == max(h["full_share_pct"] for h in lossy["hops"].values())

    # The users see it as latency; CPU and RAM are fine. The mesh itself uses a fraction of the machine's
    # two CPUs (about 30% of one measured). The check's CPU row is the whole machine's, which other work
    # shares: a PROBLEM there with the mesh using little is that other work, not the mesh.
    assert lossy["client"]["p99_ms"] > healthy["client"]["p99_ms"]
    assert lossy["check"]["RAM used"]["verdict"] == "ok"
    assert lossy["mesh_cpu_pct"] < 100
    assert lossy["check"]["CPU busy"]["verdict"] != "PROBLEM" or lossy["mesh_cpu_pct"] < 50
    for picture in ("retransmits.png", "saturation.png", "latency.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
    assert "The slow hop is sidecar->app" in (tmp_path / "report.md").read_text()


def test_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXPERIMENT), "--seconds", "30", "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        line, pids = "", []
        while not line.startswith("phase 1"):
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            assert ready, "the experiment did not start"
            line = proc.stderr.readline()
            assert line, "the experiment ended early"
            if line.startswith("mesh up:"):  # "mesh up: app pid 123, sidecar pid 124, ..."
                pids = [int(part.split()[-1]) for part in line.split(":", 1)[1].split(",")]
        assert len(mesh_namespaces()) == 5 and len(pids) == 4
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted: the mesh is removed" in err and "Traceback" not in err
    assert not mesh_namespaces()
    # The servers are gone (nginx, haproxy, the postmaster), not just their namespaces.
    assert not [pid for pid in pids if running(pid)]
    assert not list(tmp_path.iterdir())  # no report from a run cut short


def running(pid: int) -> bool:
    """Alive, not a zombie waiting for its parent (the postmaster's is init) to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
