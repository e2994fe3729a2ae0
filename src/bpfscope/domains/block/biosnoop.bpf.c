/* biosnoop: one record per block I/O request as it completes, with the task that submitted it, its
 * disk, operation, sector, size, time queued in the I/O scheduler and time on the device.
 *
 * Request tracking (submitter, insert and issue times) is block.bpf.h's; this file only decides, at
 * completion, whether a request is shown and sends it. Filters (-d, -p, --cgroup, --min-lat) run here,
 * so requests that are not shown cost no ring-buffer space.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"
#include "block.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* --min-lat: requests that spent less than this on the device are not sent. */
const volatile __u64 min_latency_ns = 0;

struct bio_event {
	__u64 ts;	  /* completion, bpf_ktime_get_ns() */
	__u64 sector;
	__u64 queue_ns;	  /* block_rq_insert -> block_rq_issue; 0 if never inserted */
	__u64 latency_ns; /* block_rq_issue -> block_rq_complete */
	__u32 dev;	  /* whole disk, BS_MKDEV */
	__u32 bytes;
	__u32 tgid;
	enum req_op op;
	__u32 flags;	  /* enum bs_rq_flag bits */
	enum bs_task_from task_from; /* where tgid and comm were seen */
	__s32 error;	  /* blk_status_t, 0 on success */
	__u32 pad;
	char comm[BS_TASK_COMM_LEN];
};

/* 16 MiB: about 190k records, two seconds of a fast NVMe disk, while user space is busy printing. */
BS_RINGBUF(events, 16 << 20, struct bio_event);

/* Completion first, issue last: see the attach order in block.bpf.h. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bs_rq_start *s = bs_rq_get(rq);
	struct bio_event *e;
	__u64 now, latency;

	if (!s)
		return 0; /* issued before we attached */
	if (!bs_rq_done(rq, nr_bytes))
		return 0; /* partial completion: the request is shown once, when it ends */
	if (!s->issue_ns || !bs_rq_dev_selected(rq) || !bs_rq_selected(s))
		goto forget;
	now = bpf_ktime_get_ns();
	latency = now - s->issue_ns;
	if (latency < min_latency_ns)
		goto forget;
	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		goto forget;
	e->ts = now;
	e->sector = bs_rq_sector(rq);
	e->queue_ns = s->insert_ns && s->insert_ns <= s->issue_ns ? s->issue_ns - s->insert_ns : 0;
	e->latency_ns = latency;
	e->dev = bs_rq_dev(rq);
	e->bytes = s->bytes;
	e->tgid = s->tgid;
	e->op = bs_rq_op(rq);
	e->flags = bs_rq_flags(rq);
	e->task_from = s->task_from;
	e->error = error;
	e->pad = 0;
	__builtin_memcpy(e->comm, s->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
forget:
	bs_rq_forget(rq);
	return 0;
}

BS_RQ_TRACKING_PROGRAMS
