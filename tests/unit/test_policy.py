"""Policy parsing without the kernel: every mistake is one PolicyError naming the file, the line and the
reason (fuzzed: no input raises anything else), values are typed and resolved, kernel limits are checked
before anything is loaded, and the compiler puts each selector where the kernel reads it.

Tracepoint formats come from a fixed table here (tracefs needs root); the kernel tier checks the real ones.
"""

from __future__ import annotations

import ipaddress
import re
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfscope.domains.security import compiler, policy
from bpfscope.domains.security.default_policy import DEFAULT_POLICY
from bpfscope.domains.security.policy import PolicyError, parse_policies
from bpfscope.engine.tracepoint import Tracepoint, TracepointField
from bpfscope.errors import MissingCapability

COMMON = [
    TracepointField("common_type", "unsigned short", 0, 2, False),
    TracepointField("common_flags", "unsigned char", 2, 1, False),
    TracepointField("common_preempt_count", "unsigned char", 3, 1, False),
    TracepointField("common_pid", "int", 4, 4, True),
]


def syscall(*fields: tuple[str, str]) -> list[TracepointField]:
    out = [*COMMON, TracepointField("__syscall_nr", "int", 8, 4, True)]
    for i, (ctype, name) in enumerate(fields):
        out.append(TracepointField(name, ctype, 16 + 8 * i, 8, ctype in ("int", "long"), user_memory=True))
    return out


FORMATS = {
    "syscalls:sys_enter_openat": syscall(("int", "dfd"), ("const char *", "filename"), ("int", "flags")),
    "syscalls:sys_exit_openat": syscall(("long", "ret")),
    "syscalls:sys_enter_connect": syscall(
        ("int", "fd"), ("struct sockaddr *", "uservaddr"), ("int", "addrlen")
    ),
    "syscalls:sys_enter_sendto": syscall(("int", "fd"), ("struct sockaddr *", "addr")),
    "syscalls:sys_enter_ptrace": syscall(("long", "request"), ("long", "pid")),
    "syscalls:sys_enter_setuid": syscall(("uid_t", "uid")),
    "syscalls:sys_enter_truncate": syscall(("const char *", "path")),
    "syscalls:sys_enter_unlinkat": syscall(("int", "dfd"), ("const char *", "pathname")),
    "syscalls:sys_enter_symlinkat": syscall(("const char *", "oldname")),
    "syscalls:sys_enter_fchmodat": syscall(("int", "dfd"), ("const char *", "filename"), ("umode_t", "mode")),
    "syscalls:sys_enter_dup2": syscall(("unsigned int", "oldfd"), ("unsigned int", "newfd")),
    "syscalls:sys_enter_dup3": syscall(("unsigned int", "oldfd"), ("unsigned int", "newfd")),
    "syscalls:sys_enter_chroot": syscall(("const char *", "filename")),
    "syscalls:sys_enter_setns": syscall(("int", "fd"), ("int", "flags")),
    "syscalls:sys_enter_mount": syscall(("char *", "dev_name"), ("char *", "dir_name")),
    "raw_syscalls:sys_enter": [*COMMON, TracepointField("id", "long", 8, 8, True)],
    "sched:sched_process_exec": [
        *COMMON,
        TracepointField("filename", "__data_loc char[]", 8, 4, False),
        TracepointField("pid", "pid_t", 12, 4, True),
    ],
}


@pytest.fixture(autouse=True)
def fake_tracefs(monkeypatch: pytest.MonkeyPatch) -> None:
    def require(category: str, name: str) -> None:
        if f"{category}:{name}" not in FORMATS:
            raise MissingCapability(f"this kernel has no tracepoint {category}:{name}")

    monkeypatch.setattr("bpfscope.engine.system.require_tracepoint", require)
    monkeypatch.setattr(Tracepoint, "fields", property(lambda self: FORMATS[self.full_name]))
    monkeypatch.setattr(policy, "host_namespace", lambda namespace: 4026531840)


def doc(body: str, name: str = "p") -> str:
    return (
        f"apiVersion: cilium.io/v1alpha1\nkind: TracingPolicy\nmetadata:\n  name: {name}\nspec:\n"
        + textwrap.indent(textwrap.dedent(body), "  ")
    )


