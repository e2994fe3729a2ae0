/* execsnoop: every exec() as it returns, with its argv, and (optionally) every process exit with its
 * exit status and lifetime, from the syscalls and sched tracepoints.
 *
 * argv of a successful exec is read after the syscall returns, from the new program's own copy
 * (mm->arg_start..arg_end, what /proc/PID/cmdline shows): it is what the program really received, it
 * cannot be changed under us by another thread of the caller, its pages were just written by the kernel
 * so the read does not fail on a page that is not resident, and one read replaces a loop of them. A
 * failed exec leaves the caller's memory in place, so its argv is walked at the syscall's exit through
 * the argv pointer stashed at entry, one bpf_probe_read_user per argv[i].
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define TASK_COMM_LEN 16
#define FILENAME_LEN 256
/* The argv bytes kept per exec: with the rest, a record of about 4.4 KiB. */
#define ARGS_LEN 4096
/* A failed exec's argv is read one string at a time, each at most this long. */
#define ARG_CHUNK 256
#define FAILED_MAX_ARGS 64
/* How far up the real_parent chain --ppid looks: enough for shells in shells, bounded for the verifier. */
#define MAX_ANCESTORS 16

/* Bits of exec_event.flags; in BTF, where user space reads them. */
enum exec_args_flag {
	ARGS_TRUNCATED = 1, /* argv went on beyond args[] */
	ARGS_MISSING = 2,   /* argv could not be read (or its pointer was not stashed) */
};
BS_ENUM(exec_args_flag);

/* Filters, set from user space before load; 0 / -1 / empty means no filter. Failed execs are left out
 * unless include_failed; failed_only (with include_failed) leaves out the successful ones. */
const volatile __u32 targ_uid = (__u32)-1;
const volatile __u32 targ_ppid = 0;
const volatile char targ_name[TASK_COMM_LEN] = {};
const volatile __u32 targ_name_len = 0;
const volatile bool include_failed = false;
const volatile bool failed_only = false;

struct exec_event {
	__u64 ts; /* bpf_ktime_get_ns() when exec returned */
	__u32 pid;
	__u32 ppid;
	__u32 uid;
	__s32 ret;
	__u32 args_size; /* bytes of args[] used: NUL-separated strings */
	__u32 flags;	 /* enum exec_args_flag bits */
	char comm[TASK_COMM_LEN];    /* after a successful exec, the new program's */
	char filename[FILENAME_LEN]; /* the path given to exec */
	char args[ARGS_LEN];
};

struct exit_event {
	__u64 ts;
	__u64 duration_ns; /* since the process (its thread-group leader) was forked */
	__u32 pid;
	__u32 ppid;
	__u32 uid;
	__s32 exit_code; /* wait(2) status: code << 8 | terminating signal, 0x80 if it dumped core */
	char comm[TASK_COMM_LEN];
};

/* 16 MiB holds about 3800 execs waiting for user space; an exit record is 56 bytes. */
BS_RINGBUF(execs, 16 << 20, struct exec_event);
BS_RINGBUF(exits, 1 << 20, struct exit_event);

/* What exit needs and cannot read any more once the exec has replaced the caller's memory. */
struct exec_start {
	const char *const *argv;
	char filename[FILENAME_LEN];
};

/* LRU, keyed by thread id: an exec by a non-leader thread returns under the leader's id, leaving its
 * entry behind; LRU recycles such entries instead of filling up. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct exec_start);
} starts SEC(".maps");

static const struct exec_start empty_start = {};

static __always_inline bool in_subtree(struct task_struct *task)
{
	if (!targ_ppid)
		return true;
	for (int i = 0; i <= MAX_ANCESTORS; i++) {
		__u32 tgid = BPF_CORE_READ(task, tgid);

		if (tgid == targ_ppid)
			return true;
		if (tgid <= 1)
			return false;
		task = BPF_CORE_READ(task, real_parent);
		if (!task)
			return false;
	}
	return false;
}

static __always_inline bool name_matches(const char *comm)
{
	if (!targ_name_len)
		return true;
	/* Substring search over the at most 15 characters of comm. The inner loop compares without
	 * branching on the data: a branch per character would give the verifier a path per combination of
	 * matches and mismatches, too many to explore. */
	for (int i = 0; i < TASK_COMM_LEN - 1; i++) {
		char diff = 0;

		if (i + targ_name_len > TASK_COMM_LEN - 1)
			return false;
		for (int j = 0; j < TASK_COMM_LEN - 1; j++) {
			if (j < targ_name_len && i + j < TASK_COMM_LEN)
				diff |= comm[i + j] ^ targ_name[j];
		}
		if (!diff)
			return true;
	}
	return false;
}

/* Filters that an exec does not change: -p, --cgroup, -u, --ppid; bpfscope itself is left out. */
static __always_inline bool task_selected(struct task_struct *task)
{
	if (!bs_task_selected())
		return false;
	if (targ_uid != (__u32)-1 && (__u32)bpf_get_current_uid_gid() != targ_uid)
		return false;
	return in_subtree(task);
}

