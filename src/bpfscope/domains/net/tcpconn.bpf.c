/* tcpconn: TCP connection opens and failures, one record each or counted in the kernel (count mode).
 *
 *   CONNECT  an active open completed (SYN_SENT -> ESTABLISHED; softirq: the owner is the process that
 *            called connect(), learnt at CLOSE -> SYN_SENT)
 *   ACCEPT   accept()/accept4() returned a TCP socket (in the accepting process)
 *   FAIL     an active open failed (SYN_SENT -> CLOSE), with the socket's error: ECONNREFUSED (a RST
 *            answered the SYN), ETIMEDOUT (no answer), EHOSTUNREACH..., 0 when the caller gave up
 *   RESET    an established (or closing) connection received a RST
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define MAX_ROWS 16384
#define BS_ECONNRESET 104

enum conn_event {
	CONN_CONNECT,
	CONN_ACCEPT,
	CONN_FAIL,
	CONN_RESET,
};
BS_ENUM(conn_event);

struct event {
	__u64 ts;
	struct bs_conn conn;
	struct bs_owner owner;
	enum conn_event kind;
	__s32 err;
};

struct row_key {
	struct bs_owner owner;
	enum conn_event kind;
	__s32 err;
	__u16 family;
	__u16 pad[3];
	__u8 raddr[16];
};

const volatile bool count_mode = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ROWS);
	__type(key, struct row_key);
	__type(value, __u64);
} counts SEC(".maps");

BS_RINGBUF(events, 1 << 20, struct event);

/* Events not counted: the counts map was full. */
__u64 rows_dropped = 0;

/* An event of a connection whose owner (NULL: unknown) has been selected. */
static __always_inline void record(const struct sock *sk, const struct bs_owner *owner, enum conn_event kind, int err)
{
	struct bs_conn conn = {};
	struct event *e;

	bs_conn_of(sk, &conn);
	if (!bs_conn_selected(&conn))
		return;
	if (count_mode) {
		struct row_key key = {};
		__u64 zero = 0, *n;

		key.kind = kind;
		key.err = err;
		key.family = conn.family;
		__builtin_memcpy(key.raddr, conn.daddr, sizeof(key.raddr));
		if (owner)
			key.owner = *owner;
		n = bpf_map_lookup_elem(&counts, &key);
		if (!n)
			n = bs_insert(&counts, &key, &zero, &rows_dropped);
		if (n)
			__sync_fetch_and_add(n, 1);
		return;
	}
	e = bs_reserve(&events, sizeof(*e));
	if (!e)
		return;
	e->ts = bpf_ktime_get_ns();
	e->conn = conn;
	if (owner)
		e->owner = *owner;
	else
		__builtin_memset(&e->owner, 0, sizeof(e->owner));
	e->kind = kind;
	e->err = err;
	bpf_ringbuf_submit(e, 0);
}

/* An event in softirq or any other context: the socket's recorded owner is the process. */
static __always_inline void record_owned(const struct sock *sk, enum conn_event kind, int err)
{
	struct bs_owner *owner = bs_owner_of(sk);

	if (bs_owner_selected(owner))
		record(sk, owner, kind, err);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (sk->sk_protocol != BS_IPPROTO_TCP)
		return 0;
	if (oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED)
		record_owned(sk, CONN_CONNECT, 0);
	/* tcp_done_with_error() sets sk_err before it closes the socket. */
	else if (oldstate == TCP_SYN_SENT && newstate == TCP_CLOSE)
		record_owned(sk, CONN_FAIL, BPF_CORE_READ(sk, sk_err));
	bs_owner_on_state(sk, oldstate, newstate);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(receive_reset, struct sock *sk)
{
	int state = BPF_CORE_READ(sk, __sk_common.skc_state);

	/* A RST answering a SYN is a failed connect, reported at its close. */
	if (state != TCP_SYN_SENT && state != TCP_LISTEN && state != TCP_CLOSE)
		record_owned(sk, CONN_RESET, BS_ECONNRESET);
	return 0;
}

/* In the accepting process: it is the owner, selected as the current task. */
static __always_inline void accepted(long ret)
{
	struct bs_owner owner = {};
	struct sock *sk;

	if (ret < 0)
		return;
	sk = bs_sk_of_fd(ret);
	if (!sk)
		return;
	bs_owner_learn_cookie(bs_sk_cookie_made(sk));
	if (!bs_task_selected())
		return;
	bs_owner_current(&owner);
	record(sk, &owner, CONN_ACCEPT, 0);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int accept4_exit(struct trace_event_raw_sys_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int accept_exit(struct trace_event_raw_sys_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}
