"""bpfscope profile on real programs built here: a C program that spends known shares of its CPU time in
known functions (it measures them itself, with its thread's CPU clock, as the truth), profiled by
bpfscope and by perf at once; the outputs read back by their own readers (go tool pprof among them);
bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpfscope.domains.profile.formats import parse_pprof
from bpfscope.domains.profile.profiles import Profile

# Three functions doing the same work 6, 3 and 1 times per round: 60/30/10 of the CPU. The volatile
# accumulator gives each a stack frame (gcc leaves a frame pointer out of leaf functions that have
# none, and a frame-pointer walk then skips their caller). The program measures the CPU time of each
# call with its thread's CPU clock and prints the totals at the end: the truth.
SHARES_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static volatile unsigned long sink;
#define WORK(n) do { volatile unsigned long x = sink; \
	for (long i = 0; i < (n) * 200000L; i++) x = x * 6364136223846793005UL + 1442695040888963407UL; \
	sink = x; } while (0)
__attribute__((noinline)) void hot_a(void) { WORK(6); }
__attribute__((noinline)) void hot_b(void) { WORK(3); }
__attribute__((noinline)) void hot_c(void) { WORK(1); }
static long cpu_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}
int main(int argc, char **argv) {
	double seconds = argc > 1 ? atof(argv[1]) : 5;
	long spent[3] = {0, 0, 0}, start = cpu_ns(), t;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (cpu_ns() - start < seconds * 1e9) {
		t = cpu_ns(); hot_a(); spent[0] += cpu_ns() - t;
		t = cpu_ns(); hot_b(); spent[1] += cpu_ns() - t;
		t = cpu_ns(); hot_c(); spent[2] += cpu_ns() - t;
	}
	long total = cpu_ns() - start;
	printf("hot_a %ld\nhot_b %ld\nhot_c %ld\ntotal %ld\n", spent[0], spent[1], spent[2], total);
	return 0;
}
"""
# The same workload in Rust (Debian's rustc, release build: no frame pointers).
SHARES_RS = r"""use std::io::Write;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
}
const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

fn cpu_ns() -> i64 {
    let mut t = Timespec { sec: 0, nsec: 0 };
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.sec * 1_000_000_000 + t.nsec
}

// A macro, not a function: each hot function does its own work (a call would be a tail jump).
macro_rules! work {
    ($n:expr) => {{
        // Volatile, like the C version's accumulator: the loop is neither folded nor vectorised away.
        let mut x = 1u64;
        for _ in 0..$n * 200_000u64 {
            unsafe {
                let v = std::ptr::read_volatile(&x);
                std::ptr::write_volatile(&mut x, v.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    }};
}
#[inline(never)]
fn hot_a() { work!(6) }
#[inline(never)]
fn hot_b() { work!(3) }
#[inline(never)]
fn hot_c() { work!(1) }

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let mut spent = [0i64; 3];
    let start = cpu_ns();
    println!("ready");
    std::io::stdout().flush().unwrap();
    while ((cpu_ns() - start) as f64) < seconds * 1e9 {
        let t = cpu_ns(); hot_a(); spent[0] += cpu_ns() - t;
        let t = cpu_ns(); hot_b(); spent[1] += cpu_ns() - t;
        let t = cpu_ns(); hot_c(); spent[2] += cpu_ns() - t;
    }
    let total = cpu_ns() - start;
    println!("hot_a {}\nhot_b {}\nhot_c {}\ntotal {}", spent[0], spent[1], spent[2], total);
}
"""
FUNCTIONS = ("hot_a", "hot_b", "hot_c")

# And in Go (Debian's golang-go), whose functions are named main.hotA..., its goroutine locked to a
# thread so that the thread's CPU clock is the goroutine's.
SHARES_GO = r"""package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"unsafe"
)

var sink uint64

// The thread's CPU clock (CLOCK_THREAD_CPUTIME_ID): the goroutine is locked to its thread.
func cpuNs() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 3, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Sec*1e9 + ts.Nsec
}

//go:noinline
func work(n int) {
	x := sink
	for i := 0; i < n*200000; i++ {
		x = x*6364136223846793005 + 1442695040888963407
	}
	sink = x
}

//go:noinline
func hotA() { work(6) }

//go:noinline
func hotB() { work(3) }

//go:noinline
func hotC() { work(1) }

func main() {
	runtime.LockOSThread()
	seconds, _ := strconv.ParseFloat(os.Args[1], 64)
	var spent [3]int64
	start := cpuNs()
	fmt.Println("ready")
	for float64(cpuNs()-start) < seconds*1e9 {
		t := cpuNs()
		hotA()
		spent[0] += cpuNs() - t
		t = cpuNs()
		hotB()
		spent[1] += cpuNs() - t
		t = cpuNs()
		hotC()
		spent[2] += cpuNs() - t
	}
	fmt.Printf("hot_a %d\nhot_b %d\nhot_c %d\ntotal %d\n", spent[0], spent[1], spent[2], cpuNs()-start)
}
"""
GO_NAMES = {"hot_a": "main.hotA", "hot_b": "main.hotB", "hot_c": "main.hotC", "main": "main.main"}

