"""System calls: counts, failures and latency."""

TOOLS = {
    "syscount": "Syscall counts and latency percentiles, by syscall or process.",
}
