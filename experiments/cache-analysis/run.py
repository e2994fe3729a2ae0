#!/usr/bin/env python3
"""The cache analysis experiment: a database that is slow because its data no longer fits in the page cache.

One command, as root, after ./setup.sh:

    experiments/cache-analysis/run.py [--short] [--out DIR] [--json]

It starts a private PostgreSQL 15 cluster with a small shared_buffers (so the operating system's page
cache holds the data), loads pgbench's tables, and puts the server in a memory cgroup. Then, for each RAM
limit, from the smallest: stop the server, drop its files from the page cache, set the limit, start it
again, read the tables once (so the cache is full, as on a server that has run for a while), warm up, and
measure pgbench's select-only workload (-S: one random primary-key lookup per transaction) while bpfscope
watches the server's cgroup. Page cache is charged to the memory cgroup, so the limit bounds how much of
the data the server keeps cached.

At each setting, over one window in the middle of a pgbench run: TPS and latency (pgbench), page-cache
lookups, misses and hit ratio (bpfscope cachestat's collector, on the server's cgroup), VFS reads
(vfsstat's), bpfscope check's verdicts (its rules, on the same window), and beside them independent
truths: each server process's I/O accounting (/proc/PID/io), the bytes its cgroup read from disk (blkio),
its memory.stat, and CPU and RAM as a dashboard sees them (system-wide). The report (--out) has a table
per setting, a picture of TPS and hit ratio against RAM, and the point where adding RAM stops paying.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE.parent.parent / ".venv" / "bin" / "python"
if Path(sys.prefix) != VENV_PYTHON.parent.parent and VENV_PYTHON.exists():
    # Started as ./run.py: run in the project's environment (psutil, matplotlib, bpfscope).
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])

try:
    import psutil
except ImportError:
    sys.exit("cache-analysis: psutil is missing: run ./setup.sh first")
sys.path.insert(0, str(HERE.parent))
from scenario import Watcher, as_postgres, parse_pgbench, remove_cgroups  # noqa: E402 - after its directory is on the path

if TYPE_CHECKING:
    from bpfscope.health.window import CheckWindow

PG_BIN = Path("/usr/lib/postgresql/15/bin")
MB = 1 << 20
# Small, so that the operating system's page cache, not PostgreSQL's buffers, decides the hit ratio.
SHARED_BUFFERS = "16MB"
CLIENTS = 4
# The server's disk serves at most this many reads per second, as a cloud volume does (3000 is the
# baseline of AWS gp3 volumes): on this machine's local disk a miss costs 0.1 ms, less than the CPU the
# kernel spends on it, so a starved cache would show as CPU rather than as waiting.
DEFAULT_READ_IOPS = 3000


@dataclass(frozen=True)
class Mode:
    """The data set and the RAM limits tried. The data set (pgbench_accounts and its index) is about
    15 MB per unit of scale; the smallest limits hold a fraction of it, the largest all of it."""

    scale: int
    limits_mb: tuple[int, ...]
    seconds: int
    warmup: int


FULL = Mode(scale=50, limits_mb=(128, 256, 384, 512, 640, 768, 896, 1024, 1536), seconds=12, warmup=4)
SHORT = Mode(scale=10, limits_mb=(64, 128, 384), seconds=6, warmup=2)


def fail(message: str) -> None:
    sys.exit(f"cache-analysis: {message}")


def v1_mount(controller: str) -> Path | None:
    """Where the cgroup v1 hierarchy with this controller is mounted."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "cgroup" and controller in parts[3].split(","):
            return Path(parts[1])
    return None


def cgroup2_mount() -> Path | None:
    from bpfscope.sources.cgroups import cgroup2_mounts

    return next(iter(cgroup2_mounts()), None)


