"""A `bpfscope trace` query: fields, filter, keys and aggregation, turned into trace.bpf.c's config, and
the schema of the records it gives.

The limits (fields, predicates, key size) and the enum values come from the object's BTF, so this file
declares no layout of its own; the types of the records' fields come from the tracepoint's format.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from bpfscope.engine.btf import Array, Btf, Scalar, Struct
from bpfscope.engine.tracepoint import Tracepoint, TracepointField
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.schema import CGROUP, COMM, PID, RECORD_KEY, TID, Field, Schema

BUILTINS = {
    "pid": "TR_BUILTIN_PID",
    "tid": "TR_BUILTIN_TID",
    "uid": "TR_BUILTIN_UID",
    "cgroup": "TR_BUILTIN_CGROUP",
    "cpu": "TR_BUILTIN_CPU",
    "comm": "TR_BUILTIN_COMM",
}
_KINDS = {
    "int": "TR_FIELD_INT",
    "pointer": "TR_FIELD_INT",
    "chararray": "TR_FIELD_CHARARRAY",
    "dataloc": "TR_FIELD_DATALOC",
    "userstr": "TR_FIELD_USERSTR",
}
_OPS = {
    "==": "TR_OP_EQ",
    "!=": "TR_OP_NE",
    "<": "TR_OP_LT",
    "<=": "TR_OP_LE",
    ">": "TR_OP_GT",
    ">=": "TR_OP_GE",
}
# Names users reach for that tracepoints spell differently (net:* calls the device `name`).
_ALIASES = {"dev": "name"}


@dataclass(frozen=True)
class FieldRef:
    """One value the BPF program reads per event: a tracepoint field (or one array element) or a builtin."""

    name: str
    kind: str  # enum tr_field_kind name
    offset: int = 0
    size: int = 8
    signed: bool = False
    ctype: str = ""

    @property
    def is_string(self) -> bool:
        return self.kind in ("TR_FIELD_CHARARRAY", "TR_FIELD_DATALOC", "TR_FIELD_USERSTR", "TR_BUILTIN_COMM")

    @property
    def is_pointer(self) -> bool:
        return "*" in self.ctype

    @property
    def is_dev(self) -> bool:
        return self.ctype == "dev_t"


def resolve(tp: Tracepoint, spec: str) -> FieldRef:
    """A field of the tracepoint (``args[2]`` indexes an array field), else a builtin."""
    match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", spec.strip())
    if not match:
        raise BpfscopeError(f"{spec!r} is not a field name")
    name, index = match[1], match[2]
    tf = tp.field(name) or (tp.field(_ALIASES[name]) if name in _ALIASES and not tp.field(name) else None)
    if tf is None:
        if name in BUILTINS and index is None:
            return FieldRef(name, BUILTINS[name], signed=False)
        candidates = [f.name for f in tp.fields] + list(BUILTINS)
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else f"`bpfscope trace --info {tp.full_name}` lists them"
        )
        raise BpfscopeError(f"{tp.full_name} has no field {name!r}", hint=hint)
    return _field_ref(tp, tf, spec.strip(), index)


def _field_ref(tp: Tracepoint, tf: TracepointField, label: str, index: str | None) -> FieldRef:
    kind = tf.kind
    if kind == "array":
        if index is None:
            raise BpfscopeError(
                f"{tf.name} is an array of {tf.count}: use {tf.name}[0] .. {tf.name}[{tf.count - 1}]"
            )
        i = int(index)
        assert tf.count is not None
        if i >= tf.count:
            raise BpfscopeError(f"{tf.name} has {tf.count} elements: index {i} is out of range")
        elem = tf.size // tf.count
        return FieldRef(label, "TR_FIELD_INT", tf.offset + i * elem, elem, tf.signed, tf.type)
    if index is not None:
        raise BpfscopeError(f"{tf.name} is not an array")
    if kind == "unsupported":
        raise BpfscopeError(f"field {tf.name} ({tf.type}) of {tp.full_name} cannot be read by bpfscope trace")
    return FieldRef(tf.name, _KINDS[kind], tf.offset, tf.size, tf.signed, tf.type)


# ---- filter expressions -----------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<str>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')|(?P<num>-?(?:0x[0-9a-fA-F]+|\d+))"
    r"|(?P<op>==|!=|<=|>=|<|>|&&|\|\||!|\(|\))|(?P<word>\w+(?:\[\d+\])?))"
)


@dataclass
class Pred:
    field: str
    op: str
    value: int | str


@dataclass
class Node:
    op: str  # "and", "or", "not"
    args: list[Node | Pred] = field(default_factory=list)


def parse_filter(text: str) -> Node | Pred:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise BpfscopeError(
                f"cannot parse filter at {text[pos:]!r}", hint='e.g. comm == "nginx" and pid > 100'
            )
        kind = m.lastgroup
        assert kind is not None
        value = m[kind]
        if kind == "word" and value in ("and", "or", "not"):
            kind, value = "op", {"and": "&&", "or": "||", "not": "!"}[value]
        tokens.append((kind, value))
        pos = m.end()
    parser = _Parser(tokens, text)
    tree = parser.expr()
    if parser.pos != len(tokens):
        raise BpfscopeError(f"unexpected {tokens[parser.pos][1]!r} in filter {text!r}")
    return tree


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], text: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.text = text

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise BpfscopeError(f"filter {self.text!r} ends too early")
        self.pos += 1
        return tok

    def expr(self) -> Node | Pred:
        left = self.conj()
        while self.peek() == ("op", "||"):
            self.take()
            left = Node("or", [left, self.conj()])
        return left

    def conj(self) -> Node | Pred:
        left = self.unary()
        while self.peek() == ("op", "&&"):
            self.take()
            left = Node("and", [left, self.unary()])
        return left

    def unary(self) -> Node | Pred:
        tok = self.peek()
        if tok == ("op", "!"):
            self.take()
            return Node("not", [self.unary()])
        if tok == ("op", "("):
            self.take()
            inner = self.expr()
            if self.take() != ("op", ")"):
                raise BpfscopeError(f"missing ')' in filter {self.text!r}")
            return inner
        kind, name = self.take()
        if kind != "word":
            raise BpfscopeError(f"expected a field name in filter {self.text!r}, got {name!r}")
        kind, op = self.take()
        if op not in _OPS:
            raise BpfscopeError(f"expected a comparison after {name!r} in filter {self.text!r}, got {op!r}")
        kind, literal = self.take()
        if kind == "num":
            return Pred(name, op, int(literal, 0))
        if kind == "str":
            return Pred(name, op, bytes(literal[1:-1], "utf-8").decode("unicode_escape"))
        raise BpfscopeError(f'expected a number or a "string" after {name} {op} in filter {self.text!r}')


# ---- the query and its config --------------------------------------------------------------------------


@dataclass
class Limits:
    """What trace.bpf.c can hold, read from its BTF."""

    fields: int
    strings: int
    str_len: int
    preds: int
    prog: int
    keys: int
    key_max: int
    key_part_max: int
    enums: dict[str, int]

    @classmethod
    def from_btf(cls, btf: Btf) -> Limits:
        """The limits trace.bpf.c was compiled with, from its BTF (nothing loaded)."""
        limits = dict(btf.enum("tr_limits"))
        return cls.from_config(
            btf.struct("tr_config"),
            btf.struct("tr_scratch"),
            limits["TR_KEY_MAX"],
            limits["TR_KEY_PART_MAX"],
        )

    @classmethod
    def from_config(cls, cfg: Struct, scratch: Struct, key_max: int, key_part_max: int) -> Limits:
        def count(s: Struct, name: str) -> int:
            t = s.field(name).type
            assert isinstance(t, Array)
            return t.count

        enums: dict[str, int] = {}
        for t in _walk(cfg):
            if isinstance(t, Scalar):
                enums.update(t.enum)
        pred = cfg.field("preds").type
        assert isinstance(pred, Array) and isinstance(pred.elem, Struct)
        return cls(
            fields=count(cfg, "fields"),
            strings=count(scratch, "strs"),
            str_len=pred.elem.field("str").type.size,
            preds=count(cfg, "preds"),
            prog=count(cfg, "prog"),
            keys=count(cfg, "keys"),
            key_max=key_max,
            key_part_max=key_part_max,
            enums=enums,
        )


def _walk(t: Any) -> list[Any]:
    if isinstance(t, Struct):
        return [x for f in t.fields for x in _walk(f.type)]
    if isinstance(t, Array):
        return _walk(t.elem)
    return [t]


@dataclass
class KeyPart:
    ref: FieldRef
    offset: int
    size: int


@dataclass
class Query:
    tracepoint: Tracepoint
    limits: Limits
    refs: list[FieldRef] = field(default_factory=list)
    keys: list[KeyPart] = field(default_factory=list)
    filter_text: str | None = None
    value: FieldRef | None = None
    hist: str | None = None  # "log2" or "loglin"
    printed: list[FieldRef] = field(default_factory=list)
    _preds: list[tuple[FieldRef, str, int | str]] = field(default_factory=list)
    _prog: list[int] = field(default_factory=list)

    def use(self, spec: str) -> FieldRef:
        ref = resolve(self.tracepoint, spec)
        if ref not in self.refs:
            if len(self.refs) >= self.limits.fields:
                raise BpfscopeError(f"a query can read at most {self.limits.fields} fields")
            if ref.is_string and sum(r.is_string for r in self.refs) >= self.limits.strings:
                raise BpfscopeError(f"a query can read at most {self.limits.strings} string fields")
            self.refs.append(ref)
        return ref

    def set_keys(self, specs: list[str]) -> None:
        if len(specs) > self.limits.keys:
            raise BpfscopeError(f"too many keys ({len(specs)}): at most {self.limits.keys}")
        offset = 0
        for spec in specs:
            ref = self.use(spec)
            if any(part.ref == ref for part in self.keys):
                raise BpfscopeError(f"{ref.name} is a key twice")
            size = min(self.limits.str_len, self.limits.key_part_max) if ref.is_string else 8
            self.keys.append(KeyPart(ref, offset, size))
            offset += size
        if offset > self.limits.key_max:
            raise BpfscopeError(
                f"keys take {offset} bytes: at most {self.limits.key_max} (fewer string keys)"
            )

    @property
    def key_size(self) -> int:
        # A hash map needs a key: with no key fields every event shares one zero key.
        return max(8, sum(p.size for p in self.keys))

    def set_value(self, spec: str, hist: str | None = None) -> None:
        ref = self.use(spec)
        if ref.is_string:
            raise BpfscopeError(f"{ref.name} is a string: it can be a key, not a value to sum or histogram")
        if self.value is not None and self.value != ref:
            raise BpfscopeError(f"one value field per query: {self.value.name} or {ref.name}")
        self.value = ref
        self.hist = hist or self.hist

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._emit(parse_filter(text))
        if len(self._prog) > self.limits.prog:
            raise BpfscopeError(
                f"filter {text!r} is too long: at most {self.limits.prog} terms and operators"
            )

    def _emit(self, node: Node | Pred) -> None:
        if isinstance(node, Pred):
            self._prog.append(self._pred(node))
            return
        for arg in node.args:
            self._emit(arg)
        self._prog.append(
            self.limits.enums[{"and": "TR_TOK_AND", "or": "TR_TOK_OR", "not": "TR_TOK_NOT"}[node.op]]
        )

    def _pred(self, pred: Pred) -> int:
        ref = self.use(pred.field)
        if ref.is_string and not isinstance(pred.value, str):
            raise BpfscopeError(
                f"type mismatch in filter: {ref.name} is a string, {pred.value} is a number",
                hint=f'compare it with a "string", e.g. {ref.name} == "x"',
            )
        if not ref.is_string and isinstance(pred.value, str):
            raise BpfscopeError(
                f"type mismatch in filter: {ref.name} is a number, {pred.value!r} is a string"
            )
        if ref.is_string and pred.op not in ("==", "!="):
            raise BpfscopeError(f"strings compare with == and != only, not {pred.op}")
        if isinstance(pred.value, str) and len(pred.value.encode()) >= self.limits.str_len:
            raise BpfscopeError(f"string {pred.value!r} is too long: at most {self.limits.str_len - 1} bytes")
        if len(self._preds) >= self.limits.preds:
            raise BpfscopeError(f"a filter can have at most {self.limits.preds} comparisons")
        self._preds.append((ref, pred.op, pred.value))
        return len(self._preds) - 1

    def set_print(self, specs: list[str]) -> None:
        for spec in specs:
            ref = self.use(spec)
            if ref in self.printed:
                raise BpfscopeError(f"{ref.name} is printed twice")
            self.printed.append(ref)

    def config(self) -> dict[str, Any]:
        """The value of trace.bpf.c's ``cfg``."""
        enums = self.limits.enums
        slots: dict[FieldRef, int] = {}
        fields = []
        for ref in self.refs:
            slot = slots.setdefault(ref, len(slots)) if ref.is_string else 0
            fields.append(
                {
                    "kind": enums[ref.kind],
                    "offset": ref.offset,
                    "size": ref.size,
                    "is_signed": int(ref.signed),
                    "str_slot": slot,
                }
            )
        preds = []
        for ref, op, value in self._preds:
            pred: dict[str, Any] = {"field": self.refs.index(ref), "op": enums[_OPS[op]]}
            if isinstance(value, str):
                raw = value.encode() + b"\0"
                words = (len(raw) + 7) // 8
                raw = raw.ljust(words * 8, b"\0")
                pred.update(
                    is_str=1,
                    str_words=words,
                    str=[int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)],
                )
            else:
                pred["value"] = value if value < 2**63 else value - 2**64
            preds.append(pred)
        return {
            "nfields": len(fields),
            "npreds": len(preds),
            "nprog": len(self._prog),
            "nkeys": len(self.keys),
            "fields": fields,
            "preds": preds,
            "prog": self._prog,
            "keys": [
                {"field": self.refs.index(k.ref), "size": k.size, "offset": k.offset} for k in self.keys
            ],
            "value_field": self.refs.index(self.value) if self.value else -1,
            "hist_kind": enums[
                {"log2": "TR_HIST_LOG2", "loglin": "TR_HIST_LOGLIN", None: "TR_HIST_NONE"}[self.hist]
            ],
            "print": int(bool(self.printed)),
        }

    def string_slot(self, ref: FieldRef) -> int:
        return [r for r in self.refs if r.is_string].index(ref)

    def decode_key(self, raw: bytes) -> tuple[Any, ...]:
        out: list[Any] = []
        for part in self.keys:
            chunk = raw[part.offset : part.offset + part.size]
            if part.ref.is_string:
                out.append(chunk.split(b"\0", 1)[0].decode(errors="replace"))
            else:
                out.append(int.from_bytes(chunk, "little", signed=part.ref.signed))
        return tuple(out)


