/* tcpretrans: TCP retransmissions, one record each (ring buffer) or counted per connection in the
 * kernel (count mode, -c).
 *
 * How many segments a retransmission counts for: the kernel adds tcp_skb_pcount(skb) (a GSO skb is
 * several segments) to both /proc/net/snmp RetransSegs and the socket's tcp_sock->total_retrans (what
 * `ss -ti` shows as retrans:N/TOTAL), then fires tcp_retransmit_skb. The tracepoint also fires for
 * attempts that stopped before that point (err -EBUSY: the previous copy is still in a host queue;
 * -ENOMEM, -EHOSTUNREACH...), which are not retransmissions. So each connection keeps the last
 * total_retrans seen, and an event counts the difference: exactly what the kernel counted, whatever the
 * err (on a veth with 3% loss, 1 to 6 of some 30 such calls per run were not sent: counting calls would
 * have over-counted).
 *
 * The kernel may also skip this program's run on a retransmission without counting a recursion miss: on
 * a 2-CPU VM the tracepoint fired (tracefs saw it) in a softirq on top of one process's thread and the
 * program did not run, 1 to 6 times a run in about one run in eight of some 250 retransmissions. So, in
 * count mode, the total is trusted over the calls: a skipped call is counted at the connection's next
 * one (the difference), a connection's first row counts everything since the start (total_retrans less
 * what it was when tracing started: retrans_at_start, which user space seeds from sock_diag; 0 for a
 * connection opened since), and its close counts what followed its last call seen (kind "unseen"). In
 * event mode, a connection first seen at a retransmission counts tcp_skb_pcount when err is 0 and
 * nothing otherwise.
 *
 * SYN-ACK retransmissions (tcp_retransmit_synack, one segment each, on a half-open connection) are
 * keyed by their request sock's cookie, which the socket the handshake makes inherits
 * (inet_csk_clone_lock), with the SYN-ACKs in its total_retrans (tcp_create_openreq_child copies
 * req->num_retrans): the row's last total follows them, or the new socket's first retransmission would
 * count them again. In count mode the row stays (no longer half-open) once the handshake completes.
 *
 * Connections are keyed by the socket's cookie (never reused, where its address is at once): a closed
 * connection's counts stay until user space has read them, whatever socket takes its address.
 *
 * The retransmit rate's denominator, segments sent (tcp_sock->segs_out), is read here only at a
 * retransmission and at close: user space reads it for open connections from sock_diag (tcp_info) at
 * each interval, and for connections that closed meanwhile from the row their close left here (count
 * mode). Nothing runs per segment sent or received.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Rows of connections that retransmitted or closed since user space last read them. A churn of 12,000
 * connections a second closes 24,000 sockets a second, and on a loaded machine a sample can take longer
 * than its interval: 65,536 rows lost 22,683 closes in 5 s there. Allocated as used, so a quiet machine
 * pays for the rows it has only. */
#define MAX_CONNS (1 << 18)

enum retrans_kind {
	RETRANS_OTHER, /* not in loss recovery: RACK reordering timeout, MTU probe, ... */
	RETRANS_RTO,   /* in the Loss state: after a retransmission timeout */
	RETRANS_FAST,  /* in Recovery: fast retransmit (duplicate ACKs, SACK, RACK) */
	RETRANS_TLP,   /* tail loss probe */
	RETRANS_SYN,   /* SYN of a connect() */
	RETRANS_SYNACK,
	RETRANS_UNSEEN, /* counted from the socket's total at its close: the kernel skipped the program */
};
#define RETRANS_KINDS (RETRANS_UNSEEN + 1)
BS_ENUM(retrans_kind);

struct event {
	__u64 ts;
	struct bs_conn conn;
	struct bs_owner owner;
	__u32 state; /* the kernel's TCP state */
	enum retrans_kind kind;
	__u32 segs; /* segments the kernel counted as retransmitted */
	__s32 err;
	__u32 total_retrans;
	__u32 segs_out;
};

struct conn_stats {
	struct bs_conn conn;
	struct bs_owner owner;
	__u64 retrans; /* segments */
	__u64 kinds[RETRANS_KINDS];
	__u32 total_retrans_last;
	__u32 segs_out; /* at the last retransmission, or at close */
	__u16 closed;	/* the connection closed: its counts are final, user space deletes the row once read */
	__u16 half_open; /* a request sock's SYN-ACKs: no close is seen, user space deletes it once unchanged */
	__u32 pad;
};

