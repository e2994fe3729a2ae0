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

/* The user stack copied per sample in DWARF mode: the page holding sp and the 2 above it, 8-12 KiB
 * (perf's default is 8 KiB). */
#define PAGE_BYTES 4096
#define STACK_COPY_PAGES 3

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_STACK_KEYS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct stack_key);
	__type(value, __u64);
} counts SEC(".maps");

/* Processes sampled, for user space to read their memory maps while they live. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} seen_tgids SEC(".maps");

struct user_sample {
	__u32 tgid;
	__u32 tid;
	__u64 cgroup;
	char comm[16];
	__s32 kernel_frames;
	__u32 stack_bytes; /* bytes of stack[] copied, from stack_base up */
	__u64 ip;
	__u64 sp;
	__u64 bp;
	__u64 stack_base; /* sp rounded down to its page */
	__u64 kernel[BS_MAX_FRAMES];
	__u8 stack[STACK_COPY_PAGES * PAGE_BYTES];
};

BS_RINGBUF_VAR(user_samples, 8 << 20, struct user_sample);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct user_sample);
} scratch_sample SEC(".maps");

const volatile bool copy_user_stack = false;

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
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct task_struct *task = bpf_get_current_task_btf();
	struct user_sample *s;
	struct pt_regs *regs;
	__u32 zero = 0, pages;
	long n;

	s = bpf_map_lookup_elem(&scratch_sample, &zero);
	if (!s)
		return 0;
	s->tgid = pid_tgid >> 32;
	s->tid = (__u32)pid_tgid;
	s->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(s->comm, sizeof(s->comm));
	s->kernel_frames = 0;
	if (want_kernel) {
		n = bpf_get_stack(ctx, s->kernel, sizeof(s->kernel), 0);
		s->kernel_frames = n < 0 ? n : (__u64)n / 8;
	}
	/* The user registers: the interrupted ones when the sample hit user mode, else the ones saved at
	 * the task's entry into the kernel. */
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	s->ip = regs->ip;
	s->sp = regs->sp;
	s->bp = regs->bp;
	/* Whole pages from the one holding sp, so that a stack shorter than the copy (its top is
	 * page-aligned) is copied up to its end instead of failing at once, and every read has a constant
	 * size. */
	s->stack_base = s->sp & ~(__u64)(PAGE_BYTES - 1);
	for (pages = 0; pages < STACK_COPY_PAGES; pages++) {
		if (bpf_probe_read_user(&s->stack[pages * PAGE_BYTES], PAGE_BYTES,
					(void *)(s->stack_base + pages * PAGE_BYTES)))
			break;
	}
	s->stack_bytes = pages * PAGE_BYTES;
	if (s->stack_bytes > sizeof(s->stack))
		return 0; /* never: tells the verifier the size below is in bounds */
	bs_output(&user_samples, s, offsetof(struct user_sample, stack) + s->stack_bytes);
	return 0;
}

SEC("perf_event")
int on_sample(struct bpf_perf_event_data *ctx)
{
	struct stack_key *key;
	__u8 yes = 1;
	__u32 tgid;

	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!tgid) {
		__sync_fetch_and_add(&idle_samples, 1);
		return 0;
	}
	if (!bs_task_selected())
		return 0;
	bpf_map_update_elem(&seen_tgids, &tgid, &yes, BPF_ANY);
	/* Kernel threads have no user stack to copy: their kernel stacks are counted here. */
	if (copy_user_stack && want_user && bpf_get_current_task_btf()->mm)
		return send_user_stack(ctx);
	key = bs_capture_stacks(ctx);
	if (key)
		count(key);
	return 0;
}
