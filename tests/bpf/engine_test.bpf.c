/* Test program for the engine: a known event per getppid() of the test process, a burst of them to
 * overflow the ring on purpose, a histogram of values the test chooses, and a count map. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct event {
	__u64 seq;
	__u32 pid;
	__u32 ppid;
	__s32 neg;
	__u8 flag;
	char comm[16];
	__u16 small[3];
	__u64 big;
};

const volatile __u32 burst = 1;

BS_RINGBUF(events, 64 * 1024, struct event);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bs_loglin_hist);
} latency SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bs_log2_hist);
} latency_log2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} percpu_hits SEC(".maps");

/* A record of variable length: its header and var_len bytes of payload (bs_output). */
struct var_event {
	__u32 len;
	__u8 data[256];
};

BS_RINGBUF_VAR(varlen, 64 * 1024, struct var_event);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct var_event);
} var_scratch SEC(".maps");

/* Records of a stride (48 bytes) that does not divide the ring's size: some lie across its end. */
struct odd_event {
	__u64 seq;
	__u8 fill[28];
	__u32 tail;
};

BS_RINGBUF(odd, 64 * 1024, struct odd_event);

/* odd_event records to send per getppid(), written by the test. */
__u32 odd_burst = 0;
__u64 odd_seq = 0;

/* An enum user space reads from BTF. */
enum test_kind {
	TEST_KIND_FIRST = 1,
	TEST_KIND_SECOND = 5,
};
BS_ENUM(test_kind);

/* Payload bytes of the next variable-length record (0: none sent), written by the test. */
__u32 var_len = 0;

/* Value to record in the histograms, written by the test before each trigger. */
__u64 hist_value = 0;
__u64 produced = 0;
__u64 seq = 0;

SEC("tracepoint/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
	struct task_struct *task;
	struct event *e;
	__u32 zero = 0, i, key;
	__u64 *count, one = 1;

	if (!bs_task_selected())
		return 0;

	struct bs_loglin_hist *h = bpf_map_lookup_elem(&latency, &zero);
	if (h)
		bs_hist_add_loglin(h, hist_value);
	struct bs_log2_hist *h2 = bpf_map_lookup_elem(&latency_log2, &zero);
	if (h2)
		bs_hist_add_log2(h2, hist_value);

	count = bpf_map_lookup_elem(&percpu_hits, &zero);
	if (count)
		*count += 1;

	key = (__u32)(hist_value & 0xff);
	count = bpf_map_lookup_elem(&counts, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&counts, &key, &one, BPF_NOEXIST);

	if (var_len) {
		struct var_event *v = bpf_map_lookup_elem(&var_scratch, &zero);
		__u32 len = var_len & 0xff;

		if (v) {
			v->len = len;
			for (i = 0; i < 256; i++)
				v->data[i] = i < len ? (__u8)(i + 1) : 0;
			bs_output(&varlen, v, sizeof(v->len) + len);
		}
	}

	for (i = 0; i < 256 && i < odd_burst; i++) {
		struct odd_event *o = bs_reserve(&odd, sizeof(*o));

		if (!o)
			continue;
		o->seq = odd_seq++;
		__builtin_memset(o->fill, 0xab, sizeof(o->fill));
		o->fill[0] = (__u8)o->seq;
		o->fill[sizeof(o->fill) - 1] = (__u8)o->seq;
		o->tail = ~(__u32)o->seq;
		bpf_ringbuf_submit(o, 0);
	}

	task = (struct task_struct *)bpf_get_current_task();
	for (i = 0; i < 4096 && i < burst; i++) {
		__sync_fetch_and_add(&produced, 1);
		e = bs_reserve(&events, sizeof(*e));
		if (!e)
			continue;
		e->seq = __sync_fetch_and_add(&seq, 1);
		e->pid = bpf_get_current_pid_tgid() >> 32;
		e->ppid = BPF_CORE_READ(task, real_parent, tgid);
		e->neg = -(__s32)e->pid;
		e->flag = 7;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
		e->small[0] = 1;
		e->small[1] = 2;
		e->small[2] = 65535;
		e->big = 0xfedcba9876543210ULL;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}
