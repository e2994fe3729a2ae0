"""bpfscope agent: the health check, the profiler, the security policy and the request tracer, always on,
into the store, with the web UI, /metrics and the exporters (service.py runs it)."""

from __future__ import annotations

import click

from bpfscope.agent.config import DEFAULT_LISTEN, DEFAULT_STORE, load_config
from bpfscope.sinks.terminal import note

EXAMPLES = f"""
\b
Examples:
  bpfscope agent                                  # every default; UI at http://{DEFAULT_LISTEN}/
  bpfscope agent --config /etc/bpfscope/agent.yaml
  bpfscope agent --store /var/tmp/store --listen 127.0.0.1:0   # a free port, printed at start
  bpfscope agent --print-config > agent.yaml      # the defaults, to edit
  kill -HUP $(pidof -s bpfscope)                  # reload the configuration, nothing lost
  bpfscope query 'SELECT resource, metric, verdict FROM "check.row" ORDER BY ts DESC LIMIT 10'
"""

DEFAULT_CONFIG = f"""\
# bpfscope agent: every key is optional; these are the defaults.
listen: {DEFAULT_LISTEN}        # UI, API and /metrics; off loopback, token_file is required
token_file: null                # a file holding the bearer token clients send
node: null                      # the node's name (default: the host name)
store:
  path: {DEFAULT_STORE}
  flush: 10s                    # kill -9 loses at most this much
  keep: 7d
  max_size: 2GB
collectors:
  health: {{enabled: true, interval: 10s}}      # every rule of bpfscope check, window after window
  profile: {{enabled: true, frequency: 19, interval: 10s, unwind: fp}}   # dwarf: code without frame pointers
  offcpu: {{enabled: false, interval: 10s}}
  security: {{enabled: true, default_policy: true, policies: [], exec_events: true, ring_size: 8MB}}
  requests: {{enabled: true, redact: true, capture_bytes: 4096, tls: true}}
exporters:
  prometheus: {{enabled: true, max_series: 2000}}   # /metrics on the listen address
  otlp: {{enabled: false, endpoint: "http://127.0.0.1:4318", headers: {{}}, interval: 10s}}
  profiles: {{enabled: false, endpoint: "http://127.0.0.1:4040", kind: pyroscope, headers: {{}}}}
ui:
  enabled: true
"""


@click.command(name="agent", epilog=EXAMPLES)
@click.option("--config", "config_path", metavar="FILE", help="The YAML configuration (--print-config).")
@click.option("--store", metavar="DIR", help=f"The store's directory (default {DEFAULT_STORE}).")
@click.option(
    "--listen", metavar="ADDR:PORT", help=f"Serve the UI, API and /metrics here ({DEFAULT_LISTEN})."
)
@click.option("--print-config", is_flag=True, help="Print the default configuration and exit.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Also print every record as JSON lines on stdout.")
def command(
    config_path: str | None,
    store: str | None,
    listen: str | None,
    print_config: bool,
    duration: float | None,
    as_json: bool,
) -> None:
    """Run bpfscope always on: the check's health rules window after window, the on-CPU profiler at
    19 Hz, the security policy and the request tracer, each switchable in the YAML configuration, in one
    process. Everything goes into the store (Parquet by hour, kept by age and size, safe under kill -9),
    which bpfscope query reads while the agent writes. A web UI, the JSON API and Prometheus /metrics are
    served on 127.0.0.1 unless --listen says otherwise (off loopback a bearer token is required); OTLP
    and profile pushes are switched on in the configuration. A collector that fails is reported and
    opened again with back-off while the others run; SIGHUP reloads the configuration.
    """
    if print_config:
        click.echo(DEFAULT_CONFIG, nl=False)
        return
    from bpfscope.agent.service import Agent

    config = load_config(config_path, store=store, listen=listen)
    agent = Agent(config, config_path, {"store": store, "listen": listen}, json_out=as_json)

    def ready(agent: Agent) -> None:
        where = f"; UI and API at {agent.address}/" if agent.address else ""
        note(f"Watching: {', '.join(agent.collectors) or 'nothing'} into {config.store.path}{where}")

    agent.run(duration, ready)
    note(f"agent: {agent.summary()}")


def __getattr__(name: str) -> object:
    """``SCHEMAS``: every kind of record the agent writes (computed on demand: it imports the domains)."""
    if name == "SCHEMAS":
        from bpfscope.agent import components
        from bpfscope.agent.config import AgentConfig
        from bpfscope.agent.service import AGENT_SCHEMAS

        return (*components.schemas(components.build(AgentConfig())[0]), *AGENT_SCHEMAS)
    raise AttributeError(name)
