"""The agent's image, built here by deploy/build-image.sh from a debootstrap base imported into podman (no
registry pull), and run as the DaemonSet runs it (privileged, the host's pids, its token mounted): the
agent starts inside, records the host's health, processes and profiles, and ends with its summary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/bpfscope-agent:test"
CACHE = Path(os.environ.get("BPFSCOPE_IMAGE_CACHE", "/var/cache/bpfscope-image"))


def test_the_image_builds_here_and_runs_the_agent(tmp_path: Path) -> None:
    built = subprocess.run(
        [str(ROOT / "deploy" / "build-image.sh"), IMAGE], capture_output=True, text=True, timeout=1500
    )
    assert built.returncode == 0, built.stderr[-2000:]
    token = tmp_path / "token"
    token.mkdir()
    (token / "token").write_text("image-test-token-0123456789\n")
    run = subprocess.run(
        [
            "podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm", "--network", "host",
            "--privileged", "--pid", "host",
            "-v", "/sys/kernel:/sys/kernel", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "-v", f"{token}:/etc/bpfscope/token:ro",
            IMAGE, "--store", "/tmp/store", "--listen", "127.0.0.1:0", "--duration", "8", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    kinds = {json.loads(line)["record"] for line in run.stdout.splitlines()}
    assert {"check.row", "check.summary", "profile.window", "secure.process_exec", "losses"} <= kinds
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("Watching: health, profile, security, requests")
    assert lines[-1].startswith("agent: ") and "0 failures" in lines[-1]
