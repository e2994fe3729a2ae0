"""bpfscope trace against known workloads: exact counts, sums and percentiles, kernel-side filters,
strings of every kind, and one-line errors for bad queries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RunCli, trace_workload

from bpfscope.domains.trace.trace import TraceCollector, TraceConfig
from bpfscope.runtime.session import MemorySink, Session
from bpfscope.sources.syscalls import syscall_number

GETPPID = syscall_number("getppid")
GETPID = syscall_number("getpid")


def _records(out: str) -> list[dict]:
    """A run's records of its query; the losses record that ends a run is checked and left out."""
    *records, losses = [json.loads(line) for line in out.splitlines()]
    assert losses["record"] == "losses" and losses["collector"] == "trace", losses
    return records


def test_count_by_key_is_exact() -> None:
    work = "for _ in range(1000): os.getppid()\nfor _ in range(500): os.getpid()\n"
    out, err = trace_workload(
        ["trace", "raw_syscalls:sys_enter", "--count-by", "pid,id", "-p", "{pid}", "--json"], work
    )
    rows = {r["id"]: r for r in _records(out)}
    assert {r["record"] for r in rows.values()} == {"trace.aggregate"}
    assert rows[GETPPID]["count"] == 1000
    assert rows[GETPID]["count"] == 500
    assert "trace: 0 events lost (ring buffer full), 0 events missed (kernel skipped the program)" in err


def test_boolean_filters_run_in_the_kernel() -> None:
    work = (
        "for _ in range(1000): os.getppid()\nfor _ in range(500): os.getpid()\n"
        "for _ in range(20): os.getuid()\n"
    )
    either = f"id == {GETPPID} or id == {GETPID}"
    out, _ = trace_workload(
        ["trace", "raw_syscalls:sys_enter", "-p", "{pid}", "--filter", either, "--json"], work
    )
    assert [r["count"] for r in _records(out)] == [1500]
    neither = f"not (id == {GETPPID} or id == {GETPID}) and id < 1000"
    out, _ = trace_workload(
        ["trace", "raw_syscalls:sys_enter", "-p", "{pid}", "--filter", neither, "--count-by", "id", "--json"],
        work,
    )
    ids = {r["id"] for r in _records(out)}
    assert ids and GETPPID not in ids and GETPID not in ids
    assert syscall_number("getuid") in ids


SIZES = "sizes = [int(x) for x in np.random.default_rng(3).lognormal(7, 1.2, 2000).clip(1, 60000)]\n"


def test_sum_min_max_and_percentiles_of_a_field() -> None:
    sizes = [int(x) for x in np.random.default_rng(3).lognormal(7, 1.2, 2000).clip(1, 60000)]
    work = (
        "import numpy as np\n"
        + SIZES
        + "os.dup2(os.open('/dev/null', os.O_WRONLY), 100)\nbuf = b'x' * 60000\n"
        "for n in sizes: os.write(100, buf[:n])\n"
    )
    out, _ = trace_workload(
        [
            "trace",
            "syscalls:sys_enter_write",
            "-p",
            "{pid}",
            "--hist",
            "count",
            "--filter",
            "fd == 100",
            "--json",
        ],
        work,
    )
    (row,) = _records(out)
    assert row["count"] == len(sizes)
    assert row["sum"] == sum(sizes)
    assert row["min"] == min(sizes) and row["max"] == max(sizes)
    truth = np.percentile(np.array(sizes, dtype=float), [50, 99], method="inverted_cdf")
    got = row["hist"]["percentiles"]
    for q, expected in zip(("p50", "p99"), truth, strict=True):
        assert abs(got[q] - expected) <= expected / 16 + 1, (q, got[q], expected)


def test_print_user_string_filtered_in_kernel(tmp_path: Path) -> None:
    marker = tmp_path / "bpfscope-marker"
    work = f"for _ in range(3):\n    try: os.open({str(marker)!r}, os.O_RDONLY)\n    except OSError: pass\n"
    out, err = trace_workload(
        [
            "trace",
            "syscalls:sys_enter_openat",
            "--filter",
            f'filename == "{marker}"',
            "--print",
            "pid,comm,filename",
            "--json",
        ],
        work,
    )
    events = _records(out)
    assert len(events) == 3
    assert {e["record"] for e in events} == {"trace.event"}
    assert {e["filename"] for e in events} == {str(marker)}
    assert "trace: 3 events traced, 0 events lost (ring buffer full), 0 events missed" in err


