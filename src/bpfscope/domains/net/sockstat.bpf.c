/* sockstat: the kernel's "socket buffer full" events, counted per socket.
 *
 * Queue sizes and buffer limits come from sock_diag in user space; what sock_diag cannot show is how
 * often a buffer was full while nobody looked. These hooks count it:
 *
 *   sock:sock_rcvqueue_full     a datagram found the receive queue at sk_rcvbuf and was dropped
 *                               (sock_queue_rcv_skb: raw, ICMP echo, and other datagram families)
 *   sock:sock_exceed_buf_limit  a socket asked for memory over the protocol's limit (tcp_mem, udp_mem)
 *                               or its memory cgroup's, send or receive side
 *   skb:kfree_skb               a packet dropped for a full socket: its receive buffer (UDP), the
 *                               protocol's memory (TCP receive queue), the socket backlog, a closed
 *                               TCP receive window, or a full accept queue. TCP and UDP report their
 *                               full receive buffers here, not at sock_rcvqueue_full.
 *
 * A datagram refused at sock_rcvqueue_full is then dropped with reason SOCKET_RCVBUFF: user space shows the
 * first as a count of its own and adds only the drops into a socket's total.
 *
 * All of them fire in softirq or in whichever task happened to be on the CPU, so the current task is not
 * the socket's owner. Counts are keyed by the socket's inode, which user space joins with the sock_diag
 * inode and /proc/PID/fd to name the process. Counters only grow; user space shows differences.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "bpfscope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_SOCKETS 10240

/* One row per socket, keyed by its inode (socket inodes are unique across network namespaces: they all
 * live in one sockfs). A socket without an inode (a kernel socket, or one half set up) counts under 0. */
struct sock_key {
	__u64 ino;
};

struct sock_events {
	__u64 rcvqueue_full;  /* sock:sock_rcvqueue_full */
	__u64 exceed_send;    /* sock:sock_exceed_buf_limit, kind SK_MEM_SEND */
	__u64 exceed_recv;    /* sock:sock_exceed_buf_limit, kind SK_MEM_RECV */
	__u64 drop_rcvbuf;    /* kfree_skb SOCKET_RCVBUFF: receive buffer full (UDP) */
	__u64 drop_mem;       /* kfree_skb PROTO_MEM: no memory for the receive queue (TCP) */
	__u64 drop_backlog;   /* kfree_skb SOCKET_BACKLOG: the backlog of a socket busy in a syscall */
	__u64 drop_zerowin;   /* kfree_skb TCP_ZEROWINDOW: data sent into a closed receive window */
	__u64 drop_listen;    /* kfree_skb TCP_LISTEN_OVERFLOW: accept queue full */
	/* Who the socket is, for a socket that is gone when user space looks. */
	__u32 netns;
	__u16 family;
	__u16 protocol;
	__u16 sport;
	__u16 dport; /* host order */
	__u8 saddr[16];
	__u8 daddr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, struct sock_key);
	__type(value, struct sock_events);
} events SEC(".maps");

/* Events of sockets the map had no room for, read by user space through .bss. */
__u64 events_dropped = 0;

enum event_kind {
	EV_RCVQUEUE_FULL,
	EV_EXCEED_SEND,
	EV_EXCEED_RECV,
	EV_DROP_RCVBUF,
	EV_DROP_MEM,
	EV_DROP_BACKLOG,
	EV_DROP_ZEROWIN,
	EV_DROP_LISTEN,
};

/* sock_i_ino(): the inode of the struct socket_alloc that holds sk->sk_socket. */
static __always_inline __u64 sock_inode(struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct socket_alloc *alloc;

	if (!sock)
		return 0;
	alloc = (void *)sock - bpf_core_field_offset(struct socket_alloc, socket);
	return BPF_CORE_READ(alloc, vfs_inode.i_ino);
}

static __always_inline void describe(struct sock_events *e, struct sock *sk)
{
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->protocol = BPF_CORE_READ(sk, sk_protocol);
	e->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	e->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (e->family == 2 /* AF_INET */) {
		BPF_CORE_READ_INTO(e->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO(e->daddr, sk, __sk_common.skc_daddr);
	} else if (e->family == 10 /* AF_INET6 */) {
		BPF_CORE_READ_INTO(e->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(e->daddr, sk, __sk_common.skc_v6_daddr);
	}
}

static __always_inline void count(struct sock *sk, enum event_kind kind)
{
	struct sock_key key = {};
	struct sock_events *e, zero = {};

	if (!sk)
		return;
	key.ino = sock_inode(sk);
	e = bpf_map_lookup_elem(&events, &key);
	if (!e) {
		describe(&zero, sk);
		e = bs_insert(&events, &key, &zero, &events_dropped);
		if (!e)
			return;
	}
	switch (kind) {
	case EV_RCVQUEUE_FULL:
		__sync_fetch_and_add(&e->rcvqueue_full, 1);
		break;
	case EV_EXCEED_SEND:
		__sync_fetch_and_add(&e->exceed_send, 1);
		break;
	case EV_EXCEED_RECV:
		__sync_fetch_and_add(&e->exceed_recv, 1);
		break;
	case EV_DROP_RCVBUF:
		__sync_fetch_and_add(&e->drop_rcvbuf, 1);
		break;
	case EV_DROP_MEM:
		__sync_fetch_and_add(&e->drop_mem, 1);
		break;
	case EV_DROP_BACKLOG:
		__sync_fetch_and_add(&e->drop_backlog, 1);
		break;
	case EV_DROP_ZEROWIN:
		__sync_fetch_and_add(&e->drop_zerowin, 1);
		break;
	case EV_DROP_LISTEN:
		__sync_fetch_and_add(&e->drop_listen, 1);
		break;
	}
}

SEC("tp_btf/sock_rcvqueue_full")
int BPF_PROG(rcvqueue_full, struct sock *sk, struct sk_buff *skb)
{
	count(sk, EV_RCVQUEUE_FULL);
	return 0;
}

SEC("tp_btf/sock_exceed_buf_limit")
int BPF_PROG(exceed_buf_limit, struct sock *sk, struct proto *prot, long allocated, int kind)
{
	count(sk, kind == 0 /* SK_MEM_SEND */ ? EV_EXCEED_SEND : EV_EXCEED_RECV);
	return 0;
}

/* Drop reasons are numbered differently from kernel to kernel: CO-RE reads each one's value from the
 * running kernel's BTF. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
{
	struct sock *sk = rx_sk;
	enum event_kind kind;

	if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_RCVBUFF))
		kind = EV_DROP_RCVBUF;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_PROTO_MEM))
		kind = EV_DROP_MEM;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_BACKLOG))
		kind = EV_DROP_BACKLOG;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_ZEROWINDOW))
		kind = EV_DROP_ZEROWIN;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW))
		kind = EV_DROP_LISTEN;
	else
		return 0;
	if (!sk)
		sk = BPF_CORE_READ(skb, sk);
	count(sk, kind);
	return 0;
}
