"""Control groups: the cgroup v2 mounts, a directory's id (what bpf_get_current_cgroup_id() returns), and
a container's cgroup found from its id.

Container runtimes name their cgroups after the container id: docker (``docker-ID.scope``,
``/docker/ID``), containerd under Kubernetes (``cri-containerd-ID.scope``), CRI-O (``crio-ID.scope``),
podman (``libpod-ID``); a prefix of the id, as ``docker ps`` shows it, is enough.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bpfscope.errors import BpfscopeError

# A container id in a cgroup directory's name: 64 hex digits after the runtime's prefix.
_CONTAINER_DIR = re.compile(
    r"^(?:docker-|cri-containerd-|crio-|libpod-|containerd-)?([0-9a-f]{64})(?:\.scope)?$"
)
# Directories deeper than this are not searched for a container (kubepods nest about 5 levels).
_MAX_DEPTH = 8


def cgroup2_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            mounts.append(Path(parts[1]))
    return mounts


def cgroup_dir(path: str) -> Path:
    """The cgroup v2 directory a user named: absolute, or relative to a cgroup2 mount."""
    mounts = cgroup2_mounts()
    candidates = [Path(path)] + [m / path.lstrip("/") for m in mounts]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.resolve().is_relative_to(m) for m in mounts):
            return candidate.resolve()
    raise BpfscopeError(
        f"no cgroup v2 directory {path!r}",
        hint="give a path under " + (", ".join(map(str, mounts)) or "a cgroup2 mount"),
    )


def cgroup_id(path: str) -> int:
    """The id bpf_get_current_cgroup_id() returns for a cgroup v2 directory: its inode number."""
    return cgroup_dir(path).stat().st_ino


def container_id(cgroup_path: str) -> str | None:
    """The container id in a cgroup path, if any of its directories is named after one."""
    for part in reversed(cgroup_path.split("/")):
        match = _CONTAINER_DIR.match(part)
        if match:
            return match.group(1)
    return None


def container_cgroup(wanted: str) -> str:
    """The cgroup v2 directory of the container whose id starts with ``wanted``."""
    if not re.fullmatch(r"[0-9a-f]{3,64}", wanted):
        raise BpfscopeError(f"{wanted!r} is not a container id", hint="give its id or a prefix of it (hex)")
    found: set[Path] = set()
    for mount in cgroup2_mounts():
        base_depth = len(mount.parts)
        for root, dirs, _ in os.walk(mount):
            depth = len(Path(root).parts) - base_depth
            if depth >= _MAX_DEPTH:
                dirs.clear()
            for name in dirs:
                match = _CONTAINER_DIR.match(name)
                if match and match.group(1).startswith(wanted):
                    found.add(Path(root) / name)
    ids = {container_id(str(p)) for p in found}
    if not found:
        raise BpfscopeError(f"no running container with id {wanted}", hint="see `docker ps` or `podman ps`")
    if len(ids) > 1:
        raise BpfscopeError(f"container id {wanted} is ambiguous", hint="give more of it")
    # The outermost directory: a runtime may nest the container's processes one level below it.
    return str(min(found, key=lambda p: len(p.parts)))


@cache
def _id_to_path_index(mount: Path) -> dict[int, str]:
    index = {}
    for root, _dirs, _ in os.walk(mount):
        try:
            index[os.stat(root).st_ino] = "/" + os.path.relpath(root, mount).lstrip(".")
        except OSError:
            continue
    return index


def cgroup_path(cgroup: int) -> str | None:
    """The path (below its mount) of the cgroup v2 with this id, or None; the walk is cached, and done
    again once when an id is not found (a cgroup created since)."""
    for mount in cgroup2_mounts():
        path = _id_to_path_index(mount).get(cgroup)
        if path is None:
            _id_to_path_index.cache_clear()
            path = _id_to_path_index(mount).get(cgroup)
        if path is not None:
            return path.rstrip("/") or "/"
    return None


# --- which container (or unit) a cgroup is ------------------------------------------------------------

# A runtime's cgroup directory, by its name (systemd driver: NAME-ID.scope; cgroupfs driver: /RUNTIME/ID).
_RUNTIME_DIRS = (
    (re.compile(r"^docker-([0-9a-f]{64})\.scope$"), "docker"),
    (re.compile(r"^cri-containerd-([0-9a-f]{64})\.scope$"), "containerd"),
    (re.compile(r"^crio-([0-9a-f]{64})\.scope$"), "cri-o"),
    (re.compile(r"^libpod-([0-9a-f]{64})(?:\.scope)?$"), "podman"),
)
# The parent directory that names the runtime under the cgroupfs driver.
_RUNTIME_PARENTS = {"docker": "docker", "libpod_parent": "podman", "machine.slice": "podman"}
# kubepods-burstable-pod<uid with _>.slice (systemd) or pod<uid> (cgroupfs).
_POD_DIR = re.compile(
    r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$"
)
_UNIT = re.compile(r"^[^/]+\.(service|scope)$")


@dataclass(frozen=True)
class Workload:
    """What a cgroup path says about who runs there: a container (its runtime and id, and the Kubernetes
    pod it belongs to) or a systemd unit."""

    runtime: str | None = None  # docker, containerd, cri-o, podman, cri (a kubepods container), systemd
    container_id: str | None = None
    pod_uid: str | None = None
    unit: str | None = None  # the systemd unit, for processes outside containers


def workload(cgroup_path: str | None) -> Workload:
    """The container, pod and systemd unit a cgroup path names (all None for the root)."""
    if not cgroup_path:
        return Workload()
    parts = [p for p in cgroup_path.split("/") if p]
    pod = next((m.group(1).replace("_", "-") for p in parts if (m := _POD_DIR.match(p))), None)
    for i in range(len(parts) - 1, -1, -1):
        name = parts[i]
        for pattern, runtime in _RUNTIME_DIRS:
            match = pattern.match(name)
            if match:
                return Workload(runtime, match.group(1), pod)
        if re.fullmatch(r"[0-9a-f]{64}", name):
            parent = parts[i - 1] if i else ""
            runtime = _RUNTIME_PARENTS.get(parent, "cri" if pod else "docker" if parent == "docker" else None)
            return Workload(runtime or "cri", name, pod)
    unit = next((p for p in reversed(parts) if _UNIT.match(p)), None)
    if unit is not None:
        return Workload("systemd", None, pod, unit)
    return Workload(None, None, pod)
