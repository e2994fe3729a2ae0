"""The ``bpfscope`` command. Tools are imported only when run, so start-up stays short."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from bpfscope.errors import BpfscopeError

# name -> (module, one-line summary shown by `bpfscope --help`)
TOOLS: dict[str, tuple[str, str]] = {
    "doctor": ("bpfscope.tools.doctor", "What this kernel can do, found by trying it."),
    "syscount": ("bpfscope.tools.syscount", "Syscall counts and latency percentiles, by syscall or process."),
    "execsnoop": ("bpfscope.tools.execsnoop", "New processes as they start (and exit, with --exits)."),
    "biosnoop": ("bpfscope.tools.biosnoop", "Each block I/O: process, disk, op, sector, size, latency."),
    "biolatency": ("bpfscope.tools.biolatency", "Block I/O latency histograms and p50/p99, per disk or op."),
    "biotop": ("bpfscope.tools.biotop", "Top processes by block I/O: counts, kB, average and p99 latency."),
    "iostat": ("bpfscope.tools.iostat", "iostat -x per disk with queue depth, p50/p99 latency, top process."),
    "tcptop": ("bpfscope.tools.tcptop", "Top TCP connections by throughput: process, addresses, rx/tx kB."),
    "tcpretrans": (
        "bpfscope.tools.tcpretrans",
        "Each TCP retransmit (timeout, fast, TLP, SYN), or counts and % per connection.",
    ),
    "tcplife": ("bpfscope.tools.tcplife", "Each closed TCP connection: process, addresses, bytes, duration."),
    "tcpconn": ("bpfscope.tools.tcpconn", "TCP connects, accepts and failures, by process and remote."),
    "sockstat": (
        "bpfscope.tools.sockstat",
        "Socket queues against their buffers (saturation %), buffer-full events.",
    ),
    "cachestat": ("bpfscope.tools.cachestat", "Page-cache lookups, hits, misses, hit ratio, dirtied pages."),
    "cachetop": ("bpfscope.tools.cachetop", "Files and processes that miss the page cache most, with paths."),
    "fincore": ("bpfscope.tools.fincore", "How much of each file is in the page cache, and dirty."),
    "vfsstat": ("bpfscope.tools.vfsstat", "VFS reads, writes, opens, creates, fsyncs per second."),
    "filetop": ("bpfscope.tools.filetop", "Top files by bytes read and written, with process and path."),
    "writeback": ("bpfscope.tools.writeback", "Dirty and writeback pages, flushes, pages per flush, reason."),
    "check": ("bpfscope.check", "Is CPU, RAM or a disk the problem? Verdicts over a window, exit 1 if so."),
    "trace": (
        "bpfscope.tools.trace",
        "One-liners on any tracepoint: count, sum, histogram, print; kernel filters.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(TOOLS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in TOOLS:
            return None
        return importlib.import_module(TOOLS[name][0]).command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Tools"):
            formatter.write_dl([(name, summary) for name, (_, summary) in sorted(TOOLS.items())])


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Every tool: bpfscope TOOL [-p PID] [--cgroup PATH] [--json] [--duration S] [interval [count]]",
)
@click.version_option(package_name="bpfscope")
def cli() -> None:
    """bpfscope: disk, network, page cache and process behaviour from eBPF tracepoints."""


def main(argv: list[str] | None = None) -> Any:
    from bpfscope.core.tool import install_signal_handlers

    install_signal_handlers()
    try:
        return cli.main(args=argv, prog_name="bpfscope", standalone_mode=False)
    except BpfscopeError as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        # One line, like every other bad input; the command's --help has the rest.
        command = exc.ctx.command_path if exc.ctx else "bpfscope"
        print(f"bpfscope: error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        print(f"bpfscope: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        # A bug, not bad input: one line by default, the traceback on request.
        if os.environ.get("BPFSCOPE_DEBUG"):
            raise
        print(
            f"bpfscope: internal error: {type(exc).__name__}: {exc} (BPFSCOPE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
