"""Ring-buffer consumer: the highest event rate decoded into Python records with no unreported loss.

    .venv/bin/python benchmarks/ringbuf.py [--seconds S] [--json]

A producer process pinned to one CPU calls getppid() in a loop; on each call the BPF program
ringbuf_bench.bpf.c emits a burst of 64-byte events into a ring buffer. The consumer, this process pinned
to another CPU, polls the ring and checks every event's sequence number. Each step of the sweep raises the
offered rate (a syscall rate limit in the producer times the burst size) until the consumer no longer
keeps up (over 1% dropped); the last step runs the producer unthrottled. Every step must account for every
event exactly: events consumed plus events the kernel counted as dropped equals events produced, and the
sequence numbers received are unique and exactly the ones the kernel handed out.

The sweep is bounded by what one producer CPU can offer, so a second measurement finds the consumer's own
ceiling: the producer fills a large ring while nobody reads it, then the consumer drains it.

Two consumers are measured: bpfscope's RingBuffer (numpy batches), and for comparison only, a per-record
consumer as a Python binding of libbpf's callback API would deliver events (one struct.unpack_from and one
Python call per record, over the same memory-mapped ring).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import platform
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bpfscope.build import compile_bpf
from bpfscope.engine import libbpf
from bpfscope.engine.bpf import BpfObject, Map
from bpfscope.engine.btf import Struct

HERE = Path(__file__).resolve().parent
BPF_SOURCE = HERE / "ringbuf_bench.bpf.c"
MAX_BURST = 4096  # the BPF program's loop bound

# Offered rates of the throttled steps, in events/s; an unthrottled step always follows.
DEFAULT_RATES = (500_000, 1_000_000, 2_000_000, 3_000_000, 4_000_000, 6_000_000)

# The producer: for each byte read on stdin, getppid() at a target rate (0: as fast as it can) for a
# number of seconds, then one line: the calls made and the seconds it ran. Exits at end of input.
PRODUCER_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	double rate, seconds, start, t;
	unsigned long calls, due;
	char go;

	if (argc != 3)
		return 2;
	rate = atof(argv[1]);
	seconds = atof(argv[2]);
	while (read(0, &go, 1) == 1) {
		calls = 0;
		start = t = now();
		while (t - start < seconds) {
			due = rate > 0 ? (unsigned long)((t - start) * rate) + 1 : calls + 64;
			while (calls < due) {
				syscall(SYS_getppid);
				calls++;
			}
			t = now();
		}
		printf("%lu %.9f\n", calls, t - start);
		fflush(stdout);
	}
	return 0;
}
"""

PRODUCER_PY = r"""
import os, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
getppid, clock = os.getppid, time.monotonic
while sys.stdin.buffer.read(1):
    calls = 0
    start = t = clock()
    while t - start < seconds:
        due = int((t - start) * rate) + 1 if rate > 0 else calls + 64
        while calls < due:
            getppid()
            calls += 1
        t = clock()
    print(calls, t - start, flush=True)
"""

# The event of ringbuf_bench.bpf.c, for the per-record consumer (checked against the object's BTF).
EVENT_FORMAT = struct.Struct("<QQII16sQQII")
SEQ_INDEX = 1

_HEADER = 8
_BUSY = 1 << 31
_DISCARD = 1 << 30


