/* vfsstat: file system calls counted in the kernel, system-wide and per process, from the syscall
 * tracepoints of each call (no kprobe on vfs_read and friends exists on kernels without kprobes).
 *
 * What counts, at syscall entry (so failed calls count too, as attempts):
 *   reads   read, pread64, readv, preadv, preadv2
 *   writes  write, pwrite64, writev, pwritev, pwritev2
 *   opens   open, openat, openat2, creat, open_by_handle_at
 *   creates files created by an open: O_CREAT asked (creat always) and, at the call's exit, the
 *           new file marked FMODE_CREATED by the kernel (an open of an existing file with O_CREAT
 *           is an open, not a create)
 *   fsyncs  fsync, fdatasync, sync_file_range, syncfs, sync, and msync with MS_SYNC
 *   unlinks unlink, and unlinkat without AT_REMOVEDIR (directories are not counted)
 * Not seen: io_uring operations and page faults on mmap()ed files, which are not system calls;
 * sendfile, splice and copy_file_range, which move data without read or write.
 *
 * Counters only grow: user space shows each interval's difference.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"
#include "vfs.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_PROCESSES 10240
#define O_CREAT_FLAG 0100 /* octal, as in the UAPI fcntl.h (x86 and arm64 alike) */
#define MS_SYNC_FLAG 4
#define AT_REMOVEDIR_FLAG 0x200
/* f_mode bit the kernel sets on a file an open created (include/linux/fs.h, the same since 4.19; a
 * #define, so not in BTF). Checked here: an O_CREAT open of a new file has it, of an existing one not. */
#define FMODE_CREATED_BIT (1U << 20)

struct vfs_counts {
	__u64 reads;
	__u64 writes;
	__u64 opens;
	__u64 creates;
	__u64 fsyncs;
	__u64 unlinks;
};

struct process_counts {
	struct vfs_counts ops;
	char comm[16];
};

enum vfs_op { VFS_READ, VFS_WRITE, VFS_OPEN, VFS_CREATE, VFS_FSYNC, VFS_UNLINK };

/* Whatever the filters let through, on every CPU: the system-wide (or filtered) totals. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vfs_counts);
} totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCESSES);
	__type(key, __u32);
	__type(value, struct process_counts);
} processes SEC(".maps");

/* Whether the thread is inside an open that asked for O_CREAT, from sys_enter to sys_exit. Task-local
 * storage: found without hashing, freed with the thread, and it cannot fill up. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} creating SEC(".maps");

/* Calls not in `processes` because it was full (they are in the totals). */
__u64 processes_dropped = 0;
/* Opens with O_CREAT the kernel had no task storage for: whether they created their file is unknown. */
__u64 creates_unseen = 0;

static __always_inline void add(struct vfs_counts *c, enum vfs_op op)
{
	switch (op) {
	case VFS_READ:
		__sync_fetch_and_add(&c->reads, 1);
		break;
	case VFS_WRITE:
		__sync_fetch_and_add(&c->writes, 1);
		break;
	case VFS_OPEN:
		__sync_fetch_and_add(&c->opens, 1);
		break;
	case VFS_CREATE:
		__sync_fetch_and_add(&c->creates, 1);
		break;
	case VFS_FSYNC:
		__sync_fetch_and_add(&c->fsyncs, 1);
		break;
	case VFS_UNLINK:
		__sync_fetch_and_add(&c->unlinks, 1);
		break;
	}
}

/* Counts a call of the current task, which the filters selected. */
static __always_inline int count_selected(enum vfs_op op)
{
	struct process_counts *p, zero = {};
	struct vfs_counts *total;
	__u32 key = 0;

	total = bpf_map_lookup_elem(&totals, &key);
	if (total)
		add(total, op); /* per-CPU: no other CPU writes this copy, the atomic costs little */
	key = bpf_get_current_pid_tgid() >> 32;
	p = bpf_map_lookup_elem(&processes, &key);
	if (!p) {
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		p = bs_insert(&processes, &key, &zero, &processes_dropped);
		if (!p)
			return 0;
	}
	add(&p->ops, op);
	return 0;
}

