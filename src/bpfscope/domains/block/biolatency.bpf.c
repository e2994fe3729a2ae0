/* biolatency: block I/O latency as in-kernel log-linear histograms (nanoseconds), one for everything,
 * or one per disk (-D) and/or per operation and flags (-F). Device time is block_rq_issue ->
 * block_rq_complete; with -Q, from block_rq_insert, so time queued in the I/O scheduler is included.
 *
 * Histograms only grow: user space reads them each interval and shows the difference, so no sample is
 * lost between reads. Request tracking is block.bpf.h's.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"
#include "block.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_HISTS 1024

const volatile bool per_disk = false;
const volatile bool per_flags = false;
const volatile bool queued = false;
/* Device time from the issue time the kernel itself keeps in the request (rq->io_start_time_ns, set
 * when the queue collects I/O statistics, as writeback throttling makes it do): one program per I/O and
 * no tracking map, so far less overhead. User space turns it on only where the kernel keeps that time. */
const volatile bool kernel_clock = false;

/* Completions the kernel gave no issue time (kernel_clock mode): reported, never silently dropped. */
__u64 untimed = 0;

struct hist_key {
	__u32 dev;   /* whole disk (BS_MKDEV) with -D, else 0 */
	__u32 op;    /* enum req_op with -F, else 0 */
	__u32 flags; /* BS_RQ_* with -F, else 0 */
};

struct hist_value {
	__u64 total_ns; /* for the mean, which the buckets only bound */
	struct bs_loglin_hist hist;
};

/* Not preallocated: a value is about 8 KiB, and most runs use one or a few keys. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_HISTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct hist_key);
	__type(value, struct hist_value);
} hists SEC(".maps");

/* Requests not counted because the hists map was full (reported by the runtime). */
__u64 hists_dropped = 0;

static const struct hist_value empty_value = {};

static __always_inline void record(struct request *rq, __u64 latency)
{
	struct hist_key key = {};
	struct hist_value *v;

	if (per_disk)
		key.dev = bs_rq_dev(rq);
	if (per_flags) {
		key.op = bs_rq_op(rq);
		key.flags = bs_rq_flags(rq);
	}
	v = bpf_map_lookup_elem(&hists, &key);
	if (!v) {
		v = bs_insert(&hists, &key, &empty_value, &hists_dropped);
		if (!v)
			return;
	}
	__sync_fetch_and_add(&v->total_ns, latency);
	bs_hist_add_loglin(&v->hist, latency);
}

/* Completion first, issue last: see the attach order in block.bpf.h. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bs_rq_start *s;
	__u64 now = bpf_ktime_get_ns(), start;

	if (kernel_clock) {
		if (!bs_rq_done(rq, nr_bytes) || !bs_rq_dev_selected(rq))
			return 0;
		start = BPF_CORE_READ(rq, io_start_time_ns);
		if (!start || start > now)
			__sync_fetch_and_add(&untimed, 1);
		else
			record(rq, now - start);
		return 0;
	}
	s = bs_rq_get(rq);
	if (!s)
		return 0; /* issued before we attached */
	if (!bs_rq_done(rq, nr_bytes))
		return 0; /* partial completion: counted once, when the request ends */
	if (!s->issue_ns || !bs_rq_dev_selected(rq) || !bs_rq_selected(s))
		goto forget;
	/* A request issued directly, without the scheduler, was never queued: its queue time is zero. */
	start = queued && s->insert_ns && s->insert_ns <= s->issue_ns ? s->insert_ns : s->issue_ns;
	record(rq, now - start);
forget:
	bs_rq_forget(rq);
	return 0;
}

BS_RQ_TRACKING_PROGRAMS
