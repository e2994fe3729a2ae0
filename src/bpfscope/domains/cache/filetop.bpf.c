/* filetop: bytes and calls of the read and write system calls per process and file, counted in the
 * kernel, with each file's path walked from its dentry once, when the file is first seen.
 *
 * At sys_enter of a read- or write-family call the fd is turned into its struct file
 * (task->files->fdt->fd[fd], bounded by max_fds); at sys_exit the return value is the bytes moved.
 * Calls that fail are not counted; a read at end of file (0 bytes) is a call. Regular files only unless
 * all_files is set (pipes, sockets, devices too), as BCC's filetop.
 *
 * The path is walked up d_parent, crossing mount points (struct mount's mnt_mountpoint and mnt_parent),
 * to the root of the mount namespace the walk reaches, at most PATH_DEPTH names of NAME_LEN bytes; a
 * deeper path is marked truncated and shown with its last PATH_DEPTH names. A file deleted or renamed
 * after it was first seen keeps the path it had then.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"
#include "vfs.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_ROWS 10240
#define MAX_FILES 8192
#define PATH_DEPTH 16
#define NAME_LEN 64
#define S_IFMT_BITS 00170000
#define S_IFREG_BITS 0100000
#define S_IFSOCK_BITS 0140000
#define S_IFIFO_BITS 0010000

const volatile bool all_files = false;

struct file_key {
	__u32 tgid;
	__u32 dev; /* the inode's superblock s_dev, kernel encoding (major << 20 | minor) */
	__u64 ino;
};

struct file_stats {
	__u64 reads;
	__u64 writes;
	__u64 read_bytes;
	__u64 write_bytes;
	char comm[16];
	__u32 mode; /* i_mode: the file type */
};

struct path_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

struct file_path {
	char names[PATH_DEPTH][NAME_LEN]; /* the file's name first, then its parents' */
	__u32 depth;
	__u32 truncated;
};

struct inflight {
	struct file *file;
	__u32 write;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ROWS);
	__type(key, struct file_key);
	__type(value, struct file_stats);
} files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FILES);
	__type(key, struct path_key);
	__type(value, struct file_path);
} paths SEC(".maps");

/* The call each thread is in, between sys_enter and sys_exit. Task-local storage: found without hashing
 * or locks, freed with the thread, and it cannot fill up as a hash keyed by thread id could. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct inflight);
} calls SEC(".maps");

/* A path is too large for the BPF stack: it is built here, then copied into `paths`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct file_path);
} scratch SEC(".maps");

/* Calls not counted because `files` was full, files left without a path because `paths` was: read by
 * user space through .bss. */
__u64 files_dropped = 0;
__u64 paths_dropped = 0;
/* Calls not counted because the kernel had no task storage for the thread (out of memory). */
__u64 calls_unseen = 0;

static __always_inline int on_enter(unsigned long fd, __u32 write)
{
	struct inflight *call;
	struct file *file;
	umode_t mode;

	if (!bs_task_selected())
		return 0;
	file = bs_fd_file(fd);
	if (!file)
		return 0; /* not an open fd: the call fails with EBADF */
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if (!all_files && (mode & S_IFMT_BITS) != S_IFREG_BITS)
		return 0;
	call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!call) {
		__sync_fetch_and_add(&calls_unseen, 1);
		return 0;
	}
	call->file = file;
	call->write = write;
	return 0;
}

struct walk {
	struct dentry *dentry;
	struct vfsmount *vfsmnt;
	struct mount *mnt;
	struct file_path *path;
	__u32 depth;
};

/* One step of the walk up the tree, a bpf_loop callback (the verifier checks it once, not per step):
 * a name, or a crossing to the mount underneath. Returns 1 to stop. */
