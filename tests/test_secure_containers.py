"""Containers: events of a real podman container (an image built here from a debootstrap root file system,
never pulled) carry its id and runtime, its own namespaces, and the container escape through a mounted host
path is caught; a systemd-style kubepods cgroup (made here, with a process moved into it) gives the
containerd id and the pod UID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_secure import trace

from bpfscope.sources.cgroups import cgroup2_mounts, workload

IMAGE = "localhost/bpfscope-test-debian:bookworm"
CACHE = Path("/var/cache/bpfscope-tests")
ROOTFS_TAR = CACHE / "debian-bookworm-minbase.tar"
# This kernel refuses crun and podman's default ulimits: runc, cgroupfs, and no ulimits (a private
# configuration, so the machine's stays as it is).
CONTAINERS_CONF = CACHE / "containers.conf"


def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(
        ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def build_image() -> str:
    """The test image: imported from a cached debootstrap root file system, made once per machine."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.fail(f"{tool} is not installed (./setup.sh test installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text("[containers]\ndefault_ulimits = []\n")
    if podman("image", "exists", IMAGE).returncode == 0:
        return IMAGE
    if not ROOTFS_TAR.exists():
        rootfs = CACHE / f"rootfs-{uuid.uuid4().hex[:8]}"
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        result = subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0:
            shutil.rmtree(rootfs, ignore_errors=True)
            pytest.fail(f"debootstrap failed: {result.stderr[-500:]}")
        partial = ROOTFS_TAR.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            tar.add(rootfs, arcname=".")
        partial.rename(ROOTFS_TAR)
        shutil.rmtree(rootfs, ignore_errors=True)
    result = podman("import", str(ROOTFS_TAR), IMAGE)
    assert result.returncode == 0, result.stderr
    return IMAGE


@pytest.fixture(scope="module")
def container_run() -> Iterator[tuple[Any, dict[str, Any]]]:
    image = build_image()
    facts: dict[str, Any] = {}
    script = "cat /etc/shadow > /dev/null; chroot /host /usr/bin/true; exit 0"

    def workload_() -> None:
        cidfile = CACHE / f"cid-{uuid.uuid4().hex[:8]}"
        result = podman(
            "run", "--rm", "--cidfile", str(cidfile), "-v", "/:/host:ro", image, "/bin/sh", "-c", script
        )
        facts["result"] = result
        facts["id"] = cidfile.read_text().strip() if cidfile.exists() else None
        cidfile.unlink(missing_ok=True)

    run = trace([], workload_)
    yield run, facts


def container_events(run: Any, container_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(k, b) for k, b in run.events if (b["process"].get("container") or {}).get("id") == container_id]


def test_podman_container_events_name_the_container(container_run: tuple[Any, dict[str, Any]]) -> None:
    run, facts = container_run
    assert facts["result"].returncode == 0, facts["result"].stderr
    container_id = facts["id"]
    events = container_events(run, container_id)
    # The container's own programs (runc's set-up process starts in the cgroup with the host's namespaces).
    execs = [b for k, b in events if k == "process_exec" and b["process"]["binary"] != "/runc"]
    assert {b["process"]["binary"] for b in execs} >= {"/usr/bin/dash", "/usr/bin/cat"}
    for body in execs:
        process = body["process"]
        assert process["container"]["runtime"] == "podman"
        assert process["docker"] == container_id[:31]
        assert f"libpod-{container_id}" in process["cgroup"]
        # The container's own mount and pid namespaces, not the host's.
        assert process["ns"]["mnt"]["is_host"] is False and process["ns"]["pid"]["is_host"] is False


def test_container_escape_through_a_host_mount_is_caught(container_run: tuple[Any, dict[str, Any]]) -> None:
    run, facts = container_run
    hits = [b for k, b in container_events(run, facts["id"]) if k == "process_tracepoint"]
    # The runtime's set-up (runc's mounts) is not reported.
    assert {b["event"] for b in hits} == {"sys_enter_chroot", "sys_exit_openat"}, [b["event"] for b in hits]
    by_event = {b["event"]: b for b in hits}
    escape = by_event["sys_enter_chroot"]
    assert escape["policy_name"] == "network-and-escape"
    assert escape["args"][0]["string_arg"] == "/host"
    # Its lineage leads out of the container: the shell, then podman's monitor (conmon) on the host.
    lineage = [escape["process"], escape.get("parent") or {}, *escape.get("ancestors", [])]
    binaries = [p.get("binary") for p in lineage]
    assert binaries[0] == "/usr/sbin/chroot" and binaries[1] == "/usr/bin/dash"
    assert "/usr/bin/conmon" in binaries
    # Reading the container's own /etc/shadow is reported too, as the container's.
    assert by_event["sys_exit_openat"]["args"][0]["file_arg"]["path"] == "/etc/shadow"


KUBEPODS_POD = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def kubepods_cgroup() -> Iterator[tuple[Path, str]]:
    """A systemd-driver kubepods layout with a containerd scope at its end, removed afterwards."""
    (mount,) = cgroup2_mounts()[:1]
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    pod = KUBEPODS_POD.replace("-", "_")
    top = mount / "kubepods.slice"
    leaf = (
        top
        / "kubepods-burstable.slice"
        / f"kubepods-burstable-pod{pod}.slice"
        / f"cri-containerd-{container_id}.scope"
    )
    created = not top.exists()
    leaf.mkdir(parents=True)
    try:
        yield leaf, container_id
    finally:
        for directory in [leaf, *leaf.parents]:
            if directory == mount:
                break
            if directory == top and not created:
                break
            try:
                directory.rmdir()
            except OSError:
                break


def test_kubepods_cgroup_gives_container_id_and_pod_uid(kubepods_cgroup: tuple[Path, str]) -> None:
    leaf, container_id = kubepods_cgroup
    assert workload(str(leaf)).pod_uid == KUBEPODS_POD
    code = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
        "os.execv('/usr/bin/cat', ['cat', '/etc/shadow'])"
    )
    pids: list[int] = []

    def workload_() -> None:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(leaf / "cgroup.procs")], stdout=subprocess.DEVNULL
        )
        proc.wait(timeout=30)
        pids.append(proc.pid)

    run = trace([], workload_)
    (hit,) = run.of("process_tracepoint", pid=pids[0])
    assert hit["process"]["container"] == {
        "runtime": "containerd",
        "id": container_id,
        "pod_uid": KUBEPODS_POD,
        "unit": None,
    }
    assert hit["process"]["pod"]["uid"] == KUBEPODS_POD
