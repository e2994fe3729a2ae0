/* What every bpfscope BPF program shares: the task filters the CLI sets (-p, --cgroup) and ring-buffer
 * reservation that counts what it could not reserve, so no loss is silent. Include after vmlinux.h and
 * <bpf/bpf_helpers.h>.
 */
#ifndef BPFSCOPE_BPF_H
#define BPFSCOPE_BPF_H

#include "hist.bpf.h"

/* Filters, set from user space before load: the verifier sees them as constants and removes the
 * branches of an unset filter. 0 means no filter. */
const volatile __u32 bs_targ_tgid = 0;
const volatile __u64 bs_targ_cgroup = 0;

/* Events a ring buffer had no room for; read by user space through .bss (BpfObject.dropped). */
__u64 bs_dropped = 0;

static __always_inline bool bs_task_selected(void)
{
	if (bs_targ_tgid && (bpf_get_current_pid_tgid() >> 32) != bs_targ_tgid)
		return false;
	if (bs_targ_cgroup && bpf_get_current_cgroup_id() != bs_targ_cgroup)
		return false;
	return true;
}

static __always_inline void *bs_reserve(void *ringbuf, __u64 size)
{
	void *event = bpf_ringbuf_reserve(ringbuf, size, 0);

	if (!event)
		__sync_fetch_and_add(&bs_dropped, 1);
	return event;
}

/* After a lookup found nothing: insert `init` at `key` and return the map's own copy, or NULL when the
 * map is full (counted in *dropped, unless NULL). Another CPU may insert the same key first: BPF_NOEXIST
 * then keeps its value, and the lookup returns that. */
static __always_inline void *bs_insert(void *map, const void *key, const void *init, __u64 *dropped)
{
	void *value;

	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	value = bpf_map_lookup_elem(map, key);
	if (!value && dropped)
		__sync_fetch_and_add(dropped, 1);
	return value;
}

/* A ring buffer of `record_type` events. The pointer global records the event type in the object's
 * BTF (clang emits no BTF for types only local variables use), which is how user space learns the
 * record layout without declaring it again. */
#define BS_RINGBUF(name, bytes, record_type)                                                         \
	struct {                                                                                     \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                                                  \
		__uint(max_entries, bytes);                                                          \
	} name SEC(".maps");                                                                         \
	record_type *bs_record__##name __attribute__((unused)) = 0

#endif
