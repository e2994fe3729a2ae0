"""The agent's image, built here by deploy/build-image.sh from a debootstrap base imported into podman (no
registry pull), and run as the DaemonSet runs it (privileged, the host's pids, its token mounted): the
agent starts inside, records the host's health, processes and profiles, and ends with its summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/bpfscope-agent:test"
MARKER = "bpfscope-image-test"
CACHE = Path(os.environ.get("BPFSCOPE_IMAGE_CACHE", "/var/cache/bpfscope-image"))


def test_the_image_builds_here_and_runs_the_agent(tmp_path: Path) -> None:
    built = subprocess.run(
        [str(ROOT / "deploy" / "build-image.sh"), IMAGE], capture_output=True, text=True, timeout=1500
    )
    assert built.returncode == 0, built.stderr[-2000:]
    token = tmp_path / "token"
    token.mkdir()
    (token / "token").write_text("image-test-token-0123456789\n")
    # Processes started on the host all along the run, for the security collector to see from inside
    # the container (the host's pids): a quiet machine may start none of its own in the agent's window.
    starter = subprocess.Popen(
        ["/bin/sh", "-c", f"i=0; while :; do /bin/true {MARKER}-$i; i=$((i + 1)); sleep 0.2; done"],
        start_new_session=True,
    )
    try:
        run = subprocess.run(
            [
                "podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm",
                "--network", "host", "--privileged", "--pid", "host",
                "-v", "/sys/kernel:/sys/kernel", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
                "-v", f"{token}:/etc/bpfscope/token:ro",
                IMAGE, "--store", "/tmp/store", "--listen", "127.0.0.1:0", "--duration", "8", "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf")},
        )  # fmt: skip
    finally:
        os.killpg(starter.pid, signal.SIGKILL)
        starter.wait()
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    kinds = {r["record"] for r in records}
    assert {"check.row", "check.summary", "profile.window", "secure.process_exec", "losses"} <= kinds
    started = [
        r["process_exec"]["process"]["arguments"] for r in records if r["record"] == "secure.process_exec"
    ]
    assert any(a.startswith(f"{MARKER}-") for a in started), started[-20:]
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("Watching: health, profile, security, requests")
    assert lines[-1].startswith("agent: ") and "0 failures" in lines[-1]
