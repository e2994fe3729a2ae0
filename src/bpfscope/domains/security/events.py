"""Security events as Tetragon writes them (its JSON export), so that jq queries and pipelines written for
Tetragon keep working: ``{"process_exec": {"process": {...}, "parent": {...}, "ancestors": [...]},
"node_name": ..., "time": ...}``, and likewise ``process_exit`` and ``process_tracepoint``; and the
compact one-line form of ``tetra getevents -o compact``.

bpfscope adds to the process object what Tetragon keeps elsewhere: ``cgroup`` (its path) and
``container`` (runtime, id, pod uid, systemd unit).
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from bpfscope.domains.security.policy import CAPABILITIES
from bpfscope.domains.security.processes import Process, ProcessCache
from bpfscope.sources.cgroups import cgroup_path, workload

NS_JSON = (
    "uts",
    "ipc",
    "mnt",
    "pid",
    "pid_for_children",
    "net",
    "time",
    "time_for_children",
    "cgroup",
    "user",
)
ACTION_NAMES = {
    "Post": "KPROBE_ACTION_POST",
    "NoPost": "KPROBE_ACTION_NOPOST",
    "Sigkill": "KPROBE_ACTION_SIGKILL",
    "Signal": "KPROBE_ACTION_SIGNAL",
    "Block": "KPROBE_ACTION_BLOCK",
}


def rfc3339(wall_ns: int) -> str:
    """Tetragon's timestamps: UTC, nanoseconds."""
    seconds, ns = divmod(wall_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{ns:09d}Z"


@lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@lru_cache(maxsize=256)
def cap_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@lru_cache(maxsize=4096)
def _container(cgroup_id: int) -> tuple[str | None, dict[str, Any] | None]:
    path = cgroup_path(cgroup_id) if cgroup_id else None
    w = workload(path)
    info = None
    if w.runtime or w.pod_uid:
        info = {"runtime": w.runtime, "id": w.container_id, "pod_uid": w.pod_uid, "unit": w.unit}
    return path, info


# A process's capabilities, namespaces and credentials in Tetragon's form, one dictionary for every
# process that has the same (most have): made for each process, they were 2.6 of the 3.3 kB of its
# dictionary, and an exec storm's exits (30,000 processes ending together) each held their own until
# the store's flush. Shared, never changed: records are made for the sinks and not changed after.
@lru_cache(maxsize=4096)
def _caps_json(caps: tuple[int, int, int]) -> dict[str, tuple[str, ...]]:
    return {
        "effective": cap_names(caps[0]),
        "permitted": cap_names(caps[1]),
        "inheritable": cap_names(caps[2]),
    }


@lru_cache(maxsize=4096)
def _ns_json(ns: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    host = _host_namespaces()
    return {
        name: {"inum": inum, "is_host": inum == host[i]}
        for i, (name, inum) in enumerate(zip(NS_JSON, ns, strict=False))
    }


@lru_cache(maxsize=4096)
def _credentials_json(creds: tuple[int, ...]) -> dict[str, int]:
    uid, euid, suid, fsuid, gid, egid, sgid, fsgid, _, _ = creds or (0,) * 10
    return {
        "uid": uid,
        "gid": gid,
        "euid": euid,
        "egid": egid,
        "suid": suid,
        "sgid": sgid,
        "fsuid": fsuid,
        "fsgid": fsgid,
    }


# Their JSON texts, encoded once: a root process's capabilities are most of its 2.2 kB of JSON, and
# encoding them again for each new process was a fifth of the tool's time under an exec storm.
@lru_cache(maxsize=4096)
def _caps_text(caps: tuple[int, int, int]) -> str:
    return json.dumps(_caps_json(caps))


@lru_cache(maxsize=4096)
def _ns_text(ns: tuple[int, ...]) -> str:
    return json.dumps(_ns_json(ns))


@lru_cache(maxsize=4096)
def _credentials_text(creds: tuple[int, ...]) -> str:
    return json.dumps(_credentials_json(creds))


@lru_cache(maxsize=1)
def _host_namespaces() -> tuple[int, ...]:
    from bpfscope.domains.security.policy import NAMESPACES, host_namespace

    return tuple(host_namespace(name) for name in NAMESPACES)


class Formatter:
    """Tetragon-shaped dictionaries for the processes of a cache (a process printed often, as a parent or
    ancestor, is formatted once while it stays among the recent)."""

    def __init__(self, cache: ProcessCache, ancestors: bool = True) -> None:
        self.cache = cache
        self.with_ancestors = ancestors
        self._recent: dict[tuple[int, int], dict[str, Any]] = {}
        self._recent_json: dict[tuple[int, int], str] = {}

    def process(self, p: Process) -> dict[str, Any]:
        key = (p.pid, p.ktime)
        cached = self._recent.get(key)
        if cached is not None:
            return cached
        out = self._process(p)
        if len(self._recent) >= 1024:
            self._recent.pop(next(iter(self._recent)))
        self._recent[key] = out
        return out

    def _process(self, p: Process) -> dict[str, Any]:
        cache = self.cache
        uid, loginuid = (p.creds[0], p.creds[8]) if p.creds else (0, 0)
        path, container = _container(p.cgroup_id)
        out: dict[str, Any] = {
            "exec_id": cache.exec_id(p),
            "pid": p.pid,
            "uid": uid,
            "cwd": p.cwd,
            "binary": p.binary,
            "arguments": p.arguments,
            "flags": p.flags,
            "start_time": rfc3339(p.ktime + cache.boot_offset_ns),
            "auid": loginuid,
            "parent_exec_id": cache.exec_id(p.parent) if p.parent else None,
            "tid": p.tid or p.pid,
            "cap": _caps_json(p.caps),
            "ns": _ns_json(p.ns),
            "process_credentials": _credentials_json(p.creds),
            "cgroup": path,
        }
        if container is not None:
            out["container"] = container
            if container["id"]:
                out["docker"] = container["id"][:31]  # Tetragon's field: the id's first 31 characters
            if container["pod_uid"]:
                out["pod"] = {"uid": container["pod_uid"], "container": {"id": container["id"]}}
        return out

    def lineage(self, p: Process) -> dict[str, Any]:
        out: dict[str, Any] = {"process": self.process(p)}
        if p.parent is not None:
            out["parent"] = self.process(p.parent)
        if self.with_ancestors:
            ancestors = [self.process(a) for a in self.cache.ancestors(p)]
            if ancestors:
                out["ancestors"] = ancestors
        return out

    def process_json(self, p: Process) -> str:
        """The process's JSON text, encoded once while it stays among the recent: in an exec storm the
        same parent and ancestors are in every event, and encoding them again and again was two thirds
        of the tool's time."""
        key = (p.pid, p.ktime)
        text = self._recent_json.get(key)
        if text is None:
            text = self._encode(p, self.process(p))
            if len(self._recent_json) >= 1024:
                self._recent_json.pop(next(iter(self._recent_json)))
            self._recent_json[key] = text
        return text

    @staticmethod
    def _encode(p: Process, out: dict[str, Any]) -> str:
        """``json.dumps(out)``, byte for byte, with the shared parts' texts encoded once (_process
        puts them together, between the process's own scalars and its cgroup)."""
        keys = list(out)
        at = keys.index("cap")
        if keys[at : at + 3] != ["cap", "ns", "process_credentials"]:
            return json.dumps(out)
        head = json.dumps({k: out[k] for k in keys[:at]})
        tail = json.dumps({k: out[k] for k in keys[at + 3 :]})
        shared = (
            f'"cap": {_caps_text(p.caps)}, "ns": {_ns_text(p.ns)}, '
            f'"process_credentials": {_credentials_text(p.creds)}'
        )
        return f"{head[:-1]}, {shared}, {tail[1:]}" if len(tail) > 2 else f"{head[:-1]}, {shared}}}"

    def lineage_json(self, p: Process) -> str:
        """:meth:`lineage` as the members of a JSON object (no braces), from the processes' texts."""
        parts = [f'"process": {self.process_json(p)}']
        if p.parent is not None:
            parts.append(f'"parent": {self.process_json(p.parent)}')
        if self.with_ancestors:
            ancestors = [self.process_json(a) for a in self.cache.ancestors(p)]
            if ancestors:
                parts.append(f'"ancestors": [{", ".join(ancestors)}]')
        return ", ".join(parts)


@dataclass(slots=True)  # made twice an exec in a storm: 322 -> 226 ns made in slots
class SecurityEvent:
    """One event of the stream: its kind (Tetragon's key), time, process and what else it says."""

    kind: str  # process_exec, process_exit, process_tracepoint
    wall_ns: int
    process: Process
    fields: dict[str, Any] = field(default_factory=dict)
    # Tracepoint hits: the rule that matched, for the compact view.
    policy: str = ""
    tracepoint: str = ""
    action: str = ""
    args: list[dict[str, Any]] = field(default_factory=list)

    def tetragon(self, formatter: Formatter) -> dict[str, Any]:
        body = {**formatter.lineage(self.process), **self._details()}
        return {self.kind: body, "node_name": formatter.cache.node, "time": rfc3339(self.wall_ns)}

    def tetragon_json(self, formatter: Formatter, record: str, ts: float) -> str:
        """The record of :meth:`tetragon` (named ``record``, at ``ts``) as one JSON line, its processes'
        texts reused from the formatter."""
        details = self._details()
        if details.keys() & {"process", "parent", "ancestors"}:  # they would replace the lineage's
            return json.dumps({"record": record, "ts": ts, **self.tetragon(formatter)}) + "\n"
        members = formatter.lineage_json(self.process)
        if details:
            members += ", " + json.dumps(details)[1:-1]
        return (
            f'{{"record": {json.dumps(record)}, "ts": {json.dumps(ts)}, "{self.kind}": {{{members}}}, '
            f'"node_name": {json.dumps(formatter.cache.node)}, "time": "{rfc3339(self.wall_ns)}"}}\n'
        )

    def _details(self) -> dict[str, Any]:
        """What the event says beside its process's lineage."""
        if self.kind != "process_tracepoint":
            return self.fields
        subsys, _, event = self.tracepoint.partition(":")
        return {
            **self.fields,
            "subsys": subsys,
            "event": event,
            "args": self.args,
            "policy_name": self.policy,
            "action": ACTION_NAMES.get(self.action, self.action),
        }

    def compact(self) -> str:
        p = self.process
        where = _compact_where(p.cgroup_id)
        if self.kind == "process_exec":  # an exec storm's every other line: one string made, not two
            return f"🚀 process {where} {p.binary} {p.arguments}".rstrip()
        command = f"{p.binary} {p.arguments}".rstrip()
        if self.kind == "process_exit":
            status = self.fields.get("signal") or self.fields.get("status")
            return f"💥 exit    {where} {command} {status}"
        icon = {"Sigkill": "☠️ ", "Signal": "📶", "Block": "⛔"}.get(self.action, "🔎")
        event = self.tracepoint.partition(":")[2].removeprefix("sys_enter_").removeprefix("sys_exit_")
        shown = " ".join(_compact_arg(a) for a in self.args)
        return f"{icon} {event:<7} {where} {p.binary} {shown} [{self.policy} {self.action}]".rstrip()


@lru_cache(maxsize=4096)
def _compact_where(cgroup_id: int) -> str:
    """The container, or the host's name (read once: a system call per compact line was 8% of the
    tool's time under an exec storm)."""
    _, container = _container(cgroup_id)
    if container and container["id"]:
        return f"{container['runtime']}/{container['id'][:12]}"
    return socket.gethostname()


def _compact_arg(arg: dict[str, Any]) -> str:
    (kind, value), *_ = ((k, v) for k, v in arg.items() if k != "label")
    if kind == "sockaddr_arg":
        if value.get("path") is not None:
            return value["path"]
        return f"{value['addr']}:{value['port']}"
    if kind == "file_arg":
        return value["path"]
    return str(value)


def sockaddr_json(family: int, port: int, addr: bytes, path: str) -> dict[str, Any]:
    name = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6", socket.AF_UNIX: "AF_UNIX"}.get(
        family, str(family)
    )
    if family == socket.AF_INET:
        return {"family": name, "addr": str(ipaddress.IPv4Address(addr[:4])), "port": port}
    if family == socket.AF_INET6:
        address = ipaddress.IPv6Address(addr[:16])
        mapped = address.ipv4_mapped
        return {"family": name, "addr": f"::ffff:{mapped}" if mapped else str(address), "port": port}
    return {"family": name, "path": path}
