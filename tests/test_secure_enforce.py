"""Enforcement, and what it does and does not undo, on the real kernel:

- Block (cgroup connect4/connect6/sendmsg4): refused before anything leaves: connect() and sendto() fail
  with EPERM and the server sees nothing.
- Sigkill at sched_process_exec: the new program dies before its first instruction (it leaves no file).
- Sigkill at a syscall's entry: killed after. The syscall runs to its end first: openat(O_TRUNC) has
  truncated the file; connect() has sent its SYN (the server's accept queue gets the connection).
- Signal: delivered on the way back to user space, the syscall done.
- NoPost kills silently; a rate limit posts once per window and counts the rest.
- TOCTOU: a check on a syscall's string argument (user memory) misses a path it does not spell (a link);
  the kernel-resident fd path of sys_exit_openat names the file all the same.

The policies are scoped to what only these tests do (this test's descendants, addresses of 127.66/16 and
127.67/16, files below the test's directory): other processes on the machine are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_secure import SecureRun, trace

BLOCKED_NET = "127.66.0.0/16"
KILLED_NET = "127.67.0.0/16"


def policy(tmp: Path, v6_port: int) -> str:
    me = os.getpid()
    return textwrap.dedent(
        f"""\
        apiVersion: cilium.io/v1alpha1
        kind: TracingPolicy
        metadata:
          name: enforce-exec
        spec:
          tracepoints:
          - subsystem: sched
            event: sched_process_exec
            selectors:
            - matchBinaries:
              - operator: Prefix
                values: [{tmp}/kill-at-exec/]
              matchActions:
              - action: Sigkill
        ---
        apiVersion: cilium.io/v1alpha1
        kind: TracingPolicy
        metadata:
          name: enforce-files
        spec:
          tracepoints:
          - subsystem: syscalls
            event: sys_enter_openat
            args:
            - name: filename
            - name: flags
            selectors:
            - matchArgs:
              - name: filename
                operator: Prefix
                values: [{tmp}/victims/]
              - name: flags
                operator: Mask
                values: [0x200]
              matchActions:
              - action: Sigkill
            - matchArgs:
              - name: filename
                operator: Prefix
                values: [{tmp}/signal/]
              matchActions:
              - action: Signal
                argSig: 10
            - matchArgs:
              - name: filename
                operator: Prefix
                values: [{tmp}/quiet/]
              matchActions:
              - action: Sigkill
              - action: NoPost
            - matchArgs:
              - name: filename
                operator: Prefix
                values: [{tmp}/limited/]
              matchActions:
              - action: Post
                rateLimit: 1m
            - matchArgs:
              - name: filename
                operator: Equal
                values: [/etc/shadow]
              matchPIDs:
              - operator: In
                followForks: true
                values: [{me}]
              matchActions:
              - action: Sigkill
          - subsystem: syscalls
            event: sys_exit_openat
            args:
            - name: ret
              type: fd
            selectors:
            - matchArgs:
              - name: ret
                operator: Equal
                values: [/etc/shadow]
              matchPIDs:
              - operator: In
                followForks: true
                values: [{me}]
        ---
        apiVersion: cilium.io/v1alpha1
        kind: TracingPolicy
        metadata:
          name: enforce-network
        spec:
          tracepoints:
          - subsystem: syscalls
            event: sys_enter_connect
            args:
            - name: uservaddr
              type: sockaddr
            selectors:
            - matchArgs:
              - name: uservaddr
                operator: DAddr
                values: [{BLOCKED_NET}]
              matchActions:
              - action: Block
            - matchArgs:
              - name: uservaddr
                operator: DAddr
                values: ["::1/128"]
              - name: uservaddr
                operator: DPort
                values: [{v6_port}]
              matchActions:
              - action: Block
            - matchArgs:
              - name: uservaddr
                operator: DAddr
                values: [{KILLED_NET}]
              matchActions:
              - action: Sigkill
          - subsystem: syscalls
            event: sys_enter_sendto
            args:
            - name: addr
              type: sockaddr
            selectors:
            - matchArgs:
              - name: addr
                operator: DAddr
                values: [{BLOCKED_NET}]
              matchActions:
              - action: Block
        """
    )


@dataclass
class Attempt:
    pid: int
    returncode: int
    stdout: str
    extra: dict[str, Any] = field(default_factory=dict)


def attempt(code: str, *args: str) -> Attempt:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=60
    )
    # subprocess.run does not keep the pid: the script prints it first.
    lines = proc.stdout.splitlines()
    pid = int(lines[0]) if lines and lines[0].isdigit() else -1
    return Attempt(pid, proc.returncode, "\n".join(lines[1:]))


PRELUDE = "import os, socket, sys, signal, time\nprint(os.getpid(), flush=True)\n"


def py(code: str, *args: str) -> Attempt:
    return attempt(PRELUDE + textwrap.dedent(code), *args)


def shut(server: socket.socket) -> None:
    """Shut down first: the thread blocked in accept() would otherwise keep the port bound."""
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)
    server.close()


def tcp_server(host: str, family: int = socket.AF_INET) -> tuple[socket.socket, list[str]]:
    """A listener that records every connection it accepts."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(8)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                peer, address = server.accept()
            except OSError:
                return
            accepted.append(str(address))
            peer.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def udp_server(host: str) -> tuple[socket.socket, list[bytes]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((host, 0))
    received: list[bytes] = []

    def receive() -> None:
        while True:
            try:
                received.append(server.recv(100))
            except OSError:
                return

    threading.Thread(target=receive, daemon=True).start()
    return server, received


def free_port(host: str, family: int) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureRun, dict[str, Attempt]]]:
    tmp = tmp_path_factory.mktemp("enforce")
    for sub in ("kill-at-exec", "victims", "signal", "quiet", "limited"):
        (tmp / sub).mkdir()
    v6_port = free_port("::1", socket.AF_INET6)
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(policy(tmp, v6_port))
    results: dict[str, Attempt] = {}
    # Every file the attempts open is made before the tool runs: this test opening them would be
    # matched (and killed) too.
    victim = tmp / "victims" / "data"
    victim.write_text("precious\n")
    for sub in ("signal", "quiet", "limited"):
        (tmp / sub / "file").write_text("x")
    touch = tmp / "kill-at-exec" / "touch"
    shutil.copy("/usr/bin/touch", touch)
    link = tmp / "not-shadow"
    link.symlink_to("/etc/shadow")

    def workload() -> None:
        # Killed before its first instruction: touch never creates its file.
        proof = tmp / "exec-proof"
        proc = subprocess.Popen([str(touch), str(proof)])
        proc.wait(timeout=30)
        results["exec"] = Attempt(proc.pid, proc.returncode, "", {"proof": proof.exists()})

        # Killed after: the file is truncated all the same, the next statement never runs.
        results["truncate"] = py(
            """
            f = open(sys.argv[1], "w")
            print("still running", flush=True)
            """,
            str(victim),
        )
        results["truncate"].extra["size"] = victim.stat().st_size

        # Signal: the open completes, then the handler runs.
        results["signal"] = py(
            """
            got = []
            signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
            f = open(sys.argv[1])
            print("opened", flush=True)
            print("signals", got, flush=True)
            """,
            str(tmp / "signal" / "file"),
        )

        results["quiet"] = py("open(sys.argv[1]); print('still running')", str(tmp / "quiet" / "file"))

        results["limited"] = py(
            "for _ in range(10):\n    open(sys.argv[1]).close()\nprint('done')", str(tmp / "limited" / "file")
        )

        # Block: refused before anything is sent.
        server, accepted = tcp_server("127.66.0.1")
        results["block4"] = py(
            """
            try:
                socket.create_connection(("127.66.0.1", int(sys.argv[1])), timeout=5)
                print("connected")
            except PermissionError:
                print("EPERM")
            """,
            str(server.getsockname()[1]),
        )
        results["block4"].extra["accepted"] = list(accepted)
        shut(server)

        server6, accepted6 = tcp_server_on("::1", v6_port)
        results["block6"] = py(
            """
            try:
                socket.create_connection(("::1", int(sys.argv[1])), timeout=5)
                print("connected")
            except PermissionError:
                print("EPERM")
            """,
            str(v6_port),
        )
        results["block6"].extra["accepted"] = list(accepted6)
        # An IPv6 socket to the IPv4-mapped address of a blocked one: refused all the same.
        mapped, mapped_accepted = tcp_server("127.66.0.3")
        results["block_mapped"] = py(
            """
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(("::ffff:127.66.0.3", int(sys.argv[1])))
                print("connected")
            except PermissionError:
                print("EPERM")
            """,
            str(mapped.getsockname()[1]),
        )
        results["block_mapped"].extra["accepted"] = list(mapped_accepted)
        shut(mapped)
        # Another port of ::1 is not blocked.
        other, _ = tcp_server("::1", socket.AF_INET6)
        results["v6_other_port"] = py(
            "socket.create_connection(('::1', int(sys.argv[1])), timeout=5); print('connected')",
            str(other.getsockname()[1]),
        )
        shut(server6)
        shut(other)

        udp, received = udp_server("127.66.0.2")
        results["sendto"] = py(
            """
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(b"exfiltrated", ("127.66.0.2", int(sys.argv[1])))
                print("sent")
            except PermissionError:
                print("EPERM")
            """,
            str(udp.getsockname()[1]),
        )
        threading.Event().wait(0.2)
        results["sendto"].extra["received"] = list(received)
        shut(udp)

        # Sigkill at connect's entry: the SYN has left, the kernel completes the handshake.
        server, accepted = tcp_server("127.67.0.1")
        results["kill_connect"] = py(
            """
            socket.create_connection(("127.67.0.1", int(sys.argv[1])), timeout=5)
            print("connected", flush=True)
            """,
            str(server.getsockname()[1]),
        )
        for _ in range(50):
            if accepted:
                break
            threading.Event().wait(0.1)
        results["kill_connect"].extra["accepted"] = list(accepted)
        shut(server)

        # TOCTOU: the user-memory name is checked; a link spells another name.
        results["shadow_by_name"] = py("open('/etc/shadow').read(); print('read')")
        results["shadow_by_link"] = py("open(sys.argv[1]).read(); print('read')", str(link))

    run = trace(["--no-default-policy", "--no-exec-events", "--policy", str(policy_file)], workload)
    yield run, results


