"""The system under test, piece by piece: cgroups, a delayed network, PostgreSQL, the servers, the app
and the load, each server in a cgroup of its own. run.py builds the whole system from these; bpfscope's
bench tests and the tsa benchmark use parts of it.

Names (cgroups, network namespaces, links, subnets) carry this process's id, so that two runs on one
machine do not meet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bpfscope.domains.bench.limits import Limits, controllers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/scenario.py, what the experiments share
from scenario import remove_cgroups  # noqa: E402 - after its directory is on the path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TAG = f"iab{os.getpid() % 100000}"
# A /24 of 10.77.0.0/16 per run: root <-> wan link, and wan <-> far link.
_SUBNET = (os.getpid() % 60) * 4


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    return result


def wait_port(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Group:
    """A cgroup in every hierarchy: cgroup v2 (bpfscope names components by it) and, on a hybrid
    machine, the v1 memory, blkio and cpu controllers (the limits)."""

    def __init__(self, name: str) -> None:
        self.name = f"{TAG}/{name}"
        roots = {Path(p) for p in controllers().values()}
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if parts[2] == "cgroup2":
                self.cgroup2 = Path(parts[1]) / self.name
                roots.add(Path(parts[1]))
        self.dirs = [root / self.name for root in sorted(roots)]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.limits = Limits.of_dir(self.name)

    def weigh_run(self) -> None:
        """The whole run's CPU weight (its directory above every group) against the machine's other work:
        the largest there is. A shared machine's other jobs, each of whose threads weighs as much as the
        run's whole group, would otherwise make every component wait for a CPU; a component's own CPU
        quota still holds. Processes of the run outside its groups (a client) lose to it: put them in a
        group too."""
        cpu = controllers().get("cpu")
        if cpu is not None:
            v2 = (cpu / "cgroup.controllers").exists()
            with contextlib.suppress(OSError):
                (cpu / TAG / ("cpu.weight" if v2 else "cpu.shares")).write_text("10000" if v2 else "262144")

    def join(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def preexec(self) -> Callable[[], None]:
        """For subprocess: the child joins the group before it runs its program."""
        return lambda: self.join(os.getpid())

    def pids(self) -> list[int]:
        return [int(p) for p in (self.cgroup2 / "cgroup.procs").read_text().split()]

    def close(self) -> None:
        remove_cgroups(self.pids(), self.dirs)
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.parent.rmdir()  # the run's directory, once its last group is gone


class DelayedNetwork:
    """A namespace ``far`` reached from this one through a namespace ``wan`` whose relay (relay.py)
    holds every packet ``delay_ms`` in each direction: a known network delay on that hop.

        this netns  <veth>  wan netns (relay)  <veth>  far netns
        10.77.K.1           10.77.K.2  10.77.K+1.1     10.77.K+1.2
    """

    def __init__(self, delay_ms: float) -> None:
        self.delay_ms = delay_ms
        self.wan, self.far = f"{TAG}-wan", f"{TAG}-far"
        self.near_ip = f"10.77.{_SUBNET}.1"
        self.far_ip = f"10.77.{_SUBNET + 1}.2"
        self.relay: subprocess.Popen | None = None

    def _in(self, ns: str, *args: str) -> None:
        sh("ip", "netns", "exec", ns, *args)

    def up(self) -> DelayedNetwork:
        self.down()
        a, b = f"10.77.{_SUBNET}", f"10.77.{_SUBNET + 1}"
        for ns in (self.wan, self.far):
            sh("ip", "netns", "add", ns)
            self._in(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{TAG}n", "type", "veth", "peer", f"{TAG}w", "netns", self.wan)
        sh(
            "ip",
            "link",
            "add",
            f"{TAG}f",
            "netns",
            self.far,
            "type",
            "veth",
            "peer",
            f"{TAG}v",
            "netns",
            self.wan,
        )
        sh("ip", "addr", "add", f"{a}.1/24", "dev", f"{TAG}n")
        sh("ip", "link", "set", f"{TAG}n", "up")
        sh("ip", "route", "add", f"{b}.0/24", "via", f"{a}.2")
        self._in(self.wan, "ip", "addr", "add", f"{a}.2/24", "dev", f"{TAG}w")
        self._in(self.wan, "ip", "addr", "add", f"{b}.1/24", "dev", f"{TAG}v")
        self._in(self.far, "ip", "addr", "add", f"{b}.2/24", "dev", f"{TAG}f")
        for ns, dev in ((self.wan, f"{TAG}w"), (self.wan, f"{TAG}v"), (self.far, f"{TAG}f")):
            self._in(ns, "ip", "link", "set", dev, "up")
        self._in(self.far, "ip", "route", "add", "default", "via", f"{b}.1")
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ):
            self._in(self.wan, "sysctl", "-qw", key)
        # The relay opens the TUN device; every packet that comes in from either link goes to it, and
        # what it writes back is routed by the main table.
        dly = f"{TAG}d"
        self.relay = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.wan,
                sys.executable,
                str(HERE / "relay.py"),
                dly,
                str(self.delay_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.relay.stdout is not None
        if self.relay.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay relay did not start")
        self._in(self.wan, "ip", "link", "set", dly, "up")
        self._in(self.wan, "sysctl", "-qw", f"net.ipv4.conf.{dly}.rp_filter=0")
        self._in(self.wan, "ip", "route", "add", "default", "dev", dly, "table", "100")
        for dev in (f"{TAG}w", f"{TAG}v"):
            self._in(self.wan, "ip", "rule", "add", "iif", dev, "lookup", "100")
        return self

    def run_far(self, args: list[str]) -> list[str]:
        """A command line that runs in the far namespace."""
        return ["ip", "netns", "exec", self.far, *args]

    def down(self) -> None:
        if self.relay is not None:
            stop(self.relay)
            self.relay = None
        for ns in (self.wan, self.far):
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", f"{TAG}n", check=False)


class Postgres:
    """A throw-away PostgreSQL 15 cluster in a cgroup (and a network namespace, through ``run``), with
    pgbench's tables; track_io_timing on (its own view of its reads)."""

    def __init__(
        self,
        workdir: Path,
        group: Group,
        host: str = "127.0.0.1",
        run: Callable[[list[str]], list[str]] = lambda args: args,
        shared_buffers: str = "16MB",
    ) -> None:
        self.workdir, self.group, self.host, self.run = workdir, group, host, run
        self.shared_buffers = shared_buffers
        self.port = 5432 if host != "127.0.0.1" else free_port()
        self.data = workdir / "data"
        self.proc: subprocess.Popen | None = None

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user=postgres dbname=postgres sslmode=disable"

    def start(self) -> Postgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        shutil.chown(self.workdir, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        if not (self.data / "PG_VERSION").exists():
            sh(*as_pg, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        settings = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.workdir),
            "shared_buffers": self.shared_buffers,
            "track_io_timing": "on",
            "max_connections": 200,
            "synchronous_commit": "off",
        }
        (self.data / "postgresql.auto.conf").write_text(
            "".join(f"{k} = '{v}'\n" for k, v in settings.items())
        )
        # Clients come from other namespaces too (through the delay).
        (self.data / "pg_hba.conf").write_text("local all all trust\nhost all all 0.0.0.0/0 trust\n")
        self.proc = subprocess.Popen(
            self.run([*as_pg, str(PG_BIN / "postgres"), "-D", str(self.data)]),
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "log", "a"),  # noqa: SIM115 - the server's, closed with it
            preexec_fn=self.group.preexec(),
        )
        wait_port(self.host, self.port, self.proc)
        deadline = time.monotonic() + 120
        while sh(*self.client(str(PG_BIN / "pg_isready"), "-q"), check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not start: see {self.workdir / 'log'}")
            time.sleep(0.2)
        return self

    @property
    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def client(self, *args: str) -> list[str]:
        """A client program's command line, as the postgres user, over TCP."""
        return [
            "runuser",
            "-u",
            "postgres",
            "--",
            *args,
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            "postgres",
        ]

    def sql(self, query: str) -> str:
        return sh(*self.client("psql", "-X", "-A", "-t", "-c", query, "postgres")).stdout.strip()

    def pgbench_init(self, scale: int) -> None:
        if self.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'pgbench_accounts'") != "1":
            sh(*self.client("pgbench", "-i", "-q", "-s", str(scale), "postgres"))
        self.sql("CHECKPOINT")

    def evict(self) -> None:
        """Drop the database's files from the page cache: its next reads go to the disk."""
        for path in (self.data / "base").rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def warm(self) -> None:
        """Read every file of its databases once, from a process in its memory cgroup: under a memory
        limit the cache keeps what fits and the kernel evicts the rest (remembering each eviction: the
        steady state of a database that has run so); without one, all of it is cached."""
        self.group.limits.warm(sorted(p for p in (self.data / "base").rglob("*") if p.is_file()), 1 << 40)

    def stop(self) -> None:
        if self.proc is not None:
            # Fast shutdown, told to the postmaster itself (runuser does not pass signals on).
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(self.postmaster, signal.SIGINT)
            stop(self.proc, signal.SIGINT)
            self.proc = None


@contextlib.contextmanager
def started(
    cmd: list[str], group: Group, ready: str | None = "ready", **kwargs: object
) -> Iterator[subprocess.Popen]:
    """A server in its group, stopped afterwards; ``ready`` is the line it prints once it listens."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
        text=True,
        preexec_fn=group.preexec(),
        **kwargs,
    )  # type: ignore[call-overload]
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != ready:
                raise RuntimeError(f"{cmd[0]} did not start: {line!r}")
        yield proc
    finally:
        stop(proc)


def app_command(
    port: int, db_dsn: str, redis: str | None = None, work_ms: float = 0.0, rows: int = 1
) -> list[str]:
    cmd = [sys.executable, str(HERE / "app.py"), str(port), "--db", db_dsn, "--work-ms", str(work_ms)]
    cmd += ["--rows", str(rows)]
    return cmd + (["--redis", redis] if redis else [])


def load_command(host: str, port: int, rate: float, seconds: float, keys: int, log: Path) -> list[str]:
    return [
        *(sys.executable, str(HERE / "load.py"), host, str(port)),
        *("--rate", str(rate), "--seconds", str(seconds), "--keys", str(keys), "--log", str(log)),
    ]


def read_load_log(path: Path) -> list[int]:
    """The load generator's latencies (ns), one per request."""
    return [int(line.split()[3]) for line in path.read_text().splitlines()]
