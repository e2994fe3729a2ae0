"""Health: verdicts against stated thresholds (verdict.py), the rule contract (rule.py) and the window
that runs the domains' rules over the same collectors as the tools (window.py); ``bpfscope check``
(check.py) shows the result."""

TOOLS = {
    "check": "Which resource is the problem? A verdict per resource over a window; exit 1 if one is.",
}
