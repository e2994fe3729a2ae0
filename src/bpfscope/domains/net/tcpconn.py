"""bpfscope tcpconn: TCP connects, accepts and failures (refused, timed out, reset), one line each or
counted per process, remote address and outcome with their rate per second (-c).

See tcpconn.bpf.c for what each kind means and where it is seen.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

import click

from bpfscope.cli.tool import RunOptions, ticks, tool_options
from bpfscope.domains.net import conn as net
from bpfscope.engine.bpf import BpfObject, require, tool_object
from bpfscope.runtime.stream import stream_events

if TYPE_CHECKING:
    import numpy as np

REQUIRES = ("raw_tracepoint", "ringbuf", "tracepoint")
# enum kind in tcpconn.bpf.c, in order.
KINDS = ("connect", "accept", "fail", "reset")


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err)) if err else ""


class Formatter(net.EventLines):
    columns = f"{'KIND':<8} ERROR"

    def fields(self, e: np.ndarray) -> tuple[dict[str, object], str]:
        kind, err = KINDS[int(e["kind"])], int(e["err"])
        return {"kind": kind, "errno": err, "error": errno_name(err)}, f"{kind.upper():<8} {errno_name(err)}"


class ConnCounts:
    """Counts per (process, kind, error, remote address) since the previous call."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.before: dict[bytes, int] = {}

    def interval(self) -> list[dict[str, object]]:
        keys, values = self.obj.maps["counts"].items()
        out = []
        now = {}
        for k, v in zip(keys, values, strict=True):
            raw = k.tobytes()
            now[raw] = int(v)
            n = int(v) - self.before.get(raw, 0)
            if n:
                out.append(
                    {
                        **net.Owner.from_record(k["owner"]).to_dict(),
                        "kind": KINDS[int(k["kind"])],
                        "error": errno_name(int(k["err"])),
                        "daddr": net.address(int(k["family"]), k["raddr"]),
                        "count": n,
                    }
                )
        self.before = now
        return out


def show_counts(opts: RunOptions, rows: list[dict[str, object]], elapsed: float, seconds: float) -> None:
    out = opts.output
    rows.sort(key=lambda r: r["count"], reverse=True)  # type: ignore[arg-type, return-value]
    for r in rows:
        r["per_s"] = round(r["count"] / max(seconds, 1e-9), 2)  # type: ignore[operator]
    if opts.as_json:
        for r in rows:
            out.record({"interval": round(elapsed, 3), **r})
        return
    out.heading(f"{elapsed:.1f}s  TCP connections over {seconds:.1f}s")
    if not rows:
        out.line("no TCP connection opened or failed")
        return
    columns = ["pid", "comm", "kind", "error", "daddr", "count", "per_s"]
    out.table(
        ["PID", "COMM", "KIND", "ERROR", "RADDR", "COUNT", "/s"], [[r[c] for c in columns] for r in rows]
    )


EXAMPLES = """
\b
Examples:
  bpfscope tcpconn                  # each connect, accept and failure until Ctrl-C
  bpfscope tcpconn -c 5             # counts and rates per process and remote, every 5 seconds
  bpfscope tcpconn -D 5432 --json   # connections to remote port 5432, JSON lines
"""


@click.command(name="tcpconn", epilog=EXAMPLES)
@click.option("-c", "--count", "count_mode", is_flag=True, help="Count per process, outcome and remote.")
@net.port_options
@tool_options
def command(opts: RunOptions, count_mode: bool, lport: int | None, dport: int | None) -> None:
    """TCP connection opens and failures: CONNECT (active open done), ACCEPT, FAIL (connect failed, with
    its errno: ECONNREFUSED, ETIMEDOUT, ...) and RESET (RST on an open connection).

    The process is the one that called connect() or accept(); -p and --cgroup select by it. With -c,
    counts per process, kind, error and remote address, and their rate per second, per interval.
    """
    rodata = {**opts.filters(), **net.port_filters(lport, dport), "count_mode": count_mode}
    require(*REQUIRES)
    with BpfObject(tool_object("tcpconn"), rodata=rodata) as obj:
        obj.attach()
        if count_mode:
            counter = ConnCounts(obj)
            last = 0.0
            for elapsed in ticks(opts, "Tracing TCP connections... Ctrl-C to end."):
                show_counts(opts, counter.interval(), elapsed, elapsed - last)
                last = elapsed
        else:
            fmt = Formatter(opts.as_json, time.monotonic_ns())
            stream_events(
                "tcpconn",
                "TCP connections",
                obj,
                {"events": obj.ring_buffer("events")},
                lambda ring, batch: fmt.lines(batch),
                opts,
                header=fmt.header(),
            )
        dropped = int(obj.bss["rows_dropped"])
        notes = [obj.losses()] if count_mode else []  # the stream's own summary has said it otherwise
        if dropped:
            notes.append(f"{dropped} not counted (too many rows)")
        if notes:
            opts.output.note("tcpconn: " + "; ".join(notes))
