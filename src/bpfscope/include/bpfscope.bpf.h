/* What every bpfscope BPF program shares: the task filters a collector's configuration sets (-p,
 * --cgroup, and bpfscope itself left out), ring-buffer output that counts what it could not send, so no
 * loss is silent, and the macros that put record and enum types into BTF, where user space reads them.
 * Include after vmlinux.h, <bpf/bpf_helpers.h> and <bpf/bpf_core_read.h>.
 */
#ifndef BPFSCOPE_BPF_H
#define BPFSCOPE_BPF_H

#include <bpf/bpf_core_read.h>

#include "hist.bpf.h"

/* Filters, set from user space before load: the verifier sees them as constants and removes the
 * branches of an unset filter. 0 means no filter. */
const volatile __u32 bs_targ_tgid = 0;
const volatile __u64 bs_targ_cgroup = 0;
/* bpfscope's own process: it and its children are never measured unless asked (0: measure them). */
const volatile __u32 bs_self_tgid = 0;

/* Events a ring buffer had no room for; read by user space through .bss (BpfObject.dropped). */
__u64 bs_dropped = 0;

/* Paced wake-ups (set by collectors whose programs run inside the calls of the programs they watch): a
 * record wakes the consumer only once the ring is a quarter full, and the consumer drains on a timer
 * instead. By default the kernel wakes a consumer that has caught up for every record, and that wake-up
 * lands in the traced task's own call: an HTTP client at 300 requests/s, traced, logged each request a
 * p90 of 31-37 us longer than its traced calls took, paced 12-19 us. Not for a consumer of heavy
 * traffic: the agent's request tracer under a mesh's 48 MB/s, paced, spent 14.5-15.2% of the machine
 * in the agent and 7.4-7.5% in BPF against 7.1-7.4% and 5.4-5.5% woken per record (its batches grew
 * 50 ms large). */
const volatile bool bs_paced_wakeup = false;

/* A paced record's wake-up flags: none until the ring is a quarter full. */
static __always_inline __u64 bs_paced_flags(void *ringbuf)
{
	return bpf_ringbuf_query(ringbuf, BPF_RB_AVAIL_DATA) >= bpf_ringbuf_query(ringbuf, BPF_RB_RING_SIZE) / 4
		       ? BPF_RB_FORCE_WAKEUP
		       : BPF_RB_NO_WAKEUP;
}

static __always_inline __u64 bs_wakeup(void *ringbuf)
{
	return bs_paced_wakeup ? bs_paced_flags(ringbuf) : 0;
}

/* Whether the current task is bpfscope or one of its children (its own start-up, the helpers it runs):
 * the tgid first, which costs nothing; the parent's only for other tasks, read through the task's BTF
 * pointer (two plain loads: about 40 ns less per event than two bpf_probe_read_kernel calls, measured on
 * vfsstat's read path). */
static __always_inline bool bs_task_is_self(void)
{
	if (!bs_self_tgid)
		return false;
	if ((bpf_get_current_pid_tgid() >> 32) == bs_self_tgid)
		return true;
	return bpf_get_current_task_btf()->real_parent->tgid == bs_self_tgid;
}

/* The clock of the runqueue `task` is on (rq->clock, which a switch has just updated when read from
 * sched_switch), on which the scheduler dates sched_info.last_arrival: 0 where the kernel has no
 * cfs_rq->rq (CONFIG_FAIR_GROUP_SCHED off). offcputime and tsa date a switch-in no program saw with it. */
static __always_inline __u64 bs_rq_clock(const struct task_struct *task)
{
	if (!bpf_core_field_exists(struct cfs_rq, rq))
		return 0;
	return BPF_CORE_READ(task, se.cfs_rq, rq, clock);
}

static __always_inline bool bs_task_selected(void)
{
	if (bs_targ_tgid && (bpf_get_current_pid_tgid() >> 32) != bs_targ_tgid)
		return false;
	if (bs_targ_cgroup && bpf_get_current_cgroup_id() != bs_targ_cgroup)
		return false;
	return !bs_task_is_self();
}

/* For events attributed to a task recorded earlier (a request's submitter, a socket's owner), where the
 * current task is whoever the kernel runs: the filters on the recorded tgid and cgroup. Record owners
 * only where bs_task_selected() or !bs_task_is_self() held, so that bpfscope's own stay out. */
static __always_inline bool bs_tgid_selected(__u32 tgid, __u64 cgroup)
{
	if (bs_targ_tgid && tgid != bs_targ_tgid)
		return false;
	if (bs_targ_cgroup && cgroup != bs_targ_cgroup)
		return false;
	return true;
}

static __always_inline void *bs_reserve(void *ringbuf, __u64 size)
{
	void *event = bpf_ringbuf_reserve(ringbuf, size, 0);

	if (!event)
		__sync_fetch_and_add(&bs_dropped, 1);
	return event;
}

/* Commits a record reserved with bs_reserve, waking the consumer as bs_paced_wakeup says. */
static __always_inline void bs_submit(void *ringbuf, void *event)
{
	bpf_ringbuf_submit(event, bs_wakeup(ringbuf));
}

/* A record of variable length (a header and `size - header` bytes of payload), copied from `data`
 * (per-CPU scratch space): bpf_ringbuf_reserve takes only constant sizes. The ring must be declared with
 * BS_RINGBUF_VAR; user space gets each record zero-padded to the full struct with its length. */
static __always_inline int bs_output_flags(void *ringbuf, void *data, __u64 size, __u64 flags)
{
	int err = bpf_ringbuf_output(ringbuf, data, size, flags);

	if (err)
		__sync_fetch_and_add(&bs_dropped, 1);
	return err;
}

/* The same, woken as bs_paced_wakeup says. */
static __always_inline int bs_output(void *ringbuf, void *data, __u64 size)
{
	return bs_output_flags(ringbuf, data, size, bs_wakeup(ringbuf));
}

/* After a lookup found nothing: insert `init` at `key` and return the map's own copy, or NULL when the
 * map is full (counted in *dropped, unless NULL). Another CPU may insert the same key first: BPF_NOEXIST
 * then keeps its value, and the lookup returns that. */
static __always_inline void *bs_insert(void *map, const void *key, const void *init, __u64 *dropped)
{
	void *value;

	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	value = bpf_map_lookup_elem(map, key);
	if (!value && dropped)
		__sync_fetch_and_add(dropped, 1);
	return value;
}

/* A ring buffer of `record_type` events. The pointer global records the event type in the object's
 * BTF (clang emits no BTF for types only local variables use), which is how user space learns the
 * record layout without declaring it again. */
#define BS_RINGBUF(name, bytes, record_type)                                                         \
	struct {                                                                                     \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                                                  \
		__uint(max_entries, bytes);                                                          \
	} name SEC(".maps");                                                                         \
	record_type *bs_record__##name __attribute__((unused)) = 0

/* A ring buffer of records of `record_type` cut short to their length (bs_output): the struct is the
 * longest record; fixed-size rings keep their batch speed, these are decoded one record at a time. */
#define BS_RINGBUF_VAR(name, bytes, record_type)                                                     \
	BS_RINGBUF(name, bytes, record_type);                                                        \
	record_type *bs_varlen__##name __attribute__((unused)) = 0

/* Puts an enum into the object's BTF (clang emits no BTF for an enum only used as constants), where
 * user space reads its names: no C enum is copied by hand into Python. */
#define BS_ENUM(enum_name) enum enum_name *bs_enum__##enum_name __attribute__((unused)) = 0

#endif
