"""The machine: what its kernel can do (doctor), CPU and memory."""

TOOLS = {
    "doctor": "What this kernel can do, found by trying it.",
}
RULES = [(10, "health:CpuRule"), (20, "health:MemoryRule")]