OPENAT = """\
tracepoints:
- subsystem: syscalls
  event: sys_enter_openat
  args:
  - name: filename
  - name: flags
  selectors:
"""


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policies(text, "p.yaml")
    return str(info.value)


def test_the_default_policy_parses_and_compiles() -> None:
    policies = parse_policies(DEFAULT_POLICY, "default-policy.yaml")
    assert [p.name for p in policies] == [
        "sensitive-files",
        "file-tampering",
        "process-execution",
        "privilege-and-kernel",
        "network-and-escape",
    ]
    compiled = compiler.compile_policies(policies, fake_enums())
    assert compiled.exec_hook >= 0
    assert len(compiled.rules) == sum(len(h.selectors) for p in policies for h in p.hooks)


def fake_enums() -> dict[str, dict[str, int]]:
    """The C enums' members with distinct values (the real ones come from the object's BTF)."""
    names = [
        *compiler.MATCH_NAMES.values(),
        *compiler.ARG_TYPE_NAMES.values(),
        *compiler.ATTR_NAMES.values(),
        *compiler.NS_NAMES.values(),
        *compiler.CAP_KIND_NAMES.values(),
        *compiler.ACTION_ENUM.values(),
    ]
    return {"all": {name: i for i, name in enumerate(names)}}


def test_arguments_are_typed_from_the_format() -> None:
    text = doc(
        OPENAT + "  - matchArgs:\n    - name: filename\n      operator: Prefix\n      values: [/etc/]\n"
    )
    (p,) = parse_policies(text)
    (hook,) = p.hooks
    assert [(a.name, a.type, a.offset) for a in hook.args] == [
        ("filename", "string", 24),
        ("flags", "int", 32),
    ]
    (selector,) = hook.selectors
    assert selector.args[0].operator == "Prefix" and selector.args[0].values == ["/etc/"]


def test_tetragon_indexes_count_the_common_fields() -> None:
    text = doc(
        "tracepoints:\n- subsystem: syscalls\n  event: sys_enter_openat\n  args:\n  - index: 6\n"
        "    type: string\n  selectors:\n  - matchArgs:\n    - index: 6\n      operator: Equal\n"
        "      values: [/etc/shadow]\n"
    )
    (p,) = parse_policies(text)
    assert p.hooks[0].args[0].name == "filename"


def test_binaries_stand_for_what_they_resolve_to() -> None:
    # /bin is a link to usr/bin on merged-/usr systems; the kernel reports the resolved path.
    import os

    values = policy.binary_spellings("/bin/sh")
    assert values[0] == "/bin/sh" and os.path.realpath("/bin/sh") in values


def test_cidrs_ports_and_capabilities_are_typed() -> None:
    text = doc(
        "tracepoints:\n- subsystem: syscalls\n  event: sys_enter_connect\n  args:\n  - name: uservaddr\n"
        "    type: sockaddr\n  selectors:\n  - matchArgs:\n    - name: uservaddr\n      operator: DAddr\n"
        "      values: [10.0.0.0/8, '::1']\n    - name: uservaddr\n      operator: DPort\n"
        "      values: [443]\n"
        "    matchCapabilities:\n    - operator: NotIn\n      values: [sys_admin]\n"
    )
    (p,) = parse_policies(text)
    (selector,) = p.hooks[0].selectors
    assert selector.args[0].values == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert selector.args[1].values == [443]
    assert selector.caps == ["CAP_SYS_ADMIN"] and selector.cap_operator == "NotIn"


def test_actions() -> None:
    body = OPENAT + (
        "  - matchArgs:\n    - name: flags\n      operator: Mask\n      values: [0x200]\n"
        "    matchActions:\n    - action: Signal\n      argSig: 10\n"
        "  - matchActions:\n    - action: Post\n      rateLimit: 2m\n"
    )
    (p,) = parse_policies(doc(body))
    first, second = p.hooks[0].selectors
    assert (first.action, first.signal, first.post) == ("Signal", 10, True)
    assert (second.action, second.rate_limit_ms) == ("Post", 120_000)


