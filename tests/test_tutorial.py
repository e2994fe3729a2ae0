"""experiments/ebpf-tutorial: the Kubernetes manifest against the Kubernetes schema (offline), the custom
tool's numbers against a workload whose reads are known exactly, and the walkthrough script end to end."""

from __future__ import annotations

import copy
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kubernetes_validate import utils as k8s

from bpfscope.runtime.hist import Histogram

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "experiments" / "ebpf-tutorial"
MANIFEST = TUTORIAL / "daemonset.yaml"
CUSTOM_TOOL = TUTORIAL / "custom_tool.py"
RUN_SH = TUTORIAL / "run.sh"

# Kubernetes versions whose schemas kubernetes-validate ships: an older one still in use and the newest.
K8S_VERSIONS = ("1.30", "1.37")


# --- (a) the DaemonSet manifest ---------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any attempt to resolve a name or open a connection fails the test (the schemas must be local)."""
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args!r}")
            raise OSError(f"network access attempted during validation: {what}")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    yield attempts
    assert attempts == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(version: str, no_network: list[str]) -> None:
    docs = _documents()
    assert sorted(d["kind"] for d in docs) == ["DaemonSet", "Namespace", "ServiceAccount"]
    for doc in docs:
        # Strict: a field the schema does not know (a typo) is an error, not silently ignored.
        assert k8s.validate(doc, version, strict=True) == version


def test_validation_needs_no_network() -> None:
    """The command-line validator, in a network namespace with no interface up: nothing to download from."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is missing")
    validator = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSIONS[-1]]
    result = subprocess.run(
        ["unshare", "--net", *validator, str(MANIFEST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3, result.stdout


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        target: Any = pod
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _misspell_host_pid(pod: dict[str, Any]) -> None:
    pod["hostPid"] = pod.pop("hostPID")


def _drop_volume_path(pod: dict[str, Any]) -> None:
    del pod["volumes"][0]["hostPath"]["path"]


BROKEN = {
    "hostPID is a string": (_set(("hostPID",), "yes"), "'yes' is not of type 'boolean'"),
    "hostPID misspelled": (_misspell_host_pid, "'hostPid' was unexpected"),
    "privileged is a string": (
        _set(("containers", 0, "securityContext", "privileged"), "true"),
        "'true' is not of type 'boolean'",
    ),
    "hostPath without a path": (_drop_volume_path, "'path' is a required property"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_manifest_fails_validation(name: str, no_network: list[str]) -> None:
    change, message = BROKEN[name]
    docs = _documents()
    daemonset = copy.deepcopy(_by_kind(docs, "DaemonSet"))
    change(daemonset["spec"]["template"]["spec"])
    with pytest.raises(k8s.ValidationError) as failure:
        k8s.validate(daemonset, K8S_VERSIONS[-1], strict=True)
    assert message in failure.value.message


def test_manifest_grants_the_host_access_bpfscope_needs() -> None:
    docs = _documents()
    namespace = _by_kind(docs, "Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace", namespace) == namespace for d in docs)
    daemonset = _by_kind(docs, "DaemonSet")
    pod = _pod(docs)
    assert pod["serviceAccountName"] == _by_kind(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]  # every node, whatever its taints
    assert (
        daemonset["spec"]["selector"]["matchLabels"].items()
        <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    )
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert "bpfscope doctor" in " ".join(container["args"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()

    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # Every mount has its volume, and each host directory is mounted where it is on the host.
    for mount in mounts.values():
        assert volumes[mount["name"]] == mount["mountPath"]
    assert {"/sys/kernel/tracing", "/sys/fs/bpf", "/sys/kernel/btf", "/lib/modules", "/sys/fs/cgroup"} <= (
        mounts.keys()
    )
    for read_only in ("/sys/kernel/btf", "/lib/modules", "/sys/fs/cgroup"):
        assert mounts[read_only].get("readOnly") is True
    for writable in ("/sys/kernel/tracing", "/sys/fs/bpf"):
        assert not mounts[writable].get("readOnly", False)


# --- (b) the custom tool -----------------------------------------------------------------------------

READ_WORKLOAD = """
import os, sys
path, directory, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
os.dup2(os.open(path, os.O_RDONLY), 100)
for n in sizes:
    assert len(os.read(100, n)) == n
assert os.read(100, 65536) == b""  # end of file: a read that returns 0
os.dup2(os.open(directory, os.O_RDONLY | os.O_DIRECTORY), 100)
try:
    os.read(100, 10)  # a failed read: EISDIR
except IsADirectoryError:
    pass
else:
    raise SystemExit("reading a directory did not fail")
