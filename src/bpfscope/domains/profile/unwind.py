"""Stacks without frame pointers: unwinding from DWARF call frame information (.eh_frame), as
``perf record --call-graph dwarf`` does.

The kernel side sends, per sample, the user registers (ip, sp, bp) and a copy of the top of the user
stack (profile.bpf.c); :func:`unwind` walks it here. A binary's :class:`UnwindTable` finds the entry
(FDE) covering an address through the binary search table of ``.eh_frame_hdr``, the one the C runtime
uses for exceptions, and has pyelftools decode that entry alone, the first time it is needed: a rule per
address range saying how to find the canonical frame address (CFA: rsp or rbp plus an offset, or the
PLT's expression), where rbp was saved, and whether the return address is undefined (the outermost
frame: _start, clone3). Only the functions that samples land in are ever decoded (decoding all of
python3.11's 10,000 entries takes 4.5 s and 116 MB; libLLVM's, minutes and gigabytes).

Code without a table (JIT code, Go, which has no .eh_frame) is walked by its frame pointer.
"""

from __future__ import annotations

import bisect
import io
import struct
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

    def __init__(self, locations: np.ndarray, fde_offsets: np.ndarray, cfi: Any) -> None:
        self.locations = locations  # sorted initial locations (ELF virtual addresses)
        self.fde_offsets = fde_offsets  # each entry's offset in .eh_frame
        self._cfi = cfi
        self._entries: dict[int, _Entry | None] = {}
        self.bad_entries = 0  # entries pyelftools could not decode (their code falls back to rbp)

    def __len__(self) -> int:
        return len(self.locations)

    @classmethod
    def of(cls, elf: Any) -> UnwindTable | None:
        """The table of a pyelftools ELFFile, or None without .eh_frame and .eh_frame_hdr."""
        from elftools.dwarf.callframe import CallFrameInfo
        from elftools.dwarf.structs import DWARFStructs

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
        frames = eh_frame.data()
        structs = DWARFStructs(little_endian=elf.little_endian, dwarf_format=32, address_size=8)
        cfi = CallFrameInfo(
            stream=io.BytesIO(frames),
            size=len(frames),
            address=eh_frame["sh_addr"],
            base_structs=structs,
            for_eh_frame=True,
        )
        return cls(locations, fde_offsets, cfi)

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
            fde = self._cfi._parse_entry_at(offset)  # one entry (pyelftools' own parser, not public)
            table = fde.get_decoded().table
            start = fde["initial_location"]
            end = start + fde["address_range"]
        except Exception:  # pyelftools rejects some vendor opcodes; that code falls back to rbp
            self.bad_entries += 1
            return None
        return _Entry(start, end, [line["pc"] for line in table], [_rule(line) for line in table])


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


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _pc_values(data: bytes, at: int, pc: int) -> list[tuple[int, int]]:
    """A pc-value table: (from this address on, the value) pairs, as runtime.step reads them."""
    out: list[tuple[int, int]] = []
    value = -1
    first = True
    while len(out) < 100_000:
        delta, at = _varint(data, at)
        if delta == 0 and not first:
            break
        first = False
        value += -((delta >> 1) + 1) if delta & 1 else delta >> 1
        step, at = _varint(data, at)
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


def _rule(line: dict) -> Rule:
    from elftools.dwarf.callframe import RegisterRule

    cfa = line["cfa"]
    if cfa.expr is not None:
        threshold = _plt_threshold(cfa.expr)
        kind, offset = (CFA_PLT, threshold) if threshold is not None else (CFA_UNSUPPORTED, 0)
    elif cfa.reg == RSP:
        kind, offset = CFA_RSP, cfa.offset
    elif cfa.reg == RBP:
        kind, offset = CFA_RBP, cfa.offset
    else:
        kind, offset = CFA_UNSUPPORTED, 0
    rbp = line.get(RBP)
    rbp_offset = rbp.arg if rbp is not None and rbp.type == RegisterRule.OFFSET else None
    ra = line.get(RA)
    return Rule(kind, offset or 0, rbp_offset, ra is not None and ra.type == RegisterRule.UNDEFINED)


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

    def word(self, address: int) -> int | None:
        offset = address - self.base
        if offset < 0 or offset + 8 > len(self.data):
            return None
        return struct.unpack_from("<Q", self.data, offset)[0]


@dataclass
class Unwound:
    addresses: list[int]  # leaf first: the ip, then return addresses
    status: str  # "root" (reached the outermost frame), "truncated" (stack copy ended), "lost"


def unwind(regs: Registers, stack: StackCopy, locate: Any) -> Unwound:
    """Walk the user stack. ``locate(pc)`` gives ``(table, pc_in_table)`` for the code at ``pc`` (the
    binary's table and the address as the ELF file counts it), or ``(None, 0)`` where there is none."""
    addresses = [regs.ip]
    ip, sp, bp = regs.ip, regs.sp, regs.bp
    for depth in range(MAX_FRAMES - 1):
        # Past the first frame, ip is a return address: the call is the instruction before it.
        table, pc = locate(ip - 1 if depth else ip)
        rule = table.rule(pc) if table is not None else None
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
