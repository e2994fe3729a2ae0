"""Every error a user can meet says so in one line (the verifier adds its last lines), exits with code 2
and shows no traceback: missing privileges, kernel BTF, libbpf, tracepoint or tracefs, and a program
the verifier rejects."""

from __future__ import annotations

import gc
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpfscope.engine import system
from bpfscope.engine.bpf import VERIFIER_TAIL, BpfObject
from bpfscope.errors import BpfscopeError, MissingCapability

NOBODY = 65534
PREFIX = "bpfscope: error: "

# A test-only tool run through the real `bpfscope.cli.main.main` (registered as plug-ins are): it loads and
# attaches the object given as argv[1], so an engine error reaches the user exactly as a tool's would.
LOAD_TOOL = """
import sys, types
import click
from bpfscope.cli import registry
from bpfscope.cli.main import main
from bpfscope.engine.bpf import BpfObject

@click.command(name="load-test")
@click.argument("path")
def command(path):
    with BpfObject(path) as obj:
        obj.attach()
    print("attached")

module = types.ModuleType("bpfscope_load_test")
module.command = command
sys.modules[module.__name__] = module
registry.register("load-test", module.__name__, "Load and attach one BPF object.")
main(["load-test", sys.argv[1]])
"""

# `bpfscope doctor` on a machine whose kernel BTF is missing (its path is argv[1]).
DOCTOR_WITHOUT_BTF = """
import sys
from pathlib import Path
from bpfscope.engine import system
system.KERNEL_BTF = Path(sys.argv[1])
from bpfscope.cli.main import main
main(["doctor"])
"""

# As if libbpf.so.1 were not installed: ctypes cannot open it, whatever the library path says.
NO_LIBBPF = """
import ctypes
class CDLLWithoutLibbpf(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name is not None and "libbpf.so" in str(name):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = CDLLWithoutLibbpf
"""

NO_LIBBPF_IMPORT = (
    NO_LIBBPF
    + """
from bpfscope.errors import BpfscopeError
try:
    import bpfscope.engine.libbpf
except BpfscopeError as exc:
    print(type(exc).__name__)
    print(exc.render())
else:
    print("imported")
"""
)

NO_LIBBPF_DOCTOR = (
    NO_LIBBPF
    + """
from bpfscope.cli.main import main
main(["doctor"])
"""
)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-c", code, *args])


def bpfscope_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "bpfscope", *args]


def as_nobody(argv: list[str]) -> list[str]:
    """``argv`` as user nobody with no capabilities at all, not even in the bounding set."""
    return [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-all",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        *argv,
    ]


def as_root_without(caps: str, argv: list[str]) -> list[str]:
    """``argv`` as root with ``caps`` (comma-separated) dropped from the bounding set, hence from its
    effective set once it executes."""
    return ["capsh", f"--drop={caps}", "--", "-c", shlex.join(argv)]


