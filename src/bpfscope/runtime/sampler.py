"""What the samplers behind interval tools and ``bpfscope check`` share.

A sampler owns one BPF object and returns, at each ``sample()``, what happened since the previous one;
its counters are dataclasses of integers that subtract and add field by field (:class:`Counts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from bpfscope.runtime.counts import Counts  # noqa: F401  (legacy import path)

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject


class Sampler:
    """One BPF object, closed with the sampler, and the one-line loss summary from its .bss counters."""

    obj: BpfObject

    def sample(self) -> Any:
        """What happened since the previous sample."""
        raise NotImplementedError

    def losses(self, counters: dict[str, str]) -> str:
        """``counters``: .bss counter -> what its count means, shown when it is not zero."""
        lost = [f"{self.obj.bss[name]} {what}" for name, what in counters.items() if self.obj.bss[name]]
        return "; ".join([self.obj.losses(), *lost])

    def close(self) -> None:
        self.obj.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