"""


def _records(out: str) -> list[dict[str, Any]]:
    """The custom tool's rows; its JSON ends with its losses, as every tool's does."""
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert records[-1]["record"] == "losses", records[-1]
    return [r for r in records if r["record"] == "custom_tool.reads"]


def test_custom_tool_counts_and_histograms_reads_exactly(tmp_path: Path) -> None:
    """A command that reads a file in known sizes on fd 100: counts, bytes, EOF, errors and the size
    histogram must be exact, and the percentiles what the histogram of the known sizes gives."""
    sizes = [int(s) for s in np.random.default_rng(11).lognormal(8, 1.6, 300).clip(1, 300_000)]
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(sum(sizes)))
    workload = [sys.executable, "-c", READ_WORKLOAD, str(data), str(tmp_path), ",".join(map(str, sizes))]
    result = subprocess.run(
        [sys.executable, str(CUSTOM_TOOL), "--json", "--fd", "100", "--", *workload],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exited with" not in result.stderr, result.stderr  # the workload's own checks passed
    (row,) = _records(result.stdout)
    returned = [*sizes, 0]  # every successful read's size, the EOF read's 0 included
    assert row["comm"] == Path(sys.executable).name[:15]
    assert row["reads"] == len(sizes) + 2
    assert row["bytes"] == sum(sizes)
    assert row["eof"] == 1
    assert row["errors"] == 1
    assert (row["min_size"], row["max_size"]) == (0, max(sizes))

    expected = Histogram.from_values(returned, "loglin")
    assert row["size_hist"]["slots"] == expected.to_dict()["slots"]
    assert row["size_hist"]["total"] == len(returned)
    for name, value in expected.percentiles((50, 99)).items():
        assert value is not None
        assert row["size"][name] == min(max(value, 0), max(sizes))
    # The estimate stays within the slot (1/16 wide) of the exact percentile.
    exact_p50 = float(np.percentile(returned, 50, method="inverted_cdf"))
    assert abs(row["size"]["p50"] - exact_p50) <= exact_p50 / 16 + 1

    # Every read, failed ones included, was timed; latencies are positive and ordered.
    assert row["latency_count"] == row["reads"]
    assert 0 < row["latency_us"]["p50"] <= row["latency_us"]["p99"] < 1_000_000


def _wait_line(stream: Any, timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"no {what} within {timeout} s")
    return stream.readline()


def test_custom_tool_on_a_running_process_skips_the_read_in_flight(tmp_path: Path) -> None:
    """-p PID on a process blocked in read(0) when the tool attaches: that read's entry was never seen,
    so it is not counted; what the process reads afterwards is, exactly, with no fd filter."""
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(50 * 4096 + 100))
    work = (
        "import os, sys\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # blocked in read(0) while the tool attaches
        f"fd = os.open({str(data)!r}, os.O_RDONLY)\n"
        "sizes = [len(os.read(fd, 4096)) for _ in range(52)]\n"
        "print(sizes[-3:], flush=True)\n"
        "sys.stdin.readline()\n"  # blocked again until the end: entered, never returned while traced
    )
    child = subprocess.Popen(
        [sys.executable, "-c", work], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    # Python's start-up reads its modules: only once they are done does the tool attach.
    assert _wait_line(child.stdout, 60, "start of the workload").strip() == "ready"
    tool = subprocess.Popen(
        [sys.executable, str(CUSTOM_TOOL), "-p", str(child.pid), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tool.stderr is not None
    try:
        attached = _wait_line(tool.stderr, 60, "sign that the programs are attached")
        assert attached.startswith("Tracing"), attached + tool.stderr.read()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert _wait_line(child.stdout, 60, "end of the workload").strip() == "[4096, 100, 0]"
        time.sleep(0.1)
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=60)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0, err
    (row,) = _records(out)
    assert row["pid"] == child.pid
    assert (row["reads"], row["bytes"], row["eof"], row["errors"]) == (52, 50 * 4096 + 100, 1, 0)
    assert (
        row["size_hist"]["slots"]
        == Histogram.from_values([4096] * 50 + [100, 0], "loglin").to_dict()["slots"]
    )
    assert (row["size"]["p50"], row["min_size"], row["max_size"]) == (4096, 0, 4096)


# --- (c) the walkthrough -----------------------------------------------------------------------------


def test_run_script_completes() -> None:
    """One command runs every step to the end, within a minute, and leaves nothing behind.

    The checks are on what each step prints, not on exact counts: those depend on what else the machine
    runs, and the tools' own tests (and the custom tool's above) check the numbers exactly.
    """
    start = time.monotonic()
    result = subprocess.run(["bash", str(RUN_SH)], capture_output=True, text=True, timeout=300, cwd="/")
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert elapsed < 60, f"the walkthrough took {elapsed:.0f} s"
    for step in range(1, 6):
        assert re.search(rf"^\S*==== {step}\. ", out, re.MULTILINE), f"step {step} heading missing"
    # run.sh exits non-zero when a tool does not start tracing or does not end cleanly on Ctrl-C, so the
    # commands' lines and each tool's "Tracing" line are what is left to check here.
    expected = [
        "missing here:",  # doctor's summary of what this kernel lacks
        "$ bpfscope syscount -L -r 8",
        "Tracing syscalls",
        "$ bpfscope trace block:block_rq_issue",
        "$ bpfscope trace block:block_rq_complete --hist nr_sector",
        "$ bpfscope trace syscalls:sys_enter_openat --filter 'comm == \"cat\"' --print pid,comm,filename",
        "$ bpfscope trace sched:sched_process_exec",
        "$ bpfscope execsnoop",
        "Tracing exec",
        "$ python custom_tool.py -- dd",
        "READS        BYTES",  # the custom tool's table
        "The tutorial ran in",
    ]
    missing = [text for text in expected if text not in out]
    assert not missing, f"{missing} not in:\n{out}"
    # Nothing left behind: the temporary directory and the workloads' cgroup are gone.
    work = re.search(r"temporary files in (\S+)", out)
    assert work and not Path(work.group(1)).exists()
    cgroup = re.search(r"Workloads run in the cgroup (\S+)", out)
    if cgroup:
        assert not Path(cgroup.group(1)).exists()


def test_run_script_asks_for_setup_first(tmp_path: Path) -> None:
    """Outside a set-up checkout (no .venv), the script says what to run instead of failing obscurely."""
    copy_dir = tmp_path / "experiments" / "ebpf-tutorial"
    copy_dir.mkdir(parents=True)
    shutil.copy(RUN_SH, copy_dir / "run.sh")
    result = subprocess.run(["bash", str(copy_dir / "run.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "setup.sh first" in result.stderr
