/* bpfscope trace: one precompiled program for any tracepoint, configured before load.
 *
 * User space parses the tracepoint's format file and fills `cfg`: which fields to read (offset, size,
 * kind), the filter as predicates combined by a small postfix program, the key parts, and what to
 * aggregate or print. The verifier sees `cfg` as constants, so the unused parts cost nothing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_FIELDS 8
#define MAX_STRS 4
#define STR_LEN 128
#define STR_WORDS (STR_LEN / 8)
#define MAX_PREDS 8
#define MAX_PROG 16
#define MAX_KEYS 4
#define KEY_MAX 128
#define KEY_PART_MAX 64

enum tr_field_kind {
	TR_FIELD_INT = 0,       /* integer at offset in the record */
	TR_FIELD_CHARARRAY = 1, /* char name[N] in the record */
	TR_FIELD_DATALOC = 2,   /* __data_loc char[]: u32 (len << 16 | offset) into the record */
	TR_FIELD_USERSTR = 3,   /* const char * pointing to user memory (syscall arguments) */
	TR_BUILTIN_PID = 10,
	TR_BUILTIN_TID = 11,
	TR_BUILTIN_UID = 12,
	TR_BUILTIN_CGROUP = 13,
	TR_BUILTIN_CPU = 14,
	TR_BUILTIN_COMM = 15,
};

enum tr_op { TR_OP_EQ = 0, TR_OP_NE, TR_OP_LT, TR_OP_LE, TR_OP_GT, TR_OP_GE };

/* Postfix filter program: a token below MAX_PREDS pushes that predicate's result. */
enum tr_token { TR_TOK_AND = 0x80, TR_TOK_OR = 0x81, TR_TOK_NOT = 0x82 };

enum tr_hist_kind { TR_HIST_NONE = 0, TR_HIST_LOG2 = 1, TR_HIST_LOGLIN = 2 };

/* The enums are the types of the config's fields so that their values reach user space through BTF. */
struct tr_field {
	enum tr_field_kind kind;
	__u16 offset;
	__u16 size;
	__u8 is_signed;
	__u8 str_slot;
};

struct tr_pred {
	enum tr_op op;
	__u8 field;
	__u8 is_str;
	__u8 str_words; /* words of `str` to compare, terminating NUL included */
	__u8 pad;
	__s64 value;
	__u64 str[STR_WORDS];
};

struct tr_key_part {
	__u8 field;
	__u8 size;
	__u16 offset;
};

struct tr_config {
	__u32 nfields;
	__u32 npreds;
	__u32 nprog;
	__u32 nkeys;
	struct tr_field fields[MAX_FIELDS];
	struct tr_pred preds[MAX_PREDS];
	enum tr_token prog[MAX_PROG];
	struct tr_key_part keys[MAX_KEYS];
	__s32 value_field; /* field summed, min/maxed and histogrammed; -1 for none */
	enum tr_hist_kind hist_kind;
	__u32 print;
};

const volatile struct tr_config cfg = {};

/* Key layout limits, read by user space from BTF before it lays out a key. */
enum tr_limits { TR_KEY_MAX = KEY_MAX, TR_KEY_PART_MAX = KEY_PART_MAX };
BS_ENUM(tr_limits);

/* Per-event working state: too big for the 512-byte stack. */
struct tr_scratch {
	__s64 vals[MAX_FIELDS];
	__u64 strs[MAX_STRS][STR_WORDS];
	__u8 key[KEY_MAX + KEY_PART_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tr_scratch);
} scratch_map SEC(".maps");

struct tr_agg {
	__u64 count;
	__s64 sum;
	__s64 min;
	__s64 max;
};

/* Keys are raw bytes laid out by user space; their size is set before load. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 10240);
	__uint(key_size, 8);
	__type(value, struct tr_agg);
} aggs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(key_size, 8);
	__type(value, struct bs_log2_hist);
} hists_log2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(key_size, 8);
	__type(value, struct bs_loglin_hist);
} hists_loglin SEC(".maps");

struct tr_event {
	__u64 ts;
	__u32 pid;
	__u32 tid;
	__u32 cpu;
	__u32 uid;
	__u64 cgroup;
	char comm[16];
	__s64 vals[MAX_FIELDS];
	__u64 strs[MAX_STRS][STR_WORDS];
};

/* Sized for bursts of printed events; shrunk to one page when the query aggregates. */
BS_RINGBUF(events, 4 << 20, struct tr_event);

/* What a full map could not hold, read by user space through .bss. */
__u64 aggs_dropped = 0;	 /* events not counted: no room for their key */
__u64 hists_dropped = 0; /* events counted without their value in the histogram: no room for it */