# Off-CPU: a thread that blocks in three known ways, and times each call: its blocked time is the
# monotonic clock's less the thread's CPU clock (the truth; a 1 MiB direct read is on the CPU for 6% of
# its time here): nanosleep for 20 ms, a read on a pipe answered 15 ms later by another thread, and
# 1 MiB O_DIRECT reads from a file on the disk (argv[2]).
OFFCPU_C = r"""#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static int request[2], reply[2], disk, schedstat;
static long file_bytes, waited[3];
static long clock_ns(clockid_t clock) {
	struct timespec t;
	clock_gettime(clock, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}
static long now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
/* Wall-clock time less CPU time: the time the thread was off the CPU. */
static long off_cpu_ns(void) { return now_ns() - clock_ns(CLOCK_THREAD_CPUTIME_ID); }
/* Its time on a run queue (schedstat's second field): after a wake-up, and when preempted while it ran,
 * which is off the CPU without being blocked. */
static long run_delay_ns(void) {
	char text[128];
	long on_cpu, delay;
	ssize_t n = pread(schedstat, text, sizeof text - 1, 0);
	if (n <= 0) exit(1);
	text[n] = 0;
	if (sscanf(text, "%ld %ld", &on_cpu, &delay) != 2) exit(1);
	return delay;
}
/* The other end of the pipe: answers each request 15 ms later. */
static void *writer(void *arg) {
	char c;
	struct timespec wait = {0, 15000000};
	while (read(request[0], &c, 1) == 1) {
		nanosleep(&wait, NULL);
		if (write(reply[1], &c, 1) != 1) break;
	}
	return arg;
}
__attribute__((noinline)) long sleep_a(void) {
	struct timespec wait = {0, 20000000};
	long d = run_delay_ns(), t = off_cpu_ns();
	nanosleep(&wait, NULL);
	t = off_cpu_ns() - t;
	waited[0] += run_delay_ns() - d;
	return t;
}
__attribute__((noinline)) long pipe_b(void) {
	char c = 'x';
	if (write(request[1], &c, 1) != 1) exit(1);
	long d = run_delay_ns(), t = off_cpu_ns();
	if (read(reply[0], &c, 1) != 1) exit(1);
	t = off_cpu_ns() - t;
	waited[1] += run_delay_ns() - d;
	return t;
}
__attribute__((noinline)) long disk_c(void *buf) {
	off_t at = (random() % (file_bytes / (1 << 20))) << 20;
	long d = run_delay_ns(), t = off_cpu_ns();
	if (pread(disk, buf, 1 << 20, at) != 1 << 20) exit(1);
	t = off_cpu_ns() - t;
	waited[2] += run_delay_ns() - d;
	return t;
}
int main(int argc, char **argv) {
	double seconds = atof(argv[1]);
	long spent[3] = {0, 0, 0}, start;
	void *buf;
	pthread_t thread;
	disk = open(argv[2], O_RDONLY | O_DIRECT);
	schedstat = open("/proc/thread-self/schedstat", O_RDONLY);
	if (schedstat < 0) return 1;
	file_bytes = lseek(disk, 0, SEEK_END);
	if (disk < 0 || pipe(request) || pipe(reply) || posix_memalign(&buf, 4096, 1 << 20)) return 1;
	pthread_create(&thread, NULL, writer, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	if (!fgets((char *)buf, 64, stdin)) return 1; /* "go": the profiler has attached */
	start = now_ns();
	while (now_ns() - start < seconds * 1e9) {
		spent[0] += sleep_a();
		spent[1] += pipe_b();
		for (int i = 0; i < 4; i++) spent[2] += disk_c(buf);
	}
	printf("sleep_a %ld %ld\n", spent[0], waited[0]);
	printf("pipe_b %ld %ld\n", spent[1], waited[1]);
	printf("disk_c %ld %ld\n", spent[2], waited[2]);
	return 0;
}
"""
BLOCKERS = ("sleep_a", "pipe_b", "disk_c")

# The same shares in Python: three functions calling one loop 6, 3 and 1 times as long; the program
# times each call with its thread's CPU clock (the truth).
SHARES_PY = """import sys, time
def work(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x
def py_a(): return work(60000)
def py_b(): return work(30000)
def py_c(): return work(10000)
seconds = float(sys.argv[1])
spent = dict.fromkeys(("py_a", "py_b", "py_c"), 0.0)
print("ready", flush=True)
start = time.thread_time()
while time.thread_time() - start < seconds:
    for name, f in (("py_a", py_a), ("py_b", py_b), ("py_c", py_c)):
        t = time.thread_time(); f(); spent[name] += time.thread_time() - t
total = time.thread_time() - start
for name, s in spent.items(): print(name, int(s * 1e9))
print("total", int(total * 1e9))
"""
PY_FUNCTIONS = ("py_a", "py_b", "py_c")

