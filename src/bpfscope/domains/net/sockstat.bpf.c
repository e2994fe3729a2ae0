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

/* What a socket counts, in the order user space shows them; each kind's name is read from BTF. */
enum sock_event {
	SOCK_EV_RCVQUEUE_FULL, /* sock:sock_rcvqueue_full */
	SOCK_EV_EXCEED_SEND,   /* sock:sock_exceed_buf_limit, kind SK_MEM_SEND */
	SOCK_EV_EXCEED_RECV,   /* sock:sock_exceed_buf_limit, kind SK_MEM_RECV */
	SOCK_EV_DROP_RCVBUF,   /* kfree_skb SOCKET_RCVBUFF: receive buffer full (UDP) */
	SOCK_EV_DROP_MEM,      /* kfree_skb PROTO_MEM: no memory for the receive queue (TCP) */
	SOCK_EV_DROP_BACKLOG,  /* kfree_skb SOCKET_BACKLOG: the backlog of a socket busy in a syscall */
	SOCK_EV_DROP_ZEROWIN,  /* kfree_skb TCP_ZEROWINDOW: data sent into a closed receive window */
	SOCK_EV_DROP_LISTEN,   /* kfree_skb TCP_LISTEN_OVERFLOW: accept queue full */
};
#define SOCK_EVENTS (SOCK_EV_DROP_LISTEN + 1)
BS_ENUM(sock_event);

struct sock_events {
	__u64 counts[SOCK_EVENTS]; /* by enum sock_event */
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

static __always_inline void count(struct sock *sk, enum sock_event kind)
{
	struct sock_key key = {};
	struct sock_events *e, zero = {};

	if (!sk || kind >= SOCK_EVENTS)
		return;
	key.ino = sock_inode(sk);
	e = bpf_map_lookup_elem(&events, &key);
	if (!e) {
		describe(&zero, sk);
		e = bs_insert(&events, &key, &zero, &events_dropped);
		if (!e)
			return;
	}
	__sync_fetch_and_add(&e->counts[kind], 1);
}

SEC("tp_btf/sock_rcvqueue_full")
int BPF_PROG(rcvqueue_full, struct sock *sk, struct sk_buff *skb)
{
	count(sk, SOCK_EV_RCVQUEUE_FULL);
	return 0;
}

SEC("tp_btf/sock_exceed_buf_limit")
int BPF_PROG(exceed_buf_limit, struct sock *sk, struct proto *prot, long allocated, int kind)
{
	count(sk, kind == 0 /* SK_MEM_SEND */ ? SOCK_EV_EXCEED_SEND : SOCK_EV_EXCEED_RECV);
	return 0;
}

/* Drop reasons are numbered differently from kernel to kernel: CO-RE reads each one's value from the
 * running kernel's BTF. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
{
	struct sock *sk = rx_sk;
	enum sock_event kind;

	if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_RCVBUFF))
		kind = SOCK_EV_DROP_RCVBUF;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_PROTO_MEM))
		kind = SOCK_EV_DROP_MEM;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_SOCKET_BACKLOG))
		kind = SOCK_EV_DROP_BACKLOG;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_ZEROWINDOW))
		kind = SOCK_EV_DROP_ZEROWIN;
	else if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW))
		kind = SOCK_EV_DROP_LISTEN;
	else
		return 0;
	if (!sk)
		sk = BPF_CORE_READ(skb, sk);
	count(sk, kind);
	return 0;
}