def test_print_dataloc_string_and_errno_names(run_cli: RunCli) -> None:
    work = (
        "import subprocess\nsubprocess.run(['/bin/true', 'x'])\n"
        "try: os.open('/nonexistent/bpfscope', 0)\nexcept OSError: pass\n"
    )
    out, _ = trace_workload(["trace", "sched:sched_process_exec", "--print", "pid,filename", "--json"], work)
    assert "/bin/true" in {e["filename"] for e in _records(out)}
    out, _ = trace_workload(["trace", "syscalls:sys_exit_openat", "-p", "{pid}", "--print", "ret"], work)
    assert "-2 (ENOENT)" in out


def test_intervals_report_what_changed() -> None:
    work = (
        "for _ in range(300): os.getppid()\ntime.sleep(1.3)\n"
        "for _ in range(200): os.getppid()\ntime.sleep(1.2)\n"
    )
    out, _ = trace_workload(
        ["trace", "raw_syscalls:sys_enter", "-p", "{pid}", "--filter", f"id == {GETPPID}", "--json", "1"],
        work,
    )
    counts = [r["count"] for r in _records(out)]
    assert sum(counts) == 500
    assert len(counts) >= 2


def test_records_follow_the_query_s_own_schema() -> None:
    """The schema is the query's: its keys (one named as a value of the record is renamed), then the
    values asked for. This process does the writes, so it traces itself (bpfscope leaves itself out
    unless told)."""
    fd = os.open("/dev/null", os.O_WRONLY)

    def run(collector: TraceCollector) -> list[dict]:
        sink = MemorySink()
        with Session([collector], [sink]) as session:
            session.open()
            session.start()
            for size in (10, 10, 20):
                os.write(fd, b"x" * size)
            session.finish()
        return sink.records("trace")

    config = TraceConfig(
        tracepoint="syscalls:sys_enter_write",
        count_by=("count", "pid"),
        sum_field="count",
        filter_text=f"fd == {fd}",
        pid=os.getpid(),
        include_self=True,
    )
    collector = TraceCollector(config)
    (schema,) = collector.schemas()
    assert TraceCollector.schemas() == ()  # without a query, a trace collector has no record schema
    assert schema.names == ["ts", "interval_s", "count_field", "pid", "count", "sum", "min", "max"]
    assert schema.field("pid").label and schema.field("count_field").type == "int"
    try:
        records = run(collector)
        assert run(TraceCollector(config.replace(include_self=False))) == []
    finally:
        os.close(fd)
    assert all(schema.check(r) == [] for r in records), records
    rows = {r["count_field"]: r for r in records}
    assert (rows[10]["count"], rows[10]["sum"], rows[20]["count"], rows[20]["sum"]) == (2, 20, 1, 20)
    assert {r["pid"] for r in records} == {os.getpid()}


