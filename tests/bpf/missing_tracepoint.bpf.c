/* Valid, but attached to a tracepoint no kernel has: sys_enter_openatt is a typo of sys_enter_openat. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

__u64 opens = 0;

SEC("tracepoint/syscalls/sys_enter_openatt")
int on_openatt(void *ctx)
{
	if (bs_task_selected())
		__sync_fetch_and_add(&opens, 1);
	return 0;
}