MISTAKES = {
    # text, line, what the message says
    "unknown top-level field": (doc("tracepoints: []\n") + "extra: 1\n", 7, "unknown field 'extra'"),
    "no tracepoints": (doc("tracepoints: []\n"), 6, "spec.tracepoints is empty"),
    "kprobes": (doc("kprobes: []\n"), 6, "kprobes are not available on this kernel"),
    "unknown tracepoint": (
        doc("tracepoints:\n- subsystem: syscalls\n  event: sys_enter_nope\n"),
        8,
        "unknown tracepoint syscalls:sys_enter_nope",
    ),
    "unknown field name": (
        doc("tracepoints:\n- subsystem: syscalls\n  event: sys_enter_openat\n  args:\n  - name: path\n"),
        10,
        "has no field 'path'",
    ),
    "index out of range": (
        doc("tracepoints:\n- subsystem: syscalls\n  event: sys_enter_openat\n  args:\n  - index: 42\n"),
        10,
        "has no field 42",
    ),
    "unknown operator": (
        doc(OPENAT + "  - matchArgs:\n    - name: filename\n      operator: StartsWith\n      values: [/]\n"),
        15,
        "unknown operator 'StartsWith'",
    ),
    "operator on the wrong type": (
        doc(OPENAT + "  - matchArgs:\n    - name: flags\n      operator: Prefix\n      values: [/etc]\n"),
        15,
        "impossible selector: operator Prefix does not apply to flags",
    ),
    "empty values": (
        doc(OPENAT + "  - matchArgs:\n    - name: filename\n      operator: Equal\n      values: []\n"),
        16,
        "values is empty",
    ),
    "undeclared argument": (
        doc(OPENAT + "  - matchArgs:\n    - name: dfd\n      operator: Equal\n      values: [1]\n"),
        14,
        "matchArgs name 'dfd' is not among the hook's args",
    ),
    "bad CIDR": (
        doc(
            "tracepoints:\n- subsystem: syscalls\n  event: sys_enter_connect\n  args:\n  - name: uservaddr\n"
            "  selectors:\n  - matchArgs:\n    - name: uservaddr\n      operator: DAddr\n"
            "      values: [10.0.0.0/33]\n"
        ),
        15,
        "is not an address or CIDR",
    ),
    "bad port": (
        doc(
            "tracepoints:\n- subsystem: syscalls\n  event: sys_enter_connect\n  args:\n  - name: uservaddr\n"
            "  selectors:\n  - matchArgs:\n    - name: uservaddr\n      operator: DPort\n"
            "      values: [70000]\n"
        ),
        15,
        "port 70000",
    ),
    "unknown capability": (
        doc(OPENAT + "  - matchCapabilities:\n    - operator: In\n      values: [CAP_TIME_TRAVEL]\n"),
        15,
        "unknown capability",
    ),
    "Signal without a number": (
        doc(OPENAT + "  - matchActions:\n    - action: Signal\n"),
        14,
        "Signal needs argSig",
    ),
    "Block on a file hook": (
        doc(OPENAT + "  - matchActions:\n    - action: Block\n"),
        14,
        "impossible selector: Block applies to connects",
    ),
    "Block with namespaces": (
        doc(
            "tracepoints:\n- subsystem: syscalls\n  event: sys_enter_connect\n  selectors:\n"
            "  - matchNamespaces:\n    - namespace: Mnt\n      operator: NotIn\n      values: [host_ns]\n"
            "    matchActions:\n    - action: Block\n"
        ),
        10,
        "a Block selector cannot use matchNamespaces",
    ),
    "too many values": (
        doc(
            OPENAT
            + "  - matchArgs:\n    - name: flags\n      operator: Equal\n      values: [1,2,3,4,5,6,7,8,9]\n"
        ),
        16,
        "the kernel side takes 8 per filter",
    ),
    "string too long": (
        doc(
            OPENAT
            + f"  - matchArgs:\n    - name: filename\n      operator: Equal\n      values: [/{'x' * 300}]\n"
        ),
        16,
        "can never match",
    ),
    "relative binary": (
        doc(OPENAT + "  - matchBinaries:\n    - operator: In\n      values: [sh]\n"),
        15,
        "must be an absolute path",
    ),
    "duplicate key": (doc("tracepoints: []\ntracepoints: []\n"), 7, "'tracepoints' is given twice"),
    "bad rate limit": (
        doc(OPENAT + "  - matchActions:\n    - action: Post\n      rateLimit: soon\n"),
        15,
        "is not a duration",
    ),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_mistake_names_its_line_and_reason(case: str) -> None:
    text, line, reason = MISTAKES[case]
    message = error_of(text)
    assert message.startswith(f"p.yaml:{line}: "), message
    assert reason in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object:os.system x\n",
        "a: !!binary '%%'\n",
        "a: &x [*x]\n",
        "? [1]\n: x\n",
        "a: !!int x\n",
    ],
)
def test_unsafe_or_strange_yaml_is_a_one_line_error(text: str) -> None:
    assert LINE_ERROR.match(error_of(text))