def test_list_and_info(run_cli: RunCli) -> None:
    listed = run_cli("trace", "--list", "block:*").stdout.split()
    assert "block:block_rq_issue" in listed and all(n.startswith("block:") for n in listed)
    expected = sorted(
        f"block:{p.name}" for p in Path("/sys/kernel/tracing/events/block").iterdir() if p.is_dir()
    )
    assert listed == expected
    info = [
        json.loads(line)
        for line in run_cli("trace", "--info", "syscalls:sys_enter_openat", "--json").stdout.splitlines()
    ]
    fields = {r["field"]: r for r in info}
    assert {r["record"] for r in info} == {"trace.field"}
    assert fields["filename"]["reads_as"] == "userstr"
    assert fields["flags"]["offset"] == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["raw_syscalls:sys_enterr"],
            "no tracepoint raw_syscalls:sys_enterr (did you mean raw_syscalls:sys_enter",
        ),
        (["sched:sched_switch", "--count-by", "prev_commm"], "no field 'prev_commm' (did you mean prev_comm"),
        (
            ["sched:sched_switch", "--filter", "prev_comm == 5"],
            "type mismatch in filter: prev_comm is a string",
        ),
        (
            ["sched:sched_switch", "--filter", 'prev_pid == "x"'],
            "type mismatch in filter: prev_pid is a number",
        ),
        (
            ["sched:sched_switch", "--count-by", "prev_comm,next_comm,prev_pid,next_pid,cpu"],
            "too many keys (5)",
        ),
        (["sched:sched_switch", "--filter", "prev_pid >"], "ends too early"),
        (["sched:sched_switch", "--filter", "prev_pid === 3"], "cannot parse filter"),
        (["raw_syscalls:sys_enter", "--count-by", "args"], "args is an array of 6"),
        (["sched:sched_switch", "--hist", "prev_comm"], "prev_comm is a string"),
        (["nonsense"], "is not a tracepoint name"),
        (["--list", "zzz:*"], "no tracepoint matches"),
    ],
)
def test_bad_queries_get_one_line(run_cli: RunCli, args: list[str], message: str) -> None:
    result = run_cli("trace", *args, "--duration", "0.1")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _loaded_program_types(args: list[str]) -> dict[str, str]:
    """Start ``bpfscope trace ARGS``, and once attached, the types of the programs it loaded."""
    tool = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "trace", *args],
        stderr=subprocess.PIPE,
        text=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert tool.stderr is not None and tool.stderr.readline().startswith("Tracing")
        progs = json.loads(
            subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout
        )
        fds = Path(f"/proc/{tool.pid}/fd")
        fdinfo = [
            (fds.parent / "fdinfo" / fd.name).read_text()
            for fd in fds.iterdir()
            if "bpf-prog" in os.readlink(fd)
        ]
        ids = {
            int(line.split()[1])
            for text in fdinfo
            for line in text.splitlines()
            if line.startswith("prog_id:")
        }
        return {p["name"]: p["type"] for p in progs if p["id"] in ids}
    finally:
        tool.send_signal(signal.SIGINT)
        tool.communicate(timeout=30)


def test_builtin_only_queries_run_as_raw_tracepoints() -> None:
    assert _loaded_program_types(["sched:sched_switch", "--count-by", "comm,cpu"]) == {
        "trace_raw_tracepoint": "raw_tracepoint"
    }
    assert _loaded_program_types(["sched:sched_switch", "--count-by", "prev_comm"]) == {
        "trace_tracepoint": "tracepoint"
    }
    # Syscall events have no raw tracepoint of their own.
    assert _loaded_program_types(["syscalls:sys_enter_openat", "--count-by", "comm"]) == {
        "trace_tracepoint": "tracepoint"
    }


def test_raw_and_classic_paths_agree() -> None:
    work = "for _ in range(2000): os.getppid()\n"
    raw, _ = trace_workload(
        ["trace", "raw_syscalls:sys_enter", "-p", "{pid}", "--count-by", "pid", "--json"], work
    )
    # A filter on a record field forces the classic tracepoint.
    classic, _ = trace_workload(
        [
            "trace",
            "raw_syscalls:sys_enter",
            "-p",
            "{pid}",
            "--count-by",
            "pid",
            "--filter",
            "id >= 0",
            "--json",
        ],
        work,
    )
    (raw_row,) = _records(raw)
    (classic_row,) = _records(classic)
    assert 2000 <= raw_row["count"] <= 2010
    assert raw_row["count"] == classic_row["count"]


def test_bpftrace_programs_show_in_bpfscope_format(run_cli: RunCli) -> None:
    program = "tracepoint:syscalls:sys_enter_getppid { @calls[pid] = count(); }"
    out, err = trace_workload(
        ["trace", "--bpftrace", program, "--json"], "for _ in range(700): os.getppid()\n"
    )
    assert "Tracing with bpftrace" in err
    rows = _records(out)
    assert any(r.get("map") == "@calls" and r["value"] == 700 for r in rows), (out, err)
    bad = run_cli("trace", "--bpftrace", "nonsense {")
    assert bad.returncode == 2, bad.stderr
    assert "bpftrace failed: stdin:1:10-11: ERROR: syntax error" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
