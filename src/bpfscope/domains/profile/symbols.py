"""Addresses to function names: the kernel's from /proc/kallsyms, a process's from the ELF files it has
mapped (.symtab and .dynsym, debug files found by build-id or .gnu_debuglink) and from perf maps that
JITs write (/tmp/perf-PID.map).

A process's memory map is read while it lives (:meth:`Symbolizer.watch`, called as soon as its samples
show it), and every binary is read once per build-id, through /proc/PID/map_files, so that a deleted or
replaced binary, or one in another mount namespace, is still the one that ran. An address that stays
unnamed is counted by reason (:data:`REASONS`): nothing is dropped silently.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import os
import queue
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bpfscope.domains.profile.unwind import GoTable, Rule, UnwindTable

# Why a frame stayed unnamed, for people.
REASONS = {
    "no_mapping": "address in no mapping of the process (it exited before its map was read)",
    "no_symbols": "no symbol covers the address",
    "stripped": "binary stripped (no .symtab, no debug file)",
    "jit_no_map": "anonymous executable memory without a perf map (JIT)",
    "deleted_file": "binary deleted and no longer readable",
    "unreadable": "binary unreadable or not ELF",
    "kernel_unknown": "kernel address in no symbol of /proc/kallsyms",
}

DEBUG_DIR = Path("/usr/lib/debug")
# What pyelftools raises on corrupt or truncated files (fuzzed: tests/unit/test_profile_formats.py),
# beside its ELFError: all of them mean "not a usable ELF".
BAD_ELF = (
    OSError,
    ValueError,
    KeyError,
    AssertionError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    struct.error,
)
# Where what was read of a binary is kept, by build-id (symbols here, unwind tables in unwind.py).
CACHE_DIR = Path(os.environ.get("BPFSCOPE_CACHE", "/var/cache/bpfscope"))
# Files a Symbolizer holds (open, or read with their symbols) before it lets go of those no process it
# watches maps any more (prune).
MAX_HELD_FILES = 1024
# Bump when the layout of a cached file changes: old files are then ignored.
CACHE_VERSION = 1
# Kernel frames kept by address at most (a stack's address is a return address inside a function, so
# more than the kernel's functions): past it the table starts again.
KERNEL_FRAMES_MAX = 65536


@dataclass(frozen=True)
class Frame:
    """One frame as shown: ``function`` is a name, or ``[module+0xoffset]`` where none was found."""

    function: str
    module: str
    kind: str  # "user", "kernel", "python"
    build_id: str = ""
    unsymbolised: str = ""  # the reason of REASONS where no name was found

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.module, self.function)


class SymbolTable:
    """Sorted function symbols of one binary: start addresses, ends and names (numpy for bisecting)."""

    def __init__(self, entries: list[tuple[int, int, str]]) -> None:
        entries.sort()
        self.starts = np.array([e[0] for e in entries], dtype=np.uint64)
        self.ends = np.array([e[0] + max(e[1], 1) for e in entries], dtype=np.uint64)
        self.names = [e[2] for e in entries]
        # Symbols of size 0 (hand-written assembly) extend to the next symbol.
        for i, (_start, size, _) in enumerate(entries):
            if size == 0 and i + 1 < len(entries):
                self.ends[i] = entries[i + 1][0]

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, address: int) -> str | None:
        i = int(np.searchsorted(self.starts, np.uint64(address), side="right")) - 1
        if i < 0 or address >= int(self.ends[i]):
            return None
        return demangle(self.names[i])


@dataclass
class Segment:
    offset: int
    vaddr: int
    filesz: int


@dataclass
class Binary:
    """What bpfscope keeps of one ELF file: its build-id, load segments and symbols."""

    path: str
    build_id: str
    segments: list[Segment]
    symbols: SymbolTable
    stripped: bool
    error: str | None = None  # a reason of REASONS when the file could not be read
    unwind: UnwindTable | GoTable | None = None  # how its frames unwind, when stacks are unwound here

    def vaddr(self, file_offset: int) -> int | None:
        """The ELF virtual address of a file offset (how a mapped address finds its symbol)."""
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + max(seg.filesz, 1):
                return file_offset - seg.offset + seg.vaddr
        return None


# Elf64_Sym, read as one numpy array: pyelftools parses a symbol in about 10 us, which is seconds for
# the 100,000 of a large library; the table read whole takes milliseconds. pyelftools finds the sections.
_ELF64_SYM = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")]
)
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def _elf_symbols(elf: object) -> list[tuple[int, int, str]]:
    from elftools.elf.sections import SymbolTableSection

    out: dict[int, tuple[int, int, str]] = {}
    if elf.elfclass != 64 or not elf.little_endian:  # type: ignore[attr-defined]
        return []
    for name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(name)  # type: ignore[attr-defined]
        if not isinstance(section, SymbolTableSection):
            continue
        strings = elf.get_section(section["sh_link"]).data()  # type: ignore[attr-defined]
        data = section.data()
        table = np.frombuffer(data, dtype=_ELF64_SYM, count=len(data) // _ELF64_SYM.itemsize)
        kind = table["info"] & 0xF
        funcs = table[((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (table["value"] != 0)]
        for offset, value, size in zip(
            funcs["name"].tolist(), funcs["value"].tolist(), funcs["size"].tolist(), strict=True
        ):
            end = strings.find(b"\0", offset)
            if value in out or offset == 0 or end < 0:
                continue  # one name per address: .symtab comes first and has the local functions
            # Names are demangled when looked up: only the few a profile shows (demangling every
            # symbol of a large Rust or C++ binary took most of the time reading it).
            out[value] = (value, size, strings[offset:end].decode(errors="replace"))
    return list(out.values())


# Rust's legacy mangling (rustc before v0): _ZN, length-prefixed path segments, a hash, E; escapes
# for characters C++ names cannot hold.
_RUST_HASH = re.compile(r"h[0-9a-f]{16}")
_LLVM_SUFFIX = re.compile(r"\.llvm\.\d+$")
_RUST_ESCAPES = {
    "$SP$": "@",
    "$BP$": "*",
    "$RF$": "&",
    "$LT$": "<",
    "$GT$": ">",
    "$LP$": "(",
    "$RP$": ")",
    "$C$": ",",
    "$u7e$": "~",
    "$u20$": " ",
    "$u27$": "'",
    "$u5b$": "[",
    "$u5d$": "]",
    "$u7b$": "{",
    "$u7d$": "}",
    "$u3b$": ";",
    "$u2b$": "+",
    "$u22$": '"',
}


@lru_cache(maxsize=1 << 16)
def demangle(name: str) -> str:
    """Rust's legacy mangled names as Rust writes them (``_ZN6shares5hot_a17h...E`` ->
    ``shares::hot_a``), C++ names as C++ writes them (``_ZNSt6thread4joinEv`` -> ``std::thread::join()``);
    every other name as it is."""
    # LLVM's suffix on functions it made local in a (thin) LTO build.
    name = _LLVM_SUFFIX.sub("", name)
    if not name.startswith("_ZN") or not name.endswith("E"):
        return _demangle_cxx(name) if name.startswith("_Z") else name
    parts, i, body = [], 3, name[:-1]
    while i < len(body):
        j = i
        while j < len(body) and body[j].isdigit():
            j += 1
        if j == i:
            return name
        n = int(body[i:j])
        parts.append(body[j : j + n])
        i = j + n
    if i != len(body) or not parts or not _RUST_HASH.fullmatch(parts[-1]):
        return _demangle_cxx(name)
    out = []
    for part in parts[:-1]:
        part = part[1:] if part.startswith("_$") else part  # "_" guards a leading escape
        part = part.replace("..", "::")
        for escape, char in _RUST_ESCAPES.items():
            part = part.replace(escape, char)
        out.append(part)
    return "::".join(out)


def _demangle_cxx(name: str) -> str:
    """A C++ name (Itanium ABI, as g++ and clang++ mangle) as C++ writes it, by the C++ runtime's own
    demangler (``abi::__cxa_demangle`` in libstdc++, on every Debian system: apt needs it); the name as
    it is where the runtime is missing or the name is not a C++ one."""
    functions = _cxa_demangle()
    if functions is None:
        return name
    cxa_demangle, free = functions
    status = ctypes.c_int(0)
    out = cxa_demangle(name.encode(), None, None, ctypes.byref(status))
    if not out:
        return name
    try:
        return ctypes.string_at(out).decode(errors="replace") if status.value == 0 else name
    finally:
        free(out)


@cache
def _cxa_demangle() -> tuple[Any, Any] | None:
    try:
        runtime = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
        cxa_demangle, free = runtime.__cxa_demangle, ctypes.CDLL(None).free
    except (OSError, AttributeError):
        return None
    cxa_demangle.restype = ctypes.c_void_p
    cxa_demangle.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return cxa_demangle, free


# Go's function table (runtime/symtab.go, "pclntab"), kept in every Go binary, stripped ones too: its
# header (magic; pad; instruction quantum; pointer size; then pointer-sized nfunc, nfiles, textStart and
# the offsets of the function name table and of the function table, whose entries are (entry offset,
# func offset) pairs of uint32) and each _func (entry offset, name offset).
_GO_PCLNTAB_MAGICS = (0xFFFFFFF0, 0xFFFFFFF1)  # Go 1.18-1.19, 1.20 and later


def _go_pclntab(elf: object) -> tuple[bytes, int, int, int, int, int] | None:
    """(data, nfunc, textStart, function names, pc tables, function table) of a Go binary's pclntab."""
    section = elf.get_section_by_name(".gopclntab")  # type: ignore[attr-defined]
    if section is None:
        return None
    data = section.data()
    if len(data) < 72:
        return None
    magic, _, ptr_size = struct.unpack_from("<I2xBB", data, 0)
    if magic not in _GO_PCLNTAB_MAGICS or ptr_size != 8:
        return None
    nfunc, _, text_start, funcnames, _, _, pctab, functab = struct.unpack_from("<8Q", data, 8)
    if not 0 < nfunc < len(data) // 8 or functab + 8 * (nfunc + 1) > len(data):
        return None
    return data, nfunc, text_start, funcnames, pctab, functab


