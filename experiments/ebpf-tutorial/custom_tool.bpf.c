/* custom_tool: read(2) per process, from the syscalls:sys_enter_read and sys_exit_read tracepoints.
 *
 * For every process: how many reads, how many bytes they returned, how many hit end of file or failed,
 * and two log-linear histograms (bpfscope.bpf.h): the size each read returned and how long it took.
 * custom_tool.py compiles this file, sets the .rodata filters, loads, attaches and reads the maps.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_PROCS 1024

/* Set from user space before load; -1: every file descriptor. (bpfscope.bpf.h adds bs_targ_tgid and
 * bs_targ_cgroup, the -p and --cgroup filters every tool has.) */
const volatile __s32 targ_fd = -1;

struct read_stats {
	__u64 reads;
	__u64 bytes;
	__u64 eof;	/* reads that returned 0 */
	__u64 errors;	/* reads that returned -errno */
	__u64 min_size; /* smallest and largest successful read on this CPU: they keep the */
	__u64 max_size; /* histogram's percentiles inside the values really seen */
	char comm[16];
};

/* Per CPU: each CPU updates its own copy without atomics; user space gets one row per CPU and adds
 * them up. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32); /* tgid */
	__type(value, struct read_stats);
} stats SEC(".maps");

/* Shared histograms, 976 slots each: updated with atomic adds. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, struct bs_loglin_hist);
} sizes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, struct bs_loglin_hist);
} latency SEC(".maps");

/* Entry time of the read each thread has in flight, only for the reads selected at entry. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32); /* tid */
	__type(value, __u64);
} start SEC(".maps");

/* 7.8 KiB: too big for the 512-byte BPF stack, so new histograms are copied from this constant. */
static const struct bs_loglin_hist empty_hist = {};

static __always_inline struct bs_loglin_hist *hist_of(void *map, __u32 *key)
{
	struct bs_loglin_hist *h = bpf_map_lookup_elem(map, key);

	if (h)
		return h;
	bpf_map_update_elem(map, key, &empty_hist, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

SEC("tracepoint/syscalls/sys_enter_read")
int read_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 ts;

	if (!bs_task_selected())
		return 0;
	/* syscalls:sys_enter_read has the layout of raw_syscalls:sys_enter: args[0] is the fd. */
	if (targ_fd >= 0 && (__s32)ctx->args[0] != targ_fd)
		return 0;
	ts = bpf_ktime_get_ns();
	bpf_map_update_elem(&start, &tid, &ts, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_read")
int read_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid, tgid = pid_tgid >> 32;
	struct read_stats *s, zero = {};
	struct bs_loglin_hist *h;
	__u64 *tsp, delta;
	long ret = ctx->ret;

	/* Only reads whose entry was selected (and seen: not those already blocked when we attached). */
	tsp = bpf_map_lookup_elem(&start, &tid);
	if (!tsp)
		return 0;
	delta = bpf_ktime_get_ns() - *tsp;
	bpf_map_delete_elem(&start, &tid);

	s = bpf_map_lookup_elem(&stats, &tgid);
	if (!s) {
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		bpf_map_update_elem(&stats, &tgid, &zero, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&stats, &tgid);
		if (!s)
			return 0;
	}
	if (!s->reads && !s->comm[0])
		/* A CPU's first record for a process another CPU created: name it here too. */
		bpf_get_current_comm(s->comm, sizeof(s->comm));
	s->reads++;
	if (ret < 0) {
		s->errors++;
	} else {
		if (ret == 0)
			s->eof++;
		if (s->reads - s->errors == 1 || (__u64)ret < s->min_size)
			s->min_size = ret;
		if ((__u64)ret > s->max_size)
			s->max_size = ret;
		s->bytes += ret;
		h = hist_of(&sizes, &tgid);
		if (h)
			bs_hist_add_loglin(h, ret);
	}
	h = hist_of(&latency, &tgid);
	if (h)
		bs_hist_add_loglin(h, delta);
	return 0;
}
