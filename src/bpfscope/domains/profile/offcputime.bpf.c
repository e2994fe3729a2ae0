/* offcputime: the time threads spend blocked, per thread and stack, from the scheduler's switches
 * (tp_btf/sched_switch, or raw_tp/sched_switch where BTF tracepoints are missing; no kprobe).
 *
 * When a selected thread leaves the CPU in a blocked state (sleeping, waiting for I/O; not when
 * preempted, unless asked) its stacks and the time are recorded; when it is switched in again the time
 * it was off the CPU is added to its stacks' counter, if at least min_block_ns.
 *
 * With copy_user_stack (--unwind dwarf) the user stack is unwound in user space from a copy, taken
 * when the thread leaves its system call (raw_syscalls:sys_exit, in its own context): a thread blocked
 * in a system call has the same user stack then as when it blocked, and only blocks that ended and were
 * long enough cost a copy. Blocks outside a system call (a page fault waiting for the disk) are charged
 * to the stack of the next system call's exit.
 *
 * With wakers set (--wakers), a block's time is counted under the stacks of the task that woke the
 * thread instead (tp_btf/sched_waking, in the waker's context: its own stacks, walked by frame
 * pointers), as BCC's wakeuptime does: who ends the waits.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bpfscope.bpf.h"
#include "profile.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_BLOCKED 16384

const volatile __u64 min_block_ns = 1000;
/* Which prev_state values count as blocked: 0 for every state but running (preemption), else a mask of
 * TASK_INTERRUPTIBLE (1), TASK_UNINTERRUPTIBLE (2); with_preempted also counts runnable waits. */
const volatile __u32 state_mask = 0;
const volatile bool with_preempted = false;
const volatile bool wakers = false;

struct offcpu_value {
	__u64 ns;
	__u64 blocks;
};


/* DWARF mode: the time, and the kernel stack of the (last) block, until the system call exits. */
struct blocked_time {
	__u64 start_ns; /* 0 once switched in: then waiting for the system call's exit */
	__u64 weight_ns;
	__s32 kernel_frames;
	__u32 blocks;
	__u64 kernel[BS_MAX_FRAMES];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_STACK_KEYS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct stack_key);
	__type(value, struct offcpu_value);
} counts SEC(".maps");

/* Frame-pointer mode: the whole key is taken as the thread leaves the CPU, beside the time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BLOCKED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct stack_key);
} blocked_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BLOCKED);
	__type(key, __u32);
	__type(value, __u64);
} blocked_since SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BLOCKED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct blocked_time);
} blocked_times SEC(".maps");

/* --wakers: the stacks of the task that woke each thread timed, until it is switched in. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BLOCKED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct stack_key);
} waker_keys SEC(".maps");

static const struct blocked_time no_time = {};

/* Blocks not counted because a map was full. */
__u64 counts_dropped = 0;
__u64 blocked_dropped = 0;

static __always_inline bool is_blocked(unsigned int prev_state)
{
	if (!prev_state)
		return with_preempted;
	return !state_mask || (prev_state & state_mask);
}

static __always_inline void switch_out(void *ctx, __u32 tid, __u64 now)
{
	struct stack_key *key;
	struct blocked_time *t;
	long n;

	if (copy_user_stack && want_user) {
		/* Blocked again before its system call returned: the times add up. */
		t = bpf_map_lookup_elem(&blocked_times, &tid);
		if (!t) {
			t = bs_insert(&blocked_times, &tid, &no_time, &blocked_dropped);
			if (!t)
				return;
		}
		t->start_ns = now;
		t->kernel_frames = 0;
		if (want_kernel) {
			n = bpf_get_stack(ctx, t->kernel, sizeof(t->kernel), 0);
			t->kernel_frames = n < 0 ? n : (__u64)n / 8;
		}
		return;
	}
	if (wakers) {
		/* The time only: the stacks counted are the waker's. */
		if (bpf_map_update_elem(&blocked_since, &tid, &now, BPF_ANY))
			__sync_fetch_and_add(&blocked_dropped, 1);
		bpf_map_delete_elem(&waker_keys, &tid);
		return;
	}
	/* Frame pointers: user space reads the maps of the processes seen (a copy names its own). */
	bs_seen(bpf_get_current_pid_tgid() >> 32);
	key = bs_capture_stacks(ctx);
	if (!key)
		return;
	if (bpf_map_update_elem(&blocked_keys, &tid, key, BPF_ANY) ||
	    bpf_map_update_elem(&blocked_since, &tid, &now, BPF_ANY))
		__sync_fetch_and_add(&blocked_dropped, 1);
}

