"""The agent's profile windows as pprof for Pyroscope or Parca (sinks/profile_push.py sends them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpfscope.sinks.profile_push import ProfilePushSink, Pushed

if TYPE_CHECKING:
    from bpfscope.agent.config import ProfilesSection
    from bpfscope.runtime.collector import Sample


def encode(sample: Sample) -> Pushed | None:
    """A profile window's pprof (on-CPU as ``process_cpu``, off-CPU as ``process_offcpu``); None for
    every other sample or an empty window."""
    from bpfscope.domains.profile.collect import ProfileSample
    from bpfscope.domains.profile.formats import pprof

    if not isinstance(sample, ProfileSample) or not sample.profile.samples:
        return None
    profile = sample.profile
    name = "process_cpu" if profile.kind == "cpu" else "process_offcpu"
    return Pushed(pprof(profile), sample.ts - sample.interval_s, sample.ts, name, profile.frequency_hz)


def profile_push_sink(section: ProfilesSection, node: str) -> ProfilePushSink:
    labels = {"service_name": "bpfscope", "hostname": node}
    return ProfilePushSink(section.endpoint, section.kind, encode, labels, dict(section.headers))
