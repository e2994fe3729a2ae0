/* biotop: block I/O per process and disk, counted in the kernel: reads, writes, bytes, device time, and
 * a log-linear latency histogram per row for its p99.
 *
 * Rows are keyed by the process that submitted the I/O (block.bpf.h records it at block_io_start), so
 * direct and synchronous I/O is charged to the process that asked for it, as in /proc/PID/io. Counters
 * only grow: user space shows each interval's difference, so nothing falls between two reads.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"
#include "block.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_ROWS 10240
/* Histograms are about 8 KiB each: fewer of them, and allocated only when used. */
#define MAX_HISTS 4096

struct row_key {
	__u32 tgid;
	__u32 dev; /* whole disk, BS_MKDEV */
	char comm[BS_TASK_COMM_LEN];
};

struct row_stats {
	__u64 reads;
	__u64 writes; /* writes of data (write, write zeroes, zone append) */
	__u64 others; /* flushes, discards and other operations without data to count */
	__u64 read_bytes;
	__u64 write_bytes;
	__u64 total_ns; /* device time, block_rq_issue -> block_rq_complete */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ROWS);
	__type(key, struct row_key);
	__type(value, struct row_stats);
} rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_HISTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct row_key);
	__type(value, struct bs_loglin_hist);
} hists SEC(".maps");

/* Requests the rows map had no room for, and requests left out of the p99 because the hists map was
 * full: reported by the runtime with the tool's losses. */
__u64 rows_dropped = 0;
__u64 hists_dropped = 0;

static const struct bs_loglin_hist empty_hist = {};

/* Completion first, issue last: see the attach order in block.bpf.h. */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bs_rq_start *s = bs_rq_get(rq);
	struct row_stats *st, zero = {};
	struct bs_loglin_hist *h;
	struct row_key key = {};
	__u64 latency;
	__u32 op;

	if (!s)
		return 0; /* issued before we attached */
	if (!bs_rq_done(rq, nr_bytes))
		return 0; /* partial completion: counted once, when the request ends */
	if (!s->issue_ns || !bs_rq_dev_selected(rq) || !bs_rq_selected(s))
		goto forget;
	latency = bpf_ktime_get_ns() - s->issue_ns;
	key.tgid = s->tgid;
	key.dev = bs_rq_dev(rq);
	__builtin_memcpy(key.comm, s->comm, sizeof(key.comm));

	st = bpf_map_lookup_elem(&rows, &key);
	if (!st) {
		st = bs_insert(&rows, &key, &zero, &rows_dropped);
		if (!st)
			goto forget;
	}
	op = bs_rq_op(rq);
	if (op == REQ_OP_READ) {
		__sync_fetch_and_add(&st->reads, 1);
		__sync_fetch_and_add(&st->read_bytes, s->bytes);
	} else if (op == REQ_OP_WRITE || op == REQ_OP_WRITE_ZEROES || op == REQ_OP_ZONE_APPEND) {
		__sync_fetch_and_add(&st->writes, 1);
		__sync_fetch_and_add(&st->write_bytes, s->bytes);
	} else {
		__sync_fetch_and_add(&st->others, 1);
	}
	__sync_fetch_and_add(&st->total_ns, latency);

	h = bpf_map_lookup_elem(&hists, &key);
	if (!h)
		h = bs_insert(&hists, &key, &empty_hist, &hists_dropped);
	if (h)
		bs_hist_add_loglin(h, latency);
forget:
	bs_rq_forget(rq);
	return 0;
}

BS_RQ_TRACKING_PROGRAMS
