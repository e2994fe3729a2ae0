"""Profiling: on-CPU stacks sampled on every CPU (profile) and off-CPU time per stack (offcputime),
with the symbolisers (symbols.py), the
profile model and its records (profiles.py), and its formats (formats.py, flamegraph.py)."""

TOOLS = {
    "profile": "Where the CPU goes: stacks sampled on every CPU, flame graphs, pprof.",
    "offcputime": "Where threads wait: time blocked per stack, flame graphs, pprof.",
}