def preflight() -> None:
    """Everything the experiment needs, each missing piece named in one line."""
    if os.geteuid() != 0:
        fail("run it as root: it starts PostgreSQL in cgroups and loads BPF programs")
    try:
        import bpfscope  # noqa: F401
    except ImportError:
        fail("bpfscope is not installed: run ./setup.sh first")
    for tool in (PG_BIN / "initdb", PG_BIN / "pg_ctl", PG_BIN / "pgbench", PG_BIN / "psql"):
        if not tool.exists():
            fail(f"{tool} is missing: install Debian's postgresql-15")
    if not Path("/usr/share/postgresql/15/extension/pg_prewarm.control").exists():
        fail("PostgreSQL's pg_prewarm extension is missing: install Debian's postgresql-15")
    if shutil.which("runuser") is None:
        fail("runuser is missing (util-linux)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        fail("no postgres user: install Debian's postgresql-15")
    if v1_mount("memory") is None or v1_mount("blkio") is None:
        fail("needs the cgroup v1 memory and blkio controllers (a hybrid cgroup layout)")
    if cgroup2_mount() is None:
        fail("no cgroup v2 mount: bpfscope's --cgroup filter needs one")


class ServerCgroups:
    """The server's cgroups: memory (v1) bounds its RAM, page cache included; blkio (v1) counts the bytes
    it reads from disk; the cgroup v2 directory is what bpfscope's --cgroup filters on."""

    def __init__(self, name: str) -> None:
        memory, blkio, unified = v1_mount("memory"), v1_mount("blkio"), cgroup2_mount()
        assert memory is not None and blkio is not None and unified is not None  # checked in preflight
        self.memory = memory / name
        self.blkio = blkio / name
        self.unified = unified / name

    @property
    def dirs(self) -> tuple[Path, Path, Path]:
        return self.memory, self.blkio, self.unified

    def create(self) -> None:
        for d in self.dirs:
            d.mkdir()

    def enter(self) -> None:
        """Move the calling process into all three (a preexec_fn: the server is started inside them, so
        every process it forks is charged there from its first page)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text("0")

    def set_limit(self, limit_bytes: int) -> None:
        (self.memory / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def limit_read_iops(self, disk: str, iops: int) -> None:
        """At most this many read requests per second to the disk, as a cloud volume's provisioned IOPS
        allow; 0 lifts the limit."""
        dev = (Path("/sys/block") / disk / "dev").read_text().strip()
        (self.blkio / "blkio.throttle.read_iops_device").write_text(f"{dev} {iops}")

    def oom_kills(self) -> int:
        """Processes the memory cgroup's OOM killer has killed so far."""
        for line in (self.memory / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def empty(self) -> None:
        """Uncharge (reclaim) everything charged to the memory cgroup: only allowed with no task inside."""
        (self.memory / "memory.force_empty").write_text("0")

    def memory_stat(self) -> dict[str, int]:
        stat = {}
        for line in (self.memory / "memory.stat").read_text().splitlines():
            key, value = line.split()
            stat[key] = int(value)
        stat["usage_in_bytes"] = int((self.memory / "memory.usage_in_bytes").read_text())
        return stat

    def disk_reads(self) -> tuple[int, int]:
        """Bytes and requests the cgroup read from all disks (blkio's per-cgroup accounting of bios)."""

        def total(file: str) -> int:
            lines = (self.blkio / file).read_text().splitlines()
            return sum(
                int(line.split()[2]) for line in lines if len(line.split()) == 3 and line.split()[1] == "Read"
            )

        return total("blkio.throttle.io_service_bytes"), total("blkio.throttle.io_serviced")

    def tasks(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.unified / "cgroup.procs").read_text().split()]
        return []

    def remove(self) -> None:
        """Kill what is left inside (only on a failed stop), then remove the directories."""
        remove_cgroups(self.tasks(), self.dirs)


class Server:
    """A throw-away PostgreSQL cluster on a private Unix socket (no TCP listener), started in its cgroups."""

    def __init__(self, workdir: Path, port: int, cgroups: ServerCgroups) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = port
        self.cgroups = cgroups
        self.running = False

    def initdb(self) -> None:
        shutil.chown(self.workdir, "postgres")
        as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"], check=True
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.workdir} -c shared_buffers={SHARED_BUFFERS} -c listen_addresses=''"
        )
        command = [
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.workdir / "log"),
        ]
        kills_before = self.cgroups.oom_kills()
        started = as_postgres([*command, "-w", "start"], preexec_fn=self.cgroups.enter)
        if started.returncode != 0:
            if self.cgroups.oom_kills() > kills_before:
                raise RuntimeError(
                    "PostgreSQL did not start: the RAM limit is too small for the server itself"
                )
            log = self.workdir / "log"
            lines = log.read_text().strip().splitlines() if log.exists() else []
            raise RuntimeError(f"PostgreSQL did not start: {lines[-1] if lines else started.stderr.strip()}")
        self.running = True

    def stop(self) -> None:
        if not self.running:
            return
        # A fast stop checkpoints, so the data files hold every change and their cache can be dropped.
        stopped = as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        if stopped.returncode != 0:
            as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        self.running = False

    def psql(self, query: str) -> str:
        result = as_postgres(
            [
                str(PG_BIN / "psql"),
                "-qAtX",
                "-h",
                str(self.workdir),
                "-p",
                str(self.port),
                "-c",
                query,
                "postgres",
            ]
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def pgbench(self, *args: str) -> dict[str, float]:
        result = as_postgres(
            [str(PG_BIN / "pgbench"), "-h", str(self.workdir), "-p", str(self.port), *args, "postgres"]
        )
        if result.returncode != 0:
            raise RuntimeError(f"pgbench failed: {result.stderr.strip()[-500:]}")
        return parse_pgbench(result.stdout)

    def relation_bytes(self) -> dict[str, int]:
        rows = self.psql(
            "select relname, pg_relation_size(oid) from pg_class "
            "where relname like 'pgbench%' and relkind in ('r', 'i')"
        )
        return {name: int(size) for name, size in (row.split("|") for row in rows.splitlines())}


def drop_page_cache(directory: Path) -> None:
    """Drop the directory's files from the page cache (written back already: the server checkpointed on
    stop), wherever the pages are charged, so each setting starts cold."""
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def disk_of(path: Path) -> str:
    """The whole disk under a path (vda for vda1): the disk a dashboard would show."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    return sysfs.parent.name if (sysfs / "partition").exists() else sysfs.name


def diskstats_reads(disk: str) -> int:
    """Read requests completed by one disk (/proc/diskstats): every process's reads."""
    from bpfscope.domains.block.iostat import read_diskstats

    counters = read_diskstats().get(disk)
    return counters["rd_ios"] if counters else 0


def cgroup_io(pids: list[int]) -> dict[int, dict[str, int]]:
    """Each process's I/O accounting (/proc/PID/io): rchar is what its read calls returned (from the
    page cache or not), syscr how many read calls it made, read_bytes what it had read from disk."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
            out[pid] = {k: int(fields[k]) for k in ("rchar", "syscr", "read_bytes")}
    return out


def io_delta(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]) -> dict[str, int]:
    """Summed over the processes alive at both ends (the window is inside one pgbench run: its backends
    live through it)."""
    keys = ("rchar", "syscr", "read_bytes")
    return {k: sum(after[p][k] - before[p][k] for p in after if p in before) for k in keys}


def parse_progress(text: str, start: float, end: float) -> dict[str, Any]:
    """pgbench -P 1's lines ("progress: 5.0 s, 21234.5 tps, lat 0.188 ms stddev ...") whose second ended
    inside [start, end] (seconds since pgbench started). TPS is their median: other programs on the
    machine take CPU time in bursts, and the median of the seconds is less moved by a burst than the mean."""
    tps: list[float] = []
    lat: list[float] = []
    for line in text.splitlines():
        parts = line.replace(",", "").split()
        is_progress = len(parts) > 6 and parts[0] == "progress:" and parts[4:6] == ["tps", "lat"]
        if is_progress and start + 0.5 <= float(parts[1]) <= end + 0.5:
            tps.append(float(parts[3]))
            lat.append(float(parts[6]))
    if not tps:
        return {}
    return {
        "tps": statistics.median(tps),
        "latency_ms": sum(t * x for t, x in zip(tps, lat, strict=True)) / (sum(tps) or 1e-9),
        "tps_per_second": tps,
    }


def seconds_within(records: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """cachestat's interval records that lie inside [start, end] (wall-clock seconds: a record's ts is the
    end of its interval); 50 ms of slack for the moment between the tool's clock and ours."""
    return [
        r
        for r in records
        if r["record"] == "cachestat" and r["ts"] - r["interval_s"] >= start - 0.05 and r["ts"] <= end + 0.05
    ]


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Setting:
    limit_mb: int
    seconds: float = 0.0
    # pgbench -P 1 over the measured window; its final report over the whole run (warm-up included)
    pgbench: dict[str, float] = field(default_factory=dict)
    pgbench_run: dict[str, float] = field(default_factory=dict)
    # bpfscope, on the server's cgroup
    cache: dict[str, float] = field(default_factory=dict)
    vfs_reads: int = 0
    # independent truths: the processes' I/O accounting, the cgroup's blkio and memory.stat
    proc_io: dict[str, int] = field(default_factory=dict)
    cgroup_read_bytes: int = 0
    cgroup_read_ios: int = 0
    memory_before: dict[str, int] = field(default_factory=dict)
    memory_after: dict[str, int] = field(default_factory=dict)
    # as a dashboard sees the machine
    disk_read_ios: int = 0
    cpu_busy_pct: float = 0.0
    # CPU the rest of the machine used meanwhile (busy minus the server's and pgbench's), in percent of
    # all CPUs: other work that slows pgbench down whatever the cache does
    cpu_others_pct: float = 0.0
    ram_used_pct: float = 0.0
    ram_available_gb: float = 0.0
    check: list[dict[str, Any]] = field(default_factory=list)
    # `bpfscope cachestat --json --cgroup PATH 1`, as a person would run it: its seconds inside the window
    cachestat_cli: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.pgbench.get("tps", 0.0)

    @property
    def truth_hit_ratio(self) -> float | None:
        """Pages the server's read calls returned against pages its cgroup read from disk, in percent."""
        asked = self.proc_io.get("rchar", 0)
        if not asked:
            return None
        return max(0.0, 100.0 * (1 - self.cgroup_read_bytes / asked))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tps": self.tps, "truth_hit_ratio": self.truth_hit_ratio}


