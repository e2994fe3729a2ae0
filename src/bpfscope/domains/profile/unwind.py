"""Stacks without frame pointers: unwinding from DWARF call frame information (.eh_frame), as
``perf record --call-graph dwarf`` does.

The kernel side sends, per sample, the user registers (ip, sp, bp) and a copy of the top of the user
stack (profile.bpf.c); :func:`unwind` walks it here. A binary's :class:`UnwindTable` finds the entry
(FDE) covering an address through the binary search table of ``.eh_frame_hdr``, the one the C runtime
uses for exceptions, and decodes that entry alone, the first time it is needed: a rule per address
range saying how to find the canonical frame address (CFA: rsp or rbp plus an offset, or the PLT's
expression), where rbp was saved, and whether the return address is undefined (the outermost frame:
_start, clone3). Only the functions that samples land in are ever decoded.

The entries are decoded here (:class:`CallFrames`: the DWARF call frame instructions x86-64 code uses,
run into rows), not by pyelftools, which took 0.2-0.45 ms an entry of python3.11 and libc (its parser
builds a structure per field); this takes 20-27 us, and the unit tests check its rows against
pyelftools' on 1,800 entries of real binaries. The symboliser keeps each process's rule per address
(``Symbolizer.rule_at``), so that a frame seen before (most are: the same return addresses, sample after
sample) costs a dictionary lookup.

Code without a table (JIT code, Go, which has no .eh_frame) is walked by its frame pointer.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# x86-64 DWARF register numbers.
RBP, RSP, RA = 6, 7, 16
# How a rule finds the CFA.
CFA_RSP, CFA_RBP, CFA_PLT, CFA_UNSUPPORTED = 0, 1, 2, 3
MAX_FRAMES = 127
# .eh_frame_hdr's encodings the table lookup reads (LSB, "Exception Frame Header"): the table of
# (initial location, FDE address) pairs as signed 4-byte offsets from the header's start.
_DW_EH_PE_DATAREL_SDATA4 = 0x3B
_DW_EH_PE_UDATA4 = 0x03
_DW_EH_PE_PCREL_SDATA4 = 0x1B


class Rule(NamedTuple):
    """From some address on: the CFA is ``cfa_kind`` plus ``cfa_offset`` (for the PLT rule, the offset
    is its threshold); rbp was saved at CFA + ``rbp_offset`` (None: rbp keeps its value); the return
    address is at CFA - 8 unless ``ra_undefined`` (the outermost frame)."""

    cfa_kind: int
    cfa_offset: int
    rbp_offset: int | None
    ra_undefined: bool


@dataclass
class _Entry:
    start: int
    end: int
    pcs: list[int]
    rules: list[Rule]


class UnwindTable:
    """A binary's call frame information, decoded one entry at a time as addresses need it."""

    def __init__(self, locations: np.ndarray, fde_offsets: np.ndarray, frames: CallFrames) -> None:
        self.locations = locations  # sorted initial locations (ELF virtual addresses)
        self.fde_offsets = fde_offsets  # each entry's offset in .eh_frame
        self._frames = frames
        self._entries: dict[int, _Entry | None] = {}
        self.bad_entries = 0  # entries that could not be decoded (their code falls back to rbp)

    def __len__(self) -> int:
        return len(self.locations)

    @classmethod
    def of(cls, elf: Any) -> UnwindTable | None:
        """The table of a pyelftools ELFFile, or None without .eh_frame and .eh_frame_hdr."""
        hdr = elf.get_section_by_name(".eh_frame_hdr")
        eh_frame = elf.get_section_by_name(".eh_frame")
        if hdr is None or eh_frame is None or elf.elfclass != 64:
            return None
        data = hdr.data()
        if len(data) < 12 or data[0] != 1 or data[1] != _DW_EH_PE_PCREL_SDATA4:
            return None
        if data[2] != _DW_EH_PE_UDATA4 or data[3] != _DW_EH_PE_DATAREL_SDATA4:
            return None
        (count,) = struct.unpack_from("<I", data, 8)
        if 12 + 8 * count > len(data):
            return None
        pairs = (
            np.frombuffer(data, dtype="<i4", count=2 * count, offset=12).reshape(count, 2).astype(np.int64)
        )
        base = hdr["sh_addr"]
        locations = (pairs[:, 0] + base).astype(np.uint64)
        fde_offsets = pairs[:, 1] + base - eh_frame["sh_addr"]
        return cls(locations, fde_offsets, CallFrames(eh_frame.data(), eh_frame["sh_addr"]))

    def rule(self, pc: int) -> Rule | None:
        i = int(np.searchsorted(self.locations, np.uint64(pc), side="right")) - 1
        if i < 0:
            return None
        entry = self._entries.get(i, ...)
        if entry is ...:
            entry = self._entries[i] = self._decode(int(self.fde_offsets[i]))
        if entry is None or not entry.start <= pc < entry.end:
            return None
        j = bisect.bisect_right(entry.pcs, pc) - 1
        return entry.rules[j] if j >= 0 else None

    def _decode(self, offset: int) -> _Entry | None:
        try:
            return self._frames.entry(offset)
        except (CfiError, IndexError, struct.error):  # that code falls back to rbp
            self.bad_entries += 1
            return None


