"""Stacks without frame pointers: unwinding from DWARF call frame information (.eh_frame), as
``perf record --call-graph dwarf`` does.

The kernel side sends, per sample, the user registers (ip, sp, bp) and a copy of the top of the user
stack (profile.bpf.c); :func:`unwind` walks it here with the binaries' unwind tables. A table
(:class:`UnwindTable`) is compiled once per build-id from the binary's .eh_frame with pyelftools into
sorted numpy rows, each saying from which address on how to find the canonical frame address (CFA:
rsp or rbp plus an offset, or the PLT's expression), where rbp was saved, and whether the return address
is undefined (the outermost frame: _start, clone3). Compiled tables are kept on disk by build-id, so a
binary is compiled once per machine (libc: 0.7 s; python3.11: 2 s; then a few milliseconds).

Code without a table (JIT code, Go, which has no .eh_frame) is walked by its frame pointer.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# x86-64 DWARF register numbers.
RBP, RSP, RA = 6, 7, 16
# How a row finds the CFA.
CFA_RSP, CFA_RBP, CFA_PLT, CFA_NONE, CFA_UNSUPPORTED = 0, 1, 2, 3, 4
# rbp_offset when rbp keeps its value (not saved in this frame).
RBP_SAME = np.iinfo(np.int64).min
MAX_FRAMES = 127
# Where compiled tables are kept, by build-id.
CACHE_DIR = Path(os.environ.get("BPFSCOPE_CACHE", "/var/cache/bpfscope")) / "unwind"
# Bump when the table layout changes: old cache files are then ignored.
TABLE_VERSION = 1


@dataclass
class UnwindTable:
    """Rows sorted by address: from ``pcs[i]`` on, the CFA is ``cfa_kind[i]`` plus ``cfa_offset[i]``,
    rbp was saved at CFA + ``rbp_offset[i]`` (or kept), and the return address is at CFA - 8 unless
    ``ra_undefined[i]`` (the outermost frame)."""

    pcs: np.ndarray
    cfa_kind: np.ndarray
    cfa_offset: np.ndarray
    rbp_offset: np.ndarray
    ra_undefined: np.ndarray
    bad_entries: int = 0  # FDEs pyelftools could not decode (their code falls back to frame pointers)

    def __len__(self) -> int:
        return len(self.pcs)

    def row(self, pc: int) -> int | None:
        i = int(np.searchsorted(self.pcs, np.uint64(pc), side="right")) - 1
        return i if i >= 0 else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.array([TABLE_VERSION]),
                pcs=self.pcs,
                cfa_kind=self.cfa_kind,
                cfa_offset=self.cfa_offset,
                rbp_offset=self.rbp_offset,
                ra_undefined=self.ra_undefined,
                bad_entries=np.array([self.bad_entries]),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> UnwindTable | None:
        try:
            with np.load(path) as data:
                if int(data["version"][0]) != TABLE_VERSION:
                    return None
                return cls(
                    data["pcs"],
                    data["cfa_kind"],
                    data["cfa_offset"],
                    data["rbp_offset"],
                    data["ra_undefined"],
                    int(data["bad_entries"][0]),
                )
        except (OSError, ValueError, KeyError, EOFError):
            return None


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


def compile_table(elf: object) -> UnwindTable:
    """The unwind table of an ELF file (a pyelftools ELFFile) from its .eh_frame (or .debug_frame)."""
    dwarf = elf.get_dwarf_info(follow_links=False)  # type: ignore[attr-defined]
    if dwarf.has_EH_CFI():
        entries = dwarf.EH_CFI_entries()
    elif dwarf.has_CFI():
        entries = dwarf.CFI_entries()
    else:
        entries = []
    rows: list[tuple[int, int, int, int, bool]] = []
    ends: list[int] = []
    bad = 0
    for entry in entries:
        if type(entry).__name__ != "FDE":
            continue
        try:
            decoded = entry.get_decoded()
        except Exception:  # pyelftools rejects some vendor opcodes; that code falls back to rbp
            bad += 1
            continue
        for line in decoded.table:
            rows.append(_row(line))
        ends.append(entry["initial_location"] + entry["address_range"])
    return _table(rows, ends, bad)


def _row(line: dict) -> tuple[int, int, int, int, bool]:
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
    rbp_offset = rbp.arg if rbp is not None and rbp.type == RegisterRule.OFFSET else RBP_SAME
    ra = line.get(RA)
    ra_undefined = ra is not None and ra.type == RegisterRule.UNDEFINED
    return (line["pc"], kind, offset or 0, rbp_offset, ra_undefined)


def _table(rows: list[tuple[int, int, int, int, bool]], ends: list[int], bad: int) -> UnwindTable:
    starts = {r[0] for r in rows}
    # Past the end of a function's entry, no information (unless another entry starts there).
    rows += [(end, CFA_NONE, 0, RBP_SAME, False) for end in ends if end not in starts]
    rows.sort(key=lambda r: r[0])
    return UnwindTable(
        np.array([r[0] for r in rows], dtype=np.uint64),
        np.array([r[1] for r in rows], dtype=np.uint8),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.array([r[3] for r in rows], dtype=np.int64),
        np.array([r[4] for r in rows], dtype=bool),
        bad,
    )


def table_for(path: str, build_id: str, opened: str | None = None) -> UnwindTable:
    """The unwind table of a binary, from the disk cache by build-id, or compiled (and cached)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    cached = CACHE_DIR / f"{build_id}.npz" if build_id else None
    if cached is not None and cached.exists():
        table = UnwindTable.load(cached)
        if table is not None:
            return table
    try:
        with open(opened or path, "rb") as f:
            table = compile_table(ELFFile(f))
    except (OSError, ELFError, ValueError, KeyError, AssertionError, IndexError, TypeError, AttributeError):
        return _table([], [], 1)
    if cached is not None:
        with contextlib.suppress(OSError):  # a read-only cache: compiled again next time
            table.save(cached)
    return table


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


def unwind(regs: Registers, stack: StackCopy, locate: object) -> Unwound:
    """Walk the user stack. ``locate(pc)`` gives ``(table, pc_in_table)`` for the code at ``pc`` (the
    binary's table and the address as the ELF file counts it), or ``(None, 0)`` where there is none."""
    addresses = [regs.ip]
    ip, sp, bp = regs.ip, regs.sp, regs.bp
    for depth in range(MAX_FRAMES - 1):
        # Past the first frame, ip is a return address: the call is the instruction before it.
        table, pc = locate(ip - 1 if depth else ip)  # type: ignore[operator]
        i = table.row(pc) if table is not None else None
        kind = int(table.cfa_kind[i]) if i is not None else CFA_NONE
        if kind in (CFA_NONE, CFA_UNSUPPORTED):
            # No call frame information: the frame-pointer convention (JIT code, Go).
            if not bp:
                return Unwound(addresses, "root" if depth else "lost")
            cfa, saved_bp_at = bp + 16, bp
        else:
            assert table is not None and i is not None
            if table.ra_undefined[i]:
                return Unwound(addresses, "root")
            offset = int(table.cfa_offset[i])
            if kind == CFA_RSP:
                cfa = sp + offset
            elif kind == CFA_RBP:
                cfa = bp + offset
            else:  # CFA_PLT: offset is the threshold
                cfa = sp + 8 + (8 if (ip & 15) >= offset else 0)
            rbp_offset = int(table.rbp_offset[i])
            saved_bp_at = cfa + rbp_offset if rbp_offset != RBP_SAME else None
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
