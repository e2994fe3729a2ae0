/* Producer for the ring-buffer consumer benchmark (benchmarks/ringbuf.py): every getppid() of the
 * target process emits `burst` events of a realistic size into the `events` ring. `produced` counts the
 * attempts, bs_dropped (bpfscope.bpf.h) the ones the ring had no room for, and each event that made it
 * carries a sequence number unique across the run, so user space can account for every event:
 * consumed + dropped == produced, with no sequence number seen twice. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_BURST 4096

/* 64 bytes, 72 with the ring's record header. */
struct event {
	__u64 ts_ns;
	__u64 seq;
	__u32 pid;
	__u32 tid;
	char comm[16];
	__u64 arg0;
	__u64 arg1;
	__u32 cpu;
	__u32 burst_index;
};

const volatile __u32 burst = 1;

/* Resized from user space (BpfObject(max_entries={"events": N})). */
BS_RINGBUF(events, 256 * 1024, struct event);

__u64 produced = 0;
__u64 seq = 0;

SEC("tracepoint/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
	struct event *e;
	__u64 id, ts;
	__u32 i;

	if (!bs_task_selected())
		return 0;

	id = bpf_get_current_pid_tgid();
	ts = bpf_ktime_get_ns();
	for (i = 0; i < MAX_BURST && i < burst; i++) {
		__sync_fetch_and_add(&produced, 1);
		e = bs_reserve(&events, sizeof(*e));
		if (!e)
			continue;
		e->ts_ns = bpf_ktime_get_ns();
		e->seq = __sync_fetch_and_add(&seq, 1);
		e->pid = id >> 32;
		e->tid = (__u32)id;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		e->arg0 = ts;
		e->arg1 = id ^ i;
		e->cpu = bpf_get_smp_processor_id();
		e->burst_index = i;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}