class SeqCheck:
    """Every sequence number received, checked to be unique and, at the end, exactly 0..produced-dropped-1.

    One producer thread hands them out in order, so a batch is normally a contiguous run and costs one
    vectorised comparison; anything else is kept and checked in full at the end.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []
        self.stray: list[np.ndarray] = []
        self.count = 0
        self._run_start = 0
        self._next = 0

    def batch(self, seq: np.ndarray) -> None:
        n = len(seq)
        if not n:
            return
        self.count += n
        # The cheapest exact test of "first, first+1, ...": Python lists for small batches, one numpy
        # comparison for large ones.
        if n <= 64:
            values = seq.tolist()
            first = values[0]
            contiguous = values == list(range(first, first + n))
        else:
            first = int(seq[0])
            contiguous = bool((seq == np.arange(first, first + n, dtype=seq.dtype)).all())
        if contiguous:
            if first != self._next:
                self._close_run()
                self._run_start = first
            self._next = first + n
        else:
            self.stray.append(seq.copy())

    def one(self, seq: int) -> None:
        self.count += 1
        if seq != self._next:
            self._close_run()
            self._run_start = seq
        self._next = seq + 1

    def _close_run(self) -> None:
        if self._next > self._run_start:
            self.runs.append((self._run_start, self._next))
        self._run_start = self._next

    def verify(self, delivered: int) -> str:
        """Why the numbers received are not exactly 0..delivered-1 once each ("" when they are)."""
        self._close_run()
        if self.count != delivered:
            return f"received {self.count} sequence numbers, the kernel delivered {delivered}"
        seen = np.zeros(delivered, dtype=np.uint8)
        for a, b in self.runs:
            if b > delivered:
                return f"sequence number {b - 1} was never handed out"
            seen[a:b] += 1
        if self.stray:
            stray = np.concatenate(self.stray)
            if stray.size and int(stray.max()) >= delivered:
                return f"sequence number {int(stray.max())} was never handed out"
            np.add.at(seen, stray.astype(np.intp), 1)
        if delivered and int(seen.max()) > 1:
            return f"{int((seen > 1).sum())} sequence numbers received twice"
        return ""


class Consumer(Protocol):
    name: str
    batches: int

    @property
    def malformed(self) -> int: ...

    def run_until(self, deadline: float) -> None: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...


class BatchConsumer:
    """bpfscope's consumer: RingBuffer.poll returns a numpy batch of every record available."""

    name = "batch (RingBuffer)"

    def __init__(self, obj: BpfObject, check: SeqCheck, ring_class: type | None) -> None:
        if ring_class is None:
            self.ring = obj.ring_buffer("events")
        else:  # another implementation under test (--ringbuf-impl)
            self.ring = ring_class(obj.maps["events"], obj.btf.pointee("bs_record__events"), obj.dropped)
        self.check = check
        self.batches = 0

    @property
    def malformed(self) -> int:
        return int(self.ring.malformed)

    def run_until(self, deadline: float) -> None:
        poll, check, clock = self.ring.poll, self.check.batch, time.monotonic
        while clock() < deadline:
            batch = poll(0.05)
            if len(batch):
                self.batches += 1
                check(batch["seq"])

    def drain(self) -> None:
        read, check = self.ring.read, self.check.batch
        while len(batch := read()):
            self.batches += 1
            check(batch["seq"])

    def close(self) -> None:
        self.ring.close()