# ---- the records' schema ------------------------------------------------------------------------------

# Builtins are the same concept as in every other tool's records: the same field.
_BUILTIN_FIELDS = {
    "TR_BUILTIN_PID": PID,
    "TR_BUILTIN_TID": TID,
    "TR_BUILTIN_COMM": COMM,
    "TR_BUILTIN_CGROUP": CGROUP,
    "TR_BUILTIN_UID": Field("uid", "int", doc="user id", label=True),
    "TR_BUILTIN_CPU": Field("cpu", "int", doc="the CPU the event happened on", label=True),
}
AGGREGATE = "trace.aggregate"
EVENT = "trace.event"


def _record_field(ref: FieldRef, reserved: set[str], label: bool) -> Field:
    """A query field as a record field, typed from the tracepoint's format. A field whose name the record
    uses already (``count`` of syscalls:sys_enter_write, as a key) is written as ``NAME_field``."""
    name = f"{ref.name}_field" if ref.name in reserved else ref.name
    if ref.kind in _BUILTIN_FIELDS:
        builtin = _BUILTIN_FIELDS[ref.kind]
        return Field(name, builtin.type, builtin.unit, builtin.doc, label=label)
    if ref.is_string:
        return Field(name, "str", doc=ref.ctype, label=label)
    if ref.is_pointer:
        return Field(name, "str", doc=f"{ref.ctype}, in hex", label=label)
    if ref.is_dev:
        return Field(name, "str", doc="device name (major:minor where it has none)", label=label)
    return Field(name, "int", doc=ref.ctype, label=label)


def query_schema(query: Query) -> Schema:
    """The records of ``query``: one per event (--print), or one per key and interval, with its count and
    the value's sum, min, max and histogram as asked."""
    tp = query.tracepoint.full_name
    if query.printed:
        reserved = {RECORD_KEY, "ts"}
        fields = tuple(_record_field(ref, reserved, label=False) for ref in query.printed)
        return Schema(EVENT, fields, doc=f"One {tp} event: the fields --print names.")
    values = [Field("count", "int", doc="events")]
    if query.value is not None:
        v = query.value.name
        values += [
            Field("sum", "int", doc=f"sum of {v}"),
            Field("min", "int", doc=f"least {v} since the start"),
            Field("max", "int", doc=f"greatest {v} since the start"),
        ]
    if query.hist:
        values.append(Field("hist", "dict", doc=f"{query.hist} histogram of the value: percentiles, slots"))
    reserved = {RECORD_KEY, "ts", "interval_s", *(f.name for f in values)}
    keys = tuple(_record_field(part.ref, reserved, label=True) for part in query.keys)
    return Schema(AGGREGATE, (*keys, *values), doc=f"{tp} events per key over an interval.", interval=True)
