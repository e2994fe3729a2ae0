"""ctypes binding to the system libbpf (libbpf.so.1, 1.1 or newer).

Only the C signatures live here; the Pythonic objects are in :mod:`bpfscope.engine.bpf`. libbpf 1.x
returns NULL or a negative errno and sets errno, so every call is made with ``use_errno``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

from bpfscope.errors import BpfscopeError

LIBBPF_SONAME = "libbpf.so.1"
MIN_VERSION = (1, 1)


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
    except OSError as exc:
        raise BpfscopeError(
            f"cannot load {LIBBPF_SONAME}: {exc}", hint="install it with `apt-get install libbpf1`"
        ) from None


lib = _load()
_libc = ctypes.CDLL(None, use_errno=True)

# Opaque handles.
obj_p = c_void_p
prog_p = c_void_p
map_p = c_void_p
link_p = c_void_p
btf_p = c_void_p


class UprobeOpts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class TracepointOpts(Structure):
    """struct bpf_tracepoint_opts: a cookie the program reads with bpf_get_attach_cookie."""

    _fields_ = [("sz", c_size_t), ("bpf_cookie", c_uint64)]


class MapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class PerfEventAttr(Structure):
    """struct perf_event_attr, up to the fields bpfscope sets (the kernel accepts any known size)."""

    _fields_ = [
        ("type", c_uint32),
        ("size", c_uint32),
        ("config", c_uint64),
        ("sample_period_or_freq", c_uint64),
        ("sample_type", c_uint64),
        ("read_format", c_uint64),
        ("flags", c_uint64),
        ("wakeup_events", c_uint32),
        ("bp_type", c_uint32),
        ("config1", c_uint64),
        ("config2", c_uint64),
    ]


def _sig(name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_sig("libbpf_major_version", c_uint32)
_sig("libbpf_minor_version", c_uint32)
_sig("libbpf_strerror", c_int, c_int, c_char_p, c_size_t)
_sig("bpf_object__open_file", obj_p, c_char_p, c_void_p)
_sig("bpf_object__load", c_int, obj_p)
_sig("bpf_object__close", None, obj_p)
_sig("bpf_object__btf", btf_p, obj_p)
_sig("bpf_object__next_program", prog_p, obj_p, prog_p)
_sig("bpf_object__next_map", map_p, obj_p, map_p)
_sig("bpf_program__name", c_char_p, prog_p)
_sig("bpf_program__section_name", c_char_p, prog_p)
_sig("bpf_program__fd", c_int, prog_p)
_sig("bpf_program__set_autoload", c_int, prog_p, c_bool)
_sig("bpf_program__autoload", c_bool, prog_p)
_sig("bpf_program__set_autoattach", None, prog_p, c_bool)
_sig("bpf_program__autoattach", c_bool, prog_p)
_sig("bpf_program__attach", link_p, prog_p)
_sig("bpf_program__attach_tracepoint", link_p, prog_p, c_char_p, c_char_p)
_sig("bpf_program__attach_raw_tracepoint", link_p, prog_p, c_char_p)
_sig("bpf_program__attach_tracepoint_opts", link_p, prog_p, c_char_p, c_char_p, POINTER(TracepointOpts))
_sig("bpf_program__attach_cgroup", link_p, prog_p, c_int)
_sig("bpf_program__attach_perf_event", link_p, prog_p, c_int)
_sig("bpf_program__attach_uprobe_opts", link_p, prog_p, c_int, c_char_p, c_size_t, POINTER(UprobeOpts))
_sig("bpf_link__destroy", c_int, link_p)
_sig("bpf_link__fd", c_int, link_p)
_sig("bpf_map__name", c_char_p, map_p)
_sig("bpf_map__fd", c_int, map_p)
_sig("bpf_map__type", c_int, map_p)
_sig("bpf_map__key_size", c_uint32, map_p)
_sig("bpf_map__value_size", c_uint32, map_p)
_sig("bpf_map__set_key_size", c_int, map_p, c_uint32)
_sig("bpf_map__max_entries", c_uint32, map_p)
_sig("bpf_map__set_max_entries", c_int, map_p, c_uint32)
_sig("bpf_map__btf_key_type_id", c_uint32, map_p)
_sig("bpf_map__btf_value_type_id", c_uint32, map_p)
_sig("bpf_map__initial_value", c_void_p, map_p, POINTER(c_size_t))
_sig("bpf_map__reuse_fd", c_int, map_p, c_int)
_sig("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_sig("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_sig("bpf_map_delete_elem", c_int, c_int, c_void_p)
_sig("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_sig(
    "bpf_map_lookup_batch",
    c_int,
    c_int,
    c_void_p,
    c_void_p,
    c_void_p,
    c_void_p,
    POINTER(c_uint32),
    POINTER(MapBatchOpts),
)
_sig("bpf_map_delete_batch", c_int, c_int, c_void_p, POINTER(c_uint32), POINTER(MapBatchOpts))
_sig("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_sig("libbpf_probe_bpf_prog_type", c_int, c_int, c_void_p)
_sig("libbpf_probe_bpf_map_type", c_int, c_int, c_void_p)
_sig("libbpf_num_possible_cpus", c_int)
_sig("btf__type_cnt", c_uint32, btf_p)
_sig("btf__type_by_id", c_void_p, btf_p, c_uint32)
_sig("btf__name_by_offset", c_char_p, btf_p, c_uint32)
_sig("btf__find_by_name_kind", c_int, btf_p, c_char_p, c_uint32)
_sig("btf__load_vmlinux_btf", btf_p)
_sig("btf__parse", btf_p, c_char_p, c_void_p)
_sig("btf__free", None, btf_p)

_libc.syscall.restype = ctypes.c_long
_libc.vsnprintf.restype = c_int
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]

# Program and map type numbers from the kernel UAPI (linux/bpf.h), used for feature probes.
PROG_TYPES = {
    "kprobe": 2,
    "tracepoint": 5,
    "perf_event": 7,
    "raw_tracepoint": 17,
    "cgroup_sock_addr": 18,
    "tracing": 26,
    "lsm": 29,
}
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH, 21}


def version() -> tuple[int, int]:
    return (lib.libbpf_major_version(), lib.libbpf_minor_version())


def strerror(err: int) -> str:
    buf = ctypes.create_string_buffer(256)
    lib.libbpf_strerror(abs(err), buf, len(buf))
    return buf.value.decode(errors="replace") or os.strerror(abs(err))


def last_errno() -> int:
    return ctypes.get_errno() or 1


# libbpf reports through a print callback (the verifier log among it). Keep the recent lines, numbered,
# so an error can show the verifier's last words; say nothing on the terminal ourselves.
_LOG: deque[tuple[int, str]] = deque(maxlen=400)
_log_seq = 0
_log_lock = threading.Lock()
_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)


@_PRINT_FN
def _on_libbpf_print(level: int, fmt: bytes, args: int) -> int:
    global _log_seq
    buf = ctypes.create_string_buffer(8192)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        for line in buf.value.decode(errors="replace").splitlines():
            if line.strip():
                _log_seq += 1
                _LOG.append((_log_seq, line))
    return 0


lib.libbpf_set_print.restype = c_void_p
lib.libbpf_set_print.argtypes = [_PRINT_FN]
lib.libbpf_set_print(_on_libbpf_print)


def log_mark() -> int:
    """A position in the libbpf log; :func:`log_since` returns what was printed after it."""
    with _log_lock:
        return _log_seq


def log_since(mark: int) -> list[str]:
    with _log_lock:
        return [line for seq, line in _LOG if seq > mark]


SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1, flags: int = 8) -> int:
    """perf_event_open(2); flags default PERF_FLAG_FD_CLOEXEC. Returns the fd or -errno."""
    nr = SYS_PERF_EVENT_OPEN[os.uname().machine]
    attr.size = ctypes.sizeof(PerfEventAttr)
    fd = _libc.syscall(nr, ctypes.byref(attr), pid, cpu, group_fd, flags)
    return fd if fd >= 0 else -ctypes.get_errno()
