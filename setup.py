"""Compile the BPF programs as part of the package build; metadata lives in pyproject.toml."""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _load_builder():
    path = Path(__file__).resolve().parent / "src" / "bpfscope" / "build.py"
    spec = importlib.util.spec_from_file_location("bpfscope_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithBpf(build_py):
    def run(self):
        builder = _load_builder()
        try:
            builder.build_all()
        except builder.BuildError as exc:
            sys.exit(f"error: {exc}")
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