static const struct bs_loglin_hist zero_loglin = {};
static const struct bs_log2_hist zero_log2 = {};

static __always_inline void read_field(void *ctx, const volatile struct tr_field *f, struct tr_scratch *s,
				       __u32 i)
{
	__u32 slot = f->str_slot & (MAX_STRS - 1);
	__u32 size = f->size;
	__u64 raw = 0, ptr = 0;
	__u32 loc = 0;
	void *str = s->strs[slot];

	switch (f->kind) {
	case TR_FIELD_INT:
		if (size > 8)
			size = 8;
		bpf_probe_read_kernel(&raw, size, ctx + f->offset);
		if (f->is_signed && size < 8) {
			__u32 shift = 64 - 8 * size;
			s->vals[i] = ((__s64)(raw << shift)) >> shift;
		} else {
			s->vals[i] = raw;
		}
		return;
	case TR_FIELD_CHARARRAY:
		if (size > STR_LEN)
			size = STR_LEN;
		__builtin_memset(str, 0, STR_LEN);
		bpf_probe_read_kernel_str(str, size, ctx + f->offset);
		return;
	case TR_FIELD_DATALOC:
		bpf_probe_read_kernel(&loc, sizeof(loc), ctx + f->offset);
		__builtin_memset(str, 0, STR_LEN);
		bpf_probe_read_kernel_str(str, STR_LEN, ctx + (loc & 0xffff));
		return;
	case TR_FIELD_USERSTR:
		bpf_probe_read_kernel(&ptr, sizeof(ptr), ctx + f->offset);
		__builtin_memset(str, 0, STR_LEN);
		bpf_probe_read_user_str(str, STR_LEN, (void *)ptr);
		return;
	case TR_BUILTIN_PID:
		s->vals[i] = bpf_get_current_pid_tgid() >> 32;
		return;
	case TR_BUILTIN_TID:
		s->vals[i] = (__u32)bpf_get_current_pid_tgid();
		return;
	case TR_BUILTIN_UID:
		s->vals[i] = (__u32)bpf_get_current_uid_gid();
		return;
	case TR_BUILTIN_CGROUP:
		s->vals[i] = bpf_get_current_cgroup_id();
		return;
	case TR_BUILTIN_CPU:
		s->vals[i] = bpf_get_smp_processor_id();
		return;
	case TR_BUILTIN_COMM:
		__builtin_memset(str, 0, STR_LEN);
		bpf_get_current_comm(str, 16);
		return;
	}
}

static __always_inline bool pred_true(const volatile struct tr_pred *p, struct tr_scratch *s)
{
	__u32 fi = p->field & (MAX_FIELDS - 1);
	__s64 v, c = p->value;

	if (p->is_str) {
		__u64 *str = s->strs[cfg.fields[fi].str_slot & (MAX_STRS - 1)];
		bool equal = true;

		for (__u32 w = 0; w < STR_WORDS; w++) {
			if (w >= p->str_words)
				break;
			if (str[w] != p->str[w]) {
				equal = false;
				break;
			}
		}
		return p->op == TR_OP_NE ? !equal : equal;
	}
	v = s->vals[fi];
	if (cfg.fields[fi].is_signed) {
		switch (p->op) {
		case TR_OP_EQ: return v == c;
		case TR_OP_NE: return v != c;
		case TR_OP_LT: return v < c;
		case TR_OP_LE: return v <= c;
		case TR_OP_GT: return v > c;
		case TR_OP_GE: return v >= c;
		}
	} else {
		switch (p->op) {
		case TR_OP_EQ: return (__u64)v == (__u64)c;
		case TR_OP_NE: return (__u64)v != (__u64)c;
		case TR_OP_LT: return (__u64)v < (__u64)c;
		case TR_OP_LE: return (__u64)v <= (__u64)c;
		case TR_OP_GT: return (__u64)v > (__u64)c;
		case TR_OP_GE: return (__u64)v >= (__u64)c;
		}
	}
	return false;
}

static __always_inline bool filter_passes(struct tr_scratch *s)
{
	__u32 results = 0, stack = 0, a, b;

	for (__u32 i = 0; i < MAX_PREDS; i++) {
		if (i >= cfg.npreds)
			break;
		if (pred_true(&cfg.preds[i], s))
			results |= 1u << i;
	}
	/* Booleans on a bit stack: push shifts left, the top is bit 0. */
	for (__u32 i = 0; i < MAX_PROG; i++) {
		__u32 tok;

		if (i >= cfg.nprog)
			break;
		tok = cfg.prog[i];
		if (tok == TR_TOK_NOT) {
			stack ^= 1;
		} else if (tok == TR_TOK_AND || tok == TR_TOK_OR) {
			a = stack & 1;
			stack >>= 1;
			b = stack & 1;
			stack = (stack & ~1u) | (tok == TR_TOK_AND ? (a & b) : (a | b));
		} else {
			stack = (stack << 1) | ((results >> (tok & (MAX_PREDS - 1))) & 1);
		}
	}
	return stack & 1;
}