def health_window() -> CheckWindow:
    """bpfscope check's rules over the measured window: the verdicts and the summary line a person
    running `bpfscope check` then would read. pgbench, the cachestat command and the psql calls are this
    process's children, which bpfscope leaves out of what it watches unless told: include_self keeps
    them in, as `bpfscope check` run beside the experiment sees them."""
    from bpfscope.health.rule import default_rules
    from bpfscope.health.window import CheckWindow

    return CheckWindow(default_rules(), include_self=True)


def cpu_busy_pct(before: Any, after: Any) -> float:
    """System-wide CPU busy over a window, as a dashboard shows it (iowait counts as idle)."""
    delta = {f: max(0.0, getattr(after, f) - getattr(before, f)) for f in after._fields}
    # guest time is already inside user time, as psutil counts it
    total = sum(v for f, v in delta.items() if f not in ("guest", "guest_nice"))
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    return 100.0 * (total - idle) / total if total else 0.0


def reset_cache(server: Server, cgroups: ServerCgroups, limit_mb: int) -> None:
    """Restart the server under a new limit with none of its data cached, then read the table and its
    index once through the kernel: the cache fills up to the limit as on a server that has run for a
    while, and the index, read last, starts cached."""
    server.stop()
    drop_page_cache(server.data)
    cgroups.empty()
    cgroups.set_limit(limit_mb * MB)
    server.start()
    server.psql(
        "create extension if not exists pg_prewarm; "
        "select pg_prewarm('pgbench_accounts', 'read'), pg_prewarm('pgbench_accounts_pkey', 'read')"
    )


