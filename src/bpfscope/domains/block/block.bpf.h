/* Block request tracking shared by every bpfscope block I/O tool, so that none keeps its own copy.
 *
 * A request's life, as the BTF tracepoints show it (each gets the struct request *):
 *
 *   block_io_start     the request is made from a bio, in the context of the task that submitted the
 *                      I/O: the only place where "who did this I/O" is known (Linux 6.5 and later)
 *   block_rq_insert    handed to the I/O scheduler; requests issued directly (no scheduler, or a
 *                      bypass) never pass here
 *   block_rq_issue     handed to the driver: device time starts; again after a requeue
 *   block_rq_complete  the device is done with nr_bytes of it (all of it, except on partial completions)
 *   block_rq_merge     merged into another request and freed: it will never complete
 *
 * Requests are keyed by their address, as libbpf-tools does: exact, and bounded, since requests come
 * from per-queue preallocated pools (so an entry whose request was freed on a path we do not see is
 * overwritten when the same request is used again, and cannot accumulate).
 *
 * A tool includes this header after vmlinux.h and the libbpf headers, and calls the helpers from its
 * own programs, one per tracepoint it needs:
 *
 *   SEC("tp_btf/block_io_start")    int BPF_PROG(io_start, struct request *rq)    { bs_rq_submitter(rq); ... }
 *   SEC("tp_btf/block_rq_insert")   int BPF_PROG(rq_insert, struct request *rq)   { bs_rq_inserted(rq); ... }
 *   SEC("tp_btf/block_rq_issue")    int BPF_PROG(rq_issue, struct request *rq)    { bs_rq_issued(rq); ... }
 *   SEC("tp_btf/block_rq_merge")    int BPF_PROG(rq_merge, struct request *rq)    { bs_rq_forget(rq); ... }
 *   SEC("tp_btf/block_rq_complete") int BPF_PROG(rq_complete, struct request *rq, blk_status_t error,
 *                                                unsigned int nr_bytes)
 *   {
 *           struct bs_rq_start *s = bs_rq_get(rq);
 *           ... use s (NULL: the request started before the tool attached) ...
 *           if (bs_rq_done(rq, nr_bytes))
 *                   bs_rq_forget(rq);
 *   }
 *
 * Attach block_rq_complete first and block_rq_issue last (libbpf attaches in the order the programs
 * appear in the file): a request caught half-way while the programs attach then has no issue time, and
 * is dropped at completion instead of being timed from the wrong point or counted as unseen.
 *
 * Some completions are seen by no program: measured on a virtio disk at 10k to 65k requests a second,
 * up to 0.3% of requests, often in runs as long as the submitter's queue depth, while /sys/block/DISK/stat
 * counts them and no recursion miss is counted; bpftrace on the classic tracepoint missed as many. Such
 * a request leaves its entry behind; when the request is used again, bs_rq_submitter counts it in
 * bs_rq_unseen, which the tools report with their losses.
 *
 * Each object that includes this header has its own bs_rq_start map: tools do not share state.
 * A tool that wants no insert time (queue time) may leave block_rq_insert out; one whose kernel lacks
 * block_io_start (before 6.5) may leave that out: tasks are then those that inserted or issued, and
 * unseen completions go uncounted.
 *
 * Also here: the disk a request is for (bs_rq_dev, dev_t as the kernel encodes it), its operation
 * (bs_rq_op: the kernel's enum req_op) and its flags in a layout of our own (bs_rq_flags: enum
 * bs_rq_flag, the same on every kernel), and the -d DISK filter (bs_targ_dev, bs_rq_dev_selected) and
 * -p/--cgroup filters on the submitter (bs_rq_selected). The enums are in BTF (BS_ENUM): disks.py reads
 * their names from there.
 */
#ifndef BPFSCOPE_BLOCK_BPF_H
#define BPFSCOPE_BLOCK_BPF_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "bpfscope.bpf.h"

#define BS_TASK_COMM_LEN 16
/* Requests tracked at once, over all disks: far more than the request pools of a few disks hold. */
#define BS_RQ_MAX_TRACKED 16384

/* dev_t inside the kernel (include/linux/kdev_t.h): 12-bit major, 20-bit minor. */
#define BS_MINORBITS 20
#define BS_MKDEV(major, minor) (((__u32)(major) << BS_MINORBITS) | (__u32)(minor))

/* The low bits of cmd_flags are the operation (REQ_OP_BITS is 8 since Linux 4.10). */
#define BS_REQ_OP_MASK 0xff

/* bs_rq_flags(): request flags in bit positions of our own, since the kernel's have moved between
 * versions. */
enum bs_rq_flag {
	BS_RQ_SYNC = 1U << 0,
	BS_RQ_META = 1U << 1,
	BS_RQ_FUA = 1U << 2,
	BS_RQ_PREFLUSH = 1U << 3,
	BS_RQ_RAHEAD = 1U << 4,
	BS_RQ_BACKGROUND = 1U << 5,
	BS_RQ_PRIO = 1U << 6,
	BS_RQ_NOWAIT = 1U << 7,
};
BS_ENUM(bs_rq_flag);

