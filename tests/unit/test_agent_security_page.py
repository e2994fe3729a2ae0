"""The UI's security page after a storm of exits: the newest events are read without holding every
candidate's 23 kB body in DuckDB's memory (a storm's exits once failed its limit)."""

from __future__ import annotations

import random
import string
from pathlib import Path
from types import SimpleNamespace

import pytest

from bpfscope.agent import web
from bpfscope.domains.security.secure import tetragon_schemas
from bpfscope.sinks.store import StoreWriter

EXITS = 2000


@pytest.fixture(scope="module")
def stormy_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding EXITS process_exit events of about 23 kB each (their ancestors' worth), one
    every 10 ms."""
    path = tmp_path_factory.mktemp("store")
    schemas = tetragon_schemas()
    exits = next(s for s in schemas if s.name == "secure.process_exit")
    writer = StoreWriter(path, schemas, max_pending=100)
    rand = random.Random(1)
    for i in range(EXITS):
        body = {
            "process": {"pid": i, "binary": "/usr/bin/storm", "arguments": f"storm-{i}"},
            "ancestors": ["".join(rand.choices(string.ascii_letters, k=23_000))],
            "status": 0,
        }
        writer.add([exits.record({"ts": 1e9 + i / 100, "process_exit": body, "node_name": "n", "time": "t"})])
    writer.flush()
    return path


def security(path: Path, **params: str) -> list[dict]:
    agent = SimpleNamespace(config=SimpleNamespace(store=SimpleNamespace(path=str(path))), pods=None)
    request = SimpleNamespace(query_params=params)
    return web.Api(agent).security(request, 0, 2e9)["events"]  # type: ignore[arg-type]


def test_the_newest_exits_of_a_storm_within_the_memory_limit(
    stormy_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 46 MB of bodies (in files of 100 events) against a limit of 48 MB: ordering the bodies themselves
    # ran out of memory below 96 MB; reading only the newest bodies needs about 32 MB.
    monkeypatch.setattr(web, "QUERY_MEMORY_LIMIT", "48MB")
    events = security(stormy_store, kind="process_exit", limit="200")
    assert [e["process"]["pid"] for e in events] == list(range(EXITS - 1, EXITS - 201, -1))
    # Filtered by command: the newest that match. The filter reads every body of the span, in DuckDB's
    # vectors of 2,048 rows (47 MB of these at once, per thread): bounded by that, not by the storm's
    # length, and inside the agent's own limit.
    monkeypatch.setattr(web, "QUERY_MEMORY_LIMIT", "256MB")
    events = security(stormy_store, kind="process_exit", process="storm-17", limit="5")
    assert [e["process"]["arguments"] for e in events] == [
        "storm-1799", "storm-1798", "storm-1797", "storm-1796", "storm-1795"
    ]  # fmt: skip
