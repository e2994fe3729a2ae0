/* The floor of tracing cost: a program that does nothing on raw_syscalls:sys_enter. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tracepoint/raw_syscalls/sys_enter")
int empty(void *ctx)
{
	return 0;
}
