"""Names for the numbers the kernel reports: syscalls."""

from __future__ import annotations

import platform
import re
from functools import cache
from pathlib import Path

_UNISTD = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
}


@cache
def syscall_names() -> dict[int, str]:
    """Syscall number -> name for this architecture, from the kernel UAPI header (linux-libc-dev)."""
    path = Path(_UNISTD.get(platform.machine(), ""))
    if not path.is_file():
        return {}
    names = {}
    for match in re.finditer(r"^#define __NR_(\w+)\s+(\d+)\s*$", path.read_text(), re.MULTILINE):
        names[int(match.group(2))] = match.group(1)
    return names


def syscall_name(nr: int) -> str:
    return syscall_names().get(nr, f"syscall_{nr}")


def syscall_number(name: str) -> int | None:
    for nr, known in syscall_names().items():
        if known == name:
            return nr
    return int(name[8:]) if name.startswith("syscall_") and name[8:].isdigit() else None
