"""bpfscope secure: one stream of security events (process_exec, process_exit, process_tracepoint), each with
the whole process and its lineage, filtered in the kernel by policies and enforced there.

The kernel side (secure.bpf.c) keeps a process cache and evaluates the policies' selectors on the hooked
tracepoints; user space sees matches only. :class:`SecureCollector` compiles the policies
(compiler.py), fills the kernel's maps, seeds both caches from /proc, attaches, and turns each drain of
the two rings into a :class:`SecurityBatch`: Tetragon's JSON (``--json``) or its compact lines.

Enforcement says what already happened: see docs in the tool's --help and the tests (Sigkill at a syscall's
entry does not undo it; Block refuses a connect before any packet; Sigkill at exec stops the new image
before its first instruction).
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import click

from bpfscope.cli.options import Run, common_options
from bpfscope.domains.security import compiler
from bpfscope.domains.security.events import Formatter, SecurityEvent, signal_name, sockaddr_json
from bpfscope.domains.security.policy import Policy, check_names, load_policy, parse_policies
from bpfscope.domains.security.processes import (
    DEFAULT_LIMIT,
    MAX_INTERNED,
    Process,
    ProcessCache,
    arguments_of,
    intern,
)
from bpfscope.engine import memory
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.collector import BpfCollector, Config, Sample
from bpfscope.runtime.schema import Field, Schema
from bpfscope.sinks.store import parse_size
from bpfscope.sinks.terminal import Terminal, View

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.btf import Struct
    from bpfscope.runtime.collector import Collector
    from bpfscope.runtime.losses import Losses

LIFECYCLE_PROGRAMS = {"process_fork", "process_exec", "process_exit"}
# Tracepoints whose rules run in a program of their own (process_exec, policy_sys_enter), not in
# policy_hook attached there.
BY_OWN_PROGRAM = {compiler.EXEC_TRACEPOINT, compiler.SYS_ENTER_TRACEPOINT}
BLOCK_PROGRAMS = {
    "block_connect4": "connect4",
    "block_connect6": "connect6",
    "block_sendmsg4": "sendmsg4",
    "block_sendmsg6": "sendmsg6",
}
# Process.creds and Process.caps, in their order (processes.py).
CREDS = ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid", "fsgid", "loginuid", "securebits")
CAPS = ("cap_effective", "cap_permitted", "cap_inheritable")
# The lifecycle record's fields before its exec-only strings, as one flat tuple per record
# (Struct.unpacker): an exec storm drains a few dozen records at a time, and a numpy batch of them
# (each padded to the 1.7 kB struct, then its columns turned into lists) cost more than the records.
HEAD_END = "binary"
SHORT_HEAD_END = "creds"  # where clone and exit records end
# After a drain that found only a few records, the loop waits this long for more. An exec storm came a
# few records a drain, each drain's own cost (two rings, the columns, the sinks) paid per handful of
# execs: waiting 5 ms instead of the engine's 0.2 took the tool from 30% to 11.6% of a core at 2,045 and
# 2,727 exec/s (compact view; Tetragon JSON 50% -> 36%; 20 ms: 9.5%), benchmarks/secure_overhead.py. A
# policy hit after a quiet spell is read as it comes (the wait follows a drain); in a storm an event
# waits at most this long, and the lifecycle ring holds far more (5 ms of 5,000 exec/s is 75 kB of 8 MiB).
# The lifecycle ring is now paced besides (SecureCollector.paced_drain_s).
STORM_BATCH_WAIT_S = 0.005
# The lifecycle ring's paced drains, further apart than the engine's PACED_DRAIN_S (0.05 s): an exec's
# records are read with the interpreter's caches cold from the spawners' work, less so in larger
# batches. The compact view under the storm (secure_spawn 5000 10 2, the tool's CPU an exec), the
# intervals alternating, three rounds: 0.05 s 15.9, 14.3, 11.6 us; 0.2 s 13.3, 10.3, 10.3; 0.5 s 13.9,
# 10.1, 10.1. An exec or exit waits at most this long for its line (a policy hit wakes the session at
# once, and its drain reads this ring too); 0.2 s of 5,000 exec/s is 1 MB of the 8 MiB ring.
LIFECYCLE_DRAIN_S = 0.2
# The lifecycle ring, as secure.bpf.c sizes it: an exec is about 1 kB of records, so 8 MiB hold 1.7 s of
# a stopped consumer at 5,000 exec/s. A host with bigger storms trades memory for headroom (--ring-size,
# as Tetragon's --rb-size): 30,000 processes ending at once overflowed 8 MiB in the agent.
DEFAULT_RING_SIZE = 8 << 20
RING_SIZES = (1 << 20, 1 << 30)


def check_ring_size(size: int) -> int:
    """The ring's size in bytes, or a one-line error: a power of two (the kernel's rule for a ring
    buffer), from 1 MiB to 1 GiB."""
    low, high = RING_SIZES
    if not low <= size <= high or size & (size - 1):
        raise BpfscopeError(f"ring size {size} bytes: a power of two from 1 MiB to 1 GiB (say 16M)")
    return size


@dataclass(frozen=True)
class LifecycleLayout:
    """Where a lifecycle record (secure.bpf.c's struct sec_proc_event) keeps what the consumer reads:
    the head's items picked from its flat tuple, the exec-only strings' byte offsets."""

    head: struct.Struct
    # The head up to the credentials, all a clone's or an exit's record holds (secure.bpf.c's
    # PROC_SHORT_SIZE): unpacked for every record, the whole head for an exec's alone.
    short: struct.Struct
    # kind, ktime, pid, ppid, flags, exec_ktime, parent_exec_ktime, exit_code: from the short head
    common: operator.itemgetter[tuple[Any, ...]]
    identity: operator.itemgetter[tuple[Any, ...]]  # pid, tid, ppid, exec_ktime, args_size, cgroup_id
    creds: operator.itemgetter[tuple[Any, ...]]  # CREDS, Process's order
    caps: operator.itemgetter[tuple[Any, ...]]  # CAPS
    ns: slice
    # The record's bytes of the credentials, capabilities and namespaces: most execs have the same, so
    # they are unpacked once for each such run of bytes (SecureCollector._identities).
    access: slice
    binary: int
    cwd: int
    args: int
    string_size: int

    @classmethod
    def of(cls, record: Struct) -> LifecycleLayout:
        head, names = record.unpacker(upto=HEAD_END)
        short, _ = record.unpacker(upto=SHORT_HEAD_END)
        at = {name: i for i, name in enumerate(names)}

        def pick(*fields: str) -> operator.itemgetter[tuple[Any, ...]]:
            return operator.itemgetter(*(at[name] for name in fields))

        ns = [i for name, i in at.items() if name.startswith("ns[")]
        return cls(
            head,
            short,
            pick("kind", "ktime", "pid", "ppid", "flags", "exec_ktime", "parent_exec_ktime", "exit_code"),
            pick("pid", "tid", "ppid", "exec_ktime", "args_size", "cgroup_id"),
            pick(*(f"creds.{name}" for name in CREDS)),
            pick(*(f"creds.{name}" for name in CAPS)),
            slice(ns[0], ns[-1] + 1),
            slice(record.field("creds").offset, record.field("comm").offset),
            record.field("binary").offset,
            record.field("cwd").offset,
            record.field("args").offset,
            record.field("binary").type.size,
        )

    def string(self, record: bytes, offset: int) -> str:
        return record[offset : offset + self.string_size].split(b"\0", 1)[0].decode(errors="replace")


ENUMS = ("sec_match_op", "sec_arg_type", "sec_proc_attr", "sec_ns_kind", "sec_cap_kind", "sec_action")


@dataclass(kw_only=True)
class SecureConfig(Config):
    policies: list[Policy] = field(default_factory=list)
    default_policy: bool = True  # the shipped policy, besides the given ones
    exec_events: bool = True  # process_exec and process_exit events (off: policy hits only)
    ancestors: bool = True
    cache_size: int = DEFAULT_LIMIT  # processes the kernel and user-space caches hold
    node: str | None = None  # node_name (default: the host name)
    # The lifecycle ring's bytes (the hits ring gets half): what a stalled consumer can fall behind.
    ring_size: int = DEFAULT_RING_SIZE


def policies_from(paths: list[str], default_policy: bool) -> list[Policy]:
    """The default policy (unless left out) and the given files, all checked, names unique."""
    from bpfscope.domains.security.default_policy import DEFAULT_POLICY

    policies = parse_policies(DEFAULT_POLICY, "default-policy.yaml") if default_policy else []
    for path in paths:
        policies += load_policy(path)
    check_names(policies)
    return policies


class SecureCollector(BpfCollector[SecureConfig]):
    name = "secure"
    bpf_object = "secure"
    requires = ("tracepoint", "ringbuf")
    loss_counters = {"procs_dropped": ("map_full", "processes the kernel cache had no room for")}
    # The lifecycle ring is drained every LIFECYCLE_DRAIN_S, its records waking nobody (lifecycle_paced
    # in secure.bpf.c): an exec storm is then read 1,000 execs a drain at 5,000 exec/s, not a few per
    # wake-up. A policy hit still wakes the session at once (its time to the event line unchanged).
    paced_drain_s = LIFECYCLE_DRAIN_S

    def __init__(self, config: SecureConfig) -> None:
        super().__init__(config)
        check_ring_size(config.ring_size)
        self.cache = ProcessCache(config.node, config.cache_size)
        self.formatter = Formatter(self.cache, ancestors=config.ancestors)
        self.seen = {"exec": 0, "exit": 0, "tracepoint": 0}
        # An exec record's credentials, capabilities and namespaces by their bytes: the (creds, caps)
        # pair and the namespaces' tuple, each interned. Unpacked and interned for each exec, they were
        # 0.5 of its 2.4 us made into a process (timed alone); bounded as intern()'s table.
        self._identities: dict[bytes, tuple[Any, tuple[int, ...]]] = {}
        self.compiled: compiler.Compiled | None = None

    @classmethod
    def schemas(cls) -> tuple[Schema, ...]:
        return tetragon_schemas()

    def enums(self) -> dict[str, dict[str, int]]:
        btf = self.btf()
        return {name: dict(btf.enum(name)) for name in ENUMS}

    def compile(self) -> compiler.Compiled:
        """The policies as kernel filters; a PolicyError before anything is loaded."""
        if self.compiled is None:
            self.compiled = compiler.compile_policies(self.config.policies, self.enums())
        return self.compiled

    def rodata(self) -> dict[str, Any]:
        compiled = self.compile()
        return {
            **super().rodata(),
            # Hits wake the session at once; only the lifecycle ring is paced, when drained on a timer.
            "bs_paced_wakeup": False,
            "lifecycle_paced": self.drain_every() is not None,
            "exec_hook": compiled.exec_hook,
            "sys_enter_hook": compiled.sys_enter_hook,
        }

    def autoload(self) -> set[str]:
        programs = set(LIFECYCLE_PROGRAMS)
        if any(h.tracepoint not in BY_OWN_PROGRAM for h in self.compile().hooks):
            programs.add("policy_hook")
        if self.compile().sys_enter_hook >= 0:
            programs.add("policy_sys_enter")
        if self.compile().blocks:
            programs |= set(BLOCK_PROGRAMS)
        return programs

    def max_entries(self) -> dict[str, int]:
        ring = self.config.ring_size
        return {"procs": self.config.cache_size, "lifecycle": ring, "hits": ring // 2}

    def open(self) -> None:
        self.compile()
        super().open()

    def configure(self) -> None:
        # Attached by hand: the policy hook to each tracepoint with its cookie, Block to the cgroup root.
        assert self.obj is not None
        for name in ("policy_hook", *BLOCK_PROGRAMS):
            self.obj.programs[name].autoattach = False

    def attach(self) -> None:
        from bpfscope.engine.bpf import require

        obj = self.obj
        assert obj is not None
        compiled = self.compile()
        if compiled.blocks:
            require("cgroup_sock_addr")
        obj.load()
        self._fill_maps(compiled)
        # The cache is seeded before anything is attached that might evict or replace an entry.
        self._seed()
        obj.attach()
        for index, hook in enumerate(compiled.hooks):
            if hook.tracepoint not in BY_OWN_PROGRAM:
                category, name = hook.tracepoint.split(":")
                obj.programs["policy_hook"].attach_tracepoint(category, name, cookie=index)
        if compiled.blocks:
            from bpfscope.sources.cgroups import cgroup2_mounts

            root = cgroup2_mounts()[0]
            for program in BLOCK_PROGRAMS:
                obj.programs[program].attach_cgroup(root)
        for name in ("hits", "lifecycle"):
            self.ring(name).batch_wait = STORM_BATCH_WAIT_S
        kinds = dict(self.btf().enum("sec_proc_event_kind"))
        self.exec_kind, self.clone_kind, self.exit_kind = (
            kinds["PROC_EXEC"],
            kinds["PROC_CLONE"],
            kinds["PROC_EXIT"],
        )
        flags = dict(self.btf().enum("sec_proc_flag"))
        self.selected_flag, self.truncated_flag = flags["PROC_SELECTED"], flags["PROC_ARGS_TRUNCATED"]
        self.children_left_flag = flags["PROC_CHILDREN_LEFT"]
        self.layout = LifecycleLayout.of(self.ring("lifecycle").event)
        actions = {v: k for k, v in self.btf().enum("sec_action")}
        self.action_names = {v: compiler_action_word(k) for v, k in actions.items()}

    def _fill_maps(self, compiled: compiler.Compiled) -> None:
        obj = self.obj
        assert obj is not None
        for index, value in enumerate(compiled.hook_values):
            obj.maps["hooks"].update(index, value)
        for index, value in enumerate(compiled.blocks):
            obj.maps["blocks"].update(index, value)
        for set_id, text in compiled.strings:
            obj.maps["string_sets"].update({"set": set_id, "str": text.encode()}, 1)
        for set_id, text in compiled.prefixes:
            key = {"prefixlen": 32 + 8 * len(text.encode()), "set": set_id, "str": text.encode()}
            obj.maps["prefix_sets"].update(key, 1)
        for set_id, text in compiled.postfixes:
            key = {"prefixlen": 32 + 8 * len(text.encode()), "set": set_id, "str": text.encode()}
            obj.maps["postfix_sets"].update(key, 1)
        for set_id, network in compiled.cidrs:
            obj.maps["cidr_sets"].update(compiler.cidr_key(set_id, network), 1)

    def _seed(self) -> None:
        """Processes already running, into both caches (the kernel's only where it has nothing newer)."""
        obj = self.obj
        assert obj is not None
        skip = set() if self.config.include_self else {os.getpid()}
        procs = obj.maps["procs"]
        for process in self.cache.seed(skip=skip):
            value = {
                "exec_ktime": process.ktime,
                "ppid": process.ppid,
                "binary": process.binary.encode()[:251],
            }
            try:
                procs.update(process.pid, value, flags=1)  # BPF_NOEXIST
            except Exception:
                continue  # the kernel has it already (or is full: counted there)
        memory.trim()  # what the start-up freed (see engine/memory.py)

    def drain(self) -> SecurityBatch | None:
        # Hits first: a hit read now was committed after its process's exec, which the lifecycle ring,
        # read next, therefore holds.
        hits = self.rings["hits"].read()
        lifecycle = self.rings["lifecycle"].read_sized()
        if not len(hits) and not lifecycle:
            return None
        events = self._lifecycle(lifecycle, hits)
        return SecurityBatch(events, self.formatter)

    def _wall(self, ktime: int) -> int:
        return ktime + self.cache.boot_offset_ns

    def _lifecycle(self, records: list[bytes], hits: np.ndarray) -> list[SecurityEvent]:
        """The lifecycle records in order, each hit taken where it happened among them (a hit after its
        process's exit in the same drain must still find the process)."""
        out: list[SecurityEvent] = []
        hit_times = hits["ktime"].tolist() if len(hits) else []
        order = sorted(range(len(hit_times)), key=hit_times.__getitem__)
        next_hit, n_hits = 0, len(order)
        # Locals, not attributes, in the loop below: it runs twice an exec in a storm (exec, exit).
        cache, append, seen = self.cache, out.append, self.seen
        clone_kind, exec_kind, exit_kind = self.clone_kind, self.exec_kind, self.exit_kind
        selected_flag, children_left = self.selected_flag, self.children_left_flag
        boot_offset = self.cache.boot_offset_ns  # _wall(), inline
        emit = self.config.exec_events
        layout = self.layout
        common = layout.common
        # Each record's head unpacked where it lies: 130 ns a record, where joining the heads to unpack
        # them as one buffer took 340.
        for record, row in zip(records, map(layout.short.unpack_from, records), strict=True):
            kind, ktime, pid, ppid, flags, exec_ktime, parent_ktime, status = common(row)
            while next_hit < n_hits and hit_times[order[next_hit]] <= ktime:
                append(self._hit(hits[order[next_hit]]))
                next_hit += 1
            if kind == clone_kind:
                cache.clone(pid, ppid, exec_ktime, parent_ktime)
                continue
            selected = flags & selected_flag
            if kind == exec_kind:
                if flags & children_left:
                    cache.keep_as_parent(pid)
                process = cache.add(self._exec_process(record, row, flags, parent_ktime))
                if emit and selected:
                    seen["exec"] += 1
                    append(SecurityEvent("process_exec", ktime + boot_offset, process))
            elif kind == exit_kind:
                process = cache.exit(pid, bool(flags & children_left))
                if process is None:
                    continue
                if emit and selected:
                    seen["exit"] += 1
                    fields = {
                        "signal": signal_name(status & 0x7F) if status & 0x7F else "",
                        "status": status >> 8 & 0xFF,
                    }
                    append(SecurityEvent("process_exit", ktime + boot_offset, process, fields))
        out.extend(self._hit(hits[j]) for j in order[next_hit:])
        return out

    def _exec_process(self, record: bytes, row: tuple[Any, ...], flags: int, parent_ktime: int) -> Process:
        """The process an exec record makes (``row``: its short head)."""
        layout = self.layout
        pid, tid, ppid, exec_ktime, args_size, cgroup_id = layout.identity(row)
        access_bytes = record[layout.access]
        known = self._identities.get(access_bytes)
        if known is None:
            head = layout.head.unpack_from(record)
            known = (intern((layout.creds(head), layout.caps(head))), intern(head[layout.ns]))
            if len(self._identities) >= MAX_INTERNED:
                self._identities.clear()
            self._identities[access_bytes] = known
        access, ns = known
        # Decoded whole: a NUL is never inside a UTF-8 sequence, so the same strings as decoding each
        # argument.
        arguments = arguments_of(record[layout.args : layout.args + args_size].decode(errors="replace"))
        cwd = layout.string(record, layout.cwd)
        exec_flags = "execve" + (" rootcwd" if cwd == "/" else "")
        if flags & self.truncated_flag:
            exec_flags += " truncArgs"
        return Process(
            pid,
            exec_ktime,
            intern(layout.string(record, layout.binary)),
            arguments,
            intern(cwd),
            access,
            ns,
            cgroup_id,
            exec_flags,
            self.cache.parent_of(ppid, parent_ktime),
            ppid,
            tid,
        )

    def _hit(self, r: Any) -> SecurityEvent:
        """A policy hit: the rule that matched, its arguments, and the credentials at that moment when they
        are no longer those of the exec (a setuid since)."""
        rule = self.compile().rules[int(r["rule"])]
        pid = int(r["pid"])
        process = self.cache.get_or_exited(pid) or self._unknown(r)
        action = self.action_names.get(int(r["action"]), "Post")
        args = block_args(r) if action == "Block" else hook_args(rule, r)
        fields: dict[str, Any] = {}
        if action in ("Sigkill", "Signal"):
            fields["signal"] = signal_name(int(r["signal"]))
            fields["signal_result"] = int(r["action_result"])
        creds = r["creds"]
        now = (int(creds["uid"]), int(creds["euid"]))
        # A clone whose parent the cache did not know has no credentials of its own: the hit's are all.
        if action != "Block" and (not process.creds or now != (process.uid, process.euid)):
            fields["process_credentials"] = {
                "uid": int(creds["uid"]),
                "euid": int(creds["euid"]),
                "gid": int(creds["gid"]),
                "egid": int(creds["egid"]),
            }
        if rule.hook.message:
            fields["message"] = rule.hook.message
        if rule.hook.tags:
            fields["tags"] = rule.hook.tags
        self.seen["tracepoint"] += 1
        return SecurityEvent(
            "process_tracepoint",
            self._wall(int(r["ktime"])),
            process,
            fields,
            policy=rule.policy,
            tracepoint=rule.tracepoint,
            action=action,
            args=args,
        )

    def _unknown(self, r: Any) -> Process:
        """A process the cache does not have (it started before a full cache, say): what the hit knows."""
        c = r["creds"]
        return Process(
            int(r["pid"]),
            int(r["exec_ktime"]),
            "",
            "",
            "",
            intern(
                (
                    (int(c["uid"]), int(c["euid"]), 0, 0, int(c["gid"]), int(c["egid"]), 0, 0, 0, 0),
                    (int(c["cap_effective"]), 0, 0),
                )
            ),
            (),
            int(r["cgroup_id"]),
            "unknown",
            None,
            0,
            int(r["tid"]),
        )

    def losses(self) -> Losses:
        from bpfscope.runtime.losses import Loss

        losses = super().losses()
        if self.cache.evicted:
            losses.items.append(
                Loss("map_full:user_cache", self.cache.evicted, "processes evicted (cache full)")
            )
        return losses

    @property
    def rate_limited(self) -> int:
        return int(self.obj.bss["rate_limited"]) if self.obj is not None else 0


def compiler_action_word(member: str) -> str:
    """ACTION_SIGKILL -> Sigkill: the policy's word for a kernel action."""
    return {"ACTION_NOPOST": "NoPost"}.get(member, member.removeprefix("ACTION_").capitalize())


def _text(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def hook_args(rule: compiler.Rule, r: Any) -> list[dict[str, Any]]:
    """Tetragon's args: one object per argument, of the kind its type gives."""
    out = []
    for i, arg in enumerate(rule.args):
        value = r["args"][i]
        text = _text(value["str"])
        if arg.type in ("string", "kstring"):
            item: dict[str, Any] = {"string_arg": text}
        elif arg.type == "fd":
            item = {"file_arg": {"path": text}, "int_arg": int(value["num"])}
        elif arg.type == "sockaddr":
            item = {
                "sockaddr_arg": sockaddr_json(
                    int(value["family"]), int(value["port"]), bytes(value["addr"]), text
                )
            }
        else:
            item = {"int_arg": int(value["num"])}
        item["label"] = arg.label
        out.append(item)
    return out


def block_args(r: Any) -> list[dict[str, Any]]:
    value = r["args"][0]
    return [
        {
            "sockaddr_arg": sockaddr_json(int(value["family"]), int(value["port"]), bytes(value["addr"]), ""),
            "label": "destination",
        }
    ]


@dataclass
class SecurityBatch(Sample):
    events: list[SecurityEvent]
    formatter: Formatter

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> float:  # type: ignore[override]
        return self.events[-1].wall_ns / 1e9 if self.events else 0.0

    def records(self) -> Iterator[dict[str, Any]]:
        schemas = {s.name: s for s in tetragon_schemas()}
        for event in self.events:
            body = event.tetragon(self.formatter)
            yield schemas[f"secure.{event.kind}"].record({"ts": round(event.wall_ns / 1e9, 6), **body})

    def json_lines(self) -> str:
        # The same records as records(), with each process encoded once (Formatter.process_json).
        return "".join(
            event.tetragon_json(self.formatter, f"secure.{event.kind}", round(event.wall_ns / 1e9, 6))
            for event in self.events
        )


@cache
def tetragon_schemas() -> tuple[Schema, ...]:
    common = (
        Field("node_name", "str", doc="the node (host name)"),
        Field("time", "str", doc="RFC 3339, UTC, ns"),
    )
    return (
        Schema(
            "secure.process_exec",
            (
                Field("process_exec", "dict", doc="Tetragon's process_exec: process, parent, ancestors"),
                *common,
            ),
            doc="A program started (exec).",
        ),
        Schema(
            "secure.process_exit",
            (
                Field("process_exit", "dict", doc="Tetragon's process_exit: process, parent, signal, status"),
                *common,
            ),
            doc="A process ended (its last thread).",
        ),
        Schema(
            "secure.process_tracepoint",
            (
                Field(
                    "process_tracepoint",
                    "dict",
                    doc="Tetragon's process_tracepoint: process, parent, subsys, event, args, policy_name, "
                    "action",
                ),
                *common,
            ),
            doc="A policy's selector matched on a hooked tracepoint.",
        ),
    )


class SecureView(View):
    """One line per event, as `tetra getevents -o compact` prints them."""

    def show(self, sample: Sample, term: Terminal) -> None:
        assert isinstance(sample, SecurityBatch)
        term.lines([event.compact() for event in sample.events])

    def summary(self, collector: Collector, losses: Losses) -> str:
        assert isinstance(collector, SecureCollector)
        counts = ", ".join(f"{n} {kind}" for kind, n in collector.seen.items())
        limited = collector.rate_limited
        extra = f", {limited} hits rate-limited" if limited else ""
        cached = len(collector.cache)
        return f"secure: {counts} events{extra}, {cached} processes cached, {losses.text()}"


EXAMPLES = """
\b
Examples:
  bpfscope secure                          # execs, exits and the default policy's hits, compact
  bpfscope secure --json | jq 'select(.process_tracepoint)'   # Tetragon's JSON
  bpfscope secure --policy my.yaml         # the default policy and mine
  bpfscope secure --policy my.yaml --no-default-policy --no-exec-events   # my policy's hits only
  bpfscope secure --check --policy my.yaml # check a policy, load nothing
  bpfscope secure --container 3f2a         # one container's processes
  bpfscope secure --ring-size 64M          # room for bigger exec storms
"""


@click.command(name="secure", epilog=EXAMPLES)
@click.option(
    "--policy",
    "policy_paths",
    multiple=True,
    metavar="FILE",
    help="A TracingPolicy YAML file (repeat for more).",
)
@click.option(
    "--no-default-policy",
    is_flag=True,
    help="Leave out the shipped policy (its rules: --print-default-policy).",
)
@click.option("--print-default-policy", is_flag=True, help="Print the shipped policy and exit.")
@click.option("--check", "check_only", is_flag=True, help="Check the policies and exit (nothing is loaded).")
@click.option("--no-exec-events", is_flag=True, help="Policy hits only, no process_exec / process_exit.")
@click.option("--no-ancestors", is_flag=True, help="Leave the ancestors out of each event.")
@click.option(
    "--cache-size",
    type=click.IntRange(min=1024, max=1 << 22),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="Processes the caches hold (kernel and user space).",
)
@click.option(
    "--ring-size",
    default="8M",
    show_default=True,
    metavar="SIZE",
    help="The lifecycle ring's size (a power of two; the policy hits' ring gets half): room for a storm "
    "of execs and exits while the reader is busy. Lost records are counted (ring_full).",
)
@common_options
def command(
    run: Run,
    policy_paths: tuple[str, ...],
    no_default_policy: bool,
    print_default_policy: bool,
    check_only: bool,
    no_exec_events: bool,
    no_ancestors: bool,
    cache_size: int,
    ring_size: str,
) -> None:
    """Security observability and enforcement: every exec and exit with the process's lineage, and the
    hits of policies (TracingPolicy YAML on tracepoints) filtered in the kernel.

    Enforcement (Sigkill, Signal at a hook; Block for connects and sends) happens in the kernel. A signal
    sent at a syscall's entry arrives after the syscall ran: the file was opened (and truncated), the
    SYN sent. Block refuses a connect or send (EPERM) before anything leaves; Sigkill at
    sched:sched_process_exec kills the new program before its first instruction. Arguments read from
    user memory at a syscall's entry can change after the check (TOCTOU): prefer kernel-resident data
    (sys_exit_openat's fd, the exec's file, the cgroup hook's address).
    """
    from bpfscope.domains.security.default_policy import DEFAULT_POLICY

    if print_default_policy:
        click.echo(DEFAULT_POLICY, nl=False)
        return
    policies = policies_from(list(policy_paths), not no_default_policy)
    config = run.config(
        SecureConfig,
        policies=policies,
        exec_events=not no_exec_events,
        ancestors=not no_ancestors,
        cache_size=cache_size,
        ring_size=parse_size(ring_size),  # checked by the collector
    )
    collector = SecureCollector(config)
    collector.compile()
    if check_only:
        hooks = len(collector.compile().hooks)
        rules = len(collector.compile().rules)
        click.echo(
            f"policies OK: {len(policies)} policies, {rules} selectors on {hooks} tracepoints", err=True
        )
        return
    run.run(collector, SecureView(), "Tracing security events... Ctrl-C to end.")
