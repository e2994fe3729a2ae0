"""The engine: open, configure, load and attach a CO-RE BPF object, and read its maps.

    with BpfObject(path, rodata={"targ_tgid": pid}) as obj:
        obj.load()
        obj.attach()
        counts = obj.maps["counts"].items()

Every link and the object are closed when the ``with`` block ends, on exceptions and on the signals the
CLI turns into exceptions (SIGINT, SIGTERM). Nothing is ever pinned, so even after ``kill -9`` the kernel
drops the programs with the process's file descriptors.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfscope.engine import btf as btf_kinds
from bpfscope.engine import libbpf, memory, system
from bpfscope.engine.btf import Btf, CType, Struct
from bpfscope.errors import BpfscopeError, MissingCapability

if TYPE_CHECKING:
    import numpy as np

    from bpfscope.engine.ringbuf import RingBuffer

# The verifier's last lines shown when it rejects a program.
VERIFIER_TAIL = 12
# How libbpf 1.x names the program that failed to load.
_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")
# Batch lookups start with buffers of about this many bytes (and at least _BATCH_MIN_ENTRIES entries),
# twice as many entries each time a batch comes back full, up to _BATCH_MAX_ENTRIES. Sized for 4096
# entries from the start, they were 12.7 MB for the profiler's 3 KB stack keys and 4 MB for iostat's
# per-CPU disk values, zeroed and copied on every read of a map holding a few entries: 17 and 6 ms a
# read (0.2 and 0.3 ms now), the largest part of the idle agent's 10-second samples.
_BATCH_START_BYTES = 256 * 1024
_BATCH_MIN_ENTRIES = 16
_BATCH_MAX_ENTRIES = 4096
# Counter every bpfscope BPF object keeps (bpfscope.bpf.h) for events a ring buffer could not take.
DROP_COUNTER = "bs_dropped"


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = libbpf.last_errno()
        raise _error(err, what)
    return ptr


def _check_rc(rc: int, what: str) -> None:
    if rc < 0:
        raise _error(-rc, what)


def _error(err: int, what: str) -> BpfscopeError:
    if err in (errno.EPERM, errno.EACCES):
        system.require_privileges()
    return BpfscopeError(f"{what}: {libbpf.strerror(err)}")


class Link:
    """An attachment of a program to its hook; destroying it detaches the program."""

    def __init__(self, handle: int, description: str) -> None:
        self._h = handle
        self.description = description

    @property
    def fd(self) -> int:
        return libbpf.lib.bpf_link__fd(self._h)

    def destroy(self) -> None:
        if self._h:
            libbpf.lib.bpf_link__destroy(self._h)
            self._h = None


class Program:
    def __init__(self, obj: BpfObject, handle: int) -> None:
        self._obj = obj
        self._h = handle
        self.name: str = libbpf.lib.bpf_program__name(handle).decode()
        self._info: ctypes.Array[ctypes.c_char] | None = None  # bpf_prog_info's head, for missed
        self.section: str = libbpf.lib.bpf_program__section_name(handle).decode()

    def __repr__(self) -> str:
        return f"<Program {self.name} {self.section}>"

    @property
    def autoload(self) -> bool:
        return libbpf.lib.bpf_program__autoload(self._h)

    @autoload.setter
    def autoload(self, value: bool) -> None:
        _check_rc(
            libbpf.lib.bpf_program__set_autoload(self._h, value), f"cannot change autoload of {self.name}"
        )

    @property
    def autoattach(self) -> bool:
        return libbpf.lib.bpf_program__autoattach(self._h)

    @autoattach.setter
    def autoattach(self, value: bool) -> None:
        libbpf.lib.bpf_program__set_autoattach(self._h, value)

    @property
    def fd(self) -> int:
        return libbpf.lib.bpf_program__fd(self._h)

    def info(self) -> dict[str, Any]:
        """The kernel's struct bpf_prog_info for this program, laid out from the kernel's own BTF."""
        layout = _kernel_struct("bpf_prog_info")
        buf = ctypes.create_string_buffer(layout.size)
        size = ctypes.c_uint32(layout.size)
        _check_rc(
            libbpf.lib.bpf_obj_get_info_by_fd(self.fd, buf, ctypes.byref(size)), f"no info on {self.name}"
        )
        return layout.decode(buf.raw)

    @property
    def missed(self) -> int:
        """Events the kernel did not run this program for, because another BPF program was running on
        that CPU (recursion protection): lost events that no ring buffer could count."""
        if not self.autoload or self.fd < 0:
            return 0
        # Read every second for every program of a stream collector: only the struct's head up to
        # recursion_misses (the kernel fills as much as it is given), into a buffer kept, instead of
        # info() with the whole struct decoded: 16-21 -> 5-9 us a program (vfsstat's 27: 0.42-0.56 ->
        # 0.13-0.24 ms).
        end = _recursion_misses_end()
        if end is None:  # a kernel without the counter
            return 0
        if self._info is None:
            self._info = ctypes.create_string_buffer(end)
        else:  # zeroed: the kernel reads the array lengths it is asked to fill from it
            ctypes.memset(self._info, 0, end)
        size = ctypes.c_uint32(end)
        _check_rc(
            libbpf.lib.bpf_obj_get_info_by_fd(self.fd, self._info, ctypes.byref(size)),
            f"no info on {self.name}",
        )
        return ctypes.c_uint64.from_buffer(self._info, end - 8).value

    def check_hook(self) -> None:
        """Name a missing tracepoint before libbpf fails on it with a bare ENOENT."""
        kind, _, target = self.section.partition("/")
        if kind in ("tracepoint", "tp") and "/" in target:
            system.require_tracepoint(*target.split("/", 1))
        elif kind in ("raw_tp", "raw_tracepoint", "tp_btf") and target:
            system.require_raw_tracepoint(target)

    def attach(self) -> Link:
        """Attach to the hook named by the program's section (tracepoint/..., tp_btf/..., raw_tp/...)."""
        self.check_hook()
        return self._link(libbpf.lib.bpf_program__attach(self._h), self.section)

    def attach_tracepoint(self, category: str, name: str, cookie: int | None = None) -> Link:
        """Attach to tracepoint category:name; ``cookie`` is what bpf_get_attach_cookie returns there
        (one program on many tracepoints tells them apart by it)."""
        system.require_tracepoint(category, name)
        if cookie is None:
            ptr = libbpf.lib.bpf_program__attach_tracepoint(self._h, category.encode(), name.encode())
        else:
            opts = libbpf.TracepointOpts(sz=ctypes.sizeof(libbpf.TracepointOpts), bpf_cookie=cookie)
            ptr = libbpf.lib.bpf_program__attach_tracepoint_opts(
                self._h, category.encode(), name.encode(), ctypes.byref(opts)
            )
        return self._link(ptr, f"tracepoint {category}:{name}")

    def attach_cgroup(self, path: str | Path) -> Link:
        """Attach a cgroup program (cgroup/connect4, ...) to a cgroup v2 directory, beside any other
        program there (a link: detached when it is destroyed or this process ends)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._link(libbpf.lib.bpf_program__attach_cgroup(self._h, fd), f"cgroup {path}")
        finally:
            os.close(fd)

    def attach_raw_tracepoint(self, name: str) -> Link:
        system.require_raw_tracepoint(name)
        return self._link(
            libbpf.lib.bpf_program__attach_raw_tracepoint(self._h, name.encode()), f"raw_tp {name}"
        )

    def attach_uprobe(self, binary: str, function: str, pid: int = -1, retprobe: bool = False) -> Link:
        if not Path(binary).exists():
            raise BpfscopeError(f"no such binary for a uprobe: {binary}")
        opts = libbpf.UprobeOpts(
            sz=ctypes.sizeof(libbpf.UprobeOpts), retprobe=retprobe, func_name=function.encode()
        )
        ptr = libbpf.lib.bpf_program__attach_uprobe_opts(self._h, pid, binary.encode(), 0, ctypes.byref(opts))
        return self._link(ptr, f"{'uretprobe' if retprobe else 'uprobe'} {binary}:{function}")

    def attach_perf_event(self, perf_fd: int) -> Link:
        """Attach to an open perf event; the link owns the fd from then on."""
        return self._link(
            libbpf.lib.bpf_program__attach_perf_event(self._h, perf_fd), f"perf_event fd {perf_fd}"
        )

    def attach_sampling(self, frequency: int, cpus: list[int] | None = None) -> list[Link]:
        """Sample on every CPU at ``frequency`` Hz with the software cpu-clock event (as profilers do)."""
        links = []
        for cpu in cpus if cpus is not None else sorted(os.sched_getaffinity(0)):
            # PERF_TYPE_SOFTWARE=1, PERF_COUNT_SW_CPU_CLOCK=0; flags bit 10 = freq.
            attr = libbpf.PerfEventAttr(type=1, config=0, sample_period_or_freq=frequency, flags=1 << 10)
            fd = libbpf.perf_event_open(attr, -1, cpu)
            if fd < 0:
                raise _error(-fd, f"cannot open a perf event on CPU {cpu}")
            try:
                links.append(self.attach_perf_event(fd))
            except BpfscopeError:
                os.close(fd)
                raise
        return links

    def _link(self, ptr: int | None, description: str) -> Link:
        link = Link(_check_ptr(ptr, f"cannot attach {self.name} to {description}"), description)
        self._obj._links.append(link)
        return link


class Map:
    def __init__(self, obj: BpfObject, handle: int) -> None:
        self._obj = obj
        self._h = handle
        self.name: str = libbpf.lib.bpf_map__name(handle).decode()
        # Read at open: libbpf drops a map's BTF type ids when the kernel takes the map only without BTF
        # (a value type with a raw key_size, say), and the layout is still the C one.
        self._key_type_id = libbpf.lib.bpf_map__btf_key_type_id(handle)
        self._value_type_id = libbpf.lib.bpf_map__btf_value_type_id(handle)

    def __repr__(self) -> str:
        return f"<Map {self.name} type={self.type} max_entries={self.max_entries}>"

    @property
    def fd(self) -> int:
        fd = libbpf.lib.bpf_map__fd(self._h)
        if fd < 0:
            raise BpfscopeError(f"map {self.name} is not created yet: load the object first")
        return fd

    @property
    def type(self) -> int:
        return libbpf.lib.bpf_map__type(self._h)

    @property
    def key_size(self) -> int:
        return libbpf.lib.bpf_map__key_size(self._h)

    @key_size.setter
    def key_size(self, value: int) -> None:
        """Before load: for maps declared with key_size (raw keys) rather than a BTF key type."""
        _check_rc(
            libbpf.lib.bpf_map__set_key_size(self._h, value), f"cannot set the key size of map {self.name}"
        )

    @property
    def value_size(self) -> int:
        return libbpf.lib.bpf_map__value_size(self._h)

    @property
    def max_entries(self) -> int:
        return libbpf.lib.bpf_map__max_entries(self._h)

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        _check_rc(libbpf.lib.bpf_map__set_max_entries(self._h, value), f"cannot resize map {self.name}")

    def reuse(self, other: Map) -> None:
        """Before loading: be ``other`` (a map of another, loaded object), so that two objects share one
        map (tsa keeps bench's set of tasks, the request tracer reads it)."""
        rc = libbpf.lib.bpf_map__reuse_fd(self._h, other.fd)
        _check_rc(rc, f"cannot share map {other.name} as {self.name}")

    @property
    def percpu(self) -> bool:
        return self.type in libbpf.PERCPU_MAP_TYPES

    @property
    def key_type(self) -> CType | None:
        return self._obj.btf.type(self._key_type_id) if self._key_type_id else None

    @property
    def value_type(self) -> CType | None:
        return self._obj.btf.type(self._value_type_id) if self._value_type_id else None

    @property
    def key_dtype(self) -> np.dtype:
        return self._dtype(self.key_type, self.key_size)

    @property
    def value_dtype(self) -> np.dtype:
        return self._dtype(self.value_type, self.value_size)

    @staticmethod
    def _dtype(t: CType | None, size: int) -> np.dtype:
        import numpy as np

        from bpfscope.engine.btf import to_dtype

        return to_dtype(t) if t is not None else np.dtype(f"V{size}")

    # The kernel copies per-CPU values out as one slot of round_up(value_size, 8) bytes per possible CPU.
    @property
    def _value_stride(self) -> int:
        return (self.value_size + 7) & ~7 if self.percpu else self.value_size

    @property
    def _value_buf_size(self) -> int:
        return self._value_stride * (ncpus() if self.percpu else 1)

    def _key_bytes(self, key: Any) -> bytes:
        return _to_bytes(key, self.key_type, self.key_size, "key", self.name)

    def lookup(self, key: Any) -> Any:
        """The value for ``key`` (numpy record or scalar; one row per CPU for per-CPU maps), or None."""
        raw = self.lookup_bytes(key)
        return None if raw is None else self._decode_values(raw, 1)[0]

    def lookup_bytes(self, key: Any) -> bytes | None:
        kbuf = ctypes.create_string_buffer(self._key_bytes(key), self.key_size)
        vbuf = ctypes.create_string_buffer(self._value_buf_size)
        if libbpf.lib.bpf_map_lookup_elem(self.fd, kbuf, vbuf) < 0:
            err = libbpf.last_errno()
            if err == errno.ENOENT:
                return None
            raise _error(err, f"lookup in map {self.name} failed")
        return vbuf.raw

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        kbuf = ctypes.create_string_buffer(self._key_bytes(key), self.key_size)
        if self.percpu:
            one = _to_bytes(value, self.value_type, self.value_size, "value", self.name).ljust(
                self._value_stride, b"\0"
            )
            raw = one * ncpus()
        else:
            raw = _to_bytes(value, self.value_type, self.value_size, "value", self.name)
        vbuf = ctypes.create_string_buffer(raw, len(raw))
        _check_rc(
            libbpf.lib.bpf_map_update_elem(self.fd, kbuf, vbuf, flags), f"update of map {self.name} failed"
        )

    def delete(self, key: Any) -> bool:
        kbuf = ctypes.create_string_buffer(self._key_bytes(key), self.key_size)
        if libbpf.lib.bpf_map_delete_elem(self.fd, kbuf) < 0:
            err = libbpf.last_errno()
            if err == errno.ENOENT:
                return False
            raise _error(err, f"delete from map {self.name} failed")
        return True

    def delete_many(self, keys: Iterable[Any]) -> int:
        """Delete these keys (absent ones are skipped) in one system call where the kernel has batch
        operations; returns how many were deleted. Deleting rows one by one was a quarter of
        tcpretrans -c's time under a churn of 12,000 connections a second."""
        raw = [self._key_bytes(k) for k in keys]
        if not raw:
            return 0
        if self.type in (1, 5, 9, 10):  # HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH
            buf = ctypes.create_string_buffer(b"".join(raw), self.key_size * len(raw))
            count = ctypes.c_uint32(len(raw))
            opts = libbpf.MapBatchOpts(sz=ctypes.sizeof(libbpf.MapBatchOpts))
            if libbpf.lib.bpf_map_delete_batch(self.fd, buf, ctypes.byref(count), ctypes.byref(opts)) == 0:
                return count.value
            err = libbpf.last_errno()
            if err not in (errno.ENOENT, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise _error(err, f"batch delete from map {self.name} failed")
            # A key that is gone stops the batch (ENOENT) after count.value deletions: the rest one by one.
            done = count.value if err == errno.ENOENT else 0
            return done + sum(self.delete(k) for k in raw[done:])
        return sum(self.delete(k) for k in raw)

    def keys_bytes(self) -> Iterator[bytes]:
        """Every key, by bpf_map_get_next_key (the fallback where batch operations are missing)."""
        prev = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while libbpf.lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            key = nxt.raw
            yield key
            prev = ctypes.create_string_buffer(key, self.key_size)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All entries as (keys, values) numpy arrays, with batch lookups where the kernel has them."""
        keys, values = self._items_batch()
        if keys is None:
            raw_keys = list(self.keys_bytes())
            raw_values = [self.lookup_bytes(k) or b"\0" * self._value_buf_size for k in raw_keys]
            keys = b"".join(raw_keys)
            values = b"".join(raw_values)
            n = len(raw_keys)
        else:
            n = len(keys) // self.key_size
        import numpy as np

        return np.frombuffer(keys, dtype=self.key_dtype, count=n).copy(), self._decode_values(values, n)

    def _items_batch(self) -> tuple[bytes | None, bytes]:
        # Array maps have batch ops too, but they are small and fixed: only hash maps gain from them.
        if self.type not in (1, 5, 9, 10):  # HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH
            return None, b""
        key_size, value_size = self.key_size, self._value_buf_size
        most = max(1, min(self.max_entries, _BATCH_MAX_ENTRIES))
        chunk = min(most, max(_BATCH_MIN_ENTRIES, _BATCH_START_BYTES // (key_size + value_size)))

        def buffers(n: int) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
            return ctypes.create_string_buffer(key_size * n), ctypes.create_string_buffer(value_size * n)

        keys, values = buffers(chunk)
        in_batch = ctypes.c_void_p(None)
        out_batch = ctypes.create_string_buffer(max(key_size, 8))
        opts = libbpf.MapBatchOpts(sz=ctypes.sizeof(libbpf.MapBatchOpts))
        got_keys: list[bytes] = []
        got_values: list[bytes] = []
        while True:
            count = ctypes.c_uint32(chunk)
            rc = libbpf.lib.bpf_map_lookup_batch(self.fd, in_batch, out_batch, keys, values, count, opts)
            err = libbpf.last_errno() if rc < 0 else 0
            if err == errno.ENOSPC and chunk < most:
                # One hash bucket holds more entries than the batch: nothing was read, the same batch
                # again with room for them.
                chunk = min(most, chunk * 2)
                keys, values = buffers(chunk)
                continue
            if rc < 0 and err != errno.ENOENT:
                if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and not got_keys:
                    return None, b""
                raise _error(err, f"batch lookup in map {self.name} failed")
            # Only the entries read are copied out (the buffers' .raw copied them whole).
            got_keys.append(ctypes.string_at(keys, count.value * key_size))
            got_values.append(ctypes.string_at(values, count.value * value_size))
            if rc < 0:  # ENOENT: the last batch
                break
            in_batch = ctypes.cast(out_batch, ctypes.c_void_p)
            if chunk < most:  # more may follow, in larger batches
                chunk = min(most, chunk * 2)
                keys, values = buffers(chunk)
        return b"".join(got_keys), b"".join(got_values)

    def _decode_values(self, raw: bytes, n: int) -> np.ndarray:
        import numpy as np

        if not self.percpu:
            return np.frombuffer(raw, dtype=self.value_dtype, count=n).copy()
        slot = np.dtype(
            {"names": ["v"], "formats": [self.value_dtype], "offsets": [0], "itemsize": self._value_stride}
        )
        return np.frombuffer(raw, dtype=slot, count=n * ncpus()).reshape(n, ncpus())["v"].copy()

    def clear(self) -> None:
        for key in list(self.keys_bytes()):
            libbpf.lib.bpf_map_delete_elem(self.fd, ctypes.create_string_buffer(key, self.key_size))


def _to_bytes(value: Any, ctype: CType | None, size: int, what: str, map_name: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif hasattr(value, "tobytes"):
        raw = value.tobytes()
    elif (isinstance(value, dict) and isinstance(ctype, Struct)) or (
        isinstance(value, int) and ctype is not None and not isinstance(ctype, Struct)
    ):
        raw = ctype.encode(value)
    elif isinstance(value, int):
        raw = value.to_bytes(size, "little", signed=value < 0)
    else:
        raise BpfscopeError(f"cannot use {type(value).__name__} as a {what} of map {map_name}")
    if len(raw) != size:
        raise BpfscopeError(f"{what} of map {map_name} must be {size} bytes, got {len(raw)}")
    return raw


@functools.cache
def _recursion_misses_end() -> int | None:
    """Where struct bpf_prog_info's recursion_misses (a __u64) ends, or None if the kernel has none."""
    layout = _kernel_struct("bpf_prog_info")
    field = next((f for f in layout.fields if f.name == "recursion_misses"), None)
    return None if field is None else field.offset + 8


@functools.cache
def _kernel_struct(name: str) -> Struct:
    """A kernel UAPI struct's layout from the kernel's BTF, read once. The layout is kept, not the BTF:
    the kernel's parsed BTF is 11 MB of libbpf's memory, which a copy of its own held for good in every
    process that read a program's recursion misses (the agent held that copy beside the shared one)."""
    loaded = btf_kinds.loaded_kernel_btf()
    if loaded is not None:
        return loaded.struct(name)
    handle = _check_ptr(libbpf.lib.btf__load_vmlinux_btf(), "cannot read the kernel's BTF")
    kernel = btf_kinds.OwnedBtf(handle)
    layout = kernel.struct(name)
    del kernel  # freed here
    memory.trim()  # and its pages given back (see engine/memory.py)
    return layout


_ncpus: int | None = None


def ncpus() -> int:
    global _ncpus
    if _ncpus is None:
        _ncpus = libbpf.lib.libbpf_num_possible_cpus()
    return _ncpus


class Section:
    """A global-data section (.rodata, .bss, .data) read and written field by field through its BTF.

    Before load it is libbpf's copy: for .rodata, the configuration the verifier will see as constants.
    After load it is the kernel's own memory, mapped into this process, so reading a counter the BPF
    side keeps in .bss costs no syscall.
    """

    def __init__(self, obj: BpfObject, bpf_map: Map) -> None:
        self._obj = obj
        self._map = bpf_map
        layout = bpf_map.value_type
        if not isinstance(layout, Struct):
            raise BpfscopeError(f"section {bpf_map.name} has no BTF layout")
        self.layout = layout
        self._live: mmap.mmap | None = None

    @property
    def read_only(self) -> bool:
        return self._map.name.endswith(".rodata")

    def _read(self, offset: int, size: int) -> bytes:
        if self._obj.loaded:
            return self._kernel_memory()[offset : offset + size]
        return ctypes.string_at(self._initial_value() + offset, size)

    def _kernel_memory(self) -> mmap.mmap:
        if self._live is None:
            prot = mmap.PROT_READ if self.read_only else mmap.PROT_READ | mmap.PROT_WRITE
            length = (self._map.value_size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
            self._live = mmap.mmap(self._map.fd, length, mmap.MAP_SHARED, prot)
            self._obj._mmaps.append(self._live)
        return self._live

    def _initial_value(self) -> int:
        size = ctypes.c_size_t()
        ptr = libbpf.lib.bpf_map__initial_value(self._map._h, ctypes.byref(size))
        if not ptr:
            raise BpfscopeError(f"section {self._map.name} has no initial value")
        return ptr

    def __getitem__(self, name: str) -> Any:
        f = self.layout.field(name)
        return f.type.decode(self._read(f.offset, f.type.size))

    def __setitem__(self, name: str, value: Any) -> None:
        f = self.layout.field(name)
        raw = f.type.encode(value)
        if not self._obj.loaded:
            ctypes.memmove(self._initial_value() + f.offset, raw, len(raw))
        elif self.read_only:
            raise BpfscopeError(f"cannot set {name}: .rodata is read-only once the object is loaded")
        else:
            self._kernel_memory()[f.offset : f.offset + len(raw)] = raw

    def __contains__(self, name: str) -> bool:
        return name in self.layout.names

    def to_dict(self) -> dict[str, Any]:
        return {name: self[name] for name in self.layout.names}


class BpfObject:
    """One compiled ``*.bpf.o``: its programs, maps, BTF and global data."""

    def __init__(
        self,
        path: str | Path,
        rodata: dict[str, Any] | None = None,
        autoload: set[str] | None = None,
        max_entries: dict[str, int] | None = None,
    ) -> None:
        # Set first, so close() (and __del__) work on an object whose opening failed half-way.
        self._h: int | None = None
        self._links: list[Link] = []
        self._rings: list[RingBuffer] = []
        self._mmaps: list[mmap.mmap] = []
        self._sections: dict[str, Section] = {}
        self.loaded = False
        self.path = Path(path)
        if not self.path.exists():
            raise BpfscopeError(f"BPF object {self.path} is missing", hint="reinstall bpfscope to rebuild it")
        system.require_btf()
        mark = libbpf.log_mark()
        handle = libbpf.lib.bpf_object__open_file(str(self.path).encode(), None)
        if not handle:
            detail = "\n".join(libbpf.log_since(mark)[-VERIFIER_TAIL:])
            raise BpfscopeError(
                f"cannot open {self.path.name}: {libbpf.strerror(libbpf.last_errno())}", details=detail
            )
        self._h = handle
        self.name = self.path.name.removesuffix(".bpf.o")
        self.programs: dict[str, Program] = {}
        prog = libbpf.lib.bpf_object__next_program(handle, None)
        while prog:
            p = Program(self, prog)
            self.programs[p.name] = p
            prog = libbpf.lib.bpf_object__next_program(handle, prog)
        self.maps: dict[str, Map] = {}
        m = libbpf.lib.bpf_object__next_map(handle, None)
        while m:
            bm = Map(self, m)
            self.maps[bm.name] = bm
            m = libbpf.lib.bpf_object__next_map(handle, m)
        self.btf = Btf(_check_ptr(libbpf.lib.bpf_object__btf(handle), f"{self.path.name} has no BTF"))
        if autoload is not None:
            unknown = autoload - self.programs.keys()
            if unknown:
                raise BpfscopeError(f"{self.path.name} has no program {', '.join(sorted(unknown))}")
            for name, p in self.programs.items():
                p.autoload = name in autoload
        for name, value in (rodata or {}).items():
            self.rodata[name] = value
        for name, value in (max_entries or {}).items():
            self.maps[name].max_entries = value

    def _section(self, suffix: str) -> Section:
        if suffix in self._sections:
            return self._sections[suffix]
        for m in self.maps.values():
            if m.name.endswith(suffix):
                self._sections[suffix] = Section(self, m)
                return self._sections[suffix]
        raise BpfscopeError(f"{self.path.name} has no {suffix} section")

    @property
    def rodata(self) -> Section:
        return self._section(".rodata")

    @property
    def bss(self) -> Section:
        return self._section(".bss")

    @property
    def data(self) -> Section:
        return self._section(".data")

    def load(self) -> BpfObject:
        system.require_privileges()
        mark = libbpf.log_mark()
        rc = libbpf.lib.bpf_object__load(self._h)
        if rc < 0:
            self._load_failed(-rc, libbpf.log_since(mark))
        self.loaded = True
        return self

    def _load_failed(self, err: int, log: list[str]) -> None:
        if err in (errno.EPERM, errno.EACCES):
            system.require_privileges()
        verifier = [
            line for line in log if not line.startswith("libbpf:") and "-- END PROG LOAD LOG --" not in line
        ]
        failing = next(filter(None, (_FAILED_PROG.search(line) for line in log)), None)
        where = f" {failing.group(1)}" if failing else ""
        if verifier and err in (errno.EACCES, errno.EINVAL):
            raise BpfscopeError(
                f"the kernel's verifier rejected program{where} in {self.path.name}",
                details="\n".join("  " + line for line in verifier[-VERIFIER_TAIL:]),
            )
        raise BpfscopeError(
            f"cannot load {self.path.name}{where}: {libbpf.strerror(err)}",
            details="\n".join("  " + line for line in log[-VERIFIER_TAIL:]) or None,
        )

    def attach(self) -> list[Link]:
        """Attach every loaded program whose section names its hook (autoattach)."""
        if not self.loaded:
            self.load()
        return [p.attach() for p in self.programs.values() if p.autoload and p.autoattach]

    def ring_buffer(self, map_name: str) -> RingBuffer:
        """A batch consumer of ring buffer ``map_name``, declared in C with BS_RINGBUF (its record type)."""
        from bpfscope.engine.ringbuf import RingBuffer

        if map_name not in self.maps:
            raise BpfscopeError(f"{self.path.name} has no map {map_name}")
        event = self.btf.pointee(f"bs_record__{map_name}")
        if not isinstance(event, Struct):
            raise BpfscopeError(f"ring buffer {map_name} records are not a struct")
        variable = self._has_var(f"bs_varlen__{map_name}")
        ring = RingBuffer(self.maps[map_name], event, self.dropped, variable=variable)
        self._rings.append(ring)
        return ring

    def _has_var(self, name: str) -> bool:
        try:
            self.btf.find(name, (btf_kinds.VAR,))
        except BpfscopeError:
            return False
        return True

    def has_section(self, suffix: str) -> bool:
        return any(m.name.endswith(suffix) for m in self.maps.values())

    def has_ring_buffer(self) -> bool:
        return any(m.type == libbpf.MAP_TYPE_RINGBUF for m in self.maps.values())

    def dropped(self) -> int:
        """Events the kernel side could not reserve in a ring buffer (counted by bpfscope.bpf.h)."""
        return int(self.bss[DROP_COUNTER]) if DROP_COUNTER in self.bss else 0

    def missed(self) -> int:
        """Events the kernel skipped for all programs of this object (see Program.missed)."""
        return sum(p.missed for p in self.programs.values()) if self.loaded else 0

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        for mm in self._mmaps:
            mm.close()
        self._mmaps.clear()
        _destroy_links(list(reversed(self._links)))
        self._links.clear()
        if self._h:
            libbpf.lib.bpf_object__close(self._h)
            self._h = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# Detaching a classic tracepoint waits for an RCU grace period (tens of milliseconds): vfsstat's and
# filetop's thirty or so took 1.5-2 s to close one after the other. libbpf's calls release the GIL, so
# links are destroyed from a few threads at once and the waits overlap.
_PARALLEL_DETACH = 4


def _destroy_links(links: list[Link]) -> None:
    if len(links) < _PARALLEL_DETACH:
        for link in links:
            link.destroy()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(links))) as pool:
        list(pool.map(Link.destroy, links))


def probe_prog_type(name: str) -> bool:
    return libbpf.lib.libbpf_probe_bpf_prog_type(libbpf.PROG_TYPES[name], None) == 1


def probe_ringbuf() -> bool:
    return libbpf.lib.libbpf_probe_bpf_map_type(libbpf.MAP_TYPE_RINGBUF, None) == 1


def require(*capabilities: str) -> None:
    """Check, cheaply and before loading, the kernel facilities a tool declares it needs."""
    system.require_privileges()
    system.require_btf()
    for cap in capabilities:
        if cap == "ringbuf":
            ok = probe_ringbuf()
        elif cap in libbpf.PROG_TYPES:
            ok = probe_prog_type(cap)
        elif cap == "tracefs":
            system.ensure_tracefs()
            ok = True
        else:
            raise ValueError(f"unknown capability {cap!r}")
        if not ok:
            raise MissingCapability(
                f"this kernel lacks {cap}, which this tool needs", hint="`bpfscope doctor` lists what it has"
            )


DOMAINS_DIR = Path(__file__).resolve().parent.parent / "domains"


def tool_object(name: str) -> Path:
    """The compiled BPF object ``name`` (domains/DOMAIN/NAME.bpf.o, built with the package)."""
    found = sorted(DOMAINS_DIR.glob(f"*/{name}.bpf.o"))
    return found[0] if found else DOMAINS_DIR / f"{name}.bpf.o"
