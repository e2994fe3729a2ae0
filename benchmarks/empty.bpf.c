/* The floor of tracing cost: programs that do nothing on the sys_enter event, as a classic tracepoint
 * (the kernel formats a record first) and as a raw tracepoint (it does not). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tracepoint/raw_syscalls/sys_enter")
int empty(void *ctx)
{
	return 0;
}

SEC("raw_tp/sys_enter")
int empty_raw(void *ctx)
{
	return 0;
}
