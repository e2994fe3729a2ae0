"""Policies into the kernel's filters: one hook per tracepoint (selectors of every policy on it, in order),
string and address sets, and Block rules for the cgroup sock_addr programs. Names of enums are those of
secure.bpf.c, read from its BTF; nothing here knows their values.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from bpfscope.domains.security.policy import (
    BLOCKABLE,
    CAPABILITIES,
    MAX_BLOCKS,
    MAX_HOOKS,
    MAX_SELECTORS,
    OPERATOR_ALIASES,
    Hook,
    HookArg,
    Policy,
    PolicyError,
    Selector,
    all_hooks,
)

EXEC_TRACEPOINT = "sched:sched_process_exec"
# Rules on every system call's entry run in a BTF tracepoint program of their own (secure.bpf.c's
# policy_sys_enter), not through the classic tracepoint.
SYS_ENTER_TRACEPOINT = "raw_syscalls:sys_enter"
# Policy words -> the C enum members (secure.bpf.c) they stand for.
MATCH_NAMES = {
    "Equal": "MATCH_EQUAL",
    "NotEqual": "MATCH_NOT_EQUAL",
    "Prefix": "MATCH_PREFIX",
    "NotPrefix": "MATCH_NOT_PREFIX",
    "Postfix": "MATCH_POSTFIX",
    "NotPostfix": "MATCH_NOT_POSTFIX",
    "Mask": "MATCH_MASK",
    "GT": "MATCH_GT",
    "LT": "MATCH_LT",
    "DAddr": "MATCH_DADDR",
    "NotDAddr": "MATCH_NOT_DADDR",
    "DPort": "MATCH_DPORT",
    "NotDPort": "MATCH_NOT_DPORT",
    "Family": "MATCH_FAMILY",
}
ARG_TYPE_NAMES = {
    "int": "ARG_INT",
    "string": "ARG_USTR",
    "kstring": "ARG_KSTR",
    "fd": "ARG_FD",
    "sockaddr": "ARG_SOCKADDR",
    "process": "ARG_PROC",
}
ATTR_NAMES = {
    "process.uid": "ATTR_UID",
    "process.euid": "ATTR_EUID",
    "process.gid": "ATTR_GID",
    "process.egid": "ATTR_EGID",
    "process.suid": "ATTR_SUID",
    "process.loginuid": "ATTR_LOGINUID",
}
NS_NAMES = {
    "Uts": "NS_UTS",
    "Ipc": "NS_IPC",
    "Mnt": "NS_MNT",
    "Pid": "NS_PID",
    "PidForChildren": "NS_PID_FOR_CHILDREN",
    "Net": "NS_NET",
    "Time": "NS_TIME",
    "TimeForChildren": "NS_TIME_FOR_CHILDREN",
    "Cgroup": "NS_CGROUP",
    "User": "NS_USER",
}
CAP_KIND_NAMES = {
    "Effective": "CAP_EFFECTIVE",
    "Permitted": "CAP_PERMITTED",
    "Inheritable": "CAP_INHERITABLE",
}
ACTION_ENUM = {
    "Post": "ACTION_POST",
    "NoPost": "ACTION_NOPOST",
    "Sigkill": "ACTION_SIGKILL",
    "Signal": "ACTION_SIGNAL",
    "Block": "ACTION_BLOCK",
}


@dataclass
class Rule:
    """One selector of one policy: what an event that it matched reports."""

    policy: str
    tracepoint: str
    action: str
    selector: Selector
    hook: Hook
    args: list[HookArg]  # the kernel hook's arguments (merged over the policies on its tracepoint)


@dataclass
class KernelHook:
    tracepoint: str
    args: list[HookArg] = field(default_factory=list)
    selectors: list[tuple[Selector, int, dict[int, int]]] = field(
        default_factory=list
    )  # (sel, rule, arg map)


@dataclass
class Compiled:
    hooks: list[KernelHook]
    rules: list[Rule]
    strings: list[tuple[int, str]] = field(default_factory=list)  # Equal sets
    prefixes: list[tuple[int, str]] = field(default_factory=list)
    postfixes: list[tuple[int, str]] = field(default_factory=list)
    cidrs: list[tuple[int, Any]] = field(default_factory=list)  # (set, network); IPv6 in set + 1
    blocks: list[dict[str, Any]] = field(default_factory=list)
    exec_hook: int = -1
    sys_enter_hook: int = -1
    next_set: int = 1
    hook_values: list[dict[str, Any]] = field(default_factory=list)  # each hook as the kernel's map holds it

    def new_set(self, step: int = 1) -> int:
        value = self.next_set
        self.next_set += step
        return value


def compile_policies(policies: list[Policy], enums: dict[str, dict[str, int]]) -> Compiled:
    """``enums`` maps each secure.bpf.c enum's name to its members' values."""
    values = {name: value for members in enums.values() for name, value in members.items()}
    compiled = Compiled([], [])
    by_tracepoint: dict[str, KernelHook] = {}
    for hook in all_hooks(policies):
        for selector in hook.selectors:
            rule_id = len(compiled.rules)
            if selector.action == "Block":
                compiled.rules.append(Rule(hook.policy, hook.tracepoint, "Block", selector, hook, hook.args))
                compiled.blocks.append(_block(compiled, hook, selector, rule_id, values))
                continue
            kernel_hook = by_tracepoint.get(hook.tracepoint)
            if kernel_hook is None:
                kernel_hook = by_tracepoint[hook.tracepoint] = KernelHook(hook.tracepoint)
                compiled.hooks.append(kernel_hook)
            arg_map = _merge_args(kernel_hook, hook)
            if len(kernel_hook.selectors) >= MAX_SELECTORS:
                raise PolicyError(
                    f"{hook.policy}:{selector.line}: more than {MAX_SELECTORS} selectors on "
                    f"{hook.tracepoint} (all policies together): the kernel side takes {MAX_SELECTORS}"
                )
            kernel_hook.selectors.append((selector, rule_id, arg_map))
            compiled.rules.append(
                Rule(hook.policy, hook.tracepoint, selector.action, selector, hook, kernel_hook.args)
            )
    if len(compiled.hooks) > MAX_HOOKS:
        raise PolicyError(
            f"the policies hook {len(compiled.hooks)} tracepoints; the kernel side takes {MAX_HOOKS}"
        )
    if len(compiled.blocks) > MAX_BLOCKS:
        raise PolicyError(
            f"the policies have {len(compiled.blocks)} Block selectors; the kernel side takes {MAX_BLOCKS}"
        )
    for index, kernel_hook in enumerate(compiled.hooks):
        if kernel_hook.tracepoint == EXEC_TRACEPOINT:
            compiled.exec_hook = index
        elif kernel_hook.tracepoint == SYS_ENTER_TRACEPOINT:
            compiled.sys_enter_hook = index
    compiled.hook_values = [_hook_value(compiled, h, values) for h in compiled.hooks]
    return compiled


def _merge_args(kernel_hook: KernelHook, hook: Hook) -> dict[int, int]:
    """The hook's arguments in the kernel hook's list (shared with other policies on the tracepoint)."""
    from bpfscope.domains.security.policy import MAX_ARGS

    mapping = {}
    for i, arg in enumerate(hook.args):
        for j, existing in enumerate(kernel_hook.args):
            if (existing.name, existing.type) == (arg.name, arg.type):
                mapping[i] = j
                break
        else:
            if len(kernel_hook.args) >= MAX_ARGS:
                raise PolicyError(
                    f"{hook.policy}:{hook.line}: the policies on {hook.tracepoint} read more than {MAX_ARGS} "
                    "distinct arguments together"
                )
            kernel_hook.args.append(arg)
            mapping[i] = len(kernel_hook.args) - 1
    return mapping


def _string_set(compiled: Compiled, operator: str, strings: list[str]) -> int:
    set_id = compiled.new_set()
    if operator in ("Equal", "NotEqual"):
        compiled.strings.extend((set_id, s) for s in strings)
    elif operator in ("Prefix", "NotPrefix"):
        compiled.prefixes.extend((set_id, s) for s in strings)
    else:
        compiled.postfixes.extend((set_id, s[::-1]) for s in strings)
    return set_id


def _cidr_set(compiled: Compiled, networks: list[Any]) -> int:
    """IPv4 CIDRs in the set, IPv6 ones in set + 1; an IPv4 CIDR is also there as IPv4-mapped IPv6
    (::ffff:a.b.c.d), which an IPv6 socket may connect to."""
    set_id = compiled.new_set(step=2)
    for network in networks:
        compiled.cidrs.append((set_id + (network.version == 6), network))
        if network.version == 4:
            mapped = ipaddress.IPv6Network(
                (int(network.network_address) | 0xFFFF << 32, 96 + network.prefixlen)
            )
            compiled.cidrs.append((set_id + 1, mapped))
    return set_id


def _hook_value(compiled: Compiled, kernel_hook: KernelHook, v: dict[str, int]) -> dict[str, Any]:
    args = [
        {
            "offset": a.offset,
            "size": a.size,
            "type": v[ARG_TYPE_NAMES[a.type]],
            "is_signed": int(a.signed),
            "attr": v[ATTR_NAMES[a.name]] if a.type == "process" else 0,
        }
        for a in kernel_hook.args
    ]
    # Each policy decides for itself (the kernel keeps a bit per policy: 64 of them).
    policies = {name: i for i, name in enumerate(dict.fromkeys(r.policy for r in compiled.rules))}
    selectors = [
        _selector_value(
            policies[compiled.rules[rule].policy] % 64, compiled, kernel_hook, s, rule, arg_map, v
        )
        for s, rule, arg_map in kernel_hook.selectors
    ]
    needs_creds = any(a.type == "process" for a in kernel_hook.args) or any(
        s.cap_operator for s, _, _ in kernel_hook.selectors
    )
    gate_arg, gate, gate_mask = _gate(kernel_hook)
    leaf_arg, leaf_equal, leaf_postfix = _leaf_gate(kernel_hook)
    return {
        "nargs": len(args),
        "nselectors": len(selectors),
        "needs_creds": int(needs_creds),
        "gate_arg": gate_arg,
        "ngate": len(gate),
        "leaf_arg": leaf_arg,
        "leaf_equal_set": _string_set(compiled, "Equal", sorted(leaf_equal)) if leaf_equal else 0,
        "leaf_postfix_set": _string_set(compiled, "Postfix", sorted(leaf_postfix)) if leaf_postfix else 0,
        "gate_mask": gate_mask,
        "gate": gate,
        "args": args,
        "selectors": selectors,
    }


def _gate(kernel_hook: KernelHook) -> tuple[int, list[int], int]:
    """An integer argument every selector wants Equal to one of a few values or to have a bit of a
    mask, those values and the mask (the argument's index plus one; 0, none and 0: no gate): the kernel
    leaves at once an event whose argument is neither. Under the mesh the default policy's module rule
    (raw_syscalls:sys_enter, two syscall numbers) was 0.7% of the machine, read whole on every system
    call; its rules on sys_enter_openat (files opened for writing) read every open's path, 0.5 us."""
    from bpfscope.domains.security.policy import MAX_VALUES

    per_selector: list[dict[int, tuple[Any, Any]]] = []
    for selector, _, arg_map in kernel_hook.selectors:
        equal: dict[int, set[int]] = {}
        masks: dict[int, int] = {}
        for m in selector.args:
            index = arg_map[m.arg]
            if kernel_hook.args[index].type != "int":
                continue
            if m.operator == "Equal":
                values = {int(x) for x in m.values}
                equal[index] = equal[index] & values if index in equal else values
            elif m.operator == "Mask":
                masks.setdefault(index, int(m.values[0]))  # one of the selector's masks: it needs each
        # What the selector admits of each argument it constrains: its values, else a bit of its mask.
        per_selector.append(
            {i: (equal[i], 0) if i in equal else (set(), masks[i]) for i in equal.keys() | masks.keys()}
        )
    for index, (values, mask) in sorted(_every_selector(per_selector).items()):
        if len(values) <= MAX_VALUES:
            return index + 1, sorted(values), mask
    return 0, [], 0


def _leaf_gate(kernel_hook: KernelHook) -> tuple[int, set[str], set[str]]:
    """An fd argument every selector wants the path of Equal to, or ending in, absolute paths, and the
    last components those paths have, exact or as an ending (the argument's index plus one; 0: no
    gate): the kernel reads the name of the file first, and its whole path (a walk up its directories,
    about 1 us an open) only when the name could match. "/.ssh/id_rsa" as an ending wants the name
    "id_rsa"; "_host_rsa_key" a name ending in it."""
    per_selector: list[dict[int, tuple[Any, Any]]] = []
    for selector, _, arg_map in kernel_hook.selectors:
        leaves: dict[int, tuple[set[str], set[str]]] = {}
        for m in selector.args:
            index = arg_map[m.arg]
            if kernel_hook.args[index].type != "fd" or m.operator not in ("Equal", "Postfix"):
                continue
            exact, ending = set(), set()
            for value in map(str, m.values):
                _, slash, leaf = value.rpartition("/")
                if not leaf or (m.operator == "Equal" and not value.startswith("/")):
                    break  # a directory, or not a path (socket:, pipe:): no gate on this match
                if slash or m.operator == "Equal":
                    exact.add(leaf)
                elif ":" in leaf:
                    break  # an ending that could be a socket's or a pipe's name
                else:
                    ending.add(leaf)
            else:
                leaves.setdefault(index, (exact, ending))  # the selector's first match on it is enough
        per_selector.append(leaves)
    for index, (exact, ending) in sorted(_every_selector(per_selector).items()):
        return index + 1, exact, ending
    return 0, set(), set()


def _every_selector(per_selector: list[dict[int, tuple[Any, Any]]]) -> dict[int, tuple[Any, Any]]:
    """The arguments every selector constrains, each with the union of what the selectors admit of it
    (a pair of sets, or a set and a mask): selectors are alternatives, so an argument gates the hook
    only if each of them constrains it, and an event passes if any of them would admit it."""
    if not per_selector:
        return {}
    first, *others = per_selector
    gated = dict(first)
    for admits in others:
        both = gated.keys() & admits.keys()
        gated = {i: (gated[i][0] | admits[i][0], gated[i][1] | admits[i][1]) for i in both}
    return gated


def _binaries(compiled: Compiled, match: Any, v: dict[str, int]) -> tuple[int, int]:
    if match is None:
        return 0, 0
    return v[MATCH_NAMES[match.operator]], _string_set(compiled, match.operator, match.values)


def _selector_value(
    policy_index: int,
    compiled: Compiled,
    kernel_hook: KernelHook,
    s: Selector,
    rule: int,
    arg_map: dict[int, int],
    v: dict[str, int],
) -> dict[str, Any]:
    bin_op, bin_set = _binaries(compiled, s.binaries, v)
    parent_op, parent_set = _binaries(compiled, s.parent_binaries, v)
    args = []
    for m in s.args:
        arg = kernel_hook.args[arg_map[m.arg]]
        entry: dict[str, Any] = {
            "arg": arg_map[m.arg],
            "op": v[MATCH_NAMES[m.operator]],
            "nvalues": 0,
            "set": 0,
        }
        if m.operator in ("DAddr", "NotDAddr"):
            entry["set"] = _cidr_set(compiled, m.values)
        elif arg.type in ("int", "process") or m.operator in (
            "DPort",
            "NotDPort",
            "Family",
            "Mask",
            "GT",
            "LT",
        ):
            entry["nvalues"] = len(m.values)
            entry["values"] = [int(x) for x in m.values]
        else:
            entry["set"] = _string_set(compiled, m.operator, m.values)
        args.append(entry)
    caps = 0
    for name in s.caps:
        caps |= 1 << CAPABILITIES.index(name)
    return {
        "used": 1,
        "action": v[ACTION_ENUM[s.action]],
        "signal": s.signal,
        "post": int(s.post),
        "nargs": len(args),
        "bin_op": bin_op,
        "bin_set": bin_set,
        "parent_bin_op": parent_op,
        "parent_bin_set": parent_set,
        "pid_op": v[MATCH_NAMES[OPERATOR_ALIASES[s.pid_operator]]] if s.pid_operator else 0,
        "npids": len(s.pids),
        "pids": s.pids,
        "pid_follow_forks": int(s.follow_forks),
        "cap_kind": v[CAP_KIND_NAMES[s.cap_type]],
        "cap_op": v["MATCH_EQUAL" if s.cap_operator == "In" else "MATCH_NOT_EQUAL"] if s.cap_operator else 0,
        "caps": caps,
        "nns": len(s.namespaces),
        "policy": policy_index,
        "ns": [
            {
                "ns": v[NS_NAMES[n.namespace]],
                "op": v[MATCH_NAMES[n.operator]],
                "n": len(n.values),
                "inums": n.values,
            }
            for n in s.namespaces
        ],
        "rate_limit_ms": s.rate_limit_ms,
        "rule": rule,
        "args": args,
    }


def _block(compiled: Compiled, hook: Hook, s: Selector, rule: int, v: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "used": 1,
        "connect": int(BLOCKABLE[hook.tracepoint] == "connect"),
        "sendmsg": int(BLOCKABLE[hook.tracepoint] == "sendmsg"),
        "hook": 0,
        "rule": rule,
    }
    bin_op, bin_set = _binaries(compiled, s.binaries, v)
    out |= {"bin_op": bin_op, "bin_set": bin_set}
    for m in s.args:
        if m.operator in ("DAddr", "NotDAddr"):
            out |= {"addr_op": v[MATCH_NAMES[m.operator]], "addr_set": _cidr_set(compiled, m.values)}
        else:
            out |= {"port_op": v[MATCH_NAMES[m.operator]], "nports": len(m.values), "ports": m.values}
    return out


def cidr_key(set_id: int, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> dict[str, Any]:
    return {"prefixlen": 32 + network.prefixlen, "set": set_id, "addr": network.network_address.packed}
