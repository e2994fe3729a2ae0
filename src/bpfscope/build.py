"""Compile the BPF programs (``*.bpf.c``) into CO-RE objects.

Used by the package build (setup.py) and by the tests for their own test programs. It runs on the build
machine only: bpfscope never compiles at run time.

vmlinux.h is generated here from the build machine's kernel BTF rather than committed. Every machine that
runs bpfscope needs kernel BTF anyway (CO-RE relocations are resolved against it at load time), so the
build host has it; a committed header would be megabytes of one kernel's types in every diff, and CO-RE
makes the object independent of which kernel's header it was compiled against.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
DOMAINS_DIR = PACKAGE_DIR / "domains"
KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")

# Debian package that provides each build requirement, for the error message.
_REQUIREMENTS = {
    "clang": ("clang", "clang"),
    "bpftool": ("bpftool", "bpftool"),
}
_LIBBPF_HEADER = Path("/usr/include/bpf/bpf_helpers.h")

_TARGET_ARCH = {
    "x86_64": "x86",
    "aarch64": "arm64",
    "ppc64le": "powerpc",
    "s390x": "s390",
    "riscv64": "riscv",
}


class BuildError(RuntimeError):
    pass


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        binary, package = _REQUIREMENTS[name]
        raise BuildError(f"building bpfscope needs {binary}: install it with `apt-get install {package}`")
    return path


def check_requirements() -> None:
    for name in _REQUIREMENTS:
        _tool(name)
    if not _LIBBPF_HEADER.exists():
        raise BuildError(f"building bpfscope needs {_LIBBPF_HEADER}: `apt-get install libbpf-dev`")
    if not KERNEL_BTF.exists():
        raise BuildError(f"building bpfscope needs kernel BTF at {KERNEL_BTF} (CONFIG_DEBUG_INFO_BTF=y)")


def vmlinux_header(include_dir: Path = INCLUDE_DIR) -> Path:
    """Generate vmlinux.h from the running kernel's BTF, once per build tree."""
    header = include_dir / "vmlinux.h"
    if header.exists() and header.stat().st_size > 0:
        return header
    check_requirements()
    dump = subprocess.run(
        [_tool("bpftool"), "btf", "dump", "file", str(KERNEL_BTF), "format", "c"],
        check=True,
        capture_output=True,
    )
    tmp = header.with_suffix(".h.tmp")
    tmp.write_bytes(dump.stdout)
    os.replace(tmp, header)
    return header


def compile_bpf(source: Path, output: Path | None = None, include_dirs: tuple[Path, ...] = ()) -> Path:
    """Compile one ``name.bpf.c`` into ``name.bpf.o`` (skipped when the object is newer than its inputs)."""
    check_requirements()
    output = output or source.with_suffix(".o")
    header = vmlinux_header()
    # A domain's own headers (block.bpf.h, net.bpf.h, ...) sit beside its programs.
    inputs = [source, header, *INCLUDE_DIR.glob("*.h"), *source.parent.glob("*.h")]
    if output.exists() and all(output.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        return output
    arch = _TARGET_ARCH.get(platform.machine(), platform.machine())
    cmd = [
        _tool("clang"),
        "-g",
        "-O2",
        "-target",
        "bpf",
        f"-D__TARGET_ARCH_{arch}",
        "-Wall",
        "-Werror",
        f"-I{INCLUDE_DIR}",
        f"-I{source.parent}",
        *(f"-I{d}" for d in include_dirs),
        "-c",
        str(source),
        "-o",
        str(output),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"clang failed on {source.name}:\n{result.stderr}")
    return output


def build_all() -> list[Path]:
    return [compile_bpf(src) for src in sorted(DOMAINS_DIR.glob("*/*.bpf.c"))]


if __name__ == "__main__":
    try:
        for obj in build_all():
            print(f"built {obj.name}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
