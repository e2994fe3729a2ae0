"""Runtime security: process lineage, file and network audit, policies filtered in the kernel, and
enforcement, on tracepoints and cgroup hooks."""

TOOLS = {
    "secure": "Security events with process lineage; TracingPolicy filters and enforcement in the kernel.",
}
