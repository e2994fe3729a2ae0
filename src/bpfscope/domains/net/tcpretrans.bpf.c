/* tcpretrans: TCP retransmissions, one record each (ring buffer) or counted per connection in the
 * kernel (-c), with the connection's segments sent so that a retransmit rate can be given.
 *
 * How many segments a retransmission counts for: the kernel adds tcp_skb_pcount(skb) (a GSO skb is
 * several segments) to both /proc/net/snmp RetransSegs and the socket's tcp_sock->total_retrans (what
 * `ss -ti` shows as retrans:N/TOTAL), then fires tcp_retransmit_skb. The tracepoint also fires for
 * attempts that stopped before that point (err -EBUSY: the previous copy is still in a host queue;
 * -ENOMEM, -EHOSTUNREACH...), which are not retransmissions. So each connection keeps the last
 * total_retrans seen, and an event counts the difference: exactly what the kernel counted, whatever the
 * err (on a veth with 3% loss, 1 to 6 of some 30 such calls per run were not sent: counting calls would
 * have over-counted). A call the program missed (recursion) is counted at the connection's next one. A connection first seen at a retransmission (opened before the tool) counts tcp_skb_pcount when
 * err is 0 and nothing otherwise. SYN-ACK retransmissions (tcp_retransmit_synack, one segment each, on
 * a half-open connection) are keyed by their request sock's cookie.
 *
 * Connections are keyed by the socket's cookie (never reused, where its address is at once): a closed
 * connection's counts stay until user space has read them, whatever socket takes its address.
 *
 * Segments sent (tcp_sock->segs_out, data_segs_out) are read at each retransmission, at every segment
 * received on an established connection (tcp_probe), and at close; in counting mode every connection
 * that receives a segment is tracked, so the total rate has every sender in its denominator.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_CONNS 32768

/* Kinds: keep in step with KINDS in tcpretrans.py. */
enum kind {
	KIND_OTHER, /* not in loss recovery: RACK reordering timeout, MTU probe, ... */
	KIND_RTO,   /* in the Loss state: after a retransmission timeout */
	KIND_FAST,  /* in Recovery: fast retransmit (duplicate ACKs, SACK, RACK) */
	KIND_TLP,   /* tail loss probe */
	KIND_SYN,   /* SYN of a connect() */
	KIND_SYNACK,
	NR_KINDS,
};

struct event {
	__u64 ts;
	__u64 cookie;
	struct bs_conn conn;
	struct bs_owner owner;
	__u32 state;
	__u32 kind;
	__u32 segs; /* segments the kernel counted as retransmitted */
	__s32 err;
	__u32 total_retrans;
	__u32 segs_out;
};

struct conn_stats {
	struct bs_conn conn;
	struct bs_owner owner;
	__u64 retrans; /* segments */
	__u64 kinds[NR_KINDS];
	__u32 total_retrans_last;
	__u32 segs_out;
	__u32 segs_out_first; /* segs_out when tracking began (0 for a connect() seen) */
	__u32 data_segs_out;
	__u32 closed;
	__u32 pad;
};

/* Counting mode: track every connection (not only those retransmitting), and send no records. */
const volatile bool count_mode = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CONNS);
	__type(key, __u64);
	__type(value, struct conn_stats);
} conns SEC(".maps");

BS_RINGBUF(events, 1 << 20, struct event);

/* Retransmitted segments of connections the conns map had no room for. */
__u64 conns_dropped = 0;
/* tcp_retransmit_skb calls the kernel did not count as retransmissions (see above). */
__u64 not_sent = 0;
/* Connections opened: connect() (CLOSE -> SYN_SENT) and passive (SYN_RECV -> ESTABLISHED). */
__u64 opened_active = 0;
__u64 opened_passive = 0;

