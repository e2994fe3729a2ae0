"""execsnoop against real processes: a burst of short-lived ones where every one must be found once, argv
bounds, failed execs, exits with their code and run time, and the filters (uid, name, pid subtree)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfscope.domains.process.execsnoop import ExecsnoopCollector, ExecsnoopConfig

NOBODY = 65534
TRUE = "/bin/true"
NOTE = "Tracing exec()"

# Spawns N short-lived /bin/true processes, each with its own marker argument, a few at a time, once
# told to go on stdin; then prints every pid with its marker, and the time the burst took.
BURST_DRIVER = r"""
import json, os, sys, time
n, marker, window = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sys.stdin.readline()
spawned, running = {}, 0
start = time.monotonic()
for i in range(n):
    if running >= window:
        os.waitpid(-1, 0)
        running -= 1
    pid = os.posix_spawn("/bin/true", ["/bin/true", f"{marker}-{i}"], {})
    spawned[pid] = f"{marker}-{i}"
    running += 1
while running:
    os.waitpid(-1, 0)
    running -= 1
print(json.dumps({"seconds": time.monotonic() - start, "spawned": spawned}), flush=True)
sys.stdin.readline()
"""


EXEC = "execsnoop.exec"
EXIT = "execsnoop.exit"


@dataclass
class Run:
    events: list[dict]  # exec and exit records, in the order printed
    losses: dict | None  # the losses record that ends the JSON stream
    stderr: str
    stdout: str

    @property
    def lost(self) -> int:
        match = re.search(r"(\d+) events lost", self.stderr)
        assert match, f"no summary with lost events in: {self.stderr!r}"
        return int(match.group(1))

    def execs(self, marker: str) -> list[dict]:
        """Exec events with an argument that starts with ``marker``."""
        return [
            e
            for e in self.events
            if e["record"] == EXEC and any(a.startswith(marker) for a in e["args"] or [])
        ]

    def exits(self, pid: int) -> list[dict]:
        return [e for e in self.events if e["record"] == EXIT and e["pid"] == pid]


def _wait_for_note(tool: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Read stderr until execsnoop says it is tracing (its programs are attached by then)."""
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
            return
    tool.kill()
    pytest.fail(f"execsnoop did not start tracing within {timeout}s: {seen!r}")


def trace(args: list[str], workload: Callable[[], None], as_json: bool = True) -> Run:
    """Run execsnoop with ``args`` around ``workload``, then stop it with SIGINT as a user would."""
    tool = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "execsnoop", *(["--json"] if as_json else []), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_note(tool)
        workload()
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=60)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()] if as_json else []
    losses = records.pop() if records else None
    if as_json:
        assert losses is not None and losses["record"] == "losses", records[-1:]
    return Run(records, losses, err, out)


def _marker() -> str:
    return f"bpfscope-test-{uuid.uuid4().hex[:12]}"


def _run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), check=False, timeout=30, **kwargs)  # type: ignore[call-overload]


