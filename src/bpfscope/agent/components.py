"""What the agent runs: one collector per switched-on section of the configuration, each built from its
section alone, so that a reload restarts exactly the collectors whose section changed.

A component whose domain is not in this build (or cannot be configured here) is reported and left out;
the others run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bpfscope.agent.config import (
    AgentConfig,
    HealthSection,
    OffcpuSection,
    ProfileSection,
    RequestsSection,
    SecuritySection,
)

if TYPE_CHECKING:
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.schema import Schema


# Paced collectors (security, requests) drained further apart while they find nothing, up to this
# many seconds (Collector.paced_idle_max_s), and every PACED_DRAIN_S again from their first record:
# the store takes records at its flush, every few seconds, and a ring a quarter full still wakes the
# agent at once. The idle agent's loop woke 28 times a second, 11 with this.
PACED_IDLE_MAX_S = 0.8

# The request tracer drained every this many seconds (the tool's PACED_DRAIN_S is 0.05): a drain's
# records are parsed with the interpreter's caches cold from the traced servers' work. Under the
# network-analysis mesh, drained 20 times a second (about 30 records a drain), parsing cost 19-21 us
# of the agent's CPU a ring record; drained 4 times a second, 11 us. The agent under the mesh, two
# runs each (% of the machine): 0.05 s 3.55, 3.73; 0.25 s 2.82, 2.79; 0.5 s 3.16, 2.95; 1 s 3.16,
# 3.09. Longer gets worse: a connection's calls are sent whole until user space has read them and
# asked the kernel for less (a body to step over, a connection to probe), 55,500 ring records a run
# at 0.05 s, 62,000 at 0.25, 68,000 at 1 s, for the same 24,500 exchanges.
REQUESTS_DRAIN_S = 0.25


def _health(section: HealthSection, node: str | None) -> Collector:
    from bpfscope.agent.health import HealthCollector, HealthConfig

    return HealthCollector(HealthConfig(interval_s=section.interval))


def _profile(section: ProfileSection, node: str | None) -> Collector:
    from bpfscope.domains.profile.profile import ProfileCollector, ProfileConfig

    config = ProfileConfig(frequency_hz=section.frequency, interval_s=section.interval, unwind=section.unwind)
    return ProfileCollector(config)


def _offcpu(section: OffcpuSection, node: str | None) -> Collector:
    from bpfscope.domains.profile.offcputime import OffcputimeCollector, OffcputimeConfig

    return OffcputimeCollector(OffcputimeConfig(interval_s=section.interval))


def _security(section: SecuritySection, node: str | None) -> Collector:
    from bpfscope.domains.security.secure import SecureCollector, SecureConfig, policies_from

    policies = policies_from(list(section.policies), section.default_policy)
    config = SecureConfig(
        policies=policies, exec_events=section.exec_events, node=node, ring_size=section.ring_size
    )
    collector = SecureCollector(config)
    collector.paced_idle_max_s = PACED_IDLE_MAX_S
    collector.compile()  # a policy's mistake is a configuration error, before anything loads
    return collector


class ForgetClosed:
    """The request tracer's closed connections let go after each drain.

    Its tracker keeps every connection it closes or forgets (with its parser, buffers and pending
    requests) until ``take_closed()``, for conn_stats; ``bpfscope requests`` runs the stats collector,
    which takes them every 10 s, but the agent records no conn_stats and nothing took them: every
    connection closed since the start stayed in memory."""

    tracker: Any

    def drain(self) -> Any:
        batch = super().drain()  # type: ignore[misc]
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.take_closed()
        return batch


def _requests(section: RequestsSection, node: str | None) -> Collector:
    from bpfscope.domains.requests.requests import RequestsCollector, RequestsConfig

    config = RequestsConfig(
        keep_secrets=not section.redact, capture_bytes=section.capture_bytes, tls=section.tls
    )
    # Its module stays the tracer's: the BPF object is found beside it. Paced wake-ups (drained every
    # REQUESTS_DRAIN_S): since the kernel skips long bodies itself, the mesh's calls come a few hundred a
    # second, and a wake-up per record made a drain per record or two. The agent under the mesh: 5.6%
    # of the machine in its process woken per record, 3.1-3.2% paced (BPF 5.1 and 4.8-4.9%); before
    # the kernel's skip, with every call of a 4 MiB body sent, pacing had cost more than it saved.
    collector = type(
        "AgentRequestsCollector",
        (ForgetClosed, RequestsCollector),
        {
            "__module__": RequestsCollector.__module__,
            "paced_drain_s": REQUESTS_DRAIN_S,
            "paced_idle_max_s": PACED_IDLE_MAX_S,
        },
    )
    return collector(config)


@dataclass(frozen=True)
class Component:
    name: str  # the section's name under collectors:
    build: Callable[[Any, str | None], Collector]


COMPONENTS = (
    Component("health", _health),
    Component("profile", _profile),
    Component("offcpu", _offcpu),
    Component("security", _security),
    Component("requests", _requests),
)


def section(config: AgentConfig, name: str) -> Any:
    return getattr(config.collectors, name)


def build(config: AgentConfig) -> tuple[dict[str, Collector], dict[str, str]]:
    """The switched-on components' collectors, by name, and why any could not be built."""
    built: dict[str, Collector] = {}
    unavailable: dict[str, str] = {}
    for component in COMPONENTS:
        wanted = section(config, component.name)
        if not wanted.enabled:
            continue
        try:
            built[component.name] = component.build(wanted, config.node_name)
        except ImportError as exc:
            unavailable[component.name] = f"not in this build ({exc.name})"
    return built, unavailable


def schemas(collectors: dict[str, Collector]) -> list[Schema]:
    """Every kind of record the collectors make, each once."""
    out: dict[str, Schema] = {}
    for collector in collectors.values():
        out.update({s.name: s for s in collector.schemas()})
    return list(out.values())
