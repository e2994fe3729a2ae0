"""Security policies: YAML in the spirit of Tetragon's TracingPolicy, restricted to what tracepoints can do,
validated with the line of every mistake, and compiled into the kernel's filters (secure.bpf.c).

A policy hooks tracepoints by name and filters their events with selectors::

    apiVersion: cilium.io/v1alpha1
    kind: TracingPolicy
    metadata:
      name: shadow-readers
    spec:
      tracepoints:
      - subsystem: syscalls
        event: sys_exit_openat
        args:
        - name: ret            # or index: N, as Tetragon counts the format's fields
          type: fd             # the opened file's path, from the kernel's fd table
        selectors:
        - matchArgs:
          - name: ret
            operator: Equal
            values: [/etc/shadow]
          matchBinaries:
          - operator: NotIn
            values: [/usr/bin/passwd]
          matchActions:
          - action: Post

Selectors are ORed (a policy's first selector that matches decides for that policy; every policy on a
tracepoint decides for itself), their filters ANDed, the values of one filter ORed, as in Tetragon.
Everything is checked before anything is loaded: a mistake is a :class:`PolicyError` naming the file, the
line and the reason, and nothing running changes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfscope.errors import BpfscopeError

# What the kernel side holds (secure.bpf.c): limits a policy must fit in.
MAX_HOOKS = 48
MAX_SELECTORS = 8
MAX_ARGS = 4
MAX_MATCH_ARGS = 3
MAX_VALUES = 8
MAX_NS_MATCH = 2
MAX_NS_VALUES = 4
MAX_BLOCKS = 16
STR_LEN = 252  # bytes of a string the kernel keeps and matches (the last is its NUL)

# Tetragon counts a tracepoint's fields from the first common one.
COMMON_FIELDS = 4

STRING_OPERATORS = ("Equal", "NotEqual", "Prefix", "NotPrefix", "Postfix", "NotPostfix")
INT_OPERATORS = ("Equal", "NotEqual", "Mask", "GT", "LT")
SOCKADDR_OPERATORS = ("DAddr", "NotDAddr", "DPort", "NotDPort", "Family", *STRING_OPERATORS)
BINARY_OPERATORS = ("In", "NotIn", "Prefix", "NotPrefix")
# Tetragon's In/NotIn are Equal/NotEqual over a set.
OPERATOR_ALIASES = {"In": "Equal", "NotIn": "NotEqual"}
ACTIONS = ("Post", "NoPost", "Sigkill", "Signal", "Block")
NAMESPACES = (
    "Uts",
    "Ipc",
    "Mnt",
    "Pid",
    "PidForChildren",
    "Net",
    "Time",
    "TimeForChildren",
    "Cgroup",
    "User",
)
CAP_TYPES = ("Effective", "Permitted", "Inheritable")
ARG_TYPES = {
    "int": "int",
    "int32": "int",
    "uint32": "int",
    "int64": "int",
    "uint64": "int",
    "size_t": "int",
    "long": "int",
    "string": "string",
    "fd": "fd",
    "file": "fd",
    "sockaddr": "sockaddr",
}
# Attributes of the calling process, usable as arguments of any hook (bpfscope's addition).
PROCESS_ATTRS = (
    "process.uid",
    "process.euid",
    "process.gid",
    "process.egid",
    "process.suid",
    "process.loginuid",
)
# Hooks whose Block selectors run in the cgroup sock_addr programs instead (connect4/6, sendmsg4/6).
BLOCKABLE = {
    "syscalls:sys_enter_connect": "connect",
    "syscalls:sys_enter_sendto": "sendmsg",
    "syscalls:sys_enter_sendmsg": "sendmsg",
}
SELECTOR_KEYS = (
    "matchArgs",
    "matchBinaries",
    "matchParentBinaries",
    "matchNamespaces",
    "matchPIDs",
    "matchCapabilities",
    "matchActions",
)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}
# Linux capabilities by name (include/uapi/linux/capability.h): names are matched, numbers are bits.
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]


class PolicyError(BpfscopeError):
    """A mistake in a policy: ``FILE:LINE: reason``."""


# --- YAML with line numbers ------------------------------------------------------------------------


@dataclass
class Node:
    """A YAML value with the line it starts on (1-based), so every check can say where."""

    value: Any  # dict[str, Node] | list[Node] | str | int | float | bool | None
    line: int
    source: str

    def fail(self, reason: str) -> PolicyError:
        return PolicyError(f"{self.source}:{self.line}: {reason}")

    def mapping(self, what: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Node]:
        if not isinstance(self.value, dict):
            raise self.fail(f"{what} must be a mapping")
        allowed = tuple(allowed)
        for key, child in self.value.items():
            if key not in allowed:
                raise child.key_fail(f"unknown field {key!r} in {what} (known: {', '.join(allowed)})")
        for key in required:
            if key not in self.value:
                raise self.fail(f"{what} needs {key!r}")
        return self.value

    def sequence(self, what: str) -> list[Node]:
        if not isinstance(self.value, list):
            raise self.fail(f"{what} must be a list")
        return self.value

    def text(self, what: str) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise self.fail(f"{what} must be a string")
        return str(self.value)

    def integer(self, what: str) -> int:
        value = self.value
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise self.fail(f"{what} must be an integer, not {self.value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{what} must be an integer")
        return value

    def boolean(self, what: str) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"{what} must be true or false")
        return self.value

    # The line of a mapping's key, for "unknown field" errors (set by the loader).
    key_line: int = 0

    def key_fail(self, reason: str) -> PolicyError:
        return PolicyError(f"{self.source}:{self.key_line or self.line}: {reason}")


def load_yaml(text: str, source: str) -> list[Node]:
    """The documents of a YAML text as Nodes; a syntax error names its line."""
    import yaml

    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError(f"{source}:{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise PolicyError(
            f"{source}:{line}: not valid YAML: character {exc.character!r} is not allowed"
        ) from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(f"{source}: not valid YAML: {first}") from None
    return [_convert(doc, source) for doc in documents if doc is not None]


def _convert(node: Any, source: str, inside: frozenset[int] = frozenset()) -> Node:
    import yaml

    line = node.start_mark.line + 1
    if id(node) in inside:
        raise PolicyError(f"{source}:{line}: an alias refers to a value that holds it")
    inside = inside | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, str):
                raise PolicyError(f"{source}:{key_node.start_mark.line + 1}: a key must be a plain word")
            if key in out:
                raise PolicyError(f"{source}:{key_node.start_mark.line + 1}: {key!r} is given twice")
            child = _convert(value_node, source, inside)
            child.key_line = key_node.start_mark.line + 1
            out[key] = child
        return Node(out, line, source)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(item, source, inside) for item in node.value], line, source)
    # A scalar, typed as YAML's safe loader types it (no other tag is accepted).
    try:
        value = yaml.SafeLoader("").construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problem = getattr(exc, "problem", None) or f"unreadable value ({type(exc).__name__})"
        raise PolicyError(f"{source}:{line}: {problem.splitlines()[0]}") from None
    return Node(value, line, source)


# --- the policy, as parsed -------------------------------------------------------------------------


@dataclass
class HookArg:
    name: str  # the format's field name, or process.ATTR
    type: str  # int, string, kstring, fd, sockaddr, process
    offset: int = 0
    size: int = 0
    signed: bool = False
    index: int | None = None  # Tetragon's index (the format's field, counting the common ones)
    label: str = ""


@dataclass
class ArgMatch:
    arg: int  # index into the hook's args
    operator: str  # canonical: Equal, NotEqual, Prefix, ..., DAddr, DPort, Mask, GT, LT, Family
    values: list[Any]
    line: int


@dataclass
class BinaryMatch:
    operator: str  # Equal (In), NotEqual (NotIn), Prefix, NotPrefix
    values: list[str]


@dataclass
class NamespaceMatch:
    namespace: str
    operator: str  # Equal (In) / NotEqual (NotIn)
    values: list[int]  # inode numbers; host_ns resolved


@dataclass
class Selector:
    line: int
    args: list[ArgMatch] = field(default_factory=list)
    binaries: BinaryMatch | None = None
    parent_binaries: BinaryMatch | None = None
    namespaces: list[NamespaceMatch] = field(default_factory=list)
    pid_operator: str | None = None
    pids: list[int] = field(default_factory=list)
    follow_forks: bool = False
    cap_type: str = "Effective"
    cap_operator: str | None = None
    caps: list[str] = field(default_factory=list)
    action: str = "Post"  # Post, NoPost, Sigkill, Signal, Block
    post: bool = True
    signal: int = 0
    rate_limit_ms: int = 0


@dataclass
class Hook:
    """One tracepoint of one policy."""

    policy: str
    subsystem: str
    event: str
    args: list[HookArg]
    selectors: list[Selector]
    line: int
    message: str = ""
    tags: list[str] = field(default_factory=list)

    @property
    def tracepoint(self) -> str:
        return f"{self.subsystem}:{self.event}"


@dataclass
class Policy:
    name: str
    source: str
    hooks: list[Hook]


def load_policy(path: str | Path) -> list[Policy]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
    return parse_policies(text, str(path))


def parse_policies(text: str, source: str = "<policy>") -> list[Policy]:
    """Every policy in a YAML text (documents separated by ---), each checked."""
    documents = load_yaml(text, source)
    if not documents:
        raise PolicyError(f"{source}:1: no policy in this file")
    return [_policy(doc) for doc in documents]


def _policy(doc: Node) -> Policy:
    top = doc.mapping("a policy", ("apiVersion", "kind", "metadata", "spec"), ("metadata", "spec"))
    if "kind" in top and top["kind"].text("kind") not in ("TracingPolicy", "TracingPolicyNamespaced"):
        raise top["kind"].fail(f"kind must be TracingPolicy, not {top['kind'].value!r}")
    metadata = top["metadata"].mapping("metadata", ("name", "namespace", "labels", "annotations"), ("name",))
    name = metadata["name"].text("metadata.name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
        raise metadata["name"].fail(f"policy name {name!r} must be letters, digits, '.', '_' or '-'")
    spec = top["spec"].mapping(
        "spec", ("tracepoints", "kprobes", "uprobes", "lsmhooks", "options", "podSelector")
    )
    for unsupported in ("kprobes", "lsmhooks"):
        if unsupported in spec:
            raise spec[unsupported].key_fail(
                f"{unsupported} are not available on this kernel: hook tracepoints instead"
            )
    for later in ("uprobes", "podSelector", "options"):
        if later in spec:
            raise spec[later].key_fail(f"{later} are not supported by bpfscope secure")
    if "tracepoints" not in spec:
        raise top["spec"].fail("spec needs 'tracepoints'")
    hooks = [_hook(name, node) for node in spec["tracepoints"].sequence("spec.tracepoints")]
    if not hooks:
        raise spec["tracepoints"].fail("spec.tracepoints is empty")
    return Policy(name, doc.source, hooks)


def _hook(policy: str, node: Node) -> Hook:
    from bpfscope.engine import system
    from bpfscope.engine.tracepoint import Tracepoint
    from bpfscope.errors import MissingCapability

    entry = node.mapping(
        "a tracepoint", ("subsystem", "event", "args", "selectors", "message", "tags"), ("subsystem", "event")
    )
    subsystem = entry["subsystem"].text("subsystem")
    event = entry["event"].text("event")
    try:
        system.require_tracepoint(subsystem, event)
    except MissingCapability as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise entry["event"].fail(f"unknown tracepoint {subsystem}:{event}{hint}") from None
    tracepoint = Tracepoint(subsystem, event)
    args = [_hook_arg(tracepoint, n) for n in entry["args"].sequence("args")] if "args" in entry else []
    names = [a.name for a in args]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise entry["args"].value[i].fail(f"argument {name!r} is declared twice")
    hook = Hook(
        policy,
        subsystem,
        event,
        args,
        [],
        node.line,
        message=entry["message"].text("message") if "message" in entry else "",
        tags=[t.text("tag") for t in entry["tags"].sequence("tags")] if "tags" in entry else [],
    )
    selectors = entry["selectors"].sequence("selectors") if "selectors" in entry else []
    hook.selectors = [_selector(hook, tracepoint, s) for s in selectors] or [Selector(node.line)]
    if len(hook.args) > MAX_ARGS:
        raise node.fail(
            f"{hook.tracepoint} uses {len(hook.args)} arguments; the kernel side takes {MAX_ARGS}"
        )
    return hook


def _hook_arg(tracepoint: Any, node: Node) -> HookArg:
    spec = node.mapping("an argument", ("index", "name", "type", "label", "sizeArgIndex", "returnCopy"))
    if ("index" in spec) == ("name" in spec):
        raise node.fail("an argument needs an index or a name (one of them)")
    fields = tracepoint.fields
    if "index" in spec:
        index = spec["index"].integer("index")
        if not 0 <= index < len(fields):
            raise spec["index"].fail(
                f"{tracepoint.full_name} has no field {index} (0 to {len(fields) - 1}, common fields counted)"
            )
        tp_field = fields[index]
        name = tp_field.name
    else:
        name = spec["name"].text("name")
        index = None
        if name in PROCESS_ATTRS:
            return HookArg(name, "process", label=name)
        tp_field = tracepoint.field(name)
        if tp_field is None:
            known = ", ".join(f.name for f in fields[COMMON_FIELDS:])
            raise spec["name"].fail(f"{tracepoint.full_name} has no field {name!r} (fields: {known})")
    kind = _field_type(tp_field)
    wanted = spec["type"].text("type") if "type" in spec else None
    if wanted is not None:
        if wanted not in ARG_TYPES:
            raise spec["type"].fail(f"unknown argument type {wanted!r} (known: {', '.join(ARG_TYPES)})")
        wanted_kind = ARG_TYPES[wanted]
        if wanted_kind == "string" and kind == "kstring":
            wanted_kind = "kstring"
        elif wanted_kind == "string" and kind != "string":
            raise spec["type"].fail(
                f"field {name} of {tracepoint.full_name} is {tp_field.type}, not a string"
            )
        elif (
            wanted_kind in ("int", "fd", "sockaddr")
            and kind in ("string", "kstring")
            and wanted_kind != "sockaddr"
        ):
            raise spec["type"].fail(f"field {name} of {tracepoint.full_name} is a string, not {wanted}")
        elif wanted_kind == "sockaddr" and kind not in ("pointer", "int"):
            raise spec["type"].fail(
                f"field {name} of {tracepoint.full_name} is {tp_field.type}, not a pointer"
            )
        kind = wanted_kind
    if kind == "pointer":
        kind = "sockaddr" if "sockaddr" in tp_field.type else "int"
    if kind == "unsupported" or (tp_field.size > 8 and kind not in ("kstring",)):
        raise node.fail(
            f"field {name} of {tracepoint.full_name} ({tp_field.type}) cannot be read by a policy"
        )
    label = spec["label"].text("label") if "label" in spec else name
    return HookArg(name, kind, tp_field.offset, tp_field.size, tp_field.signed, index, label)


def _field_type(tp_field: Any) -> str:
    kind = tp_field.kind
    if kind == "userstr":
        return "string"
    if kind == "dataloc":
        return "kstring"
    if kind == "pointer":
        return "pointer"
    if kind == "int":
        return "int"
    return "unsupported"


def _arg_index(hook: Hook, tracepoint: Any, node: Node, spec: dict[str, Node]) -> int:
    """The hook argument a matchArgs entry names (by index or name); process.* ones are added."""
    if ("index" in spec) == ("name" in spec):
        raise node.fail("a matchArgs entry needs an index or a name (one of them)")
    if "index" in spec:
        index = spec["index"].integer("index")
        for i, arg in enumerate(hook.args):
            if arg.index == index:
                return i
        fields = tracepoint.fields
        where = f" ({fields[index].name})" if 0 <= index < len(fields) else ""
        raise spec["index"].fail(
            f"matchArgs index {index}{where} is not among the hook's args: declare it there"
        )
    name = spec["name"].text("name")
    for i, arg in enumerate(hook.args):
        if arg.name == name:
            return i
    if name in PROCESS_ATTRS:
        hook.args.append(HookArg(name, "process", label=name))
        return len(hook.args) - 1
    raise spec["name"].fail(f"matchArgs name {name!r} is not among the hook's args: declare it there")


def _values(node: Node, what: str, limit: int | None = MAX_VALUES) -> list[Node]:
    values = node.sequence(what)
    if not values:
        raise node.fail(f"{what} is empty: a selector with no value can never match")
    if limit is not None and len(values) > limit:
        raise values[limit].fail(
            f"{what} holds {len(values)} values; the kernel side takes {limit} per filter"
        )
    return values


def _selector(hook: Hook, tracepoint: Any, node: Node) -> Selector:
    spec = node.mapping("a selector", SELECTOR_KEYS)
    selector = Selector(node.line)
    if "matchArgs" in spec:
        entries = spec["matchArgs"].sequence("matchArgs")
        if len(entries) > MAX_MATCH_ARGS:
            raise entries[MAX_MATCH_ARGS].fail(f"at most {MAX_MATCH_ARGS} matchArgs per selector")
        selector.args = [_arg_match(hook, tracepoint, e) for e in entries]
    if "matchBinaries" in spec:
        selector.binaries = _binary_match(spec["matchBinaries"], "matchBinaries")
    if "matchParentBinaries" in spec:
        selector.parent_binaries = _binary_match(spec["matchParentBinaries"], "matchParentBinaries")
    if "matchNamespaces" in spec:
        entries = spec["matchNamespaces"].sequence("matchNamespaces")
        if len(entries) > MAX_NS_MATCH:
            raise entries[MAX_NS_MATCH].fail(f"at most {MAX_NS_MATCH} matchNamespaces per selector")
        selector.namespaces = [_namespace_match(e) for e in entries]
    if "matchPIDs" in spec:
        (entry,) = _single(spec["matchPIDs"], "matchPIDs")
        m = entry.mapping(
            "matchPIDs", ("operator", "values", "followForks", "isNamespacePID"), ("operator", "values")
        )
        selector.pid_operator = _choice(m["operator"], "matchPIDs operator", ("In", "NotIn"))
        selector.pids = [v.integer("a pid") for v in _values(m["values"], "matchPIDs values")]
        if "isNamespacePID" in m and m["isNamespacePID"].boolean("isNamespacePID"):
            raise m["isNamespacePID"].fail("isNamespacePID is not supported: give host pids")
        selector.follow_forks = m["followForks"].boolean("followForks") if "followForks" in m else False
    if "matchCapabilities" in spec:
        (entry,) = _single(spec["matchCapabilities"], "matchCapabilities")
        m = entry.mapping(
            "matchCapabilities",
            ("type", "operator", "values", "isNamespaceCapability"),
            ("operator", "values"),
        )
        selector.cap_type = _choice(m["type"], "capability type", CAP_TYPES) if "type" in m else "Effective"
        selector.cap_operator = _choice(m["operator"], "matchCapabilities operator", ("In", "NotIn"))
        caps = []
        for v in _values(m["values"], "matchCapabilities values", limit=None):
            name = v.text("a capability").upper()
            name = name if name.startswith("CAP_") else f"CAP_{name}"
            if name not in CAPABILITIES:
                raise v.fail(f"unknown capability {v.value!r}")
            caps.append(name)
        selector.caps = caps
    if "matchActions" in spec:
        _actions(selector, spec["matchActions"])
    _check_block(hook, selector, spec)
    return selector


def _single(node: Node, what: str) -> list[Node]:
    entries = node.sequence(what)
    if len(entries) != 1:
        raise node.fail(f"{what} takes one entry per selector")
    return entries


def _choice(node: Node, what: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    value = node.text(what)
    if value not in choices:
        raise node.fail(f"unknown {what} {value!r} (use {', '.join(choices)})")
    return value


def _arg_match(hook: Hook, tracepoint: Any, node: Node) -> ArgMatch:
    spec = node.mapping("a matchArgs entry", ("index", "name", "operator", "values"), ("operator", "values"))
    arg_index = _arg_index(hook, tracepoint, node, spec)
    arg = hook.args[arg_index]
    operator = spec["operator"].text("operator")
    allowed = {
        "int": (*INT_OPERATORS, "In", "NotIn"),
        "process": (*INT_OPERATORS, "In", "NotIn"),
        "string": (*STRING_OPERATORS, "In", "NotIn"),
        "kstring": (*STRING_OPERATORS, "In", "NotIn"),
        "fd": (*STRING_OPERATORS, "In", "NotIn"),
        "sockaddr": (*SOCKADDR_OPERATORS, "In", "NotIn"),
    }[arg.type]
    if operator not in allowed:
        every = sorted(set(STRING_OPERATORS + INT_OPERATORS + SOCKADDR_OPERATORS))
        if operator not in [*every, "In", "NotIn"]:
            raise spec["operator"].fail(
                f"unknown operator {operator!r} (known: {', '.join(every)}, In, NotIn)"
            )
        raise spec["operator"].fail(
            f"impossible selector: operator {operator} does not apply to {arg.name} ({arg.type}); "
            f"use {', '.join(allowed)}"
        )
    operator = OPERATOR_ALIASES.get(operator, operator)
    numeric = arg.type in ("int", "process") or operator in ("DPort", "NotDPort", "Family")
    limit = MAX_VALUES if numeric else None
    value_nodes = _values(spec["values"], "values", limit=limit)
    if operator in ("Mask", "GT", "LT") and len(value_nodes) != 1:
        raise spec["values"].fail(f"{operator} takes one value")
    values: list[Any] = []
    for v in value_nodes:
        if operator in ("DAddr", "NotDAddr"):
            try:
                values.append(ipaddress.ip_network(v.text("an address"), strict=False))
            except ValueError:
                raise v.fail(f"{v.value!r} is not an address or CIDR") from None
        elif operator in ("DPort", "NotDPort"):
            port = v.integer("a port")
            if not 0 < port < 65536:
                raise v.fail(f"port {port} is not between 1 and 65535")
            values.append(port)
        elif operator == "Family":
            values.append(_family(v))
        elif numeric:
            values.append(v.integer("a value"))
        else:
            text = v.text("a value")
            if len(text.encode()) >= STR_LEN:
                raise v.fail(
                    f"a value of {len(text.encode())} bytes can never match: strings are kept to "
                    f"{STR_LEN - 1}"
                )
            if not text and operator in ("Prefix", "NotPrefix", "Postfix", "NotPostfix"):
                raise v.fail(f"an empty {operator} matches everything: leave the filter out instead")
            values.append(text)
    return ArgMatch(arg_index, operator, values, node.line)


def _family(node: Node) -> int:
    import socket

    text = node.text("a family")
    if text.isdigit():
        return int(text)
    value = getattr(socket, text, None)
    if not text.startswith("AF_") or not isinstance(value, int):
        raise node.fail(f"unknown address family {text!r} (AF_INET, AF_INET6, AF_UNIX)")
    return int(value)


def _binary_match(node: Node, what: str) -> BinaryMatch:
    (entry,) = _single(node, what)
    m = entry.mapping(what, ("operator", "values", "followChildren"), ("operator", "values"))
    operator = _choice(m["operator"], f"{what} operator", BINARY_OPERATORS)
    if "followChildren" in m and m["followChildren"].boolean("followChildren"):
        raise m["followChildren"].fail("followChildren is not supported: use matchParentBinaries")
    values = []
    for v in _values(m["values"], f"{what} values", limit=None):
        text = v.text("a binary")
        if not text.startswith("/"):
            raise v.fail(f"binary {text!r} must be an absolute path")
        values.extend(binary_spellings(text, prefix=operator in ("Prefix", "NotPrefix")))
    return BinaryMatch(OPERATOR_ALIASES.get(operator, operator), values)


def binary_spellings(path: str, prefix: bool = False) -> list[str]:
    """The kernel reports the file it runs (symbolic links resolved: /bin/sh is /usr/bin/dash on
    Debian): a policy's path stands for itself and for what it resolves to."""
    resolved = os.path.realpath(path)
    if prefix and path.endswith("/") and not resolved.endswith("/"):
        resolved += "/"
    return [path] if resolved == path else [path, resolved]