def measure(server: Server, cgroups: ServerCgroups, mode: Mode, limit_mb: int) -> Setting:
    """One RAM limit: pgbench -S runs for warm-up + window + a margin; the window is measured in the middle
    of the run, after every client has connected, so that the backends' start-up (page faults on the
    server's binary and libraries) stays out of it and every backend lives through it."""
    from bpfscope.domains.cache.cachestat import CachestatCollector, CachestatConfig
    from bpfscope.domains.cache.vfsstat import VfsCollector, VfsConfig

    setting = Setting(limit_mb)
    reset_cache(server, cgroups, limit_mb)
    cgroup = str(cgroups.unified)
    disk = disk_of(server.data)
    with contextlib.ExitStack() as stack:
        # Every program loaded and attached before the window opens.
        cache = stack.enter_context(CachestatCollector(CachestatConfig(cgroup=cgroup)))
        cache.open()
        vfs = stack.enter_context(VfsCollector(VfsConfig(cgroup=cgroup)))
        vfs.open()
        cli = stack.enter_context(Watcher("cachestat", "--cgroup", cgroup, "1"))
        check = stack.enter_context(health_window())
        progress = stack.enter_context(tempfile.TemporaryFile("w+"))
        # Started as the postgres user directly (not through runuser), so that killing it kills pgbench.
        bench = subprocess.Popen(
            [str(PG_BIN / "pgbench"), "-h", str(server.workdir), "-p", str(server.port), "-S",
             "-c", str(CLIENTS), "-j", "2", "-P", "1", "-T", str(mode.warmup + mode.seconds + 2), "postgres"],
            stdout=subprocess.PIPE, stderr=progress, text=True, user="postgres", group="postgres",
            extra_groups=[], cwd="/",
        )  # fmt: skip
        stack.callback(lambda: bench.poll() is None and bench.kill())
        t0 = time.monotonic()
        time.sleep(mode.warmup)

        # The window: every counter read at its start and at its end, bpfscope's and the truths alike, in
        # the same order and back to back at both ends, so that they count the same events.
        check.start()
        disk_before, cpu_before = diskstats_reads(disk), psutil.cpu_times()
        ours_before = cpu_seconds([*cgroups.tasks(), bench.pid])
        setting.memory_before = cgroups.memory_stat()
        cache.start()
        vfs.start()
        io_before, blk_before = cgroup_io(cgroups.tasks()), cgroups.disk_reads()
        start, wall_start = time.monotonic(), time.time()
        time.sleep(mode.seconds)
        end, wall_end = time.monotonic(), time.time()
        cache_sample = cache.sample()
        vfs_sample = vfs.sample()
        io_after, blk_after = cgroup_io(cgroups.tasks()), cgroups.disk_reads()
        disk_after, cpu_after = diskstats_reads(disk), psutil.cpu_times()
        ours = cpu_seconds([*cgroups.tasks(), bench.pid]) - ours_before
        setting.memory_after = cgroups.memory_stat()
        vm = psutil.virtual_memory()
        setting.check = check.finish().records(time.time())
        setting.cachestat_cli = seconds_within(cli.stop(), wall_start, wall_end)

        out, _ = bench.communicate(timeout=60)
        if bench.returncode != 0:
            progress.seek(0)
            raise RuntimeError(f"pgbench failed: {progress.read().strip()[-500:]}")
        progress.seek(0)
        setting.pgbench = parse_progress(progress.read(), start - t0, end - t0)
        setting.pgbench_run = parse_pgbench(out)
    setting.seconds = end - start
    counts = cache_sample.counts
    setting.cache = {
        "lookups": cache_sample.lookups,
        "read_pages": counts.read_pages,
        "fault_pages": counts.fault_pages,
        "hits": cache_sample.hits,
        "misses": cache_sample.misses,
        "hit_ratio": cache_sample.hit_ratio,
        "ahead": cache_sample.ahead,
    }
    setting.vfs_reads = vfs_sample.total.reads
    setting.proc_io = io_delta(io_before, io_after)
    setting.cgroup_read_bytes = blk_after[0] - blk_before[0]
    setting.cgroup_read_ios = blk_after[1] - blk_before[1]
    setting.disk_read_ios = disk_after - disk_before
    setting.cpu_busy_pct = cpu_busy_pct(cpu_before, cpu_after)
    ours_pct = 100.0 * ours / (setting.seconds * (psutil.cpu_count() or 1))
    setting.cpu_others_pct = max(0.0, setting.cpu_busy_pct - ours_pct)
    setting.ram_used_pct, setting.ram_available_gb = vm.percent, vm.available / (1 << 30)
    return setting


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the server, cgroups and files are cleaned up either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(mode: Mode, port: int, read_iops: int) -> dict[str, Any]:
    name = f"bse-cache-{os.getpid()}"
    settings: list[Setting] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{name}-", dir="/var/tmp")))
        workdir.chmod(0o755)  # the postgres user reaches its data directory inside
        cgroups = ServerCgroups(name)
        stack.callback(cgroups.remove)
        cgroups.create()
        cgroups.limit_read_iops(disk_of(workdir), read_iops)
        server = Server(workdir / "pg", port, cgroups)
        server.workdir.mkdir()
        stack.callback(server.stop)
        server.initdb()
        server.start()
        print(f"loading pgbench tables (scale {mode.scale})...", file=sys.stderr)
        server.pgbench("-i", "-q", "-s", str(mode.scale))
        relations = server.relation_bytes()
        for limit in mode.limits_mb:
            setting = measure(server, cgroups, mode, limit)
            ratio = setting.cache["hit_ratio"]
            print(
                f"RAM limit {limit} MB: {setting.tps:.0f} TPS, hit ratio {ratio or 0:.1f}%", file=sys.stderr
            )
            settings.append(setting)
    return {
        "mode": dataclasses.asdict(mode),
        "clients": CLIENTS,
        "read_iops": read_iops,
        "shared_buffers": SHARED_BUFFERS,
        "relations": relations,
        "data_mb": sum(relations.values()) / MB,
        "settings": [s.to_dict() for s in settings],
    }


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def limits_mb(text: str) -> tuple[int, ...]:
    limits = tuple(sorted({positive(part) for part in text.split(",") if part.strip()}))
    if not limits:
        raise argparse.ArgumentTypeError("no RAM limit given")
    return limits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "report", help="Where the report goes.")
    parser.add_argument("--short", action="store_true", help="Small data set, 3 RAM limits (about a minute).")
    parser.add_argument(
        "--read-iops",
        type=not_negative,
        default=DEFAULT_READ_IOPS,
        help="Read requests per second the server's disk serves (blkio throttle); 0: the bare disk.",
    )
    parser.add_argument("--scale", type=positive, help="pgbench's scale (about 15 MB of data per unit).")
    parser.add_argument(
        "--limits", type=limits_mb, help="RAM limits in MB, comma-separated (e.g. 256,512,1024)."
    )
    parser.add_argument("--seconds", type=positive, help="The measured window at each limit.")
    parser.add_argument("--port", type=int, default=45432, help="The server's port (its Unix socket's name).")
    parser.add_argument("--json", action="store_true", help="Also write every measurement to results.json.")
    args = parser.parse_args()
    preflight()
    mode = SHORT if args.short else FULL
    mode = dataclasses.replace(
        mode,
        scale=args.scale or mode.scale,
        limits_mb=args.limits or mode.limits_mb,
        seconds=args.seconds or mode.seconds,
    )
    from bpfscope.errors import BpfscopeError

    try:
        with sigterm_as_interrupt():
            results = run(mode, args.port, args.read_iops)
    except KeyboardInterrupt:
        fail("interrupted; the server, its cgroups and its files are removed")
    except (RuntimeError, subprocess.CalledProcessError, OSError, BpfscopeError) as error:
        fail(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    from report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    if args.json:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report = write_report(args.out, results)
    print(f"report: {report}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