def test_burst_of_short_processes_every_one_seen_once() -> None:
    n = 3000
    marker = _marker()
    driver = subprocess.Popen(
        [sys.executable, "-c", BURST_DRIVER, str(n), marker, "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert driver.stdin is not None and driver.stdout is not None
    result: dict = {}

    def burst() -> None:
        driver.stdin.write("go\n")
        driver.stdin.flush()
        ready, _, _ = select.select([driver.stdout], [], [], 60)
        assert ready, "the burst did not finish in 60 s"
        result.update(json.loads(driver.stdout.readline()))

    try:
        run = trace(["--exits", "--ppid", str(driver.pid)], burst)
    finally:
        driver.stdin.close()
        driver.wait(timeout=10)
    spawned = {int(pid): argv1 for pid, argv1 in result["spawned"].items()}
    assert len(spawned) == n
    print(f"\nburst: {n} processes in {result['seconds']:.2f}s ({n / result['seconds']:.0f}/s)")

    execs: dict[int, list[dict]] = {}
    exits: dict[int, list[dict]] = {}
    for e in run.events:
        (execs if e["record"] == EXEC else exits).setdefault(e["pid"], []).append(e)
    assert run.lost == 0
    assert run.losses is not None and run.losses["reasons"]["ring_full"] == 0
    assert set(execs) == set(spawned), "execs missed or extra"
    assert set(exits) == set(spawned), "exits missed or extra"
    for pid, argv1 in spawned.items():
        (e,) = execs[pid]
        assert e["args"] == [TRUE, argv1]
        assert e["filename"] == TRUE
        assert (e["ret"], e["errno"], e["args_truncated"]) == (0, None, False)
        assert e["ppid"] == driver.pid
        assert e["comm"] == "true"
        (x,) = exits[pid]
        assert (x["exit_code"], x["signal"]) == (0, None)
        assert x["ts"] >= e["ts"]
    assert f"{n} execs, {n} exits traced, 0 events lost" in run.stderr


def test_argv_bounds_are_marked() -> None:
    marker = _marker()
    many = [f"{marker}-many-{i}" for i in range(30)]
    exact = [f"{marker}-exact-{i}" for i in range(19)]
    # 10 arguments of 1000 bytes: more than the 4 KiB the kernel keeps.
    long = [f"{marker}-long-{i}-" + "x" * 1000 for i in range(10)]
    empty = [f"{marker}-empty", "", "after empty", ""]

    def workload() -> None:
        for args in (many, exact, long, empty):
            _run(TRUE, *args)

    run = trace(["--ppid", str(os.getpid())], workload)
    (e,) = run.execs(f"{marker}-many-")
    assert e["args"] == [TRUE, *many][:20]
    assert e["args_truncated"] is True
    (e,) = run.execs(f"{marker}-exact-")
    assert e["args"] == [TRUE, *exact]
    assert e["args_truncated"] is False
    (e,) = run.execs(f"{marker}-empty")
    assert e["args"] == [TRUE, *empty]
    assert e["args_truncated"] is False

    run = trace(["--ppid", str(os.getpid()), "--max-args", "100"], lambda: _run(TRUE, *long))
    (e,) = run.execs(f"{marker}-long-")
    assert e["args_truncated"] is True
    assert e["args"][:4] == [TRUE, *long[:3]]
    # Every byte the kernel kept is shown: the arguments and their separators fill the 4 KiB exactly.
    assert sum(len(a) + 1 for a in e["args"]) - 1 == 4096
    assert long[len(e["args"]) - 2].startswith(e["args"][-1])

    # People see the mark as "..." at the end of the line.
    run = trace(["--ppid", str(os.getpid())], lambda: _run(TRUE, *many), as_json=False)
    (line,) = [line for line in run.stdout.splitlines() if marker in line]
    assert line.endswith(f"{many[18]} ...")


def _spawn_missing(path: str, marker: str) -> None:
    # posix_spawn's child runs the execve, which fails with ENOENT; glibc reports it and reaps the child.
    with pytest.raises(FileNotFoundError):
        os.posix_spawn(path, [path, marker], {})


def test_failed_exec_shown_with_x_and_only_fails() -> None:
    marker = _marker()
    missing = f"/nonexistent/{marker}"

    def workload() -> None:
        _spawn_missing(missing, marker)
        _run(TRUE, marker)

    for args, expect_failure, expect_success in (
        (["-x"], True, True),
        ([], False, True),
        (["--only-fails"], True, False),
    ):
        run = trace(["--ppid", str(os.getpid()), *args], workload)
        failed = [e for e in run.execs(marker) if e["ret"] != 0]
        succeeded = [e for e in run.execs(marker) if e["ret"] == 0]
        assert len(succeeded) == int(expect_success), run.events
        if expect_failure:
            (e,) = failed
            assert (e["ret"], e["errno"], e["filename"]) == (-2, "ENOENT", missing)
            assert e["args"] == [missing, marker]
        else:
            assert failed == []

    run = trace(["--ppid", str(os.getpid()), "-x"], lambda: _spawn_missing(missing, marker), as_json=False)
    (line,) = [line for line in run.stdout.splitlines() if marker in line]
    assert re.search(rf"\sENOENT {re.escape(missing)} {marker}$", line), line


def test_exits_with_code_signal_and_duration() -> None:
    marker = _marker()
    pids: dict[str, int] = {}

    def workload() -> None:
        # $0 is the marker, so the exec event names it.
        pids["code"] = subprocess.Popen(["sh", "-c", "sleep 0.3; exit 3", marker]).pid
        os.waitpid(pids["code"], 0)
        killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
        pids["killed"] = killed.pid
        killed.kill()
        killed.wait()
        # A thread other than the leader ends the process: still one exit, under the process id.
        threaded = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, threading, time\n"
                "threading.Thread(target=lambda: os._exit(5)).start()\ntime.sleep(30)",
                marker,
            ]
        )
        pids["threaded"] = threaded.pid
        threaded.wait(timeout=30)

    run = trace(["--exits", "--ppid", str(os.getpid())], workload)
    (x,) = run.exits(pids["code"])
    assert (x["exit_code"], x["signal"], x["core_dumped"]) == (3, None, False)
    assert 0.3 <= x["duration_s"] <= 1.5
    assert x["comm"] == "sh"
    (x,) = run.exits(pids["killed"])
    assert (x["exit_code"], x["signal"]) == (None, "SIGKILL")
    (x,) = run.exits(pids["threaded"])
    assert (x["exit_code"], x["signal"]) == (5, None)
    assert run.lost == 0


