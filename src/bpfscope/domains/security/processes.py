"""The process cache in user space: every process with what it ran, who started it, and its exec_id.

Fed by the kernel's lifecycle records (exec, clone, exit: secure.bpf.c; a clone's only once something
names it) and seeded from /proc at start, so that processes older than bpfscope have their lineage
too. A process keeps a reference to its parent, so an ancestor that has exited stays as long as a
descendant needs it, and goes with the last one; the cache itself holds live processes only, at most
``limit`` of them (the oldest leave first, counted), and the last that exited or executed leaving
children, whose clones may be sent later (``parents_gone``, bounded).

exec_id is Tetragon's: base64 of ``node:ktime:pid``, where ktime is the boot-clock time (ns) of the exec
that made the process what it is (for a process only seen as a clone, of its fork; for one found in /proc,
its start time, which /proc gives in clock ticks).
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NS_NAMES = (
    "uts",
    "ipc",
    "mnt",
    "pid",
    "pid_for_children",
    "net",
    "time",
    "time_for_children",
    "cgroup",
    "user",
)
DEFAULT_LIMIT = 65536 * 2
# Shared, immutable values: most processes have the same credentials, capabilities and namespaces.
_interned: dict[Any, Any] = {}
# Values interned at most: every distinct working directory and namespace set ever seen stayed here for
# the always-on agent's lifetime (a test runner's temporary directories, a container's namespaces). Past
# it the table starts again; nothing recorded is lost, values are only shared less until it refills.
MAX_INTERNED = 65536


def intern(value: Any) -> Any:
    if len(_interned) >= MAX_INTERNED:
        _interned.clear()
    return _interned.setdefault(value, value)


def join_arguments(argv: tuple[str, ...] | list[str]) -> str:
    """Tetragon's ``arguments``: argv after argv[0], space-separated, an argument with spaces quoted.
    A process keeps this one string, not its argv: a tuple of strings took 0.2 kB more a process."""
    return " ".join(f'"{a}"' if (" " in a or not a) else a for a in argv[1:])


def arguments_of(text: str) -> str:
    """join_arguments of an argv as the kernel keeps it: each argument followed by a NUL (the last one's
    cut when the arguments were). Without an argument to quote, the NULs become the spaces: an exec
    storm's usual case, in one pass of C instead of a generator over the arguments."""
    rest = text.partition("\0")[2]
    if not rest:
        return ""
    body = rest[:-1] if rest[-1] == "\0" else rest
    if body and " " not in body and "\0\0" not in body and body[0] != "\0" and body[-1] != "\0":
        return body.replace("\0", " ")
    argv = text.split("\0")
    if argv[-1] == "":
        argv.pop()
    return join_arguments(argv)


# A process nothing is known of: no credentials, no capabilities.
NO_ACCESS: tuple[tuple[int, ...], tuple[int, int, int]] = ((), (0, 0, 0))


class Process:
    """A process as the cache holds it. Slots, not a dataclass: twelve of them make the object 128
    bytes with its GC header, the next size down from 144, and a cache of 65,536 processes keeps every
    byte 65,536 times. Credentials and capabilities are one shared pair (most processes have the same)."""

    __slots__ = (
        "_access",
        "arguments",
        "binary",
        "cgroup_id",
        "cwd",
        "flags",
        "ktime",
        "ns",
        "parent",
        "pid",
        "ppid",
        "tid",
    )  # fmt: skip

    def __init__(
        self,
        pid: int,
        ktime: int,  # boot ns of its exec (or fork): with pid and the node, its identity
        binary: str,
        arguments: str,  # join_arguments(argv): what events show of the command line
        cwd: str,
        # (creds, caps), interned by the caller as the strings are: shared by most processes. creds: uid,
        # euid, suid, fsuid, gid, egid, sgid, fsgid, loginuid, securebits; caps: effective, permitted,
        # inheritable.
        access: tuple[tuple[int, ...], tuple[int, int, int]],
        ns: tuple[int, ...],  # inode numbers, NS_NAMES order
        cgroup_id: int,
        flags: str,  # Tetragon's: execve, clone, procFS, rootcwd, truncArgs
        parent: Process | None,
        ppid: int,
        tid: int = 0,
    ) -> None:
        self.pid = pid
        self.ktime = ktime
        self.binary = binary
        self.arguments = arguments
        self.cwd = cwd
        self._access = access
        self.ns = ns
        self.cgroup_id = cgroup_id
        self.flags = flags
        self.parent = parent
        self.ppid = ppid
        self.tid = tid

    @classmethod
    def forked(cls, parent: Process, pid: int, ktime: int, ppid: int) -> Process:
        """A clone of ``parent``: its image, namespaces and cgroup, and its credentials' pair itself (not
        interned again: the pair's hash is of thirteen integers, and a storm forks thousands a second)."""
        child = cls.__new__(cls)
        child.pid = pid
        child.ktime = ktime
        child.binary = parent.binary
        child.arguments = parent.arguments
        child.cwd = parent.cwd
        child._access = parent._access
        child.ns = parent.ns
        child.cgroup_id = parent.cgroup_id
        child.flags = "clone"
        child.parent = parent
        child.ppid = ppid
        child.tid = pid
        return child

    @property
    def creds(self) -> tuple[int, ...]:
        return self._access[0]

    @property
    def caps(self) -> tuple[int, int, int]:
        return self._access[1]

    @property
    def uid(self) -> int:
        return self._access[0][0]

    @property
    def euid(self) -> int:
        return self._access[0][1]

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, binary={self.binary!r}, ppid={self.ppid}, flags={self.flags!r})"


