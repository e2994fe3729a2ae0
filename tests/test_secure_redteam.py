"""The red-team suite: real attacks, modelled on Falco's event-generator actions and Tetragon's examples,
run against `bpfscope secure` with its default policy. Each must be reported by the right policy, for the
process that did it (its binary) and with its ancestry (the process the test started, and this test);
the legitimate look-alikes (passwd reading /etc/shadow, dpkg writing /usr/bin, a shell pipeline's dup2
onto stdout, ...) must not be reported at all.

Every case runs once, under one run of the tool (the module's fixture); each test checks one case.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_secure import SecureRun, trace

NOBODY = 65534
PYTHON = sys.executable
PYTHON_BINARY = os.path.realpath(sys.executable)
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MARK = f"bpfscope-rt-{uuid.uuid4().hex[:8]}"


@dataclass
class Outcome:
    """What an attack (or a look-alike) did: the process it started, whose events we look at."""

    root_pid: int
    binary: str  # the offending process's binary (the kernel's: links resolved)
    parent_binary: str | None = None  # where the offender's parent is not the process the test started


@dataclass
class Case:
    name: str
    policy: str | None  # None: a look-alike, which no policy may report
    run: Callable[[Path], Outcome]


def spawn(argv: list[str], **kwargs: Any) -> int:
    """Run to the end, in a process group of its own (killed whole if it outlives its time); its pid."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kwargs
    )
    try:
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.pid


def python(code: str, *args: str, **kwargs: Any) -> int:
    return spawn([PYTHON, "-c", textwrap.dedent(code), *args], **kwargs)


def real(path: str) -> str:
    return os.path.realpath(path)


# --- the attacks ------------------------------------------------------------------------------------


def read_shadow(tmp: Path) -> Outcome:
    return Outcome(spawn(["cat", "/etc/shadow"]), "/usr/bin/cat")


def read_gshadow_relative(tmp: Path) -> Outcome:
    # A relative path: the kernel's fd table has the whole one.
    return Outcome(spawn(["cat", "gshadow"], cwd="/etc"), "/usr/bin/cat")


def read_shadow_through_a_link(tmp: Path) -> Outcome:
    link = tmp / "innocent"
    link.symlink_to("/etc/shadow")
    return Outcome(spawn(["cat", str(link)]), "/usr/bin/cat")


def read_shadow_bind_mounted(tmp: Path) -> Outcome:
    """A file of another name mounted onto /etc/shadow (in a mount namespace of its own): the kernel's
    name for the file opened is its own, its path ends where it is mounted."""
    copy = tmp / "copy-of-secrets"
    copy.write_text("root:*:20000:0:99999:7:::\n")
    mounted = f"mount --bind {copy} /etc/shadow && exec cat /etc/shadow"
    return Outcome(
        spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", mounted]), "/usr/bin/cat"
    )


def read_ssh_key(tmp: Path) -> Outcome:
    key = tmp / "home" / ".ssh" / "id_rsa"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return Outcome(spawn(["cat", str(key)]), "/usr/bin/cat")


def write_below_etc(tmp: Path) -> Outcome:
    target = Path(f"/etc/{MARK}")
    try:
        return Outcome(spawn(["sh", "-c", f"echo evil > {target}"]), real("/bin/sh"))
    finally:
        target.unlink(missing_ok=True)


def write_below_usr_bin(tmp: Path) -> Outcome:
    target = Path(f"/usr/bin/{MARK}")
    try:
        return Outcome(spawn(["cp", "/usr/bin/true", str(target)]), "/usr/bin/cp")
    finally:
        target.unlink(missing_ok=True)


def write_cron_job(tmp: Path) -> Outcome:
    spool = Path("/var/spool/cron/crontabs")
    created = not spool.exists()
    spool.mkdir(parents=True, exist_ok=True)
    target = spool / MARK
    try:
        return Outcome(spawn(["sh", "-c", f"echo '* * * * * sh -c id' > {target}"]), real("/bin/sh"))
    finally:
        target.unlink(missing_ok=True)
        if created:
            shutil.rmtree("/var/spool/cron", ignore_errors=True)


def clear_log_with_shell(tmp: Path) -> Outcome:
    log = Path(f"/var/log/{MARK}.log")
    log.write_text("evidence\n")
    try:
        return Outcome(spawn(["sh", "-c", f": > {log}"]), real("/bin/sh"))
    finally:
        log.unlink(missing_ok=True)


def truncate_log(tmp: Path) -> Outcome:
    log = Path(f"/var/log/{MARK}-2.log")
    log.write_text("evidence\n")
    try:
        return Outcome(python("import os, sys; os.truncate(sys.argv[1], 0)", str(log)), PYTHON_BINARY)
    finally:
        log.unlink(missing_ok=True)


