/* Rejected by the verifier: the map value is dereferenced without the NULL check it requires. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} bad_counts SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getppid")
int bad_unchecked(void *ctx)
{
	__u32 key = bpf_get_current_pid_tgid() >> 32;
	__u64 *count = bpf_map_lookup_elem(&bad_counts, &key);

	/* Missing `if (!count) return 0;`: the verifier refuses a possibly NULL map value. */
	*count += 1;
	return 0;
}