RECENT_EXITS = 256  # processes kept at least after their exit, for hits read late (ProcessCache.exited)
# Processes that exited leaving children, kept as their parents (ProcessCache.parents_gone): the kernel
# sends a clone's record only when something names it (secure.bpf.c's announce()), which may be after
# its parent's exit (a daemon's double fork, a subshell its shell outlived).
PARENTS_GONE = 4096


class ProcessCache:
    """Live processes by pid; see the module's text."""

    def __init__(self, node: str | None = None, limit: int = DEFAULT_LIMIT) -> None:
        self.node = node or socket.gethostname()
        self.limit = limit
        self.live: dict[int, Process] = {}
        self.evicted = 0  # processes dropped because the cache was full
        self.unknown_parents = 0  # execs and clones whose parent the cache did not know
        # The last processes to exit, for a hit read after its process's exit: the consumer reads the
        # hits' ring before the lifecycle ring, and a hit committed between the two reads (a Sigkill at
        # exec, its process dead microseconds later) comes in the next drain, after the exit.
        self.exited: dict[int, Process] = {}
        self.parents_gone: dict[int, Process] = {}
        # Boot-clock ns -> wall-clock ns.
        self.boot_offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def __len__(self) -> int:
        return len(self.live)

    def exec_id(self, process: Process) -> str:
        return base64.b64encode(f"{self.node}:{process.ktime}:{process.pid}".encode()).decode()

    def get(self, pid: int) -> Process | None:
        return self.live.get(pid)

    def add(self, process: Process) -> Process:
        self.live.pop(process.pid, None)
        self.live[process.pid] = process
        if len(self.live) > self.limit:
            oldest = next(iter(self.live))
            del self.live[oldest]
            self.evicted += 1
        return process

    def parent_of(self, ppid: int, parent_ktime: int) -> Process | None:
        parent = self.live.get(ppid)
        if parent is None or (parent_ktime and parent.ktime != parent_ktime):
            gone = self.parents_gone.get(ppid)
            if gone is not None and gone.ktime == parent_ktime:
                return gone
            self.unknown_parents += 1
            return parent if parent is not None and not parent_ktime else None
        return parent

    def clone(self, pid: int, ppid: int, ktime: int, parent_ktime: int) -> Process:
        parent = self.parent_of(ppid, parent_ktime)
        if parent is None:
            return self.add(Process(pid, ktime, "", "", "", NO_ACCESS, (), 0, "clone", None, ppid, pid))
        return self.add(Process.forked(parent, pid, ktime, ppid))

    def exit(self, pid: int, children_left: bool = False) -> Process | None:
        process = self.live.pop(pid, None)
        if process is not None:
            exited = self.exited
            exited.pop(pid, None)
            exited[pid] = process
            if len(exited) > 2 * RECENT_EXITS:
                # The older half dropped at once: one at a time, each drop first walked past the
                # slots its predecessors had left (225 against 104 ns an exit).
                self.exited = dict(islice(exited.items(), RECENT_EXITS, None))
            if children_left:
                self._keep_as_parent(process)
        return process

    def keep_as_parent(self, pid: int) -> None:
        """The live process ``pid``, about to be replaced by its exec, kept for its forked children."""
        process = self.live.get(pid)
        if process is not None:
            self._keep_as_parent(process)

    def _keep_as_parent(self, process: Process) -> None:
        self.parents_gone.pop(process.pid, None)
        self.parents_gone[process.pid] = process
        if len(self.parents_gone) > PARENTS_GONE:
            del self.parents_gone[next(iter(self.parents_gone))]

    def get_or_exited(self, pid: int) -> Process | None:
        """The live process, or the last that exited with this pid (see ``exited``)."""
        return self.live.get(pid) or self.exited.get(pid)

    def ancestors(self, process: Process, limit: int = 32) -> Iterator[Process]:
        """Its parent's parent and up (the parent itself is reported on its own)."""
        current = process.parent.parent if process.parent else None
        for _ in range(limit):
            if current is None:
                return
            yield current
            current = current.parent

    # --- /proc ------------------------------------------------------------------------------------
    def seed(self, proc: Path = Path("/proc"), skip: set[int] | None = None) -> list[Process]:
        """Every process /proc lists, parents before children; returns those added."""
        found = []
        # One string per distinct command line, for the seed's time only: a pre-forked server's workers
        # (nginx's, php-fpm's) share their parent's, as clones do. One of its own per process, replaced
        # once its parent was known, was freed too late for its memory to be reused: 0.53 kB of RSS a
        # seeded process, of which 0.24 kB live (20,000 forked sleepers).
        command_lines: dict[str, str] = {}
        for entry in proc.iterdir():
            if not entry.name.isdigit() or (skip and int(entry.name) in skip):
                continue
            process = read_proc(entry)
            if process is not None:
                process.arguments = command_lines.setdefault(process.arguments, process.arguments)
                found.append(process)
        del command_lines
        found.sort(key=lambda p: p.ktime)
        added = []
        for process in found:
            if process.pid in self.live:
                continue  # the kernel told us of it since: that is newer
            parent = process.parent = self.live.get(process.ppid)
            if parent is not None:
                process.ppid = parent.pid  # one int object for both (28 bytes a process)
            added.append(self.add(process))
        return added


