/* iostat: what /proc/diskstats cannot tell, per disk, aggregated in the kernel.
 *
 *   - queue depth on the device: at each issue, how many requests of that disk are on the device
 *     (this one included), as an exact histogram, and its time-average; diskstats only has the
 *     time-average over the whole block layer, I/O scheduler included (aqu-sz);
 *   - device latency: block_rq_issue -> block_rq_complete as a log-linear histogram, for percentiles
 *     where diskstats only has the mean (r_await, w_await, which also include scheduler time);
 *   - who does the I/O: requests and bytes per disk and process, from the submitting task.
 *
 * Everything is cumulative; user space reads the maps each interval and subtracts the previous read,
 * so intervals are exact and nothing is reset under the kernel's feet. Request tracking (submitter,
 * issue time) is block.bpf.h's.
 *
 * The depth is a counter: +1 at issue, -1 when the request leaves the device. A lost event would skew
 * it for good, and completions do go unseen (on a shared test machine the count drifted up by tens
 * of requests, most while other tools attached programs to the same tracepoints, with every program's
 * recursion_misses at 0). So a request still marked on the device when it cannot be is taken off the
 * count: when it is reused (io_start, rq_issue), and by a sweep every SWEEP_NS that asks the kernel
 * whether each tracked request is still in flight (sweep_timer).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"
#include "block.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Exact depth slots; deeper issues land in the last one. nr_requests is 256 on most disks and at most a
 * few thousand, and depth is bounded by the driver's tags, so the last slot is rarely reached. */
#define DEPTH_SLOTS 1024
#define MAX_DISKS 256
#define MAX_PROCS 4096
/* How often the sweep runs: a missed completion skews the depth for at most about this long. */
#define SWEEP_NS (100 * 1000 * 1000ULL)
/* The kernel marks a request in flight just after block_rq_issue: younger entries are left alone. */
#define SWEEP_MIN_AGE_NS (10 * 1000 * 1000ULL)
/* include/uapi/linux/time.h: a macro, so not in vmlinux.h. */
#define CLOCK_MONOTONIC 1

struct disk_io {
	__s64 inflight;	 /* issued, not yet completed or requeued: the depth right now */
	__u64 issued;	 /* issues counted (the depth histogram's total) */
	__u64 completed; /* completions with a known issue time (the latency histogram's total) */
	/* The integral of inflight over time (request-nanoseconds) up to changed_ns, when inflight last
	 * changed: over an interval, its growth divided by the interval's length is the time-average of
	 * requests on the device, what aqu-sz is for the whole block layer. */
	__u64 depth_ns;
	__u64 changed_ns;
	__u64 depth[DEPTH_SLOTS];
	struct bs_loglin_hist latency; /* nanoseconds on the device */
};

struct proc_key {
	__u32 dev;
	__u32 tgid;
};

struct proc_io {
	__u64 reads;
	__u64 writes; /* every other operation with data or not: writes, flushes, discards */
	__u64 read_bytes;
	__u64 write_bytes;
	__u64 device_ns; /* summed device time of this process's requests */
	char comm[BS_TASK_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_DISKS);
	__type(key, __u32); /* dev_t of the whole disk, BS_MKDEV */
	__type(value, struct disk_io);
} disks SEC(".maps");

/* LRU: a machine that starts many short-lived processes forgets the oldest instead of losing new ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, struct proc_key);
	__type(value, struct proc_io);
} procs SEC(".maps");

struct sweep {
	struct bpf_timer timer;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweep);
} sweeps SEC(".maps");

/* Requests taken off the depth count because their completion (or requeue) was never seen: lost
 * events, reported by user space with the other losses. */
__u64 unseen_ends = 0;
/* Disks the disks map had no room for (reported by the runtime). */
__u64 disks_dropped = 0;

/* 16 KiB: too big for the BPF stack, so new entries are copied from here. */
static const struct disk_io empty_disk = {};

static __always_inline struct disk_io *disk_of(__u32 dev)
{
	struct disk_io *d = bpf_map_lookup_elem(&disks, &dev);

	if (d)
		return d;
	return bs_insert(&disks, &dev, &empty_disk, &disks_dropped);
}

/* inflight changes by delta (+1 or -1); returns its value before. The time since the last change is
 * credited to the depth before this one. Two CPUs changing it at once may credit a stretch of a few
 * nanoseconds to a depth off by one: the exchange still splits time exactly between them. */
static __always_inline __s64 change_depth(struct disk_io *d, __s64 delta)
{
	__u64 now = bpf_ktime_get_ns(), last = __sync_lock_test_and_set(&d->changed_ns, now);
	__s64 before = __sync_fetch_and_add(&d->inflight, delta);

	if (last && now > last && before > 0)
		__sync_fetch_and_add(&d->depth_ns, (now - last) * before);
	return before;
}

/* A request we counted when it was issued is no longer on the device. */
static __always_inline void left_device(struct request *rq)
{
	__u32 dev = bs_rq_dev(rq);
	struct disk_io *d = bpf_map_lookup_elem(&disks, &dev);

	if (d)
		change_depth(d, -1);
}

/* Whoever turns an entry's issue time to 0 (or to a new issue time) takes the request off the device
 * count, and only they: the programs and the sweep race for it on different CPUs. */
static __always_inline bool claim(struct bs_rq_start *s, __u64 issued, __u64 value)
{
	return issued && __sync_val_compare_and_swap(&s->issue_ns, issued, value) == issued;
}