/* Counting mode: keep every connection that closes, for its segments sent, and send no records. */
const volatile bool count_mode = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CONNS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct conn_stats);
} conns SEC(".maps");

/* Count mode: cookie -> tcp_sock->total_retrans of a connection open when tracing started that had
 * retransmitted, from sock_diag (tcpi_total_retrans); taken (deleted) when the connection gets its row. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CONNS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} retrans_at_start SEC(".maps");

BS_RINGBUF(events, 1 << 20, struct event);

/* Retransmitted segments of connections the conns map had no room for, and closed connections whose
 * segments sent it could not keep. */
__u64 conns_dropped = 0;
__u64 closes_dropped = 0;
/* tcp_retransmit_skb calls the kernel did not count as retransmissions (see above). */
__u64 not_sent = 0;
/* Connections opened: connect() (CLOSE -> SYN_SENT) and passive (SYN_RECV -> ESTABLISHED), as
 * /proc/net/snmp counts ActiveOpens and PassiveOpens. */
__u64 active_opens = 0;
__u64 passive_opens = 0;

/* A new row's first values, for a selected connection (false: not selected). */
static __always_inline bool new_row(const struct sock *sk, struct conn_stats *fresh, __u32 retrans_base)
{
	struct bs_owner *owner = bs_owner_of(sk);

	if (!bs_owner_selected(owner))
		return false;
	bs_conn_of(sk, &fresh->conn);
	if (!bs_conn_selected(&fresh->conn))
		return false;
	if (owner)
		fresh->owner = *owner;
	fresh->total_retrans_last = retrans_base;
	return true;
}

/* What a connection's total_retrans was when tracing started (0 for one opened since). */
static __always_inline __u32 take_retrans_at_start(__u64 key)
{
	__u32 *at_start = bpf_map_lookup_elem(&retrans_at_start, &key), base;

	if (!at_start)
		return 0;
	base = *at_start;
	bpf_map_delete_elem(&retrans_at_start, &key);
	return base;
}

static __always_inline void refresh(struct conn_stats *st, const struct sock *sk)
{
	struct bs_owner *owner;

	st->segs_out = BPF_CORE_READ((const struct tcp_sock *)sk, segs_out);
	/* connect() changes the state before it picks the local port. */
	if (!st->conn.sport)
		bs_conn_of(sk, &st->conn);
	if (!st->owner.tgid) {
		owner = bs_owner_of(sk);
		if (owner)
			st->owner = *owner;
	}
}

static __always_inline enum retrans_kind kind_of(const struct sock *sk, const struct sk_buff *skb)
{
	const struct inet_connection_sock *icsk = (const struct inet_connection_sock *)sk;
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)skb->cb;
	__u8 ca_state;

	if (BPF_CORE_READ(cb, tcp_flags) & BS_TCPHDR_SYN)
		return RETRANS_SYN;
	/* Loss recovery first: the loss-probe timer may still be armed when an ACK starts a recovery. */
	ca_state = BPF_CORE_READ_BITFIELD_PROBED(icsk, icsk_ca_state);
	if (ca_state == TCP_CA_Loss)
		return RETRANS_RTO;
	if (ca_state == TCP_CA_Recovery)
		return RETRANS_FAST;
	/* Not recovering: a tail loss probe runs from the probe timer, which leaves icsk_pending set while
	 * it sends (a retransmission timeout would have entered Loss). */
	if (BPF_CORE_READ(icsk, icsk_pending) == BS_ICSK_TIME_LOSS_PROBE)
		return RETRANS_TLP;
	return RETRANS_OTHER;
}

