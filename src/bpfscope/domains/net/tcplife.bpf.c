/* tcplife: each TCP connection as it closes, with its owner, bytes and duration (like BCC's tcplife),
 * or (hist mode) a log-linear histogram of lifespans per service, counted in the kernel.
 *
 * Birth is the first state change seen: connect() (CLOSE -> SYN_SENT) for an active open, the end of the
 * handshake (SYN_RECV -> ESTABLISHED) for a passive one. Death is the change to CLOSE; only connections
 * born while tracing that reached ESTABLISHED are reported (failed connects are tcpconn's). Bytes are
 * tcp_sock->bytes_acked (sent and acknowledged by the peer) and bytes_received, read at close (what
 * tcp_info reports as tcpi_bytes_acked / tcpi_bytes_received), never counting a retransmission twice.
 * Those count sequence numbers, so they include the SYN (acked, of an active open) and the FINs; the
 * FINs are followed through the state changes and all three taken out: the bytes are payload.
 * A service is a listening port for passive opens and the remote port for active ones, with the
 * owner's comm.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_BIRTHS 65536
#define MAX_SERVICES 1024

struct birth {
	__u64 ts;
	__u8 established;
	__u8 passive;
	__u8 fin_out_acked; /* our FIN was acknowledged (counted in bytes_acked) */
	__u8 pad[5];
};

struct event {
	__u64 ts;
	__u64 duration_ns;
	__u64 tx_bytes;
	__u64 rx_bytes;
	struct bs_conn conn;
	struct bs_owner owner;
	__u32 passive;
	__u32 pad;
};

struct service_key {
	__u16 port;
	__u16 passive;
	__u32 pad;
	char comm[BS_COMM_LEN];
};

const volatile bool hist_mode = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BIRTHS);
	__type(key, __u64); /* the socket's cookie */
	__type(value, struct birth);
} births SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct service_key);
	__type(value, struct bs_loglin_hist);
} lifespans SEC(".maps");

BS_RINGBUF(events, 1 << 20, struct event);

/* Connections not followed: births map full, or lifespans map full in hist mode. */
__u64 births_dropped = 0;
__u64 services_dropped = 0;

static const struct bs_loglin_hist empty_hist = {};

static __always_inline void born(__u64 key, __u64 now, bool passive)
{
	struct birth fresh = {.ts = now, .established = passive, .passive = passive};

	/* A new socket: its cookie was never used before, so nothing is at its key. */
	bs_insert(&births, &key, &fresh, &births_dropped);
}

static __always_inline void count_lifespan(const struct sock *sk, const struct bs_owner *owner,
					   const struct birth *b, __u64 now)
{
	struct service_key key = {};
	struct bs_loglin_hist *h;
	struct bs_conn conn;

	bs_conn_of(sk, &conn);
	if (!bs_conn_selected(&conn))
		return;
	key.passive = b->passive;
	key.port = b->passive ? conn.sport : conn.dport;
	if (owner)
		__builtin_memcpy(key.comm, owner->comm, sizeof(key.comm));
	h = bpf_map_lookup_elem(&lifespans, &key);
	if (!h)
		h = bs_insert(&lifespans, &key, &empty_hist, &services_dropped);
	if (h)
		bs_hist_add_loglin(h, now - b->ts);
}

static __always_inline void send_life(const struct sock *sk, const struct bs_owner *owner, const struct birth *b,
				      __u64 now)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	struct event *e;
	bool fin_in;

	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		return;
	bs_conn_of(sk, &e->conn);
	if (!bs_conn_selected(&e->conn)) {
		bpf_ringbuf_discard(e, 0);
		return;
	}
	/* The peer's FIN: tcp_fin() marks the socket SOCK_DONE when it arrives. */
	fin_in = BPF_CORE_READ(sk, __sk_common.skc_flags) &
		 (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE));
	e->ts = now;
	e->duration_ns = now - b->ts;
	e->tx_bytes = BPF_CORE_READ(tp, bytes_acked) - !b->passive - b->fin_out_acked;
	e->rx_bytes = BPF_CORE_READ(tp, bytes_received) - fin_in;
	e->passive = b->passive;
	if (owner)
		e->owner = *owner;
	else
		__builtin_memset(&e->owner, 0, sizeof(e->owner));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void state_changed(const struct sock *sk, int oldstate, int newstate)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	__u64 key = bs_sk_cookie(sk), now = bpf_ktime_get_ns();
	struct bs_owner *owner;
	struct birth *b;

	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		born(key, now, false);
		return;
	}
	b = bpf_map_lookup_elem(&births, &key);
	if (newstate == TCP_ESTABLISHED) {
		if (b)
			b->established = 1;
		else if (oldstate == TCP_SYN_RECV)
			born(key, now, true);
		return;
	}
	if (!b)
		return;
	/* Our FIN acked: -> FIN_WAIT2, FIN_WAIT1 or CLOSING -> TIME_WAIT, and on LAST_ACK -> CLOSE when
	 * everything sent, FIN included, is acknowledged (not on a reset or a timeout). */
	if (newstate == TCP_FIN_WAIT2 ||
	    (newstate == TCP_TIME_WAIT && (oldstate == TCP_FIN_WAIT1 || oldstate == TCP_CLOSING)))
		b->fin_out_acked = 1;
	if (newstate == TCP_CLOSE && oldstate == TCP_LAST_ACK &&
	    BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
		b->fin_out_acked = 1;
	if (newstate != TCP_CLOSE)
		return;
	owner = bs_owner_of(sk);
	if (b->established && bs_owner_selected(owner)) {
		if (hist_mode)
			count_lifespan(sk, owner, b, now);
		else
			send_life(sk, owner, b, now);
	}
	bpf_map_delete_elem(&births, &key);
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