def gate_of(*selectors: str) -> tuple[int, list[int]] | tuple[int, list[int], int]:
    """The hook's gate: its argument and values, and its mask when it has one."""
    policies = parse_policies(doc(OPENAT + "".join(selectors)), "p.yaml")
    (value,) = compiler.compile_policies(policies, fake_enums()).hook_values
    if value["gate_mask"]:
        return value["gate_arg"], value["gate"], value["gate_mask"]
    return value["gate_arg"], value["gate"]


def test_a_hook_is_gated_on_an_integer_every_selector_wants_equal_or_masked() -> None:
    """The kernel leaves an event at once when the gate's argument is none of its values: only where
    every selector (alternatives) wants that integer argument Equal to one of them."""
    flags_in = "  - matchArgs:\n    - name: flags\n      operator: In\n      values: [{}]\n"
    path = "    - name: filename\n      operator: Prefix\n      values: [/etc/]\n"
    assert gate_of(flags_in.format("1, 2")) == (2, [1, 2])  # flags: the second argument
    assert gate_of(flags_in.format("1, 2"), flags_in.format("8")) == (2, [1, 2, 8])
    assert gate_of(flags_in.format("1, 2") + path) == (2, [1, 2])  # and a path: still gated on flags
    assert gate_of(flags_in.format("1"), "  - matchArgs:\n" + path) == (0, [])  # a selector without it
    # More values than the gate holds, in two selectors together:
    assert gate_of(flags_in.format("1, 2, 3, 4, 5"), flags_in.format("6, 7, 8, 9, 10")) == (0, [])
    # A mask: an event without any of its bits matches nothing.
    mask = "  - matchArgs:\n    - name: flags\n      operator: Mask\n      values: [{}]\n"
    assert gate_of(mask.format("0x3") + path) == (2, [], 0x3)
    assert gate_of(mask.format("0x3"), mask.format("0x200")) == (2, [], 0x203)
    assert gate_of(mask.format("0x3"), flags_in.format("8")) == (2, [8], 0x3)
    assert gate_of(mask.format("0x3"), "  - matchArgs:\n" + path) == (0, [])  # a selector without it
    # Equal and a mask in one selector: its values say more.
    assert gate_of(flags_in.format("1") + "    - name: flags\n      operator: Mask\n      values: [2]\n") == (
        2,
        [1],
    )
    # The default policy: its module rule (raw_syscalls:sys_enter) gated on the two syscall numbers, its
    # rules on files opened for writing on sys_enter_openat's flags.
    compiled = compiler.compile_policies(parse_policies(DEFAULT_POLICY, "d.yaml"), fake_enums())
    gates = {
        h.tracepoint: (v["gate_arg"], v["gate"], v["gate_mask"])
        for h, v in zip(compiled.hooks, compiled.hook_values, strict=True)
    }
    assert gates["raw_syscalls:sys_enter"] == (1, [175, 313], 0)
    assert gates["syscalls:sys_enter_openat"] == (2, [], 0x203)


OPENED = """\
tracepoints:
- subsystem: syscalls
  event: sys_exit_openat
  args:
  - name: ret
    type: fd
  selectors:
"""


def leaf_gate_of(*matches: str) -> tuple[int, list[str], list[str]]:
    """The hook's leaf gate: its argument, and the file names its string sets hold, exact and as
    endings (each selector one match on the file)."""
    selectors = "".join(f"  - matchArgs:\n    - name: ret\n      {m}\n" for m in matches)
    compiled = compiler.compile_policies(parse_policies(doc(OPENED + selectors), "p.yaml"), fake_enums())
    (value,) = compiled.hook_values
    exact = sorted(s for set_id, s in compiled.strings if set_id == value["leaf_equal_set"])
    ending = sorted(s[::-1] for set_id, s in compiled.postfixes if set_id == value["leaf_postfix_set"])
    return value["leaf_arg"], exact, ending