class CfiError(ValueError):
    """Call frame information this decoder does not take (or corrupt)."""


# Pointer encodings (DW_EH_PE_*, LSB "Exception Frame Header"): the low nibble is the format, the
# high one how the value is applied.
_ENCODED = {0x00: "<Q", 0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q"}
_DW_EH_PE_OMIT, _DW_EH_PE_PCREL, _DW_EH_PE_DATAREL = 0xFF, 0x10, 0x30
# A register's rule, beside "offset from the CFA" (an int).
_UNDEFINED, _OTHER = "undefined", "other"


@dataclass(frozen=True)
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    has_augmentation_data: bool
    instructions: bytes


class CallFrames:
    """.eh_frame's entries (DWARF 4 section 6.4 and the LSB's .eh_frame): each FDE's instructions, run
    from its CIE's initial ones, into (address, rule) rows."""

    def __init__(self, data: bytes, address: int) -> None:
        self.data = data
        self.address = address  # .eh_frame's virtual address (pc-relative pointers count from it)
        self._cies: dict[int, _Cie] = {}

    def entry(self, offset: int) -> _Entry:
        data = self.data
        body, end = self._span(offset)
        (cie_pointer,) = struct.unpack_from("<I", data, body)
        if cie_pointer == 0:
            raise CfiError("a CIE where an FDE was expected")
        cie = self._cie(body - cie_pointer)
        at = body + 4
        start, at = self._pointer(at, cie.fde_encoding)
        length, at = self._pointer(at, cie.fde_encoding & 0x0F)
        if cie.has_augmentation_data:
            skip, at = _uleb(data, at)
            at += skip
        pcs: list[int] = []
        rules: list[Rule] = []
        state = _State(cie, start)
        state.run(self, cie.instructions, initial=True)
        state.run(self, data[at:end], rows=(pcs, rules))
        state.row(pcs, rules)
        return _Entry(start, start + length, pcs, rules)

    def _span(self, offset: int) -> tuple[int, int]:
        """Where an entry's body (after its length) starts, and where it ends."""
        if not 0 <= offset <= len(self.data) - 4:
            raise CfiError("entry out of the section")
        (length,) = struct.unpack_from("<I", self.data, offset)
        if length == 0xFFFFFFFF or length < 4:
            raise CfiError("64-bit or empty entry")  # never in .eh_frame of x86-64 binaries
        end = offset + 4 + length
        if end > len(self.data):
            raise CfiError("entry past the section's end")
        return offset + 4, end

    def _cie(self, offset: int) -> _Cie:
        cie = self._cies.get(offset)
        if cie is not None:
            return cie
        data = self.data
        body, end = self._span(offset)
        if struct.unpack_from("<I", data, body)[0] != 0 or data[body + 4] not in (1, 3):
            raise CfiError("not a CIE")
        version = data[body + 4]
        nul = data.index(b"\0", body + 5, end)
        augmentation = data[body + 5 : nul].decode("ascii", "replace")
        code_align, at = _uleb(data, nul + 1)
        data_align, at = _sleb(data, at)
        if version == 1:
            ra_register, at = data[at], at + 1
        else:
            ra_register, at = _uleb(data, at)
        fde_encoding = 0
        has_data = augmentation.startswith("z")
        if has_data:
            length, at = _uleb(data, at)
            instructions_at = at + length
            for letter in augmentation[1:]:
                if letter == "R":
                    fde_encoding, at = data[at], at + 1
                elif letter == "P":
                    _, at = self._pointer(at + 1, data[at])
                elif letter == "L":
                    at += 1
                elif letter not in "S":
                    raise CfiError(f"augmentation {augmentation!r}")
            at = instructions_at
        elif augmentation:
            raise CfiError(f"augmentation {augmentation!r}")
        cie = _Cie(code_align, data_align, ra_register, fde_encoding, has_data, data[at:end])
        self._cies[offset] = cie
        return cie

    def _pointer(self, at: int, encoding: int) -> tuple[int, int]:
        """An encoded pointer at ``at``, and where the next field starts."""
        if encoding == _DW_EH_PE_OMIT:
            return 0, at
        form = encoding & 0x0F
        if form == 0x01:
            value, after = _uleb(self.data, at)
        elif form == 0x09:
            value, after = _sleb(self.data, at)
        elif form in _ENCODED:
            (value,) = struct.unpack_from(_ENCODED[form], self.data, at)
            after = at + struct.calcsize(_ENCODED[form])
        else:
            raise CfiError(f"pointer encoding 0x{encoding:x}")
        applied = encoding & 0x70
        if applied == _DW_EH_PE_PCREL:
            value += self.address + at
        elif applied not in (0, _DW_EH_PE_DATAREL):
            raise CfiError(f"pointer encoding 0x{encoding:x}")
        return value & 0xFFFF_FFFF_FFFF_FFFF, after


class _State:
    """The registers' rules as the instructions change them, from one address to the next."""

    def __init__(self, cie: _Cie, start: int) -> None:
        self.cie = cie
        self.pc = start
        self.cfa_register = RSP
        self.cfa_offset = 0
        self.cfa_expression: bytes | None = None
        self.registers: dict[int, int | str] = {}
        self.initial: dict[int, int | str] = {}
        self.stack: list[tuple[int, int, bytes | None, dict[int, int | str]]] = []

    def row(self, pcs: list[int], rules: list[Rule]) -> None:
        """The rule in force from self.pc on (one row per address: a later one replaces it)."""
        if self.cfa_expression is not None:
            threshold = _plt_threshold(self.cfa_expression)
            kind, offset = (CFA_PLT, threshold) if threshold is not None else (CFA_UNSUPPORTED, 0)
        elif self.cfa_register == RSP:
            kind, offset = CFA_RSP, self.cfa_offset
        elif self.cfa_register == RBP:
            kind, offset = CFA_RBP, self.cfa_offset
        else:
            kind, offset = CFA_UNSUPPORTED, 0
        rbp = self.registers.get(RBP)
        rule = Rule(
            kind,
            offset,
            rbp if isinstance(rbp, int) else None,
            self.registers.get(self.cie.ra_register) == _UNDEFINED,
        )
        if pcs and pcs[-1] == self.pc:
            rules[-1] = rule
        else:
            pcs.append(self.pc)
            rules.append(rule)

    def run(
        self,
        frames: CallFrames,
        code: bytes,
        initial: bool = False,
        rows: tuple[list[int], list[Rule]] | None = None,
    ) -> None:
        cie, at, n = self.cie, 0, len(code)
        registers = self.registers
        while at < n:
            op = code[at]
            at += 1
            high, low = op & 0xC0, op & 0x3F
            advance = 0
            if high == 0x40:  # DW_CFA_advance_loc
                advance = low * cie.code_align
            elif high == 0x80:  # DW_CFA_offset
                value, at = _uleb(code, at)
                registers[low] = value * cie.data_align
            elif high == 0xC0:  # DW_CFA_restore
                self._restore(low)
            elif op == 0x00:  # DW_CFA_nop
                pass
            elif op in (0x02, 0x03, 0x04):  # DW_CFA_advance_loc1, 2, 4
                size = 1 << (op - 2)
                advance = int.from_bytes(code[at : at + size], "little") * cie.code_align
                if at + size > n:
                    raise CfiError("truncated instruction")
                at += size
            elif op == 0x01:  # DW_CFA_set_loc
                raise CfiError("DW_CFA_set_loc")  # never emitted for x86-64
            elif op in (0x05, 0x11, 0x14, 0x15, 0x2F):
                # DW_CFA_offset_extended, _sf, DW_CFA_val_offset, _sf, GNU_negative_offset_extended
                register, at = _uleb(code, at)
                value, at = _sleb(code, at) if op in (0x11, 0x15) else _uleb(code, at)
                value *= cie.data_align
                if op == 0x2F:
                    value = -value
                registers[register] = value if op in (0x05, 0x11, 0x2F) else _OTHER
            elif op == 0x06:  # DW_CFA_restore_extended
                register, at = _uleb(code, at)
                self._restore(register)
            elif op in (0x07, 0x08):  # DW_CFA_undefined, DW_CFA_same_value
                register, at = _uleb(code, at)
                if op == 0x07:
                    registers[register] = _UNDEFINED
                else:
                    registers.pop(register, None)
            elif op == 0x09:  # DW_CFA_register
                register, at = _uleb(code, at)
                _, at = _uleb(code, at)
                registers[register] = _OTHER
            elif op == 0x0A:  # DW_CFA_remember_state
                self.stack.append((self.cfa_register, self.cfa_offset, self.cfa_expression, dict(registers)))
            elif op == 0x0B:  # DW_CFA_restore_state
                if not self.stack:
                    raise CfiError("DW_CFA_restore_state without a state remembered")
                # The CFA rule is restored too, as GCC's unwinder and pyelftools do.
                self.cfa_register, self.cfa_offset, self.cfa_expression, saved = self.stack.pop()
                registers.clear()
                registers.update(saved)
            elif op in (0x0C, 0x12):  # DW_CFA_def_cfa, _sf
                self.cfa_register, at = _uleb(code, at)
                if op == 0x0C:
                    self.cfa_offset, at = _uleb(code, at)
                else:
                    value, at = _sleb(code, at)
                    self.cfa_offset = value * cie.data_align
                self.cfa_expression = None
            elif op == 0x0D:  # DW_CFA_def_cfa_register
                self.cfa_register, at = _uleb(code, at)
                self.cfa_expression = None
            elif op in (0x0E, 0x13):  # DW_CFA_def_cfa_offset, _sf
                if op == 0x0E:
                    self.cfa_offset, at = _uleb(code, at)
                else:
                    value, at = _sleb(code, at)
                    self.cfa_offset = value * cie.data_align
            elif op == 0x0F:  # DW_CFA_def_cfa_expression
                length, at = _uleb(code, at)
                self.cfa_expression = bytes(code[at : at + length])
                at += length
            elif op in (0x10, 0x16):  # DW_CFA_expression, DW_CFA_val_expression
                register, at = _uleb(code, at)
                length, at = _uleb(code, at)
                registers[register] = _OTHER
                at += length
            elif op == 0x2E:  # DW_CFA_GNU_args_size
                _, at = _uleb(code, at)
            else:
                raise CfiError(f"call frame instruction 0x{op:x}")
            if advance:
                if rows is not None:
                    self.row(*rows)
                self.pc += advance
        if at > n:
            raise CfiError("truncated instruction")
        if initial:
            self.initial = dict(registers)

    def _restore(self, register: int) -> None:
        if register in self.initial:
            self.registers[register] = self.initial[register]
        else:
            self.registers.pop(register, None)


def _uleb(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise CfiError("LEB128 too long")


def _sleb(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return (value - (1 << shift) if byte & 0x40 else value), at
        if shift > 63:
            raise CfiError("LEB128 too long")


class GoTable:
    """Go's own unwind information, in every Go binary (stripped ones too): the pclntab's per-function
    table of how far the stack pointer has moved at each address (pcsp, runtime/symtab.go). The return
    address is just above the frame: CFA = rsp + that + 8. Decoded a function at a time."""

    def __init__(self, data: bytes, text_start: int, pctab: int, functab: int, nfunc: int) -> None:
        self.data = data
        self.text_start = text_start
        self.pctab = pctab
        self.functab = functab
        table = np.frombuffer(data, dtype="<u4", count=2 * (nfunc + 1), offset=functab).reshape(-1, 2)
        self.entries = table[:, 0].astype(np.uint64) + np.uint64(text_start)
        self.funcs = table[:, 1]
        self._decoded: dict[int, _Entry | None] = {}
        self.goexit: set[int] = set()  # entries of runtime.goexit: the root of every goroutine
        self.bad_entries = 0

    def __len__(self) -> int:
        return len(self.entries) - 1

    def rule(self, pc: int) -> Rule | None:
        i = int(np.searchsorted(self.entries, np.uint64(pc), side="right")) - 1
        if i < 0 or i >= len(self):
            return None
        entry = self._decoded.get(i, ...)
        if entry is ...:
            entry = self._decoded[i] = self._decode(i)
        if entry is None or not entry.start <= pc < entry.end:
            return None
        j = bisect.bisect_right(entry.pcs, pc) - 1
        return entry.rules[j] if j >= 0 else None

    def _decode(self, i: int) -> _Entry | None:
        start, end = int(self.entries[i]), int(self.entries[i + 1])
        at = self.functab + int(self.funcs[i])
        try:
            (pcsp,) = struct.unpack_from("<I", self.data, at + 16)  # _func.pcsp
            steps = _pc_values(self.data, self.pctab + pcsp, start)
        except (struct.error, IndexError, ValueError):
            self.bad_entries += 1
            return None
        root = start in self.goexit
        pcs, rules = [], []
        for pc, sp_delta in steps:
            pcs.append(pc)
            # A frame saves the caller's rbp just below the return address (Go's frame pointers).
            rules.append(Rule(CFA_RSP, sp_delta + 8, -16 if sp_delta > 0 else None, root))
        return _Entry(start, end, pcs, rules)


def _pc_values(data: bytes, at: int, pc: int) -> list[tuple[int, int]]:
    """A pc-value table: (from this address on, the value) pairs, as runtime.step reads them."""
    out: list[tuple[int, int]] = []
    value = -1
    first = True
    while len(out) < 100_000:
        delta, at = _uleb(data, at)
        if delta == 0 and not first:
            break
        first = False
        value += -((delta >> 1) + 1) if delta & 1 else delta >> 1
        step, at = _uleb(data, at)
        out.append((pc, value))
        pc += step  # the instruction quantum is 1 on x86-64
    return out


# The CFA expression every x86-64 PLT entry has: rsp + 8, plus 8 once past the push in the 16-byte
# entry (DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litN; DW_OP_ge; DW_OP_lit3;
# DW_OP_shl; DW_OP_plus).
_PLT_PREFIX = bytes([0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A])
_PLT_SUFFIX = bytes([0x2A, 0x33, 0x24, 0x22])


def _plt_threshold(expr: object) -> int | None:
    raw = bytes(expr) if isinstance(expr, list | bytes | bytearray) else b""
    if (
        len(raw) == 11
        and raw.startswith(_PLT_PREFIX)
        and raw.endswith(_PLT_SUFFIX)
        and 0x30 <= raw[6] <= 0x4F
    ):
        return raw[6] - 0x30
    return None


@dataclass
class Registers:
    ip: int
    sp: int
    bp: int


class StackCopy:
    """The bytes of the user stack the kernel copied, from ``base`` up."""

    def __init__(self, base: int, data: bytes) -> None:
        self.base = base
        self.data = data
        self.last = len(data) - 8  # the last offset a whole word is read from

    def word(self, address: int) -> int | None:
        offset = address - self.base
        if offset < 0 or offset > self.last:
            return None
        return _WORD(self.data, offset)[0]


_WORD = struct.Struct("<Q").unpack_from


@dataclass
class Unwound:
    addresses: list[int]  # leaf first: the ip, then return addresses
    status: str  # "root" (reached the outermost frame), "truncated" (stack copy ended), "lost"


def unwind(regs: Registers, stack: StackCopy, rule_at: Callable[[int], Rule | None]) -> Unwound:
    """Walk the user stack. ``rule_at(pc)`` gives the rule of the code at ``pc`` (a process's address),
    or None where it has no call frame information."""
    addresses = [regs.ip]
    ip, sp, bp = regs.ip, regs.sp, regs.bp
    for depth in range(MAX_FRAMES - 1):
        # Past the first frame, ip is a return address: the call is the instruction before it.
        rule = rule_at(ip - 1 if depth else ip)
        if rule is None or rule.cfa_kind == CFA_UNSUPPORTED:
            # No call frame information: the frame-pointer convention (JIT code, Go).
            if not bp:
                return Unwound(addresses, "root" if depth else "lost")
            cfa, saved_bp_at = bp + 16, bp
        else:
            if rule.ra_undefined:
                return Unwound(addresses, "root")
            if rule.cfa_kind == CFA_RSP:
                cfa = sp + rule.cfa_offset
            elif rule.cfa_kind == CFA_RBP:
                cfa = bp + rule.cfa_offset
            else:  # CFA_PLT: the offset is the threshold
                cfa = sp + 8 + (8 if (ip & 15) >= rule.cfa_offset else 0)
            saved_bp_at = cfa + rule.rbp_offset if rule.rbp_offset is not None else None
        ra = stack.word(cfa - 8)
        if ra is None:
            return Unwound(addresses, "truncated")
        if saved_bp_at is not None:
            saved = stack.word(saved_bp_at)
            if saved is None:
                return Unwound(addresses, "truncated")
            bp = saved
        if ra == 0:
            return Unwound(addresses, "root")
        if cfa <= sp:
            return Unwound(addresses, "lost")  # the stack grows down: a caller's frame is higher
        sp, ip = cfa, ra
        addresses.append(ra)
    return Unwound(addresses, "truncated")
