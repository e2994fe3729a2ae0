"""bpfscope doctor: what this kernel can do, found by loading, attaching and firing a program of each kind
(doctor.bpf.c), not by reading its config.

:class:`DoctorCollector` is sampled once: its sample is the list of checks (the machine's facilities,
then one probe per program type and attach point). The engine (and so libbpf) is imported only when the
checks run, so that a machine without libbpf or kernel BTF gets a one-line error, not a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import platform
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, option
from bpfscope.engine import system
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.terminal import Terminal, View, note

if TYPE_CHECKING:
    from bpfscope.engine.bpf import Program

DOCTOR_OBJECT = Path(__file__).with_name("doctor.bpf.o")
# Sent by the bpf_send_signal probe, to the doctor itself.
SIGNAL = signal.SIGUSR2


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    # What bpfscope uses it for; a missing capability that nothing needs is not a problem.
    needed: bool = True


DOCTOR_SCHEMA = Schema(
    "doctor",
    (
        Field("name", "str", label=True, doc="the capability: a facility, a program or attach type"),
        Field("ok", "bool", doc="it works here"),
        Field("detail", "str", doc="what was found, or why it does not work"),
        Field("needed", "bool", doc="bpfscope needs it (the others it works without)"),
        Field("kernel", "str", label=True, doc="system, release and machine, as uname gives them"),
    ),
    doc="One capability of this kernel, as doctor found it by trying it.",
)


@dataclass
class DoctorSample(Sample):
    ts: float
    kernel: str
    checks: list[Check]

    @property
    def missing(self) -> list[str]:
        """What bpfscope needs and does not work here."""
        return [c.name for c in self.checks if not c.ok and c.needed]

    @property
    def unavailable(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def records(self) -> Iterator[dict[str, Any]]:
        for c in self.checks:
            yield DOCTOR_SCHEMA.record(
                {
                    "ts": self.ts,
                    "name": c.name,
                    "ok": c.ok,
                    "detail": c.detail,
                    "needed": c.needed,
                    "kernel": self.kernel,
                }
            )


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


def _getppid_loop() -> None:
    for _ in range(3):
        os.getppid()


def _attach(program: Program) -> object:
    return program.attach()


def _attach_cgroup(program: Program) -> object:
    """On the root of the cgroup v2 hierarchy: the doctor is below it wherever it runs, and the program
    lets every other process through."""
    from bpfscope.sources.cgroups import cgroup2_mounts

    mounts = cgroup2_mounts()
    if not mounts:
        raise BpfscopeError("no cgroup v2 mount")
    return program.attach_cgroup(mounts[0])


def _refused(call: str, family: int) -> None:
    """A UDP connect or send to the loopback address, which the probe refuses (EPERM)."""
    import socket

    af, address = (socket.AF_INET, "127.0.0.1") if family == 4 else (socket.AF_INET6, "::1")
    with socket.socket(af, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        if call == "connect":
            sock.connect((address, 9))
        else:
            sock.sendto(b"doctor", (address, 9))


@dataclass
class Probe:
    name: str
    program: str  # in doctor.bpf.c
    counter: int  # its index in doctor.bpf.c's hits[]
    attach: Callable[[Program], object]
    trigger: Callable[[], None]
    needed: bool = True


PROBES = [
    Probe("tracepoint", "probe_tracepoint", 0, _attach, _getppid_loop),
    Probe("raw_tracepoint", "probe_raw_tp", 1, _attach, _getppid_loop),
    Probe("tp_btf", "probe_tp_btf", 2, _attach, _getppid_loop),
    Probe("perf_event", "probe_perf_event", 3, lambda p: p.attach_sampling(999), lambda: _busy(0.05)),
    Probe("uprobe", "probe_uprobe", 4, lambda p: p.attach_uprobe(_libc_path(), "getppid"), _getppid_loop),
    Probe("kprobe", "probe_kprobe", 5, _attach, _getppid_loop, needed=False),
    Probe("fentry", "probe_fentry", 6, _attach, _getppid_loop, needed=False),
    Probe("lsm", "probe_lsm", 7, _attach, lambda: Path("/proc/self/stat").read_bytes(), needed=False),
    Probe("ringbuf", "probe_ringbuf", 8, _attach, _getppid_loop),
    Probe("bpf_send_signal", "probe_send_signal", 9, _attach, _getppid_loop),
    # What `bpfscope secure` blocks connects and sends with: needed only for Block rules.
    Probe(
        "cgroup connect4", "probe_connect4", 10, _attach_cgroup, lambda: _refused("connect", 4), needed=False
    ),
    Probe(
        "cgroup connect6", "probe_connect6", 11, _attach_cgroup, lambda: _refused("connect", 6), needed=False
    ),
    Probe(
        "cgroup sendmsg4", "probe_sendmsg4", 12, _attach_cgroup, lambda: _refused("sendto", 4), needed=False
    ),
    Probe(
        "cgroup sendmsg6", "probe_sendmsg6", 13, _attach_cgroup, lambda: _refused("sendto", 6), needed=False
    ),
]


def _run_probe(probe: Probe) -> Check:
    from bpfscope.engine.bpf import BpfObject

    received: list[int] = []
    previous = signal.signal(SIGNAL, lambda signum, frame: received.append(signum))
    try:
        with BpfObject(
            DOCTOR_OBJECT,
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
            detail = f"loaded, attached, fired {hits} times" if hits else "attached but never fired"
            return Check(probe.name, hits > 0, detail, probe.needed)
    finally:
        signal.signal(SIGNAL, previous)


def _short(exc: BpfscopeError) -> str:
    return str(exc).split(": ", 1)[-1]


def _system_checks() -> list[Check]:
    from bpfscope.engine import libbpf

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


class DoctorCollector(Collector[Config]):
    """Every check, once: the machine's facilities, then each probe loaded, attached and fired. Its
    configuration is only the common one: the checks are of the kernel, not of any task."""

    name = "doctor"
    _schemas = (DOCTOR_SCHEMA,)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.result: DoctorSample | None = None

    def open(self) -> None:
        # What every probe needs: said once, before any check runs.
        system.require_privileges()
        system.require_btf()

    def sample(self) -> DoctorSample:
        checks = _system_checks() + [_run_probe(probe) for probe in PROBES]
        kernel = f"{platform.system()} {platform.release()} {platform.machine()}"
        self.result = DoctorSample(time.time(), kernel, checks)
        return self.result


class DoctorView(View):
    """A table of the checks: what is missing in red, what bpfscope does without in yellow."""

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, DoctorSample)
        rows = [(c.name, "yes" if c.ok else "no", c.detail) for c in sample.checks]
        styles = ["green" if c.ok else ("red" if c.needed else "yellow") for c in sample.checks]
        term.table(
            ["capability", "works", "detail"], rows, title=f"bpfscope doctor: {sample.kernel}", styles=styles
        )


def verdict(result: DoctorSample) -> str:
    """The run's last line: what is missing, if anything."""
    if result.missing:
        return f"doctor: missing what bpfscope needs: {', '.join(result.missing)}"
    if result.unavailable:
        return f"doctor: not available here ({', '.join(result.unavailable)}); bpfscope works without them"
    return "doctor: everything bpfscope can use works here"


EXAMPLES = """
\b
Examples:
  bpfscope doctor          # table of what works here; exit code 1 if bpfscope lacks something it needs
  bpfscope doctor --json   # one JSON line per capability
"""


@click.command(name="doctor", epilog=EXAMPLES)
@option("json", help="JSON lines on stdout (one per capability) instead of a table.")
def command(as_json: bool) -> None:
    """What this kernel can do: each program and attach type is loaded, attached and fired here.

    Exits with 1 when something bpfscope needs does not work. doctor takes only --json: it checks the
    kernel once, in its own process, so the task filters, --duration and intervals of the other tools do
    not apply to it.
    """
    collector = DoctorCollector(Config())
    # One sample, stepped by hand: doctor counts no events, so it has no losses to report at the end.
    with Run(as_json=as_json).session([collector], DoctorView()) as session:
        session.open()
        session.start()
        session.sample()
    assert collector.result is not None
    note(verdict(collector.result))
    if collector.result.missing:
        raise SystemExit(1)
