"""bpfscope secure on the real kernel: the process cache and lineage (processes older than the tool
included), Tetragon's JSON fields against /proc and the processes the test starts, the compact view, a
burst of execs with nothing lost, and bad policies (exit 2 with the line, nothing loaded).

``SecureRun`` runs the tool around a workload; the red-team and enforcement suites use it too.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

NOTE = "Tracing security events"


@dataclass
class SecureRun:
    """The records of one run of `bpfscope secure --json`, and its summary line."""

    records: list[dict[str, Any]]
    stderr: str
    stdout: str

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """(kind, body) of every security event."""
        out = []
        for r in self.records:
            kind = r["record"].removeprefix("secure.")
            if kind in r:
                out.append((kind, r[kind]))
        return out

    def of(self, kind: str, pid: int | None = None) -> list[dict[str, Any]]:
        return [b for k, b in self.events if k == kind and (pid is None or b["process"]["pid"] == pid)]

    def under(self, root_pid: int, kind: str | None = None) -> list[dict[str, Any]]:
        """Events of ``root_pid`` or of a process descended from it (by the events' own lineage)."""
        out = []
        for k, body in self.events:
            if kind is not None and k != kind:
                continue
            lineage = [body["process"], body.get("parent") or {}, *body.get("ancestors", [])]
            if any(p.get("pid") == root_pid for p in lineage):
                out.append(body)
        return out

    @property
    def losses(self) -> dict[str, Any]:
        (losses,) = [r for r in self.records if r["record"] == "losses"]
        return losses


def _stop_with_parent() -> None:
    """The tool ends (as on Ctrl-C) if the test process dies: an enforcing tool must not outlive it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def start_secure(args: list[str], timeout: float = 60.0) -> subprocess.Popen[str]:
    """The tool, started and attached (its note seen on stderr). Its records go to a file: a pipe nobody
    reads while the workload runs would fill and hold the tool up."""
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed by stop_secure
    tool = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "secure", "--json", *args],
        preexec_fn=_stop_with_parent,
        stdout=output,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert tool.stderr is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([tool.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = tool.stderr.readline()
        if not line:
            break
        seen += line
        if NOTE in line:
            _outputs[tool.pid] = output
            return tool
    tool.kill()
    pytest.fail(f"bpfscope secure did not start tracing: {seen}{tool.stderr.read()}")


_outputs: dict[int, IO[str]] = {}


def stop_secure(tool: subprocess.Popen[str]) -> SecureRun:
    tool.send_signal(signal.SIGINT)
    _, err = tool.communicate(timeout=120)
    output = _outputs.pop(tool.pid)
    output.seek(0)
    out = output.read()
    output.close()
    assert tool.returncode == 0, err
    assert "Traceback" not in err, err
    records = [json.loads(line) for line in out.splitlines()]
    return SecureRun(records, err, out)


def trace(args: list[str], workload: Callable[[], Any]) -> SecureRun:
    tool = start_secure(args)
    try:
        workload()
        # Events committed before the stop are drained at the end; a short pause lets the last exits of
        # the workload's processes happen first.
        time.sleep(0.3)
    except BaseException:
        tool.kill()
        tool.wait()
        raise
    return stop_secure(tool)


def exec_id_parts(exec_id: str) -> tuple[str, int, int]:
    node, ktime, pid = base64.b64decode(exec_id).decode().rsplit(":", 2)
    return node, int(ktime), int(pid)


# --- lineage and the process fields -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lineage_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureRun, dict[str, Any]]]:
    """A chain started before the tool (bash -> sleep, found in /proc) and one started while it runs
    (sh -> sh -> true, with a known cwd and arguments)."""
    workdir = tmp_path_factory.mktemp("lineage")
    old = subprocess.Popen(["/bin/bash", "-c", "sleep 30; exit 3"], cwd=workdir)
    time.sleep(0.2)
    facts: dict[str, Any] = {"old": old.pid, "workdir": str(workdir)}

    def workload() -> None:
        child = subprocess.Popen(
            ["/bin/sh", "-c", "/bin/sh -c '/usr/bin/true bpfscope-lineage-marker \"two words\"'; exit 7"],
            cwd=workdir,
        )
        facts["child"] = child.pid
        assert child.wait(timeout=10) == 7
        os.kill(old.pid, signal.SIGTERM)
        old.wait(timeout=10)

    try:
        run = trace([], workload)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    yield run, facts


def test_exec_events_carry_the_process_and_its_lineage(lineage_run: tuple[SecureRun, dict[str, Any]]) -> None:
    run, facts = lineage_run
    (true_exec,) = [
        b
        for b in run.of("process_exec")
        if b["process"]["binary"] == "/usr/bin/true"
        and "bpfscope-lineage-marker" in b["process"]["arguments"]
    ]
    process, parent = true_exec["process"], true_exec["parent"]
    assert process["binary"] == "/usr/bin/true"
    assert process["arguments"] == 'bpfscope-lineage-marker "two words"'
    assert process["cwd"] == facts["workdir"]
    assert process["uid"] == os.getuid() and process["process_credentials"]["euid"] == os.geteuid()
    assert process["flags"] == "execve"
    # Its parent is the inner sh, whose parent is the outer sh (the test's child), then this test.
    assert parent["binary"] == "/usr/bin/dash" and "/usr/bin/true" in parent["arguments"]
    assert process["parent_exec_id"] == parent["exec_id"]
    ancestors = true_exec["ancestors"]
    assert ancestors[0]["pid"] == facts["child"]
    assert parent["parent_exec_id"] == ancestors[0]["exec_id"]
    assert ancestors[1]["pid"] == os.getpid()
    # exec_id is Tetragon's: base64 of node:ktime:pid, unique per exec.
    node, ktime, pid = exec_id_parts(process["exec_id"])
    assert (node, pid) == (socket.gethostname(), process["pid"])
    assert ktime > 0
    ids = [b["process"]["exec_id"] for b in run.of("process_exec")]
    assert len(ids) == len(set(ids))
    # Namespaces and capabilities are the kernel's view of this process's.
    assert process["ns"]["mnt"] == {"inum": os.stat("/proc/self/ns/mnt").st_ino, "is_host": True}
    assert "CAP_SYS_ADMIN" in process["cap"]["effective"]
    (record,) = [r for r in run.records if r.get("process_exec") is true_exec]
    assert record["node_name"] == socket.gethostname()
    assert record["time"].endswith("Z") and record["time"] > process["start_time"][:19]


def test_processes_older_than_the_tool_have_their_lineage(
    lineage_run: tuple[SecureRun, dict[str, Any]],
) -> None:
    run, facts = lineage_run
    (exit_event,) = run.of("process_exit", pid=facts["old"])
    process = exit_event["process"]
    assert process["binary"] == "/usr/bin/bash"
    assert process["arguments"] == '-c "sleep 30; exit 3"'
    assert process["flags"].startswith("procFS")
    assert exit_event["parent"]["pid"] == os.getpid()
    # bash ended by SIGTERM: Tetragon's signal field; its sleep child also died.
    assert exit_event["signal"] == "SIGTERM"
    _, ktime, pid = exec_id_parts(process["exec_id"])
    assert pid == facts["old"] and ktime > 0


def test_exit_events_say_code_or_signal(lineage_run: tuple[SecureRun, dict[str, Any]]) -> None:
    run, facts = lineage_run
    (exit_event,) = run.of("process_exit", pid=facts["child"])
    assert (exit_event["status"], exit_event["signal"]) == (7, "")
    assert exit_event["process"]["binary"] == "/usr/bin/dash"


def test_records_are_tetragon_shaped(lineage_run: tuple[SecureRun, dict[str, Any]]) -> None:
    run, _ = lineage_run
    for kind, body in run.events:
        assert kind in ("process_exec", "process_exit", "process_tracepoint")
        for key in (
            "exec_id",
            "pid",
            "uid",
            "cwd",
            "binary",
            "arguments",
            "flags",
            "start_time",
            "auid",
            "tid",
        ):
            assert key in body["process"], (key, body)
    assert run.records[-1]["record"] == "losses"
    assert run.losses["total"] == 0


def test_compact_view_one_line_per_event(tmp_path: Path) -> None:
    tool = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "secure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert tool.stderr is not None
    assert NOTE in tool.stderr.readline()
    subprocess.run(["/usr/bin/cat", "/etc/shadow"], stdout=subprocess.DEVNULL, check=True)
    time.sleep(0.3)
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=60)
    lines = out.splitlines()
    assert any(line.startswith("🚀 process") and "/usr/bin/cat /etc/shadow" in line for line in lines), out
    assert any(line.startswith("💥 exit") and "/usr/bin/cat /etc/shadow 0" in line for line in lines), out
    assert any(
        "openat" in line and "/usr/bin/cat /etc/shadow [sensitive-files Post]" in line for line in lines
    )
    assert err.strip().splitlines()[-1].startswith("secure: ")


# --- many execs, nothing lost -----------------------------------------------------------------------

BURST = r"""
import os, sys
n = int(sys.argv[1])
for i in range(n):
    pid = os.posix_spawn("/usr/bin/true", ["/usr/bin/true", f"bpfscope-burst-{i}"], {})
    os.waitpid(pid, 0)
"""


def test_burst_of_execs_every_one_with_its_parent() -> None:
    n = 2000
    procs: list[subprocess.Popen[bytes]] = []

    def workload() -> None:
        procs.append(subprocess.Popen([sys.executable, "-c", BURST, str(n)]))
        assert procs[0].wait(timeout=120) == 0

    run = trace(["--no-ancestors"], workload)
    driver = procs[0].pid
    execs = [b for b in run.of("process_exec") if b["process"]["arguments"].startswith("bpfscope-burst-")]
    exits = [b for b in run.of("process_exit") if b["process"]["arguments"].startswith("bpfscope-burst-")]
    assert sorted(b["process"]["arguments"] for b in execs) == sorted(f"bpfscope-burst-{i}" for i in range(n))
    assert len(exits) == n
    assert all(b["parent"]["pid"] == driver for b in execs)
    assert run.losses["total"] == 0


# --- policies: bad input ----------------------------------------------------------------------------


def bpfscope(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpfscope", *args], capture_output=True, text=True, timeout=60, cwd="/"
    )


BAD_POLICIES = {
    "syntax": ("metadata:\n  name: x\nspec: [unclosed\n", 4, "not valid YAML"),
    "unknown tracepoint": (
        "metadata: {name: x}\nspec:\n  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_nosuch\n",
        5,
        "unknown tracepoint syscalls:sys_enter_nosuch",
    ),
    "unknown field": (
        "metadata: {name: x}\nspec:\n  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_openat\n"
        "    args:\n    - name: nosuch\n",
        7,
        "has no field 'nosuch'",
    ),
    "impossible selector": (
        "metadata: {name: x}\nspec:\n  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_openat\n"
        "    args:\n    - name: flags\n    selectors:\n    - matchArgs:\n      - name: flags\n"
        "        operator: Prefix\n        values: [/etc]\n",
        11,
        "impossible selector",
    ),
    "block on a file hook": (
        "metadata: {name: x}\nspec:\n  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_openat\n"
        "    selectors:\n    - matchActions:\n      - action: Block\n",
        8,
        "impossible selector: Block applies to connects",
    ),
}


@pytest.mark.parametrize("size", ["12M", "64K", "lots"])
def test_a_bad_ring_size_is_one_line_and_exit_2(size: str) -> None:
    result = bpfscope("secure", "--ring-size", size)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpfscope: error: "), result.stderr
    assert ("power of two" in lines[0]) or ("not a size" in lines[0]), lines[0]


def test_the_rings_are_the_size_asked_for() -> None:
    """--ring-size sizes the lifecycle ring, and the hits' ring at half of it, in the kernel."""
    from bpfscope.domains.security.secure import SecureCollector, SecureConfig

    with SecureCollector(SecureConfig(ring_size=16 << 20, default_policy=False)) as collector:
        collector.open()
        assert collector.obj is not None
        sizes = {name: collector.obj.maps[name].max_entries for name in ("lifecycle", "hits")}
    assert sizes == {"lifecycle": 16 << 20, "hits": 8 << 20}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_a_bad_policy_is_one_line_with_its_line_and_exit_2(case: str, tmp_path: Path) -> None:
    text, line, reason = BAD_POLICIES[case]
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    for args in (["--check"], []):
        result = bpfscope("secure", "--policy", str(path), *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"bpfscope: error: {path}:{line}: "), lines[0]
        assert reason in lines[0], lines[0]


def test_a_bad_policy_changes_nothing_that_runs(tmp_path: Path) -> None:
    """A second instance given a bad policy fails before loading anything; the first goes on."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICIES["unknown field"][0])
    tool = start_secure([])
    try:
        assert bpfscope("secure", "--policy", str(bad)).returncode == 2
        subprocess.run(["/usr/bin/cat", "/etc/shadow"], stdout=subprocess.DEVNULL, check=True)
        time.sleep(0.3)
    except BaseException:
        tool.kill()
        raise
    run = stop_secure(tool)
    assert [b for b in run.of("process_tracepoint") if b["process"]["binary"] == "/usr/bin/cat"]


def test_default_policy_checks_and_prints() -> None:
    result = bpfscope("secure", "--check")
    assert result.returncode == 0 and result.stderr.startswith("policies OK: 5 policies"), result.stderr
    printed = bpfscope("secure", "--print-default-policy").stdout
    assert "kind: TracingPolicy" in printed and "name: sensitive-files" in printed


def test_a_hit_says_when_credentials_changed_since_the_exec(tmp_path: Path) -> None:
    """uid/euid as the process runs now (a setuid since its exec), beside those it was started with."""
    marker = tmp_path / "after-setuid"
    marker.write_text("x")
    marker.chmod(0o644)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: cilium.io/v1alpha1\nkind: TracingPolicy\nmetadata:\n  name: creds\nspec:\n"
        "  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_openat\n"
        "    args:\n    - name: filename\n"
        f"    selectors:\n    - matchArgs:\n      - name: filename\n        operator: Equal\n"
        f"        values: [{marker}]\n"
    )
    # Refused (the test's directory is root's), but asked: the hook is at the syscall's entry.
    code = (
        "import os, sys\nos.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        "try:\n    open(sys.argv[1])\nexcept PermissionError:\n    pass\n"
    )
    pids: list[int] = []

    def workload() -> None:
        proc = subprocess.Popen([sys.executable, "-c", code, str(marker)])
        assert proc.wait(timeout=30) == 0
        pids.append(proc.pid)

    run = trace(["--no-default-policy", "--policy", str(policy)], workload)
    (hit,) = run.of("process_tracepoint", pid=pids[0])
    assert hit["process"]["uid"] == 0
    assert hit["process_credentials"] == {"uid": 65534, "euid": 65534, "gid": 65534, "egid": 65534}


def _open_policy(tmp_path: Path, marker: Path) -> Path:
    """A policy reporting every open of ``marker``."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: cilium.io/v1alpha1\nkind: TracingPolicy\nmetadata:\n  name: opens\nspec:\n"
        "  tracepoints:\n  - subsystem: syscalls\n    event: sys_enter_openat\n"
        "    args:\n    - name: filename\n"
        f"    selectors:\n    - matchArgs:\n      - name: filename\n        operator: Equal\n"
        f"        values: [{marker}]\n"
    )
    return policy