def delete_shell_history(tmp: Path) -> Outcome:
    history = tmp / ".bash_history"
    history.write_text("cat /etc/shadow\n")
    return Outcome(spawn(["rm", str(history)]), "/usr/bin/rm")


def symlink_to_shadow(tmp: Path) -> Outcome:
    return Outcome(spawn(["ln", "-s", "/etc/shadow", str(tmp / "shadow-link")]), "/usr/bin/ln")


def set_setuid_bit(tmp: Path) -> Outcome:
    target = tmp / "backdoor"
    shutil.copy("/usr/bin/id", target)
    return Outcome(spawn(["chmod", "u+s", str(target)]), "/usr/bin/chmod")


def write_core_pattern(tmp: Path) -> Outcome:
    # Opened for writing and closed without a byte written: the attempt is the event, the host unchanged.
    return Outcome(python("open('/proc/sys/kernel/core_pattern', 'a').close()"), PYTHON_BINARY)


def fileless_exec(tmp: Path) -> Outcome:
    code = """
    import os
    fd = os.memfd_create("payload", 0x10)  # MFD_EXEC: where memfds are not executable by default
    os.write(fd, open("/usr/bin/true", "rb").read())
    os.execv(f"/proc/self/fd/{fd}", ["payload"])
    """
    return Outcome(python(code), "/memfd:payload")


def exec_from(directory: str) -> Callable[[Path], Outcome]:
    def attack(tmp: Path) -> Outcome:
        binary = Path(directory) / f"{MARK}-dropper"
        shutil.copy("/usr/bin/true", binary)
        try:
            return Outcome(spawn([str(binary)]), str(binary))
        finally:
            binary.unlink(missing_ok=True)

    attack.__name__ = f"exec_from_{directory.strip('/').replace('/', '_')}"
    return attack


SPAWNER = r"""
#include <stdio.h>
#include <stdlib.h>
/* Runs inside the server process when it starts: the server itself spawns the shell. The variables
 * go first, or the shell (which loads this library too) would spawn one more, and so on. */
__attribute__((constructor)) static void spawn(void)
{
	char command[256];
	const char *wanted = getenv("BPFSCOPE_RT_COMMAND");

	if (!wanted)
		return;
	snprintf(command, sizeof(command), "%s", wanted);
	unsetenv("BPFSCOPE_RT_COMMAND");
	unsetenv("LD_PRELOAD");
	system(command);
}
"""


def shell_from_server(tmp: Path) -> Outcome:
    """nginx spawns a shell (a web shell or an injected library): the shell's parent binary is nginx."""
    source = tmp / "spawner.c"
    source.write_text(SPAWNER)
    library = tmp / "spawner.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    env = {**os.environ, "LD_PRELOAD": str(library), "BPFSCOPE_RT_COMMAND": "id > /dev/null"}
    return Outcome(spawn(["/usr/sbin/nginx", "-v"], env=env), real("/bin/sh"), "/usr/sbin/nginx")


def setuid_binary_by_a_user(tmp: Path) -> Outcome:
    binary = Path(f"/usr/local/bin/{MARK}-suid")
    shutil.copy("/usr/bin/id", binary)
    os.chmod(binary, 0o4755)
    try:
        return Outcome(spawn([*SETPRIV, str(binary)]), str(binary))
    finally:
        binary.unlink(missing_ok=True)


def setuid_root_by_a_user(tmp: Path) -> Outcome:
    code = "import os\ntry:\n    os.setuid(0)\nexcept PermissionError:\n    pass"
    return Outcome(spawn([*SETPRIV, PYTHON, "-c", code]), PYTHON_BINARY)


def ptrace_attach(tmp: Path) -> Outcome:
    victim = subprocess.Popen(["sleep", "30"])
    code = """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    pid = int(sys.argv[1])
    assert libc.ptrace(16, pid, None, None) == 0      # PTRACE_ATTACH
    os.waitpid(pid, 0)
    libc.ptrace(17, pid, None, None)                   # PTRACE_DETACH
    """
    try:
        return Outcome(python(code, str(victim.pid)), PYTHON_BINARY)
    finally:
        victim.kill()
        victim.wait()


