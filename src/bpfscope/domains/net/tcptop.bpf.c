/* tcptop: bytes sent and received per TCP connection and process, counted in the kernel.
 *
 * sock_send_length and sock_recv_length fire when a send or receive call on a socket returns, in the
 * caller's context, with the bytes moved (ret > 0): what the application wrote and read, as iperf3 or
 * the application itself counts it (not retransmissions, not headers). Rows are keyed by the socket,
 * its connection and the process; counters only grow, and user space shows each interval's difference.
 *
 * A socket's rows can go once it closed and user space has read them: the CLOSE state change leaves
 * a mark in `closed`, which user space checks before deleting a row that did not change. Both are keyed
 * by the socket's cookie, never reused (its address is, at once).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_ROWS 16384

struct row_key {
	__u64 cookie;
	struct bs_conn conn;
	/* Named, so that `= {}` zeroes it: the hash compares keys byte by byte, and padding left to the
	 * compiler keeps stack garbage that splits one connection over several rows. */
	__u32 pad;
	struct bs_owner owner; /* the calling process */
};

struct row_bytes {
	__u64 rx_bytes;
	__u64 tx_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ROWS);
	__type(key, struct row_key);
	__type(value, struct row_bytes);
} rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_ROWS);
	__type(key, __u64);
	__type(value, __u8);
} closed SEC(".maps");

/* Bytes the rows map had no room for, read by user space through .bss. */
__u64 rows_dropped = 0;

static __always_inline void count(struct sock *sk, int ret, bool tx)
{
	struct row_key key = {};
	struct row_bytes *b, zero = {};

	if (ret <= 0 || !bs_is_tcp(sk) || !bs_task_selected())
		return;
	bs_conn_of(sk, &key.conn);
	if (!bs_conn_selected(&key.conn))
		return;
	key.cookie = bs_sk_cookie(sk);
	bs_owner_current(&key.owner);
	b = bpf_map_lookup_elem(&rows, &key);
	if (!b) {
		b = bs_insert(&rows, &key, &zero, NULL);
		if (!b) {
			__sync_fetch_and_add(&rows_dropped, ret); /* bytes, not rows */
			return;
		}
	}
	if (tx)
		__sync_fetch_and_add(&b->tx_bytes, ret);
	else
		__sync_fetch_and_add(&b->rx_bytes, ret);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(send_length, struct sock *sk, int ret, int flags)
{
	count(sk, ret, true);
	return 0;
}

#define MSG_PEEK 2

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_length, struct sock *sk, int ret, int flags)
{
	/* Peeked bytes stay in the queue and are received again. */
	if (!(flags & MSG_PEEK))
		count(sk, ret, false);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	__u64 key;
	__u8 one = 1;

	if (sk->sk_protocol != BS_IPPROTO_TCP || newstate != TCP_CLOSE)
		return 0;
	key = bs_sk_cookie(sk);
	bpf_map_update_elem(&closed, &key, &one, BPF_ANY);
	return 0;
}