static __always_inline int count(enum vfs_op op)
{
	return bs_task_selected() ? count_selected(op) : 0;
}

static __always_inline int count_open(__u64 flags)
{
	__u8 *creates;

	if (!bs_task_selected())
		return 0;
	count_selected(VFS_OPEN);
	if (!(flags & O_CREAT_FLAG))
		return 0;
	creates = bpf_task_storage_get(&creating, bpf_get_current_task_btf(), 0,
				       BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (creates)
		*creates = 1;
	else
		__sync_fetch_and_add(&creates_unseen, 1);
	return 0;
}

/* At the exit of an open that asked for O_CREAT: did it create the file? */
static __always_inline int count_create(long fd)
{
	struct file *file;
	__u8 *creates;

	creates = bpf_task_storage_get(&creating, bpf_get_current_task_btf(), 0, 0);
	if (!creates || !*creates)
		return 0;
	*creates = 0;
	if (fd < 0)
		return 0;
	file = bs_fd_file(fd);
	if (file && (BPF_CORE_READ(file, f_mode) & FMODE_CREATED_BIT))
		count_selected(VFS_CREATE);
	return 0;
}

#define CREATE_EXIT(syscall)                                                                         \
	SEC("tracepoint/syscalls/sys_exit_" #syscall)                                                \
	int exit_##syscall(struct trace_event_raw_sys_exit *ctx)                                     \
	{                                                                                            \
		return count_create(ctx->ret);                                                       \
	}

CREATE_EXIT(open)
CREATE_EXIT(openat)
CREATE_EXIT(openat2)
CREATE_EXIT(creat)

#define COUNT(syscall, op)                                                                           \
	SEC("tracepoint/syscalls/sys_enter_" #syscall)                                               \
	int enter_##syscall(struct trace_event_raw_sys_enter *ctx)                                    \
	{                                                                                            \
		return count(op);                                                                    \
	}

COUNT(read, VFS_READ)
COUNT(pread64, VFS_READ)
COUNT(readv, VFS_READ)
COUNT(preadv, VFS_READ)
COUNT(preadv2, VFS_READ)
COUNT(write, VFS_WRITE)
COUNT(pwrite64, VFS_WRITE)
COUNT(writev, VFS_WRITE)
COUNT(pwritev, VFS_WRITE)
COUNT(pwritev2, VFS_WRITE)
COUNT(open_by_handle_at, VFS_OPEN)
COUNT(fsync, VFS_FSYNC)
COUNT(fdatasync, VFS_FSYNC)
COUNT(sync_file_range, VFS_FSYNC)
COUNT(syncfs, VFS_FSYNC)
COUNT(sync, VFS_FSYNC)
COUNT(unlink, VFS_UNLINK)

SEC("tracepoint/syscalls/sys_enter_open")
int enter_open(struct trace_event_raw_sys_enter *ctx)
{
	return count_open(ctx->args[1]); /* open(path, flags, mode) */
}

SEC("tracepoint/syscalls/sys_enter_openat")
int enter_openat(struct trace_event_raw_sys_enter *ctx)
{
	return count_open(ctx->args[2]); /* openat(dirfd, path, flags, mode) */
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};

	/* openat2(dirfd, path, how, size): the flags are in user memory. */
	bpf_probe_read_user(&how.flags, sizeof(how.flags), (void *)ctx->args[2]);
	return count_open(how.flags);
}

SEC("tracepoint/syscalls/sys_enter_creat")
int enter_creat(struct trace_event_raw_sys_enter *ctx)
{
	return count_open(O_CREAT_FLAG);
}

SEC("tracepoint/syscalls/sys_enter_msync")
int enter_msync(struct trace_event_raw_sys_enter *ctx)
{
	/* MS_ASYNC only schedules the flush (a no-op since 2.6.19): only MS_SYNC waits for the disk. */
	return ctx->args[2] & MS_SYNC_FLAG ? count(VFS_FSYNC) : 0;
}

SEC("tracepoint/syscalls/sys_enter_unlinkat")
int enter_unlinkat(struct trace_event_raw_sys_enter *ctx)
{
	return ctx->args[2] & AT_REMOVEDIR_FLAG ? 0 : count(VFS_UNLINK);
}
