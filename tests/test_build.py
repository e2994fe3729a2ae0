"""The package build: BPF objects compile, and a missing tool or header names its Debian package."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpfscope import build


def test_every_tool_has_a_compiled_object() -> None:
    sources = sorted(build.DOMAINS_DIR.glob("*/*.bpf.c"))
    assert sources
    for source in sources:
        obj = source.with_suffix(".o")
        assert obj.exists(), f"{obj.name} was not built"
        assert obj.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize(("tool", "package"), [("clang", "clang"), ("bpftool", "bpftool")])
def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tool: str, package: str) -> None:
    real_which = build.shutil.which
    monkeypatch.setattr(
        build.shutil, "which", lambda name, path=None: None if name == tool else real_which(name)
    )
    with pytest.raises(build.BuildError, match=f"apt-get install {package}"):
        build.check_requirements()


def test_missing_libbpf_headers_name_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "_LIBBPF_HEADER", tmp_path / "bpf_helpers.h")
    with pytest.raises(build.BuildError, match="apt-get install libbpf-dev"):
        build.check_requirements()


def test_compile_error_shows_clang_output(tmp_path: Path) -> None:
    source = tmp_path / "broken.bpf.c"
    source.write_text('#include "vmlinux.h"\nint f(void) { return undefined_symbol; }\n')
    with pytest.raises(build.BuildError, match="undefined_symbol"):
        build.compile_bpf(source, tmp_path / "broken.bpf.o")
