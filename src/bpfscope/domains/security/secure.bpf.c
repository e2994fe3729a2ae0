/* secure: a process cache with lineage, and policies evaluated in the kernel, on tracepoints only.
 *
 * Process lifecycle (one ring, `lifecycle`, in commit order so that a process is always known before its
 * children and its exit): sched_process_fork (a clone: the child inherits its parent's binary), the
 * exec (sched_process_exec: the new image's file, argv, cwd, credentials, capabilities, namespaces and
 * cgroup, all read from the kernel's own structures) and the exit of the last thread. The kernel keeps
 * the same cache (`procs`, by tgid) for what policies match on: the binary and the parent's binary.
 *
 * Policies become `hooks` (one per tracepoint; the attach cookie names it), each with up to
 * MAX_SELECTORS selectors. A selector matches when every one of its filters does (arguments, binaries,
 * parent binaries, namespaces, pids, capabilities); a policy's first selector that matches decides for
 * that policy (each policy on the tracepoint decides for itself): Post sends
 * the event (at most once per rate-limit window and process), NoPost stays silent, Sigkill and Signal
 * send a signal to the process with bpf_send_signal. Strings are matched through maps keyed by
 * (set, string): a hash for Equal/In, longest-prefix tries for Prefix and, on the reversed string,
 * Postfix; addresses through a trie of CIDRs.
 *
 * Block is enforced by cgroup sock_addr programs (connect4/6, sendmsg4/6) on the cgroup v2 root: they
 * see the kernel's copy of the destination and refuse it (EPERM) before any packet leaves.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define STR_LEN 252 /* strings kept and matched: a trie's key is the set (4 bytes) and the string */
#define ARGS_LEN 1024
#define PATH_DEPTH 24
#define MAX_HOOKS 48
#define MAX_SELECTORS 8
#define MAX_ARGS 4
#define MAX_MATCH_ARGS 3
#define MAX_VALUES 8
#define MAX_NS_MATCH 2
#define MAX_BLOCKS 16
#define ANCESTOR_DEPTH 8

#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define S_IFIFO 0010000
#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10

enum sec_proc_event_kind {
	PROC_EXEC = 1,
	PROC_CLONE = 2,
	PROC_EXIT = 3,
};
BS_ENUM(sec_proc_event_kind);

enum sec_proc_flag {
	PROC_ARGS_TRUNCATED = 1,
	PROC_PATH_TRUNCATED = 2,
	PROC_SELECTED = 4, /* passes the task filter (-p, --cgroup): shown; the others only feed the cache */
	PROC_CHILDREN_LEFT = 8, /* an exit or exec leaving live children, whose clones may be sent later */
};
BS_ENUM(sec_proc_flag);

/* Where a hook's argument comes from, and what it is. */
enum sec_arg_type {
	ARG_NONE = 0,
	ARG_INT = 1,	  /* an integer in the record */
	ARG_USTR = 2,	  /* a char * into user memory (syscall arguments) */
	ARG_KSTR = 3,	  /* a __data_loc string in the record (kernel memory) */
	ARG_FD = 4,	  /* a file descriptor: the path of its file, from the fd table */
	ARG_SOCKADDR = 5, /* a struct sockaddr * into user memory */
	ARG_PROC = 6,	  /* an attribute of the calling process (proc_attr) */
	ARG_BINARY = 7,	  /* the process's binary, as the kernel cache has it */
};
BS_ENUM(sec_arg_type);

enum sec_proc_attr {
	ATTR_UID = 0,
	ATTR_EUID = 1,
	ATTR_GID = 2,
	ATTR_EGID = 3,
	ATTR_SUID = 4,
	ATTR_LOGINUID = 5,
};
BS_ENUM(sec_proc_attr);

enum sec_match_op {
	MATCH_NONE = 0,
	MATCH_EQUAL = 1, /* In: the value is one of a set */
	MATCH_NOT_EQUAL = 2,
	MATCH_PREFIX = 3,
	MATCH_NOT_PREFIX = 4,
	MATCH_POSTFIX = 5,
	MATCH_NOT_POSTFIX = 6,
	MATCH_MASK = 7, /* integers: any of the bits */
	MATCH_GT = 8,
	MATCH_LT = 9,
	MATCH_DADDR = 10, /* sockaddr: the address is in one of a set of CIDRs */
	MATCH_NOT_DADDR = 11,
	MATCH_DPORT = 12,
	MATCH_NOT_DPORT = 13,
	MATCH_FAMILY = 14,
};
BS_ENUM(sec_match_op);

enum sec_action {
	ACTION_POST = 0,
	ACTION_NOPOST = 1,
	ACTION_SIGKILL = 2,
	ACTION_SIGNAL = 3,
	ACTION_BLOCK = 4,
};
BS_ENUM(sec_action);

enum sec_ns_kind {
	NS_UTS = 0,
	NS_IPC = 1,
	NS_MNT = 2,
	NS_PID = 3,
	NS_PID_FOR_CHILDREN = 4,
	NS_NET = 5,
	NS_TIME = 6,
	NS_TIME_FOR_CHILDREN = 7,
	NS_CGROUP = 8,
	NS_USER = 9,
	NS_COUNT = 10,
};
BS_ENUM(sec_ns_kind);

enum sec_cap_kind {
	CAP_EFFECTIVE = 0,
	CAP_PERMITTED = 1,
	CAP_INHERITABLE = 2,
};
BS_ENUM(sec_cap_kind);

struct sec_creds {
	__u32 uid, euid, suid, fsuid;
	__u32 gid, egid, sgid, fsgid;
	__u32 loginuid;
	__u32 securebits;
	__u64 cap_effective, cap_permitted, cap_inheritable;
};

/* The kernel's process cache: what policies match on. Keyed by tgid. */
struct sec_proc {
	__u64 exec_ktime; /* boot ns of the exec (or clone) that made this process what it is */
	__u64 parent_exec_ktime; /* a clone's parent's at the fork, for its clone record */
	__u64 flags; /* enum sec_proc_state (64 bits: the atomic operations of clang 14's BPF target) */
	__u32 ppid;
	__u32 pad;
	char binary[STR_LEN];
};

/* A clone's record is sent when something needs it, not at the fork (see announce()). */
enum sec_proc_state {
	PROC_CLONE_PENDING = 1,
};

struct sec_proc_event {
	__u8 kind; /* enum sec_proc_event_kind */
	__u8 flags;
	__u16 exit_signal;
	__u32 pid;
	__u32 tid;
	__u32 ppid;
	__u64 ktime;		 /* boot ns of the event */
	__u64 exec_ktime;	 /* the process's identity (node:exec_ktime:pid is its exec_id) */
	__u64 parent_exec_ktime; /* the parent's, from the kernel cache (0: unknown) */
	__s32 exit_code;	 /* wait(2) status */
	__u32 args_size;
	__u64 cgroup_id;
	/* Clone and exit records end here (PROC_SHORT_SIZE): the rest is the exec's. */
	struct sec_creds creds;
	__u32 ns[NS_COUNT];
	char comm[16];
	/* Exec records only, from here. */
	char binary[STR_LEN];
	char cwd[STR_LEN];
	char args[ARGS_LEN];
};

/* One argument of a hook: how to read it. */
struct sec_arg_spec {
	__u16 offset; /* in the tracepoint's record */
	__u8 size;
	__u8 type; /* enum sec_arg_type */
	__u8 is_signed;
	__u8 attr; /* enum sec_proc_attr for ARG_PROC */
	__u16 pad;
};

