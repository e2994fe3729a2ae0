"""Processes: execs and exits."""

TOOLS = {
    "execsnoop": "New processes as they start (and exit, with --exits).",
}