# CPython 3.11's struct offsets bpfscope uses (python.py), compiled against the installed headers.
PY_OFFSETS_C = r"""
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_runtime.h"
#include "internal/pycore_frame.h"
int main(void) {
	printf("runtime_tstate_current %zu\n", offsetof(_PyRuntimeState, gilstate.tstate_current));
	printf("tstate_native_thread_id %zu\n", offsetof(PyThreadState, native_thread_id));
	printf("tstate_cframe %zu\n", offsetof(PyThreadState, cframe));
	printf("cframe_current_frame %zu\n", offsetof(_PyCFrame, current_frame));
	printf("frame_code %zu\n", offsetof(_PyInterpreterFrame, f_code));
	printf("frame_previous %zu\n", offsetof(_PyInterpreterFrame, previous));
	printf("frame_is_entry %zu\n", offsetof(_PyInterpreterFrame, is_entry));
	printf("code_qualname %zu\n", offsetof(PyCodeObject, co_qualname));
	printf("code_filename %zu\n", offsetof(PyCodeObject, co_filename));
	printf("unicode_length %zu\n", offsetof(PyASCIIObject, length));
	printf("unicode_state %zu\n", offsetof(PyASCIIObject, state));
	printf("ascii_data %zu\n", sizeof(PyASCIIObject));
	printf("compact_data %zu\n", sizeof(PyCompactUnicodeObject));
	return 0;
}
"""
# Enough samples for shares within 3 points: at 997 Hz a busy thread gives about 6000 in 6 s, and
# still 1500 on a machine so loaded that it gets a quarter of a CPU: a standard error of 1.3 points
# for a 60% share.
FREQUENCY = "997"
PROFILE_S = 6.0


@dataclass(frozen=True)
class Program:
    """A build of the workload: how to unwind it, and what its functions are called."""

    binary: Path
    unwind: str
    prefix: str = ""  # of the workload's function names (Rust: the crate)
    names: dict[str, str] | None = None  # or its own names (Go)

    def name(self, function: str) -> str:
        return self.names[function] if self.names else self.prefix + function


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile")


def build(build_dir: Path, kind: str) -> Program:
    """``c-fp`` (gcc -O2 with frame pointers), ``c-nofp`` (gcc -O2 -fomit-frame-pointer), ``rust``
    (rustc -C opt-level=3), ``go`` and ``go-stripped`` (go build, -ldflags=-s -w: no symbol table)."""
    binary = build_dir / f"shares_{kind.replace('-', '_')}"
    if kind.startswith("go"):
        source = build_dir / "shares.go"
        source.write_text(SHARES_GO)
        cache = build_dir / "go"
        env = {**os.environ, "GOCACHE": str(cache / "cache"), "GOPATH": str(cache), "HOME": str(cache)}
        strip = ["-ldflags=-s -w"] if kind == "go-stripped" else []
        subprocess.run(["go", "build", *strip, "-o", str(binary), str(source)], check=True, env=env)
        return Program(binary, "dwarf", names=GO_NAMES)
    if kind == "rust":
        source = build_dir / "shares.rs"
        source.write_text(SHARES_RS)
        subprocess.run(["rustc", "-C", "opt-level=3", "-o", str(binary), str(source)], check=True)
        return Program(binary, "dwarf", "shares::")
    source = build_dir / "shares.c"
    source.write_text(SHARES_C)
    flag = "-fno-omit-frame-pointer" if kind == "c-fp" else "-fomit-frame-pointer"
    subprocess.run(["gcc", "-O2", "-g", flag, "-o", str(binary), str(source)], check=True)
    return Program(binary, "fp" if kind == "c-fp" else "dwarf")


@pytest.fixture(scope="module")
def shares_fp(build_dir: Path) -> Path:
    return build(build_dir, "c-fp").binary


class Workload:
    """A program started now that prints "ready", then its truth (``name ns`` lines) when it ends."""

    def __init__(self, binary: Path, cpu_seconds: float) -> None:
        self.proc = subprocess.Popen([str(binary), str(cpu_seconds)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def truth(self) -> dict[str, float]:
        """Each function's percent of the program's CPU time."""
        out, _ = self.proc.communicate(timeout=120)
        ns = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
        return {name: 100.0 * ns[name] / ns["total"] for name in FUNCTIONS}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workload(shares_fp: Path) -> Iterator[Workload]:
    # More CPU time than the profile lasts, so the program is busy all along however loaded the
    # machine is; the truth is over its whole run (the shares are the same in every round).
    work = Workload(shares_fp, 2 * PROFILE_S)
    yield work
    work.stop()


def bpfscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bpfscope", *args], capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def profile_records(stdout: str) -> Profile:
    records = [json.loads(line) for line in stdout.splitlines()]
    assert records[-1]["record"] == "losses" and records[-1]["total"] == 0, records[-1]
    return Profile.from_records(records)


def profile_of(work: Workload, seconds: float) -> Profile:
    """A profile of ``work`` at 199 Hz for ``seconds``; the workload is stopped after it."""
    try:
        result = bpfscope(
            "profile", "-p", str(work.pid), "--frequency", "199", "--duration", str(seconds), "--json"
        )
    finally:
        work.stop()
    assert result.returncode == 0, result.stderr
    return profile_records(result.stdout)


def perf_shares(data: Path, pid: int) -> tuple[dict[str, float], int]:
    """Percent of perf's samples of ``pid`` with each function on the stack, and the sample count."""
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "pid,ip,sym"], capture_output=True, text=True, check=True
    ).stdout
    samples = 0
    on_stack: Counter[str] = Counter()
    for block in script.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or int(lines[0].split()[0]) != pid:
            continue
        samples += 1
        names = {line.split()[1] for line in lines[1:] if len(line.split()) > 1}
        on_stack.update(names)
    return {name: 100.0 * on_stack[name] / samples for name in FUNCTIONS}, samples