def go_unwind_table(elf: object) -> GoTable | None:
    from bpfscope.domains.profile.unwind import GoTable

    pclntab = _go_pclntab(elf)
    if pclntab is None:
        return None
    data, nfunc, text_start, _, pctab, functab = pclntab
    table = GoTable(data, text_start, pctab, functab, nfunc)
    table.goexit = {start for start, _, name in go_symbols(elf) if name == "runtime.goexit"}
    return table


def go_symbols(elf: object) -> list[tuple[int, int, str]]:
    """Function symbols from a Go binary's .gopclntab: how stripped Go binaries are named."""
    pclntab = _go_pclntab(elf)
    if pclntab is None:
        return []
    data, nfunc, text_start, funcnames, _, functab = pclntab
    table = np.frombuffer(data, dtype="<u4", count=2 * (nfunc + 1), offset=functab).reshape(-1, 2)
    out = []
    for i in range(nfunc):
        entry, func = int(table[i, 0]), int(table[i, 1])
        at = functab + func
        if at + 8 > len(data):
            continue
        name_offset = struct.unpack_from("<i", data, at + 4)[0]
        start = funcnames + name_offset
        end = data.find(b"\0", start)
        if start < 0 or end < 0:
            continue
        name = data[start:end].decode(errors="replace")
        out.append((text_start + entry, int(table[i + 1, 0]) - entry, name))
    return out


def build_id_of(elf: object) -> str:
    """The GNU build-id; else Go's own (``go tool buildid``'s text: the Go toolchain writes no GNU
    one), so that a Go binary is cached too."""
    from elftools.elf.sections import NoteSection

    go = ""
    for section in elf.iter_sections():  # type: ignore[attr-defined]
        if isinstance(section, NoteSection):
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
                # Owner "Go", type 4 (which pyelftools names as GNU's type 4).
                if note["n_name"] == "Go" and note["n_type"] in (4, "NT_GNU_GOLD_VERSION"):
                    desc = note["n_desc"]
                    go = desc.decode(errors="replace") if isinstance(desc, bytes) else str(desc)
    return go


def _debuglink(elf: object) -> str | None:
    section = elf.get_section_by_name(".gnu_debuglink")  # type: ignore[attr-defined]
    if section is None:
        return None
    data = section.data()
    return data.split(b"\0", 1)[0].decode(errors="replace") or None


def debug_file_candidates(path: str, build_id: str, debuglink: str | None) -> Iterator[Path]:
    """Where GDB looks for separate debug information, in its order."""
    if len(build_id) > 2 and all(c in "0123456789abcdef" for c in build_id):  # a GNU build-id
        yield DEBUG_DIR / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    if debuglink:
        directory = Path(path).parent
        yield directory / debuglink
        yield directory / ".debug" / debuglink
        yield DEBUG_DIR / directory.relative_to("/") / debuglink if directory.is_absolute() else Path()


def read_binary(path: str, opened: str | None = None, data: bytes | None = None) -> Binary:
    """Read ``opened`` (a /proc/PID/map_files entry, or ``path`` itself), or ``data`` (the vdso, read
    from the process's memory), as the binary ``path``. Never raises for a bad file: the binary then
    names its reason in ``error``."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    source = opened or path
    try:
        with io.BytesIO(data) if data is not None else open(source, "rb") as stream:
            elf = ELFFile(stream)
            segments = [
                Segment(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
            build_id = build_id_of(elf)
            entries = _elf_symbols(elf)
            has_symtab = elf.get_section_by_name(".symtab") is not None
            if not has_symtab:
                go = go_symbols(elf)
                entries += go
                has_symtab = bool(go)
            link = _debuglink(elf)
    except FileNotFoundError:
        return Binary(
            path, "", [], SymbolTable([]), True, "deleted_file" if "(deleted)" in path else "unreadable"
        )
    except (ELFError, *BAD_ELF):
        return Binary(path, "", [], SymbolTable([]), True, "unreadable")
    if not has_symtab:
        for candidate in debug_file_candidates(path, build_id, link):
            if candidate.is_file():
                debug = read_binary(str(candidate))
                if debug.error is None and len(debug.symbols):
                    entries = _merge(entries, debug)
                    has_symtab = True
                    break
    return Binary(path, build_id, segments, SymbolTable(entries), stripped=not has_symtab)


def peek_build_id(source: str) -> str:
    """A binary's build-id, from its notes alone (cheap: no symbol is read)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(source, "rb") as stream:
            return build_id_of(ELFFile(stream))
    except (ELFError, *BAD_ELF):
        return ""


def cached_binary(path: str, opened: str | None = None) -> Binary:
    """:func:`read_binary`, through the cache by build-id: a binary is read once per machine (python3.11's
    symbols take about a second to read, a few milliseconds to load)."""
    build_id = peek_build_id(opened or path)
    # Go's build ids have slashes.
    cached = CACHE_DIR / "symbols" / f"{build_id.replace('/', '_')}.npz" if build_id else None
    if cached is not None:
        binary = _load_symbols(cached, path, build_id)
        if binary is not None:
            return binary
    binary = read_binary(path, opened)
    if cached is not None and binary.error is None:
        with contextlib.suppress(OSError):  # a read-only cache: read again next time
            _save_symbols(cached, binary)
    return binary


def _save_symbols(path: Path, binary: Binary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    names = "\0".join(binary.symbols.names).encode()
    segments = [(seg.offset, seg.vaddr, seg.filesz) for seg in binary.segments]
    with open(tmp, "wb") as f:
        np.savez(
            f,
            version=np.array([CACHE_VERSION]),
            starts=binary.symbols.starts,
            ends=binary.symbols.ends,
            names=np.frombuffer(names, dtype=np.uint8),
            segments=np.array(segments, dtype=np.uint64).reshape(-1, 3),
            stripped=np.array([binary.stripped]),
        )
    os.replace(tmp, path)


def _load_symbols(path: Path, binary_path: str, build_id: str) -> Binary | None:
    try:
        with np.load(path) as data:
            if int(data["version"][0]) != CACHE_VERSION:
                return None
            table = SymbolTable([])
            table.starts, table.ends = data["starts"], data["ends"]
            blob = data["names"].tobytes().decode()
            table.names = blob.split("\0") if blob else []
            segments = [Segment(int(o), int(v), int(n)) for o, v, n in data["segments"]]
            return Binary(binary_path, build_id, segments, table, bool(data["stripped"][0]))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _unwind_table(source: str | None = None, data: bytes | None = None) -> UnwindTable | GoTable | None:
    """A binary's unwind table (None where it has no .eh_frame_hdr, or is not a usable ELF)."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from bpfscope.domains.profile.unwind import UnwindTable

    try:
        with io.BytesIO(data) if data is not None else open(source or "", "rb") as stream:
            elf = ELFFile(stream)
            return UnwindTable.of(elf) or go_unwind_table(elf)
    except (ELFError, *BAD_ELF):
        return None


def _merge(entries: list[tuple[int, int, str]], debug: Binary) -> list[tuple[int, int, str]]:
    known = {e[0] for e in entries}
    extra = [
        (int(s), int(e) - int(s), n)
        for s, e, n in zip(debug.symbols.starts, debug.symbols.ends, debug.symbols.names, strict=True)
        if int(s) not in known
    ]
    return entries + extra


class Kallsyms:
    """The kernel's text symbols, from /proc/kallsyms (root sees the addresses)."""

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        starts: list[int] = []
        names: list[str] = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in "tTwW":
                    continue
                address = int(parts[0], 16)
                if address:
                    starts.append(address)
                    names.append(parts[2])
        order = np.argsort(np.array(starts, dtype=np.uint64), kind="stable")
        self.starts = np.array(starts, dtype=np.uint64)[order]
        self.names = [names[i] for i in order]

    def lookup(self, address: int) -> str | None:
        i = int(np.searchsorted(self.starts, np.uint64(address), side="right")) - 1
        return self.names[i] if i >= 0 else None


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str  # "" for anonymous memory
    inode: int

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def anonymous(self) -> bool:
        return self.inode == 0


def read_maps(pid: int) -> list[Mapping]:
    """The executable mappings of a process, sorted by address ([] once it has exited)."""
    out = []
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or "x" not in parts[1]:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        out.append(Mapping(start, end, int(parts[2], 16), parts[5] if len(parts) > 5 else "", int(parts[4])))
    return out


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return ""  # a kernel thread, or gone


def read_perf_map(pid: int) -> SymbolTable | None:
    """A JIT's /tmp/perf-PID.map (Node --perf-basic-prof, Java agents, .NET DOTNET_PerfMapEnabled=1)."""
    for path in (Path(f"/proc/{pid}/root/tmp/perf-{pid}.map"), Path(f"/tmp/perf-{pid}.map")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries = []
        for line in text.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3:
                try:
                    entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
                except ValueError:
                    continue
        return SymbolTable(entries)
    return None


FileKey = tuple[int, int, int]  # (device, inode, mtime): one file, as it was when mapped


class NotReady(Exception):
    """A binary the unwinder needs is still being read."""


@dataclass
class Process:
    pid: int
    mappings: list[Mapping]
    files: dict[Mapping, FileKey | Binary] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)
    perf_map: SymbolTable | None = None
    perf_map_read: bool = False
    frames: dict[int, Frame] = field(default_factory=dict)  # address -> frame, resolved once
    rules: dict[int, Rule | None] = field(default_factory=dict)  # address -> how it unwinds, once

    def __post_init__(self) -> None:
        self.starts = [m.start for m in self.mappings]

    def mapping(self, address: int) -> Mapping | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.mappings[i].end:
            return self.mappings[i]
        return None

    exe: str = ""  # the executable's path, as /proc/PID/exe says


class Symbolizer:
    """Names for the addresses of kernel and user stacks; what stays unnamed says why.

    :meth:`watch` is cheap (about 10 us a mapping): it reads the process's map and opens each file it
    maps, once per file, which keeps the very file alive (deleted, replaced or in another mount
    namespace as it may be). The ELF is read when one of its addresses is first named, once per build-id.
    """

    def __init__(self, kernel: bool = True, unwind_tables: bool = False) -> None:
        self._kernel = Kallsyms() if kernel else None
        self._kernel_frames: dict[int, Frame] = {}  # by address (see kernel_frame)
        self._unwind_tables = unwind_tables
        self._processes: dict[int, Process] = {}
        self._binaries: dict[str, Binary] = {}  # by build-id, or by file without one
        self._by_file: dict[FileKey, Binary] = {}
        self._open: dict[FileKey, tuple[int, str]] = {}  # files mapped but not read yet: (fd, path)
        self._loading: dict[FileKey, threading.Event] = {}
        # Binaries read in the background for the unwinder, which must not wait for them.
        self._queued: set[FileKey] = set()
        self._reader_queue: queue.Queue[FileKey | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._closing = False
        self._lock = threading.RLock()
        self.released = 0  # files let go by prune()

    # --- processes -----------------------------------------------------------------------------------
    def watch(self, pid: int) -> bool:
        """Read a process's map and hold the files it maps, while it lives (again if its map changed).
        False when the process has gone."""
        mappings = read_maps(pid)
        if not mappings:
            return False
        with self._lock:
            known = self._processes.get(pid)
            if known is not None and known.mappings == mappings:
                return True
            process = Process(pid, mappings, exe=_exe(pid))
            for m in mappings:
                if m.path and not m.anonymous and not m.path.startswith("["):
                    process.files[m] = self._hold(pid, m)
                elif m.path == "[vdso]":
                    process.files[m] = self._vdso(pid, m)
            self._processes[pid] = process
        return True

    def forget(self, pid: int) -> None:
        with self._lock:
            self._processes.pop(pid, None)

    def process(self, pid: int) -> Process | None:
        return self._processes.get(pid)

    def _hold(self, pid: int, m: Mapping) -> FileKey | Binary:
        """The file a mapping maps, opened (or already read): through /proc/PID/map_files while the
        process lives, else by its path."""
        path = m.path.removesuffix(" (deleted)")
        for source in (f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", path):
            try:
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns)
            if key in self._by_file or key in self._open:
                os.close(fd)
            else:
                self._open[key] = (fd, path)
            return key
        return Binary(path, "", [], SymbolTable([]), True, "deleted_file" if m.deleted else "unreadable")

    def _binary(self, key: FileKey | Binary) -> Binary:
        """The binary of a file held, read now if it was not (once: another thread reading it is waited
        for)."""
        if isinstance(key, Binary):
            return key
        with self._lock:
            binary = self._by_file.get(key)
            if binary is not None:
                return binary
            loading = self._loading.get(key)
            if loading is None:
                fd, path = self._open.pop(key)
                loading = self._loading[key] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            loading.wait()
            return self._by_file[key]
        try:
            # Outside the lock: reading a large binary takes seconds, and other processes' frames are
            # named meanwhile.
            binary = cached_binary(path, f"/proc/self/fd/{fd}")
            if self._unwind_tables and binary.error is None:
                binary.unwind = _unwind_table(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        with self._lock:
            # One copy per build-id: the same library in many processes (or containers) is read once.
            binary = self._binaries.setdefault(binary.build_id or f"{key}", binary)
            self._by_file[key] = binary
            del self._loading[key]
        loading.set()
        return binary

    def ready(self, key: FileKey | Binary) -> Binary | None:
        """The binary if it has been read, else None and it is read in the background."""
        if isinstance(key, Binary):
            return key
        with self._lock:
            binary = self._by_file.get(key)
            if binary is None and key not in self._loading and key not in self._queued:
                self._queued.add(key)
                self._reader_queue.put(key)
                if self._reader is None:
                    self._reader = threading.Thread(
                        target=self._read_queued, name="bpfscope-elf", daemon=True
                    )
                    self._reader.start()
        return binary

    def _read_queued(self) -> None:
        while True:
            key = self._reader_queue.get()
            if key is None or self._closing:
                return
            with contextlib.suppress(KeyError):  # closed meanwhile
                self._binary(key)
            with self._lock:
                self._queued.discard(key)

    def _vdso(self, pid: int, m: Mapping) -> Binary:
        """The vdso is an ELF image in the process's memory, the same for every process of a boot."""
        try:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(m.start)
                data = mem.read(m.end - m.start)
        except OSError:
            return Binary("[vdso]", "", [], SymbolTable([]), True, "unreadable")
        key = f"vdso:{hash(data)}"
        if key not in self._binaries:
            binary = read_binary("[vdso]", data=data)
            if self._unwind_tables and binary.error is None:
                binary.unwind = _unwind_table(data=data)
            self._binaries[key] = binary
        return self._binaries[key]

    def rule_at(self, pid: int, pc: int) -> Rule | None:
        """How the frame of the code at ``pc`` unwinds (None where its binary has no table), kept per
        process: a frame seen before costs a dictionary lookup. Raises :class:`NotReady` while the
        binary is being read (in the background: the unwinder never waits)."""
        process = self._processes.get(pid)
        if process is None:
            return None
        try:
            return process.rules[pc]
        except KeyError:
            pass
        with self._lock:
            m = process.mapping(pc)
            file = process.files.get(m) if m is not None else None
        rule = None
        if m is not None and file is not None:
            binary = self.ready(file)
            if binary is None:
                raise NotReady()
            vaddr = binary.vaddr(pc - m.start + m.offset)
            if binary.unwind is not None and vaddr is not None:
                rule = binary.unwind.rule(vaddr)
        process.rules[pc] = rule
        return rule

    def prune(self, keep: int = MAX_HELD_FILES) -> int:
        """Past ``keep`` files held or read, let go of those no watched process maps any more (their
        descriptors closed, their symbols dropped; read again, from the cache by build-id, if a process
        maps them later). Every file ever mapped stayed otherwise: an always-on profiler on a machine
        that runs new binaries (builds, containers, virtual environments) grew without end. Returns how
        many were let go (also counted in ``released``)."""
        with self._lock:
            if len(self._by_file) + len(self._open) <= keep:
                return 0
            used = {
                k for p in self._processes.values() for k in p.files.values() if not isinstance(k, Binary)
            }
            unused = [k for k in (*self._open, *self._by_file) if k not in used and k not in self._loading]
            for key in unused:
                held = self._open.pop(key, None)
                if held is not None:
                    os.close(held[0])
                self._by_file.pop(key, None)
                self._queued.discard(key)
            kept = {id(b) for b in self._by_file.values()}
            for build_id in [i for i, b in self._binaries.items() if id(b) not in kept]:
                del self._binaries[build_id]
            self.released += len(unused)
            return len(unused)

    def close(self) -> None:
        """Stop reading binaries; the files held are closed (unless a reader is still busy with one:
        then the process's exit closes them)."""
        with self._lock:
            self._closing = True
        if self._reader is not None:
            self._reader_queue.put(None)
            self._reader.join(timeout=1)
            if self._reader.is_alive():
                return
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    # --- addresses -----------------------------------------------------------------------------------
    def kernel_frame(self, address: int) -> Frame:
        """The frame of a kernel address, kept by address as a process's user frames are: a window's
        stacks repeat the same kernel paths, and a lookup in kallsyms (NumPy's searchsorted on one
        address) and a new Frame cost 2.2 us where the kept frame is found in 0.1."""
        frame = self._kernel_frames.get(address)
        if frame is None:
            if len(self._kernel_frames) >= KERNEL_FRAMES_MAX:
                self._kernel_frames.clear()
            frame = self._kernel_frames[address] = self._kernel_frame(address)
        return frame

    def _kernel_frame(self, address: int) -> Frame:
        name = self._kernel.lookup(address) if self._kernel is not None else None
        if name is None:
            return Frame(f"[kernel 0x{address:x}]", "[kernel]", "kernel", unsymbolised="kernel_unknown")
        return Frame(name, "[kernel]", "kernel")

    def user_frame(self, pid: int, address: int) -> Frame:
        with self._lock:
            process = self._processes.get(pid)
            if process is None:
                return Frame(f"[unknown 0x{address:x}]", "[unknown]", "user", unsymbolised="no_mapping")
            frame = process.frames.get(address)
            if frame is None:
                frame = process.frames[address] = self._user_frame(process, address)
            return frame

    def _user_frame(self, process: Process, address: int) -> Frame:
        m = process.mapping(address)
        if m is None:
            return Frame(f"[unknown 0x{address:x}]", "[unknown]", "user", unsymbolised="no_mapping")
        file = process.files.get(m)
        if file is None:
            return self._jit_frame(process, m, address)
        binary = self._binary(file)
        module = os.path.basename(m.path.removesuffix(" (deleted)"))
        file_offset = address - m.start + m.offset
        if binary.error is not None:
            return Frame(f"[{module}+0x{file_offset:x}]", module, "user", unsymbolised=binary.error)
        vaddr = binary.vaddr(file_offset)
        name = binary.symbols.lookup(vaddr) if vaddr is not None else None
        if name is None:
            reason = "stripped" if binary.stripped else "no_symbols"
            return Frame(f"[{module}+0x{file_offset:x}]", module, "user", binary.build_id, reason)
        return Frame(name, module, "user", binary.build_id)

    def _jit_frame(self, process: Process, m: Mapping, address: int) -> Frame:
        if not process.perf_map_read or (process.perf_map and process.perf_map.lookup(address) is None):
            # JITs append to their map as they compile: read it again when an address is missing.
            process.perf_map = read_perf_map(process.pid)
            process.perf_map_read = True
        name = process.perf_map.lookup(address) if process.perf_map is not None else None
        if name is None:
            return Frame(f"[anon 0x{address:x}]", m.path or "[anon]", "user", unsymbolised="jit_no_map")
        return Frame(name, "[jit]", "user")
