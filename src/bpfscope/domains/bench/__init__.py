"""I/O-aware benchmarking: requests joined across components (spans.py, tree.py) and split by what their
threads did (timeline.py, from the sched domain's tsa), the bottleneck and what removing it would cost
(advice.py, prices.json), checked by replaying with the change emulated (limits.py)."""

TOOLS = {
    "bench": "Where each ms of a request goes, per component: CPU, run queue, disk, network; advice.",
}