static __always_inline void switch_in(__u32 tid, __u64 now)
{
	struct offcpu_value *v, zero = {};
	struct blocked_time *t;
	struct stack_key *key;
	__u64 delta, *since;

	if (copy_user_stack && want_user) {
		t = bpf_map_lookup_elem(&blocked_times, &tid);
		if (!t || !t->start_ns)
			return;
		delta = now - t->start_ns;
		t->start_ns = 0;
		if (delta >= min_block_ns) {
			t->weight_ns += delta;
			t->blocks++;
		}
		return;
	}
	since = bpf_map_lookup_elem(&blocked_since, &tid);
	key = bpf_map_lookup_elem(wakers ? (void *)&waker_keys : (void *)&blocked_keys, &tid);
	if (!since || !key) {
		if (since && wakers)
			bpf_map_delete_elem(&blocked_since, &tid); /* woken unseen (before the trace began) */
		return;
	}
	delta = now - *since;
	if (delta >= min_block_ns) {
		v = bpf_map_lookup_elem(&counts, key);
		if (!v)
			v = bs_insert(&counts, key, &zero, &counts_dropped);
		if (v) {
			__sync_fetch_and_add(&v->ns, delta);
			__sync_fetch_and_add(&v->blocks, 1);
		}
	}
	bpf_map_delete_elem(&blocked_since, &tid);
	bpf_map_delete_elem(wakers ? (void *)&waker_keys : (void *)&blocked_keys, &tid);
}

static __always_inline int on_switch(void *ctx, struct task_struct *prev, struct task_struct *next,
				     unsigned int prev_state)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 prev_tid = BPF_CORE_READ(prev, pid), next_tid = BPF_CORE_READ(next, pid);

	/* The current task is prev: the filters and the stacks are its. */
	if (prev_tid && is_blocked(prev_state) && bs_task_selected())
		switch_out(ctx, prev_tid, now);
	if (next_tid)
		switch_in(next_tid, now);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(switch_btf, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	return on_switch(ctx, prev, next, prev_state);
}

SEC("raw_tp/sched_switch")
int switch_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_switch(ctx, (struct task_struct *)ctx->args[1], (struct task_struct *)ctx->args[2],
			 (unsigned int)ctx->args[3]);
}

/* --wakers: the current task wakes `p`; if `p` is a thread being timed, the current task's stacks are
 * its waker's (the last waker counts, should several wake it before it runs). */
static __always_inline int on_waking(void *ctx, struct task_struct *p)
{
	__u32 tid = BPF_CORE_READ(p, pid);
	struct stack_key *key;

	if (!bpf_map_lookup_elem(&blocked_since, &tid))
		return 0;
	bs_seen(bpf_get_current_pid_tgid() >> 32);
	key = bs_capture_stacks(ctx);
	if (key && bpf_map_update_elem(&waker_keys, &tid, key, BPF_ANY))
		__sync_fetch_and_add(&blocked_dropped, 1);
	return 0;
}

SEC("tp_btf/sched_waking")
int BPF_PROG(waking_btf, struct task_struct *p)
{
	return on_waking(ctx, p);
}

SEC("raw_tp/sched_waking")
int waking_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_waking(ctx, (struct task_struct *)ctx->args[0]);
}

/* DWARF mode: back in its own context, the thread's user stack is the one it blocked with. */
static __always_inline int on_sys_exit(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct blocked_time *t;
	struct user_sample *s;

	t = bpf_map_lookup_elem(&blocked_times, &tid);
	if (!t || t->start_ns)
		return 0; /* not blocked, or still off the CPU (another thread of it exits) */
	if (t->weight_ns && (s = bs_user_sample())) {
		s->weight_ns = t->weight_ns;
		s->kernel_frames = t->kernel_frames;
		bpf_probe_read_kernel(s->kernel, sizeof(s->kernel), t->kernel);
		bs_send_user_stack(s);
	}
	bpf_map_delete_elem(&blocked_times, &tid);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf, struct pt_regs *regs, long ret)
{
	return on_sys_exit();
}

SEC("raw_tp/sys_exit")
int sys_exit_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_sys_exit();
}
