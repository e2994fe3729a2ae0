"""Block I/O: requests from the block tracepoints (block.bpf.h), disks and their queues (disks.py),
/proc/diskstats and I/O pressure."""

TOOLS = {
    "biosnoop": "Each block I/O: process, disk, op, sector, size, latency.",
    "biolatency": "Block I/O latency histograms and p50/p99, per disk or op.",
    "biotop": "Top processes by block I/O: counts, kB, average and p99 latency.",
    "iostat": "iostat -x per disk with queue depth, p50/p99 latency, top process.",
}
RULES = [(30, "health:DiskRule"), (70, "health:IoPressureRule")]
