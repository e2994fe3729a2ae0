/* What the profilers share (profile.bpf.c, offcputime.bpf.c): the key a stack is counted under, and
 * the capture of the current task's user and kernel stacks into it.
 *
 * A key holds the whole stacks, not stack ids: a BPF_MAP_TYPE_STACK_TRACE map loses a sample whenever
 * two stacks fall into one bucket (a few percent of them at a few hundred stacks in 8192 buckets), while
 * a hash map keyed by the frames themselves has no collisions and costs one 2 KiB jhash per sample.
 */
#ifndef PROFILE_BPF_H
#define PROFILE_BPF_H

/* The kernel's own limit (kernel.perf_event_max_stack) and the most bpf_get_stack returns. */
#define BS_MAX_FRAMES 127
#define BS_STACK_KEYS 32768

struct stack_key {
	__u32 tgid;
	__u32 tid;
	__u64 cgroup;
	char comm[16];
	/* Frames in user[] and kernel[]; a negative errno where the stack could not be read (-EFAULT: a
	 * kernel thread has no user stack), 0 where it was not asked for. */
	__s32 user_frames;
	__s32 kernel_frames;
	__u64 user[BS_MAX_FRAMES];
	__u64 kernel[BS_MAX_FRAMES];
};

/* Which stacks to take, set from user space (--kernel-only, --user-only). */
const volatile bool want_user = true;
const volatile bool want_kernel = true;

/* The key being built, per CPU: 2 KiB is far beyond the 512-byte BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stack_key);
} scratch_key SEC(".maps");

/* The current task's identity and stacks, in this CPU's scratch key (NULL only if the map is absent). */
static __always_inline struct stack_key *bs_capture_stacks(void *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct stack_key *key;
	__u32 zero = 0;
	long n;

	key = bpf_map_lookup_elem(&scratch_key, &zero);
	if (!key)
		return NULL;
	key->tgid = pid_tgid >> 32;
	key->tid = (__u32)pid_tgid;
	key->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(key->comm, sizeof(key->comm));
	key->user_frames = 0;
	key->kernel_frames = 0;
	if (want_user) {
		/* Frame-pointer walk by the kernel; bpf_get_stack zeroes the rest of the buffer. */
		n = bpf_get_stack(ctx, key->user, sizeof(key->user), BPF_F_USER_STACK);
		key->user_frames = n < 0 ? n : (__u64)n / 8;
		if (n < 0)
			__builtin_memset(key->user, 0, sizeof(key->user));
	} else {
		__builtin_memset(key->user, 0, sizeof(key->user));
	}
	if (want_kernel) {
		n = bpf_get_stack(ctx, key->kernel, sizeof(key->kernel), 0);
		key->kernel_frames = n < 0 ? n : (__u64)n / 8;
		if (n < 0)
			__builtin_memset(key->kernel, 0, sizeof(key->kernel));
	} else {
		__builtin_memset(key->kernel, 0, sizeof(key->kernel));
	}
	return key;
}

#endif
