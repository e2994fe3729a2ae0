/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * In-kernel histogram helpers shared by the bpfscope tools.
 *
 * The includer must provide vmlinux.h and <bpf/bpf_helpers.h> first.
 * src/bpfscope/core/hist.py mirrors every slot function below bit for bit;
 * change both together.
 */
#ifndef __BPFSCOPE_HIST_BPF_H
#define __BPFSCOPE_HIST_BPF_H

/*
 * log2 histogram, libbpf-tools layout: slot 0 holds 0 and 1, slot i holds
 * [2^i, 2^(i+1) - 1].  64 slots cover the whole __u64 range.
 */
#define BS_LOG2_SLOTS 64

/*
 * Log-linear histogram: every power-of-two range is split into
 * 2^BS_LOGLIN_SUB_BITS linear sub-buckets, so a bucket is never wider than
 * 1/16 of its lower bound (log2 slots are up to 100% wide, which is too
 * coarse for p99 figures).
 *
 * Values below 16 get one exact slot each (slots 0..15).  For v >= 16 let
 * e = floor(log2 v), 4 <= e <= 63.  The four bits right below the leading
 * one select the sub-bucket:
 *
 *     slot = (e - 3) * 16 + ((v >> (e - 4)) & 15)
 *
 * e = 4 starts at slot 16, right after the exact slots, and e = 63 ends at
 * 60 * 16 + 15 = 975, hence 976 slots.
 */
#define BS_LOGLIN_SUB_BITS 4
#define BS_LOGLIN_SLOTS 976

_Static_assert(BS_LOGLIN_SLOTS == (64 - BS_LOGLIN_SUB_BITS + 1) << BS_LOGLIN_SUB_BITS,
	       "BS_LOGLIN_SLOTS must follow BS_LOGLIN_SUB_BITS");

/*
 * floor(log2(v)) by branch-free binary search, the same trick as libbpf-tools'
 * bits.bpf.h, so log2 slots line up with theirs; log2(0) = 0.
 */
static __always_inline __u32 bs_log2(__u32 v)
{
	__u32 shift, r;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);

	return r;
}

static __always_inline __u32 bs_log2l(__u64 v)
{
	__u32 hi = v >> 32;

	if (hi)
		return bs_log2(hi) + 32;
	return bs_log2((__u32)v);
}

static __always_inline __u32 bs_log2_slot(__u64 v)
{
	__u32 slot = bs_log2l(v);

	/* Unreachable for a __u64; states the contract instead of relying on it. */
	if (slot >= BS_LOG2_SLOTS)
		slot = BS_LOG2_SLOTS - 1;
	return slot;
}

static __always_inline __u32 bs_loglin_slot(__u64 v)
{
	__u32 e;

	if (v < (1ULL << BS_LOGLIN_SUB_BITS))
		return (__u32)v;

	e = bs_log2l(v);
	return (e - (BS_LOGLIN_SUB_BITS - 1)) * (1U << BS_LOGLIN_SUB_BITS) +
	       (__u32)((v >> (e - BS_LOGLIN_SUB_BITS)) & ((1U << BS_LOGLIN_SUB_BITS) - 1));
}

struct bs_log2_hist {
	__u64 slots[BS_LOG2_SLOTS];
};

struct bs_loglin_hist {
	__u64 slots[BS_LOGLIN_SLOTS];
};

/*
 * The slot functions are always in range, but the verifier cannot follow the
 * bit tricks, so the index needs a bound it can see; a mask would not do for
 * 976 slots, which is not a power of two.  The index is widened to 64 bits and
 * pinned by an empty asm first: otherwise clang may test a zero-extended copy
 * and index with the original register, whose range the verifier never
 * learns.
 */
static __always_inline __u64 bs_bound_slot(__u64 slot, __u64 nslots)
{
	asm volatile("" : "+r"(slot));
	if (slot >= nslots)
		slot = nslots - 1;
	return slot;
}

static __always_inline void bs_hist_add_log2(struct bs_log2_hist *h, __u64 v)
{
	__u64 slot = bs_bound_slot(bs_log2_slot(v), BS_LOG2_SLOTS);

	__sync_fetch_and_add(&h->slots[slot], 1);
}

static __always_inline void bs_hist_add_loglin(struct bs_loglin_hist *h, __u64 v)
{
	__u64 slot = bs_bound_slot(bs_loglin_slot(v), BS_LOGLIN_SLOTS);

	__sync_fetch_and_add(&h->slots[slot], 1);
}

#endif /* __BPFSCOPE_HIST_BPF_H */
