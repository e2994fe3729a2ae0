"""The ``bpfscope`` command. Tools are imported only when run, so start-up stays short."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from bpfscope.cli import registry
from bpfscope.errors import BpfscopeError


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(registry.tools())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return registry.command(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Tools"):
            formatter.write_dl([(name, entry.summary) for name, entry in sorted(registry.tools().items())])


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Every tool: bpfscope TOOL [-p PID] [--cgroup PATH] [--json] [--duration S] [interval [count]]",
)
@click.version_option(package_name="bpfscope")
def cli() -> None:
    """bpfscope: disk, network, page cache and process behaviour from eBPF tracepoints."""


class Stop(Exception):
    """Raised from SIGTERM outside a session, so that every context manager closes on the way out.
    (While a session runs, SIGINT and SIGTERM only set its stop token: runtime/session.py.)"""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stop()


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C (or kill -INT) must still end a run.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> Any:
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
    except (KeyboardInterrupt, Stop):
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
