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
 *
 * The kernel may run no program for a switch: on one VM the switches from its init process's threads
 * reached no program, nor tracefs, and the threads they handed the CPU to were never seen to end their
 * blocks: with that process kept busy, a thread sleeping 20 ms at a time lost 33-64% of its blocked
 * time (three 4 s runs). So a block also keeps the runqueue clock it began at (rq->clock, which the
 * switch has just updated), and a thread found running still timed as blocked (switched out again, or
 * leaving its system call) ends it when the scheduler says it arrived on its CPU
 * (sched_info.last_arrival, on the same clock): the same runs then came within 0.1% of the truth.
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


/* When a thread blocked: bpf_ktime_get_ns, and its runqueue's clock (0 where the kernel has none). */
struct block_start {
	__u64 ns;
	__u64 clock;
};

/* DWARF mode: the time, and the kernel stack of the (last) block, until the system call exits. */
struct blocked_time {
	struct block_start start; /* ns 0 once switched in: then waiting for the system call's exit */
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
	__type(value, struct block_start);
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
/* Blocks whose switch-in no program saw, that the scheduler could not date: timed to when the thread was
 * found running. */
__u64 ends_unseen = 0;

static __always_inline bool is_blocked(unsigned int prev_state)
{
	if (!prev_state)
		return with_preempted;
	return !state_mask || (prev_state & state_mask);
}

static __always_inline struct block_start block_start(const struct task_struct *task, __u64 now)
{
	struct block_start start = {.ns = now, .clock = bs_rq_clock(task)};

	return start;
}

/* How long the block of `task`, running now, lasted, its switch-in unseen. */
static __always_inline __u64 unseen_block_ns(const struct task_struct *task, const struct block_start *start,
					     __u64 now)
{
	__u64 arrival = BPF_CORE_READ(task, sched_info.last_arrival);

	if (start->clock && arrival > start->clock)
		return arrival - start->clock;
	__sync_fetch_and_add(&ends_unseen, 1);
	return now - start->ns;
}

static __always_inline void switch_out(void *ctx, const struct task_struct *prev, __u32 tid, __u64 now)
{
	struct block_start start;
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
		t->start = block_start(prev, now);
		t->kernel_frames = 0;
		if (want_kernel) {
			n = bpf_get_stack(ctx, t->kernel, sizeof(t->kernel), 0);
			t->kernel_frames = n < 0 ? n : (__u64)n / 8;
		}
		return;
	}
	start = block_start(prev, now);
	if (wakers) {
		/* The time only: the stacks counted are the waker's. */
		if (bpf_map_update_elem(&blocked_since, &tid, &start, BPF_ANY))
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
	    bpf_map_update_elem(&blocked_since, &tid, &start, BPF_ANY))
		__sync_fetch_and_add(&blocked_dropped, 1);
}

/* DWARF mode: a block ended, seen (`running` NULL) or found when the thread `running` ran again. */
static __always_inline void end_timed_block(struct blocked_time *t, const struct task_struct *running, __u64 now)
{
	__u64 delta = running ? unseen_block_ns(running, &t->start, now) : now - t->start.ns;

	t->start.ns = 0;
	if (delta >= min_block_ns) {
		t->weight_ns += delta;
		t->blocks++;
	}
}

/* Thread `tid` switched in now, or (`running`, its task) was found on the CPU still timed as blocked. */
static __always_inline void switch_in(__u32 tid, const struct task_struct *running, __u64 now)
{
	struct offcpu_value *v, zero = {};
	struct block_start *since;
	struct blocked_time *t;
	struct stack_key *key;
	__u64 delta;

	if (copy_user_stack && want_user) {
		t = bpf_map_lookup_elem(&blocked_times, &tid);
		if (t && t->start.ns)
			end_timed_block(t, running, now);
		return;
	}
	since = bpf_map_lookup_elem(&blocked_since, &tid);
	if (!since)
		return;
	key = bpf_map_lookup_elem(wakers ? (void *)&waker_keys : (void *)&blocked_keys, &tid);
	if (!key) {
		if (wakers)
			bpf_map_delete_elem(&blocked_since, &tid); /* woken unseen (before the trace began) */
		return;
	}
	delta = running ? unseen_block_ns(running, since, now) : now - since->ns;
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
	if (prev_tid && bs_task_selected()) {
		switch_in(prev_tid, prev, now); /* still timed as blocked: its switch-in was unseen */
		if (is_blocked(prev_state))
			switch_out(ctx, prev, prev_tid, now);
	}
	if (next_tid)
		switch_in(next_tid, NULL, now);
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
	if (!t)
		return 0;
	if (t->start.ns) /* running, its switch-in unseen */
		end_timed_block(t, bpf_get_current_task_btf(), bpf_ktime_get_ns());
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
