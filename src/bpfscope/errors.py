"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class BpfscopeError(Exception):
    """A problem the user can fix: ``str()`` is the one-line message, ``hint`` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        # Extra lines shown under the message (e.g. the verifier's last lines); never a traceback.
        self.details = details

    def render(self) -> str:
        text = f"bpfscope: error: {self}"
        if self.hint:
            text += f" ({self.hint})"
        if self.details:
            text += "\n" + self.details
        return text


class MissingCapability(BpfscopeError):
    """The kernel or machine lacks something a tool declared it needs."""