static __always_inline int exec_enter(const char *filename, const char *const *argv)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct exec_start *start;

	if (!task_selected((struct task_struct *)bpf_get_current_task()))
		return 0;
	if (bpf_map_update_elem(&starts, &tid, &empty_start, BPF_ANY))
		return 0;
	start = bpf_map_lookup_elem(&starts, &tid);
	if (!start)
		return 0;
	start->argv = argv;
	if (bpf_probe_read_user_str(start->filename, sizeof(start->filename), filename) < 0)
		start->filename[0] = '\0';
	return 0;
}

/* The new program's argv, as the kernel laid it out on its stack. */
static __always_inline void read_new_args(struct exec_event *e, struct task_struct *task)
{
	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	__u64 len = arg_end - arg_start;

	if (!arg_start || arg_end <= arg_start) {
		e->flags |= ARGS_MISSING;
		return;
	}
	if (len > ARGS_LEN) {
		len = ARGS_LEN;
		e->flags |= ARGS_TRUNCATED;
	}
	if (bpf_probe_read_user(e->args, len, (const void *)arg_start)) {
		e->flags |= ARGS_MISSING;
		return;
	}
	e->args_size = len;
}

/* A failed exec's argv, still in the caller's memory: each pointer, then its string. */
static __always_inline void read_old_args(struct exec_event *e, const char *const *argv)
{
	__u64 off = 0; /* 64-bit: a 32-bit copy would lose the bound the verifier needs */

	for (int i = 0; i < FAILED_MAX_ARGS; i++) {
		const char *arg = NULL;
		long n;

		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i])) {
			e->flags |= ARGS_MISSING;
			break;
		}
		if (!arg)
			break;
		if (off > ARGS_LEN - ARG_CHUNK || i == FAILED_MAX_ARGS - 1) {
			e->flags |= ARGS_TRUNCATED;
			break;
		}
		n = bpf_probe_read_user_str(&e->args[off], ARG_CHUNK, arg);
		if (n <= 0) {
			e->flags |= ARGS_MISSING;
			break;
		}
		off += n;
		if (n == ARG_CHUNK) {
			/* Filled the chunk: the string may go on, and what follows would not be its argv[i+1]. */
			e->flags |= ARGS_TRUNCATED;
			break;
		}
	}
	e->args_size = off;
}

static __always_inline int exec_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct exec_start *start = bpf_map_lookup_elem(&starts, &tid);
	struct exec_event *e;
	char comm[TASK_COMM_LEN];

	if (ret < 0 ? !include_failed : failed_only)
		goto done;
	/* Checked again here: an exec by a non-leader thread returns under another id, with no entry. */
	if (!task_selected(task))
		goto done;
	bpf_get_current_comm(comm, sizeof(comm));
	if (!name_matches(comm))
		goto done;
	e = bs_reserve(&execs, sizeof(*e));
	if (!e)
		goto done;
	e->ts = bpf_ktime_get_ns();
	e->pid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->ret = ret;
	e->args_size = 0;
	e->flags = 0;
	__builtin_memcpy(e->comm, comm, sizeof(comm));
	e->filename[0] = '\0';
	if (start)
		bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), start->filename);
	if (ret == 0)
		read_new_args(e, task);
	else if (start)
		read_old_args(e, start->argv);
	else
		e->flags |= ARGS_MISSING;
	bpf_ringbuf_submit(e, 0);
done:
	if (start)
		bpf_map_delete_elem(&starts, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_execve")
int execve_enter(struct trace_event_raw_sys_enter *ctx)
{
	return exec_enter((const char *)ctx->args[0], (const char *const *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_exit_execve")
int execve_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exec_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_execveat")
int execveat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return exec_enter((const char *)ctx->args[1], (const char *const *)ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_exit_execveat")
int execveat_exit(struct trace_event_raw_sys_exit *ctx)
{
	return exec_exit(ctx->ret);
}

SEC("tracepoint/sched/sched_process_exit")
int process_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct exit_event *e;
	char comm[TASK_COMM_LEN];
	__u64 now;

	/* A process ends with its last thread, which need not be the leader. Newer kernels say so in the
	 * tracepoint (group_dead); on older ones this thread has already decremented signal->live here. */
	if (bpf_core_field_exists(ctx->group_dead)) {
		if (!ctx->group_dead)
			return 0;
	} else if (BPF_CORE_READ(task, signal, live.counter) != 0) {
		return 0;
	}
	if (!task_selected(task))
		return 0;
	bpf_get_current_comm(comm, sizeof(comm));
	if (!name_matches(comm))
		return 0;
	e = bs_reserve(&exits, sizeof(*e));
	if (!e)
		return 0;
	now = bpf_ktime_get_ns();
	e->ts = now;
	e->duration_ns = now - BPF_CORE_READ(task, group_leader, start_time);
	e->pid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->exit_code = BPF_CORE_READ(task, exit_code);
	__builtin_memcpy(e->comm, comm, sizeof(comm));
	bpf_ringbuf_submit(e, 0);
	return 0;
}
