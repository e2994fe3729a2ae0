"""Verdicts: a metric's value against stated thresholds, as rows, and the report of a window.

A :class:`Row` is one metric of one resource: its value, a verdict (ok, warn, PROBLEM) against a
threshold stated on the row, and the context that explains it. A :class:`Report` is a window's rows; its
summary names the resource at fault (causes before symptoms), or says that none was found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from bpfscope.runtime.schema import Field, Schema


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    PROBLEM = "PROBLEM"
    UNKNOWN = "n/a"  # the rule could not run here (the row says why)


SEVERITY = {Verdict.UNKNOWN: 0, Verdict.OK: 0, Verdict.WARN: 1, Verdict.PROBLEM: 2}


def num(v: float) -> str:
    return f"{v:g}" if v < 1e6 else f"{v:.3g}"


def pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def ms(us: float | None) -> str:
    """Microseconds for people: ``500 ms``, ``2.50 ms``, ``90 us``."""
    if us is None:
        return "-"
    m = us / 1000
    return f"{m:.0f} ms" if m >= 10 else f"{m:.2f} ms" if m >= 0.1 else f"{us:.0f} us"


@dataclass(frozen=True)
class Threshold:
    """warn and PROBLEM levels of a metric where higher is worse."""

    warn: float
    problem: float
    unit: str

    def judge(self, value: float | None) -> Verdict:
        if value is None:
            return Verdict.OK
        if value >= self.problem:
            return Verdict.PROBLEM
        if value >= self.warn:
            return Verdict.WARN
        return Verdict.OK

    def describe(self) -> str:
        return f"warn >= {num(self.warn)}{self.unit}, PROBLEM >= {num(self.problem)}{self.unit}"


ROW_SCHEMA = Schema(
    "check.row",
    (
        Field("name", "str", label=True, doc="resource and metric"),
        Field("resource", "str", label=True, doc="CPU, RAM, Disk vda, Page cache, TCP, ..."),
        Field("metric", "str", label=True, doc="busy, used, p99, hit ratio, ..."),
        Field("value", "float", doc="in unit; null when there is nothing to measure", nullable=True),
        Field("unit", "str"),
        Field("text", "str", doc="the value for people"),
        Field("verdict", "enum", values=tuple(v.value for v in Verdict)),
        Field("threshold", "str", doc="the rule behind the verdict"),
        Field("detail", "str", doc="context that explains the value"),
        Field("symptom", "bool", doc="points at a cause elsewhere (I/O pressure)"),
    ),
    doc="One metric of one resource over the check's window, with its verdict.",
)
SUMMARY_SCHEMA = Schema(
    "check.summary",
    (
        Field("summary", "str", doc="the resource at fault, or that no problem was found"),
        Field("problem", "bool"),
        Field("window_s", "float", "s"),
        Field("exit_code", "int"),
    ),
    doc="The check's last line.",
)


@dataclass
class Row:
    resource: str  # "CPU", "RAM", "Disk vda", "PSI io"
    metric: str  # "busy", "p99", ...
    value: float | None  # in ``unit``; None when there is nothing to measure (an idle disk's latency)
    unit: str
    text: str  # value for people
    verdict: Verdict
    threshold: str  # the rule behind the verdict
    detail: str = ""  # context that explains the value
    # A symptom (I/O pressure) points at a cause elsewhere; the summary names causes first.
    symptom: bool = False

    @property
    def name(self) -> str:
        return f"{self.resource} {self.metric}".strip()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict.value, "name": self.name}

    def record(self, ts: float) -> dict[str, Any]:
        values = self.to_dict()
        if values["value"] is not None:
            values["value"] = float(values["value"])
        return ROW_SCHEMA.record({"ts": ts, **values})

    @classmethod
    def unknown(cls, resource: str, why: str) -> Row:
        """A rule that could not run here."""
        return cls(resource, "", None, "", "-", Verdict.UNKNOWN, "cannot run here", why)


@dataclass
class Report:
    rows: list[Row]
    window_s: float

    @property
    def problem(self) -> bool:
        return any(r.verdict is Verdict.PROBLEM for r in self.rows)

    def exit_code(self) -> int:
        return 1 if self.problem else 0

    def summary(self, details: bool = True) -> str:
        """One line: the resource at fault (causes before symptoms), or that none was found. Without
        ``details`` the rows it names are not explained (the compact view has their details above)."""

        def why(row: Row) -> str:
            return f" ({row.detail})" if details and row.detail else ""

        bad = [r for r in self.rows if r.verdict is Verdict.PROBLEM]
        if not bad:
            warned = [r.name for r in self.rows if r.verdict is Verdict.WARN]
            return "no problem found" + (f" (warnings: {', '.join(warned)})" if warned else "")
        causes = [r for r in bad if not r.symptom]
        symptoms = [r for r in bad if r.symptom]
        if not causes:
            worst = symptoms[0]
            # Nothing is past its PROBLEM level, but what warns (a page cache that misses, a busy disk)
            # adds up to the stall: name it rather than guess at causes out of sight.
            suspects = [r for r in self.rows if r.verdict is Verdict.WARN and not r.symptom]
            if suspects:
                return f"PROBLEM: {worst.name} {worst.text}; nothing else past its PROBLEM level, but " + (
                    ", ".join(f"{r.name} {r.text} warns{why(r)}" for r in suspects)
                )
            return (
                f"PROBLEM: {worst.name} {worst.text}, but no disk is slow: tasks wait on I/O elsewhere "
                "(an I/O throttle such as io.max or blkio.throttle, network storage, or swap)"
            )
        parts = []
        for resource in dict.fromkeys(r.resource for r in causes):
            # The resource's first PROBLEM row: rules put the telling metric first.
            lead = next(r for r in causes if r.resource == resource)
            parts.append(f"{lead.name} {lead.text}{why(lead)}")
        line = "PROBLEM: " + ", ".join(parts)
        if symptoms:
            line += "; " + ", ".join(f"{s.name} {s.text}" for s in symptoms)
        return line

    def records(self, ts: float) -> list[dict[str, Any]]:
        """The rows, then the summary, as ``bpfscope check --json`` prints them."""
        summary = SUMMARY_SCHEMA.record(
            {
                "ts": ts,
                "summary": self.summary(),
                "problem": self.problem,
                "window_s": round(self.window_s, 3),
                "exit_code": self.exit_code(),
            }
        )
        return [*(row.record(ts) for row in self.rows), summary]