def test_a_hook_on_an_open_file_is_gated_on_the_file_s_own_name() -> None:
    """The kernel reads the name of the file an fd argument is open on, and its whole path (a walk up
    its directories) only when every selector wants paths that could end in that name."""
    equal, postfix = "operator: Equal\n      values: [{}]", "operator: Postfix\n      values: [{}]"
    assert leaf_gate_of(equal.format("/etc/shadow, /etc/sudoers")) == (1, ["shadow", "sudoers"], [])
    assert leaf_gate_of(equal.format("/etc/shadow"), postfix.format("/.ssh/id_rsa, _host_rsa_key")) == (
        1,
        ["id_rsa", "shadow"],
        ["_host_rsa_key"],
    )
    # No gate: a selector without such a match, a prefix, a directory, what is not a path.
    assert leaf_gate_of(equal.format("/etc/shadow"), "operator: Prefix\n      values: [/etc/]")[0] == 0
    assert leaf_gate_of(postfix.format("/etc/"))[0] == 0
    assert leaf_gate_of(equal.format("'socket:'"))[0] == 0
    assert leaf_gate_of(postfix.format("'pipe:'"))[0] == 0
    # The default policy's sensitive files.
    compiled = compiler.compile_policies(parse_policies(DEFAULT_POLICY, "d.yaml"), fake_enums())
    (value,) = [
        v for h, v in zip(compiled.hooks, compiled.hook_values, strict=True) if "exit_openat" in h.tracepoint
    ]
    assert value["leaf_arg"] == 1 and value["leaf_equal_set"] and value["leaf_postfix_set"]


def test_too_many_selectors_on_one_tracepoint_across_policies() -> None:
    selector = "  - matchArgs:\n    - name: flags\n      operator: Mask\n      values: [1]\n"
    texts = [doc(OPENAT + selector * 5, name=f"p{i}") for i in range(2)]
    policies = parse_policies("---\n".join(texts), "p.yaml")
    with pytest.raises(PolicyError, match="more than 8 selectors on syscalls:sys_enter_openat"):
        compiler.compile_policies(policies, fake_enums())


# --- fuzzing ------------------------------------------------------------------------------------

VALID = doc(
    OPENAT
    + "  - matchArgs:\n    - name: filename\n      operator: Prefix\n      values: [/etc/]\n"
    + "    matchBinaries:\n    - operator: NotIn\n      values: [/usr/bin/dpkg]\n"
    + "    matchActions:\n    - action: Post\n      rateLimit: 1m\n"
)
LINE_ERROR = re.compile(r"^p\.yaml(:\d+)?: \S")
TOKENS = [
    "matchArgs", "matchBinaries", "matchActions", "operator", "values", "name", "index", "Equal",
    "Prefix", "Postfix", "DAddr", "DPort", "Mask", "Sigkill", "Block", "Signal", "argSig", "- ", ": ",
    "[", "]", "{", "}", "\n", "  ", "'", '"', "0x200", "-1", "/etc/", "10.0.0.0/8", "&a", "*a",
    "!!python/object",
    "filename", "flags", "sys_enter_openat", "~", "null", "true", "1e9", "&x [*x]", "!!binary", "? ",
]  # fmt: skip


def check_never_raises_anything_else(text: str) -> None:
    try:
        policies = parse_policies(text, "p.yaml")
        compiler.compile_policies(policies, fake_enums())
    except PolicyError as exc:
        message = str(exc)
        assert LINE_ERROR.match(message), message
        assert "\n" not in message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_policies_are_accepted_or_one_line_errors(data: st.DataObject) -> None:
    lines = VALID.splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        choice = data.draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        token = data.draw(st.sampled_from(TOKENS)) + data.draw(st.text(max_size=6))
        if choice == "delete" and len(lines) > 1:
            del lines[i]
        elif choice == "insert":
            lines.insert(i, token)
        elif choice == "replace":
            cut = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:cut] + token + lines[i][cut:]
        else:
            lines.insert(i, lines[i])
    check_never_raises_anything_else("".join(lines))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_text_is_a_policy_or_a_one_line_error(text: str) -> None:
    check_never_raises_anything_else(text)
