"""The scheduler: where threads' time goes, state by state (tsa.bpf.c: on a CPU, in the run queue, blocked
on the disk, the network, a lock), per component (components.py: cgroups, containers, processes)."""

TOOLS = {
    "tsa": "Thread states per component: CPU, run queue, disk read/write, network, lock, other.",
}
