/* What the profilers share (profile.bpf.c, offcputime.bpf.c): the key a stack is counted under, and
 * the capture of the current task's user and kernel stacks into it.
 *
 * A key holds the whole stacks, not stack ids: a BPF_MAP_TYPE_STACK_TRACE map loses a sample whenever
 * two stacks fall into one bucket (a few percent of them at a few hundred stacks in 8192 buckets), while
 * a hash map keyed by the frames themselves has no collisions and costs one 3 KiB jhash per sample.
 */
#ifndef PROFILE_BPF_H
#define PROFILE_BPF_H

/* The kernel's own limit (kernel.perf_event_max_stack) and the most bpf_get_stack returns. */
#define BS_MAX_FRAMES 127
#define BS_STACK_KEYS 32768

/* CPython: where a process's interpreter keeps its threads and frames (python.py fills one entry per
 * Python process, from the interpreter version's struct offsets). */
#define BS_PY_FRAMES 128

struct py_process {
	__u64 tstate_current; /* address of _PyRuntime's thread state holding the GIL */
	__u32 tstate_native_thread_id;
	__u32 tstate_cframe; /* 3.11: PyThreadState.cframe -> _PyCFrame.current_frame */
	__u32 cframe_current_frame;
	__u32 frame_code;
	__u32 frame_previous;
	__u32 frame_is_entry;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct py_process);
} py_processes SEC(".maps");

/* The Python frames of the current thread into `py` (innermost first: code object addresses, bit 0
 * set on the first frame a call of the interpreter's loop ran, is_entry), if its process is a Python
 * interpreter and the thread holds the GIL (a thread running Python code does): their number, 0 for
 * none, -1 where the thread does not hold the GIL. */
static __always_inline __s32 bs_python_frames(__u32 tgid, __u32 tid, __u64 *py)
{
	struct py_process *p = bpf_map_lookup_elem(&py_processes, &tgid);
	__u64 tstate = 0, cframe = 0, frame = 0, code = 0, thread = 0;
	__s32 n = 0;
	__u8 entry = 0;
	int i;

	if (!p)
		return 0;
	if (bpf_probe_read_user(&tstate, sizeof(tstate), (void *)p->tstate_current) || !tstate)
		return -1;
	bpf_probe_read_user(&thread, sizeof(thread), (void *)(tstate + p->tstate_native_thread_id));
	if ((__u32)thread != tid)
		return -1;
	bpf_probe_read_user(&cframe, sizeof(cframe), (void *)(tstate + p->tstate_cframe));
	if (!cframe || bpf_probe_read_user(&frame, sizeof(frame), (void *)(cframe + p->cframe_current_frame)))
		return 0;
	for (i = 0; i < BS_PY_FRAMES && frame; i++) {
		if (bpf_probe_read_user(&code, sizeof(code), (void *)(frame + p->frame_code)))
			break;
		bpf_probe_read_user(&entry, sizeof(entry), (void *)(frame + p->frame_is_entry));
		py[i & (BS_PY_FRAMES - 1)] = code | (entry ? 1 : 0);
		n = i + 1;
		if (bpf_probe_read_user(&frame, sizeof(frame), (void *)(frame + p->frame_previous)))
			break;
	}
	return n;
}

static const __u64 bs_no_python[BS_PY_FRAMES];

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
	/* Python frames (bs_python_frames) where the thread runs Python code: with frame pointers the
	 * interpreter's own frames say nothing of the Python functions they run. */
	__s32 py_frames;
	__u32 py_pad;
	__u64 py[BS_PY_FRAMES];
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
	/* The key is hashed whole: frames of an earlier sample on this CPU must not stay (1 KiB is too
	 * much for an inline memset). */
	bpf_probe_read_kernel(key->py, sizeof(key->py), bs_no_python);
	key->py_pad = 0;
	key->py_frames = want_user ? bs_python_frames(key->tgid, key->tid, key->py) : 0;
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

/* DWARF mode (--unwind dwarf): the user stack is not walked here. The user registers and a copy of the
 * top of the user stack go to user space, which unwinds them with the binaries' .eh_frame. The copy is
 * the page holding sp and the 2 above it, 8-12 KiB (perf's default is 8 KiB). */
#define PAGE_BYTES 4096
#define STACK_COPY_PAGES 3

const volatile bool copy_user_stack = false;

struct user_sample {
	__u32 tgid;
	__u32 tid;
	__u64 cgroup;
	char comm[16];
	__u64 weight_ns; /* off-CPU: the time blocked; 0 for a sample (weighed by the period) */
	__s32 kernel_frames;
	__u32 stack_bytes; /* bytes of stack[] copied, from stack_base up */
	__u64 ip;
	__u64 sp;
	__u64 bp;
	__u64 stack_base; /* sp rounded down to its page */
	__u64 kernel[BS_MAX_FRAMES];
	/* Python frames, innermost first: code object addresses, bit 0 set on the first frame a call of
	 * the interpreter's loop ran (is_entry). py_frames is -1 where the thread does not hold the GIL. */
	__s32 py_frames;
	__u32 pad;
	__u64 py[BS_PY_FRAMES];
	__u8 stack[STACK_COPY_PAGES * PAGE_BYTES];
};

BS_RINGBUF_VAR(user_samples, 8 << 20, struct user_sample);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct user_sample);
} scratch_sample SEC(".maps");

/* This CPU's sample being built, with the current task's identity (NULL only if the map is absent). */
static __always_inline struct user_sample *bs_user_sample(void)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct user_sample *s;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&scratch_sample, &zero);
	if (!s)
		return NULL;
	s->tgid = pid_tgid >> 32;
	s->tid = (__u32)pid_tgid;
	s->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(s->comm, sizeof(s->comm));
	return s;
}

/* The current task's user registers and stack into `s`, and `s` to the ring. */
static __always_inline void bs_send_user_stack(struct user_sample *s)
{
	struct pt_regs *regs;
	__u32 pages;

	/* The registers saved at the task's entry into the kernel: the interrupted ones when a sample hit
	 * user mode, the system call's otherwise. */
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
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
	s->py_frames = bs_python_frames(s->tgid, s->tid, s->py);
	if (s->stack_bytes > sizeof(s->stack))
		return; /* never: tells the verifier the size below is in bounds */
	bs_output(&user_samples, s, offsetof(struct user_sample, stack) + s->stack_bytes);
}

/* Processes seen, for user space to read their memory maps while they live (where stacks are counted
 * here: a copied stack names its process itself). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u8);
} seen_tgids SEC(".maps");

static __always_inline void bs_seen(__u32 tgid)
{
	__u8 yes = 1;

	bpf_map_update_elem(&seen_tgids, &tgid, &yes, BPF_ANY);
}

#endif
