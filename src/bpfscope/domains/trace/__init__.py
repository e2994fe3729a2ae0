"""One-liners on any tracepoint: a precompiled program configured from the tracepoint's format."""

TOOLS = {
    "trace": "One-liners on any tracepoint: count, sum, histogram, print; kernel filters.",
}
