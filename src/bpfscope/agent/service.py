"""The agent's process: one session running every switched-on collector with ``on_error="restart"`` (a
failing collector is reported and opened again with back-off while the others run), the store and the
exporters as its sinks, and the web server in a thread beside it.

SIGHUP reloads the configuration between two turns of the loop: collectors whose section changed are
drained (their rings and their last partial interval reach the sinks) and replaced, the others keep
running untouched; a configuration that does not load is reported and the running one stays. SIGINT and
SIGTERM end the run the way every tool's does: drained, flushed, closed.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bpfscope.agent import components
from bpfscope.agent.config import AgentConfig, load_config
from bpfscope.engine import memory
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.schema import Field, Schema
from bpfscope.runtime.session import Session, Sink, StopToken
from bpfscope.sinks.store import StoreSink, StoreWriter
from bpfscope.sinks.terminal import note

if TYPE_CHECKING:
    from bpfscope.runtime.losses import Losses

COLLECTOR_SCHEMA = Schema(
    "agent.collector",
    (
        Field("collector", "str", label=True),
        Field("state", "enum", values=("running", "retrying"), doc="retrying: failed, opened again soon"),
        Field("failures", "int", doc="times it failed since the agent started"),
        Field("lost", "int", doc="events it lost (its running count, all reasons)"),
        Field(
            "reasons",
            "dict",
            doc="lost by reason, those not zero (the health collector's named after its rule's collector)",
        ),
        Field("error", "str", doc="its last failure, empty if none"),
    ),
    doc="Each collector of the agent, every flush interval.",
    interval=True,
)
EVENT_SCHEMA = Schema(
    "agent.event",
    (
        Field("kind", "enum", values=("start", "stop", "reload", "reload_refused", "failed", "unavailable")),
        Field("collector", "str", doc="the collector concerned, empty for the agent"),
        Field("detail", "str"),
    ),
    doc="What happened to the agent: starts, stops, reloads, failures.",
)
AGENT_SCHEMAS = (COLLECTOR_SCHEMA, EVENT_SCHEMA)


class LossTally:
    """One collector's losses over the agent's whole run, by reason, never decreasing.

    A collector's own counters start again from zero whenever it is opened again: after a failure (the
    session closes it, its BPF counters with it), on a reload that replaces it, and inside the health
    collector when one of the check's collectors fails and is dropped from its window. Reported as they
    were, the running ``lost`` of ``agent.collector`` fell back to 0 while a collector was retrying and
    restarted from there after; this keeps what earlier openings lost as a base under the current one.
    Kept per reason: a health rule's collector dropped from its window takes only its own reasons to
    zero while the others go on counting."""

    def __init__(self) -> None:
        self.base: dict[str, int] = {}  # lost by the collector's earlier openings, by reason
        self.last: dict[str, int] = {}  # the current opening's counts when last read

    def seen(self, losses: Losses) -> int:
        """The current opening's counts; a reason's count below the last one read means its counters
        started again (an opening we were not told of), so the last one joins the base."""
        counts = losses.counts()
        for reason, count in self.last.items():
            if counts.get(reason, 0) < count:
                self.base[reason] = self.base.get(reason, 0) + count
        self.last = counts
        return self.total

    def closed(self) -> None:
        """The collector was closed (failed, removed): what it had lost when last read is kept (after
        its last sample, or within the last second for a stream collector); what it lost after that
        reading went with its counters."""
        for reason, count in self.last.items():
            self.base[reason] = self.base.get(reason, 0) + count
        self.last = {}

    @property
    def total(self) -> int:
        return sum(self.base.values()) + sum(self.last.values())

    def reasons(self) -> dict[str, int]:
        """The run's losses by reason, those not zero."""
        out = dict(self.base)
        for reason, count in self.last.items():
            out[reason] = out.get(reason, 0) + count
        return {reason: count for reason, count in out.items() if count}


# Records buffered before a flush comes early: about 20 MB of request records, a few seconds of a busy
# web server's.
MAX_PENDING = 20_000


@dataclass
class Records(Sample):
    """Records already made: a sample's, made once for every sink, or the agent's own."""

    ts: float
    made: list[dict[str, Any]]
    sample: Sample | None = None  # the collector's own, for sinks that read it typed

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(self.made)

    def __len__(self) -> int:
        return len(self.made)


