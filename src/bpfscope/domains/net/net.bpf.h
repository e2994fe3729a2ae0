/* TCP connection helpers shared by bpfscope's network tools (tcptop, tcpretrans, tcplife, tcpconn).
 *
 * A connection is named by struct bs_conn: family, local and remote address and port, and the network
 * namespace (inode number of sk->__sk_common.skc_net, what `ls -l /proc/PID/ns/net` shows), all read from
 * the struct sock with CO-RE, so the same tuple in two namespaces are two connections.
 *
 * Sockets are keyed by their cookie (bs_sk_cookie): unique for as long as the machine runs, where a
 * socket's address is reused as soon as it is freed, and the key sock_diag reports (idiag_cookie), so
 * that user space can join what it lists with what the programs recorded.
 *
 * Owner attribution. Many TCP events run in softirq (retransmit timers, state changes on an incoming
 * segment, the handshake of a passive open), where the current task is whoever was interrupted. So the
 * tools keep an LRU map bs_owners, cookie -> {tgid, comm, cgroup v2 id}, filled only where the kernel
 * runs in the context of the process using the socket:
 *   - connect(): the CLOSE -> SYN_SENT state change; listen(): CLOSE -> LISTEN (bs_owner_on_state);
 *   - send and receive: sock_send_length / sock_recv_length run in the caller's context
 *     (BS_OWNER_PROGRAMS below);
 *   - accept(): the syscall's exit, where the new fd is turned into its sock (bs_sk_of_fd).
 * bpfscope's own process and its children are never recorded as owners (bs_task_is_self): their
 * sockets' events count as of an unknown owner. Limits: a connection that was accepted but not yet
 * accepted()/used, or that existed before the tool started and has not sent or received since, has no
 * owner (tgid 0); the owner is the last process to use the socket (after a fork both may use it);
 * accepts done without accept(2)/accept4(2) (io_uring) are learnt at the first send or receive. The LRU
 * map forgets the least recently used sockets when full (BS_OWNERS_MAX), and bs_owner_on_state forgets
 * a socket's owner when it closes.
 *
 * Filters: the CLI's -p/--cgroup apply to the owner (bs_owner_selected), so softirq events are filtered
 * by the process they belong to, not by the interrupted one; --lport/--dport (bs_targ_lport,
 * bs_targ_rport; 0 = any) apply to the connection (bs_conn_selected). conn.py is the user-space side.
 */
#ifndef BPFSCOPE_NET_BPF_H
#define BPFSCOPE_NET_BPF_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "bpfscope.bpf.h"

#define BS_COMM_LEN 16
#define BS_OWNERS_MAX 65536
#define BS_AF_INET 2
#define BS_AF_INET6 10
#define BS_IPPROTO_TCP 6
#define BS_SOCK_STREAM 1

/* Kernel #defines, absent from BTF. */
#define BS_TCPHDR_SYN 0x02
#define BS_ICSK_TIME_LOSS_PROBE 5

const volatile __u16 bs_targ_lport = 0;
const volatile __u16 bs_targ_rport = 0;

struct bs_conn {
	__u8 saddr[16]; /* IPv4: the first 4 bytes */
	__u8 daddr[16];
	__u16 sport; /* host byte order */
	__u16 dport;
	__u16 family;
	__u16 pad;
	__u32 netns;
};

struct bs_owner {
	__u32 tgid;
	__u32 pad;
	__u64 cgroup;
	char comm[BS_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BS_OWNERS_MAX);
	__type(key, __u64); /* the socket's cookie */
	__type(value, struct bs_owner);
} bs_owners SEC(".maps");

/* A socket's cookie (made on first use). BTF (tp_btf) programs only: the helper wants a typed socket
 * pointer. */
static __always_inline __u64 bs_sk_cookie(const struct sock *sk)
{
	return bpf_get_socket_cookie((void *)sk);
}

/* The cookie of a socket reached through an untyped pointer (a syscall tracepoint, where the helper is
 * not available): 0 while nobody has asked for it yet. */
static __always_inline __u64 bs_sk_cookie_made(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

static __always_inline __u32 bs_sk_netns(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* The connection of anything that begins with a struct sock_common: a full socket, or the request sock
 * of a half-open connection (struct request_sock), whose local port is skc_num. */
static __always_inline void bs_conn_of_common(const struct sock_common *skc, struct bs_conn *c)
{
	c->family = BPF_CORE_READ(skc, skc_family);
	c->sport = BPF_CORE_READ(skc, skc_num);
	c->dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	c->netns = BPF_CORE_READ(skc, skc_net.net, ns.inum);
	if (c->family == BS_AF_INET6) {
		BPF_CORE_READ_INTO(&c->saddr, skc, skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&c->daddr, skc, skc_v6_daddr.in6_u.u6_addr8);
	} else {
		BPF_CORE_READ_INTO((__u32 *)c->saddr, skc, skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)c->daddr, skc, skc_daddr);
	}
}

static __always_inline void bs_conn_of(const struct sock *sk, struct bs_conn *c)
{
	bs_conn_of_common(&sk->__sk_common, c);
	/* inet_sport, not skc_num: the change to CLOSE is reported after the port was released. */
	c->sport = bpf_ntohs(BPF_CORE_READ((const struct inet_sock *)sk, inet_sport));
}

/* The same for a socket a tp_btf program was handed (a typed pointer the verifier lets it load from
 * directly) while it is in use (bound: skc_num is its port): loads instead of a helper call per field
 * (bpf_probe_read_kernel, eight of them above). */
static __always_inline void bs_conn_of_live(const struct sock *sk, struct bs_conn *c)
{
	const struct sock_common *skc = &sk->__sk_common;

	c->family = skc->skc_family;
	c->sport = skc->skc_num;
	c->dport = bpf_ntohs(skc->skc_dport);
	c->netns = skc->skc_net.net->ns.inum;
	if (c->family == BS_AF_INET6) {
		__builtin_memcpy(c->saddr, skc->skc_v6_rcv_saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(c->daddr, skc->skc_v6_daddr.in6_u.u6_addr8, 16);
	} else {
		*(__u32 *)c->saddr = skc->skc_rcv_saddr;
		*(__u32 *)c->daddr = skc->skc_daddr;
	}
}

static __always_inline bool bs_is_tcp(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	return BPF_CORE_READ(sk, sk_protocol) == BS_IPPROTO_TCP &&
	       BPF_CORE_READ(sk, sk_type) == BS_SOCK_STREAM &&
	       (family == BS_AF_INET || family == BS_AF_INET6);
}

static __always_inline bool bs_conn_selected(const struct bs_conn *c)
{
	if (bs_targ_lport && c->sport != bs_targ_lport)
		return false;
	if (bs_targ_rport && c->dport != bs_targ_rport)
		return false;
	return true;
}

/* The current task as an owner: call only in process context. */
static __always_inline void bs_owner_current(struct bs_owner *o)
{
	o->tgid = bpf_get_current_pid_tgid() >> 32;
	o->cgroup = bpf_get_current_cgroup_id();
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

/* Record the current task as the owner of the socket with this cookie (process context only). Cheap
 * when it already is; bpfscope and its children are never recorded. */
static __always_inline void bs_owner_learn_cookie(__u64 cookie)
{
	struct bs_owner *known, o = {};

	if (!cookie)
		return;
	known = bpf_map_lookup_elem(&bs_owners, &cookie);
	if (known && known->tgid == bpf_get_current_pid_tgid() >> 32)
		return;
	if (bs_task_is_self())
		return;
	bs_owner_current(&o);
	bpf_map_update_elem(&bs_owners, &cookie, &o, BPF_ANY);
}

static __always_inline void bs_owner_learn(const struct sock *sk)
{
	bs_owner_learn_cookie(bs_sk_cookie(sk));
}

static __always_inline struct bs_owner *bs_owner_of(const struct sock *sk)
{
	__u64 key = bs_sk_cookie(sk);

	return bpf_map_lookup_elem(&bs_owners, &key);
}

/* -p / --cgroup on the owner. An unknown owner passes only when no filter is set. */
static __always_inline bool bs_owner_selected(const struct bs_owner *o)
{
	if (!o)
		return !bs_targ_tgid && !bs_targ_cgroup;
	return bs_tgid_selected(o->tgid, o->cgroup);
}

/* What every inet_sock_set_state program does last, once the tool has read the owner: connect() moves
 * a socket from CLOSE to SYN_SENT and listen() from CLOSE to LISTEN in the caller's context (learn it);
 * a passive open's cookie is made at the end of its handshake, so that accept(), which reaches the
 * socket through an untyped pointer, can read it; a socket that closes has no owner any more. */
static __always_inline void bs_owner_on_state(const struct sock *sk, int oldstate, int newstate)
{
	__u64 key;

	if (oldstate == TCP_CLOSE && (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN)) {
		bs_owner_learn(sk);
	} else if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		bs_sk_cookie(sk);
	} else if (newstate == TCP_CLOSE) {
		key = bs_sk_cookie(sk);
		bpf_map_delete_elem(&bs_owners, &key);
	}
}

/* The sock behind file descriptor fd of the current task, or NULL (not a socket, or not TCP). */
static __always_inline struct sock *bs_sk_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	unsigned int max_fds = BPF_CORE_READ(task, files, fdt, max_fds);
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;

	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	if (!sock)
		return NULL;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || !bs_is_tcp(sk))
		return NULL;
	return sk;
}

/* accept() returned fd: the current task owns the TCP socket behind it, if it is one. */
static __always_inline void bs_owner_learn_fd(long fd)
{
	struct sock *sk = bs_sk_of_fd(fd);

	if (sk)
		bs_owner_learn_cookie(bs_sk_cookie_made(sk));
}

/* Owner learning from sends, receives and accepts: a tool that needs owners of connections it did not
 * see open puts BS_OWNER_PROGRAMS in its source (and calls bs_owner_on_state at its state changes).
 * Sends and receives of other protocols are skipped. */
#define BS_OWNER_PROGRAMS                                                                           \
	SEC("tp_btf/sock_send_length")                                                              \
	int BPF_PROG(bs_owner_send, struct sock *sk, int ret, int flags)                            \
	{                                                                                           \
		if (ret > 0 && sk->sk_protocol == BS_IPPROTO_TCP)                                   \
			bs_owner_learn(sk);                                                         \
		return 0;                                                                           \
	}                                                                                           \
	SEC("tp_btf/sock_recv_length")                                                              \
	int BPF_PROG(bs_owner_recv, struct sock *sk, int ret, int flags)                            \
	{                                                                                           \
		if (ret > 0 && sk->sk_protocol == BS_IPPROTO_TCP)                                   \
			bs_owner_learn(sk);                                                         \
		return 0;                                                                           \
	}                                                                                           \
	SEC("tracepoint/syscalls/sys_exit_accept4")                                                 \
	int bs_owner_accept4(struct trace_event_raw_sys_exit *ctx) { bs_owner_learn_fd(ctx->ret); return 0; } \
	SEC("tracepoint/syscalls/sys_exit_accept")                                                  \
	int bs_owner_accept(struct trace_event_raw_sys_exit *ctx) { bs_owner_learn_fd(ctx->ret); return 0; }

#endif