def error_lines(result: subprocess.CompletedProcess[str], extra_lines: int = 0) -> list[str]:
    """The error on stderr: exit code 2, no traceback, nothing on stdout, one line plus at most
    ``extra_lines`` details."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.rstrip("\n").split("\n")
    assert lines[0].startswith(PREFIX), result.stderr
    assert len(lines) <= 1 + extra_lines, result.stderr
    return lines


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    return error_lines(result)[0]


def suggestions(exc: BpfscopeError) -> list[str]:
    assert exc.hint is not None and exc.hint.startswith("did you mean "), exc.hint
    return exc.hint.removeprefix("did you mean ").removesuffix("?").split(", ")


@contextmanager
def finalizer_errors() -> Iterator[list[str]]:
    """What finalizers raise inside the block, garbage collected at its end: a ``BpfObject(...)`` that
    failed half-way is finalized too, and its ``__del__`` must not raise (on the CLI that prints a
    traceback after the one-line error)."""
    raised: list[str] = []

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        raised.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value} in {unraisable.object!r}")

    previous = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        yield raised
        gc.collect()
    finally:
        sys.unraisablehook = previous


def mounts_at(path: Path) -> list[str]:
    """The filesystem types mounted at ``path``, in mount order."""
    return [
        parts[2]
        for parts in (line.split() for line in Path("/proc/self/mounts").read_text().splitlines())
        if parts[1] == str(path)
    ]


def unmount_all(path: Path) -> None:
    for _ in range(5):
        if not mounts_at(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# 1. Privileges.


def test_nobody_can_import_bpfscope() -> None:
    """The non-root cases below are only meaningful if nobody gets as far as bpfscope's own checks."""
    result = run(as_nobody([sys.executable, "-c", "import os, bpfscope.cli.main; print(os.geteuid())"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(NOBODY)


def test_doctor_as_nobody_without_capabilities() -> None:
    line = one_line_error(run(as_nobody(bpfscope_argv("doctor"))))
    assert line == (
        f"{PREFIX}bpfscope needs CAP_BPF and CAP_PERFMON to load BPF programs (not root) "
        "(run it as root, e.g. with sudo)"
    )


def test_doctor_as_root_without_bpf_perfmon_and_sys_admin() -> None:
    result = run(as_root_without("cap_bpf,cap_perfmon,cap_sys_admin", bpfscope_argv("doctor")))
    line = one_line_error(result)
    assert "needs CAP_BPF and CAP_PERFMON" in line
    assert "(root without CAP_BPF and CAP_PERFMON)" in line
    assert "run it as root" in line


def test_doctor_as_root_without_cap_bpf_names_only_it() -> None:
    line = one_line_error(run(as_root_without("cap_bpf,cap_sys_admin", bpfscope_argv("doctor"))))
    assert "needs CAP_BPF to load BPF programs (root without CAP_BPF)" in line
    assert "CAP_PERFMON" not in line


def test_bpf_and_perfmon_are_enough_without_sys_admin() -> None:
    code = "from bpfscope.engine import system; system.require_privileges(); print('ok')"
    result = run(as_root_without("cap_sys_admin", [sys.executable, "-c", code]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


def test_doctor_after_dropping_root_in_the_child(
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    def become_nobody() -> None:
        import os

        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    line = one_line_error(run_cli("doctor", preexec=become_nobody))
    assert "needs CAP_BPF and CAP_PERFMON" in line and "(not root)" in line


# 2. Kernel BTF.


def test_require_btf_without_kernel_btf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "vmlinux"
    monkeypatch.setattr(system, "KERNEL_BTF", missing)
    with pytest.raises(MissingCapability) as info:
        system.require_btf()
    assert str(info.value) == f"this kernel has no BTF ({missing} is missing)"
    assert info.value.hint is not None and "CONFIG_DEBUG_INFO_BTF=y" in info.value.hint
    assert info.value.exit_code == 2


def test_bpf_object_without_kernel_btf(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compile_test_bpf: Callable[[str], Path]
) -> None:
    path = compile_test_bpf("engine_test")
    missing = tmp_path / "vmlinux"
    monkeypatch.setattr(system, "KERNEL_BTF", missing)
    with finalizer_errors() as raised:
        with pytest.raises(MissingCapability, match="this kernel has no BTF") as info:
            BpfObject(path)
        assert str(missing) in str(info.value)
        del info
    assert raised == []


def test_doctor_without_kernel_btf(tmp_path: Path) -> None:
    missing = tmp_path / "vmlinux"
    line = one_line_error(run_python(DOCTOR_WITHOUT_BTF, str(missing)))
    assert line.startswith(f"{PREFIX}this kernel has no BTF ({missing} is missing)")
    assert "CONFIG_DEBUG_INFO_BTF=y" in line


# 3. libbpf.


def test_missing_libbpf_at_import() -> None:
    result = run_python(NO_LIBBPF_IMPORT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    kind, rendered = result.stdout.splitlines()
    assert kind == "BpfscopeError"
    assert rendered.startswith(f"{PREFIX}cannot load libbpf.so.1")
    assert rendered.endswith("(install it with `apt-get install libbpf1`)")


def test_doctor_without_libbpf() -> None:
    line = one_line_error(run_python(NO_LIBBPF_DOCTOR))
    assert "cannot load libbpf.so.1" in line
    assert "apt-get install libbpf1" in line


# 4. Tracepoints.


def test_unknown_tracepoint_is_named_with_a_suggestion(compile_test_bpf: Callable[[str], Path]) -> None:
    path = compile_test_bpf("missing_tracepoint")
    with BpfObject(path) as obj, pytest.raises(MissingCapability) as info:
        obj.attach()
    # Loading does not need the tracepoint: the error comes from the attach, before libbpf's bare ENOENT.
    assert obj.loaded
    assert str(info.value) == "this kernel has no tracepoint syscalls:sys_enter_openatt"
    assert suggestions(info.value)[0] == "syscalls:sys_enter_openat"


def test_unknown_tracepoint_through_the_cli(compile_test_bpf: Callable[[str], Path]) -> None:
    line = one_line_error(run_python(LOAD_TOOL, str(compile_test_bpf("missing_tracepoint"))))
    assert line.startswith(f"{PREFIX}this kernel has no tracepoint syscalls:sys_enter_openatt ")
    assert "(did you mean syscalls:sys_enter_openat," in line


def test_require_tracepoint_suggests_the_closest() -> None:
    with pytest.raises(MissingCapability) as info:
        system.require_tracepoint("block", "block_rq_isue")
    assert str(info.value) == "this kernel has no tracepoint block:block_rq_isue"
    assert suggestions(info.value)[0] == "block:block_rq_issue"
    system.require_tracepoint("block", "block_rq_issue")


def test_require_raw_tracepoint_suggests_the_closest() -> None:
    with pytest.raises(MissingCapability) as info:
        system.require_raw_tracepoint("sched_switchh")
    assert str(info.value) == "this kernel has no tracepoint named sched_switchh"
    assert suggestions(info.value)[0] == "sched_switch"


# 5. The verifier.


def test_verifier_rejection_names_the_program_and_shows_its_last_lines(
    compile_test_bpf: Callable[[str], Path],
) -> None:
    with BpfObject(compile_test_bpf("bad_verifier")) as obj, pytest.raises(BpfscopeError) as info:
        obj.load()
    exc = info.value
    assert type(exc) is BpfscopeError  # not a missing capability: root has them all
    message = str(exc)
    assert "\n" not in message
    assert "verifier rejected" in message
    assert "bad_verifier.bpf.o" in message
    assert "bad_unchecked" in message, f"the rejected program is not named: {message!r}"
    assert exc.details is not None
    details = exc.details.splitlines()
    assert 1 <= len(details) <= VERIFIER_TAIL
    assert any("R0 invalid mem access 'map_value_or_null'" in line for line in details), exc.details
    assert any(line.strip().startswith("processed ") and " insns " in line for line in details)
    assert not any(line.strip().startswith("libbpf:") for line in details)


def test_verifier_rejection_through_the_cli(compile_test_bpf: Callable[[str], Path]) -> None:
    result = run_python(LOAD_TOOL, str(compile_test_bpf("bad_verifier")))
    lines = error_lines(result, extra_lines=VERIFIER_TAIL)
    assert lines[0].startswith(f"{PREFIX}the kernel's verifier rejected program")
    assert lines[0].endswith("bad_verifier.bpf.o")
    assert len(lines) > 1 and all(line.startswith("  ") for line in lines[1:])
    assert any("R0 invalid mem access 'map_value_or_null'" in line for line in lines[1:])


# 6. tracefs.


def test_ensure_tracefs_mounts_it_where_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "tracing"
    target.mkdir()
    monkeypatch.setattr(system, "TRACEFS", target)
    try:
        assert system.ensure_tracefs() == target
        assert mounts_at(target) == ["tracefs"]
        assert (target / "events" / "syscalls" / "sys_enter_openat").is_dir()
        # Mounted now: a second call leaves it as it is.
        assert system.ensure_tracefs() == target
        assert mounts_at(target) == ["tracefs"]
    finally:
        unmount_all(target)
    assert mounts_at(target) == []


def test_ensure_tracefs_leaves_a_mounted_tracefs_alone() -> None:
    before = mounts_at(system.TRACEFS)
    assert system.ensure_tracefs() == system.TRACEFS
    assert mounts_at(system.TRACEFS) == before


def test_tracefs_mount_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "absent"
    monkeypatch.setattr(system, "TRACEFS", target)
    try:
        with pytest.raises(MissingCapability) as info:
            system.ensure_tracefs()
    finally:
        unmount_all(target)
    message = str(info.value)
    assert message.startswith(f"tracefs is not mounted at {target} and mounting it failed: ")
    assert "\n" not in message, f"mount's stderr is pasted whole: {message!r}"
    assert info.value.hint == f"mount it as root: `mount -t tracefs tracefs {target}`"


# And the object itself.


def test_missing_bpf_object(tmp_path: Path) -> None:
    with finalizer_errors() as raised:
        with pytest.raises(BpfscopeError) as info:
            BpfObject(tmp_path / "nothing.bpf.o")
        assert str(info.value) == f"BPF object {tmp_path / 'nothing.bpf.o'} is missing"
        del info
    assert raised == []
