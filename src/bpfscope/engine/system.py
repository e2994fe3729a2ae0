"""The machine bpfscope runs on: privileges, kernel BTF, tracefs, tracepoints.

Each check either passes silently or raises a :class:`BpfscopeError` whose one line says what is wrong
and how to fix it.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from bpfscope.errors import MissingCapability

TRACEFS = Path("/sys/kernel/tracing")
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_cap(cap: int) -> bool:
    return bool(effective_caps() >> cap & 1)


def require_privileges() -> None:
    """BPF tracing needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which implies both)."""
    if has_cap(CAP_SYS_ADMIN) or (has_cap(CAP_BPF) and has_cap(CAP_PERFMON)):
        return
    missing = [name for cap, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not has_cap(cap)]
    who = "not root" if os.geteuid() != 0 else "root without " + " and ".join(missing)
    raise MissingCapability(
        f"bpfscope needs {' and '.join(missing)} to load BPF programs ({who})",
        hint="run it as root, e.g. with sudo",
    )


def require_btf() -> None:
    if not KERNEL_BTF.exists():
        raise MissingCapability(
            f"this kernel has no BTF ({KERNEL_BTF} is missing)",
            hint="bpfscope needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )


def _is_mounted(path: Path, fstype: str) -> bool:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(path) and parts[2] == fstype:
            return True
    return False


def _mount(fstype: str, path: Path, what: str) -> None:
    if _is_mounted(path, fstype):
        return
    import subprocess

    result = subprocess.run(["mount", "-t", fstype, fstype, str(path)], capture_output=True, text=True)
    if result.returncode != 0 and not _is_mounted(path, fstype):
        reason = next(
            (line.strip() for line in result.stderr.splitlines() if line.strip()), result.returncode
        )
        raise MissingCapability(
            f"{what} is not mounted at {path} and mounting it failed: {reason}",
            hint=f"mount it as root: `mount -t {fstype} {fstype} {path}`",
        )


def ensure_tracefs() -> Path:
    """libbpf attaches classic tracepoints through tracefs: mount it where a fresh machine lacks it."""
    if not (TRACEFS / "events").is_dir():
        _mount("tracefs", TRACEFS, "tracefs")
    return TRACEFS


@cache
def tracepoints() -> frozenset[str]:
    """Every tracepoint this kernel has, as ``category:name``."""
    events = ensure_tracefs() / "events"
    return frozenset(
        f"{cat.name}:{ev.name}"
        for cat in events.iterdir()
        if cat.is_dir()
        for ev in cat.iterdir()
        if ev.is_dir()
    )


def _plain_name(name: str) -> bool:
    """A name that can only be one tracefs directory (no glob, no path), for the fast existence check."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/*?[")


def require_tracepoint(category: str, name: str) -> None:
    if (
        _plain_name(category)
        and _plain_name(name)
        and (ensure_tracefs() / "events" / category / name).is_dir()
    ):
        return
    full = f"{category}:{name}"
    available = tracepoints()
    import difflib

    close = difflib.get_close_matches(full, available, n=3, cutoff=0.6)
    if not close:
        close = sorted(
            tp for tp in available if tp.split(":")[1] == name or tp.startswith(f"{category}:{name}")
        )[:3]
    raise MissingCapability(
        f"this kernel has no tracepoint {full}",
        hint=("did you mean " + ", ".join(close) + "?")
        if close
        else "list them with `bpfscope trace --list`",
    )


def require_raw_tracepoint(name: str) -> None:
    """Raw and BTF tracepoints are named without their category."""
    if _plain_name(name) and any((ensure_tracefs() / "events").glob(f"*/{name}")):
        return
    if any(tp.split(":", 1)[1] == name for tp in tracepoints()):
        return
    if _plain_name(name) and _bare_tracepoint(name):
        return
    names = {tp.split(":", 1)[1] for tp in tracepoints()}
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    raise MissingCapability(
        f"this kernel has no tracepoint named {name}",
        hint=("did you mean " + ", ".join(close) + "?") if close else None,
    )


@cache
def _bare_tracepoint(name: str) -> bool:
    """A tracepoint with no tracefs event (sched_entry_tp, the *_tp ones kept for BPF and tracers): the
    kernel's BTF names its probe type btf_trace_NAME."""
    from bpfscope.engine.btf import TYPEDEF, kernel_btf
    from bpfscope.errors import BpfscopeError

    try:
        kernel_btf().find(f"btf_trace_{name}", (TYPEDEF,))
    except BpfscopeError:
        return False
    return True