static long walk_step(__u32 index, struct walk *w)
{
	/* Locals, not w->...: BPF_CORE_READ would record the access to struct walk as a relocation. */
	struct dentry *dentry = w->dentry, *parent;
	struct vfsmount *vfsmnt = w->vfsmnt;
	struct mount *mnt = w->mnt;
	const unsigned char *name;
	__u32 depth = w->depth;

	if (dentry == BPF_CORE_READ(vfsmnt, mnt_root)) {
		struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

		if (up == mnt) {
			w->path->truncated = 0; /* the root of the mount tree */
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = up;
		w->vfsmnt = (void *)up + bpf_core_field_offset(struct mount, mnt);
		return 0;
	}
	parent = BPF_CORE_READ(dentry, d_parent);
	if (parent == dentry) {
		w->path->truncated = 0; /* a root that is no mount's (a pseudo file system) */
		return 1;
	}
	if (depth >= PATH_DEPTH)
		return 1;
	name = BPF_CORE_READ(dentry, d_name.name);
	bpf_probe_read_kernel_str(w->path->names[depth & (PATH_DEPTH - 1)], NAME_LEN, name);
	w->depth = depth + 1;
	w->dentry = parent;
	return 0;
}

static __always_inline void walk_path(struct file *file, struct path_key *pkey)
{
	struct walk w = {};
	__u32 zero = 0;

	w.path = bpf_map_lookup_elem(&scratch, &zero);
	if (!w.path)
		return;
	w.vfsmnt = BPF_CORE_READ(file, f_path.mnt);
	w.dentry = BPF_CORE_READ(file, f_path.dentry);
	w.mnt = (void *)w.vfsmnt - bpf_core_field_offset(struct mount, mnt);
	w.path->truncated = 1;
	/* Each step is a name or a crossing to the mount underneath: twice the depth bounds both. */
	bpf_loop(2 * PATH_DEPTH, walk_step, &w, 0);
	w.path->depth = w.depth;
	bs_insert(&paths, pkey, w.path, &paths_dropped);
}

static __always_inline int on_exit(long ret)
{
	struct file_stats *s, zero = {};
	struct file_key key = {};
	struct path_key pkey = {};
	struct inflight *call;
	struct file *file;
	struct inode *inode;

	/* Every read and write exit on the machine comes here: no storage is created for threads that
	 * never entered a counted call. */
	call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (!call || !call->file)
		return 0;
	file = call->file;
	call->file = NULL;
	if (ret < 0)
		return 0;
	inode = BPF_CORE_READ(file, f_inode);
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key.ino = BPF_CORE_READ(inode, i_ino);
	s = bpf_map_lookup_elem(&files, &key);
	if (!s) {
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		zero.mode = BPF_CORE_READ(inode, i_mode);
		s = bs_insert(&files, &key, &zero, &files_dropped);
		if (!s)
			return 0;
		pkey.dev = key.dev;
		pkey.ino = key.ino;
		if (!bpf_map_lookup_elem(&paths, &pkey))
			walk_path(file, &pkey);
	}
	if (call->write) {
		__sync_fetch_and_add(&s->writes, 1);
		__sync_fetch_and_add(&s->write_bytes, ret);
	} else {
		__sync_fetch_and_add(&s->reads, 1);
		__sync_fetch_and_add(&s->read_bytes, ret);
	}
	return 0;
}

#define FD_CALL(syscall, write)                                                                      \
	SEC("tracepoint/syscalls/sys_enter_" #syscall)                                               \
	int enter_##syscall(struct trace_event_raw_sys_enter *ctx)                                   \
	{                                                                                            \
		return on_enter(ctx->args[0], write);                                                \
	}                                                                                            \
	SEC("tracepoint/syscalls/sys_exit_" #syscall)                                                \
	int exit_##syscall(struct trace_event_raw_sys_exit *ctx)                                     \
	{                                                                                            \
		return on_exit(ctx->ret);                                                            \
	}

FD_CALL(read, 0)
FD_CALL(pread64, 0)
FD_CALL(readv, 0)
FD_CALL(preadv, 0)
FD_CALL(preadv2, 0)
FD_CALL(write, 1)
FD_CALL(pwrite64, 1)
FD_CALL(writev, 1)
FD_CALL(pwritev, 1)
FD_CALL(pwritev2, 1)
