/* writeback: the kernel's flushes of dirty pages, by backing device and reason, and the writers it
 * throttles, counted in the kernel from the writeback tracepoints.
 *
 * A flush is one wb_writeback() run of a flusher thread, between writeback:writeback_start and
 * writeback:writeback_written, both carrying the work's reason (background, vmscan, sync, periodic,
 * laptop_timer, fs_free_space, forker_thread, foreign_flush) and nr_pages, the work's remaining page
 * budget: what it consumed between the two is the pages the flush wrote (wb_writeback subtracts each
 * inode's written pages from it). Pages written outside flusher work (fsync, O_SYNC, direct reclaim of
 * a single page) are not flushes and are not here: /proc/vmstat nr_written has all of them.
 *
 * Throttled writers: writeback:balance_dirty_pages fires when balance_dirty_pages() makes a writer
 * that dirties pages too fast sleep (dirty pages above the point where throttling starts); `pause` is
 * the sleep it chose, in ms (events with pause <= 0 let the writer through and are not counted).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_FLUSH_KEYS 1024
#define MAX_WRITERS 4096

struct flush_key {
	char bdi[32]; /* the backing device, "major:minor" */
	__u32 reason; /* enum wb_reason */
};

struct flush_stats {
	__u64 flushes;
	__u64 pages;
};

struct flush_start {
	long nr_pages;
	__u32 reason;
};

struct writer_stats {
	__u64 pauses;
	__u64 pause_ms;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_FLUSH_KEYS);
	__type(key, struct flush_key);
	__type(value, struct flush_stats);
} flushes SEC(".maps");

/* The flush each flusher thread is in, by thread id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct flush_start);
} running SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_WRITERS);
	__type(key, __u32);
	__type(value, struct writer_stats);
} writers SEC(".maps");

/* Flushes whose start was not seen (they began before we attached) are counted without pages. */
__u64 flushes_unpaired = 0;
/* Events not counted because a map was full. */
__u64 flushes_dropped = 0;
__u64 pauses_dropped = 0;
/* All throttling, whatever the writers map held. */
__u64 pauses_total = 0;
__u64 pause_ms_total = 0;

SEC("tracepoint/writeback/writeback_start")
int writeback_start(struct trace_event_raw_writeback_work_class *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct flush_start start = { .nr_pages = ctx->nr_pages, .reason = ctx->reason };

	bpf_map_update_elem(&running, &tid, &start, BPF_ANY);
	return 0;
}

SEC("tracepoint/writeback/writeback_written")
int writeback_written(struct trace_event_raw_writeback_work_class *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct flush_stats *s, zero = {};
	struct flush_key key = {};
	struct flush_start *start;
	long pages = 0;

	/* Copied with a helper: the verifier refuses word loads from the record at a computed offset. */
	bpf_probe_read_kernel(key.bdi, sizeof(key.bdi), ctx->name);
	key.reason = ctx->reason;
	start = bpf_map_lookup_elem(&running, &tid);
	if (start) {
		pages = start->nr_pages - ctx->nr_pages;
		bpf_map_delete_elem(&running, &tid);
	} else {
		__sync_fetch_and_add(&flushes_unpaired, 1);
	}
	s = bpf_map_lookup_elem(&flushes, &key);
	if (!s) {
		s = bs_insert(&flushes, &key, &zero, &flushes_dropped);
		if (!s)
			return 0;
	}
	__sync_fetch_and_add(&s->flushes, 1);
	if (pages > 0)
		__sync_fetch_and_add(&s->pages, pages);
	return 0;
}

SEC("tracepoint/writeback/balance_dirty_pages")
int balance_dirty_pages(struct trace_event_raw_balance_dirty_pages *ctx)
{
	struct writer_stats *w, zero = {};
	__u32 tgid;
	long pause = ctx->pause;

	/* It also fires with pause <= 0 when the writer is let through without sleeping. */
	if (pause <= 0 || !bs_task_selected())
		return 0;
	__sync_fetch_and_add(&pauses_total, 1);
	__sync_fetch_and_add(&pause_ms_total, pause);
	tgid = bpf_get_current_pid_tgid() >> 32;
	w = bpf_map_lookup_elem(&writers, &tgid);
	if (!w) {
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		w = bs_insert(&writers, &tgid, &zero, &pauses_dropped);
		if (!w)
			return 0;
	}
	__sync_fetch_and_add(&w->pauses, 1);
	__sync_fetch_and_add(&w->pause_ms, pause);
	return 0;
}
