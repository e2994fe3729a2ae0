"""bpfscope requests: every request a process sends or answers, paired with its response, as it
completes: HTTP/1.x and HTTP/2 (gRPC), DNS, PostgreSQL, Redis; plain or TLS (OpenSSL).

The kernel side (requests.bpf.c) captures the first bytes of every socket call of the selected tasks
with their exact sizes and times; :class:`RequestsCollector` tracks connections, tells their protocol,
parses and pairs (capture.py, protocols/) and emits one record per exchange, of its protocol's table
(records.py: Pixie's tables and column names). Losses are counted per reason: ring full, calls not
followed, heads cut by the capture limit, bytes the parser gave up on, responses whose request was
before the capture.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options, option
from bpfscope.domains.requests import encode, records, stats
from bpfscope.domains.requests.capture import Connection, Tracker, limits
from bpfscope.domains.requests.protocols import PROTOCOLS
from bpfscope.domains.requests.protocols.base import Exchange
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import PACED_DRAIN_S, BpfCollector, Config, Sample, wall_clock_offset_ns
from bpfscope.runtime.losses import Loss, Losses
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.schema import Schema

# OpenSSL's calls that move plaintext: (uprobe, uretprobe) programs for each.
# --store: records reach the disk this often (and at the end).
STORE_FLUSH_S = 10.0
SSL_FUNCTIONS = {
    "SSL_read": ("ssl_read_enter", "ssl_read_exit"),
    "SSL_write": ("ssl_write_enter", "ssl_write_exit"),
    "SSL_read_ex": ("ssl_read_ex_enter", "ssl_read_ex_exit"),
    "SSL_write_ex": ("ssl_write_ex_enter", "ssl_write_ex_exit"),
}


# Every kind of record the command writes: the requests' tables and the interval stats.
SCHEMAS = (*records.SCHEMAS.values(), stats.CONN_STATS, stats.PROCESS_STATS)


def libssl_paths() -> list[str]:
    """The machine's libssl shared libraries (ldconfig's cache): every process linked to one is traced."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    found = {str(Path(m).resolve()) for m in re.findall(r"libssl\.so\.\d+\S* \(.*?\) => (\S+)", listing)}
    return sorted(p for p in found if Path(p).exists())


# Calls read from the ring per drain: a batch becomes several Python objects per call, so a ring that
# filled while the tracer was busy (32 MiB: about 100k calls) would otherwise be held at once (hundreds of
# MB), and take long enough to parse that the ring fills again behind it.
DRAIN_RECORDS = 4096


@dataclass(kw_only=True)
class RequestsConfig(Config):
    protocols: frozenset[str] | None = None  # None: every protocol
    ports: tuple[int, ...] = ()  # either end (in the kernel); () = any
    lport: int = 0
    dport: int = 0
    capture_bytes: int = 4096  # of each call
    keep_secrets: bool = False  # --no-redact
    tls: bool = True  # OpenSSL uprobes
    libssl: tuple[str, ...] = ()  # () = libssl_paths()


