/* tsa: thread-state accounting. Where every selected thread's time goes, state by state: on a CPU,
 * waiting for one (run queue), blocked on the disk (reads apart from writes and syncs), on the network,
 * on a lock (futex), or otherwise; from the scheduler's tracepoints alone (no kprobe, no syscall
 * tracepoint: nothing runs on a system call that does not block).
 *
 *   tp_btf/sched_switch      the thread leaving the CPU: its state from the switch (preempted: run queue;
 *                            blocked: what it waits for, below); the thread arriving: on a CPU
 *   tp_btf/sched_wakeup(_new) a blocked thread becomes runnable: run queue until it is switched in
 *
 * What a blocked thread waits for is read as it leaves the CPU, from its own task: the kernel's
 * in_iowait flag (set by io_schedule(): what delay accounting counts as block I/O delay) means the disk;
 * otherwise the system call it is in (its saved registers: x86-64 keeps -ENOSYS in ax until the call
 * returns, and the number in orig_ax) says network (socket calls, poll/select/epoll; read and write on a
 * socket), lock (futex) or other. A disk wait inside write/fsync-like calls is a write (durability: more
 * RAM would not remove it), any other a read (a page cache miss: more RAM could). A thread blocked in an
 * fsync-like call without in_iowait waits for the file system's journal (ext4's jbd2 writes it): sync.
 *
 * Counters are per thread (threads), cumulative, with the current state and when it began: user space
 * credits the part of the current state up to the moment it reads, so that an interval's states add up
 * to its length for every thread. With timeline on, every off-CPU episode is also sent (episodes): when
 * the thread left the CPU, when it was woken, when it ran again, and why it was off; its time on a CPU
 * is what lies between episodes. bench uses it to split each request's time on its thread.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"
#include "taskset.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define TSA_THREADS_MAX 32768
#define TSA_SYSCALLS 512
#define TSA_TASK_RUNNING 0
#define TSA_TASK_DEAD 0x80
#define TSA_ENOSYS 38
#define TSA_S_IFMT 0170000
#define TSA_S_IFSOCK 0140000

enum bs_tsa_state {
	BS_TSA_STATE_CPU = 0,
	BS_TSA_STATE_RUNQUEUE,
	BS_TSA_STATE_DISK_READ,
	BS_TSA_STATE_DISK_WRITE,
	BS_TSA_STATE_SYNC,
	BS_TSA_STATE_NET,
	BS_TSA_STATE_LOCK,
	BS_TSA_STATE_OTHER,
	BS_TSA_STATE_COUNT, /* not a state: how many there are */
};
BS_ENUM(bs_tsa_state);

/* What a system call's block means, per syscall number (syscall_class, filled by user space from the
 * names: numbers differ by architecture). */
enum bs_tsa_call {
	BS_TSA_CALL_NONE = 0,  /* other */
	BS_TSA_CALL_NET,       /* socket calls and readiness waits */
	BS_TSA_CALL_FD_READ,   /* read-like: network on a socket; a disk wait is a read */
	BS_TSA_CALL_FD_WRITE,  /* write-like: network on a socket; a disk wait is a write */
	BS_TSA_CALL_SYNC,      /* fsync-like: a disk wait is a write; another block, the journal (sync) */
	BS_TSA_CALL_LOCK,      /* futex */
};
BS_ENUM(bs_tsa_call);

/* Threads of the components only (taskset.bpf.h's set: cgroups and processes, each with its
 * component's index); the processes a process of the set forks are added to its component. */
/* Send each off-CPU episode (bench), besides counting. */
const volatile bool timeline = false;
/* bpfscope's own process, left out even where its children are watched (bench runs its workload). */
const volatile __u32 own_tgid = 0;

struct tsa_thread {
	__u64 ns[BS_TSA_STATE_COUNT];	 /* time in each state, closed states only */
	__u64 count[BS_TSA_STATE_COUNT]; /* times each state was entered */
	__u64 since;			 /* when the current state began, bpf_ktime_get_ns() */
	__u64 off_ns;			 /* when it last left the CPU (the current episode's start) */
	__u64 wake_ns;			 /* when it was last woken (0: not since it left) */
	__u64 cgroup;
	/* Disk waits whose block the scheduler completed late (EEVDF's delayed dequeue): delay accounting
	 * misses their start, so its blkio delay for this thread is wrong (the block counts from the
	 * previous disk wait's start). Ours is not: kept so that a comparison with it can tell. */
	__u64 delayed_iowaits;
	__u32 tgid;
	__u8 state;			 /* enum bs_tsa_state: the current one */
	__u8 blocked;			 /* enum bs_tsa_state: why it is off the CPU (the episode's cause) */
	__u8 exited;			 /* it has exited: its counters are final */
	__u8 pad;
	char comm[TASK_COMM_LEN];
};