static __always_inline struct conn_stats *track(const struct sock *sk, __u32 retrans_base, __u32 segs_base)
{
	__u64 key = bs_sk_cookie(sk);
	struct conn_stats *st = bpf_map_lookup_elem(&conns, &key), fresh = {};
	struct bs_owner *owner;

	if (st)
		return st;
	owner = bs_owner_of(sk);
	if (!bs_owner_selected(owner))
		return NULL;
	bs_conn_of(sk, &fresh.conn);
	if (!bs_conn_selected(&fresh.conn))
		return NULL;
	if (owner)
		fresh.owner = *owner;
	fresh.total_retrans_last = retrans_base;
	fresh.segs_out_first = segs_base;
	fresh.segs_out = segs_base;
	bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&conns, &key);
}

static __always_inline void refresh(struct conn_stats *st, const struct sock *sk)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct bs_owner *owner;

	st->segs_out = BPF_CORE_READ(tp, segs_out);
	st->data_segs_out = BPF_CORE_READ(tp, data_segs_out);
	/* connect() changes the state before it picks the local port. */
	if (!st->conn.sport)
		bs_conn_of(sk, &st->conn);
	if (!st->owner.tgid) {
		owner = bs_owner_of(sk);
		if (owner)
			st->owner = *owner;
	}
}

static __always_inline __u32 kind_of(const struct sock *sk, const struct sk_buff *skb)
{
	const struct inet_connection_sock *icsk = (const struct inet_connection_sock *)sk;
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)skb->cb;
	__u8 ca_state;

	if (BPF_CORE_READ(cb, tcp_flags) & BS_TCPHDR_SYN)
		return KIND_SYN;
	/* Loss recovery first: the loss-probe timer may still be armed when an ACK starts a recovery. */
	ca_state = BPF_CORE_READ_BITFIELD_PROBED(icsk, icsk_ca_state);
	if (ca_state == TCP_CA_Loss)
		return KIND_RTO;
	if (ca_state == TCP_CA_Recovery)
		return KIND_FAST;
	/* Not recovering: a tail loss probe runs from the probe timer, which leaves icsk_pending set while
	 * it sends (a retransmission timeout would have entered Loss). */
	if (BPF_CORE_READ(icsk, icsk_pending) == BS_ICSK_TIME_LOSS_PROBE)
		return KIND_TLP;
	return KIND_OTHER;
}

static __always_inline void emit(const struct sock *sk, struct conn_stats *st, struct bs_conn *conn,
				 __u32 kind, __u32 segs, int err)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct bs_owner *owner;
	struct event *e;

	if (count_mode)
		return;
	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		return;
	e->ts = bpf_ktime_get_ns();
	e->cookie = kind == KIND_SYNACK ? 0 : bs_sk_cookie(sk);
	if (st) {
		e->conn = st->conn;
		e->owner = st->owner;
	} else {
		e->conn = *conn;
		owner = bs_owner_of(sk);
		if (owner)
			e->owner = *owner;
		else
			__builtin_memset(&e->owner, 0, sizeof(e->owner));
	}
	e->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->kind = kind;
	e->segs = segs;
	e->err = err;
	if (kind == KIND_SYNACK) {
		e->total_retrans = 0;
		e->segs_out = 0;
	} else {
		e->total_retrans = BPF_CORE_READ(tp, total_retrans);
		e->segs_out = BPF_CORE_READ(tp, segs_out);
	}
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retransmit_skb, const struct sock *sk, const struct sk_buff *skb, int err)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	__u32 total = BPF_CORE_READ(tp, total_retrans);
	__u64 key = bs_sk_cookie(sk);
	struct conn_stats *st = bpf_map_lookup_elem(&conns, &key);
	struct bs_conn conn = {};
	__u32 segs, kind;

	if (st) {
		segs = total - st->total_retrans_last;
	} else {
		const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)skb->cb;

		segs = err ? 0 : BPF_CORE_READ(cb, tcp_gso_segs);
		if (!segs && !err)
			segs = 1;
		st = track(sk, total, BPF_CORE_READ(tp, segs_out));
		if (!st) {
			/* Not selected, or no room: only the latter is a loss. */
			bs_conn_of(sk, &conn);
			if (!bs_owner_selected(bs_owner_of(sk)) || !bs_conn_selected(&conn))
				return 0;
			__sync_fetch_and_add(&conns_dropped, segs);
		}
	}
	if (!segs) {
		__sync_fetch_and_add(&not_sent, 1);
		return 0;
	}
	kind = kind_of(sk, skb);
	if (st) {
		st->total_retrans_last = total;
		__sync_fetch_and_add(&st->retrans, segs);
		if (kind < NR_KINDS)
			__sync_fetch_and_add(&st->kinds[kind], segs);
		refresh(st, sk);
	}
	emit(sk, st, &conn, kind, segs, err);
	return 0;
}