class StatusCollector(Collector[Config]):
    """Each collector's state every flush interval (``agent.collector``): it also keeps the store
    flushing on time when nothing else is recorded."""

    name = "agent"
    _schemas = (COLLECTOR_SCHEMA,)

    def __init__(self, agent: Agent, interval_s: float) -> None:
        super().__init__(Config(interval_s=interval_s))
        self.agent = agent
        self.last = time.monotonic()

    def start(self) -> None:
        self.last = time.monotonic()

    def sample(self) -> Records:
        if self.agent.writer is not None:
            self.agent.writer.flush()  # the flush interval is this collector's: kill -9 loses at most one
            memory.trim()  # what the flush freed, back to the system (see engine/memory.py)
        now, ts = time.monotonic(), time.time()
        interval, self.last = now - self.last, now
        made = [
            COLLECTOR_SCHEMA.record({"ts": ts, "interval_s": round(interval, 6), **state})
            for state in self.agent.collector_states()
        ]
        return Records(ts, made)


class Sinks(Sink):
    """The agent's sinks behind one: a sample's records are made once and shared (a security event's
    Tetragon JSON is the costliest part of its way), and the set can change on a reload."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.sinks: list[Sink] = []

    def open(self, session: Session) -> None:
        for sink in self.sinks:
            sink.open(session)

    def emit(self, collector: Collector, sample: Sample) -> None:
        made = Records(getattr(sample, "ts", time.time()), list(sample.records()), sample)
        for sink in self.sinks:
            sink.emit(collector, made)
        if not collector.fds() and collector.name != StatusCollector.name:
            # The session reads a stream collector's losses every second (lost() below) but an
            # interval collector's only at our status tick: read them after each sample, or a failure
            # closes it with everything since that tick uncounted.
            self.agent.tally(collector.name).seen(collector.losses())

    def status(self, collector: Collector, elapsed_s: float) -> None:
        for sink in self.sinks:
            sink.status(collector, elapsed_s)

    def lost(self, collector: Collector, new: Losses, total: Losses) -> None:
        self.agent.tally(collector.name).seen(total)
        for sink in self.sinks:
            sink.lost(collector, new, total)

    def error(self, collector: Collector, exc: BaseException, retry_in_s: float | None) -> None:
        self.agent.tally(collector.name).closed()
        self.agent.failures[collector.name] = self.agent.failures.get(collector.name, 0) + 1
        self.agent.errors[collector.name] = str(exc)
        when = f"; opened again in {retry_in_s:g} s" if retry_in_s is not None else ""
        self.agent.event("failed", collector.name, f"{exc}{when}")
        for sink in self.sinks:
            sink.error(collector, exc, retry_in_s)

    def finish(self, collector: Collector, losses: Losses, elapsed_s: float) -> None:
        # Its last count (it is closed next: a reload's replacement starts from zero again).
        tally = self.agent.tally(collector.name)
        tally.seen(losses)
        tally.closed()
        for sink in self.sinks:
            sink.finish(collector, losses, elapsed_s)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Agent:
    """``config_path`` (None: the defaults) is read again on SIGHUP, with the command line's ``store``
    and ``listen`` on top."""

    def __init__(
        self,
        config: AgentConfig,
        config_path: str | None = None,
        overrides: dict[str, str | None] | None = None,
        json_out: bool = False,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.json_out = json_out
        self.failures: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        # Each collector's losses over the run, by name, across its openings (see LossTally).
        self.losses: dict[str, LossTally] = {}
        self.unavailable: dict[str, str] = {}
        # collector_states() as the loop last made it, for the web server's thread (see there).
        self.states: list[dict[str, Any]] = []
        self.collectors: dict[str, Collector] = {}
        self.writer: StoreWriter | None = None
        self.prometheus: Any = None
        self.exporters: dict[str, Sink] = {}
        self.sinks = Sinks(self)
        self.session: Session | None = None
        self.web: Any = None
        self.pods: Any = None  # PodDirectory, in a Kubernetes pod
        self.started = time.time()
        self._reload_wanted = False
        self._stopping: str | None = None

    # --- for the sinks, the web app and the status collector ----------------------------------------
    def event(self, kind: str, collector: str, detail: str) -> None:
        """Into the store; on stderr too unless it is a start or a stop (the command says those)."""
        if kind not in ("start", "stop"):
            note(f"agent: {kind}{f' {collector}' if collector else ''}: {detail}")
        if self.writer is not None:
            values = {"ts": time.time(), "kind": kind, "collector": collector, "detail": detail}
            self.writer.add([EVENT_SCHEMA.record(values)])

    def summary(self) -> str:
        """The run's last line: what was stored, each collector's failures and losses."""
        assert self.writer is not None
        parts = [f"{self.writer.rows_written} records stored in {self.writer.files_written} files"]
        if self.writer.dropped_rows:
            parts.append(f"{self.writer.dropped_rows} lost in {self.writer.failed_writes} failed writes")
        for name, collector in self.collectors.items():
            # failures and losses are kept by the collector's name (offcpu's is offcputime)
            failures = self.failures.get(collector.name, 0)
            tally = self.tally(collector.name)
            reasons = ", ".join(f"{reason} {count}" for reason, count in tally.reasons().items())
            parts.append(
                f"{name} {failures} failures, {tally.total} lost" + (f" ({reasons})" if reasons else "")
            )
        return "; ".join(parts)

    def tally(self, name: str) -> LossTally:
        return self.losses.setdefault(name, LossTally())

    def collector_states(self) -> list[dict[str, Any]]:
        """Each collector's state and losses, read now: from the loop's thread only (a collector's
        losses() reads its state while the loop changes it: the request tracer's, called from the
        web server's thread, failed with "OrderedDict mutated during iteration"). Kept in ``states``
        for other threads."""
        assert self.session is not None
        out = []
        for slot in self.session.slots:
            collector = slot.collector
            if collector.name == StatusCollector.name:
                continue
            tally = self.tally(collector.name)
            lost = tally.seen(collector.losses()) if slot.open else tally.total
            out.append(
                {
                    "collector": collector.name,
                    "state": "running" if slot.open else "retrying",
                    "failures": self.failures.get(collector.name, 0),
                    "lost": lost,
                    "reasons": tally.reasons(),
                    "error": self.errors.get(collector.name, ""),
                }
            )
        if self.writer is not None:  # the store's writes that failed, and the records they lost
            writer = self.writer
            out.append(
                {
                    "collector": "store",
                    "state": "running",
                    "failures": writer.failed_writes,
                    "lost": writer.dropped_rows,
                    "reasons": {"failed_writes": writer.dropped_rows} if writer.dropped_rows else {},
                    "error": writer.last_error,
                }
            )
        self.states = out
        return out

    @property
    def address(self) -> str:
        return self.web.address if self.web is not None else ""

    # --- the run ------------------------------------------------------------------------------------
    def run(self, duration: float | None = None, ready: Callable[[Agent], None] | None = None) -> None:
        """Until SIGINT or SIGTERM (or ``duration`` seconds); SIGHUP reloads."""
        memory.limit_arenas()  # before any of our threads allocates
        self.collectors, self.unavailable = components.build(self.config)
        self._open_store()
        self._make_exporters()
        from bpfscope.agent.kubernetes import PodDirectory

        self.pods = PodDirectory.in_cluster(self.config.node_name)
        if self.pods is not None:
            self.pods.start()
        if self.config.ui.enabled or self.config.exporters.prometheus.enabled:
            self._start_web()
        status = StatusCollector(self, self.config.store.flush)
        token = StopToken()
        self.session = Session(
            [*self.collectors.values(), status],
            [self.sinks],
            duration=duration,
            stop=token,
            on_error="restart",
        )
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            for name, why in self.unavailable.items():
                self.event("unavailable", name, why)
            self.session.open()
            self.session.start()
            self.collector_states()  # for the web server until the first status tick
            self.event(
                "start",
                "",
                f"{', '.join(self.collectors) or 'no collectors'}; store {self.config.store.path}",
            )
            if ready is not None:
                ready(self)
            self._loop()
            self.session.finish()
            self.event("stop", "", self._stopping or "duration reached")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.session.close()
            token.close()
            if self.web is not None:
                self.web.stop()
            if self.pods is not None:
                self.pods.stop()

    def _loop(self) -> None:
        assert self.session is not None
        while True:
            self.session.loop()
            if self._stopping or not self._reload_wanted:
                return
            if (
                self.session.duration
                and time.monotonic() >= (self.session.started_at or 0) + self.session.duration
            ):
                return
            self._reload_wanted = False
            self.reload()
            old, self.session.stop_token = self.session.stop_token, StopToken()
            old.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        assert self.session is not None
        if signum == signal.SIGHUP:
            self._reload_wanted = True
            self.session.stop_token.set("reload")
        else:
            self._stopping = signal.Signals(signum).name
            self.session.stop_token.set(self._stopping)

    # --- the parts ----------------------------------------------------------------------------------
    def _open_store(self) -> None:
        store = self.config.store
        schemas = [*components.schemas(self.collectors), *AGENT_SCHEMAS]
        # Flushed by the status collector every flush interval, and early past MAX_PENDING records.
        self.writer = StoreWriter(
            store.path, schemas, float("inf"), store.keep, store.max_size, max_pending=MAX_PENDING
        )
        self._set_sink("store", StoreSink(self.writer))

    def _make_exporters(self) -> None:
        from bpfscope.agent.metrics import prometheus_sink

        exporters = self.config.exporters
        self.prometheus = (
            prometheus_sink(exporters.prometheus.max_series) if exporters.prometheus.enabled else None
        )
        self._set_sink("prometheus", self.prometheus)
        otlp = None
        if exporters.otlp.enabled:
            from bpfscope.agent.otlp import otlp_sink

            otlp = otlp_sink(exporters.otlp, self.prometheus, self.config.node_name)
        self._set_sink("otlp", otlp)
        pushed = None
        if exporters.profiles.enabled:
            from bpfscope.agent.profiles import profile_push_sink

            pushed = profile_push_sink(exporters.profiles, self.config.node_name)
        self._set_sink("profiles", pushed)
        if self.json_out:
            from bpfscope.sinks.jsonl import JsonLinesSink

            self._set_sink("json", JsonLinesSink())

    def _set_sink(self, name: str, sink: Sink | None) -> None:
        old = self.exporters.pop(name, None)
        if old is not None:
            self.sinks.sinks.remove(old)
            old.close()
        if sink is not None:
            self.exporters[name] = sink
            self.sinks.sinks.append(sink)
            if self.session is not None:
                sink.open(self.session)

    def _start_web(self) -> None:
        from bpfscope.agent.web import WebServer

        host, port = self.config.host_port
        self.web = WebServer(self, host, port, self.config.token())
        self.web.start()

    # --- reload -------------------------------------------------------------------------------------
    def reload(self) -> None:
        """The configuration file read again; what changed is restarted, nothing recorded is lost."""
        assert self.session is not None and self.writer is not None
        try:
            new = load_config(self.config_path, **self.overrides)
            built = {
                c.name: c.build(components.section(new, c.name), new.node_name)
                for c in components.COMPONENTS
                if components.section(new, c.name).enabled
                and components.section(new, c.name) != components.section(self.config, c.name)
            }
        except (BpfscopeError, ImportError) as exc:
            self.event("reload_refused", "", f"{exc}; the running configuration stays")
            return
        changed = []
        for component in components.COMPONENTS:
            name = component.name
            if components.section(new, name) == components.section(self.config, name):
                continue
            changed.append(name)
            old = self.collectors.pop(name, None)
            if old is not None:
                self.session.remove(old)  # its last records reach the store before it closes
            if name in built:
                self.collectors[name] = built[name]
                self.writer.schemas.update({s.name: s for s in built[name].schemas()})
                self.session.add(built[name])
        if new.store != self.config.store:
            changed.append("store")
            self.writer.flush()
            self.config = replace(self.config, store=new.store)
            self._open_store()
        if new.exporters != self.config.exporters:
            changed.append("exporters")
            self.config = replace(self.config, exporters=new.exporters)
            self._make_exporters()
        if (new.listen, new.token_file, new.ui) != (
            self.config.listen,
            self.config.token_file,
            self.config.ui,
        ):
            changed.append("web")
            if self.web is not None:
                self.web.stop()
            self.config = new
            self._start_web()
        self.config = new
        self.writer.flush()
        self.event("reload", "", f"changed: {', '.join(changed)}" if changed else "nothing changed")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is loaded: a port in use is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BpfscopeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock
