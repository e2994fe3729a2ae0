"""CPython in mixed stacks: each run of the interpreter loop (``_PyEval_EvalFrameDefault``) in a native
stack is replaced by the Python functions it was running, with their files, without changing or
restarting the process.

The kernel side (profile.bpf.h, ``bs_python_stack``) walks the frames of the thread holding the GIL at
each sample: ``_PyRuntime`` -> the thread state holding the GIL -> its current frame -> ``previous`` ...,
recording each frame's code object and whether a new run of the interpreter loop started there
(``is_entry``). It needs the interpreter's struct offsets, which differ by version: 3.13 and later
publish them in ``_Py_DebugOffsets`` at the start of ``_PyRuntime``; earlier versions need a table
(:data:`OFFSETS`). Names are read here from the process's memory soon after the sample (the code object's
``co_qualname`` and ``co_filename``), once per code object; with ``--unwind fp`` at the end of the window,
so a function first seen in the window its process exits in is named by its code object's address.

Only CPython 3.11 is supported: it is the one these machines have, and every offset here is checked
against its headers. The design for 3.12 to 3.14 (not implemented: nothing here could test it), from
what changed in CPython's internals:

- **Which thread state.** 3.12 drops ``_PyRuntime.gilstate.tstate_current`` (the thread state is
  thread-local), so "the thread holding the GIL" is no longer one read. The walk would start from
  ``_PyRuntime.interpreters.head`` and follow each interpreter's ``threads.head`` -> ``next`` list (a
  bounded loop in BPF) to the thread state whose ``native_thread_id`` is the sampled thread's; that also
  serves 3.13's free-threaded builds, which have no GIL, and sub-interpreters with their own GIL.
- **Which frame.** 3.12 keeps ``tstate->cframe->current_frame``; 3.13 reads ``tstate->current_frame``
  directly: ``struct py_process`` would say whether the cframe indirection applies.
- **Frames.** ``f_code`` becomes ``f_executable`` in 3.13 (a code object for Python frames: its type
  checked), a tagged ``_PyStackRef`` in 3.14 (low bits cleared before use). ``is_entry`` goes in 3.12: a
  run of the interpreter loop starts above a shim frame whose ``owner`` is ``FRAME_OWNED_BY_CSTACK``,
  which the walk would mark (bit 0, as ``is_entry`` now) and skip, so that :func:`merge` is unchanged.
- **Offsets.** 3.13 and later publish them in ``_Py_DebugOffsets`` at the start of ``_PyRuntime``
  (the ``xdebugpy`` cookie, then the version and per-struct offsets: runtime, interpreter, thread,
  frame, code, unicode), read from the process at attach instead of :data:`OFFSETS`; 3.12 needs a table
  entry compiled against its headers, as 3.11's is (``tests/test_profile.py`` checks it so).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bpfscope.domains.profile.symbols import Mapping, Process

EVAL_LOOP = "_PyEval_EvalFrameDefault"
_INTERPRETER = re.compile(r"(?:lib)?python(3\.\d+)[a-z]*(?:\.so[.\d]*)?$")


@dataclass(frozen=True)
class Offsets:
    """Where a CPython version keeps what the frame walk reads (bytes from the start of each struct)."""

    runtime_tstate_current: int  # _PyRuntimeState.gilstate.tstate_current
    tstate_native_thread_id: int
    tstate_cframe: int  # PyThreadState.cframe (3.11, 3.12)
    cframe_current_frame: int  # _PyCFrame.current_frame
    frame_code: int  # _PyInterpreterFrame.f_code
    frame_previous: int
    frame_is_entry: int
    code_qualname: int  # PyCodeObject.co_qualname
    code_filename: int
    unicode_length: int  # PyASCIIObject.length
    unicode_state: int  # PyASCIIObject.state (kind, compact, ascii bits)
    ascii_data: int  # sizeof(PyASCIIObject): where a compact ASCII string's characters start
    compact_data: int  # sizeof(PyCompactUnicodeObject): where other compact strings' start


# CPython 3.11 on x86-64, from its own headers (Include/internal/pycore_runtime.h, pycore_frame.h,
# Include/cpython/pystate.h, code.h, unicodeobject.h): offsetof() compiled against python3.11-dev;
# tests/test_profile.py compiles the same check against the installed headers.
OFFSETS = {
    (3, 11): Offsets(
        runtime_tstate_current=576,
        tstate_native_thread_id=160,
        tstate_cframe=56,
        cframe_current_frame=8,
        frame_code=32,
        frame_previous=48,
        frame_is_entry=68,
        code_qualname=128,
        code_filename=112,
        unicode_length=16,
        unicode_state=32,
        ascii_data=48,
        compact_data=72,
    ),
}


@dataclass
class PyProcess:
    pid: int
    version: tuple[int, int]
    offsets: Offsets
    runtime: int  # address of _PyRuntime
    names: dict[int, tuple[str, str]]  # code object address -> (qualified name, file)

    def bpf_entry(self) -> dict[str, int]:
        """The py_processes map's value for this process (struct py_process)."""
        o = self.offsets
        return {
            "tstate_current": self.runtime + o.runtime_tstate_current,
            "tstate_native_thread_id": o.tstate_native_thread_id,
            "tstate_cframe": o.tstate_cframe,
            "cframe_current_frame": o.cframe_current_frame,
            "frame_code": o.frame_code,
            "frame_previous": o.frame_previous,
            "frame_is_entry": o.frame_is_entry,
        }

    def code_name(self, code: int) -> tuple[str, str]:
        """A code object's (qualified name, file), read from the process's memory once."""
        name = self.names.get(code)
        if name is None:
            o = self.offsets
            try:
                with open(f"/proc/{self.pid}/mem", "rb") as mem:
                    qualname = _read_unicode(mem, _read_pointer(mem, code + o.code_qualname), o)
                    filename = _read_unicode(mem, _read_pointer(mem, code + o.code_filename), o)
                name = (qualname, filename)
            except (OSError, ValueError, struct.error):
                name = (f"[python code 0x{code:x}]", "")
            self.names[code] = name
        return name


def _read_pointer(mem: Any, address: int) -> int:
    mem.seek(address)
    return struct.unpack("<Q", mem.read(8))[0]


def _read_unicode(mem: Any, address: int, o: Offsets) -> str:
    """A compact str object's text (code objects' names and files always are compact)."""
    mem.seek(address + o.unicode_length)
    (length,) = struct.unpack("<q", mem.read(8))
    mem.seek(address + o.unicode_state)
    (state,) = struct.unpack("<I", mem.read(4))
    # state: interned (2 bits), kind (3), compact (1), ascii (1), ready (1).
    kind, compact, ascii_only = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
    if not compact or kind not in (1, 2, 4) or not 0 <= length <= 4096:
        raise ValueError("not a compact string")
    mem.seek(address + (o.ascii_data if ascii_only else o.compact_data))
    data = mem.read(length * kind)
    return data.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind])


def is_interpreter(path: str) -> bool:
    return bool(_INTERPRETER.search(os.path.basename(path)))


@dataclass(frozen=True)
class _Interpreter:
    """What a CPython binary says of itself: read once per file, whichever process maps it."""

    runtime: int | None  # _PyRuntime's virtual address
    version_at: int | None  # Py_Version's
    segments: tuple[tuple[int, int, int], ...]  # PT_LOAD (offset, vaddr, filesz)


_INTERPRETERS: dict[tuple[int, int, int], _Interpreter] = {}


def _interpreter(path: str) -> _Interpreter | None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from bpfscope.domains.profile.symbols import BAD_ELF

    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _INTERPRETERS:
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                segments = tuple(
                    (seg["p_offset"], seg["p_vaddr"], seg["p_filesz"])
                    for seg in elf.iter_segments()
                    if seg["p_type"] == "PT_LOAD"
                )
                _INTERPRETERS[key] = _Interpreter(
                    _symbol(elf, "_PyRuntime"), _symbol(elf, "Py_Version"), segments
                )
        except (ELFError, *BAD_ELF):
            return None
    return _INTERPRETERS[key]


def detect(process: Process) -> PyProcess | None:
    """The process's interpreter, if it runs a CPython whose layout bpfscope knows."""
    for m in process.mappings:
        match = _INTERPRETER.search(os.path.basename(m.path))
        if not match or m.anonymous:
            continue
        interpreter = _interpreter(f"/proc/{process.pid}/map_files/{m.start:x}-{m.end:x}")
        if interpreter is None or interpreter.runtime is None:
            continue
        bias = _load_bias(interpreter.segments, m)
        if bias is None:
            continue
        at = interpreter.version_at
        version = _version(process.pid, at + bias) if at is not None else None
        if version is None:
            major, minor = match.group(1).split(".")
            version = (int(major), int(minor))
        offsets = OFFSETS.get(version)
        if offsets is None:
            return None  # a version whose layout bpfscope does not know: native frames only
        return PyProcess(process.pid, version, offsets, interpreter.runtime + bias, {})
    return None


def _symbol(elf: Any, name: str) -> int | None:
    for section_name in (".dynsym", ".symtab"):
        section = elf.get_section_by_name(section_name)
        if section is None:
            continue
        found = section.get_symbol_by_name(name)
        if found:
            return int(found[0]["st_value"])
    return None


def _load_bias(segments: tuple[tuple[int, int, int], ...], m: Mapping) -> int | None:
    """What to add to the ELF's virtual addresses to get the process's, from one of its mappings."""
    for offset, vaddr, filesz in segments:
        if offset <= m.offset < offset + filesz:
            return m.start - m.offset - (vaddr - offset)
    return None


def _version(pid: int, address: int) -> tuple[int, int] | None:
    """Py_Version (PY_VERSION_HEX, 3.11 and later) from the process's memory."""
    with contextlib.suppress(OSError, struct.error), open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        (hexversion,) = struct.unpack("<I", mem.read(4))
        return (hexversion >> 24, (hexversion >> 16) & 0xFF)
    return None


def merge(native: list[Any], python: list[tuple[Any, bool]], eval_loop: Any) -> list[Any]:
    """Native frames (root first) with each run of the interpreter loop (``eval_loop(frame)`` true)
    replaced by the Python frames it ran. ``python`` is innermost first, each with its ``is_entry``:
    a run of the loop holds the frames from one entry frame to the next."""
    runs: list[list[Any]] = []
    run: list[Any] = []
    for frame, entry in python:
        run.append(frame)
        if entry:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    loops = [i for i, f in enumerate(native) if eval_loop(f)]
    if not loops:
        # No interpreter frame was unwound (a stack cut short): the Python frames go on top.
        return native + [f for r in reversed(runs) for f in reversed(r)]
    # Innermost run to the innermost loop; runs beyond the loops found go to the outermost one.
    placed: dict[int, list[Any]] = {}
    for k, r in enumerate(runs):
        index = loops[max(len(loops) - 1 - k, 0)]
        placed[index] = list(reversed(r)) + placed.get(index, [])
    out: list[Any] = []
    for i, f in enumerate(native):
        out.extend(placed.get(i, [f]))
    return out
