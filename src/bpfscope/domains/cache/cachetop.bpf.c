/* cachetop: page-cache lookups, misses and dirtied pages per file and process, from tracepoints only.
 * The counting is cache.bpf.h's, shared with cachestat; user space sets cache_by_file.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bpfscope.bpf.h"
#include "cache.bpf.h"

char LICENSE[] SEC("license") = "GPL";
