/* bpfscope doctor: one small program per program type and attach point. Each is loaded and attached
 * on its own and must then count a hit from the doctor's own process: what loads and fires here works.
 *
 * The one place bpfscope measures itself, on purpose: the doctor's own calls are what fires the probes
 * (from_doctor), and nothing else is counted, so bs_task_selected() has no use here. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* The doctor's pid, and the signal sent by the bpf_send_signal probe. */
const volatile __u32 doctor_tgid = 0;
const volatile __u32 signal_number = 0;

struct ring_record {
	__u32 pid;
	char comm[16];
};

BS_RINGBUF(records, 4096, struct ring_record);

/* One hit counter per probe, indexed by the probe's number. */
__u64 hits[16] = {};

static __always_inline bool from_doctor(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == doctor_tgid;
}

static __always_inline void hit(__u32 probe)
{
	if (probe < 16)
		__sync_fetch_and_add(&hits[probe], 1);
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int probe_tracepoint(void *ctx)
{
	if (from_doctor())
		hit(0);
	return 0;
}

SEC("raw_tp/sys_enter")
int probe_raw_tp(void *ctx)
{
	if (from_doctor())
		hit(1);
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(probe_tp_btf, struct pt_regs *regs, long id)
{
	if (from_doctor())
		hit(2);
	return 0;
}

SEC("perf_event")
int probe_perf_event(void *ctx)
{
	if (from_doctor())
		hit(3);
	return 0;
}

SEC("uprobe")
int probe_uprobe(void *ctx)
{
	if (from_doctor())
		hit(4);
	return 0;
}

SEC("kprobe/__x64_sys_getppid")
int probe_kprobe(void *ctx)
{
	if (from_doctor())
		hit(5);
	return 0;
}

SEC("fentry/__x64_sys_getppid")
int BPF_PROG(probe_fentry)
{
	if (from_doctor())
		hit(6);
	return 0;
}

SEC("lsm/file_open")
int BPF_PROG(probe_lsm, struct file *file)
{
	if (from_doctor())
		hit(7);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int probe_ringbuf(void *ctx)
{
	struct ring_record *r;

	if (!from_doctor())
		return 0;
	r = bs_reserve(&records, sizeof(*r));
	if (!r)
		return 0;
	r->pid = doctor_tgid;
	bpf_get_current_comm(r->comm, sizeof(r->comm));
	bpf_ringbuf_submit(r, 0);
	hit(8);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_getppid")
int probe_send_signal(void *ctx)
{
	if (!from_doctor())
		return 0;
	if (bpf_send_signal(signal_number) == 0)
		hit(9);
	return 0;
}

/* Socket-address hooks on a cgroup (what Block rules of bpfscope secure are made of): each refuses the
 * doctor's own connect or send (return 0: EPERM) and lets everyone else through (1). */
static __always_inline int refuse_doctor(__u32 probe)
{
	if (!from_doctor())
		return 1;
	hit(probe);
	return 0;
}

SEC("cgroup/connect4")
int probe_connect4(struct bpf_sock_addr *ctx)
{
	return refuse_doctor(10);
}

SEC("cgroup/connect6")
int probe_connect6(struct bpf_sock_addr *ctx)
{
	return refuse_doctor(11);
}

SEC("cgroup/sendmsg4")
int probe_sendmsg4(struct bpf_sock_addr *ctx)
{
	return refuse_doctor(12);
}

SEC("cgroup/sendmsg6")
int probe_sendmsg6(struct bpf_sock_addr *ctx)
{
	return refuse_doctor(13);
}
