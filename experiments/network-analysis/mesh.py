"""A small service mesh on one machine: each service in a network namespace of its own, neighbours joined
by veth pairs, real servers from Debian packages.

    client ──link 1── gateway ──link 2── sidecar ──link 3── app ──link 4── db
    (Python    (nginx,          (haproxy,        (nginx,       (PostgreSQL 15)
     client)    reverse proxy)   sidecar proxy)   content;
                                                  pgbench as its
                                                  database client)

Every hop terminates TCP: the gateway's nginx opens its own connections to haproxy, haproxy to the app,
so each link carries its own connections, and a fault on one link shows on that link's connections only.
Addresses are 10.243.N.1 (left) and 10.243.N.2 (right) on link N, inside these namespaces alone.

Everything is named with the ``bsb`` prefix (namespaces ``bsb-client`` ... ``bsb-db``, veths
``bsb1l``/``bsb1r`` ..., nftables table ``bsb_loss``) and removed on every way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PREFIX = "bsb-"
SERVICES = ("client", "gateway", "sidecar", "app", "db")
NETNS = {s: f"{PREFIX}{s}" for s in SERVICES}
PORTS = {"gateway": 42080, "sidecar": 42081, "app": 42082, "db": 42543}
LOSS_TABLE = "bsb_loss"
# How often the tools report (seconds): tcpretrans and tcptop every second; sockstat twice a second,
# since a transfer's send buffer fills and drains within a second or two.
TOOL_INTERVAL = 1.0
SOCKSTAT_INTERVAL = 0.5
# Each response the client asks for: large enough that a transfer outlives a few round trips, so that its
# socket buffers fill when the path slows down.
RESPONSE_BYTES = 4 << 20
APP_SNDBUF = "512k"


@dataclass(frozen=True)
class Link:
    number: int
    left: str  # service on the left (nearer the client)
    right: str

    @property
    def name(self) -> str:
        return f"{self.left}->{self.right}"

    @property
    def subnet(self) -> str:
        return f"10.243.{self.number}."

    @property
    def left_ip(self) -> str:
        return f"{self.subnet}1"

    @property
    def right_ip(self) -> str:
        return f"{self.subnet}2"

    @property
    def veths(self) -> tuple[str, str]:
        return f"bsb{self.number}l", f"bsb{self.number}r"


LINKS = [Link(i + 1, a, b) for i, (a, b) in enumerate(itertools.pairwise(SERVICES))]
LINK_BY_NAME = {link.name: link for link in LINKS}


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120, **kwargs)


def in_ns(service: str, *args: str) -> list[str]:
    return [IP, "netns", "exec", NETNS[service], *args]


def remove_leftovers() -> None:
    """What a run killed with SIGKILL left behind: its namespaces (which takes their veths and nftables
    tables with them) and the processes still in them."""
    for ns in NETNS.values():
        pids = run(IP, "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(IP, "netns", "del", ns, check=False)


@contextlib.contextmanager
def topology() -> Iterator[None]:
    remove_leftovers()
    try:
        for ns in NETNS.values():
            run(IP, "netns", "add", ns)
            run(IP, "-n", ns, "link", "set", "lo", "up")
        for link in LINKS:
            left, right = link.veths
            run(IP, "link", "add", left, "netns", NETNS[link.left], "type", "veth", "peer", right, "netns",
                NETNS[link.right])  # fmt: skip
            for service, dev, addr in ((link.left, left, link.left_ip), (link.right, right, link.right_ip)):
                run(IP, "-n", NETNS[service], "addr", "add", f"{addr}/24", "dev", dev)
                run(IP, "-n", NETNS[service], "link", "set", dev, "up")
        yield
    finally:
        remove_leftovers()


@dataclass
class Servers:
    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pg_data: Path | None = None

    def start_all(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o755)
        self._content()
        self._postgres()
        self._nginx("app", self._app_conf())
        self._haproxy()
        self._nginx("gateway", self._gateway_conf())
        for service in ("app", "sidecar", "gateway"):
            self._wait_port(service)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.pg_data is not None and (self.pg_data / "postmaster.pid").exists():
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-m", "immediate", "-w", "stop")

    def pids(self) -> dict[str, int]:
        out = {name: proc.pid for name, proc in self.procs.items()}
        if self.pg_data is not None and (self.pg_data / "postmaster.pid").exists():
            out["db"] = int((self.pg_data / "postmaster.pid").read_text().split()[0])
        return out

    def _content(self) -> None:
        root = self.work / "www"
        root.mkdir(exist_ok=True)
        (root / "big").write_bytes(os.urandom(RESPONSE_BYTES))
        (root / "small").write_bytes(b"ok\n")

    def _spawn(self, name: str, service: str, *cmd: str) -> None:
        log = (self.work / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            in_ns(service, *cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _nginx(self, service: str, http_block: str) -> None:
        prefix = self.work / service
        prefix.mkdir(exist_ok=True)
        (prefix / "logs").mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            "user root;\nworker_processes 1;\ndaemon off;\n"
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n access_log off;\n client_body_temp_path {prefix}/body;\n"
            f" proxy_temp_path {prefix}/proxy;\n fastcgi_temp_path {prefix}/fcgi;\n"
            f" uwsgi_temp_path {prefix}/uwsgi;\n scgi_temp_path {prefix}/scgi;\n"
            f" keepalive_requests 100000;\n{http_block}\n}}\n"
        )
        self._spawn(service, service, "nginx", "-c", str(conf), "-p", str(prefix))

    def _app_conf(self) -> str:
        link = LINK_BY_NAME["sidecar->app"]
        # A fixed send buffer (nginx's sndbuf, as deployments set to bound memory per connection) smaller
        # than a response: the buffer stays full while a response drains, for as long as the path needs.
        return (
            f" sendfile on;\n server {{\n  listen {link.right_ip}:{PORTS['app']} sndbuf={APP_SNDBUF};\n"
            f"  root {self.work / 'www'};\n }}"
        )

    def _gateway_conf(self) -> str:
        inside = LINK_BY_NAME["gateway->sidecar"]
        outside = LINK_BY_NAME["client->gateway"]
        # Streaming, not buffering to disk: a slow upstream is felt downstream, as in most gateways.
        return (
            f" upstream sidecar {{ server {inside.right_ip}:{PORTS['sidecar']}; keepalive 32; }}\n"
            f" server {{\n  listen {outside.right_ip}:{PORTS['gateway']};\n"
            "  location / {\n   proxy_pass http://sidecar;\n   proxy_http_version 1.1;\n"
            '   proxy_set_header Connection "";\n   proxy_buffering off;\n  }\n }'
        )

    def _haproxy(self) -> None:
        front = LINK_BY_NAME["gateway->sidecar"]
        back = LINK_BY_NAME["sidecar->app"]
        conf = self.work / "haproxy.cfg"
        conf.write_text(
            "global\n maxconn 4000\n"
            "defaults\n mode http\n timeout connect 5s\n timeout client 120s\n timeout server 120s\n"
            " option http-keep-alive\n"
            f"frontend mesh\n bind {front.right_ip}:{PORTS['sidecar']}\n default_backend app\n"
            f"backend app\n http-reuse always\n server app1 {back.right_ip}:{PORTS['app']}\n"
        )
        self._spawn("sidecar", "sidecar", "haproxy", "-db", "-f", str(conf))

    def _postgres(self) -> None:
        link = LINK_BY_NAME["app->db"]
        data = self.work / "pg"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        shutil.chown(data, "postgres")
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", check=True)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {link.subnet}0/24 trust\n")
        options = (
            f"-p {PORTS['db']} -k {data} -c listen_addresses={link.right_ip} -c shared_buffers=32MB "
            "-c fsync=off"
        )
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start"]
        subprocess.run(
            in_ns("db", "runuser", "-u", "postgres", "--", *cmd), check=True, capture_output=True, timeout=120
        )
        self.pg_data = data

    def _wait_port(self, service: str) -> None:
        link = next(lk for lk in LINKS if lk.right == service)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ok = run(*in_ns(service, "ss", "-Htln", f"sport = :{PORTS[service]}"), check=False).stdout.strip()
            if ok:
                return
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.work / f"{service}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{service} did not listen on {link.right_ip}:{PORTS[service]}: {log}")


def as_postgres(*cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, check=check, timeout=120
    )


@contextlib.contextmanager
def servers(work: Path) -> Iterator[Servers]:
    group = Servers(work)
    try:
        group.start_all()
        yield group
    finally:
        group.stop_all()


def pgbench(*args: str, seconds: float | None = None) -> subprocess.Popen[str]:
    """pgbench in the app's namespace against the database: the app's own database traffic."""
    link = LINK_BY_NAME["app->db"]
    cmd = ["pgbench", "-h", link.right_ip, "-p", str(PORTS["db"]), *args, "postgres"]
    return subprocess.Popen(
        in_ns("app", "runuser", "-u", "postgres", "--", *cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def set_loss(link: Link, percent: int) -> None:
    """Drop ``percent``% of the data the right side of ``link`` sends to the left (the responses),
    at the left side's input, inside its namespace alone: nftables' numgen, since this kernel has no
    netem. The right side's TCP retransmits what was dropped."""
    rules = (
        f"table inet {LOSS_TABLE} {{\n chain input {{\n  type filter hook input priority 0;\n"
        f"  ip saddr {link.right_ip} tcp sport {PORTS[link.right]}"
        f" numgen random mod 100 < {percent} counter drop\n"
        " }\n}\n"
    )
    clear_loss(link)
    subprocess.run(in_ns(link.left, "nft", "-f", "-"), input=rules, text=True, check=True, timeout=30)