struct sec_arg_match {
	__u8 arg; /* index into the hook's args */
	__u8 op;  /* enum sec_match_op */
	__u8 nvalues;
	__u8 pad;
	__u32 set; /* string / CIDR set */
	__s64 values[MAX_VALUES];
};

struct sec_ns_match {
	__u8 ns; /* enum sec_ns_kind */
	__u8 op; /* MATCH_EQUAL (In) or MATCH_NOT_EQUAL (NotIn) */
	__u8 n;
	__u8 pad;
	__u32 inums[4];
};

struct sec_selector {
	__u8 used;
	__u8 action; /* what the event reports: enum sec_action */
	__u8 signal; /* sent to the process with bpf_send_signal, when not 0 */
	__u8 post;   /* send the event (0: NoPost) */
	__u8 nargs, bin_op, parent_bin_op, pid_op;
	__u8 npids, pid_follow_forks, cap_kind, cap_op;
	__u8 nns, policy; /* which policy (of at most 64): each decides for itself */
	__u8 pad[2];
	__u32 rate_limit_ms;
	__u32 rule; /* which policy rule this selector came from: reported with the event */
	__u32 bin_set, parent_bin_set;
	__u64 caps;
	__u32 pids[MAX_VALUES];
	struct sec_arg_match args[MAX_MATCH_ARGS];
	struct sec_ns_match ns[MAX_NS_MATCH];
};

struct sec_hook {
	__u32 nargs;
	__u32 nselectors;
	__u32 needs_creds; /* a selector looks at capabilities or process.* attributes */
	/* The gate: every selector wants integer argument gate_arg - 1 to be one of gate[0..ngate) or to
	 * have a bit of gate_mask, so an event whose argument is neither matches nothing, and leaves before
	 * anything else is read (a hook on raw_syscalls:sys_enter for two syscall numbers runs on every
	 * system call; sys_enter_openat's rules want a file opened for writing, and most opens only read).
	 * 0: no gate. */
	__u16 gate_arg;
	__u16 ngate;
	/* The leaf gate: every selector wants the path of fd argument leaf_arg - 1 Equal to, or ending in,
	 * paths whose last component is in string set leaf_equal_set or ends in one of postfix set
	 * leaf_postfix_set (0: none), so an event whose file's own name is neither matches nothing, and
	 * leaves before the file's whole path is read (a walk up its directories: sys_exit_openat's rule
	 * on sensitive files ran on every open of the machine). 0: no leaf gate. */
	__u16 leaf_arg;
	__u16 pad;
	__u32 leaf_equal_set;
	__u32 leaf_postfix_set;
	__s64 gate_mask;
	__s64 gate[MAX_VALUES];
	struct sec_arg_spec args[MAX_ARGS];
	struct sec_selector selectors[MAX_SELECTORS];
};

struct sec_arg_value {
	__s64 num;
	__u16 family;
	__u16 port;
	__u32 len; /* bytes of str */
	__u8 addr[16];
	/* From here the layout of a key of the string maps: the tries' prefix length, the set, the string. */
	__u32 prefixlen;
	__u32 set;
	char str[STR_LEN];
};

struct sec_hook_event {
	__u64 ktime;
	__u64 exec_ktime;
	__u32 pid;
	__u32 tid;
	__u32 hook;
	__u32 rule;
	__u8 action;
	__u8 signal;
	__s16 action_result; /* bpf_send_signal's return, 0 when none was sent */
	__u32 cgroup_pad;
	__u64 cgroup_id;
	struct sec_creds creds;
	struct sec_arg_value args[MAX_ARGS];
};

/* A connect or sendmsg refused by a Block rule (the cgroup hooks). */
struct sec_block_rule {
	__u8 used;
	__u8 connect;	/* applies to connects */
	__u8 sendmsg;	/* applies to sendto/sendmsg */
	__u8 addr_op;	/* MATCH_DADDR / MATCH_NOT_DADDR / 0 */
	__u8 port_op;	/* MATCH_DPORT / MATCH_NOT_DPORT / 0 */
	__u8 nports;
	__u8 bin_op;
	__u8 pad;
	__u32 addr_set;
	__u32 bin_set;
	__u32 hook;
	__u32 rule;
	__u16 ports[MAX_VALUES];
};

struct sec_string_key {
	__u32 set;
	char str[STR_LEN];
};

struct sec_prefix_key {
	__u32 prefixlen;
	__u32 set;
	char str[STR_LEN];
};

struct sec_cidr_key {
	__u32 prefixlen;
	__u32 set;
	__u8 addr[16];
};

struct sec_rate_key {
	__u32 pid;
	__u32 hook;
	__u32 selector;
};

/* An exec is about 1 KB of records (its exec record cut after its arguments, an exit's, a clone's if sent):
 * at the 5,000 exec/s a storm asks, 8 MiB hold 1.7 s of a consumer that stops reading; an exec storm at
 * the 1,600-2,700 exec/s a 2-CPU machine could spawn lost nothing. 16 MiB, as before, cost 8 MiB more of
 * resident memory for seconds nothing here ever needed. The hits ring, 4 MiB: 3,200 hits of 1.3 KB, 1.6 s
 * of the 2,000 matches a second of a 2 M syscalls/s storm that matches one call in 1,000. */
BS_RINGBUF_VAR(lifecycle, 8 << 20, struct sec_proc_event);
BS_RINGBUF(hits, 4 << 20, struct sec_hook_event);

/* Set by user space when it drains on a timer: the lifecycle ring's records then wake the consumer only
 * once it is a quarter full (bpfscope.bpf.h's paced wake-ups, for this ring alone); a policy hit still
 * wakes it at once, and that drain reads both rings. */
const volatile bool lifecycle_paced = false;

static __always_inline void lifecycle_output(void *e, __u64 size)
{
	bs_output_flags(&lifecycle, e, size, lifecycle_paced ? bs_paced_flags(&lifecycle) : 0);
}

/* The hooks a policy compiles to, and the Block rules; filled by user space before attaching. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_HOOKS);
	__type(key, __u32);
	__type(value, struct sec_hook);
} hooks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BLOCKS);
	__type(key, __u32);
	__type(value, struct sec_block_rule);
} blocks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sec_string_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} string_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct sec_prefix_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} prefix_sets SEC(".maps");

/* Postfixes, stored and looked up reversed. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct sec_prefix_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} postfix_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct sec_cidr_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} cidr_sets SEC(".maps");

/* The process cache; sized by user space (its losses are counted in procs_dropped). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct sec_proc);
} procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sec_rate_key);
	__type(value, __u64);
} rate_limits SEC(".maps");

/* Per-CPU scratch: records are built here, then copied into a ring (bs_output). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sec_proc_event);
} proc_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sec_hook_event);
} hit_scratch SEC(".maps");

struct sec_key_scratch {
	struct sec_prefix_key key;
	char path[512]; /* a path is assembled here: writes at an offset masked below 256 stay inside */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sec_key_scratch);
} key_scratch SEC(".maps");

/* Set by user space: which hook the exec tracepoint runs (-1: none), the process cache's node name is
 * user space's business. */
const volatile __s32 exec_hook = -1;
/* And which raw_syscalls:sys_enter's rules run in (-1: none). */
const volatile __s32 sys_enter_hook = -1;
/* Hits suppressed by a rate limit (not lost: the policy asked for it). */
__u64 rate_limited = 0;
/* Processes the kernel cache had no room for. */
__u64 procs_dropped = 0;

static const struct sec_proc empty_proc = {};