struct tsa_episode {
	__u64 off_ns;  /* left the CPU */
	__u64 wake_ns; /* woken: runnable from here (off_ns when preempted) */
	__u64 on_ns;   /* back on a CPU */
	__u32 tid;
	__u32 tgid;
	enum bs_tsa_state state; /* why it was off before wake_ns (run queue when preempted) */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TSA_THREADS_MAX);
	__type(key, __u32);
	__type(value, struct tsa_thread);
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TSA_SYSCALLS);
	__type(key, __u32);
	__type(value, __u8);
} syscall_class SEC(".maps");

/* 8 MiB: about 200k episodes, a second of a context-switch-heavy workload on two CPUs. */
BS_RINGBUF(episodes, 8 << 20, struct tsa_episode);

/* When this CPU last entered __schedule() (tp_btf/sched_entry_tp, Linux 6.16+): the moment the kernel's
 * own accounting (schedstat's run delay, delay accounting) switches at, a microsecond or two before
 * sched_switch fires (the next task is picked between). Measured on 30,000 waits of 25 us: run-queue
 * time 6-9% above /proc/PID/schedstat when cut at sched_switch. */
const volatile bool have_entry = false;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} schedule_ns SEC(".maps");

/* Threads not followed because the map was full. */
__u64 threads_dropped = 0;

static const struct tsa_thread fresh;

/* bs_task_selected() for any task, not only the current one (a thread woken or switched in is followed
 * from then on): the same filters, read through the task's BTF pointers. */
static __always_inline bool selected(struct task_struct *task)
{
	__u32 tgid = task->tgid;
	__u64 cgroup;

	if (tgid == own_tgid || (bs_targ_tgid && tgid != bs_targ_tgid))
		return false;
	if (bs_self_tgid && (tgid == bs_self_tgid || task->real_parent->tgid == bs_self_tgid))
		return false;
	if (!bs_by_set && !bs_targ_cgroup)
		return true;
	cgroup = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	if (bs_targ_cgroup && cgroup != bs_targ_cgroup)
		return false;
	return bs_in_set(tgid, cgroup);
}

/* A thread's entry, made at its first event (a switch or a wakeup) if it is selected: it is followed from
 * then on, starting in `state`. */
static __always_inline struct tsa_thread *thread_of(struct task_struct *task, __u8 state, __u64 now)
{
	__u32 tid = task->pid;
	struct tsa_thread *t = bpf_map_lookup_elem(&threads, &tid);

	if (t || !tid || !selected(task))
		return t;
	t = bs_insert(&threads, &tid, &fresh, &threads_dropped);
	if (!t)
		return NULL;
	t->since = t->off_ns = t->wake_ns = now;
	t->state = t->blocked = state;
	t->count[state & 7] = 1;
	t->cgroup = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	t->tgid = task->tgid;
	BPF_CORE_READ_STR_INTO(&t->comm, task, comm);
	return t;
}

static __always_inline void enter(struct tsa_thread *t, __u8 state, __u64 now)
{
	__u8 old = t->state;

	if (old < BS_TSA_STATE_COUNT && now > t->since)
		t->ns[old] += now - t->since;
	t->since = now;
	if (state < BS_TSA_STATE_COUNT) {
		t->state = state;
		t->count[state]++;
	}
}

static __always_inline bool fd_is_socket(struct task_struct *task, long fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *file = NULL;
	umode_t mode;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return false;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return false;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	return (mode & TSA_S_IFMT) == TSA_S_IFSOCK;
}

/* What a thread that blocks now waits for. */
static __always_inline __u8 blocked_state(struct task_struct *task)
{
	__u8 call = BS_TSA_CALL_NONE, *class;
	bool iowait = BPF_CORE_READ_BITFIELD_PROBED(task, in_iowait);
	bool socket;

#if defined(__TARGET_ARCH_x86)
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	__u32 nr;

	if (regs && !(BPF_CORE_READ(task, flags) & 0x00200000 /* PF_KTHREAD */) &&
	    regs->ax == (unsigned long)-TSA_ENOSYS) {
		nr = regs->orig_ax;
		class = bpf_map_lookup_elem(&syscall_class, &nr);
		if (class)
			call = *class;
	}
#endif
	if (iowait)
		return call == BS_TSA_CALL_FD_WRITE || call == BS_TSA_CALL_SYNC ? BS_TSA_STATE_DISK_WRITE
										 : BS_TSA_STATE_DISK_READ;
	switch (call) {
	case BS_TSA_CALL_NET:
		return BS_TSA_STATE_NET;
	case BS_TSA_CALL_LOCK:
		return BS_TSA_STATE_LOCK;
	case BS_TSA_CALL_SYNC:
		return BS_TSA_STATE_SYNC;
	case BS_TSA_CALL_FD_READ:
	case BS_TSA_CALL_FD_WRITE:
#if defined(__TARGET_ARCH_x86)
		socket = fd_is_socket(task, (long)regs->di);
#else
		socket = false;
#endif
		return socket ? BS_TSA_STATE_NET : BS_TSA_STATE_OTHER;
	default:
		return BS_TSA_STATE_OTHER;
	}
}