@pytest.mark.parametrize("kind", ["c-fp", "c-nofp", "rust", "go", "go-stripped"])
def test_shares_match_the_truth(kind: str, build_dir: Path, tmp_path: Path) -> None:
    """60/30/10 within 3 points of the program's own CPU clocks, 95% of the samples under main and
    walked to the root: with frame pointers (``--unwind fp``, and perf record -g on the same run, within
    3 points), without them (C -fomit-frame-pointer, Rust release: ``--unwind dwarf``), and Go, named
    from its own function table when stripped and unwound by it."""
    program = build(build_dir, kind)
    work = Workload(program.binary, 2 * PROFILE_S)
    data = tmp_path / "perf.data"
    perf = None
    if program.unwind == "fp":
        perf = subprocess.Popen(
            [
                "perf",
                "record",
                "-F",
                FREQUENCY,
                "-g",
                "-p",
                str(work.pid),
                "-o",
                str(data),
                "--",
                "sleep",
                str(PROFILE_S),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        result = bpfscope(
            "profile", "-p", str(work.pid), "--unwind", program.unwind, "--frequency", FREQUENCY,
            "--duration", str(PROFILE_S), "--json",
        )  # fmt: skip
        assert perf is None or perf.wait(timeout=60) == 0
        truth = work.truth()
    finally:
        work.stop()
    assert result.returncode == 0, result.stderr
    profile = profile_records(result.stdout)
    ours = profile.shares(work.pid)
    total = sum(n for (thread, _), n in profile.samples.items() if thread.pid == work.pid)
    assert total > 500, total
    for name in FUNCTIONS:
        assert abs(ours[program.name(name)] - truth[name]) <= 3, (name, ours, truth, total)
    assert ours[program.name("main")] >= 95, ours
    reached, stacks = profile.roots[program.binary.name]
    assert reached >= 0.95 * stacks, profile.roots
    # A frame left unnamed in fewer than 1% of the samples (a runtime thread's odd stack, say).
    assert sum(profile.unsymbolised.values()) < 0.01 * total, profile.unsymbolised
    if perf is not None:
        theirs, perf_samples = perf_shares(data, work.pid)
        assert perf_samples > 500, perf_samples
        for name in FUNCTIONS:
            assert abs(ours[name] - theirs[name]) <= 3, (name, ours[name], theirs[name], total, perf_samples)


def test_outputs_are_read_by_their_readers(workload: Workload, tmp_path: Path) -> None:
    """One run, every format of it: pprof through go tool pprof, folded, speedscope and the HTML page."""
    pb = tmp_path / "cpu.pb.gz"
    result = bpfscope(
        "profile", "-p", str(workload.pid), "--frequency", "99", "--duration", "2", "-o", str(pb)
    )
    assert result.returncode == 0, result.stderr
    assert f"to {pb}" in result.stderr
    profile = parse_pprof(pb.read_bytes())
    assert {"hot_a", "main"} <= set(profile.shares())
    top = subprocess.run(
        ["go", "tool", "pprof", "-top", str(pb)], capture_output=True, text=True, timeout=120
    )
    assert top.returncode == 0, top.stderr
    assert "hot_a" in top.stdout and "hot_b" in top.stdout
    folded = bpfscope(
        "profile", "-p", str(workload.pid), "--frequency", "99", "--duration", "1", "--format", "folded"
    )
    assert folded.returncode == 0, folded.stderr
    lines = folded.stdout.splitlines()
    assert lines and all(
        line.startswith("shares_c_fp;") and line.rsplit(" ", 1)[1].isdigit() for line in lines
    )
    # Any of the three functions under main: about 99 samples of a loop whose rounds are a few ms
    # can fall in step with the sampling period (a full-suite run once had none in hot_a); what this
    # checks is the folded format, not the shares (test_shares_match_the_truth has those).
    assert any(f";main;{name} " in line for line in lines for name in FUNCTIONS), lines
    for name, check in (("cpu.json", _check_speedscope), ("cpu.html", _check_html)):
        out = tmp_path / name
        result = bpfscope(
            "profile", "-p", str(workload.pid), "--frequency", "99", "--duration", "1", "-o", str(out)
        )
        assert result.returncode == 0, result.stderr
        check(out.read_text())


def _check_speedscope(text: str) -> None:
    doc = json.loads(text)
    names = {f["name"] for f in doc["shared"]["frames"]}
    assert "main" in names and names & set(FUNCTIONS), names
    (prof,) = doc["profiles"]
    assert prof["type"] == "sampled" and len(prof["samples"]) == len(prof["weights"])


def _check_html(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and any(name in text for name in FUNCTIONS)
    # Self-contained: nothing is fetched from anywhere.
    assert "http://" not in text.replace("http://www.w3.org", "") and "src=" not in text


# Reading /dev/zero spends its time in the kernel, under read(2).
ZERO_READER = "import os\nf = os.open('/dev/zero', os.O_RDONLY)\nwhile True: os.read(f, 1 << 20)"


def profile_zero_reader(*args: str) -> Profile:
    reader = subprocess.Popen([sys.executable, "-c", ZERO_READER])
    try:
        time.sleep(0.2)
        result = bpfscope("profile", "-p", str(reader.pid), "--frequency", "199", "--duration", "1.5", *args)
    finally:
        reader.kill()
        reader.wait()
    assert result.returncode == 0, result.stderr
    return profile_records(result.stdout)


def test_kernel_stacks_are_named() -> None:
    profile = profile_zero_reader("--json")
    kernel = {f.function for _, frames in profile.samples for f in frames if f.kind == "kernel"}
    assert {"ksys_read", "vfs_read"} & kernel, sorted(kernel)[:40]
    # --user-only leaves them out.
    profile = profile_zero_reader("--user-only", "--json")
    assert profile.samples and not any(f.kind == "kernel" for _, frames in profile.samples for f in frames)


def test_a_process_that_exits_while_profiled_keeps_its_profile(shares_fp: Path) -> None:
    profiler = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "profile", "--frequency", "99", "--duration", "4", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert profiler.stderr is not None and profiler.stderr.readline().startswith("Tracing")
    short = Workload(shares_fp, 0.5)
    short.truth()  # it has exited
    out, err = profiler.communicate(timeout=60)
    assert profiler.returncode == 0, err
    # Its stacks were named after it had gone: nearly all of its samples are in its three functions.
    # Not their shares: about 50 samples of a loop whose period (3-6 ms) can fall in step with the
    # 10.1 ms sampling period read hot_a at 12% and 29% of them in two full-suite runs (60% alone).
    shares = profile_records(out).shares(short.pid)
    assert sum(shares.get(name, 0) for name in FUNCTIONS) > 80, shares


def test_stacks_idle_for_a_window_leave_the_kernels_map(shares_fp: Path) -> None:
    """An exited thread's stacks are counted in the window they ran in, then leave the counts map after a
    window without a sample: an always-on profiler's map would otherwise fill with every thread it saw."""
    from bpfscope.domains.profile.profile import ProfileCollector, ProfileConfig

    # include_self: the workload is this process's child, which a collector leaves out by default.
    with ProfileCollector(ProfileConfig(frequency_hz=199, unwind="fp", include_self=True)) as collector:
        collector.open()
        collector.start()
        assert collector.obj is not None
        counts = collector.obj.maps["counts"]

        def pids() -> set[int]:
            return {int(key["tgid"]) for key in counts.items()[0]}

        short = Workload(shares_fp, 0.5)
        short.truth()  # it has run and exited
        first = collector.sample()
        # 0.5 s of CPU at 199 Hz: about 100 samples (the process is gone: its stacks may stay unnamed).
        assert sum(n for key, n in first.profile.samples.items() if key[0].pid == short.pid) > 30
        assert short.pid in pids()
        time.sleep(0.2)
        collector.sample()  # a window without it
        assert short.pid not in pids()


# A JIT's code: two copies of a counting loop in anonymous executable memory (mov ecx, 1<<20; dec ecx;
# jnz; ret), called in turn; the first is listed in /tmp/perf-PID.map as JITs write it (Node
# --perf-basic-prof, Java agents), the second is not.
JIT_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static const unsigned char loop[] = {0xB9, 0x00, 0x00, 0x10, 0x00, 0xFF, 0xC9, 0x75, 0xFC, 0xC3};
int main(int argc, char **argv) {
	double seconds = atof(argv[1]);
	int prot = PROT_READ | PROT_WRITE | PROT_EXEC;
	unsigned char *code = mmap(NULL, 8192, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (code == MAP_FAILED)
		return 1;
	memcpy(code, loop, sizeof loop);
	memcpy(code + 4096, loop, sizeof loop);
	char path[64];
	snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
	FILE *map = fopen(path, "w");
	fprintf(map, "%lx %zx jit_listed\n", (unsigned long)code, sizeof loop);
	fclose(map);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	time_t end = time(NULL) + (time_t)seconds;
	while (time(NULL) < end) {
		((void (*)(void))code)();
		((void (*)(void))(code + 4096))();
	}
	unlink(path);
	return 0;
}
"""


def test_jit_code_is_named_from_its_perf_map(build_dir: Path) -> None:
    """Code a JIT wrote is named from /tmp/perf-PID.map; code the map does not list is counted as
    ``jit_no_map``: about half the samples each."""
    source = build_dir / "jit.c"
    source.write_text(JIT_C)
    binary = build_dir / "jit"
    subprocess.run(["gcc", "-O2", "-fno-omit-frame-pointer", "-o", str(binary), str(source)], check=True)
    work = Workload(binary, 30)
    profile = profile_of(work, 3)
    total = sum(n for (thread, _), n in profile.samples.items() if thread.pid == work.pid)
    listed = sum(
        n for (_, frames), n in profile.samples.items() if any(f.function == "jit_listed" for f in frames)
    )
    assert total > 100, total
    modules = {f.module for _, frames in profile.samples for f in frames if f.function == "jit_listed"}
    assert modules == {"[jit]"}, modules
    assert 0.3 * total < listed < 0.7 * total, (listed, total)
    assert 0.3 * total < profile.unsymbolised["jit_no_map"] < 0.7 * total, profile.unsymbolised


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "999999999"], "no process with pid 999999999"),
        (["--kernel-only", "--user-only"], "leave nothing to sample"),
        (["--frequency", "0"], "--frequency"),
        (["--format", "svg"], "--format"),
        (["--json", "--format", "html"], "give -o FILE"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = bpfscope("profile", "--duration", "1", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sigint_writes_the_profile(shares_fp: Path, tmp_path: Path) -> None:
    work = Workload(shares_fp, 30)
    out = tmp_path / "cpu.folded"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bpfscope",
            "profile",
            "-p",
            str(work.pid),
            "--frequency",
            "99",
            "-o",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stderr.readline().startswith("Tracing")
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        work.stop()
    assert proc.returncode == 0, err
    assert "hot_a" in out.read_text()


def stolen_ns() -> int:
    """The time the hypervisor has taken from this machine's CPUs (/proc/stat steal, every CPU)."""
    total = Path("/proc/stat").read_text().splitlines()[0].split()  # "cpu user nice system ... steal"
    return int(total[8]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def offcpu_of(work: subprocess.Popen[str], *args: str) -> tuple[str, Profile]:
    """bpfscope offcputime of ``work`` (a program that prints "ready", then starts on a line from its
    stdin) while it runs to its end: what it printed then, and the profile."""
    assert work.stdin is not None and work.stdout is not None
    assert work.stdout.readline().strip() == "ready"
    tracer = subprocess.Popen(
        [sys.executable, "-m", "bpfscope", "offcputime", "-p", str(work.pid), *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tracer.stderr is not None and tracer.stderr.readline().startswith("Tracing")
        work.stdin.write("go\n")
        work.stdin.flush()
        out, _ = work.communicate(timeout=120)
        tracer.send_signal(signal.SIGINT)
        records, err = tracer.communicate(timeout=120)
    finally:
        for proc in (work, tracer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert tracer.returncode == 0, err
    return out, profile_records(records)


def test_offcpu_blocked_time_per_stack_matches_the_truth(build_dir: Path) -> None:
    source = build_dir / "offcpu.c"
    source.write_text(OFFCPU_C)
    binary = build_dir / "offcpu"
    subprocess.run(["gcc", "-O2", "-g", "-pthread", "-o", str(binary), str(source)], check=True)
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="bpfscope-offcpu-") as data:
        data.write(os.urandom(64 << 20))
        data.flush()
        work = subprocess.Popen(
            [str(binary), "4", data.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        stolen_before = stolen_ns()
        out, profile = offcpu_of(work)
        stolen = stolen_ns() - stolen_before
    # Per function: its time off the CPU (wall less CPU time), and of it on a run queue (schedstat).
    truth, queued = {}, {}
    for name, ns, delay in (line.split() for line in out.splitlines()):
        truth[name], queued[name] = int(ns), int(delay)
    blocked: Counter[str] = Counter()
    for (_, frames), ns in profile.weights.items():
        for name in {f.function for f in frames} & set(BLOCKERS):
            blocked[name] += ns
    print(f"off the CPU, ms (stolen by the hypervisor meanwhile: {stolen / 1e6:.0f}):")
    for name in BLOCKERS:
        ms = (truth[name] / 1e6, queued[name] / 1e6, blocked[name] / 1e6)
        print(f"  {name}: truth {ms[0]:.1f}, queued {ms[1]:.1f}, offcputime {ms[2]:.1f}")
    # offcputime counts from the switch out of a blocked thread to its switch back in (the run queue
    # after its wake-up included), not the times it was preempted while it ran: those are off the CPU
    # too, in the truth, and part of the run-queue time. Nor the time a hypervisor took the CPU from
    # under the thread (steal, which its CPU time leaves out): a virtual disk's reads do that, here 1 to
    # 1.5 ms of some 3% of 1 MiB reads that never left the CPU, and disk_c was once 9% more off the CPU
    # than blocked (52 ms of 658). The machine's steal over the run bounds the thread's.
    for name in BLOCKERS:
        low, high = truth[name] - queued[name] - stolen, truth[name]
        assert low - 0.05 * truth[name] <= blocked[name] <= high + 0.05 * truth[name], (
            name,
            blocked,
            truth,
            queued,
        )
    kernel = {f.function for _, frames in profile.samples for f in frames if f.kind == "kernel"}
    assert {"do_nanosleep", "anon_pipe_read", "__iomap_dio_rw"} <= kernel, sorted(kernel)


# A thread blocked reading a pipe that another thread writes to every 20 ms, from waker_b: it prints the
# time it spent in read(), the truth of the time its waker ended. (The writer's own sleeps end in a
# timer's interrupt: they count under whatever task the interrupt found running, as in BCC's wakeuptime.)
WAKERS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static int fds[2];
static long rounds;
static long now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}
__attribute__((noinline)) void waker_b(void) {
	/* write(2) made here, not in libc: libc has no frame pointers, */
	/* and a walk by them from inside it skips its caller. */
	char c = 'x';
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(1L), "D"((long)fds[1]), "S"(&c), "d"(1L)
		: "rcx", "r11", "memory");
	if (ret != 1)
		exit(1);
}
static void *wake(void *arg) {
	struct timespec t = {0, 20000000};
	for (long i = 0; i < rounds; i++) {
		nanosleep(&t, NULL);
		waker_b();
	}
	return arg;
}
int main(int argc, char **argv) {
	char c;
	pthread_t thread;
	rounds = atol(argv[1]);
	if (pipe(fds))
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	if (getchar() != 'g')
		return 1;
	pthread_create(&thread, NULL, wake, NULL);
	long blocked = 0;
	for (long i = 0; i < rounds; i++) {
		long t = now_ns();
		if (read(fds[0], &c, 1) != 1)
			return 1;
		blocked += now_ns() - t;
	}
	pthread_join(thread, NULL);
	printf("blocked_a %ld\n", blocked);
	return 0;
}
"""


def test_offcpu_wakers_are_the_threads_that_ended_the_waits(build_dir: Path) -> None:
    """--wakers: a reader's time blocked on a pipe counts under its writer's stacks (waker_b, then the
    kernel's pipe write), within 5% of the reader's own clock."""
    source = build_dir / "wakers.c"
    source.write_text(WAKERS_C)
    binary = build_dir / "wakers"
    flags = ["-O2", "-g", "-fno-omit-frame-pointer", "-pthread"]
    subprocess.run(["gcc", *flags, "-o", str(binary), str(source)], check=True)
    work = subprocess.Popen([str(binary), "100"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out, profile = offcpu_of(work, "--wakers")
    truth = int(out.split()[-1])
    woken = 0
    kernel: set[str] = set()
    for (thread, frames), ns in profile.weights.items():
        if any(f.function == "waker_b" for f in frames):
            assert thread.pid == work.pid and thread.tid != work.pid, thread  # the writer thread
            woken += ns
            kernel |= {f.function for f in frames if f.kind == "kernel"}
    assert abs(woken - truth) <= 0.05 * truth, (woken, truth)
    assert "try_to_wake_up" in kernel or "__wake_up_sync_key" in kernel, sorted(kernel)


def test_python_offsets_are_cpython_311s(build_dir: Path) -> None:
    from bpfscope.domains.profile.python import OFFSETS

    source = build_dir / "offsets.c"
    source.write_text(PY_OFFSETS_C)
    binary = build_dir / "offsets"
    subprocess.run(["gcc", "-I/usr/include/python3.11", "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    truth = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert vars(OFFSETS[(3, 11)]) == truth


@pytest.mark.parametrize("unwind", ["dwarf", "fp"])
def test_python_shares_match_the_truth_and_py_spy(build_dir: Path, tmp_path: Path, unwind: str) -> None:
    """Mixed stacks of a CPython 3.11 program: Python functions within 3 points of its own CPU clocks and
    of py-spy's on the same run, and a Python frame in 99% of its samples, whether the native stack is
    copied and unwound here or walked by frame pointers and counted in the kernel (the agent's default)."""
    script = build_dir / "py_shares.py"
    script.write_text(SHARES_PY)
    work = subprocess.Popen(
        ["/usr/bin/python3.11", str(script), str(2 * PROFILE_S)], stdout=subprocess.PIPE, text=True
    )
    assert work.stdout is not None and work.stdout.readline().strip() == "ready"
    raw = tmp_path / "py-spy.txt"
    py_spy = Path(sys.executable).with_name("py-spy")
    peer = subprocess.Popen(
        [str(py_spy), "record", "--pid", str(work.pid), "--rate", "199", "--duration", str(int(PROFILE_S)),
         "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        result = bpfscope(
            "profile", "-p", str(work.pid), "--unwind", unwind, "--frequency", FREQUENCY,
            "--duration", str(PROFILE_S), "--json",
        )  # fmt: skip
        assert peer.wait(timeout=60) == 0
        out, _ = work.communicate(timeout=120)
    finally:
        for proc in (work, peer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert result.returncode == 0, result.stderr
    ns = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    profile = profile_records(result.stdout)
    # Shares among the three functions: on a loaded machine the interpreter's time between them (the
    # loop, the clock reads) varies by a few percent, in the truth and the samples alike.
    truth = among({name: float(ns[name]) for name in PY_FUNCTIONS})
    ours = among(profile.shares(work.pid))
    theirs = among(py_spy_shares(raw.read_text()))
    samples = sum(n for (thread, _), n in profile.samples.items() if thread.pid == work.pid)
    with_python = sum(
        n
        for (thread, frames), n in profile.samples.items()
        if thread.pid == work.pid and any(f.kind == "python" for f in frames)
    )
    assert samples > 400 and with_python >= 0.99 * samples, (samples, with_python)
    for name in PY_FUNCTIONS:
        assert abs(ours[name] - truth[name]) <= 3, (name, ours, truth, theirs)
        # py-spy samples wall-clock time: on a loaded machine it drifts from the CPU time (py_a read
        # 62-66% to it, against 60% of CPU time, in 1 run of 3 here). Where it is right, both are within
        # the truth's tolerance (ours above), on either side of it (py_a: ours 60.3, py-spy's 57.1, the
        # truth 59.9, once: 3.2 apart); where it is not, we are nearer the truth.
        if abs(theirs[name] - truth[name]) > 3:
            assert abs(ours[name] - truth[name]) < abs(theirs[name] - truth[name]), (
                name,
                ours,
                theirs,
                truth,
            )
    python_frames = {
        (f.function, f.module) for _, frames in profile.samples for f in frames if f.kind == "python"
    }
    assert ("py_a", str(script)) in python_frames and ("<module>", str(script)) in python_frames


def among(shares: dict[str, float]) -> dict[str, float]:
    """The percent of each of PY_FUNCTIONS of their sum."""
    whole = sum(shares.get(name, 0.0) for name in PY_FUNCTIONS)
    return {name: 100.0 * shares.get(name, 0.0) / whole for name in PY_FUNCTIONS}


def py_spy_shares(raw: str) -> dict[str, float]:
    """Percent of py-spy's samples with each function on the stack, from its raw (folded) output:
    ``frame (file:line);... count``."""
    total = 0
    on_stack: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        for name in {frame.split(" (", 1)[0] for frame in stack.split(";")}:
            on_stack[name] += int(count)
    return {name: 100.0 * on_stack[name] / total for name in PY_FUNCTIONS}


def test_continuous_writes_windows_to_the_store_and_diffs_them(shares_fp: Path, tmp_path: Path) -> None:
    from bpfscope.domains.profile.diff import from_store

    store = tmp_path / "store"
    work = Workload(shares_fp, 30)
    try:
        result = bpfscope(
            "profile", "-p", str(work.pid), "--continuous", "--store", str(store), "--frequency", FREQUENCY,
            "--duration", "5", "1",
        )  # fmt: skip
    finally:
        work.stop()
    assert result.returncode == 0, result.stderr
    assert f"into {store}" in result.stderr
    from bpfscope.sinks.store import Store

    windows = Store(store).query('SELECT ts, samples FROM "profile.window" ORDER BY ts')
    assert len(windows) >= 4 and all(samples > 0 for _, samples in windows), windows
    middle = windows[len(windows) // 2][0]
    whole = from_store(str(store), f"0..{middle + 3600}", work.pid)
    assert abs(whole.shares(work.pid)["hot_a"] - 60) <= 5, whole.shares(work.pid)
    diff = bpfscope(
        "profile",
        "diff",
        "--store",
        str(store),
        "-p",
        str(work.pid),
        f"0..{middle}",
        f"{middle}..{middle + 3600}",
    )
    assert diff.returncode == 0, diff.stderr
    assert "hot_a" in diff.stdout


def test_a_deleted_binary_is_still_named_and_a_corrupt_one_is_a_reason(
    shares_fp: Path, tmp_path: Path
) -> None:
    """A binary deleted while it runs is read through /proc/PID/map_files; one that is not an ELF file
    (a script's interpreter aside) leaves its frames unnamed, counted by reason, and the rest named."""
    copy = tmp_path / "doomed"
    shutil.copy(shares_fp, copy)
    work = Workload(copy, 30)
    copy.unlink()
    profile = profile_of(work, 2)
    assert profile.shares(work.pid).get("hot_a", 0) > 30, profile.shares(work.pid)
    assert not profile.unsymbolised.get("deleted_file"), profile.unsymbolised