/* A clone's or an exit's record: what it says ends before the credentials (an exit's creds, namespaces
 * and comm were the scratch record's leftovers). 56 bytes instead of 176: less to copy into the ring and
 * out of it, and user space unpacks 12 items, not 36 (secure.py's short head). */
#define PROC_SHORT_SIZE __builtin_offsetof(struct sec_proc_event, creds)

/* Clone records are sent when user space needs them, not at the fork: most forks exec at once, and the
 * exec's record says all a clone's would (in an exec storm, a third of the records and 13-18% of user
 * space's time an exec, replayed). A clone is sent before the first record that names it: its own exit
 * or policy hit, its exec when it has children, or an exec or clone record whose parent it is; its
 * unsent ancestors first, oldest first, up to ANNOUNCE_DEPTH of them. Dated at its fork and sent before
 * the time of the record that needs it is taken: user space places each hit among the lifecycle records
 * by time, and a record committed before the clone's was dated before the hit. */
#define ANNOUNCE_DEPTH 8

static __always_inline void announce_one(__u32 tgid)
{
	struct sec_proc *p = bpf_map_lookup_elem(&procs, &tgid);
	struct sec_proc_event *e;

	/* Claimed, so that two CPUs never send the same clone. */
	if (!p || !(__sync_fetch_and_and(&p->flags, ~PROC_CLONE_PENDING) & PROC_CLONE_PENDING))
		return;
	e = bs_reserve(&lifecycle, PROC_SHORT_SIZE);
	if (!e) {
		__sync_fetch_and_or(&p->flags, PROC_CLONE_PENDING); /* counted lost; the next need tries again */
		return;
	}
	__builtin_memset(e, 0, PROC_SHORT_SIZE);
	e->kind = PROC_CLONE;
	e->ktime = p->exec_ktime;
	e->pid = tgid;
	e->tid = tgid;
	e->ppid = p->ppid;
	e->exec_ktime = p->exec_ktime;
	e->parent_exec_ktime = p->parent_exec_ktime;
	bpf_ringbuf_submit(e, lifecycle_paced ? bs_paced_flags(&lifecycle) : 0);
}

static __noinline void announce(__u32 tgid)
{
	__u32 chain[ANNOUNCE_DEPTH];
	struct sec_proc *p;
	int n = 0;

	for (int i = 0; i < ANNOUNCE_DEPTH; i++) {
		p = bpf_map_lookup_elem(&procs, &tgid);
		if (!p || !(p->flags & PROC_CLONE_PENDING))
			break;
		chain[i] = tgid;
		n = i + 1;
		tgid = p->ppid;
	}
	for (int i = ANNOUNCE_DEPTH - 1; i >= 0; i--) {
		if (i < n)
			announce_one(chain[i]);
	}
}

/* Whether the task has live children: an unsent clone among them names the process as it was at the
 * fork, when it is sent after the process's exit or exec. At sched_process_exit the children are not
 * reparented yet (exit_notify comes after it). */
static __always_inline bool has_children(struct task_struct *task)
{
	return BPF_CORE_READ(task, children.next) !=
	       (void *)((__u64)task + bpf_core_field_offset(struct task_struct, children));
}

/* Whether a process's clone record is still to be sent (p: its cache entry, or NULL). */
static __always_inline bool clone_pending(struct sec_proc *p)
{
	return p && (p->flags & PROC_CLONE_PENDING);
}

static __always_inline struct task_struct *current_task(void)
{
	return (struct task_struct *)bpf_get_current_task();
}

/* --- paths ------------------------------------------------------------------------------------------ */

struct path_walk {
	struct dentry *dentry;
	struct mount *mnt;
	__u32 n;
	__u64 off;
	int truncated;
	const unsigned char *names[32];
};