def kernel_module_load(tmp: Path) -> Outcome:
    code = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(313, -1, b"", 0)                      # finit_module: refused here, attempted all the same
    """
    return Outcome(python(code), PYTHON_BINARY)


def listener(host: str = "127.0.0.1", port: int = 0, family: int = socket.AF_INET) -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)

    def accept() -> None:
        while True:
            try:
                peer, _ = server.accept()
            except OSError:
                return
            peer.close()

    threading.Thread(target=accept, daemon=True).start()
    return server


def close(server: socket.socket) -> None:
    """Shut down first: the thread blocked in accept() would otherwise keep the port bound."""
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)
    server.close()


def reverse_shell(tmp: Path) -> Outcome:
    server = listener()
    code = """
    import os, socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    for fd in (0, 1, 2):
        os.dup2(s.fileno(), fd)
    os.execv("/bin/sh", ["sh", "-c", "echo connected"])
    """
    try:
        return Outcome(python(code, str(server.getsockname()[1])), PYTHON_BINARY)
    finally:
        close(server)


def connect_to_suspicious_port(tmp: Path) -> Outcome:
    try:
        server = listener(port=4444)
    except OSError:
        pytest.skip("port 4444 is taken on this machine")
    code = "import socket; socket.create_connection(('127.0.0.1', 4444)).close()"
    try:
        return Outcome(python(code), PYTHON_BINARY)
    finally:
        close(server)


def docker_socket(tmp: Path) -> Outcome:
    path = tmp / "run" / "docker.sock"
    path.parent.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    code = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.close()"
    try:
        return Outcome(python(code, str(path)), PYTHON_BINARY)
    finally:
        close(server)


# --- the look-alikes --------------------------------------------------------------------------------


def passwd_reads_shadow(tmp: Path) -> Outcome:
    return Outcome(spawn(["passwd", "-S", "root"]), "/usr/bin/passwd")


def dpkg_installs_into_usr_bin(tmp: Path) -> Outcome:
    package = tmp / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "usr" / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/true", package / "usr" / "bin" / MARK)
    (package / "DEBIAN" / "control").write_text(
        f"Package: {MARK}\nVersion: 1.0\nArchitecture: all\nMaintainer: bpfscope tests <tests@bpfscope>\n"
        "Description: a look-alike for the red-team suite\n"
    )
    deb = tmp / f"{MARK}.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    try:
        # Another apt or dpkg on the machine may hold the lock for a while: wait for it.
        deadline = time.monotonic() + 180
        while True:
            proc = subprocess.Popen(
                ["dpkg", "-i", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            _, err = proc.communicate(timeout=120)
            if proc.returncode == 0 or "lock" not in err or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert proc.returncode == 0, err
        assert Path(f"/usr/bin/{MARK}").exists()
        return Outcome(proc.pid, "/usr/bin/dpkg")
    finally:
        subprocess.run(["dpkg", "-r", MARK], capture_output=True)


def shell_pipeline(tmp: Path) -> Outcome:
    return Outcome(spawn(["sh", "-c", "echo x | cat | cat > /dev/null"]), real("/bin/sh"))


def ordinary_files(tmp: Path) -> Outcome:
    script = f"cat /etc/passwd /etc/hostname > {tmp}/copy; chmod 755 {tmp}/copy; ln -s /etc/hostname {tmp}/h"
    return Outcome(spawn(["sh", "-c", script]), real("/bin/sh"))


def append_to_a_log(tmp: Path) -> Outcome:
    log = Path(f"/var/log/{MARK}-append.log")
    try:
        return Outcome(spawn(["sh", "-c", f"echo ok >> {log}"]), real("/bin/sh"))
    finally:
        log.unlink(missing_ok=True)


def root_setuid_root(tmp: Path) -> Outcome:
    return Outcome(python("import os; os.setuid(0)"), PYTHON_BINARY)


def ordinary_connect(tmp: Path) -> Outcome:
    server = listener()
    code = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()"
    try:
        return Outcome(python(code, str(server.getsockname()[1])), PYTHON_BINARY)
    finally:
        close(server)


def shell_from_python(tmp: Path) -> Outcome:
    return Outcome(spawn(["sh", "-c", "/usr/bin/true"]), real("/bin/sh"))


ATTACKS = [
    Case("read /etc/shadow", "sensitive-files", read_shadow),
    Case("read /etc/gshadow by a relative path", "sensitive-files", read_gshadow_relative),
    Case("read /etc/shadow through a symbolic link", "sensitive-files", read_shadow_through_a_link),
    Case("read a file bind-mounted onto /etc/shadow", "sensitive-files", read_shadow_bind_mounted),
    Case("read an SSH private key", "sensitive-files", read_ssh_key),
    Case("write below /etc", "file-tampering", write_below_etc),
    Case("write below /usr/bin", "file-tampering", write_below_usr_bin),
    Case("write a cron job", "file-tampering", write_cron_job),
    Case("clear a log file", "file-tampering", clear_log_with_shell),
    Case("truncate a log file", "file-tampering", truncate_log),
    Case("delete the shell history", "file-tampering", delete_shell_history),
    Case("symbolic link to /etc/shadow", "file-tampering", symlink_to_shadow),
    Case("set the setuid bit", "file-tampering", set_setuid_bit),
    Case("write core_pattern", "file-tampering", write_core_pattern),
    Case("fileless execution (memfd)", "process-execution", fileless_exec),
    Case("execute from /tmp", "process-execution", exec_from("/tmp")),
    Case("execute from /dev/shm", "process-execution", exec_from("/dev/shm")),
    Case("shell spawned by nginx", "process-execution", shell_from_server),
    Case("setuid binary run by a user", "process-execution", setuid_binary_by_a_user),
    Case("setuid(0) by a user", "privilege-and-kernel", setuid_root_by_a_user),
    Case("ptrace attach", "privilege-and-kernel", ptrace_attach),
    Case("kernel module load", "privilege-and-kernel", kernel_module_load),
    Case("reverse shell", "network-and-escape", reverse_shell),
    Case("connect to a reverse-shell port", "network-and-escape", connect_to_suspicious_port),
    Case("connect to the docker socket", "network-and-escape", docker_socket),
]
LOOK_ALIKES = [
    Case("passwd reads /etc/shadow", None, passwd_reads_shadow),
    Case("dpkg writes /usr/bin", None, dpkg_installs_into_usr_bin),
    Case("shell pipeline dup2s onto stdout", None, shell_pipeline),
    Case("ordinary files read, copied, chmod 755, linked", None, ordinary_files),
    Case("append to a log", None, append_to_a_log),
    Case("setuid(0) by root", None, root_setuid_root),
    Case("ordinary connect", None, ordinary_connect),
    Case("shell from a non-server", None, shell_from_python),
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureRun, dict[str, Outcome]]]:
    outcomes: dict[str, Outcome] = {}
    errors: dict[str, BaseException] = {}

    def workload() -> None:
        for case in ATTACKS + LOOK_ALIKES:
            tmp = tmp_path_factory.mktemp("case")
            try:
                outcomes[case.name] = case.run(tmp)
            except BaseException as exc:  # reported by the case's own test
                errors[case.name] = exc

    run = trace([], workload)
    for name, exc in errors.items():
        outcomes[name] = exc  # type: ignore[assignment]
    yield run, outcomes


def _outcome(outcomes: dict[str, Any], case: Case) -> Outcome:
    outcome = outcomes[case.name]
    if isinstance(outcome, pytest.skip.Exception):
        raise outcome
    if isinstance(outcome, BaseException):
        raise AssertionError(f"{case.name}: the attack itself failed: {outcome!r}") from outcome
    return outcome


@pytest.mark.parametrize("case", ATTACKS, ids=[c.name for c in ATTACKS])
def test_attack_is_detected_with_its_process_and_ancestry(
    case: Case, suite: tuple[SecureRun, dict[str, Outcome]]
) -> None:
    run, outcomes = suite
    outcome = _outcome(outcomes, case)
    hits = [h for h in run.under(outcome.root_pid, "process_tracepoint") if h["policy_name"] == case.policy]
    assert hits, f"{case.name}: no {case.policy} event (events of the case: {run.under(outcome.root_pid)})"
    hit = hits[0]
    process = hit["process"]
    assert process["binary"] == outcome.binary, (case.name, process)
    lineage = [process, hit.get("parent") or {}, *hit.get("ancestors", [])]
    pids = [p.get("pid") for p in lineage]
    # The chain reaches the process the test started, then this test process.
    assert outcome.root_pid in pids, (case.name, pids)
    assert os.getpid() in pids, (case.name, pids)
    if outcome.parent_binary is not None:
        assert hit["parent"]["binary"] == outcome.parent_binary, (case.name, hit["parent"])
    assert hit["action"] == "KPROBE_ACTION_POST"


@pytest.mark.parametrize("case", LOOK_ALIKES, ids=[c.name for c in LOOK_ALIKES])
def test_look_alike_is_not_reported(case: Case, suite: tuple[SecureRun, dict[str, Outcome]]) -> None:
    run, outcomes = suite
    outcome = _outcome(outcomes, case)
    assert outcome.root_pid > 0
    hits = run.under(outcome.root_pid, "process_tracepoint")
    assert hits == [], f"{case.name} was reported: {[(h['policy_name'], h['args']) for h in hits]}"
    # It was seen all the same: its exec is in the stream.
    assert run.under(outcome.root_pid, "process_exec"), case.name


def test_the_suite_lost_nothing(suite: tuple[SecureRun, dict[str, Outcome]]) -> None:
    run, _ = suite
    assert run.losses["total"] == 0, run.losses
    assert len(ATTACKS) >= 20