class RequestsCollector(BpfCollector[RequestsConfig]):
    """Requests and responses, paired, streamed as they complete."""

    name = "requests"
    bpf_object = "requests"
    # Paced: records wake nobody, drained every PACED_DRAIN_S or at once when the ring is a quarter full
    # (the wake-up ran inside the traced calls). nginx under wrk, woken per record then paced, two runs
    # each: at 6,000 requests/s the tracer's CPU 63-68 -> 34-45 us a request, its BPF time 16-17 ->
    # 10-12 us, the traced p99 486-502 -> 403-514 us; at full speed (72-80 thousand requests/s untraced,
    # 27-29 thousand traced) the same throughput, and a traced p99 of 1.9-2.4 ms against 0.5-1.0 (a
    # drain takes a CPU in longer stretches).
    paced_drain_s = PACED_DRAIN_S
    requires = ("raw_tracepoint", "ringbuf")
    loss_counters = {
        "calls_unseen": ("unseen", "calls not followed (no task storage for the thread)"),
        "tls_unlinked": ("unseen", "TLS calls whose socket was not seen yet"),
    }

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return tuple(records.SCHEMAS.values())

    def rodata(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().rodata(),
            "capture_bytes": c.capture_bytes,
            "targ_ports": bool(c.ports),
            "bs_targ_lport": c.lport,
            "bs_targ_rport": c.dport,
        }

    def max_entries(self) -> dict[str, int]:
        from bpfscope.engine.bpf import ncpus

        # net.bpf.h's owner map is not used here: one entry instead of 65536.
        return {"scratch": ncpus(), "bs_owners": 1}

    def configure(self) -> None:
        # The uprobes are attached by hand, to each libssl; without --no-tls they are not even loaded.
        assert self.obj is not None
        for pair in SSL_FUNCTIONS.values():
            for name in pair:
                self.obj.programs[name].autoattach = False
                self.obj.programs[name].autoload = self.config.tls

    def attach(self) -> None:
        assert self.obj is not None
        self.obj.load()
        for port in self.config.ports:  # before any program runs
            self.obj.maps["ports"].update(struct.pack("<H", port), b"\1")
        self.obj.attach()
        if self.config.tls:
            self.libssl = list(self.config.libssl) or libssl_paths()
            for lib in self.libssl:
                for function, (enter, leave) in SSL_FUNCTIONS.items():
                    self.obj.programs[enter].attach_uprobe(lib, function)
                    self.obj.programs[leave].attach_uprobe(lib, function, retprobe=True)
        self.ring("events")
        self.tracker = Tracker(self.btf(), wall_clock_offset_ns(), self.config.protocols, self._skip)
        self._dirs = {name: value for value, name in self.tracker.kinds.dir.items()}
        self.exchanges = 0

    def _skip(self, conn: Connection, ingress: bool, until: int, probe: int) -> None:
        """Tell the kernel not to send this direction's calls that end before ``until``, and to copy
        ``probe`` bytes of the others (0, 0: send all)."""
        assert self.obj is not None
        direction = self._dirs["ingress" if ingress else "egress"]
        key = struct.pack("<QBB6x", conn.cookie, direction, conn.encrypted)  # struct stream_key
        skips = self.obj.maps["skips"]
        if until or probe:
            skips.update(key, struct.pack("<QI4x", until, probe))  # struct stream_skip
        else:
            skips.delete(key)

    def drain(self) -> RequestBatch | None:
        raw = self.rings["events"].read_sized(DRAIN_RECORDS)
        if not raw:
            return None
        pairs = self.tracker.feed(raw)
        self.exchanges += len(pairs)
        return RequestBatch(pairs, self.tracker, self.config.keep_secrets) if pairs else RequestBatch.empty()

    def losses(self) -> Losses:
        losses = super().losses()
        tracker: Tracker | None = getattr(self, "tracker", None)
        if tracker is None:
            return losses
        tracker.flush()
        c = tracker.counts
        return losses + Losses(
            [
                Loss("truncated", c.truncated, "messages cut by the capture limit (--capture-bytes)"),
                Loss("parser_gave_up", c.parse_errors, "times the parser gave up on a connection's bytes"),
                Loss("unmatched", c.unmatched, "responses whose request was not captured"),
                Loss("unanswered", c.unanswered, "requests whose response was not captured"),
            ]
        )


@dataclass
class RequestBatch(Sample):
    """Exchanges completed since the previous drain (an empty batch: records arrived, none completed)."""

    pairs: list[tuple[Connection, Exchange]]
    tracker: Tracker | None
    keep_secrets: bool
    ts: float = field(default_factory=time.time)

    @classmethod
    def empty(cls) -> RequestBatch:
        return cls([], None, False)

    def __len__(self) -> int:
        return len(self.pairs)

    def records(self) -> Iterator[dict[str, Any]]:
        for conn, exchange in self.pairs:
            end = exchange.response.end_ns if exchange.response is not None else exchange.request.end_ns
            assert self.tracker is not None
            yield records.record(conn, exchange, self.tracker.wall_s(end), self.keep_secrets)

    def json_lines(self) -> str:
        # The same records as records(), each connection's part encoded once (encode.py).
        tracker, keep, line = self.tracker, self.keep_secrets, encode.line
        if tracker is None:
            return ""
        wall_s = tracker.wall_s
        return "".join(
            [
                line(conn, exchange, wall_s((exchange.response or exchange.request).end_ns), keep)
                for conn, exchange in self.pairs
            ]
        )


def summary(record: dict[str, Any]) -> tuple[str, str]:
    """(request, response) in a few words, for the terminal."""
    table = record["record"]
    if table == "http_events":
        return f"{record['req_method']} {record['req_path']}", str(record["resp_status"])
    if table == "pgsql_events":
        return record["req"][:80], record["resp"][:60]
    if table == "mysql_events":
        return (record["req_body"] or record["req_cmd"])[:80], (record["error"] or record["resp_body"])[:60]
    if table == "redis_events":
        return " ".join([record["req_cmd"], *record["req_args"]])[:80], record["resp"][:60]
    if table == "dns_events":
        return f"{record['query_type']} {record['query_name']}", " ".join(
            [record["rcode"], *record["answers"]]
        )
    return "", ""