/* One step up from the leaf: a component, or from a mount's root to where it is mounted. */
static long path_walk_up(__u64 i, void *data)
{
	struct path_walk *w = data;
	struct dentry *dentry = w->dentry;
	struct mount *mnt = w->mnt;
	struct dentry *mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
	struct dentry *parent;

	if (dentry == mnt_root) {
		struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

		if (up == mnt || !up) {
			/* The root of a mount attached nowhere (a memfd's, runc's cloned binary): its name. */
			const unsigned char *name = BPF_CORE_READ(dentry, d_name.name);
			char first = '/';

			bpf_probe_read_kernel(&first, 1, name);
			if (w->n == 0 && first != '/')
				w->names[w->n++ & 31] = name;
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = up;
		return 0;
	}
	parent = BPF_CORE_READ(dentry, d_parent);
	if (!parent)
		return 1;
	if (parent == dentry) {
		/* A file of no mount (a memfd, an anonymous file): its own name is all the path it has. */
		if (w->n < PATH_DEPTH)
			w->names[w->n++ & 31] = BPF_CORE_READ(dentry, d_name.name);
		return 1;
	}
	if (w->n >= PATH_DEPTH) {
		w->truncated = 1;
		return 1;
	}
	w->names[w->n & 31] = BPF_CORE_READ(dentry, d_name.name);
	w->n++;
	w->dentry = parent;
	return 0;
}

/* One component written, root first. */
static long path_write_down(__u64 i, void *data)
{
	struct path_walk *w = data;
	__u32 zero = 0;
	struct sec_key_scratch *ks = bpf_map_lookup_elem(&key_scratch, &zero);
	__u64 off = w->off;
	long len;

	if (!ks || i >= w->n)
		return 1;
	if (off >= STR_LEN - 1) {
		w->truncated = 1;
		return 1;
	}
	ks->path[off & 255] = '/';
	off++;
	len = bpf_probe_read_kernel_str(&ks->path[off & 255], 256, w->names[(w->n - 1 - i) & 31]);
	if (len <= 0)
		return 1;
	w->off = off + len - 1; /* without its NUL: the next '/' goes there */
	return 0;
}

/* The path of (dentry, vfsmount) up to the root of its mount namespace, into ks->path; returns its
 * length, negative when it was cut short. bpf_loop keeps the verifier's work to one step each. */
__noinline int read_path(__u64 dentry_addr, __u64 vfsmnt_addr, struct sec_key_scratch *ks)
{
	struct path_walk w = {};

	if (!ks)
		return 0;
	w.dentry = (struct dentry *)dentry_addr;
	w.mnt = container_of((struct vfsmount *)vfsmnt_addr, struct mount, mnt);
	/* Zeroed: the path is compared as a whole in the string maps, padding included. */
	__builtin_memset(ks->path, 0, sizeof(ks->path));
	bpf_loop(PATH_DEPTH * 2, path_walk_up, &w, 0);
	if (w.n == 0) {
		ks->path[0] = '/';
		return 1;
	}
	bpf_loop(PATH_DEPTH, path_write_down, &w, 0);
	if (w.off > STR_LEN - 1) {
		w.off = STR_LEN - 1;
		w.truncated = 1;
	}
	ks->path[w.off & 511] = '\0';
	return w.truncated ? -(int)w.off : (int)w.off;
}

static __always_inline int copy_path(char *dst, struct sec_key_scratch *ks, int len)
{
	int n = len < 0 ? -len : len;

	bpf_probe_read_kernel(dst, STR_LEN, ks->path);
	dst[STR_LEN - 1] = '\0';
	return n;
}

/* The path of an open file, or "socket:" / "pipe:" for those (they have no path). */
static __always_inline int file_path(struct file *file, char *dst, struct sec_key_scratch *ks)
{
	umode_t mode = BPF_CORE_READ(file, f_inode, i_mode);
	int len;

	if ((mode & S_IFMT) == S_IFSOCK) {
		__builtin_memcpy(dst, "socket:", 8);
		return 7;
	}
	len = read_path((__u64)BPF_CORE_READ(file, f_path.dentry), (__u64)BPF_CORE_READ(file, f_path.mnt), ks);
	if ((mode & S_IFMT) == S_IFIFO && (len == 1 || len == -1)) {
		__builtin_memcpy(dst, "pipe:", 6);
		return 5;
	}
	return copy_path(dst, ks, len);
}

static __always_inline struct file *fd_file(struct task_struct *task, __s64 fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	unsigned int max = BPF_CORE_READ(fdt, max_fds);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	if (fd < 0 || fd >= max)
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

/* --- the calling process ---------------------------------------------------------------------------- */

static __always_inline __u64 read_cap(const kernel_cap_t *cap)
{
	__u64 value = 0;

	bpf_probe_read_kernel(&value, sizeof(value), cap);
	return value;
}

static __always_inline void read_creds(struct task_struct *task, struct sec_creds *c)
{
	const struct cred *cred = BPF_CORE_READ(task, real_cred);

	c->uid = BPF_CORE_READ(cred, uid.val);
	c->euid = BPF_CORE_READ(cred, euid.val);
	c->suid = BPF_CORE_READ(cred, suid.val);
	c->fsuid = BPF_CORE_READ(cred, fsuid.val);
	c->gid = BPF_CORE_READ(cred, gid.val);
	c->egid = BPF_CORE_READ(cred, egid.val);
	c->sgid = BPF_CORE_READ(cred, sgid.val);
	c->fsgid = BPF_CORE_READ(cred, fsgid.val);
	c->securebits = BPF_CORE_READ(cred, securebits);
	c->loginuid = BPF_CORE_READ(task, loginuid.val);
	c->cap_effective = read_cap(__builtin_preserve_access_index(&cred->cap_effective));
	c->cap_permitted = read_cap(__builtin_preserve_access_index(&cred->cap_permitted));
	c->cap_inheritable = read_cap(__builtin_preserve_access_index(&cred->cap_inheritable));
}

static __always_inline __u32 pid_ns_inum(struct task_struct *task)
{
	struct pid *pid = BPF_CORE_READ(task, thread_pid);
	unsigned int level = BPF_CORE_READ(pid, level);
	struct upid upid = {};

	bpf_probe_read_kernel(&upid, sizeof(upid), __builtin_preserve_access_index(&pid->numbers[level & 31]));
	return BPF_CORE_READ(upid.ns, ns.inum);
}

static __always_inline __u32 ns_inum(struct task_struct *task, __u32 kind)
{
	struct nsproxy *ns = BPF_CORE_READ(task, nsproxy);

	switch (kind) {
	case NS_UTS:
		return BPF_CORE_READ(ns, uts_ns, ns.inum);
	case NS_IPC:
		return BPF_CORE_READ(ns, ipc_ns, ns.inum);
	case NS_MNT:
		return BPF_CORE_READ(ns, mnt_ns, ns.inum);
	case NS_PID:
		return pid_ns_inum(task);
	case NS_PID_FOR_CHILDREN:
		return BPF_CORE_READ(ns, pid_ns_for_children, ns.inum);
	case NS_NET:
		return BPF_CORE_READ(ns, net_ns, ns.inum);
	case NS_TIME:
		return BPF_CORE_READ(ns, time_ns, ns.inum);
	case NS_TIME_FOR_CHILDREN:
		return BPF_CORE_READ(ns, time_ns_for_children, ns.inum);
	case NS_CGROUP:
		return BPF_CORE_READ(ns, cgroup_ns, ns.inum);
	case NS_USER:
		return BPF_CORE_READ(task, real_cred, user_ns, ns.inum);
	}
	return 0;
}

/* --- string sets ------------------------------------------------------------------------------------ */

/* Whether `v->str` (v->len bytes, zero-padded to STR_LEN) is in set `set` under `op`. */
__noinline int string_in(struct sec_arg_value *v, __u32 set, __u32 op, struct sec_key_scratch *ks)
{
	__u32 len;

	if (!v || !ks)
		return 0;
	len = v->len;
	if (len > STR_LEN)
		len = STR_LEN;
	v->set = set;
	if (op == MATCH_EQUAL || op == MATCH_NOT_EQUAL)
		return bpf_map_lookup_elem(&string_sets, &v->set) != NULL;
	if (op == MATCH_PREFIX || op == MATCH_NOT_PREFIX) {
		v->prefixlen = 32 + len * 8;
		return bpf_map_lookup_elem(&prefix_sets, &v->prefixlen) != NULL;
	}
	/* Postfix: the string reversed, against the reversed postfixes. */
	for (__u32 i = 0; i < STR_LEN; i++) {
		__u32 j;

		if (i >= len)
			break;
		j = len - 1 - i;
		barrier_var(j);
		if (j >= STR_LEN)
			break;
		ks->key.str[i] = v->str[j];
	}
	ks->key.set = set;
	ks->key.prefixlen = 32 + len * 8;
	return bpf_map_lookup_elem(&postfix_sets, &ks->key) != NULL;
}

static __always_inline bool op_negated(__u32 op)
{
	return op == MATCH_NOT_EQUAL || op == MATCH_NOT_PREFIX || op == MATCH_NOT_POSTFIX || op == MATCH_NOT_DADDR ||
	       op == MATCH_NOT_DPORT;
}

/* A binary (from the kernel cache) against a set: In, NotIn, Prefix, NotPrefix, Postfix. */
__noinline int binary_matches(struct sec_proc *proc, __u32 op, __u32 set, struct sec_key_scratch *ks)
{
	long len;

	if (!ks)
		return 0;
	if (!proc)
		return op_negated(op);
	__builtin_memset(ks->key.str, 0, STR_LEN);
	len = bpf_probe_read_kernel_str(ks->key.str, STR_LEN, proc->binary);
	if (len <= 0)
		return op_negated(op);
	ks->key.set = set;
	if (op == MATCH_EQUAL || op == MATCH_NOT_EQUAL)
		return (bpf_map_lookup_elem(&string_sets, &ks->key.set) != NULL) != (op == MATCH_NOT_EQUAL);
	ks->key.prefixlen = 32 + (len - 1) * 8;
	if (op == MATCH_PREFIX || op == MATCH_NOT_PREFIX)
		return (bpf_map_lookup_elem(&prefix_sets, &ks->key) != NULL) != (op == MATCH_NOT_PREFIX);
	return false;
}

/* --- reading a hook's arguments --------------------------------------------------------------------- */

static __always_inline __u32 proc_attr(struct sec_creds *c, __u32 attr)
{
	switch (attr) {
	case ATTR_UID:
		return c->uid;
	case ATTR_EUID:
		return c->euid;
	case ATTR_GID:
		return c->gid;
	case ATTR_EGID:
		return c->egid;
	case ATTR_SUID:
		return c->suid;
	case ATTR_LOGINUID:
		return c->loginuid;
	}
	return 0;
}

static __always_inline void read_sockaddr(struct sec_arg_value *v, const void *uaddr)
{
	struct sockaddr_in6 sa = {};

	if (bpf_probe_read_user(&sa, sizeof(sa), uaddr)) {
		/* A shorter sockaddr_in at the end of a page: try its size. */
		if (bpf_probe_read_user(&sa, sizeof(struct sockaddr_in), uaddr))
			return;
	}
	v->family = sa.sin6_family;
	if (v->family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&sa;

		v->port = bpf_ntohs(in->sin_port);
		__builtin_memcpy(v->addr, &in->sin_addr.s_addr, 4);
		v->len = 4;
	} else if (v->family == AF_INET6) {
		v->port = bpf_ntohs(sa.sin6_port);
		__builtin_memcpy(v->addr, &sa.sin6_addr, 16);
		v->len = 16;
	} else if (v->family == AF_UNIX) {
		long n = bpf_probe_read_user_str(v->str, 108, (const char *)uaddr + 2);

		v->len = n > 0 ? n - 1 : 0;
		if (v->len == 0 && n > 0) {
			/* An abstract socket: its name follows a NUL. */
			n = bpf_probe_read_user_str(&v->str[1], 107, (const char *)uaddr + 3);
			v->str[0] = '@';
			v->len = n > 0 ? n : 0;
		}
	}
}

/* What needs the tracepoint's record: the raw value, and a __data_loc string (kernel memory). */
/* A field of the tracepoint's record as an integer (sign-extended as the spec says); false if unread. */
static __always_inline bool read_record_int(void *ctx, struct sec_arg_spec *spec, __u64 *out)
{
	__u64 raw = 0;
	__u32 size = spec->size;

	if (size == 0 || size > 8 || bpf_probe_read_kernel(&raw, size, (char *)ctx + spec->offset))
		return false;
	if (spec->is_signed) {
		if (size == 4)
			raw = (__s64)(__s32)raw;
		else if (size == 2)
			raw = (__s64)(__s16)raw;
		else if (size == 1)
			raw = (__s64)(__s8)raw;
	}
	*out = raw;
	return true;
}

static __always_inline void read_raw_arg(void *ctx, struct sec_arg_spec *spec, struct sec_arg_value *v)
{
	__u64 raw = 0;
	long n;

	v->num = 0;
	v->len = 0;
	v->family = 0;
	v->port = 0;
	/* Strings are compared whole, padding included: zeroed first (integers need none of it). */
	if (spec->type != ARG_INT && spec->type != ARG_PROC)
		__builtin_memset(v->str, 0, STR_LEN);
	if (spec->type == ARG_PROC || spec->type == ARG_BINARY)
		return;
	if (!read_record_int(ctx, spec, &raw))
		return;
	v->num = raw;
	if (spec->type == ARG_KSTR) {
		/* __data_loc: offset in the low 16 bits, length in the high 16. */
		n = bpf_probe_read_kernel_str(v->str, STR_LEN, (char *)ctx + (raw & 0xffff));
		v->len = n > 0 ? n - 1 : 0;
	}
}

/* The rest, from the raw value: user strings, files, socket addresses, the process's own attributes. */
__noinline int resolve_arg(struct sec_arg_spec *spec, struct sec_arg_value *v, struct sec_creds *c,
			   struct sec_key_scratch *ks)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sec_proc *p;
	struct file *file;
	long n;

	if (!spec || !v || !c || !ks)
		return 0;
	switch (spec->type) {
	case ARG_PROC:
		v->num = proc_attr(c, spec->attr);
		break;
	case ARG_BINARY:
		p = bpf_map_lookup_elem(&procs, &tgid);
		if (p) {
			n = bpf_probe_read_kernel_str(v->str, STR_LEN, p->binary);
			v->len = n > 0 ? n - 1 : 0;
		}
		break;
	case ARG_USTR:
		n = bpf_probe_read_user_str(v->str, STR_LEN, (const char *)v->num);
		v->len = n > 0 ? n - 1 : 0;
		break;
	case ARG_FD:
		file = fd_file(current_task(), v->num);
		if (file)
			v->len = file_path(file, v->str, ks);
		break;
	case ARG_SOCKADDR:
		read_sockaddr(v, (const void *)v->num);
		break;
	}
	return 0;
}

/* --- selectors -------------------------------------------------------------------------------------- */

static __always_inline bool int_matches(struct sec_arg_match *m, __s64 value)
{
	bool found = false;

	if (m->op == MATCH_MASK) {
		__s64 mask = m->values[0];
		return (value & mask) != 0;
	}
	if (m->op == MATCH_GT)
		return value > m->values[0];
	if (m->op == MATCH_LT)
		return value < m->values[0];
	for (int i = 0; i < MAX_VALUES; i++) {
		if (i < m->nvalues && m->values[i] == value)
			found = true;
	}
	return m->op == MATCH_NOT_EQUAL ? !found : found;
}

__noinline int arg_matches(struct sec_arg_match *m, struct sec_arg_spec *spec, struct sec_arg_value *v,
			   struct sec_key_scratch *ks)
{
	__u32 op;

	if (!m || !spec || !v || !ks)
		return 0;
	op = m->op;
	if (spec->type == ARG_SOCKADDR) {
		if (op == MATCH_FAMILY)
			return int_matches(m, v->family) || (m->nvalues == 0);
		if (op == MATCH_DPORT || op == MATCH_NOT_DPORT) {
			bool found = false;

			if (v->family != AF_INET && v->family != AF_INET6)
				return false;
			for (int i = 0; i < MAX_VALUES; i++) {
				if (i < m->nvalues && m->values[i] == v->port)
					found = true;
			}
			return op == MATCH_DPORT ? found : !found;
		}
		if (op == MATCH_DADDR || op == MATCH_NOT_DADDR) {
			struct sec_cidr_key key = {};

			if (v->family == AF_INET) {
				key.prefixlen = 32 + 32;
				__builtin_memcpy(key.addr, v->addr, 4);
			} else if (v->family == AF_INET6) {
				key.prefixlen = 32 + 128;
				__builtin_memcpy(key.addr, v->addr, 16);
			} else {
				return false;
			}
			/* IPv4 and IPv6 CIDRs live in sets of their own: set + 1 holds a set's IPv6 ones. */
			key.set = m->set + (v->family == AF_INET6);
			return (bpf_map_lookup_elem(&cidr_sets, &key) != NULL) == (op == MATCH_DADDR);
		}
		/* String operators on a sockaddr: the path of a unix socket. */
		if (v->family != AF_UNIX)
			return false;
	}
	if (op >= MATCH_EQUAL && op <= MATCH_NOT_POSTFIX &&
	    (spec->type == ARG_USTR || spec->type == ARG_KSTR || spec->type == ARG_FD ||
	     spec->type == ARG_SOCKADDR || spec->type == ARG_BINARY)) {
		bool in = string_in(v, m->set, op, ks);

		return op_negated(op) ? !in : in;
	}
	return int_matches(m, v->num);
}

static __always_inline bool pid_matches(struct sec_selector *s, __u32 tgid)
{
	bool found = false;

	if (!s->pid_op)
		return true;
	for (int i = 0; i < MAX_VALUES; i++) {
		if (i < s->npids && s->pids[i] == tgid)
			found = true;
	}
	if (!found && s->pid_follow_forks) {
		/* Or a descendant of one of them: the kernel cache's parents, a few levels up. */
		__u32 pid = tgid;

		for (int d = 0; d < ANCESTOR_DEPTH && !found; d++) {
			struct sec_proc *p = bpf_map_lookup_elem(&procs, &pid);

			if (!p || p->ppid == 0 || p->ppid == pid)
				break;
			pid = p->ppid;
			for (int i = 0; i < MAX_VALUES; i++) {
				if (i < s->npids && s->pids[i] == pid)
					found = true;
			}
		}
	}
	return s->pid_op == MATCH_EQUAL ? found : !found;
}

static __always_inline bool ns_matches(struct sec_selector *s, struct task_struct *task)
{
	for (int i = 0; i < MAX_NS_MATCH; i++) {
		struct sec_ns_match *m = &s->ns[i];
		__u32 inum;
		bool found = false;

		if (i >= s->nns)
			break;
		inum = ns_inum(task, m->ns);
		for (int j = 0; j < 4; j++) {
			if (j < m->n && m->inums[j] == inum)
				found = true;
		}
		if ((m->op == MATCH_EQUAL) != found)
			return false;
	}
	return true;
}

static __always_inline bool caps_match(struct sec_selector *s, struct sec_creds *c)
{
	__u64 have;

	if (!s->cap_op)
		return true;
	have = s->cap_kind == CAP_PERMITTED ? c->cap_permitted
	       : s->cap_kind == CAP_INHERITABLE ? c->cap_inheritable
						: c->cap_effective;
	return s->cap_op == MATCH_EQUAL ? (have & s->caps) != 0 : (have & s->caps) == 0;
}

__noinline int selector_matches(struct sec_hook *h, __u32 index, struct sec_hook_event *e,
			     struct sec_key_scratch *ks)
{
	struct sec_proc *self = NULL, *parent = NULL;
	struct sec_selector *s;

	if (!h || !e || !ks)
		return 0;
	s = &h->selectors[index & (MAX_SELECTORS - 1)];
	if (!pid_matches(s, e->pid))
		return false;
	if (!caps_match(s, &e->creds))
		return false;
	if (s->nns && !ns_matches(s, current_task()))
		return false;
	if (s->bin_op || s->parent_bin_op) {
		__u32 tgid = e->pid;

		self = bpf_map_lookup_elem(&procs, &tgid);
		if (s->bin_op && !binary_matches(self, s->bin_op, s->bin_set, ks))
			return false;
		if (s->parent_bin_op) {
			struct task_struct *task = current_task();
			__u32 ppid = self ? self->ppid : BPF_CORE_READ(task, real_parent, tgid);

			parent = bpf_map_lookup_elem(&procs, &ppid);
			if (!binary_matches(parent, s->parent_bin_op, s->parent_bin_set, ks))
				return false;
		}
	}
	for (int i = 0; i < MAX_MATCH_ARGS; i++) {
		struct sec_arg_match *m = &s->args[i];
		__u32 a;

		if (i >= s->nargs)
			break;
		a = m->arg & (MAX_ARGS - 1);
		if (!arg_matches(m, &h->args[a], &e->args[a], ks))
			return false;
	}
	return true;
}

static __always_inline bool rate_limited_now(struct sec_hook_event *e, __u32 selector, __u32 limit_ms)
{
	struct sec_rate_key key = {.pid = e->pid, .hook = e->hook, .selector = selector};
	__u64 *last = bpf_map_lookup_elem(&rate_limits, &key);
	__u64 now = e->ktime;

	if (last && now - *last < (__u64)limit_ms * 1000000) {
		__sync_fetch_and_add(&rate_limited, 1);
		return true;
	}
	bpf_map_update_elem(&rate_limits, &key, &now, BPF_ANY);
	return false;
}

/* Whether the event passes the hook's gate (see struct sec_hook). */
static __always_inline bool gate_admits(struct sec_hook *h, __u64 value)
{
	if (h->gate_mask & value)
		return true;
	for (int k = 0; k < MAX_VALUES; k++) {
		if (k >= h->ngate)
			break;
		if (h->gate[k] == (__s64)value)
			return true;
	}
	return false;
}

static __always_inline bool gate_passes(void *ctx, struct sec_hook *h)
{
	__u64 value;

	if (!h->gate_arg)
		return true;
	if (!read_record_int(ctx, &h->args[(h->gate_arg - 1) & (MAX_ARGS - 1)], &value))
		return true; /* unread: the selectors decide */
	return gate_admits(h, value);
}

/* Whether the event passes the hook's leaf gate (see struct sec_hook): the name of the file its fd
 * argument is open on, read into v (that argument's value, read again whole after). */
static __always_inline bool leaf_passes(void *ctx, struct sec_hook *h, struct sec_arg_value *v,
					struct sec_key_scratch *ks)
{
	struct dentry *dentry;
	struct file *file;
	__u64 fd;
	long n;

	if (!h->leaf_arg)
		return true;
	if (!read_record_int(ctx, &h->args[(h->leaf_arg - 1) & (MAX_ARGS - 1)], &fd))
		return true; /* unread: the selectors decide */
	file = fd_file(current_task(), fd);
	if (!file)
		return false; /* no file (a failed open): no path to match */
	dentry = BPF_CORE_READ(file, f_path.dentry);
	if (dentry == BPF_CORE_READ(file, f_path.mnt, mnt_root))
		return true; /* a mount's root (a file bind-mounted): its path ends in where it is mounted */
	__builtin_memset(v->str, 0, STR_LEN);
	n = bpf_probe_read_kernel_str(v->str, STR_LEN, BPF_CORE_READ(dentry, d_name.name));
	v->len = n > 0 ? n - 1 : 0;
	if (h->leaf_equal_set && string_in(v, h->leaf_equal_set, MATCH_EQUAL, ks))
		return true;
	return h->leaf_postfix_set && string_in(v, h->leaf_postfix_set, MATCH_POSTFIX, ks);
}

static __always_inline int run_hook(void *ctx, __u32 hook_id)
{
	__u32 zero = 0;
	struct sec_hook *h = bpf_map_lookup_elem(&hooks, &hook_id);
	struct sec_hook_event *e;
	struct sec_key_scratch *ks;
	__u64 pid_tgid;
	struct task_struct *task;
	struct sec_proc *self;
	__u32 tgid;
	__u64 decided = 0;
	bool selected = false;

	if (!h || !h->nselectors || !gate_passes(ctx, h))
		return 0;
	e = bpf_map_lookup_elem(&hit_scratch, &zero);
	ks = bpf_map_lookup_elem(&key_scratch, &zero);
	pid_tgid = bpf_get_current_pid_tgid();
	task = current_task();
	tgid = pid_tgid >> 32;
	if (!e || !ks || !leaf_passes(ctx, h, &e->args[(h->leaf_arg - 1) & (MAX_ARGS - 1)], ks))
		return 0;
	/* The task filter (-p, --cgroup, bpfscope itself) is checked once a selector matched: most events
	 * match none, and the filter costs more than a cheap selector. */
	e->pid = tgid;
	e->tid = (__u32)pid_tgid;
	e->hook = hook_id;
	/* Credentials cost a dozen reads: taken before the selectors only when one of them looks. */
	if (h->needs_creds)
		read_creds(task, &e->creds);
	for (int i = 0; i < MAX_ARGS; i++) {
		if (i >= h->nargs)
			break;
		struct sec_arg_spec *spec = &h->args[i & (MAX_ARGS - 1)];

		read_raw_arg(ctx, spec, &e->args[i & (MAX_ARGS - 1)]);
		if (spec->type != ARG_INT && spec->type != ARG_KSTR)
			resolve_arg(spec, &e->args[i & (MAX_ARGS - 1)], &e->creds, ks);
	}
	for (int i = 0; i < MAX_SELECTORS; i++) {
		struct sec_selector *s = &h->selectors[i];
		__u64 policy_bit;
		long sent = 0;

		if (i >= h->nselectors)
			break;
		policy_bit = 1ULL << (s->policy & 63);
		if (!s->used || s->action == ACTION_BLOCK || (decided & policy_bit))
			continue;
		if (!selector_matches(h, i, e, ks))
			continue;
		/* The first selector of a policy that matches decides for that policy; the others go on. */
		decided |= policy_bit;
		if (!selected) {
			if (!bs_task_selected())
				return 0;
			selected = true;
		}
		if (s->signal)
			sent = bpf_send_signal(s->signal);
		if (!s->post)
			continue;
		self = bpf_map_lookup_elem(&procs, &tgid);
		if (clone_pending(self))
			announce(tgid); /* before the hit's time is taken: see announce() */
		e->ktime = bpf_ktime_get_boot_ns();
		if (s->rate_limit_ms && rate_limited_now(e, i, s->rate_limit_ms))
			continue;
		if (!h->needs_creds)
			read_creds(task, &e->creds);
		e->cgroup_id = bpf_get_current_cgroup_id();
		e->exec_ktime = self ? self->exec_ktime : 0;
		e->rule = s->rule;
		e->action = s->action;
		e->signal = s->signal;
		e->action_result = sent;
		bs_output(&hits, e, sizeof(*e));
	}
	return 0;
}

SEC("tracepoint")
int policy_hook(void *ctx)
{
	return run_hook(ctx, (__u32)bpf_get_attach_cookie(ctx));
}

/* raw_syscalls:sys_enter's rules run here, on the BTF tracepoint, not through the classic one: every
 * system call of the machine passes, and a classic tracepoint's program runs after the kernel has
 * filled a perf record for it (its number and six arguments) and costs more itself (under the
 * network-analysis mesh, the default policy's module rule ran 61,000 times a second at 205 ns a run,
 * 0.6% of the machine). The record the rule's arguments are read from is built from the registers,
 * in the classic tracepoint's layout (its tracefs format gave the offsets). */
#ifndef PT_REGS_PARM6_SYSCALL /* libbpf 1.1's headers stop at the fifth */
#if defined(__TARGET_ARCH_arm64)
#define PT_REGS_PARM6_SYSCALL(x) ((x)->regs[5])
#else
#define PT_REGS_PARM6_SYSCALL(x) ((x)->r9)
#endif
#endif

/* Its record, per CPU: on the stack it would take the room run_hook's calls need. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct trace_event_raw_sys_enter);
} sys_enter_record SEC(".maps");

SEC("tp_btf/sys_enter")
int BPF_PROG(policy_sys_enter, struct pt_regs *regs, long id)
{
	struct trace_event_raw_sys_enter *record;
	__u32 zero = 0, hook = sys_enter_hook;
	struct sec_hook *h;
	struct sec_arg_spec *gate;

	if (sys_enter_hook < 0 || !(h = bpf_map_lookup_elem(&hooks, &hook)))
		return 0;
	/* A gate on the call's number (a rule for a few syscalls) is checked before anything is read. */
	gate = &h->args[(h->gate_arg - 1) & (MAX_ARGS - 1)];
	if (h->gate_arg && gate->offset == offsetof(struct trace_event_raw_sys_enter, id) &&
	    gate->size == sizeof(record->id) && !gate_admits(h, id))
		return 0;
	if (!(record = bpf_map_lookup_elem(&sys_enter_record, &zero)))
		return 0;
	record->id = id;
	record->args[0] = PT_REGS_PARM1_SYSCALL(regs);
	record->args[1] = PT_REGS_PARM2_SYSCALL(regs);
	record->args[2] = PT_REGS_PARM3_SYSCALL(regs);
	record->args[3] = PT_REGS_PARM4_SYSCALL(regs);
	record->args[4] = PT_REGS_PARM5_SYSCALL(regs);
	record->args[5] = PT_REGS_PARM6_SYSCALL(regs);
	return run_hook(record, hook);
}

