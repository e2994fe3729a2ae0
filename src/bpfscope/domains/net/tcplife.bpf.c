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
	__type(key, __u64);
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

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	__u64 key = (__u64)sk, now = bpf_ktime_get_ns();
	struct birth *b, fresh = {};
	struct bs_owner *owner;
	struct event *e;

	if (sk->sk_protocol != BS_IPPROTO_TCP)
		return 0;
	bs_owner_learn_on_state(sk, oldstate, newstate);
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		fresh.ts = now;
		if (bpf_map_update_elem(&births, &key, &fresh, BPF_ANY))
			__sync_fetch_and_add(&births_dropped, 1);
		return 0;
	}
	if (newstate == TCP_ESTABLISHED) {
		b = bpf_map_lookup_elem(&births, &key);
		if (b) {
			b->established = 1;
		} else if (oldstate == TCP_SYN_RECV) {
			fresh.ts = now;
			fresh.established = 1;
			fresh.passive = 1;
			if (bpf_map_update_elem(&births, &key, &fresh, BPF_ANY))
				__sync_fetch_and_add(&births_dropped, 1);
		}
		return 0;
	}
	b = bpf_map_lookup_elem(&births, &key);
	if (!b)
		return 0;
	/* Our FIN acked: -> FIN_WAIT2, FIN_WAIT1 or CLOSING -> TIME_WAIT, and on LAST_ACK -> CLOSE when
	 * everything sent, FIN included, is acknowledged (not on a reset or a timeout). The peer's FIN:
	 * tcp_fin() marks the socket SOCK_DONE when it arrives. */
	if (newstate == TCP_FIN_WAIT2 ||
	    (newstate == TCP_TIME_WAIT && (oldstate == TCP_FIN_WAIT1 || oldstate == TCP_CLOSING)))
		b->fin_out_acked = 1;
	if (newstate == TCP_CLOSE && oldstate == TCP_LAST_ACK &&
	    BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq))
		b->fin_out_acked = 1;
	if (newstate != TCP_CLOSE)
		return 0;
	if (!b->established)
		goto forget;
	owner = bs_owner_of(sk);
	if (!bs_owner_selected(owner))
		goto forget;
	if (hist_mode) {
		struct service_key sk_key = {};
		struct bs_loglin_hist *h;
		struct bs_conn conn;

		bs_conn_of(sk, &conn);
		if (!bs_conn_selected(&conn))
			goto forget;
		sk_key.passive = b->passive;
		sk_key.port = b->passive ? conn.sport : conn.dport;
		if (owner)
			__builtin_memcpy(sk_key.comm, owner->comm, sizeof(sk_key.comm));
		h = bpf_map_lookup_elem(&lifespans, &sk_key);
		if (!h) {
			bpf_map_update_elem(&lifespans, &sk_key, &empty_hist, BPF_NOEXIST);
			h = bpf_map_lookup_elem(&lifespans, &sk_key);
		}
		if (h)
			bs_hist_add_loglin(h, now - b->ts);
		else
			__sync_fetch_and_add(&services_dropped, 1);
		goto forget;
	}
	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		goto forget;
	bs_conn_of(sk, &e->conn);
	if (!bs_conn_selected(&e->conn)) {
		bpf_ringbuf_discard(e, 0);
		goto forget;
	}
	e->ts = now;
	e->duration_ns = now - b->ts;
	e->tx_bytes = BPF_CORE_READ(tp, bytes_acked) - !b->passive - b->fin_out_acked;
	e->rx_bytes = BPF_CORE_READ(tp, bytes_received) -
		      !!(BPF_CORE_READ(sk, __sk_common.skc_flags) & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE)));
	e->passive = b->passive;
	if (owner)
		e->owner = *owner;
	else
		__builtin_memset(&e->owner, 0, sizeof(e->owner));
	bpf_ringbuf_submit(e, 0);
forget:
	bpf_map_delete_elem(&births, &key);
	bs_owner_forget(sk);
	return 0;
}

BS_OWNER_PROGRAMS
