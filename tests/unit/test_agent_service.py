"""The agent's service with fake collectors in place of the kernel's: a collector that fails is reported
and opened again with back-off while the others keep their rhythm (and its count of losses never goes
back); SIGHUP restarts exactly the collectors whose section changed, the last partial interval of the one
replaced reaching the store; a configuration that does not load leaves the running one; the store is
read while the agent writes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bpfscope.agent import components
from bpfscope.agent.config import load_config
from bpfscope.agent.service import Agent, LossTally
from bpfscope.runtime import session as session_mod
from bpfscope.runtime.collector import Collector, Config, Sample
from bpfscope.runtime.losses import Loss, Losses
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.store import Store

TICK = Schema("test.tick", (Field("source", "str", label=True), Field("n", "int")), interval=True)


@dataclass
class Tick(Sample):
    ts: float
    interval_s: float
    source: str
    n: int

    def records(self) -> Iterator[dict[str, Any]]:
        yield TICK.record(vars(self))


class Ticker(Collector[Config]):
    """Numbers its samples; ``fail_every`` makes every so many samples fail (after each open)."""

    _schemas = (TICK,)
    opened: list[str] = []  # names, in the order opened, across instances

    def __init__(self, name: str, interval_s: float, fail_every: int | None = None) -> None:
        super().__init__(Config(interval_s=interval_s))
        self.name = name  # type: ignore[misc]
        self.fail_every = fail_every
        self.n = self.since_open = 0

    def open(self) -> None:
        Ticker.opened.append(self.name)
        self.since_open = 0

    def start(self) -> None:
        self.t0 = time.monotonic()

    def sample(self) -> Tick:
        self.n += 1
        self.since_open += 1
        if self.fail_every and self.since_open % self.fail_every == 0:
            raise RuntimeError(f"{self.name} broke")
        now = time.monotonic()
        tick = Tick(time.time(), now - self.t0, self.name, self.n)
        self.t0 = now
        return tick


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """health: a steady ticker; profile: one that fails at every second sample unless told otherwise
    (its interval from its section's frequency, so a reload that changes it is a restart)."""
    Ticker.opened = []
    settings: dict[str, Any] = {"fail_every": 2}
    monkeypatch.setattr(
        components,
        "COMPONENTS",
        (
            components.Component("health", lambda s, node: Ticker("steady", s.interval)),
            components.Component(
                "profile", lambda s, node: Ticker("flaky", 1 / s.frequency, settings["fail_every"])
            ),
        ),
    )
    monkeypatch.setattr(session_mod, "RESTART_BACKOFF_S", (0.2, 0.4))
    return settings


def write_config(path: Path, store: Path, frequency: int, extra: str = "") -> None:
    path.write_text(
        f"listen: 127.0.0.1:0\nstore: {{path: {store}, flush: 1s}}\n"
        f"collectors:\n  health: {{interval: 1s}}\n  profile: {{frequency: {frequency}}}\n{extra}"
    )


def ticks(store: Path, source: str) -> list[tuple[float, int]]:
    rows = Store(store).query('SELECT ts, n FROM "test.tick" WHERE source = ? ORDER BY ts', [source])
    return [(ts, n) for ts, n in rows]


def events(store: Path) -> list[tuple[str, str, str]]:
    return [
        tuple(r) for r in Store(store).query('SELECT kind, collector, detail FROM "agent.event" ORDER BY ts')
    ]


def test_a_failing_collector_restarts_with_back_off_the_others_go_on(fakes: dict, tmp_path: Path) -> None:
    config_path = tmp_path / "agent.yaml"
    write_config(config_path, tmp_path / "store", frequency=4)
    agent = Agent(load_config(str(config_path)), str(config_path))
    agent.run(duration=4.5)
    store = tmp_path / "store"
    failed = [e for e in events(store) if e[0] == "failed"]
    # Fails 0.5 s after each open, reopened 0.2 s then 0.4 s (then 0.4 s ...) later: about 4 times.
    assert 3 <= len(failed) <= 6, failed
    assert all(e[1] == "flaky" and "flaky broke" in e[2] for e in failed)
    assert "opened again in 0.2 s" in failed[0][2] and "opened again in 0.4 s" in failed[1][2]
    # Opened once per failure, and once more unless the run ended between a failure and its reopening.
    assert len(failed) <= Ticker.opened.count("flaky") <= len(failed) + 1
    # The steady one never missed a tick: one a second, numbered without a gap, the last partial.
    steady = ticks(store, "steady")
    assert [n for _, n in steady] == list(range(1, len(steady) + 1)) and len(steady) in (4, 5, 6)
    states = Store(store).query(
        'SELECT collector, max(failures) FROM "agent.collector" GROUP BY collector ORDER BY collector'
    )
    assert dict(states)["steady"] == 0 and dict(states)["flaky"] >= 2


def test_sighup_restarts_only_what_changed_and_keeps_everything(fakes: dict, tmp_path: Path) -> None:
    fakes["fail_every"] = None
    config_path = tmp_path / "agent.yaml"
    store = tmp_path / "store"
    write_config(config_path, store, frequency=1)
    agent = Agent(load_config(str(config_path)), str(config_path))
    me = os.getpid()
    readings: list[int] = []

    def outside() -> None:
        time.sleep(2.2)
        readings.append(len(ticks(store, "steady")))  # read while the agent writes
        write_config(config_path, store, frequency=1, extra="  nonsense: 1\n")
        os.kill(me, signal.SIGHUP)  # refused: the running configuration stays
        time.sleep(0.5)
        write_config(config_path, store, frequency=2)
        os.kill(me, signal.SIGHUP)  # profile changed: flaky restarts, steady runs on
        time.sleep(2.0)
        os.kill(me, signal.SIGTERM)

    threading.Thread(target=outside, daemon=True).start()
    agent.run(duration=30)
    kinds = [e[0] for e in events(store)]
    assert kinds[0] == "start" and kinds[-1] == "stop", kinds
    refused = [e for e in events(store) if e[0] == "reload_refused"]
    assert len(refused) == 1 and "unknown key" in refused[0][2]
    reloads = [e for e in events(store) if e[0] == "reload"]
    assert len(reloads) == 1 and "changed: profile" in reloads[0][2]
    # steady was opened once for the whole run; flaky once before the reload and once after.
    assert Ticker.opened.count("steady") == 1 and Ticker.opened.count("flaky") == 2
    assert readings and readings[0] >= 1
    steady = ticks(store, "steady")
    assert [n for _, n in steady] == list(range(1, len(steady) + 1)) and len(steady) >= 4
    # flaky's first instance ticked every second until the reload; its last partial interval reached
    # the store when the reload replaced it (an interval shorter than the others), then the new one
    # ticked twice a second, numbered from 1 again.
    flaky = [n for _, n in ticks(store, "flaky")]
    first_run = flaky[: flaky.index(1, 1)]
    assert first_run == list(range(1, len(first_run) + 1)) and len(first_run) >= 3
    partial = Store(store).query(
        'SELECT interval_s FROM "test.tick" WHERE source = ? AND n = ? ORDER BY ts LIMIT 1',
        ["flaky", len(first_run)],
    )[0][0]
    assert partial < 1.0
    assert len(flaky) - len(first_run) >= 3


class Leaky(Ticker):
    """Loses 5 events a sample, counted like a BPF collector's: from zero at every open."""

    def open(self) -> None:
        super().open()
        self.lost = 0

    def sample(self) -> Tick:
        self.lost += 5
        return super().sample()

    def losses(self) -> Losses:
        return Losses([Loss("ring_full", self.lost, "events lost")])


def test_lost_never_decreases_across_failures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """agent.collector's lost is the run's count: it held 0 while the collector was retrying and
    started again from 0 after each reopening (a new BPF object's counters)."""
    Ticker.opened = []
    made: list[Leaky] = []

    def build(section: Any, node: str | None) -> Leaky:
        made.append(Leaky("leaky", 0.25, fail_every=3))
        return made[-1]

    monkeypatch.setattr(components, "COMPONENTS", (components.Component("profile", build),))
    monkeypatch.setattr(session_mod, "RESTART_BACKOFF_S", (0.3,))
    config_path = tmp_path / "agent.yaml"
    store = tmp_path / "store"
    config_path.write_text(
        f"listen: 127.0.0.1:0\nstore: {{path: {store}, flush: 1s}}\nui: {{enabled: false}}\n"
        "exporters: {prometheus: {enabled: false}}\n"
    )
    agent = Agent(load_config(str(config_path)), str(config_path))
    agent.run(duration=5.0)
    lost = [
        n
        for (n,) in Store(store).query(
            'SELECT lost FROM "agent.collector" WHERE collector = ? ORDER BY ts', ["leaky"]
        )
    ]
    failed = [e for e in events(store) if e[0] == "failed"]
    assert len(failed) >= 3 and len(lost) >= 4
    assert lost == sorted(lost), lost
    # Two good samples (10 lost) per opening that failed; each failure's count is kept.
    assert lost[-1] >= 10 * len(failed), (lost, failed)
    assert agent.losses["leaky"].total >= lost[-1]
    total = agent.losses["leaky"].total
    assert f"profile {len(failed)} failures, {total} lost (ring_full {total})" in agent.summary()


def losses_of(**counts: int) -> Losses:
    return Losses(Loss(reason, n, reason) for reason, n in counts.items())


def test_loss_tally() -> None:
    tally = LossTally()
    assert [tally.seen(losses_of(ring_full=n)) for n in (0, 3, 7)] == [0, 3, 7]
    tally.closed()  # failed: its counters went with it
    assert tally.total == 7
    assert [tally.seen(losses_of(ring_full=n)) for n in (0, 2)] == [7, 9]
    # counters restarted unannounced: the 2 before stay counted
    assert tally.seen(losses_of(ring_full=1)) == 10
    tally.seen(losses_of(ring_full=4))
    assert tally.total == 13
    assert tally.reasons() == {"ring_full": 13}


def test_loss_tally_by_reason() -> None:
    """The health collector's reasons are its rule collectors': one dropped from the window takes only
    its own count to zero; the others' counts are not taken for a restart (counted twice)."""
    tally = LossTally()
    tally.seen(losses_of(**{"iostat/recursion": 5, "tcpretrans/recursion": 3, "cachestat/recursion": 0}))
    assert tally.seen(losses_of(**{"iostat/recursion": 6, "cachestat/recursion": 0})) == 9
    assert tally.seen(losses_of(**{"iostat/recursion": 8, "tcpretrans/recursion": 1})) == 12
    assert tally.reasons() == {"iostat/recursion": 8, "tcpretrans/recursion": 4}


class Watched(Leaky):
    """Says which threads asked for its losses."""

    asked_from: set[str] = set()

    def losses(self) -> Losses:
        Watched.asked_from.add(threading.current_thread().name)
        return super().losses()


def test_the_web_server_reads_states_the_loop_made(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/api/status's collectors are what the loop last read: a collector's losses() called from the
    web server's thread raced the loop (the request tracer's: "OrderedDict mutated during iteration")."""
    from bpfscope.agent.web import Api

    Watched.asked_from = set()
    monkeypatch.setattr(
        components, "COMPONENTS", (components.Component("profile", lambda s, n: Watched("watched", 0.2)),)
    )
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        f"listen: 127.0.0.1:0\nstore: {{path: {tmp_path / 'store'}, flush: 1s}}\nui: {{enabled: false}}\n"
        "exporters: {prometheus: {enabled: false}}\n"
    )
    agent = Agent(load_config(str(config_path)), str(config_path))
    seen: list[list[dict[str, Any]]] = []

    def web() -> None:
        while agent.session is None or not agent.states:
            time.sleep(0.05)
        for _ in range(10):
            seen.append(Api(agent).status()["collectors"])
            time.sleep(0.2)

    reader = threading.Thread(target=web, name="web")
    reader.start()
    agent.run(duration=3.0)
    reader.join()
    assert Watched.asked_from == {threading.main_thread().name}
    lost = [next(c["lost"] for c in states if c["collector"] == "watched") for states in seen]
    assert len(lost) == 10 and lost == sorted(lost) and lost[-1] >= 5, lost