/* --- process lifecycle ------------------------------------------------------------------------------ */

static __always_inline struct sec_proc_event *proc_event_start(__u8 kind, struct task_struct *task)
{
	__u32 zero = 0;
	struct sec_proc_event *e = bpf_map_lookup_elem(&proc_scratch, &zero);

	if (!e)
		return NULL;
	e->kind = kind;
	e->flags = 0;
	e->exit_signal = 0;
	e->ktime = bpf_ktime_get_boot_ns();
	e->pid = BPF_CORE_READ(task, tgid);
	e->tid = BPF_CORE_READ(task, pid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->exit_code = 0;
	e->args_size = 0;
	e->cgroup_id = 0;
	return e;
}

static __always_inline void fill_identity(struct sec_proc_event *e, struct task_struct *task)
{
	read_creds(task, &e->creds);
	for (int i = 0; i < NS_COUNT; i++)
		e->ns[i] = ns_inum(task, i);
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
}

static __always_inline __u64 parent_exec_ktime(__u32 ppid)
{
	struct sec_proc *p = bpf_map_lookup_elem(&procs, &ppid);

	return p ? p->exec_ktime : 0;
}

/* Processes forked from bpfscope (its helpers) stay out of the cache and of the stream. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(process_fork, struct task_struct *parent, struct task_struct *child)
{
	struct sec_proc_event *e;
	struct sec_proc *pp, *cp;
	__u32 tgid = BPF_CORE_READ(child, tgid);
	__u32 ppid = BPF_CORE_READ(parent, tgid);

	if (BPF_CORE_READ(child, pid) != tgid)
		return 0; /* a thread */
	if (bs_self_tgid && (ppid == bs_self_tgid || tgid == bs_self_tgid))
		return 0;
	pp = bpf_map_lookup_elem(&procs, &ppid);
	cp = bs_insert(&procs, &tgid, &empty_proc, &procs_dropped);
	if (cp) {
		cp->exec_ktime = BPF_CORE_READ(child, start_boottime);
		cp->parent_exec_ktime = pp ? pp->exec_ktime : 0;
		cp->ppid = ppid;
		if (pp)
			bpf_probe_read_kernel_str(cp->binary, STR_LEN, pp->binary);
		else
			cp->binary[0] = '\0';
		cp->flags = PROC_CLONE_PENDING; /* last: announce() reads the fields above once it is set */
		return 0;
	}
	/* No room in the kernel's cache: nothing to send it from later, so now. */
	e = proc_event_start(PROC_CLONE, child);
	if (!e)
		return 0;
	e->pid = tgid;
	e->tid = tgid;
	e->ppid = ppid;
	e->exec_ktime = BPF_CORE_READ(child, start_boottime);
	e->parent_exec_ktime = pp ? pp->exec_ktime : 0;
	lifecycle_output(e, PROC_SHORT_SIZE);
	return 0;
}