def tcp_server_on(host: str, port: int) -> tuple[socket.socket, list[str]]:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)
    accepted: list[str] = []

    def accept() -> None:
        while True:
            try:
                peer, address = server.accept()
            except OSError:
                return
            accepted.append(str(address))
            peer.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def hits(run: SecureRun, pid: int) -> list[dict[str, Any]]:
    return run.of("process_tracepoint", pid=pid)


KILLED = -signal.SIGKILL


def test_sigkill_at_exec_stops_the_program_before_its_first_instruction(enforced: Any) -> None:
    run, results = enforced
    r = results["exec"]
    assert r.returncode == KILLED
    assert r.extra["proof"] is False
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_SIGKILL" and hit["signal"] == "SIGKILL"
    assert hit["event"] == "sched_process_exec" and hit["process"]["binary"].endswith("/kill-at-exec/touch")


def test_sigkill_at_openat_entry_kills_after_the_truncation(enforced: Any) -> None:
    run, results = enforced
    r = results["truncate"]
    assert r.returncode == KILLED
    assert "still running" not in r.stdout
    assert r.extra["size"] == 0  # the syscall ran: O_TRUNC truncated before the signal was delivered
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_SIGKILL" and hit["policy_name"] == "enforce-files"
    assert hit["args"][0]["string_arg"].endswith("/victims/data")