/* bs_rq_start.task_from: where the task in the entry was seen. */
enum bs_task_from {
	BS_TASK_NONE = 0,
	BS_TASK_SUBMITTER = 1, /* block_io_start: the task that submitted the I/O */
	BS_TASK_INSERTER = 2,  /* block_rq_insert, for requests made without block_io_start */
	BS_TASK_ISSUER = 3,    /* block_rq_issue: often a kworker dispatching the queue */
};
BS_ENUM(bs_task_from);

struct bs_rq_start {
	__u64 insert_ns;   /* first block_rq_insert (bpf_ktime_get_ns), 0 if never inserted */
	__u64 issue_ns;	   /* last block_rq_issue, 0 if not issued (yet) */
	__u64 cgroup_id;   /* the task's cgroup v2 id */
	__u32 bytes;	   /* request size when issued */
	__u32 tgid;	   /* the task's process id, 0 if unknown */
	__u32 pid;	   /* and thread id */
	__u16 task_from;   /* enum bs_task_from */
	__u16 self;	   /* the task is bpfscope or its child: never shown (bs_task_is_self) */
	char comm[BS_TASK_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BS_RQ_MAX_TRACKED);
	__type(key, struct request *);
	__type(value, struct bs_rq_start);
} bs_rq_start SEC(".maps");

/* Requests that were issued and whose completion no program saw: found when block_io_start reuses the
 * request while its entry still holds an issue time. Read by user space through .bss (core/block.py),
 * so that such losses are reported, not silent. */
__u64 bs_rq_unseen = 0;
/* Requests that could not be tracked because bs_rq_start was full (reported by the runtime). */
__u64 bs_rq_dropped = 0;

/* -d DISK: the disk's dev_t (BS_MKDEV), 0 for every disk. Set from user space before load. */
const volatile __u32 bs_targ_dev = 0;

static __always_inline void bs_rq_fill_task(struct bs_rq_start *s, __u32 from)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	s->tgid = pid_tgid >> 32;
	s->pid = (__u32)pid_tgid;
	s->cgroup_id = bpf_get_current_cgroup_id();
	s->task_from = from;
	s->self = bs_task_is_self();
	bpf_get_current_comm(s->comm, sizeof(s->comm));
}

/* From tp_btf/block_io_start, in the submitter's context: a fresh entry, which also replaces any left
 * by an earlier use of the same request that we did not see end. */
static __always_inline void bs_rq_submitter(struct request *rq)
{
	struct bs_rq_start *old = bpf_map_lookup_elem(&bs_rq_start, &rq);
	struct bs_rq_start s = {};

	if (old && old->issue_ns)
		__sync_fetch_and_add(&bs_rq_unseen, 1);
	bs_rq_fill_task(&s, BS_TASK_SUBMITTER);
	if (bpf_map_update_elem(&bs_rq_start, &rq, &s, BPF_ANY))
		__sync_fetch_and_add(&bs_rq_dropped, 1);
}

static __always_inline struct bs_rq_start *bs_rq_get(struct request *rq)
{
	return bpf_map_lookup_elem(&bs_rq_start, &rq);
}

/* The entry, made here with the current task when block_io_start did not make it. */
static __always_inline struct bs_rq_start *bs_rq_get_or_start(struct request *rq, __u32 from)
{
	struct bs_rq_start *s = bs_rq_get(rq);
	struct bs_rq_start fresh = {};

	if (s)
		return s;
	bs_rq_fill_task(&fresh, from);
	return bs_insert(&bs_rq_start, &rq, &fresh, &bs_rq_dropped);
}

/* From tp_btf/block_rq_insert. Only the first insert counts: a requeued request is inserted again, and
 * its queue time runs from when it first waited. */
static __always_inline struct bs_rq_start *bs_rq_inserted(struct request *rq)
{
	struct bs_rq_start *s = bs_rq_get_or_start(rq, BS_TASK_INSERTER);

	if (s && !s->insert_ns)
		s->insert_ns = bpf_ktime_get_ns();
	return s;
}

/* From tp_btf/block_rq_issue. The last issue counts: after a requeue, device time restarts. */
static __always_inline struct bs_rq_start *bs_rq_issued(struct request *rq)
{
	struct bs_rq_start *s = bs_rq_get_or_start(rq, BS_TASK_ISSUER);

	if (s) {
		s->issue_ns = bpf_ktime_get_ns();
		s->bytes = BPF_CORE_READ(rq, __data_len);
	}
	return s;
}

static __always_inline void bs_rq_forget(struct request *rq)
{
	bpf_map_delete_elem(&bs_rq_start, &rq);
}

/* At block_rq_complete: whether this completion ends the request. The tracepoint fires before the
 * request's remaining length is updated, so a partial completion covers less than __data_len. */
static __always_inline bool bs_rq_done(struct request *rq, unsigned int nr_bytes)
{
	return nr_bytes >= BPF_CORE_READ(rq, __data_len);
}