static __always_inline void read_args(struct sec_proc_event *e, struct task_struct *task)
{
	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	__u64 len = arg_end - arg_start;

	if (!arg_start || arg_end <= arg_start)
		return;
	if (len > ARGS_LEN) {
		len = ARGS_LEN;
		e->flags |= PROC_ARGS_TRUNCATED;
	}
	if (bpf_probe_read_user(e->args, len, (const void *)arg_start))
		return;
	e->args_size = len;
}

SEC("tracepoint/sched/sched_process_exec")
int process_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct task_struct *task = current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 zero = 0;
	struct sec_key_scratch *ks = bpf_map_lookup_elem(&key_scratch, &zero);
	struct sec_proc_event *e;
	struct sec_proc *p;
	bool children;
	__u32 size;
	int len;

	if (!ks || bs_task_is_self())
		return 0;
	p = bpf_map_lookup_elem(&procs, &tgid);
	children = has_children(task);
	if (clone_pending(p)) {
		if (children)
			announce(tgid); /* its children's clones name it as it was forked */
		p->flags = 0;	/* otherwise this exec's record replaces its clone's */
	}
	/* Before proc_event_start: announce() sends from its own reservations, not the scratch record. */
	announce(BPF_CORE_READ(task, real_parent, tgid));
	e = proc_event_start(PROC_EXEC, task);
	if (!e)
		return 0;
	e->exec_ktime = e->ktime;
	e->parent_exec_ktime = parent_exec_ktime(e->ppid);
	e->cgroup_id = bpf_get_current_cgroup_id();
	fill_identity(e, task);
	/* The file the kernel is running, not the name it was given: symbolic links resolved. */
	len = read_path((__u64)BPF_CORE_READ(task, mm, exe_file, f_path.dentry),
			(__u64)BPF_CORE_READ(task, mm, exe_file, f_path.mnt), ks);
	copy_path(e->binary, ks, len);
	if (len < 0)
		e->flags |= PROC_PATH_TRUNCATED;
	len = read_path((__u64)BPF_CORE_READ(task, fs, pwd.dentry), (__u64)BPF_CORE_READ(task, fs, pwd.mnt), ks);
	copy_path(e->cwd, ks, len);
	read_args(e, task);

	if (!p)
		p = bs_insert(&procs, &tgid, &empty_proc, &procs_dropped);
	if (p) {
		p->exec_ktime = e->exec_ktime;
		p->parent_exec_ktime = e->parent_exec_ktime;
		p->ppid = e->ppid;
		bpf_probe_read_kernel_str(p->binary, STR_LEN, e->binary);
	}
	if (bs_task_selected())
		e->flags |= PROC_SELECTED;
	if (children)
		e->flags |= PROC_CHILDREN_LEFT;
	size = e->args_size;
	if (size > ARGS_LEN)
		size = ARGS_LEN;
	lifecycle_output(e, __builtin_offsetof(struct sec_proc_event, args) + size);
	if (exec_hook >= 0)
		run_hook(ctx, exec_hook);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int process_exit(struct trace_event_raw_sched_process_exit *ctx)
{
	struct task_struct *task = current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sec_proc_event *e;
	struct sec_proc *p;

	if (bpf_core_field_exists(ctx->group_dead)) {
		if (!ctx->group_dead)
			return 0;
	} else if (BPF_CORE_READ(task, signal, live.counter) != 0) {
		return 0;
	}
	p = bpf_map_lookup_elem(&procs, &tgid);
	if (bs_task_is_self()) {
		if (p)
			bpf_map_delete_elem(&procs, &tgid);
		return 0;
	}
	if (clone_pending(p))
		announce(tgid);
	e = proc_event_start(PROC_EXIT, task);
	if (e) {
		if (has_children(task))
			e->flags |= PROC_CHILDREN_LEFT;
		e->exec_ktime = p ? p->exec_ktime : BPF_CORE_READ(task, group_leader, start_boottime);
		e->parent_exec_ktime = parent_exec_ktime(e->ppid);
		e->exit_code = BPF_CORE_READ(task, exit_code);
		if (bs_task_selected())
			e->flags |= PROC_SELECTED;
		lifecycle_output(e, PROC_SHORT_SIZE);
	}
	if (p)
		bpf_map_delete_elem(&procs, &tgid);
	return 0;
}