def read_proc(path: Path) -> Process | None:
    """One process from /proc/PID; None if it went away meanwhile."""
    try:
        stat = (path / "stat").read_text()
        status = (path / "status").read_text()
        cmdline = (path / "cmdline").read_bytes()
    except OSError:
        return None
    # The comm in stat may hold spaces and parentheses: the fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    ppid = int(fields[1])
    ktime = int(fields[19]) * (1_000_000_000 // CLOCK_TICKS)
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        values[key] = rest.split()
    if "Tgid" not in values or values["Tgid"][0] != path.name:
        return None
    pid = int(path.name)
    uid, euid, suid, fsuid = (int(v) for v in values["Uid"])
    gid, egid, sgid, fsgid = (int(v) for v in values["Gid"])
    caps = tuple(int(values[k][0], 16) for k in ("CapEff", "CapPrm", "CapInh"))
    try:
        loginuid = int((path / "loginuid").read_text())
    except (OSError, ValueError):
        loginuid = 0xFFFFFFFF
    binary = _readlink(path / "exe")
    cwd = _readlink(path / "cwd")
    ns = tuple(_ns_inode(path, name) for name in NS_NAMES)
    arguments = join_arguments([a.decode(errors="replace") for a in cmdline.split(b"\0")[:-1]])
    try:
        cgroup_id = _cgroup2_id(path)
    except OSError:
        cgroup_id = 0
    flags = "procFS" + (" rootcwd" if cwd == "/" else "")
    return Process(
        pid,
        ktime,
        intern(binary),
        arguments,
        intern(cwd),
        intern(((uid, euid, suid, fsuid, gid, egid, sgid, fsgid, loginuid, 0), caps)),
        intern(ns),
        cgroup_id,
        flags,
        None,
        ppid,
        pid,
    )


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path).removesuffix(" (deleted)")
    except OSError:
        return ""


def _ns_inode(path: Path, name: str) -> int:
    try:
        return os.stat(path / "ns" / name).st_ino
    except OSError:
        return 0


_cgroup_ids: dict[str, int] = {}


def _cgroup2_id(path: Path) -> int:
    """The cgroup v2 id of a process: the inode of its cgroup2 directory."""
    from bpfscope.sources.cgroups import cgroup2_mounts

    for line in (path / "cgroup").read_text().splitlines():
        if line.startswith("0::"):
            relative = line[3:]
            if relative not in _cgroup_ids:
                if len(_cgroup_ids) >= MAX_INTERNED:  # a cgroup made and removed per job: bounded too
                    _cgroup_ids.clear()
                mounts = cgroup2_mounts()
                _cgroup_ids[relative] = os.stat(f"{mounts[0]}{relative}").st_ino if mounts else 0
            return _cgroup_ids[relative]
    return 0
