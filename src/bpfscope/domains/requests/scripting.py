"""PxL-style scripts for ``bpfscope query --script``: a file, or a ready one shipped in scripts/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpfscope.domains.requests import pxl
from bpfscope.errors import BpfscopeError

READY = Path(__file__).with_name("scripts")


def ready_scripts() -> dict[str, str]:
    """Name -> the first line of its comment."""
    out = {}
    for path in sorted(READY.glob("*.py")):
        if path.name != "__init__.py":
            first = path.read_text().splitlines()[0]
            out[path.stem] = first.lstrip("# ")
    return out


def run(script: str, store: Any) -> list[tuple[str, list[str], list[tuple]]]:
    """Run a script file (or a ready script's name) against a store; its displays, in order."""
    path = Path(script)
    if not path.is_file():
        path = READY / f"{script}.py"
        if script not in ready_scripts():
            raise BpfscopeError(
                f"no script {script!r}", hint=f"a file, or one of: {', '.join(ready_scripts())}"
            )
    return pxl.run_script(path.read_text(), store, str(path))
