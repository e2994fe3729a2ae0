"""bpfscope doctor: what this kernel can do, found by loading, attaching and firing a program of each kind
(doctor.bpf.c), not by reading its config."""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from bpfscope.engine import libbpf, system
from bpfscope.engine.bpf import BpfObject, Program, tool_object
from bpfscope.errors import BpfscopeError
from bpfscope.sinks.output import Output

SIGNAL = signal.SIGUSR2


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    # What bpfscope uses it for; a missing capability that nothing needs is not a problem.
    needed: bool = True


def _libc_path() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    return ctypes.util.find_library("c") or "libc.so.6"


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@dataclass
class Probe:
    name: str
    program: str
    counter: int
    attach: Callable[[Program], object]
    trigger: Callable[[], None]
    needed: bool = True


def _getppid_loop() -> None:
    for _ in range(3):
        os.getppid()


PROBES = [
    Probe("tracepoint", "probe_tracepoint", 0, Program.attach, _getppid_loop),
    Probe("raw_tracepoint", "probe_raw_tp", 1, Program.attach, _getppid_loop),
    Probe("tp_btf", "probe_tp_btf", 2, Program.attach, _getppid_loop),
    Probe("perf_event", "probe_perf_event", 3, lambda p: p.attach_sampling(999), lambda: _busy(0.05)),
    Probe("uprobe", "probe_uprobe", 4, lambda p: p.attach_uprobe(_libc_path(), "getppid"), _getppid_loop),
    Probe("kprobe", "probe_kprobe", 5, Program.attach, _getppid_loop, needed=False),
    Probe("fentry", "probe_fentry", 6, Program.attach, _getppid_loop, needed=False),
    Probe("lsm", "probe_lsm", 7, Program.attach, lambda: Path("/proc/self/stat").read_bytes(), needed=False),
    Probe("ringbuf", "probe_ringbuf", 8, Program.attach, _getppid_loop),
    Probe("bpf_send_signal", "probe_send_signal", 9, Program.attach, _getppid_loop),
]


def _run_probe(probe: Probe) -> Check:
    received: list[int] = []
    previous = signal.signal(SIGNAL, lambda signum, frame: received.append(signum))
    try:
        with BpfObject(
            tool_object("doctor"),
            rodata={"doctor_tgid": os.getpid(), "signal_number": int(SIGNAL)},
            autoload={probe.program},
        ) as obj:
            try:
                obj.load()
            except BpfscopeError as exc:
                return Check(probe.name, False, f"does not load: {_short(exc)}", probe.needed)
            try:
                probe.attach(obj.programs[probe.program])
            except BpfscopeError as exc:
                return Check(probe.name, False, f"loads, does not attach: {_short(exc)}", probe.needed)
            probe.trigger()
            hits = obj.bss["hits"][probe.counter]
            detail = f"loaded, attached, fired {hits} times"
            if probe.name == "ringbuf":
                records = obj.ring_buffer("records").poll(0.5)
                ok = len(records) > 0 and int(records["pid"][0]) == os.getpid()
                detail = f"{len(records)} records read back, {obj.dropped()} dropped"
                return Check(probe.name, ok, detail, probe.needed)
            if probe.name == "bpf_send_signal":
                deadline = time.monotonic() + 0.5
                while not received and time.monotonic() < deadline:
                    time.sleep(0.01)
                return Check(probe.name, bool(received), f"{len(received)} signals delivered", probe.needed)
            return Check(probe.name, hits > 0, detail if hits else "attached but never fired", probe.needed)
    finally:
        signal.signal(SIGNAL, previous)


def _short(exc: BpfscopeError) -> str:
    return str(exc).split(": ", 1)[-1]


def _system_checks() -> list[Check]:
    checks = []
    major, minor = libbpf.version()
    checks.append(
        Check("libbpf", (major, minor) >= libbpf.MIN_VERSION, f"{major}.{minor} ({libbpf.LIBBPF_SONAME})")
    )
    btf = system.KERNEL_BTF
    checks.append(
        Check("BTF", btf.exists(), f"{btf} ({btf.stat().st_size // 1024} KiB)" if btf.exists() else "missing")
    )
    try:
        tracefs = system.ensure_tracefs()
        checks.append(Check("tracefs", True, f"{tracefs}, {len(system.tracepoints())} tracepoints"))
    except BpfscopeError as exc:
        checks.append(Check("tracefs", False, str(exc)))
    pressure = [p for p in ("cpu", "io", "memory") if _readable(Path("/proc/pressure") / p)]
    checks.append(
        Check("PSI", bool(pressure), "/proc/pressure/" + ",".join(pressure) if pressure else "missing")
    )
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    v1 = sorted(
        {opt for line in mounts if line.split()[2] == "cgroup" for opt in line.split()[3].split(",")}
        & {"cpu", "cpuacct", "memory", "blkio", "io", "pids", "cpuset", "net_cls", "devices", "freezer"}
    )
    v2 = [line.split()[1] for line in mounts if line.split()[2] == "cgroup2"]
    checks.append(Check("cgroup v2", bool(v2), ", ".join(v2) or "not mounted"))
    checks.append(Check("cgroup v1", bool(v1), ", ".join(v1) or "no v1 controllers", needed=False))
    return checks


def _readable(path: Path) -> bool:
    try:
        path.read_text()
        return True
    except OSError:
        return False


def run_doctor() -> list[Check]:
    system.require_privileges()
    checks = _system_checks()
    checks.extend(_run_probe(probe) for probe in PROBES)
    return checks


EXAMPLES = """
\b
Examples:
  bpfscope doctor          # table of what works here
  bpfscope doctor --json   # one JSON line per capability
"""


@click.command(name="doctor", epilog=EXAMPLES)
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout instead of a table.")
def command(as_json: bool) -> None:
    """What this kernel can do: each program and attach type is loaded, attached and fired here."""
    checks = run_doctor()
    out = Output(as_json)
    kernel = f"{platform.system()} {platform.release()} {platform.machine()}"
    if as_json:
        for check in checks:
            out.record({**asdict(check), "kernel": kernel})
        return
    rows = [(c.name, "yes" if c.ok else "no", c.detail) for c in checks]
    styles = ["green" if c.ok else ("red" if c.needed else "yellow") for c in checks]
    out.table(["capability", "works", "detail"], rows, title=f"bpfscope doctor: {kernel}", styles=styles)
    missing = [c.name for c in checks if not c.ok and c.needed]
    if missing:
        out.note(f"missing what bpfscope needs: {', '.join(missing)}")
        raise SystemExit(1)
    with contextlib.suppress(Exception):
        unused = [c.name for c in checks if not c.ok]
        if unused:
            out.note(f"not available here ({', '.join(unused)}); bpfscope works without them")