static __always_inline void emit(const struct sock *sk, const struct bs_conn *conn, const struct bs_owner *owner,
				 enum retrans_kind kind, __u32 segs, int err)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct event *e;

	if (count_mode)
		return;
	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		return;
	e->ts = bpf_ktime_get_ns();
	e->conn = *conn;
	if (owner)
		e->owner = *owner;
	else
		__builtin_memset(&e->owner, 0, sizeof(e->owner));
	e->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->kind = kind;
	e->segs = segs;
	e->err = err;
	if (kind == RETRANS_SYNACK) {
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
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)skb->cb;
	__u32 total = BPF_CORE_READ(tp, total_retrans);
	__u64 key = bs_sk_cookie(sk);
	struct conn_stats *st = bpf_map_lookup_elem(&conns, &key), fresh = {};
	enum retrans_kind kind;
	__u32 segs;

	if (st) {
		segs = total - st->total_retrans_last;
	} else {
		if (count_mode) {
			/* Its retransmissions since the start, those whose runs were skipped included. */
			segs = total - take_retrans_at_start(key);
		} else {
			segs = err ? 0 : BPF_CORE_READ(cb, tcp_gso_segs);
			if (!segs && !err)
				segs = 1;
		}
		if (!new_row(sk, &fresh, total))
			return 0;
		st = bs_insert(&conns, &key, &fresh, NULL);
		if (!st) {
			__sync_fetch_and_add(&conns_dropped, segs); /* segments, not rows */
			return 0;
		}
	}
	if (!segs) {
		__sync_fetch_and_add(&not_sent, 1);
		return 0;
	}
	kind = kind_of(sk, skb);
	st->total_retrans_last = total;
	__sync_fetch_and_add(&st->retrans, segs);
	__sync_fetch_and_add(&st->kinds[kind], segs);
	refresh(st, sk);
	emit(sk, &st->conn, &st->owner, kind, segs, err);
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
	if (!count_mode) {
		/* Printing each event, no row is needed: nothing is read later. */
		emit(half_open, &fresh.conn, owner, RETRANS_SYNACK, 1, 0);
		return 0;
	}
	st = bpf_map_lookup_elem(&conns, &key);
	if (!st) {
		if (owner)
			fresh.owner = *owner;
		fresh.half_open = 1;
		st = bs_insert(&conns, &key, &fresh, &conns_dropped); /* one segment: one row */
		if (!st)
			return 0;
	}
	__sync_fetch_and_add(&st->retrans, 1);
	__sync_fetch_and_add(&st->kinds[RETRANS_SYNACK], 1);
	__sync_fetch_and_add(&st->segs_out, 1);
	/* The kernel counts this one in num_retrans once the tracepoint has returned (inet_rtx_syn_ack). */
	st->total_retrans_last = BPF_CORE_READ(req, num_retrans) + 1;
	return 0;
}

static __always_inline void state_changed(const struct sock *sk, int oldstate, int newstate)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct conn_stats *st, fresh = {};
	__u32 total, unseen;
	__u64 key;

	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		__sync_fetch_and_add(&active_opens, 1);
		return;
	}
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		__sync_fetch_and_add(&passive_opens, 1);
		/* Its SYN-ACKs' row now holds the connection's: kept until it closes (its total_retrans
		 * starts with the SYN-ACKs, which the row has counted). */
		if (count_mode) {
			key = bs_sk_cookie(sk);
			st = bpf_map_lookup_elem(&conns, &key);
			if (st)
				st->half_open = 0;
		}
		return;
	}
	if (newstate != TCP_CLOSE)
		return;
	key = bs_sk_cookie(sk);
	st = bpf_map_lookup_elem(&conns, &key);
	if (!count_mode) {
		if (st)
			bpf_map_delete_elem(&conns, &key);
		return;
	}
	/* Its last segments sent: user space reads the row, then deletes it. */
	total = BPF_CORE_READ(tp, total_retrans);
	if (!st) {
		if (!new_row(sk, &fresh, total ? take_retrans_at_start(key) : 0))
			return;
		st = bs_insert(&conns, &key, &fresh, &closes_dropped);
		if (!st)
			return;
	}
	/* Retransmissions after its last call seen, or since the start for a connection never seen. */
	unseen = total - st->total_retrans_last;
	if ((__s32)unseen > 0) {
		st->total_retrans_last = total;
		__sync_fetch_and_add(&st->retrans, unseen);
		__sync_fetch_and_add(&st->kinds[RETRANS_UNSEEN], unseen);
	}
	refresh(st, sk);
	st->closed = 1;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (sk->sk_protocol != BS_IPPROTO_TCP)
		return 0;
	state_changed(sk, oldstate, newstate);
	bs_owner_on_state(sk, oldstate, newstate);
	return 0;
}

BS_OWNER_PROGRAMS