static __always_inline void send_episode(struct tsa_thread *t, __u32 tid, __u64 now)
{
	struct tsa_episode *e = bs_reserve(&episodes, sizeof(*e));

	if (!e)
		return;
	e->off_ns = t->off_ns;
	e->wake_ns = t->wake_ns ? t->wake_ns : now;
	e->on_ns = now;
	e->tid = tid;
	e->tgid = t->tgid;
	e->state = t->blocked;
	e->pad = 0;
	bs_submit(&episodes, e);
}

SEC("tp_btf/sched_entry_tp")
int BPF_PROG(on_schedule, bool preempt)
{
	__u32 zero = 0;
	__u64 *at = bpf_map_lookup_elem(&schedule_ns, &zero);

	if (at)
		*at = bpf_ktime_get_ns();
	return 0;
}

/* When `task`, leaving this CPU, arrived on it, in bpf_ktime_get_ns's time (0: the kernel does not say):
 * sched_info.last_arrival is on its runqueue's clock, which the switch has just updated. */
static __always_inline __u64 arrived_at(struct task_struct *task)
{
	__u64 now = bpf_ktime_get_ns(), clock = bs_rq_clock(task), arrival;

	arrival = BPF_CORE_READ(task, sched_info.last_arrival);
	if (!clock || !arrival || arrival > clock || clock - arrival >= now)
		return 0;
	return now - (clock - arrival);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	__u64 now = bpf_ktime_get_ns(), *entered, arrival;
	__u32 zero = 0;
	struct tsa_thread *t;
	__u8 state;

	if (have_entry && (entered = bpf_map_lookup_elem(&schedule_ns, &zero)) && *entered &&
	    *entered <= now)
		now = *entered;

	if ((t = thread_of(prev, BS_TSA_STATE_CPU, now))) {
		/* Leaving a CPU it was never seen to get: the kernel ran no program for its switch-in (the
		 * switches from one VM's init process's threads reach none), so its time since it arrived
		 * would count as the run queue's. */
		if (!t->exited && t->state != BS_TSA_STATE_CPU && (arrival = arrived_at(prev)) &&
		    arrival > t->since && arrival < now) {
			enter(t, BS_TSA_STATE_CPU, arrival);
			if (timeline)
				send_episode(t, prev->pid, arrival);
		}
		if (prev_state & TSA_TASK_DEAD) {
			enter(t, BS_TSA_STATE_COUNT, now); /* closes its time on the CPU; no state after */
			t->exited = 1;
		} else {
			/* Preempted, or woken before it could block: runnable throughout. */
			state = preempt || prev_state == TSA_TASK_RUNNING ? BS_TSA_STATE_RUNQUEUE
									   : blocked_state(prev);
			enter(t, state, now);
			if ((state == BS_TSA_STATE_DISK_READ || state == BS_TSA_STATE_DISK_WRITE) &&
			    bpf_core_field_exists(prev->se.sched_delayed) && BPF_CORE_READ(prev, se.sched_delayed))
				t->delayed_iowaits++;
			t->off_ns = now;
			t->blocked = state;
			t->wake_ns = state == BS_TSA_STATE_RUNQUEUE ? now : 0;
		}
	}
	if ((t = thread_of(next, BS_TSA_STATE_CPU, now)) && !t->exited && t->state != BS_TSA_STATE_CPU) {
		enter(t, BS_TSA_STATE_CPU, now);
		if (timeline)
			send_episode(t, next->pid, now);
	}
	return 0;
}

static __always_inline void woken(struct task_struct *p)
{
	__u64 now = bpf_ktime_get_ns();
	struct tsa_thread *t = thread_of(p, BS_TSA_STATE_RUNQUEUE, now);

	if (!t || t->exited || t->state == BS_TSA_STATE_CPU || t->state == BS_TSA_STATE_RUNQUEUE)
		return;
	enter(t, BS_TSA_STATE_RUNQUEUE, now);
	t->wake_ns = now;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(on_wakeup, struct task_struct *p)
{
	woken(p);
	return 0;
}

/* A new thread waits for its first CPU from here; a new process of a component's process belongs to
 * that component (the current task is its parent). */
SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(on_wakeup_new, struct task_struct *p)
{
	struct task_struct *parent = bpf_get_current_task_btf();
	__u32 tgid = p->tgid, parent_tgid = parent->tgid, *component;

	if (bs_by_set && tgid != parent_tgid) {
		component = bpf_map_lookup_elem(&bs_set_tgids, &parent_tgid);
		if (component)
			bpf_map_update_elem(&bs_set_tgids, &tgid, component, BPF_ANY);
	}
	thread_of(p, BS_TSA_STATE_RUNQUEUE, bpf_ktime_get_ns());
	return 0;
}
