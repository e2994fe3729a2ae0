"""The always-on agent: the check's health collectors, the profiler, the security policy and the request
tracer in one session (service.py), configured in YAML (config.py), recording into the embedded store,
exporting to Prometheus, OTLP and a profile ingester, and serving a read-only web UI (web.py).
``bpfscope query`` reads the store, also while the agent writes.

Like a domain's, this ``__init__`` is a manifest and imports nothing.
"""

TOOLS = {
    "agent": "Always on: health, profiles, security, requests into the store; web UI, /metrics, OTLP.",
    "query": "SQL over the agent's store (tables of records), also while the agent writes.",
}