/* The kernel counts a SYN-ACK retransmission (one segment) only when it was sent: then this fires. */
SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(retransmit_synack, const struct sock *sk, const struct request_sock *req)
{
	/* A request sock begins with a struct sock_common: the half-open connection's addresses. It is
	 * not a full socket: only its sock_common may be read. */
	const struct sock *half_open = (const struct sock *)req;
	struct bs_owner *owner = bs_owner_of(sk); /* the listener's */
	__u64 key = bs_sk_cookie(half_open);
	struct conn_stats *st, fresh = {};

	if (!bs_owner_selected(owner))
		return 0;
	bs_conn_of_common(&req->__req_common, &fresh.conn);
	if (!bs_conn_selected(&fresh.conn))
		return 0;
	st = bpf_map_lookup_elem(&conns, &key);
	if (!st) {
		if (owner)
			fresh.owner = *owner;
		/* No close is seen for a request sock: user space deletes it once shown and unchanged. */
		fresh.closed = 1;
		bpf_map_update_elem(&conns, &key, &fresh, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&conns, &key);
		if (!st) {
			__sync_fetch_and_add(&conns_dropped, 1);
			emit(half_open, NULL, &fresh.conn, KIND_SYNACK, 1, 0);
			return 0;
		}
	}
	__sync_fetch_and_add(&st->retrans, 1);
	__sync_fetch_and_add(&st->kinds[KIND_SYNACK], 1);
	__sync_fetch_and_add(&st->segs_out, 1);
	emit(half_open, st, &fresh.conn, KIND_SYNACK, 1, 0);
	/* Printing each event, nobody reads the row later: it only carried the listener's owner. */
	if (!count_mode)
		bpf_map_delete_elem(&conns, &key);
	return 0;
}

/* Every segment received on an established connection: segments sent so far, for the rate. */
SEC("tp_btf/tcp_probe")
int BPF_PROG(probe, const struct sock *sk, const struct sk_buff *skb)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct conn_stats *st;
	__u64 key;

	/* Printing each event needs no rate: the verifier drops the rest of this program then. */
	if (!count_mode)
		return 0;
	key = bs_sk_cookie(sk);
	st = bpf_map_lookup_elem(&conns, &key);
	if (!st) {
		st = track(sk, BPF_CORE_READ(tp, total_retrans), BPF_CORE_READ(tp, segs_out));
		if (!st)
			return 0;
	}
	refresh(st, sk);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct conn_stats *st;
	__u64 key;

	if (sk->sk_protocol != BS_IPPROTO_TCP)
		return 0;
	bs_owner_learn_on_state(sk, oldstate, newstate);
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		__sync_fetch_and_add(&opened_active, 1);
		if (count_mode)
			track(sk, 0, 0);
		return 0;
	}
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		__sync_fetch_and_add(&opened_passive, 1);
		/* SYN-ACK retransmissions were counted on the request sock: start from the child's count. */
		if (count_mode)
			track(sk, BPF_CORE_READ(tp, total_retrans), BPF_CORE_READ(tp, segs_out));
		return 0;
	}
	key = bs_sk_cookie(sk);
	if (oldstate == TCP_SYN_SENT) {
		st = bpf_map_lookup_elem(&conns, &key);
		if (st)
			refresh(st, sk);
	}
	if (newstate == TCP_CLOSE) {
		st = bpf_map_lookup_elem(&conns, &key);
		if (st) {
			refresh(st, sk);
			st->closed = 1;
			/* -c: user space deletes the row once it has read it; printing each event, now. */
			if (!count_mode)
				bpf_map_delete_elem(&conns, &key);
		}
		bs_owner_forget(sk);
	}
	return 0;
}

BS_OWNER_PROGRAMS