def _forks_then_opens(tmp_path: Path, code: str) -> tuple[SecureRun, list[int], Path]:
    """``code`` run by the interpreter (argv: the watched file, a file for its pids), traced until the
    file of pids is written; the run, the script's pid, and that file."""
    marker = tmp_path / "watched"
    marker.write_text("x")
    pids = tmp_path / "pids"
    script: list[int] = []

    def workload() -> None:
        proc = subprocess.Popen([sys.executable, "-c", code, str(marker), str(pids)])
        assert proc.wait(timeout=30) == 0
        script.append(proc.pid)
        deadline = time.monotonic() + 30
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline, "the forked process did not open the file"
            time.sleep(0.05)

    run = trace(["--no-default-policy", "--policy", str(_open_policy(tmp_path, marker))], workload)
    return run, script, pids


def test_a_forked_process_whose_parents_exited_keeps_its_lineage(tmp_path: Path) -> None:
    """A daemon's double fork: the grandchild, never executed, opens a file a policy watches after its
    parent and grandparent have exited. The kernel sends a clone's record only when something names it
    (here the hit, long after the forks): the hit still has the process and both of its parents as
    they were, each a clone of the script's interpreter."""
    # The script (executed) forks the first child and exits at once; that child forks the daemon and
    # exits; the daemon waits for both to be gone (reparented), then opens the file.
    code = (
        "import os, sys, time\n"
        "if os.fork():\n    os._exit(0)\n"
        "first = os.getpid()\n"
        "if os.fork():\n    os._exit(0)\n"
        "while os.getppid() == first:\n    time.sleep(0.01)\n"
        "time.sleep(0.2)\n"
        "open(sys.argv[2], 'w').write(f'{first} {os.getpid()}')\n"
        "open(sys.argv[1]).close()\n"
    )
    run, script, pids = _forks_then_opens(tmp_path, code)
    first, daemon = map(int, pids.read_text().split())
    (hit,) = run.of("process_tracepoint", pid=daemon)
    interpreter = os.path.realpath(sys.executable)
    assert hit["process"]["flags"] == "clone"
    assert hit["process"]["binary"] == interpreter
    assert hit["parent"]["pid"] == first and hit["parent"]["flags"] == "clone"
    assert hit["parent"]["binary"] == interpreter
    assert hit["process"]["parent_exec_id"] == hit["parent"]["exec_id"]
    (grandparent,) = hit["ancestors"][:1]
    assert grandparent["pid"] == script[0] and "execve" in grandparent["flags"]
    assert grandparent["binary"] == interpreter
    assert hit["parent"]["parent_exec_id"] == grandparent["exec_id"]
    for pid in (script[0], first):  # the exits of both, with their processes
        (exit_event,) = run.of("process_exit", pid=pid)
        assert exit_event["process"]["binary"] == interpreter