def test_signal_arrives_after_the_syscall(enforced: Any) -> None:
    run, results = enforced
    r = results["signal"]
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["opened", "signals [10]"]
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_SIGNAL" and hit["signal"] == "SIGUSR1"


def test_nopost_kills_without_an_event(enforced: Any) -> None:
    run, results = enforced
    r = results["quiet"]
    assert r.returncode == KILLED and "still running" not in r.stdout
    assert hits(run, r.pid) == []


def test_rate_limit_posts_once_and_counts_the_rest(enforced: Any) -> None:
    run, results = enforced
    r = results["limited"]
    assert r.returncode == 0 and r.stdout == "done"
    assert len(hits(run, r.pid)) == 1
    match = re.search(r"(\d+) hits rate-limited", run.stderr)
    assert match and int(match.group(1)) >= 9, run.stderr


@pytest.mark.parametrize("case", ["block4", "block6", "block_mapped"])
def test_block_refuses_a_connect_before_any_packet(case: str, enforced: Any) -> None:
    run, results = enforced
    r = results[case]
    assert r.returncode == 0 and r.stdout == "EPERM"
    assert r.extra["accepted"] == []
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_BLOCK" and hit["policy_name"] == "enforce-network"
    destination = hit["args"][0]["sockaddr_arg"]
    assert destination["addr"] in ("127.66.0.1", "::1", "::ffff:127.66.0.3")


def test_block_is_as_narrow_as_its_selector(enforced: Any) -> None:
    _, results = enforced
    assert results["v6_other_port"].stdout == "connected"


def test_block_refuses_a_datagram(enforced: Any) -> None:
    run, results = enforced
    r = results["sendto"]
    assert r.stdout == "EPERM" and r.extra["received"] == []
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_BLOCK" and hit["args"][0]["sockaddr_arg"]["addr"] == "127.66.0.2"


def test_sigkill_at_connect_entry_kills_after_the_syn(enforced: Any) -> None:
    run, results = enforced
    r = results["kill_connect"]
    assert r.returncode == KILLED and "connected" not in r.stdout
    # The kernel completed the handshake for the dead client: the connection reached the server.
    assert len(r.extra["accepted"]) == 1
    (hit,) = hits(run, r.pid)
    assert hit["action"] == "KPROBE_ACTION_SIGKILL"


def test_toctou_user_memory_checks_miss_what_the_fd_path_sees(enforced: Any) -> None:
    run, results = enforced
    by_name, by_link = results["shadow_by_name"], results["shadow_by_link"]
    assert by_name.returncode == KILLED
    # The link's name is not /etc/shadow: the sys_enter check lets it through...
    assert by_link.returncode == 0 and by_link.stdout == "read"
    # ...and the kernel's fd table names the file it opened.
    (seen,) = hits(run, by_link.pid)
    assert seen["event"] == "sys_exit_openat" and seen["args"][0]["file_arg"]["path"] == "/etc/shadow"
