/* profile: on-CPU stacks sampled on every CPU by the software cpu-clock perf event, counted in the
 * kernel per (thread, user stack, kernel stack). User space reads the counts at the end of each window
 * (as differences: counters only grow) and symbolises them.
 *
 * With copy_user_stack set (--unwind dwarf), the user stack is not walked by frame pointers here: the
 * sample's user registers and a copy of the top of its user stack go to a ring buffer, and user space
 * unwinds them with the binaries' .eh_frame tables, as `perf record --call-graph dwarf` does. The kernel
 * stack is still taken here.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bpfscope.bpf.h"
#include "profile.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_STACK_KEYS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct stack_key);
	__type(value, __u64);
} counts SEC(".maps");

/* Samples of the idle task (no work on that CPU), counted apart: the profile shows work only. */
__u64 idle_samples = 0;
/* Samples whose stack key the counts map had no room for. */
__u64 counts_dropped = 0;

static __always_inline void count(struct stack_key *key)
{
	__u64 one = 1, *n;

	n = bpf_map_lookup_elem(&counts, key);
	if (!n) {
		n = bs_insert(&counts, key, &one, &counts_dropped);
		return; /* inserted with its first sample (or counted as dropped) */
	}
	__sync_fetch_and_add(n, 1);
}

static __always_inline int send_user_stack(struct bpf_perf_event_data *ctx)
{
	struct user_sample *s = bs_user_sample();
	long n;

	if (!s)
		return 0;
	s->weight_ns = 0; /* a sample: user space weighs it by the sampling period */
	s->kernel_frames = 0;
	if (want_kernel) {
		n = bpf_get_stack(ctx, s->kernel, sizeof(s->kernel), 0);
		s->kernel_frames = n < 0 ? n : (__u64)n / 8;
	}
	bs_send_user_stack(s);
	return 0;
}

SEC("perf_event")
int on_sample(struct bpf_perf_event_data *ctx)
{
	struct stack_key *key;
	__u32 tgid;

	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!tgid) {
		__sync_fetch_and_add(&idle_samples, 1);
		return 0;
	}
	if (!bs_task_selected())
		return 0;
	/* Kernel threads have no user stack to copy: their kernel stacks are counted here. */
	if (copy_user_stack && want_user && bpf_get_current_task_btf()->mm)
		return send_user_stack(ctx); /* the copy names its process to user space */
	bs_seen(tgid); /* user space reads the maps of the processes seen */
	key = bs_capture_stacks(ctx);
	if (key)
		count(key);
	return 0;
}