def test_a_forked_process_whose_parent_executed_keeps_its_lineage(tmp_path: Path) -> None:
    """A child forks, its own child (never executed) lives on, and the child executes another program:
    the grandchild's hit names its parent as it was when it forked (the interpreter, a clone), not the
    program it became."""
    code = (
        "import os, sys, time\n"
        "r, w = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    if os.fork() == 0:\n"
        "        os.read(r, 1)\n"  # until the child has executed sleep
        "        open(sys.argv[2], 'w').write(f'{os.getppid()} {os.getpid()}')\n"
        "        open(sys.argv[1]).close()\n"
        "        os._exit(0)\n"
        "    os.execv('/bin/sleep', ['sleep', '1'])\n"
        "time.sleep(0.3)\n"
        "os.write(w, b'x')\n"
        "os.waitpid(child, 0)\n"
    )
    run, script, pids = _forks_then_opens(tmp_path, code)
    child, grandchild = map(int, pids.read_text().split())
    (hit,) = run.of("process_tracepoint", pid=grandchild)
    interpreter = os.path.realpath(sys.executable)
    assert hit["process"]["binary"] == interpreter and hit["process"]["flags"] == "clone"
    assert hit["parent"]["pid"] == child and hit["parent"]["binary"] == interpreter
    assert hit["parent"]["flags"] == "clone"
    (sleep_exec,) = run.of("process_exec", pid=child)
    assert sleep_exec["process"]["binary"].endswith("/sleep")
    assert sleep_exec["parent"]["pid"] == script[0]