class RequestsView(View):
    header = (
        f"{'TIME(s)':<10} {'PID':>7} {'COMM':<15} {'ROLE':<6} {'PROTO':<6} {'REMOTE':<22} "
        f"{'LAT(ms)':>9} {'REQ':>6} {'RESP':>7}  REQUEST -> RESPONSE"
    )

    def __init__(self) -> None:
        self.start = time.time()

    def show(self, sample: Sample, term: Terminal) -> None:
        if not isinstance(sample, RequestBatch):
            return  # conn_stats and process_stats: JSON and the store only
        lines = []
        for r in sample.records():
            request, response = summary(r)
            remote = f"{r['remote_addr']}:{r['remote_port']}"
            proto = r["record"].removesuffix("_events")
            lines.append(
                f"{r['ts'] - self.start:<10.3f} {r['pid']:>7} {r['comm']:<15.15} {r['trace_role']:<6} "
                f"{proto:<6} {remote:<22} {r['latency'] / 1e6:>9.3f} {r['req_bytes']:>6} "
                f"{r['resp_bytes']:>7}  {request} -> {response}"
            )
        term.lines(lines)

    def summary(self, collector: Collector, losses: Losses) -> str:
        if isinstance(collector, stats.StatsCollector):
            # Its losses are tcpretrans's: retransmissions not counted.
            return f"requests: {collector.rows} conn_stats and process_stats rows, {losses.text()}"
        seen = getattr(collector, "exchanges", 0)
        return f"requests: {seen} requests traced, {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope requests                       # every request on the machine, as it completes
  bpfscope requests -p 1234 --json        # one process's requests, JSON lines (Pixie's tables)
  bpfscope requests --protocol http --port 8080
  bpfscope requests --protocol mysql      # each MySQL/MariaDB statement, normalised, with its latency
  bpfscope requests --cgroup system.slice/nginx.service --capture-bytes 8192
  bpfscope requests --no-redact           # show header values, query values and bodies
  bpfscope requests --store /var/tmp/reqs # keep them: bpfscope query --store /var/tmp/reqs ...
"""


@click.command(name="requests", epilog=EXAMPLES)
@click.option(
    "--protocol",
    "protocol",
    multiple=True,
    type=click.Choice(PROTOCOLS),
    help="Only this protocol (repeatable): http (HTTP/1.x, HTTP/2, gRPC), dns, pgsql (PostgreSQL), mysql "
    "(MySQL, MariaDB), redis.",
)
@click.option(
    "--port",
    "ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    metavar="PORT",
    help="Only connections with this port at either end (repeatable, 64 at most).",
)
@option("lport")
@option("dport")
@click.option(
    "--capture-bytes",
    type=click.IntRange(64),
    default=4096,
    show_default=True,
    metavar="N",
    help="Bytes captured from the start of each call (and a few hundred from the end of a longer one); "
    "sizes are always exact.",
)
@click.option(
    "--no-redact", is_flag=True, help="Show secrets: header and query values, SQL literals, bodies."
)
@click.option("--no-tls", is_flag=True, help="Do not attach the OpenSSL uprobes (no TLS plaintext).")
@click.option("--libssl", multiple=True, metavar="PATH", help="Trace this libssl (default: ldconfig's).")
@click.option(
    "--store",
    metavar="DIR",
    help="Also keep every record in this store (tables http_events, ...; read with bpfscope query).",
)
@common_options
def command(
    run: Run,
    protocol: tuple[str, ...],
    ports: tuple[int, ...],
    lport: int | None,
    dport: int | None,
    capture_bytes: int,
    no_redact: bool,
    no_tls: bool,
    libssl: tuple[str, ...],
    store: str | None,
) -> None:
    """Requests and their responses as they complete: who asked whom, what, the answer and the latency.

    Captured from socket calls (read/write, send/recv and their vector and msg forms) and, for TLS,
    from OpenSSL's SSL_read/SSL_write. Connections opened before the tool started are picked up when
    they next speak. ROLE is client when the process sent the request, server when it answered it;
    LAT runs from the request's first byte to the response's last, as that process saw them.
    """
    if len(ports) > 64:
        raise BpfscopeError("--port: 64 ports at most")
    for path in libssl:
        if not Path(path).exists():
            raise BpfscopeError(f"no such libssl: {path}")
    most = limits(RequestsCollector.btf())
    if capture_bytes > most["capture_max"] - most["tail"]:
        raise BpfscopeError(f"--capture-bytes is at most {most['capture_max'] - most['tail']}")
    config = run.config(
        RequestsConfig,
        protocols=frozenset(protocol) if protocol else None,
        ports=ports,
        lport=lport or 0,
        dport=dport or 0,
        capture_bytes=capture_bytes,
        keep_secrets=no_redact,
        tls=not no_tls,
        libssl=libssl,
    )
    collector = RequestsCollector(config)
    collectors = [collector, stats.StatsCollector(collector)]
    note = "Tracing requests... Ctrl-C to end."
    if store is None:
        run.run(collectors, RequestsView(), note)
        return
    from bpfscope.runtime.session import stop_on_signals
    from bpfscope.sinks.store import StoreSink, StoreWriter
    from bpfscope.sinks.terminal import note as say

    with stop_on_signals() as stop:
        session = run.session(collectors, RequestsView(), stop)
        session.sinks.append(StoreSink(StoreWriter(store, SCHEMAS, flush_s=STORE_FLUSH_S)))
        session.run(ready=lambda: say(note))