def _namespace_match(node: Node) -> NamespaceMatch:
    m = node.mapping(
        "a matchNamespaces entry", ("namespace", "operator", "values"), ("namespace", "operator", "values")
    )
    namespace = _choice(m["namespace"], "namespace", NAMESPACES)
    operator = OPERATOR_ALIASES[_choice(m["operator"], "matchNamespaces operator", ("In", "NotIn"))]
    values = []
    for v in _values(m["values"], "matchNamespaces values", limit=MAX_NS_VALUES):
        if v.value == "host_ns":
            values.append(host_namespace(namespace))
        else:
            values.append(v.integer("a namespace inode number or host_ns"))
    return NamespaceMatch(namespace, operator, values)


_NS_FILES = {
    "Uts": "uts",
    "Ipc": "ipc",
    "Mnt": "mnt",
    "Pid": "pid",
    "PidForChildren": "pid_for_children",
    "Net": "net",
    "Time": "time",
    "TimeForChildren": "time_for_children",
    "Cgroup": "cgroup",
    "User": "user",
}


def host_namespace(namespace: str) -> int:
    """The inode number of the host's namespace: init's, or (where init's cannot be read) bpfscope's own,
    which runs on the host."""
    name = _NS_FILES[namespace]
    try:
        return os.stat(f"/proc/1/ns/{name}").st_ino
    except OSError:
        return os.stat(f"/proc/self/ns/{name}").st_ino


