/* A set of processes and cgroups to watch, beside the task filter (-p, --cgroup): bench's components
 * and its workload. Each process or cgroup in the set maps to its component's index.
 *
 * The maps can be one for several objects (Map.reuse before loading): tsa keeps them, adding the
 * processes that processes of the set fork, and the request tracer reads the same ones, so that both
 * watch the same tasks from the first call of a new process. Include after bpfscope.bpf.h.
 */
#ifndef BPFSCOPE_TASKSET_BPF_H
#define BPFSCOPE_TASKSET_BPF_H

#define BS_TASKSET_CGROUPS 256
#define BS_TASKSET_TGIDS 32768

/* Set from user space: only the tasks of the set are watched. */
const volatile bool bs_by_set = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_TASKSET_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
} bs_set_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_TASKSET_TGIDS);
	__type(key, __u32);
	__type(value, __u32);
} bs_set_tgids SEC(".maps");

static __always_inline bool bs_in_set(__u32 tgid, __u64 cgroup)
{
	if (!bs_by_set)
		return true;
	return bpf_map_lookup_elem(&bs_set_tgids, &tgid) || bpf_map_lookup_elem(&bs_set_cgroups, &cgroup);
}

/* The current task, in the set. */
static __always_inline bool bs_current_in_set(void)
{
	if (!bs_by_set)
		return true;
	return bs_in_set(bpf_get_current_pid_tgid() >> 32, bpf_get_current_cgroup_id());
}

#endif