class CallbackConsumer:
    """For comparison only: one struct.unpack_from and one Python callback per record, as a Python
    binding of libbpf's ring_buffer__poll would deliver them, over the same memory-mapped ring."""

    name = "per-record callback"

    def __init__(self, obj: BpfObject, check: SeqCheck) -> None:
        ring_map: Map = obj.maps["events"]
        event = obj.btf.pointee("bs_record__events")
        if not isinstance(event, Struct) or EVENT_FORMAT.size != event.size or event.field("seq").offset != 8:
            raise SystemExit("EVENT_FORMAT does not match the event of ringbuf_bench.bpf.c")
        self._page = mmap.PAGESIZE
        self._mask = ring_map.max_entries - 1
        fd = ring_map.fd
        self._consumer = mmap.mmap(fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._data = mmap.mmap(
            fd, self._page + 2 * ring_map.max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=self._page
        )
        # One aligned 8-byte load or store per position: struct.pack_into would zero the field first,
        # showing the kernel consumer position 0 (a full ring) for an instant.
        self._cons_pos = memoryview(self._consumer)[:8].cast("Q")
        self._prod_pos = memoryview(self._data)[:8].cast("Q")
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        one = check.one

        def on_event(record: tuple[Any, ...]) -> None:
            one(record[SEQ_INDEX])

        self._callback = on_event
        self.batches = 0
        self.malformed = 0

    def read(self) -> int:
        data, page, mask, callback = self._data, self._page, self._mask, self._callback
        unpack_event, unpack_from = EVENT_FORMAT.unpack_from, struct.unpack_from
        cons = self._cons_pos[0]
        prod = self._prod_pos[0]
        n = 0
        while cons < prod:
            offset = page + (cons & mask)
            (header,) = unpack_from("<I", data, offset)
            if header & _BUSY:
                break
            if not header & _DISCARD:
                callback(unpack_event(data, offset + _HEADER))
                n += 1
            cons += (_HEADER + (header & ~(_BUSY | _DISCARD)) + 7) & ~7
        self._cons_pos[0] = cons
        if n:
            self.batches += 1
        return n

    def run_until(self, deadline: float) -> None:
        read, wait, clock = self.read, self._epoll.poll, time.monotonic
        while clock() < deadline:
            if not read():
                wait(0.05)

    def drain(self) -> None:
        while self.read():
            pass

    def close(self) -> None:
        self._epoll.close()
        self._cons_pos.release()
        self._prod_pos.release()
        self._consumer.close()
        self._data.close()


@dataclass
class Step:
    consumer: str
    kind: str  # "sweep", or "drain": the consumer emptying a ring filled while nobody read it
    target: int  # offered events/s asked of the producer, 0: unthrottled
    burst: int
    ring_bytes: int
    seconds: float  # sweep: from the start signal to the ring drained; drain: the drain alone
    produced: int
    consumed: int
    dropped: int
    malformed: int  # records the consumer skipped as not being events
    batches: int
    cpu: float  # consumer CPU time / seconds
    # Time the consumer was runnable but not running (other tasks or kernel work on its CPU), and time
    # the hypervisor took from the two CPUs (steal, counted in clock ticks): a ring that overflows during
    # a step with much of either measures the machine, not the consumer.
    waited_ms: float
    stolen_ms: float
    offered_rate: float
    consumed_rate: float
    exact: bool
    problem: str

    @property
    def mean_batch(self) -> float:
        return self.consumed / self.batches if self.batches else 0.0

    @property
    def disturbed(self) -> bool:
        """Whether other work took the CPUs for more than 5% of the step."""
        return self.waited_ms + self.stolen_ms > 0.05 * self.seconds * 1000


class Producer:
    """The producer process for one BPF object: started first, as the object filters on its pid."""

    def __init__(self, command: list[str], syscall_rate: float, seconds: float, cpu: int, nice: int) -> None:
        self.proc = subprocess.Popen(
            [*command, f"{syscall_rate:.3f}", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        os.sched_setaffinity(self.pid, {cpu})
        _renice(self.pid, nice)

    def start(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("g")
        self.proc.stdin.flush()

    def finished(self) -> float:
        """Wait for the round to end; the seconds it ran."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the producer failed (exit status {self.proc.wait()})")
        return float(line.split()[1])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _renice(pid: int, nice: int) -> None:
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)


class Interference:
    """The consumer's run delay (/proc/self/schedstat) and the steal time of the two CPUs (/proc/stat)."""

    def __init__(self, cpus: tuple[int, int]) -> None:
        self.cpus = {f"cpu{c}" for c in cpus}
        self.tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        self._start = self._now()

    def _now(self) -> tuple[float, float]:
        with open("/proc/self/schedstat") as f:
            waited_ns = int(f.read().split()[1])
        stolen = 0
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields[0] in self.cpus and len(fields) > 8:
                    stolen += int(fields[8])
        return waited_ns / 1e6, stolen * self.tick_ms

    def since(self) -> tuple[float, float]:
        """(waited ms, stolen ms) since this object was made."""
        waited, stolen = self._now()
        return waited - self._start[0], stolen - self._start[1]


class Bench:
    def __init__(self, args: argparse.Namespace, obj_path: Path, producer: list[str]) -> None:
        self.args = args
        self.obj_path = obj_path
        self.producer = producer
        self.ring_class = load_ring_class(args.ringbuf_impl) if args.ringbuf_impl else None

    def _open(self, pid: int, burst: int, ring_bytes: int) -> BpfObject:
        obj = BpfObject(
            self.obj_path, rodata={"bs_targ_tgid": pid, "burst": burst}, max_entries={"events": ring_bytes}
        )
        obj.load()
        obj.attach()
        return obj

    def _consumer(self, kind: str, obj: BpfObject, check: SeqCheck) -> Consumer:
        if kind == "batch":
            return BatchConsumer(obj, check, self.ring_class)
        return CallbackConsumer(obj, check)

    def step(self, kind: str, target: int) -> Step:
        """One step of the sweep: the producer offers ``target`` events/s (0: all it can) for --seconds."""
        a = self.args
        producer = Producer(self.producer, target / a.burst, a.seconds, a.producer_cpu, a.nice)
        check = SeqCheck()
        try:
            with self._open(producer.pid, a.burst, a.ring_bytes) as obj:
                consumer = self._consumer(kind, obj, check)
                try:
                    cpu0 = time.process_time()
                    interference = Interference((a.producer_cpu, a.consumer_cpu))
                    start = time.monotonic()
                    producer.start()
                    consumer.run_until(start + a.seconds)
                    producer_seconds = producer.finished()
                    # The producer's round is over, so every event it produced is committed: drain them.
                    consumer.drain()
                    elapsed = time.monotonic() - start
                    cpu = (time.process_time() - cpu0) / elapsed
                    waited, stolen = interference.since()
                    produced, dropped = int(obj.bss["produced"]), obj.dropped()
                    batches, malformed = consumer.batches, consumer.malformed
                finally:
                    consumer.close()
        finally:
            producer.close()
        return _result(
            check,
            consumer=kind,
            kind="sweep",
            target=target,
            burst=a.burst,
            ring_bytes=a.ring_bytes,
            seconds=elapsed,
            produced=produced,
            dropped=dropped,
            malformed=malformed,
            batches=batches,
            cpu=cpu,
            waited_ms=waited,
            stolen_ms=stolen,
            offered_rate=produced / producer_seconds,
        )

    def drain(self, kind: str) -> Step:
        """The consumer's own ceiling: fill a ring nobody reads, then time the consumer emptying it; the
        best of --drain-rounds rounds."""
        a = self.args
        fill_seconds = 1.5 * a.drain_ring_bytes / (EVENT_FORMAT.size + _HEADER) / 5e6 + 0.05
        producer = Producer(self.producer, 0, fill_seconds, a.producer_cpu, a.nice)
        check = SeqCheck()
        best = 0.0
        total_seconds = total_cpu = waited = stolen = 0.0
        try:
            with self._open(producer.pid, a.drain_burst, a.drain_ring_bytes) as obj:
                consumer = self._consumer(kind, obj, check)
                try:
                    for _ in range(a.drain_rounds):
                        before = check.count
                        producer.start()
                        producer.finished()
                        cpu0 = time.process_time()
                        interference = Interference((a.producer_cpu, a.consumer_cpu))
                        start = time.perf_counter()
                        consumer.drain()
                        seconds = time.perf_counter() - start
                        total_cpu += time.process_time() - cpu0
                        round_waited, round_stolen = interference.since()
                        waited += round_waited
                        stolen += round_stolen
                        total_seconds += seconds
                        best = max(best, (check.count - before) / seconds)
                    produced, dropped = int(obj.bss["produced"]), obj.dropped()
                    batches, malformed = consumer.batches, consumer.malformed
                finally:
                    consumer.close()
        finally:
            producer.close()
        step = _result(
            check,
            consumer=kind,
            kind="drain",
            target=0,
            burst=a.drain_burst,
            ring_bytes=a.drain_ring_bytes,
            seconds=total_seconds,
            produced=produced,
            dropped=dropped,
            malformed=malformed,
            batches=batches,
            cpu=total_cpu / total_seconds if total_seconds else 0.0,
            waited_ms=waited,
            stolen_ms=stolen,
            offered_rate=0.0,
        )
        step.consumed_rate = best
        return step

    def undisturbed_step(self, kind: str, target: int) -> Step:
        """A step, run again (up to --retries times) while other work on the machine disturbs it."""
        step = self.step(kind, target)
        for _ in range(self.args.retries):
            if not step.disturbed:
                break
            step = min(step, self.step(kind, target), key=lambda s: s.waited_ms + s.stolen_ms)
        return step

    def sweep(self, kind: str, report: Callable[[Step], None]) -> list[Step]:
        """The throttled steps in increasing rate until one loses more than 1% (the consumer no longer
        keeps up: higher rates would only drop more), then the unthrottled step."""
        steps = []
        for target in [*(r for r in self.args.rates if r), 0]:
            step = self.undisturbed_step(kind, target)
            report(step)
            steps.append(step)
            if target and step.dropped > 0.01 * step.produced:
                step = self.undisturbed_step(kind, 0)
                report(step)
                steps.append(step)
                break
        return steps


def _result(check: SeqCheck, **fields: Any) -> Step:
    """The step's record, with the accounting checked: consumed + dropped == produced, the sequence
    numbers exactly 0..produced-dropped-1, nothing skipped as malformed."""
    consumed, produced, dropped = check.count, fields["produced"], fields["dropped"]
    problems = []
    if consumed + dropped != produced:
        problems.append(f"consumed {consumed} + dropped {dropped} != produced {produced}")
    if fields["malformed"]:
        problems.append(f"{fields['malformed']} records skipped as malformed")
    if seq_problem := check.verify(produced - dropped):
        problems.append(seq_problem)
    seconds = fields["seconds"]
    return Step(
        **fields,
        consumed=consumed,
        consumed_rate=consumed / seconds if seconds else 0.0,
        exact=not problems,
        problem="; ".join(problems),
    )


def producer_command(kind: str, workdir: Path) -> list[str]:
    if kind == "python":
        return [sys.executable, "-c", PRODUCER_PY]
    source = workdir / "producer.c"
    binary = workdir / "producer"
    source.write_text(PRODUCER_C)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return [str(binary)]


def load_ring_class(path: Path) -> type:
    spec = importlib.util.spec_from_file_location("ringbuf_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RingBuffer


def machine() -> dict[str, str]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    virt = ""
    if shutil.which("systemd-detect-virt"):
        virt = subprocess.run(["systemd-detect-virt", "--vm"], capture_output=True, text=True).stdout.strip()
    major, minor = libbpf.version()
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model or platform.processor(),
        "virtualization": virt or "none detected",
        "kernel": os.uname().release,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "libbpf": f"{major}.{minor}",
    }


def best(steps: list[Step], kind: str, zero_drops: bool = False) -> float | None:
    """The highest consumed rate among the steps of ``kind`` that accounted for every event exactly
    (and dropped none, with ``zero_drops``); None if there is no such step."""
    rates = [s.consumed_rate for s in steps if s.kind == kind and s.exact and not (zero_drops and s.dropped)]
    return max(rates, default=None)


def mrate(rate: float | None) -> str:
    return "none" if rate is None else f"{rate / 1e6:.2f} M/s"


TABLE_HEADER = (
    f"{'consumer':<20} {'step':>11} {'offered':>10} {'consumed':>10} {'dropped':>9} {'loss':>6} "
    f"{'CPU':>5} {'batch':>6} {'waited':>7} {'stolen':>7}  exact"
)


def table_row(step: Step) -> str:
    name = BatchConsumer.name if step.consumer == "batch" else CallbackConsumer.name
    if step.kind == "drain":
        what, offered = "drain", "-"
        # In a drain the ring overflows on purpose: the loss says nothing about the consumer.
        loss = "-"
    else:
        what = mrate(step.target) if step.target else "unthrottled"
        offered = mrate(step.offered_rate)
        loss = f"{step.dropped / step.produced:.1%}" if step.produced else "-"
    exact = "yes" if step.exact else f"NO: {step.problem}"
    return (
        f"{name:<20} {what:>11} {offered:>10} {mrate(step.consumed_rate):>10} {step.dropped:>9} {loss:>6} "
        f"{step.cpu:>5.0%} {step.mean_batch:>6.0f} {step.waited_ms:>5.0f}ms {step.stolen_ms:>5.0f}ms"
        f"{'!' if step.disturbed else ' '} {exact}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each sweep step (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--burst", type=int, default=16, help="events per getppid() in the sweep (default 16)")
    p.add_argument("--ring-bytes", type=int, default=4 << 20, help="sweep ring size, a power of 2 (4 MiB)")
    p.add_argument(
        "--rates",
        type=lambda s: [int(float(r)) for r in s.split(",") if r],
        default=list(DEFAULT_RATES),
        help="offered events/s of the throttled steps, comma-separated (an unthrottled step always follows)",
    )
    p.add_argument("--drain-ring-bytes", type=int, default=64 << 20, help="drain ring size (64 MiB)")
    p.add_argument("--drain-burst", type=int, default=256, help="events per getppid() filling it (256)")
    p.add_argument("--drain-rounds", type=int, default=3, help="fills and drains; the best counts (3)")
    p.add_argument("--consumers", default="batch,callback", help="consumers to measure (batch,callback)")
    p.add_argument("--producer", choices=("c", "python"), default="c" if shutil.which("gcc") else "python")
    p.add_argument("--nice", type=int, default=-20, help="niceness of producer and consumer (-20)")
    p.add_argument(
        "--retries", type=int, default=2, help="runs of a step again while other work disturbs it (2)"
    )
    p.add_argument("--ringbuf-impl", type=Path, help="a module whose RingBuffer class to measure instead")
    args = p.parse_args(argv)
    for name in ("burst", "drain_burst"):
        if not 1 <= getattr(args, name) <= MAX_BURST:
            p.error(f"--{name.replace('_', '-')} must be 1..{MAX_BURST}")
    for name in ("ring_bytes", "drain_ring_bytes"):
        size = getattr(args, name)
        if size < mmap.PAGESIZE or size & (size - 1):
            p.error(f"--{name.replace('_', '-')} must be a power of 2 of at least a page")
    args.consumers = args.consumers.split(",")
    if not args.consumers or not set(args.consumers) <= {"batch", "callback"}:
        p.error("--consumers takes batch and/or callback")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("the benchmark needs two CPUs: one for the producer, one for the consumer")
    args.producer_cpu, args.consumer_cpu = cpus[0], cpus[1]
    consumer_cpu = args.consumer_cpu
    os.sched_setaffinity(0, {consumer_cpu})
    _renice(0, args.nice)
    info = machine()
    config = {
        "seconds": args.seconds,
        "burst": args.burst,
        "ring_bytes": args.ring_bytes,
        "drain_ring_bytes": args.drain_ring_bytes,
        "drain_burst": args.drain_burst,
        "event_bytes": EVENT_FORMAT.size,
        "producer": args.producer,
        "producer_cpu": args.producer_cpu,
        "consumer_cpu": consumer_cpu,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "ringbuf_impl": str(args.ringbuf_impl) if args.ringbuf_impl else None,
    }

    def report(step: Step) -> None:
        if not args.json:
            print(table_row(step), flush=True)

    if not args.json:
        print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print(
            f"producer: {args.producer} getppid() loop on CPU {args.producer_cpu}, {EVENT_FORMAT.size}-byte "
            f"events, burst {args.burst} (drain: {args.drain_burst}); consumer on CPU {consumer_cpu}; "
            f"ring {args.ring_bytes >> 10} KiB (drain: {args.drain_ring_bytes >> 10} KiB); "
            f"{args.seconds:g} s per step; nice {config['nice']}"
        )
        if args.ringbuf_impl:
            print(f"RingBuffer from {args.ringbuf_impl}")
        print()
        print(TABLE_HEADER)

    steps: dict[str, list[Step]] = {}
    with tempfile.TemporaryDirectory(prefix="bpfscope-bench-") as tmp:
        workdir = Path(tmp)
        obj_path = compile_bpf(BPF_SOURCE, workdir / "ringbuf_bench.bpf.o")
        bench = Bench(args, obj_path, producer_command(args.producer, workdir))
        for kind in args.consumers:
            steps[kind] = bench.sweep(kind, report)
            drain = bench.drain(kind)
            report(drain)
            steps[kind].append(drain)

    summary: dict[str, dict[str, Any]] = {}
    for kind, kind_steps in steps.items():
        summary[kind] = {
            "max_rate_zero_drops": best(kind_steps, "sweep", zero_drops=True),
            "max_rate": best(kind_steps, "sweep"),
            "drain_rate": best(kind_steps, "drain"),
            "all_exact": all(s.exact for s in kind_steps),
            "disturbed_steps": sum(s.disturbed for s in kind_steps),
        }
    ratios: dict[str, float | None] = {}
    if {"batch", "callback"} <= summary.keys():
        for key in ("max_rate_zero_drops", "max_rate", "drain_rate"):
            batch, cb = summary["batch"][key], summary["callback"][key]
            ratios[key] = batch / cb if batch and cb else None

    if args.json:
        doc = {
            "machine": info,
            "config": config,
            "steps": [
                asdict(s) | {"mean_batch": s.mean_batch, "disturbed": s.disturbed}
                for ks in steps.values()
                for s in ks
            ],
            "summary": summary,
            "batch_vs_callback": ratios,
        }
        print(json.dumps(doc, indent=2))
    else:
        print()
        for kind, s in summary.items():
            name = BatchConsumer.name if kind == "batch" else CallbackConsumer.name
            print(
                f"{name}: {mrate(s['max_rate_zero_drops'])} with zero drops, {mrate(s['max_rate'])} overall, "
                f"{mrate(s['drain_rate'])} draining a full ring; "
                f"every event accounted for exactly: {'yes' if s['all_exact'] else 'NO'}"
            )
        labels = {"max_rate_zero_drops": "with zero drops", "max_rate": "overall", "drain_rate": "draining"}
        parts = [f"{ratio:.1f}x {labels[key]}" for key, ratio in ratios.items() if ratio is not None]
        if ratios:
            print(f"batch vs per-record callback: {', '.join(parts) or 'no comparable steps'}")
        if any(s["disturbed_steps"] for s in summary.values()):
            print(
                f"! other work held the CPUs for more than 5% of the step, even after {args.retries} "
                "retries: its numbers measure the machine as much as the consumer"
            )
    return 0 if all(s["all_exact"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