def _actions(selector: Selector, node: Node) -> None:
    entries = node.sequence("matchActions")
    if not entries:
        raise node.fail("matchActions is empty")
    actions = []
    for entry in entries:
        m = entry.mapping("an action", ("action", "argSig", "rateLimit", "rateLimitScope"), ("action",))
        action = _choice(m["action"], "action", ACTIONS)
        actions.append(action)
        if action == "Signal":
            if "argSig" not in m:
                raise entry.fail("Signal needs argSig (the signal number)")
            selector.signal = m["argSig"].integer("argSig")
            if not 0 < selector.signal < 65:
                raise m["argSig"].fail(f"signal {selector.signal} is not between 1 and 64")
        elif "argSig" in m:
            raise m["argSig"].key_fail(f"argSig belongs to Signal, not {action}")
        if action == "Sigkill":
            selector.signal = 9
        if "rateLimit" in m:
            if action != "Post":
                raise m["rateLimit"].key_fail("rateLimit belongs to Post")
            selector.rate_limit_ms = _duration(m["rateLimit"])
    if "NoPost" in actions and "Post" in actions:
        raise node.fail("Post and NoPost contradict each other")
    if "Sigkill" in actions and "Signal" in actions:
        raise node.fail("one selector sends one signal: Sigkill or Signal")
    if "Block" in actions and len(set(actions) - {"Post"}) > 1:
        raise node.fail("Block stands alone (the refused connect is reported)")
    selector.post = "NoPost" not in actions
    for action in ("Block", "Sigkill", "Signal", "NoPost", "Post"):
        if action in actions:
            selector.action = action
            break