static __always_inline void build_key(struct tr_scratch *s)
{
	for (__u32 k = 0; k < MAX_KEYS; k++) {
		const volatile struct tr_key_part *part = &cfg.keys[k];
		__u32 fi = part->field & (MAX_FIELDS - 1);
		__u32 off = part->offset & (KEY_MAX - 1);
		__u32 size = part->size;

		if (k >= cfg.nkeys)
			break;
		if (size > KEY_PART_MAX)
			size = KEY_PART_MAX;
		if (cfg.fields[fi].kind == TR_FIELD_INT || (cfg.fields[fi].kind >= TR_BUILTIN_PID &&
							 cfg.fields[fi].kind <= TR_BUILTIN_CPU))
			__builtin_memcpy(&s->key[off], &s->vals[fi], 8);
		else
			bpf_probe_read_kernel(&s->key[off], size, s->strs[cfg.fields[fi].str_slot & (MAX_STRS - 1)]);
	}
}

static __always_inline void aggregate(struct tr_scratch *s)
{
	struct tr_agg *v, init = { .min = 0x7fffffffffffffffLL, .max = (-0x7fffffffffffffffLL - 1) };
	__s64 x = 0;

	build_key(s);
	if (cfg.value_field >= 0)
		x = s->vals[cfg.value_field & (MAX_FIELDS - 1)];

	v = bpf_map_lookup_elem(&aggs, s->key);
	if (!v) {
		v = bs_insert(&aggs, s->key, &init, &aggs_dropped);
		if (!v)
			return;
	}
	/* Per-CPU values: plain increments are exact. */
	v->count += 1;
	if (cfg.value_field >= 0) {
		v->sum += x;
		if (x < v->min)
			v->min = x;
		if (x > v->max)
			v->max = x;
	}
	if (cfg.hist_kind == TR_HIST_LOGLIN) {
		struct bs_loglin_hist *h = bpf_map_lookup_elem(&hists_loglin, s->key);

		if (!h)
			h = bs_insert(&hists_loglin, s->key, &zero_loglin, &hists_dropped);
		if (h)
			bs_hist_add_loglin(h, x < 0 ? 0 : x);
	} else if (cfg.hist_kind == TR_HIST_LOG2) {
		struct bs_log2_hist *h = bpf_map_lookup_elem(&hists_log2, s->key);

		if (!h)
			h = bs_insert(&hists_log2, s->key, &zero_log2, &hists_dropped);
		if (h)
			bs_hist_add_log2(h, x < 0 ? 0 : x);
	}
}

static __always_inline void emit(struct tr_scratch *s)
{
	struct tr_event *e = bs_reserve(&events, sizeof(*e));
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!e)
		return;
	e->ts = bpf_ktime_get_ns();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->cpu = bpf_get_smp_processor_id();
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__builtin_memcpy(e->vals, s->vals, sizeof(e->vals));
	__builtin_memcpy(e->strs, s->strs, sizeof(e->strs));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int handle(void *ctx)
{
	__u32 zero = 0;
	struct tr_scratch *s;

	if (!bs_task_selected())
		return 0;
	s = bpf_map_lookup_elem(&scratch_map, &zero);
	if (!s)
		return 0;
	for (__u32 i = 0; i < MAX_FIELDS; i++) {
		if (i >= cfg.nfields)
			break;
		read_field(ctx, &cfg.fields[i], s, i);
	}
	if (cfg.nprog && !filter_passes(s))
		return 0;
	if (cfg.print)
		emit(s);
	else
		aggregate(s);
	return 0;
}

/* The classic tracepoint: ctx is the formatted record the format file describes. */
SEC("tracepoint")
int trace_tracepoint(void *ctx)
{
	return handle(ctx);
}

/* The same event as a raw tracepoint, for queries that read no record field (only pid, comm, ...):
 * the kernel then skips formatting the record, the largest part of the cost of a classic tracepoint.
 * User space loads this program only for such queries, so ctx is never read as a record. */
SEC("raw_tp")
int trace_raw_tracepoint(void *ctx)
{
	return handle(ctx);
}
