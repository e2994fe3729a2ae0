"""A profile: stacks (root first) of named frames, each with its samples and weight, per thread.

It is what every output is made from (folded, pprof, speedscope, HTML) and what windows add up into.
It flattens into records of declared schemas, so that JSON lines, the store and later exporters take
it: per window, one ``profile.frame`` record per frame the window's stacks use (its id is a hash of what
it names, the same in every window and run, so a store keeps one row per frame), one ``profile.stack``
record per (thread, stack) with its samples, and one ``profile.window`` record with the totals and what
stayed unnamed, by reason. :meth:`Profile.from_records` turns them back into a profile.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bpfscope.domains.profile.symbols import REASONS, Frame
from bpfscope.runtime.schema import CGROUP, COMM, PID, TID, Field, Schema

# Functions a stack starts from when it was walked to its root: the process's or a thread's entry.
ROOT_FUNCTIONS = frozenset(
    {
        "_start",
        "__libc_start_main",
        "__libc_start_call_main",
        "start_thread",
        "clone",
        "clone3",
        "__clone",
        "__clone3",
        "runtime.goexit",
        "runtime.goexit.abi0",
        "runtime.rt0_go",
        "runtime.rt0_go.abi0",
        "runtime.mstart",
        "runtime.mstart.abi0",
    }
)

FRAME_SCHEMA = Schema(
    "profile.frame",
    (
        Field(
            "frame_id", "int", doc="a hash of kind, module and function: the same in every window", label=True
        ),
        Field("function", "str", doc="function name, or [module+0xoffset] where none was found"),
        Field("module", "str", doc="binary (file name), [kernel] or [jit]"),
        Field("kind", "enum", values=("user", "kernel", "python"), doc="where the frame runs"),
        Field("build_id", "str", doc="the binary's GNU build-id (hex), empty if it has none"),
        Field("unsymbolised", "str", doc="why no name was found (empty when named)"),
    ),
    doc="A frame that stacks of this window use.",
)

STACK_SCHEMA = Schema(
    "profile.stack",
    (
        Field("profile", "enum", values=("cpu", "offcpu"), doc="on-CPU samples or off-CPU time", label=True),
        PID,
        TID,
        COMM,
        CGROUP,
        Field(
            "container",
            "str",
            nullable=True,
            doc="container id, when the cgroup is a container's",
            label=True,
        ),
        Field("frames", "list", doc="frame ids (profile.frame), root first"),
        Field("samples", "int", doc="on-CPU: samples; off-CPU: times the thread blocked there"),
        Field("weight_ns", "int", "ns", "on-CPU: samples x the sampling period; off-CPU: time blocked"),
    ),
    doc="One thread's stack and how much it was seen over the window.",
    interval=True,
)

WINDOW_SCHEMA = Schema(
    "profile.window",
    (
        Field("profile", "enum", values=("cpu", "offcpu"), label=True),
        Field("frequency_hz", "int", doc="samples per second on each CPU (0 for off-CPU)"),
        Field("samples", "int", doc="samples (or blocks) in the stacks of this window"),
        Field("idle_samples", "int", doc="samples of idle CPUs, not in any stack"),
        Field("unsymbolised", "dict", doc="reason -> frames (weighted by samples) left without a name"),
        Field("roots", "dict", doc="executable -> [stacks that reached their root, stacks], by samples"),
    ),
    doc="The totals of one profile window.",
    interval=True,
)

SCHEMAS = (FRAME_SCHEMA, STACK_SCHEMA, WINDOW_SCHEMA)


def frame_id(frame: Frame) -> int:
    digest = hashlib.blake2b("\0".join(frame.key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Thread:
    pid: int
    tid: int
    comm: str
    cgroup: int = 0
    container: str | None = None


@dataclass
class Profile:
    """Stacks and their counts. ``kind`` "cpu" (samples at ``frequency_hz``) or "offcpu" (blocked
    time); ``weights`` are nanoseconds."""

    kind: str = "cpu"
    frequency_hz: int = 0
    samples: Counter[tuple[Thread, tuple[Frame, ...]]] = field(default_factory=Counter)
    weights: Counter[tuple[Thread, tuple[Frame, ...]]] = field(default_factory=Counter)
    idle_samples: int = 0
    unsymbolised: Counter[str] = field(default_factory=Counter)
    roots: dict[str, list[int]] = field(default_factory=dict)  # executable -> [reached, total]
    duration_s: float = 0.0
    start_ts: float = 0.0

    def add(
        self, thread: Thread, frames: tuple[Frame, ...], samples: int, weight_ns: int, exe: str = ""
    ) -> None:
        key = (thread, frames)
        self.samples[key] += samples
        self.weights[key] += weight_ns
        for f in frames:
            if f.unsymbolised:
                self.unsymbolised[f.unsymbolised] += samples
        user = [f for f in frames if f.kind != "kernel"]
        if exe and user:
            reached = self.roots.setdefault(exe, [0, 0])
            reached[0] += samples if user[0].function in ROOT_FUNCTIONS else 0
            reached[1] += samples

    def merge(self, other: Profile) -> None:
        self.samples.update(other.samples)
        self.weights.update(other.weights)
        self.idle_samples += other.idle_samples
        self.unsymbolised.update(other.unsymbolised)
        for exe, (reached, total) in other.roots.items():
            mine = self.roots.setdefault(exe, [0, 0])
            mine[0] += reached
            mine[1] += total
        self.frequency_hz = self.frequency_hz or other.frequency_hz
        self.start_ts = min(self.start_ts, other.start_ts) if self.start_ts else other.start_ts
        self.duration_s += other.duration_s

    def of_process(self, pid: int) -> Profile:
        """The stacks of one process's threads, as a profile of their own (a service's flame graph out of
        a machine's)."""
        out = Profile(self.kind, self.frequency_hz, duration_s=self.duration_s, start_ts=self.start_ts)
        for key, samples in self.samples.items():
            if key[0].pid == pid:
                out.samples[key] = samples
                out.weights[key] = self.weights[key]
        return out

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())

    def value(self, key: tuple[Thread, tuple[Frame, ...]]) -> int:
        """What a flame graph sizes a stack by: samples on-CPU, microseconds blocked off-CPU."""
        return self.samples[key] if self.kind == "cpu" else self.weights[key] // 1000

    @property
    def unit(self) -> str:
        return "samples" if self.kind == "cpu" else "us"

    def stacks(self, with_comm: bool = True) -> Counter[tuple[str, ...]]:
        """Stacks of names (root first, kernel frames marked ``_[k]`` as flamegraph.pl does), the process
        name first when ``with_comm``, each with its value."""
        out: Counter[tuple[str, ...]] = Counter()
        for key in self.samples:
            thread, frames = key
            names = tuple(f.function + ("_[k]" if f.kind == "kernel" else "") for f in frames)
            out[((thread.comm,) if with_comm else ()) + names] += self.value(key)
        return out

    def functions(self) -> list[tuple[str, str, int, int]]:
        """(function, module, self, total) for every function, by total (a function counted once per
        stack however often it recurs)."""
        own: Counter[tuple[str, str]] = Counter()
        total: Counter[tuple[str, str]] = Counter()
        for key in self.samples:
            _, frames = key
            value = self.value(key)
            if frames:
                own[(frames[-1].function, frames[-1].module)] += value
            for name in {(f.function, f.module) for f in frames}:
                total[name] += value
        return sorted(
            ((fn, module, own[(fn, module)], n) for (fn, module), n in total.items()),
            key=lambda r: (-r[3], r[0]),
        )

    def shares(self, pid: int | None = None) -> dict[str, float]:
        """Percent of the samples (of one process) with each function on the stack."""
        keys = [k for k in self.samples if pid is None or k[0].pid == pid]
        whole = sum(self.value(k) for k in keys)
        out: Counter[str] = Counter()
        for key in keys:
            for name in {f.function for f in key[1]}:
                out[name] += self.value(key)
        return {name: 100.0 * n / whole for name, n in out.items()} if whole else {}

    # --- records -------------------------------------------------------------------------------------
    def records(self, ts: float, interval_s: float) -> Iterator[dict[str, Any]]:
        seen: set[Frame] = set()
        for _, frames in self.samples:
            for f in frames:
                if f not in seen:
                    seen.add(f)
                    yield FRAME_SCHEMA.record(
                        {
                            "ts": ts,
                            "frame_id": frame_id(f),
                            "function": f.function,
                            "module": f.module,
                            "kind": f.kind,
                            "build_id": f.build_id,
                            "unsymbolised": f.unsymbolised,
                        }
                    )
        for key, samples in self.samples.items():
            thread, frames = key
            yield STACK_SCHEMA.record(
                {
                    "ts": ts,
                    "interval_s": interval_s,
                    "profile": self.kind,
                    "pid": thread.pid,
                    "tid": thread.tid,
                    "comm": thread.comm,
                    "cgroup": thread.cgroup,
                    "container": thread.container,
                    "frames": [frame_id(f) for f in frames],
                    "samples": samples,
                    "weight_ns": self.weights[key],
                }
            )
        yield WINDOW_SCHEMA.record(
            {
                "ts": ts,
                "interval_s": interval_s,
                "profile": self.kind,
                "frequency_hz": self.frequency_hz,
                "samples": self.total_samples,
                "idle_samples": self.idle_samples,
                "unsymbolised": dict(self.unsymbolised),
                "roots": {exe: list(v) for exe, v in self.roots.items()},
            }
        )

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]], kind: str | None = None) -> Profile:
        """A profile from records of :data:`SCHEMAS` (one window or many: they add up)."""
        frames: dict[int, Frame] = {}
        stacks: list[dict[str, Any]] = []
        windows: list[dict[str, Any]] = []
        for r in records:
            name = r.get("record")
            if name == FRAME_SCHEMA.name:
                frames[r["frame_id"]] = Frame(
                    r["function"], r["module"], r["kind"], r["build_id"], r["unsymbolised"]
                )
            elif name == STACK_SCHEMA.name and (kind is None or r["profile"] == kind):
                stacks.append(r)
            elif name == WINDOW_SCHEMA.name and (kind is None or r["profile"] == kind):
                windows.append(r)
        profile = cls(kind=kind or (stacks[0]["profile"] if stacks else "cpu"))
        for r in stacks:
            thread = Thread(r["pid"], r["tid"], r["comm"], r["cgroup"], r["container"])
            key = (
                thread,
                tuple(frames.get(i, Frame(f"[frame {i}]", "[unknown]", "user")) for i in r["frames"]),
            )
            profile.samples[key] += r["samples"]
            profile.weights[key] += r["weight_ns"]
        for w in windows:
            profile.frequency_hz = profile.frequency_hz or w["frequency_hz"]
            profile.idle_samples += w["idle_samples"]
            profile.unsymbolised.update(w["unsymbolised"])
            for exe, (reached, total) in w["roots"].items():
                mine = profile.roots.setdefault(exe, [0, 0])
                mine[0] += reached
                mine[1] += total
            profile.duration_s += w["interval_s"]
            profile.start_ts = min(profile.start_ts or w["ts"], w["ts"] - w["interval_s"])
        return profile


def unsymbolised_text(counts: Counter[str]) -> str:
    """One line: the reasons frames stayed unnamed, largest first."""
    if not counts:
        return "every frame named"
    parts = [f"{n} {REASONS.get(reason, reason)}" for reason, n in counts.most_common()]
    return "unnamed frames: " + "; ".join(parts)