/* Kernels before 5.16 pointed at the disk from the request itself. */
struct request___rq_disk {
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

static __always_inline struct gendisk *bs_rq_disk(struct request *rq)
{
	struct request___rq_disk *old = (void *)rq;

	if (bpf_core_field_exists(old->rq_disk))
		return BPF_CORE_READ(old, rq_disk);
	return BPF_CORE_READ(rq, q, disk);
}

/* The whole disk's dev_t (BS_MKDEV), 0 when the request has no disk. */
static __always_inline __u32 bs_rq_dev(struct request *rq)
{
	struct gendisk *disk = bs_rq_disk(rq);

	if (!disk)
		return 0;
	return BS_MKDEV(BPF_CORE_READ(disk, major), BPF_CORE_READ(disk, first_minor));
}

/* The partition's dev_t (the whole disk's when the I/O is not to a partition), 0 when unknown
 * (passthrough requests have none). Linux 5.11 and later, where rq->part is a block_device. */
static __always_inline __u32 bs_rq_part_dev(struct request *rq)
{
	struct block_device *part = BPF_CORE_READ(rq, part);

	if (!part)
		return 0;
	return BPF_CORE_READ(part, bd_dev);
}

static __always_inline bool bs_rq_dev_selected(struct request *rq)
{
	return !bs_targ_dev || bs_rq_dev(rq) == bs_targ_dev;
}

/* -p and --cgroup (bpfscope.bpf.h) applied to the task that did the I/O, not to whichever task the
 * tracepoint runs in; bpfscope's own I/O is left out. */
static __always_inline bool bs_rq_selected(const struct bs_rq_start *s)
{
	return !s->self && bs_tgid_selected(s->tgid, s->cgroup_id);
}

static __always_inline __u32 bs_rq_op(struct request *rq)
{
	return BPF_CORE_READ(rq, cmd_flags) & BS_REQ_OP_MASK;
}

static __always_inline __u64 bs_rq_sector(struct request *rq)
{
	return BPF_CORE_READ(rq, __sector);
}

/* The kernel's bit for a request flag on the running kernel, 0 where it has no such flag. */
#define BS_REQ_BIT(name)                                                                             \
	(bpf_core_enum_value_exists(enum req_flag_bits, name)                                        \
		 ? 1U << bpf_core_enum_value(enum req_flag_bits, name)                                \
		 : 0U)

static __always_inline __u32 bs_rq_flags(struct request *rq)
{
	__u32 cmd = BPF_CORE_READ(rq, cmd_flags), flags = 0;

	if (cmd & BS_REQ_BIT(__REQ_SYNC))
		flags |= BS_RQ_SYNC;
	if (cmd & BS_REQ_BIT(__REQ_META))
		flags |= BS_RQ_META;
	if (cmd & BS_REQ_BIT(__REQ_FUA))
		flags |= BS_RQ_FUA;
	if (cmd & BS_REQ_BIT(__REQ_PREFLUSH))
		flags |= BS_RQ_PREFLUSH;
	if (cmd & BS_REQ_BIT(__REQ_RAHEAD))
		flags |= BS_RQ_RAHEAD;
	if (cmd & BS_REQ_BIT(__REQ_BACKGROUND))
		flags |= BS_RQ_BACKGROUND;
	if (cmd & BS_REQ_BIT(__REQ_PRIO))
		flags |= BS_RQ_PRIO;
	if (cmd & BS_REQ_BIT(__REQ_NOWAIT))
		flags |= BS_RQ_NOWAIT;
	return flags;
}

/* The programs that feed bs_rq_start, the same in every block tool (core/block.py's PROGRAMS names them;
 * a tool's autoload picks those it needs). Write it after the tool's own block_rq_complete program:
 * libbpf attaches in file order, and completion must come first (see the top of this file). */
#define BS_RQ_TRACKING_PROGRAMS                                                                      \
	SEC("tp_btf/block_rq_merge")                                                                 \
	int BPF_PROG(rq_merge, struct request *rq)                                                   \
	{                                                                                            \
		bs_rq_forget(rq);                                                                    \
		return 0;                                                                            \
	}                                                                                            \
	SEC("tp_btf/block_io_start")                                                                 \
	int BPF_PROG(io_start, struct request *rq)                                                   \
	{                                                                                            \
		bs_rq_submitter(rq);                                                                 \
		return 0;                                                                            \
	}                                                                                            \
	SEC("tp_btf/block_rq_insert")                                                                \
	int BPF_PROG(rq_insert, struct request *rq)                                                  \
	{                                                                                            \
		bs_rq_inserted(rq);                                                                  \
		return 0;                                                                            \
	}                                                                                            \
	SEC("tp_btf/block_rq_issue")                                                                 \
	int BPF_PROG(rq_issue, struct request *rq)                                                   \
	{                                                                                            \
		bs_rq_issued(rq);                                                                    \
		return 0;                                                                            \
	}

#endif /* BPFSCOPE_BLOCK_BPF_H */