static long sweep_entry(struct bpf_map *map, struct request **key, struct bs_rq_start *s, __u64 *now)
{
	struct request *rq = *key;
	__u64 issued = s->issue_ns;

	if (!issued || *now < issued + SWEEP_MIN_AGE_NS)
		return 0;
	/* Idle: freed, or given back, with no completion or requeue seen. In flight or completing, it is
	 * (still, or again) the device's. */
	if (BPF_CORE_READ(rq, state) != MQ_RQ_IDLE || !claim(s, issued, 0))
		return 0;
	left_device(rq);
	__sync_fetch_and_add(&unseen_ends, 1);
	return 0;
}

static int sweep_timer(void *map, __u32 *key, struct sweep *sweep)
{
	__u64 now = bpf_ktime_get_ns();

	bpf_for_each_map_elem(&bs_rq_start, sweep_entry, &now, 0);
	bpf_timer_start(&sweep->timer, SWEEP_NS, 0);
	return 0;
}

/* Starts the sweep at the first issue (a timer can only be set up from a program); later calls find
 * it set up and do nothing. */
static __always_inline void start_sweep(void)
{
	__u32 zero = 0;
	struct sweep *sweep = bpf_map_lookup_elem(&sweeps, &zero);

	if (!sweep || bpf_timer_init(&sweep->timer, &sweeps, CLOCK_MONOTONIC))
		return;
	bpf_timer_set_callback(&sweep->timer, sweep_timer);
	bpf_timer_start(&sweep->timer, SWEEP_NS, 0);
}

/* Programs attach in the order they appear here: completion first, so that no request is counted on
 * the device before its completion can be seen. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bs_rq_start *s = bs_rq_get(rq);
	struct proc_key key = {};
	struct proc_io *p, fresh = {};
	struct disk_io *d;
	__u64 latency, issued;
	__u32 dev;

	if (!s)
		return 0; /* issued before we attached */
	if (!bs_rq_done(rq, nr_bytes))
		return 0; /* partial completion: still on the device */
	issued = s->issue_ns;
	if (!claim(s, issued, 0))
		goto forget;
	latency = bpf_ktime_get_ns() - issued;
	dev = bs_rq_dev(rq);
	d = bpf_map_lookup_elem(&disks, &dev);
	if (d) {
		change_depth(d, -1);
		__sync_fetch_and_add(&d->completed, 1);
		bs_hist_add_loglin(&d->latency, latency);
	}
	if (s->self)
		goto forget; /* the disk counts it; bpfscope is never a process it names */
	key.dev = dev;
	key.tgid = s->tgid;
	p = bpf_map_lookup_elem(&procs, &key);
	if (!p) {
		__builtin_memcpy(fresh.comm, s->comm, sizeof(fresh.comm));
		p = bs_insert(&procs, &key, &fresh, NULL);
		if (!p)
			goto forget;
	}
	if (bs_rq_op(rq) == REQ_OP_READ) {
		__sync_fetch_and_add(&p->reads, 1);
		__sync_fetch_and_add(&p->read_bytes, s->bytes);
	} else {
		__sync_fetch_and_add(&p->writes, 1);
		__sync_fetch_and_add(&p->write_bytes, s->bytes);
	}
	__sync_fetch_and_add(&p->device_ns, latency);
forget:
	bs_rq_forget(rq);
	return 0;
}

/* The device gave the request back (busy, out of resources): it is no longer on the device, and will
 * be issued again. Its entry stays, for the submitter and insert time. */
SEC("tp_btf/block_rq_requeue")
int BPF_PROG(rq_requeue, struct request *rq)
{
	struct bs_rq_start *s = bs_rq_get(rq);

	if (s && claim(s, s->issue_ns, 0))
		left_device(rq);
	return 0;
}

SEC("tp_btf/block_rq_merge")
int BPF_PROG(rq_merge, struct request *rq)
{
	struct bs_rq_start *s = bs_rq_get(rq);

	if (s && claim(s, s->issue_ns, 0))
		left_device(rq);
	bs_rq_forget(rq);
	return 0;
}

/* Reuse of a request whose entry still says it is on the device: its completion was never seen (events
 * can be lost, e.g. while other programs attach to these tracepoints), so it leaves the count now. With
 * requests drawn from fixed pools, every such miss is corrected once its request is used again. */
SEC("tp_btf/block_io_start")
int BPF_PROG(io_start, struct request *rq)
{
	struct bs_rq_start *s;

	if (!bs_rq_dev_selected(rq))
		return 0;
	s = bs_rq_get(rq);
	if (s && claim(s, s->issue_ns, 0)) {
		left_device(rq);
		__sync_fetch_and_add(&unseen_ends, 1);
	}
	bs_rq_submitter(rq);
	return 0;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(rq_issue, struct request *rq)
{
	struct bs_rq_start *s;
	struct disk_io *d;
	__s64 depth;
	__u64 slot;

	if (!bs_rq_dev_selected(rq))
		return 0;
	start_sweep();
	/* Already marked issued: a requeue we missed (the driver was busy and gave it back), or a reuse
	 * after a completion we missed (requests made without block_io_start, such as flushes). Either way
	 * it is already counted on the device, once. */
	s = bs_rq_get(rq);
	if (s && claim(s, s->issue_ns, bpf_ktime_get_ns())) {
		__sync_fetch_and_add(&unseen_ends, 1);
		bs_rq_issued(rq);
		return 0;
	}
	if (!bs_rq_issued(rq))
		return 0; /* tracking map full: neither counted now nor at completion */
	d = disk_of(bs_rq_dev(rq));
	if (!d)
		return 0;
	depth = change_depth(d, 1) + 1;
	/* Requests issued before we attached are never counted, so depth can read low while they
	 * complete; never below this request itself. */
	slot = depth < 1 ? 1 : depth;
	slot = bs_bound_slot(slot, DEPTH_SLOTS);
	__sync_fetch_and_add(&d->depth[slot], 1);
	__sync_fetch_and_add(&d->issued, 1);
	return 0;
}