/* --- Block: cgroup sock_addr hooks ------------------------------------------------------------------ */

static __always_inline int check_blocks(struct bpf_sock_addr *ctx, bool sendmsg, bool v6)
{
	__u32 zero = 0;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	struct sec_key_scratch *ks = bpf_map_lookup_elem(&key_scratch, &zero);
	struct sec_hook_event *e;
	__u32 family = v6 ? AF_INET6 : AF_INET;
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct sec_cidr_key key = {};

	if (!ks || (bs_self_tgid && tgid == bs_self_tgid))
		return 1;
	if (!v6) {
		__u32 ip4 = ctx->user_ip4;

		key.prefixlen = 64;
		__builtin_memcpy(key.addr, &ip4, 4);
	} else {
		__u32 ip6[4];

		ip6[0] = ctx->user_ip6[0];
		ip6[1] = ctx->user_ip6[1];
		ip6[2] = ctx->user_ip6[2];
		ip6[3] = ctx->user_ip6[3];
		key.prefixlen = 160;
		__builtin_memcpy(key.addr, ip6, 16);
	}
	for (__u32 i = 0; i < MAX_BLOCKS; i++) {
		__u32 idx = i;
		struct sec_block_rule *r = bpf_map_lookup_elem(&blocks, &idx);
		bool found = false;

		if (!r || !r->used)
			break;
		if (sendmsg ? !r->sendmsg : !r->connect)
			continue;
		if (r->addr_op) {
			key.set = r->addr_set + (family == AF_INET6);
			if ((bpf_map_lookup_elem(&cidr_sets, &key) != NULL) != (r->addr_op == MATCH_DADDR))
				continue;
		}
		if (r->port_op) {
			for (int j = 0; j < MAX_VALUES; j++) {
				if (j < r->nports && r->ports[j] == port)
					found = true;
			}
			if (found != (r->port_op == MATCH_DPORT))
				continue;
		}
		if (r->bin_op) {
			struct sec_proc *p = bpf_map_lookup_elem(&procs, &tgid);

			if (!binary_matches(p, r->bin_op, r->bin_set, ks))
				continue;
		}
		/* Refused. Say so, with what the kernel had. */
		e = bpf_map_lookup_elem(&hit_scratch, &zero);
		if (e) {
			struct sec_proc *p = bpf_map_lookup_elem(&procs, &tgid);
			__u64 uid_gid = bpf_get_current_uid_gid();

			if (clone_pending(p))
				announce(tgid);
			e->ktime = bpf_ktime_get_boot_ns();
			e->pid = tgid;
			e->tid = (__u32)pid_tgid;
			e->exec_ktime = p ? p->exec_ktime : 0;
			e->hook = r->hook;
			e->rule = r->rule;
			e->action = ACTION_BLOCK;
			e->signal = 0;
			e->action_result = 0;
			e->cgroup_id = bpf_get_current_cgroup_id();
			e->creds.uid = (__u32)uid_gid;
			e->creds.euid = (__u32)uid_gid;
			e->creds.gid = uid_gid >> 32;
			e->creds.egid = uid_gid >> 32;
			e->creds.cap_effective = 0;
			/* The destination is the hook's sockaddr argument, whatever its index in the policy. */
			e->args[0].num = 0;
			e->args[0].family = family;
			e->args[0].port = port;
			__builtin_memcpy(e->args[0].addr, key.addr, 16);
			e->args[0].len = family == AF_INET ? 4 : 16;
			bs_output(&hits, e, sizeof(*e));
		}
		return 0;
	}
	return 1;
}

SEC("cgroup/connect4")
int block_connect4(struct bpf_sock_addr *ctx)
{
	return check_blocks(ctx, false, false);
}

SEC("cgroup/connect6")
int block_connect6(struct bpf_sock_addr *ctx)
{
	return check_blocks(ctx, false, true);
}

SEC("cgroup/sendmsg4")
int block_sendmsg4(struct bpf_sock_addr *ctx)
{
	return check_blocks(ctx, true, false);
}

SEC("cgroup/sendmsg6")
int block_sendmsg6(struct bpf_sock_addr *ctx)
{
	return check_blocks(ctx, true, true);
}