def _duration(node: Node) -> int:
    match = _DURATION.match(node.text("rateLimit").strip())
    if not match:
        raise node.fail(f"rateLimit {node.value!r} is not a duration (e.g. 500ms, 10s, 1m)")
    value = int(match.group(1)) * _DURATION_MS[match.group(2)]
    if not 0 < value < 2**32:
        raise node.fail("rateLimit must be more than 0 and less than 49 days")
    return value


def _check_block(hook: Hook, selector: Selector, spec: dict[str, Node]) -> None:
    """Block runs in the cgroup sock_addr programs, which see the destination and the process's pid and
    binary only: anything else a Block selector asks for could never be checked there."""
    if selector.action != "Block":
        return
    where = spec.get("matchActions")
    line_node = where if where is not None else Node(None, selector.line, hook.policy)
    if hook.tracepoint not in BLOCKABLE:
        raise line_node.fail(
            f"impossible selector: Block applies to connects and sends ({', '.join(BLOCKABLE)}), "
            f"not {hook.tracepoint}"
        )
    for key in ("matchNamespaces", "matchCapabilities", "matchParentBinaries", "matchPIDs"):
        if key in spec:
            raise spec[key].key_fail(f"impossible selector: a Block selector cannot use {key}")
    if selector.binaries and selector.binaries.operator not in ("Equal", "NotEqual", "Prefix", "NotPrefix"):
        raise line_node.fail("impossible selector: unsupported matchBinaries operator for Block")
    kinds = set()
    for m in selector.args:
        arg = hook.args[m.arg]
        if arg.type != "sockaddr" or m.operator not in ("DAddr", "NotDAddr", "DPort", "NotDPort"):
            raise line_node.fail(
                "impossible selector: a Block selector matches the destination only (DAddr, NotDAddr, "
                "DPort, NotDPort on the sockaddr argument)"
            )
        kind = "addr" if "Addr" in m.operator else "port"
        if kind in kinds:
            raise line_node.fail(f"impossible selector: one {kind} filter per Block selector")
        kinds.add(kind)


def all_hooks(policies: Iterable[Policy]) -> Iterator[Hook]:
    for policy in policies:
        yield from policy.hooks


def check_names(policies: list[Policy]) -> None:
    seen: dict[str, str] = {}
    for policy in policies:
        if policy.name in seen:
            raise PolicyError(f"{policy.source}: policy {policy.name!r} is also in {seen[policy.name]}")
        seen[policy.name] = policy.source
