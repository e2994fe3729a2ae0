/* TCP connection helpers shared by bpfscope's network tools (tcptop, tcpretrans, tcplife, tcpconn).
 *
 * A connection is named by struct bs_conn: family, local and remote address and port, and the network
 * namespace (inode number of sk->__sk_common.skc_net, what `ls -l /proc/PID/ns/net` shows), all read from
 * the struct sock with CO-RE, so the same tuple in two namespaces are two connections.
 *
 * Owner attribution. Many TCP events run in softirq (retransmit timers, state changes on an incoming
 * segment, the handshake of a passive open), where the current task is whoever was interrupted. So each
 * tool keeps an LRU map bs_owners, sk -> {tgid, comm, cgroup v2 id}, filled only where the kernel runs
 * in the context of the process using the socket:
 *   - connect(): the CLOSE -> SYN_SENT state change (bs_owner_learn_on_state);
 *   - send and receive: sock_send_length / sock_recv_length run in the caller's context
 *     (BS_OWNER_PROGRAMS below);
 *   - accept(): the syscall's exit, where the new fd is turned into its sock (bs_sk_of_fd);
 *   - listen(): the listening socket, owner of the SYN-ACKs its half-open connections send.
 * Limits: a connection that was accepted but not yet accepted()/used, or that existed before the tool
 * started and has not sent or received since, has no owner (tgid 0); the owner is the last process to
 * use the socket (after a fork both may use it); accepts done without accept(2)/accept4(2) (io_uring)
 * are learnt at the first send or receive. The LRU map forgets the least recently used sockets when
 * full (BS_OWNERS_MAX), and tools delete an entry when its socket closes.
 *
 * Filters: the CLI's -p/--cgroup apply to the owner (bs_owner_selected), so softirq events are filtered
 * by the process they belong to, not by the interrupted one; -L/-D port filters (bs_targ_lport,
 * bs_targ_rport; 0 = any) apply to the connection (bs_conn_selected). core/net.py is the user-space side.
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
	__type(key, __u64);
	__type(value, struct bs_owner);
} bs_owners SEC(".maps");

/* A socket's cookie: unique for as long as the machine runs, where its address is reused as soon as it
 * is freed. Keys of rows that outlive the socket (until user space has read them) must be cookies: a new
 * socket at the same address would otherwise take over, or wipe, a closed one's counts. BTF (tp_btf)
 * programs only: the helper wants a typed socket pointer. */
static __always_inline __u64 bs_sk_cookie(const struct sock *sk)
{
	return bpf_get_socket_cookie((void *)sk);
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

/* Record the current task as the socket's owner (process context only). Cheap when it already is. */
static __always_inline void bs_owner_learn(const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct bs_owner *known = bpf_map_lookup_elem(&bs_owners, &key);
	struct bs_owner o = {};

	if (known && known->tgid == bpf_get_current_pid_tgid() >> 32)
		return;
	bs_owner_current(&o);
	bpf_map_update_elem(&bs_owners, &key, &o, BPF_ANY);
}

static __always_inline struct bs_owner *bs_owner_of(const struct sock *sk)
{
	__u64 key = (__u64)sk;

	return bpf_map_lookup_elem(&bs_owners, &key);
}

static __always_inline void bs_owner_forget(const struct sock *sk)
{
	__u64 key = (__u64)sk;

	bpf_map_delete_elem(&bs_owners, &key);
}

/* -p / --cgroup on the owner. An unknown owner passes only when no filter is set. */
static __always_inline bool bs_owner_selected(const struct bs_owner *o)
{
	if (!bs_targ_tgid && !bs_targ_cgroup)
		return true;
	if (!o)
		return false;
	if (bs_targ_tgid && o->tgid != bs_targ_tgid)
		return false;
	if (bs_targ_cgroup && o->cgroup != bs_targ_cgroup)
		return false;
	return true;
}

/* connect() moves a socket from CLOSE to SYN_SENT in the caller's context. A passive open's socket is
 * new when its handshake completes (in softirq): an owner left at its address by a socket freed there
 * before is not its owner. */
static __always_inline void bs_owner_learn_on_state(const struct sock *sk, int oldstate, int newstate)
{
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT)
		bs_owner_learn(sk);
	else if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED)
		bs_owner_forget(sk);
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

/* The current task owns the TCP socket behind fd, if it is one. */
static __always_inline void bs_owner_learn_fd(long fd)
{
	struct sock *sk = bs_sk_of_fd(fd);

	if (sk)
		bs_owner_learn(sk);
}

/* Owner learning from sends, receives and accepts: a tool that needs owners of connections it did not
 * see open puts BS_OWNER_PROGRAMS in its source. Sends and receives of other protocols are skipped. */
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
	int bs_owner_accept(struct trace_event_raw_sys_exit *ctx) { bs_owner_learn_fd(ctx->ret); return 0; } \
	SEC("tracepoint/syscalls/sys_enter_listen")                                                 \
	int bs_owner_listen(struct trace_event_raw_sys_enter *ctx) { bs_owner_learn_fd(ctx->args[0]); return 0; }

#endif
