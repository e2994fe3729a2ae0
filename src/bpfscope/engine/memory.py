"""A process's memory as glibc's allocator keeps it.

Two settings keep freed memory from staying in a long-running tool's RSS (the agent's, secure's):

- ``limit_arenas``: glibc gives each thread that allocates its own arena (up to eight per CPU), and
  memory freed in one is reused only there. The agent's threads (the session, the web server, the
  profiler's tracker and ELF reader, DuckDB's workers) each kept their high-water mark that way.
- ``trim``: after a flush the batch's records, its columns and DuckDB's buffers are freed, but the top
  of the heap is given back only past glibc's trim threshold and the free pages inside it never;
  malloc_trim returns both (about a millisecond for the agent's heap); also after a one-off parse, such
  as the kernel's BTF read for one struct's layout (11 MB, see bpf.py), or `secure`'s seed from /proc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
ARENAS = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's, absent from musl
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas from now on (before the threads start). False if not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Free heap memory back to the system. False if not glibc or nothing was returned."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