def clear_loss(link: Link) -> None:
    run(*in_ns(link.left, "nft", "delete", "table", "inet", LOSS_TABLE), check=False)


def loss_dropped(link: Link) -> int:
    """Packets the loss rule has dropped so far (its nftables counter): the faults really injected."""
    out = run(*in_ns(link.left, "nft", "list", "table", "inet", LOSS_TABLE), check=False).stdout
    match = re.search(r"counter packets (\d+)", out)
    return int(match.group(1)) if match else 0


def set_rate(link: Link, mbit: int) -> None:
    """Limit what the right side of ``link`` sends to the left to ``mbit`` Mbit/s: a token bucket (tc tbf)
    on its veth, with 50 ms of queue before it drops."""
    dev = link.veths[1]
    run(*in_ns(link.right, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
              "burst", "64kb", "latency", "50ms"))  # fmt: skip


def clear_rate(link: Link) -> None:
    run(*in_ns(link.right, "tc", "qdisc", "del", "dev", link.veths[1], "root"), check=False)


@dataclass(frozen=True)
class Fault:
    """What goes wrong on one link: packet loss (percent) or a rate limit (Mbit/s)."""

    kind: str  # "loss" or "rate"
    value: int
    link: Link

    @property
    def name(self) -> str:
        what = f"{self.value}% loss" if self.kind == "loss" else f"rate limit {self.value} Mbit/s"
        return f"{what} on {self.link.name}"

    def apply(self) -> None:
        (set_loss if self.kind == "loss" else set_rate)(self.link, self.value)

    def clear(self) -> None:
        (clear_loss if self.kind == "loss" else clear_rate)(self.link)

    def dropped(self) -> int:
        """Packets the fault dropped: the loss rule's counter, or the token bucket's drops."""
        if self.kind == "loss":
            return loss_dropped(self.link)
        out = run(*in_ns(self.link.right, "tc", "-s", "qdisc", "show", "dev", self.link.veths[1])).stdout
        match = re.search(r"dropped (\d+)", out)
        return int(match.group(1)) if match else 0


def snmp(service: str) -> dict[str, int]:
    """The namespace's own TCP counters (/proc/net/snmp is per network namespace)."""
    lines = run(*in_ns(service, "cat", "/proc/net/snmp")).stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        group = names.split(":")[0]
        for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
            out[f"{group}.{name}"] = int(value)
    return out


def link_bytes(link: Link) -> int:
    """Bytes the right side's veth sent plus received: the link's traffic, counted by the device."""
    dev = link.veths[1]
    stats = Path("/sys/class/net") / dev / "statistics"  # each namespace's own sysfs: read it inside
    text = run(*in_ns(link.right, "cat", str(stats / "rx_bytes"), str(stats / "tx_bytes"))).stdout.split()
    return sum(int(v) for v in text)


def cpu_seconds() -> dict[int, float]:
    """CPU time (user + system) of every process in the mesh's namespaces, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for ns in NETNS.values():
        for pid in run(IP, "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every finally block runs and nothing is left behind."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit("use run.py")
