"""Types from BTF: the layouts of events, map keys and values, read from the BPF object itself.

A struct is declared once, in C. Python learns its layout here and turns it into a numpy structured
dtype (for batches of records) or reads and writes single fields (for .rodata configuration), so no
layout is ever declared a second time in Python.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfscope.engine import libbpf
from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    import numpy as np

# BTF kinds (linux/btf.h).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_INT_SIGNED, _INT_CHAR, _INT_BOOL = 1, 2, 4


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _Triple(ctypes.Structure):
    # btf_member {name_off, type, offset}, btf_array {type, index_type, nelems},
    # btf_var_secinfo {type, offset, size}: three u32 each.
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32)]


@dataclass(frozen=True)
class Scalar:
    """An integer, enum, float, bool, char or pointer."""

    size: int
    signed: bool = False
    floating: bool = False
    char: bool = False
    pointer: bool = False
    enum: tuple[tuple[str, int], ...] = ()

    @property
    def dtype_str(self) -> str:
        if self.floating:
            return f"<f{self.size}"
        return f"<{'i' if self.signed else 'u'}{self.size}"

    def decode(self, raw: bytes) -> int | float:
        if self.floating:
            return float(
                ctypes.c_double.from_buffer_copy(raw).value
                if self.size == 8
                else ctypes.c_float.from_buffer_copy(raw).value
            )
        return int.from_bytes(raw, "little", signed=self.signed)

    def encode(self, value: Any) -> bytes:
        if self.floating:
            c = ctypes.c_double(value) if self.size == 8 else ctypes.c_float(value)
            return bytes(c)
        return int(value).to_bytes(self.size, "little", signed=self.signed)


@dataclass(frozen=True)
class Array:
    elem: CType
    count: int

    @property
    def size(self) -> int:
        return self.elem.size * self.count

    @property
    def is_string(self) -> bool:
        return isinstance(self.elem, Scalar) and self.elem.size == 1 and self.elem.char

    def decode(self, raw: bytes) -> Any:
        if self.is_string:
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        step = self.elem.size
        return [self.elem.decode(raw[i * step : (i + 1) * step]) for i in range(self.count)]

    def encode(self, value: Any) -> bytes:
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, bytes | bytearray):
            if len(value) > self.size:
                raise ValueError(f"{len(value)} bytes do not fit in {self.size}")
            return bytes(value).ljust(self.size, b"\0")
        if len(value) > self.count:
            raise ValueError(f"{len(value)} elements do not fit in {self.count}")
        data = b"".join(self.elem.encode(v) for v in value)
        return data.ljust(self.size, b"\0")


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    type: CType


@dataclass(frozen=True)
class Struct:
    """A struct, union or data section (.rodata, .bss): named fields at byte offsets."""

    name: str
    size: int
    fields: tuple[Field, ...]
    # Bitfields have no numpy form; they are listed so asking for one gives a clear error.
    bitfields: tuple[str, ...] = ()

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        if name in self.bitfields:
            raise BpfscopeError(f"{self.name}.{name} is a bitfield, which bpfscope cannot read")
        raise BpfscopeError(f"{self.name} has no field {name!r}", hint="fields: " + ", ".join(self.names))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def decode(self, raw: bytes) -> dict[str, Any]:
        return {f.name: f.type.decode(raw[f.offset : f.offset + f.type.size]) for f in self.fields}

    def unpacker(self, upto: str | None = None) -> tuple[struct.Struct, tuple[str, ...]]:
        """The fields before ``upto`` (all of them by default) as one flat ``struct.Struct`` and the
        names of its items: a nested struct's fields are ``outer.inner``, an array's elements
        ``name[i]``, a string one ``bytes`` item. For records read one at a time (``iter_unpack``
        over their heads), where a numpy batch of a few dozen costs more than the records."""
        stop = self.field(upto).offset if upto else self.size
        parts: list[str] = []
        names: list[str] = []
        at = _flatten(self, 0, stop, "", parts, names)
        if at < stop:
            parts.append(f"{stop - at}x")
        return struct.Struct("<" + "".join(parts)), tuple(names)

    def encode(self, value: dict[str, Any]) -> bytes:
        buf = bytearray(self.size)
        for name, v in value.items():
            f = self.field(name)
            buf[f.offset : f.offset + f.type.size] = f.type.encode(v)
        return bytes(buf)

    @cached_property
    def dtype(self) -> np.dtype:
        return to_dtype(self)


CType = Scalar | Array | Struct
_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _flatten(t: CType, base: int, stop: int, name: str, parts: list[str], names: list[str]) -> int:
    """Append ``t`` (at byte ``base``) to a struct format, up to ``stop``; the offset reached."""
    if isinstance(t, Struct):
        at = base
        for f in t.fields:
            start = base + f.offset
            if start >= stop:
                break
            if start > at:
                parts.append(f"{start - at}x")
            at = _flatten(f.type, start, stop, f"{name}.{f.name}" if name else f.name, parts, names)
        return at
    if base + t.size > stop:
        raise BpfscopeError(f"{name} crosses the end of the fields asked for")
    if isinstance(t, Array):
        if t.is_string:
            parts.append(f"{t.count}s")
            names.append(name)
            return base + t.size
        for i in range(t.count):
            _flatten(t.elem, base + i * t.elem.size, stop, f"{name}[{i}]", parts, names)
        return base + t.size
    if t.floating:
        parts.append("d" if t.size == 8 else "f")
    else:
        code = _STRUCT_CODES[t.size]
        parts.append(code.lower() if t.signed else code)
    names.append(name)
    return base + t.size


def to_dtype(t: CType) -> np.dtype:
    """The numpy dtype of a BTF type: structs become structured dtypes with the C offsets and size."""
    import numpy as np

    if isinstance(t, Scalar):
        return np.dtype(t.dtype_str)
    if isinstance(t, Array):
        if t.is_string:
            return np.dtype(f"S{t.count}")
        return np.dtype((to_dtype(t.elem), (t.count,)))
    return np.dtype(
        {
            "names": [f.name for f in t.fields],
            "formats": [to_dtype(f.type) for f in t.fields],
            "offsets": [f.offset for f in t.fields],
            "itemsize": t.size,
        }
    )


class Btf:
    """Read-only view of a BTF object owned by libbpf (an object's BTF, or the kernel's)."""

    def __init__(self, handle: int) -> None:
        self._h = handle
        self._cache: dict[int, CType] = {}

    def _raw(self, type_id: int) -> tuple[_BtfType, int]:
        ptr = libbpf.lib.btf__type_by_id(self._h, type_id)
        if not ptr:
            raise BpfscopeError(f"BTF type id {type_id} does not exist")
        return _BtfType.from_address(ptr), ptr

    def _name(self, offset: int) -> str:
        name = libbpf.lib.btf__name_by_offset(self._h, offset)
        return name.decode() if name else ""

    def find(self, name: str, kinds: tuple[int, ...] = (STRUCT, UNION, TYPEDEF)) -> int:
        for kind in kinds:
            type_id = libbpf.lib.btf__find_by_name_kind(self._h, name.encode(), kind)
            if type_id > 0:
                return type_id
        raise BpfscopeError(f"type {name!r} is not in the BPF object's BTF")

    def struct(self, name: str) -> Struct:
        """The layout of ``struct name`` (or a typedef of a struct), e.g. a ring-buffer event."""
        t = self.type(self.find(name))
        if not isinstance(t, Struct):
            raise BpfscopeError(f"{name!r} is not a struct")
        return t

    def pointee(self, var_name: str) -> CType:
        """The type a global pointer variable points to (how BS_RINGBUF records its event type)."""
        type_id = self._raw(self.find(var_name, (VAR,)))[0].size_or_type
        while True:
            t, _ = self._raw(type_id)
            kind = (t.info >> 24) & 0x1F
            if kind == PTR:
                return self.type(t.size_or_type)
            if kind not in _MODIFIERS:
                raise BpfscopeError(f"{var_name} is not a pointer")
            type_id = t.size_or_type

    def enum(self, name: str) -> tuple[tuple[str, int], ...]:
        """The (name, value) members of ``enum name``: declared in C once, read here."""
        return _enum_members(self, name)

    def enum_with(self, member: str) -> tuple[tuple[str, int], ...]:
        """The members of the enum, named or anonymous, that has ``member`` (the kernel's TCP states are
        an anonymous enum: ``enum_with("TCP_ESTABLISHED")``)."""
        return _enum_by_member(self, member)

    def type(self, type_id: int) -> CType:
        if type_id not in self._cache:
            self._cache[type_id] = self._build(type_id)
        return self._cache[type_id]

    def _build(self, type_id: int) -> CType:
        t, ptr = self._raw(type_id)
        kind = (t.info >> 24) & 0x1F
        vlen = t.info & 0xFFFF
        kind_flag = bool(t.info >> 31)
        extra = ptr + ctypes.sizeof(_BtfType)
        if kind in _MODIFIERS:
            return self.type(t.size_or_type)
        if kind == INT:
            enc = ctypes.c_uint32.from_address(extra).value
            bits = enc & 0xFF
            size = t.size_or_type
            if bits != size * 8:
                raise BpfscopeError(f"integer type with {bits} bits in {size} bytes is not supported")
            encoding = (enc >> 24) & 0xF
            return Scalar(
                size=size,
                signed=bool(encoding & _INT_SIGNED),
                char=bool(encoding & _INT_CHAR)
                or self._name(t.name_off) in ("char", "signed char", "unsigned char"),
            )
        if kind == PTR:
            return Scalar(size=8, pointer=True)
        if kind == FLOAT:
            return Scalar(size=t.size_or_type, floating=True)
        if kind in (ENUM, ENUM64):
            step = 8 if kind == ENUM else 12
            names = []
            for i in range(vlen):
                name_off = ctypes.c_uint32.from_address(extra + i * step).value
                lo = ctypes.c_uint32.from_address(extra + i * step + 4).value
                hi = ctypes.c_uint32.from_address(extra + i * step + 8).value if kind == ENUM64 else 0
                val = (hi << 32) | lo
                if kind == ENUM and kind_flag is False and lo & 0x80000000:
                    val = lo - (1 << 32)
                names.append((self._name(name_off), val))
            return Scalar(size=t.size_or_type, signed=kind_flag, enum=tuple(names))
        if kind == ARRAY:
            arr = _Triple.from_address(extra)
            return Array(self.type(arr.a), arr.c)
        if kind in (STRUCT, UNION):
            return self._struct(t, extra, vlen, kind_flag)
        if kind == DATASEC:
            fields = []
            for i in range(vlen):
                info = _Triple.from_address(extra + i * ctypes.sizeof(_Triple))
                var, _ = self._raw(info.a)
                fields.append(Field(self._name(var.name_off), info.b, self.type(var.size_or_type)))
            return Struct(self._name(t.name_off), t.size_or_type, tuple(fields))
        if kind == VAR:
            return self.type(t.size_or_type)
        raise BpfscopeError(f"BTF kind {kind} (type {self._name(t.name_off)!r}) has no data layout")

    def _struct(self, t: _BtfType, extra: int, vlen: int, kind_flag: bool) -> Struct:
        fields: list[Field] = []
        bitfields: list[str] = []
        for i in range(vlen):
            m = _Triple.from_address(extra + i * ctypes.sizeof(_Triple))
            name = self._name(m.a)
            bit_size = (m.c >> 24) if kind_flag else 0
            bit_offset = (m.c & 0xFFFFFF) if kind_flag else m.c
            mtype = self.type(m.b)
            if bit_size or bit_offset % 8:
                bitfields.append(name)
                continue
            offset = bit_offset // 8
            if not name and isinstance(mtype, Struct):
                # Anonymous struct/union members: their fields belong to the parent, as in C.
                fields.extend(Field(f.name, offset + f.offset, f.type) for f in mtype.fields)
                bitfields.extend(mtype.bitfields)
                continue
            fields.append(Field(name, offset, mtype))
        return Struct(self._name(t.name_off), t.size_or_type, tuple(fields), tuple(bitfields))


class OwnedBtf(Btf):
    """A BTF this process parsed itself (from an object file, or the kernel's): freed when collected."""

    def __del__(self) -> None:
        if self._h:
            libbpf.lib.btf__free(self._h)
            self._h = None


def _enum_members(btf: Btf, name: str) -> tuple[tuple[str, int], ...]:
    t = btf.type(btf.find(name, (ENUM, ENUM64)))
    assert isinstance(t, Scalar)
    return t.enum


def _enum_by_member(btf: Btf, member: str) -> tuple[tuple[str, int], ...]:
    """The members of the enum (named or anonymous) that has ``member`` among them."""
    for type_id in range(1, libbpf.lib.btf__type_cnt(btf._h)):
        raw, _ = btf._raw(type_id)
        kind = (raw.info >> 24) & 0x1F
        if kind not in (ENUM, ENUM64):
            continue
        t = btf.type(type_id)
        assert isinstance(t, Scalar)
        if any(name == member for name, _ in t.enum):
            return t.enum
    raise BpfscopeError(f"no enum has a member {member}")


_OBJECT_BTF: dict[str, OwnedBtf] = {}


def object_btf(path: str | Path) -> OwnedBtf:
    """The BTF of a compiled BPF object, read from the file: no privilege needed and nothing loaded, so
    record schemas can be derived from it anywhere (tests without root, documentation)."""
    key = str(path)
    if key not in _OBJECT_BTF:
        handle = libbpf.lib.btf__parse(key.encode(), None)
        if not handle:
            raise BpfscopeError(f"cannot read the BTF of {path}", hint="reinstall bpfscope to rebuild it")
        _OBJECT_BTF[key] = OwnedBtf(handle)
    return _OBJECT_BTF[key]


_KERNEL_BTF: list[OwnedBtf] = []


def loaded_kernel_btf() -> OwnedBtf | None:
    """The running kernel's BTF if this process parsed it already (kernel_btf), else None."""
    return _KERNEL_BTF[0] if _KERNEL_BTF else None


def kernel_btf() -> OwnedBtf:
    """The running kernel's BTF (for its enums: request operations, TCP states, ...), parsed once."""
    if not _KERNEL_BTF:
        handle = libbpf.lib.btf__load_vmlinux_btf()
        if not handle:
            raise BpfscopeError("cannot read the kernel's BTF", hint="bpfscope needs CONFIG_DEBUG_INFO_BTF=y")
        _KERNEL_BTF.append(OwnedBtf(handle))
    return _KERNEL_BTF[0]
