"""What the file tools share on the user-space side: files as the kernel names them (a superblock's
device number and an inode), and the syscall tracepoints vfsstat and filetop attach to.

The BPF side is ``vfs.bpf.h`` (a descriptor's struct file) and ``cache.bpf.h`` (a mapping's file).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bpfscope.engine import system

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject

# include/linux/kdev_t.h: inside the kernel a dev_t is major << MINORBITS | minor (a #define, not in BTF).
MINORBITS = 20
MINORMASK = (1 << MINORBITS) - 1


def dev_text(dev: int) -> str:
    """An st_dev as ``major:minor``, as mountinfo and ``stat -c %Hd:%Ld`` show it."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def st_dev(s_dev: int) -> int:
    """A superblock's s_dev, as the kernel keeps it, as os.stat's st_dev."""
    return os.makedev(s_dev >> MINORBITS, s_dev & MINORMASK)


def present_tracepoints_only(obj: BpfObject) -> None:
    """Load only the programs whose syscall tracepoint this kernel has: arm64 has no open, creat or
    unlink (only their *at forms), and a kernel may lack a recent syscall such as openat2."""
    # A kernel without syscall tracepoints (CONFIG_FTRACE_SYSCALLS off) gets the one-line error here.
    system.require_tracepoint("syscalls", "sys_enter_read")
    have = system.tracepoints()
    for program in obj.programs.values():
        kind, _, target = program.section.partition("/")
        if kind == "tracepoint":
            program.autoload = target.replace("/", ":", 1) in have
