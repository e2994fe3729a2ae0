/* syscount: system calls counted in the kernel, by syscall or by process, from the raw_syscalls
 * tracepoints; with latency, a log-linear histogram per key gives percentiles. Counters only grow: user
 * space shows each interval's difference, so nothing falls between two reads. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_KEYS 1024

const volatile bool by_process = false;
const volatile bool measure_latency = false;
const volatile bool failures_only = false;
const volatile __s32 targ_syscall = -1;

struct syscall_stats {
	__u64 count;
	__u64 errors;
	__u64 total_ns;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct syscall_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_KEYS);
	__type(key, __u32);
	__type(value, struct bs_loglin_hist);
} latency SEC(".maps");

/* Entry time per thread, only while a syscall is in flight. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, __u64);
} start SEC(".maps");

/* What a full map could not hold, read by user space through .bss. */
__u64 stats_dropped = 0;  /* syscalls not counted: no room for their key */
__u64 hists_dropped = 0;  /* syscalls counted without their latency: no room for the key's histogram */
__u64 starts_dropped = 0; /* syscalls not counted: no room for their entry time (too many in flight) */

static const struct bs_loglin_hist empty_hist = {};

static __always_inline bool selected(long nr)
{
	if (targ_syscall >= 0 && nr != targ_syscall)
		return false;
	return bs_task_selected();
}

SEC("tracepoint/raw_syscalls/sys_enter")
int sys_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tid;
	__u64 ts;

	if (!measure_latency || !selected(ctx->id))
		return 0;
	tid = (__u32)bpf_get_current_pid_tgid();
	ts = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&start, &tid, &ts, BPF_ANY))
		__sync_fetch_and_add(&starts_dropped, 1);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_exit")
int sys_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid, key;
	struct syscall_stats *s, zero = {};
	__u64 *tsp, delta = 0;

	if (ctx->id < 0 || !selected(ctx->id))
		return 0;
	if (failures_only && ctx->ret >= 0)
		return 0;
	if (measure_latency) {
		tsp = bpf_map_lookup_elem(&start, &tid);
		if (!tsp)
			return 0; /* entered before we attached */
		delta = bpf_ktime_get_ns() - *tsp;
		bpf_map_delete_elem(&start, &tid);
	}

	key = by_process ? pid_tgid >> 32 : (__u32)ctx->id;
	s = bpf_map_lookup_elem(&stats, &key);
	if (!s) {
		if (by_process)
			bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		s = bs_insert(&stats, &key, &zero, &stats_dropped);
		if (!s)
			return 0;
	}
	__sync_fetch_and_add(&s->count, 1);
	if (ctx->ret < 0)
		__sync_fetch_and_add(&s->errors, 1);
	if (measure_latency) {
		struct bs_loglin_hist *h;

		__sync_fetch_and_add(&s->total_ns, delta);
		h = bpf_map_lookup_elem(&latency, &key);
		if (!h)
			h = bs_insert(&latency, &key, &empty_hist, &hists_dropped);
		if (h)
			bs_hist_add_loglin(h, delta);
	}
	return 0;
}
