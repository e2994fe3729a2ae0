"""What the always-on agent keeps in memory is bounded: files the profiler's symbolizer holds, the
security collector's interned values."""

from __future__ import annotations

import os
import subprocess
import time

from bpfscope.domains.profile.symbols import Symbolizer
from bpfscope.domains.security import processes


def test_symbolizer_lets_go_of_files_no_live_process_maps() -> None:
    child = subprocess.Popen(["sleep", "30"])  # maps a binary this process does not
    symbols = Symbolizer(kernel=False)
    try:
        time.sleep(0.2)  # exec'd
        assert symbols.watch(os.getpid()) and symbols.watch(child.pid)
        mine = {k for k in symbols.process(os.getpid()).files.values() if isinstance(k, tuple)}
        theirs = {k for k in symbols.process(child.pid).files.values() if isinstance(k, tuple)}
        held = len(symbols._open)
        assert held >= len(mine) > 0
        assert symbols.prune(keep=held) == 0  # within the bound: nothing goes
        child.kill()
        child.wait()
        symbols.forget(child.pid)
        assert theirs - mine
        released = symbols.prune(keep=0)
        # What only the child mapped went (its fds closed); what this process maps stays.
        assert released == len(theirs - mine) == symbols.released
        assert set(symbols._open) | set(symbols._by_file) == mine
    finally:
        child.kill()
        symbols.close()


def test_interned_values_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(processes, "MAX_INTERNED", 100)
    monkeypatch.setattr(processes, "_interned", {})
    for i in range(1000):
        assert processes.intern(f"/tmp/job-{i}") == f"/tmp/job-{i}"
    assert len(processes._interned) <= 100
    shared = processes.intern(("uid", 0))
    assert processes.intern(("uid", 0)) is shared


def test_the_agents_request_tracer_lets_closed_connections_go() -> None:
    from bpfscope.agent.components import ForgetClosed
    from bpfscope.domains.requests.capture import Connections

    class Tracer:
        def __init__(self) -> None:
            self.tracker = Connections()

        def drain(self) -> list[int]:
            self.tracker.closed.extend(["a", "b"])  # closed while the batch was parsed
            return [1]

    tracer = type("AgentTracer", (ForgetClosed, Tracer), {})()
    assert tracer.drain() == [1] and tracer.drain() == [1]
    assert tracer.tracker.closed == []


def test_the_agents_request_tracer_finds_its_bpf_object() -> None:
    from bpfscope.agent import components
    from bpfscope.agent.config import AgentConfig

    tracer = components.build(AgentConfig())[0]["requests"]
    assert isinstance(tracer, components.ForgetClosed)
    assert tracer.object_path().parent.name == "requests"