def test_uid_filter() -> None:
    marker = _marker()

    def workload() -> None:
        _run("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", TRUE, f"{marker}-nobody")
        _run(TRUE, f"{marker}-root")

    run = trace(["-u", str(NOBODY)], workload)
    (e,) = run.execs(f"{marker}-nobody")
    assert e["uid"] == NOBODY
    assert run.execs(f"{marker}-root") == []
    assert all(e["uid"] == NOBODY for e in run.events)


def _unique_link(directory: Path) -> Path:
    # The comm after exec is the file's name: a link to /bin/true gives a name no other process has.
    link = directory / f"zq{uuid.uuid4().hex[:8]}xy"
    link.symlink_to(TRUE)
    return link


# Every length of name makes the verifier walk the kernel's substring search differently.
@pytest.mark.parametrize(("start", "end"), [(0, 12), (2, 8), (5, 7), (11, 12)])
def test_name_filter_matches_part_of_the_new_comm(tmp_path: Path, start: int, end: int) -> None:
    marker = _marker()
    link = _unique_link(tmp_path)
    part = link.name[start:end]

    def workload() -> None:
        _run(str(link), marker)
        _run(TRUE, marker)

    run = trace(["-n", part], workload)
    (e,) = run.execs(marker)
    assert e["comm"] == link.name
    assert all(part in e["comm"] for e in run.events)


def test_every_name_length_loads() -> None:
    # The verifier explores the substring search once per name length, each a different program.
    for length in range(1, 16):
        config = ExecsnoopConfig(name="abcdefghijklmno"[:length], ppid=1, uid=0, exits=True)
        with ExecsnoopCollector(config) as collector:
            collector.open()


def test_every_filter_at_once(tmp_path: Path, cgroup: Path) -> None:
    marker = _marker()
    link = _unique_link(tmp_path)
    # The shell moves itself into the cgroup, then becomes the link by exec: one process that every
    # filter selects. The same command outside the cgroup must not be seen.
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$1"'

    def workload() -> None:
        _run("sh", "-c", script, str(link), f"{marker}-inside")
        _run(str(link), f"{marker}-outside")

    args = ["-x", "--exits", "-u", "0", "--ppid", str(os.getpid()), "-n", link.name[3:9]]
    run = trace([*args, "--cgroup", str(cgroup)], workload)
    (e,) = run.execs(f"{marker}-inside")
    assert e["comm"] == link.name
    assert [x["exit_code"] for x in run.exits(e["pid"])] == [0]
    assert run.execs(f"{marker}-outside") == []


def test_ppid_selects_the_subtree_only() -> None:
    marker = _marker()
    # The trailing `:` keep each shell from exec'ing its last command in place: real children and
    # grandchildren are forked.
    script = 'read go; /bin/true "$1-child"; sh -c "/bin/true $1-grandchild; :"; :'
    parent = subprocess.Popen(["sh", "-c", script, "sh", marker], stdin=subprocess.PIPE, text=True)
    assert parent.stdin is not None

    def workload() -> None:
        parent.stdin.write("go\n")
        parent.stdin.close()
        parent.wait(timeout=30)
        _run(TRUE, f"{marker}-outside")

    run = trace(["--ppid", str(parent.pid)], workload)
    assert len(run.execs(f"{marker}-child")) == 1
    assert len(run.execs(f"{marker}-grandchild")) == 1
    assert run.execs(f"{marker}-outside") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "abc"], "Invalid value for '-u'"),
        (["--ppid", "-5"], "Invalid value for '--ppid'"),
        (["-p", "-1"], "Invalid value for '-p'"),
        (["--max-args", "0"], "Invalid value for '--max-args'"),
        (["--ppid", "999999999"], "bpfscope: error: no process with pid 999999999"),
        (["-n", "a-name-too-long-for-comm"], "bpfscope: error: --name 'a-name-too-long-for-comm' is longer"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bpfscope", "execsnoop", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]
    if message.startswith("bpfscope: error:"):
        assert result.stderr.count("\n") == 1, result.stderr
