/* requests: the bytes processes exchange over TCP and UDP sockets, plain and through OpenSSL, one record
 * per call, for user space to parse into requests and responses.
 *
 * How a call is captured (no kprobes here: syscall tracepoints, socket tracepoints and uprobes):
 *   1. sys_enter of write, writev, sendto, sendmsg, sendmmsg and sendfile64 keeps the call's arguments
 *      and entry time in the thread's task storage (calls), for selected tasks only (-p, --cgroup,
 *      bpfscope itself left out). Receiving calls (read, readv, recvfrom, recvmsg, recvmmsg) have no
 *      entry program: their entry time is no part of any request (a server's read waits for the
 *      client), and most reads of a traced process are of files and pipes, never captured;
 *   2. at the end of the call's socket work the kernel runs tp_btf/sock_send_length or sock_recv_length
 *      with the socket and the bytes moved: there it is named (its cookie: unique while the machine
 *      runs), its addresses read, the port filters applied; a receive's state is begun here, its
 *      arguments read from the registers the syscall was made with (its number says which syscall it
 *      is); a call that never reaches a socket (a file) is not captured, and costs a send its entry
 *      program alone, a receive nothing;
 *   3. the bytes are in the caller's buffer by then whichever the direction: the hook copies the first
 *      capture_bytes of them (all iovecs of the call, in order) and sends one record with the call's
 *      exact size, its times. Left to sys_exit, which runs after the kernel has written to the caller
 *      what the hook cannot read yet or has seen only part of: a UDP receive's peer (recvfrom,
 *      recvmsg), recvmmsg's and sendmmsg's messages (a hook each), sendfile (a hook per piece; it sends
 *      the size alone: the bytes come from a file, never through user memory).
 *   A plain read or write of a TCP stream with a position (all its calls but the first) takes its place
 *   at the hook's start (early_call), and is done there when it lies in a stretch user space or the
 *   kernel skips (most calls of a long body): nothing else is looked up for it.
 * TLS: uprobes on libssl's SSL_read/SSL_write(_ex) keep the SSL object per thread; the socket hooks of
 * the syscall OpenSSL makes on that thread link the object to its socket (ssl_links) and mark the socket
 * as TLS (conns), after which its ciphertext is no longer sent; the uretprobe sends the plaintext.
 * A socket's role comes from its state changes (connect: client; a passive open: server); its close
 * (TCP) is a record of its own, so user space forgets it. Connections opened before the tool started are
 * captured from their next call on.
 *
 * Not captured: io_uring (no syscall buffer to read), kernel TLS (the kernel encrypts: what the process
 * wrote is captured, as plaintext, only if it went through libssl), Unix sockets.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "bpfscope.bpf.h"
#include "taskset.bpf.h" /* bench: only its components' and workload's tasks */
#include "../net/net.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* The most a record carries of one call (a power of two; capture_bytes + BS_REQ_TAIL up to this), the
 * bytes of a longer call's end kept beside its start (a power of two), and the fewest bytes of a body
 * still to come for which its calls are skipped (fewer are not worth a map update: a body that fits in
 * a call or two). In an enum, which user space reads from BTF. */
enum bs_req_limits { BS_REQ_CAPTURE_MAX = 16384, BS_REQ_TAIL = 256, BS_REQ_SKIP_MIN = 65536 };
BS_ENUM(bs_req_limits);
#define REQ_CAPTURE_MAX BS_REQ_CAPTURE_MAX
/* iovecs of one call walked (gRPC's sendmsg carries scores), messages of one recvmmsg/sendmmsg. */
#define REQ_IOV_MAX 1024
#define REQ_MMSG_MAX 8
#define REQ_CONNS_MAX 65536
#define REQ_MSG_PEEK 2
#define REQ_IPPROTO_UDP 17

/* Bytes of each call copied from its start; a longer call's last BS_REQ_TAIL bytes too (what shares a
 * call with a large value after it: pipelined replies, HTTP/2 trailers, a chunked body's last chunk);
 * the rest is counted in size. capture_bytes <= REQ_CAPTURE_MAX - BS_REQ_TAIL. Port filter (0: any),
 * host byte order. */
const volatile __u32 capture_bytes = 4096;
const volatile bool targ_ports = false; /* --port: only connections with a port of `ports` at either end */

enum bs_req_kind { BS_REQ_KIND_DATA = 0, BS_REQ_KIND_CLOSE = 1 };
enum bs_req_dir { BS_REQ_DIR_EGRESS = 0, BS_REQ_DIR_INGRESS = 1 };
enum bs_req_source { BS_REQ_SOURCE_SYSCALL = 0, BS_REQ_SOURCE_TLS = 1, BS_REQ_SOURCE_SENDFILE = 2 };
enum bs_req_role { BS_REQ_ROLE_UNKNOWN = 0, BS_REQ_ROLE_CLIENT = 1, BS_REQ_ROLE_SERVER = 2 };
/* How the call passed its buffer: what sys_exit reads to find the bytes. */
enum bs_req_args { BS_REQ_ARGS_BUF = 0, BS_REQ_ARGS_IOV, BS_REQ_ARGS_MSG, BS_REQ_ARGS_MMSG, BS_REQ_ARGS_FILE };
BS_ENUM(bs_req_kind);
BS_ENUM(bs_req_dir);
BS_ENUM(bs_req_source);
BS_ENUM(bs_req_role);

struct req_event {
	__u64 pos;	 /* offset of the call's first byte in its direction's bytes (TCP; 0 for UDP) */
	__u64 start_ns;	 /* a send's entry, bpf_ktime_get_ns(); a receive's return (as end_ns) */
	__u64 end_ns;	 /* its return */
	__u64 cookie;	 /* the socket's */
	__u64 cgroup;
	__u32 tgid;
	__u32 tid;
	__s32 fd;
	__u32 size;	 /* bytes the call moved (a message of recvmmsg/sendmmsg: its own) */
	__u32 len;	 /* bytes of them in data: the call's first; with a tail, capture_bytes of them, then
			  * the tail ring */
	__u16 tail;	 /* the call's last bytes in the ring (BS_REQ_TAIL bytes after capture_bytes, the
			  * byte at call offset x at ring position x % BS_REQ_TAIL) */
	__u8 protocol;	 /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 check_peer; /* the port filter applies to the message's peer (set before sending) */
	enum bs_req_kind kind;
	enum bs_req_dir dir;
	enum bs_req_source source;
	enum bs_req_role role;
	struct bs_conn conn; /* local and remote; an unconnected UDP socket's remote from the message */
	char comm[BS_COMM_LEN];
	__u8 data[REQ_CAPTURE_MAX];
};

/* 32 MiB: about 100k records of 300 bytes, several seconds of a busy server while user space parses. */
BS_RINGBUF_VAR(events, 32 << 20, struct req_event);

/* Walking an iovec array with bpf_loop: gRPC and other RPC stacks send scores of iovecs in one call,
 * more than an unrolled loop lets the verifier through. The walk's state lives in the scratch map, not
 * on the stack: the verifier then sees its numbers as unknown and verifies the step once, instead of
 * following every offset it could reach. */
struct iov_walk {
	const struct iovec *iov;
	__u64 limit;	/* bytes of the call's start copied */
	__u64 count;
	__u64 left;	/* bytes of the call not yet walked */
	__u64 walked;	/* bytes walked */
	__u32 off;
	__u32 pad;
};

/* A record is built here (bpf_ringbuf_reserve takes constant sizes only): the spill after the event
 * lets the verifier see a copy of up to REQ_CAPTURE_MAX bytes at any offset below REQ_CAPTURE_MAX. */
struct req_scratch {
	struct req_event ev;
	__u8 spill[REQ_CAPTURE_MAX];
	struct iov_walk walk;
};

/* One per CPU, indexed by CPU (a per-CPU array's values are limited to 32 KiB); user space sizes it to
 * the machine. Programs do not migrate while they run. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct req_scratch);
} scratch SEC(".maps");

/* A call between its entry (a receive: its socket hook) and its exit, per thread. */
struct req_call {
	__u64 start_ns;	 /* a send's entry; 0 for a receive, dated at its return (no clock read twice) */
	__u64 buf;	 /* buffer, iovec array, msghdr or mmsghdr array */
	__u64 count;	 /* iovecs or messages */
	__u64 addr;	 /* recvfrom/sendto: the peer's sockaddr */
	__u64 cookie;	 /* set by the socket hooks: a selected socket */
	__u64 pos;	 /* the call's place in its stream and the bytes of it to copy, when early_call() */
	__u32 limit;	 /* took them (limit > 0; 0: not taken) */
	struct bs_conn conn;
	__s32 fd;
	__s32 nr;	 /* the syscall's number: only its own exit reads the state (a receive made inside
			  * another syscall, io_uring_enter's, leaves a state no traced exit takes) */
	__u16 protocol;
	__u8 args;	 /* enum bs_req_args */
	__u8 dir;	 /* enum bs_req_dir */
	__u8 skip;	 /* MSG_PEEK, or TLS ciphertext: nothing sent */
	__u8 check_peer; /* an unconnected UDP socket: the port filter waits for the message's peer */
	__u8 active;	 /* between an entry and its exit (the storage stays with the thread) */
	__u8 pad[1];
};

/* An SSL_read/SSL_write in progress, per thread. */
struct ssl_call {
	__u64 ssl;
	__u64 buf;
	__u64 done_ptr; /* _ex: where the byte count is written */
	__u64 start_ns;
	__u8 dir;
	__u8 active; /* between the uprobe and its uretprobe */
	__u8 pad[6];
};

/* A thread's calls in progress: a syscall's (first: the storage's value is also its req_call) and an
 * OpenSSL call's, in one storage so that the socket hooks, which look at both on every call, find them
 * with one lookup. */
struct req_thread {
	struct req_call call;
	struct ssl_call ssl;
};

/* Task-local storage, not a hash keyed by thread id: every read and write of every traced process
 * passes its entry and exit, and a hash's update and delete were most of their cost (under the
 * network-analysis mesh, the entries of recvfrom and writev were 0.4-0.6% of the machine each). Found
 * without hashing or locks, freed with the thread, and it cannot fill up. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct req_thread);
} calls SEC(".maps");

/* What is known of a socket: its role, whether it carries TLS (then its ciphertext is not sent), and
 * whether a record of it was sent (then its close is). */
struct req_conn {
	__u8 role; /* enum bs_req_role */
	__u8 tls;
	__u8 seen;
	__u8 last_dir; /* the direction of its last record sent, plus one (0: none yet) */
	__u8 head_request; /* the record at its last turn began "HEAD ": its answer has no body */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, REQ_CONNS_MAX);
	__type(key, __u64);
	__type(value, struct req_conn);
} conns SEC(".maps");

struct ssl_key {
	__u64 ssl;
	__u32 tgid;
	__u32 pad;
};

/* An SSL object's socket, learnt from the syscall OpenSSL made on the caller's thread. */
struct ssl_link {
	__u64 cookie;
	struct bs_conn conn;
	__s32 fd;
	__u16 protocol;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, REQ_CONNS_MAX);
	__type(key, struct ssl_key);
	__type(value, struct ssl_link);
} ssl_links SEC(".maps");

/* A direction of a TCP socket, plain or TLS plaintext: where its bytes are (positions, the kernel's),
 * and up to where user space asked not to be sent them (skips, user space's: a body it steps over by
 * count, so that a large response costs its first and last calls, not one record per call). A call
 * wholly before the skip is counted in the position and not sent; the call that holds the skip's last
 * byte is, with its time: a response still ends when its last byte moved. */
struct stream_key {
	__u64 cookie;
	__u8 dir;
	__u8 tls;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2 * REQ_CONNS_MAX);
	__type(key, struct stream_key);
	__type(value, __u64);
} positions SEC(".maps");

/* What user space asked of a direction: calls wholly before `until` are not sent; with `probe`, the
 * calls sent carry only their first `probe` bytes (a connection out of step with its protocol, or not
 * known yet: the next message's first bytes tell it, the rest of a call is not worth copying; one not
 * parsed at all: one byte, its size still counts). */
struct stream_skip {
	__u64 until;
	__u32 probe;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct stream_key);
	__type(value, struct stream_skip);
} skips SEC(".maps");

/* --port's ports (host byte order), filled by user space before the programs attach. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

/* Losses beside the ring's: calls not followed (no task storage for the thread: out of memory), and
 * TLS plaintext whose socket was
 * never seen (the SSL object had made no syscall since the tool started). */
__u64 calls_unseen = 0;
__u64 tls_unlinked = 0;

/* --- syscall entries ---------------------------------------------------------------------------- */

static __always_inline int call_enter(long nr, int fd, enum bs_req_args args, __u64 buf, __u64 count,
				      __u64 addr)
{
	struct req_call *call;

	if (!bs_task_selected() || !bs_current_in_set())
		return 0;
	call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!call) {
		__sync_fetch_and_add(&calls_unseen, 1);
		return 0;
	}
	*call = (struct req_call){
		.start_ns = bpf_ktime_get_ns(),
		.fd = fd,
		.nr = nr,
		.args = args,
		.dir = BS_REQ_DIR_EGRESS,
		.buf = buf,
		.count = count,
		.addr = addr,
		.active = 1,
	};
	return 0;
}

#define REQ_ENTER(name, how, buf, count, addr)                                                        \
	SEC("tracepoint/syscalls/sys_enter_" #name)                                                  \
	int enter_##name(struct trace_event_raw_sys_enter *ctx)                                      \
	{                                                                                            \
		return call_enter(ctx->id, ctx->args[0], how, buf, count, addr);                     \
	}

REQ_ENTER(write, BS_REQ_ARGS_BUF, ctx->args[1], 0, 0)
REQ_ENTER(writev, BS_REQ_ARGS_IOV, ctx->args[1], ctx->args[2], 0)
REQ_ENTER(sendto, BS_REQ_ARGS_BUF, ctx->args[1], 0, ctx->args[4])
REQ_ENTER(sendmsg, BS_REQ_ARGS_MSG, ctx->args[1], 1, 0)
REQ_ENTER(sendmmsg, BS_REQ_ARGS_MMSG, ctx->args[1], ctx->args[2], 0)
REQ_ENTER(sendfile64, BS_REQ_ARGS_FILE, 0, 0, 0)

/* The registers a syscall was made with (its arguments, its number), kept by the kernel until it
 * returns: a receive's are read from here, at its socket hook and its exit. The number where each
 * architecture's syscall_get_nr() (asm/syscall.h) reads it; tested on x86-64 only. */
#if defined(__TARGET_ARCH_x86)
#define REQ_SYSCALL_NR(regs) ((regs)->orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define REQ_SYSCALL_NR(regs) ((regs)->syscallno)
#elif defined(__TARGET_ARCH_riscv)
#define REQ_SYSCALL_NR(regs) ((regs)->a7)
#elif defined(__TARGET_ARCH_s390)
#define REQ_SYSCALL_NR(regs) ((regs)->int_code & 0xffff)
#elif defined(__TARGET_ARCH_powerpc)
#define REQ_SYSCALL_NR(regs) ((regs)->gpr[0])
#else
#error "requests.bpf.c: say which register of struct pt_regs holds the syscall's number here"
#endif
/* The receiving syscalls' numbers and the plain sends', from each architecture's syscall table
 * (arch/x86/entry/syscalls, include/uapi/asm-generic/unistd.h for arm64 and riscv, arch/s390 and
 * arch/powerpc's syscall.tbl). */
#if defined(__TARGET_ARCH_x86)
#define REQ_NR_READ 0
#define REQ_NR_READV 19
#define REQ_NR_RECVFROM 45
#define REQ_NR_RECVMSG 47
#define REQ_NR_RECVMMSG 299
#define REQ_NR_WRITE 1
#define REQ_NR_WRITEV 20
#define REQ_NR_SENDTO 44
#define REQ_NR_SENDMSG 46
#elif defined(__TARGET_ARCH_arm64) || defined(__TARGET_ARCH_riscv)
#define REQ_NR_READ 63
#define REQ_NR_READV 65
#define REQ_NR_RECVFROM 207
#define REQ_NR_RECVMSG 212
#define REQ_NR_RECVMMSG 243
#define REQ_NR_WRITE 64
#define REQ_NR_WRITEV 66
#define REQ_NR_SENDTO 206
#define REQ_NR_SENDMSG 211
#elif defined(__TARGET_ARCH_s390)
#define REQ_NR_READ 3
#define REQ_NR_READV 145
#define REQ_NR_RECVFROM 371
#define REQ_NR_RECVMSG 372
#define REQ_NR_RECVMMSG 357
#define REQ_NR_WRITE 4
#define REQ_NR_WRITEV 146
#define REQ_NR_SENDTO 369
#define REQ_NR_SENDMSG 370
#elif defined(__TARGET_ARCH_powerpc)
#define REQ_NR_READ 3
#define REQ_NR_READV 145
#define REQ_NR_RECVFROM 337
#define REQ_NR_RECVMSG 342
#define REQ_NR_RECVMMSG 343
#define REQ_NR_WRITE 4
#define REQ_NR_WRITEV 146
#define REQ_NR_SENDTO 335
#define REQ_NR_SENDMSG 341
#else
#error "requests.bpf.c: give the receiving syscalls' numbers here"
#endif
/* Kernel #defines, absent from BTF: threads that make no syscall of their own (a kernel thread, an
 * io_uring worker) never reach a traced exit. */
#define REQ_PF_IO_WORKER 0x00000010
#define REQ_PF_KTHREAD 0x00200000

static __always_inline struct pt_regs *syscall_regs(struct task_struct *task)
{
	return (struct pt_regs *)bpf_task_pt_regs(task);
}

/* How a receive passed its buffer, by its syscall's number; -1 for a call that is none of them (a
 * receive io_uring makes inside io_uring_enter, a kernel socket's inside another call). */
static __always_inline int receive_args(long nr)
{
	switch (nr) {
	case REQ_NR_READ:
	case REQ_NR_RECVFROM:
		return BS_REQ_ARGS_BUF;
	case REQ_NR_READV:
		return BS_REQ_ARGS_IOV;
	case REQ_NR_RECVMSG:
		return BS_REQ_ARGS_MSG;
	case REQ_NR_RECVMMSG:
		return BS_REQ_ARGS_MMSG;
	default:
		return -1;
	}
}

/* A receive's state, begun at its first socket hook with its arguments; NULL for a call not followed. */
static __always_inline struct req_call *receive_begin(struct task_struct *task)
{
	struct pt_regs *regs;
	struct req_call *call;
	long nr;
	int args;

	if (task->flags & (REQ_PF_KTHREAD | REQ_PF_IO_WORKER))
		return NULL;
	regs = syscall_regs(task);
	nr = REQ_SYSCALL_NR(regs);
	args = receive_args(nr);
	if (args < 0)
		return NULL;
	call = bpf_task_storage_get(&calls, task, 0, 0);
	/* A later message of the same recvmmsg. Any other receive begins afresh: a read's state is ended by
	 * its hook's record, and one the hook left (a UNIX socket's, a socket not selected, TLS ciphertext)
	 * has no exit to end it: taken again, it gave a later read of a traced socket its buffer. */
	if (call && call->active && call->nr == nr && args == BS_REQ_ARGS_MMSG)
		return call;
	if (!bs_task_selected() || !bs_current_in_set())
		return NULL;
	if (!call) {
		call = bpf_task_storage_get(&calls, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (!call) {
			__sync_fetch_and_add(&calls_unseen, 1);
			return NULL;
		}
	}
	*call = (struct req_call){
		.buf = PT_REGS_PARM2_SYSCALL(regs),
		.count = args == BS_REQ_ARGS_IOV || args == BS_REQ_ARGS_MMSG ? PT_REGS_PARM3_SYSCALL(regs) : 1,
		.addr = nr == REQ_NR_RECVFROM ? PT_REGS_PARM5_SYSCALL(regs) : 0,
		.fd = PT_REGS_PARM1_SYSCALL(regs),
		.nr = nr,
		.args = args,
		.dir = BS_REQ_DIR_INGRESS,
		.active = 1,
	};
	return call;
}

/* A send's state, begun at its entry: that of this syscall, not one whose exit left it (no exit is
 * traced for most sends, and io_uring_enter may send on a socket after a write to a file). */
static __always_inline struct req_call *send_state(struct task_struct *task)
{
	struct req_call *call = bpf_task_storage_get(&calls, task, 0, 0);

	if (!call || !call->active || call->dir != BS_REQ_DIR_EGRESS)
		return NULL;
	if (call->nr != REQ_SYSCALL_NR(syscall_regs(task)))
		return NULL;
	return call;
}

/* --- the socket, inside the call ------------------------------------------------------------------ */

static __always_inline bool has_port(const struct bs_conn *conn)
{
	return bpf_map_lookup_elem(&ports, &conn->sport) || bpf_map_lookup_elem(&ports, &conn->dport);
}

static __always_inline bool port_selected(const struct bs_conn *conn)
{
	if (targ_ports && !has_port(conn))
		return false;
	return bs_conn_selected(conn);
}

/* How many of the first bytes of a call at `pos` of its stream to copy, given what user space (or the
 * kernel) asked of the stream: 0 for a call wholly before the end of a stretch to skip. */
static __always_inline __u32 stream_limit(const struct stream_skip *skip, __u64 pos, __u64 size)
{
	if (!skip)
		return capture_bytes;
	if (pos + size < skip->until)
		return 0;
	return skip->probe ? skip->probe : capture_bytes;
}

enum req_early { REQ_EARLY_NONE, REQ_EARLY_DONE, REQ_EARLY_ADVANCED };

/* Before anything else at a socket hook: a plain read or write syscall (read, readv, recvfrom,
 * recvmsg; write, writev, sendto, sendmsg) on a TCP socket whose stream has a position already (all
 * its calls but the first) moves the position past itself here, and is done when it lies wholly inside
 * a stretch to skip (most calls of a long body): no task storage, no connection or TLS lookup, no
 * scratch, which a call not sent does not need (under the network-analysis mesh, 35,000 socket calls
 * a second, nearly all inside 4 MiB bodies). Otherwise the call goes on as before, its place and limit
 * taken (ADVANCED). The calls whose exits send (recvmmsg, sendmmsg, sendfile, a UDP peer) and a
 * receive that peeks are left to the hook's other path, which is the same as before for them. A TLS
 * socket's ciphertext has no plain position, unless it began plain (a STARTTLS): then that position
 * moves past ciphertext, which changes nothing sent. No task filter here: only a selected task's calls
 * give a stream its position (bpfscope's own never), and a call to be sent meets the filters on the
 * other path; another process's call on a traced stream moves the position past bytes that did leave
 * it (the filters cost 24-44 ns a call, the load of the task's parent among them). */
static __always_inline int early_call(struct sock *sk, int ret, int flags, bool recv, __u64 *at, __u32 *limit)
{
	struct task_struct *task;
	struct stream_key key = {};
	__u64 *pos;
	long nr;

	if (ret <= 0 || sk->sk_protocol != BS_IPPROTO_TCP || (recv && (flags & REQ_MSG_PEEK)))
		return REQ_EARLY_NONE;
	task = bpf_get_current_task_btf();
	if (task->flags & (REQ_PF_KTHREAD | REQ_PF_IO_WORKER))
		return REQ_EARLY_NONE;
	nr = REQ_SYSCALL_NR(syscall_regs(task));
	if (recv ? nr != REQ_NR_READ && nr != REQ_NR_READV && nr != REQ_NR_RECVFROM && nr != REQ_NR_RECVMSG
		 : nr != REQ_NR_WRITE && nr != REQ_NR_WRITEV && nr != REQ_NR_SENDTO && nr != REQ_NR_SENDMSG)
		return REQ_EARLY_NONE;
	key.cookie = bpf_get_socket_cookie(sk);
	key.dir = recv ? BS_REQ_DIR_INGRESS : BS_REQ_DIR_EGRESS;
	pos = bpf_map_lookup_elem(&positions, &key);
	if (!pos)
		return REQ_EARLY_NONE;
	*at = __sync_fetch_and_add(pos, ret);
	*limit = stream_limit(bpf_map_lookup_elem(&skips, &key), *at, ret);
	return *limit ? REQ_EARLY_ADVANCED : REQ_EARLY_DONE;
}

/* The call whose record the hook sends now (NULL: none, or its exit does). */
static __always_inline struct req_call *on_sock_io(struct sock *sk, int ret, int flags, bool recv)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct task_struct *task = bpf_get_current_task_btf();
	struct req_call *call = recv ? receive_begin(task) : send_state(task);
	struct req_conn *known, fresh = {};
	struct ssl_call *ssl;
	struct ssl_link link = {};
	struct ssl_key key = {};
	__u16 family, protocol;
	__u64 cookie;

	if (!call || !call->active || call->cookie || call->skip)
		return NULL;
	if (recv && (flags & REQ_MSG_PEEK)) {
		call->skip = 1; /* the bytes will be read again */
		return NULL;
	}
	family = sk->__sk_common.skc_family;
	protocol = sk->sk_protocol;
	if ((family != BS_AF_INET && family != BS_AF_INET6) ||
	    (protocol != BS_IPPROTO_TCP && protocol != REQ_IPPROTO_UDP))
		return NULL;
	bs_conn_of_live(sk, &call->conn);
	if (protocol == REQ_IPPROTO_UDP && !call->conn.dport)
		call->check_peer = 1;
	else if (!port_selected(&call->conn))
		return NULL;
	cookie = bpf_get_socket_cookie(sk);
	call->cookie = cookie;
	call->protocol = protocol;
	known = bpf_map_lookup_elem(&conns, &cookie);
	ssl = &((struct req_thread *)call)->ssl;
	if (ssl->active) {
		/* OpenSSL's own syscall: this is the SSL object's socket. */
		key.ssl = ssl->ssl;
		key.tgid = pid_tgid >> 32;
		link.cookie = cookie;
		link.conn = call->conn;
		link.fd = call->fd;
		link.protocol = protocol;
		bpf_map_update_elem(&ssl_links, &key, &link, BPF_ANY);
		if (!known) {
			bpf_map_update_elem(&conns, &cookie, &fresh, BPF_NOEXIST);
			known = bpf_map_lookup_elem(&conns, &cookie);
		}
		if (known)
			known->tls = 1;
	}
	if (known && known->tls) {
		call->skip = 1;
		return NULL;
	}
	/* Sent by the exit: a UDP receive's peer is written to the caller after the hook; recvmmsg,
	 * sendmmsg and sendfile make a hook per message or piece. */
	if (call->args == BS_REQ_ARGS_MMSG || call->args == BS_REQ_ARGS_FILE)
		return NULL;
	if (recv && protocol == REQ_IPPROTO_UDP && (call->args == BS_REQ_ARGS_MSG || call->addr))
		return NULL;
	return call;
}

/* --- records ---------------------------------------------------------------------------------------- */

static __always_inline struct req_event *event_begin(void)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct req_scratch *s = bpf_map_lookup_elem(&scratch, &cpu);

	return s ? &s->ev : NULL;
}

/* Copy n bytes of user memory at src to data[off...], within limit; returns the new offset. */
static __always_inline __u32 copy_user(struct req_event *ev, __u32 off, const void *src, __u64 n, __u32 limit)
{
	if (limit > REQ_CAPTURE_MAX)
		limit = REQ_CAPTURE_MAX;
	if (off >= limit)
		return off;
	if (n > limit - off)
		n = limit - off;
	if (n > REQ_CAPTURE_MAX)
		n = REQ_CAPTURE_MAX;
	/* off < REQ_CAPTURE_MAX and n <= REQ_CAPTURE_MAX: within data and the spill after it. */
	if (bpf_probe_read_user(&ev->data[off & (REQ_CAPTURE_MAX - 1)], n, src))
		return off;
	return off + n;
}

/* Copy the m bytes that end at user address `end` and at call offset `pos_end` into the tail ring (the
 * BS_REQ_TAIL bytes after capture_bytes, offset x at position x % BS_REQ_TAIL): the ring ends up holding
 * the call's last bytes, whatever buffers they came in. */
static __always_inline void ring_put(struct req_event *ev, const __u8 *end, __u64 m, __u64 pos_end)
{
	__u64 start, first;
	__u32 base = capture_bytes;

	if (base > REQ_CAPTURE_MAX - BS_REQ_TAIL)
		base = REQ_CAPTURE_MAX - BS_REQ_TAIL;
	if (m > BS_REQ_TAIL)
		m = BS_REQ_TAIL;
	start = (pos_end - m) & (BS_REQ_TAIL - 1);
	first = BS_REQ_TAIL - start;
	if (first > m)
		first = m;
	bpf_probe_read_user(&ev->data[base + start], first, end - m);
	if (m > first)
		bpf_probe_read_user(&ev->data[base], (m - first) & (BS_REQ_TAIL - 1), end - m + first);
}

/* After the head was copied (off bytes): a call longer than capture_bytes sends the whole ring. */
static __always_inline void tail_done(struct req_event *ev, __u32 off, __u64 size)
{
	ev->len = off;
	ev->tail = 0;
	if (off < capture_bytes || size <= off)
		return; /* all of it captured (or the head cut short by a fault: no tail) */
	ev->tail = size - off < BS_REQ_TAIL ? size - off : BS_REQ_TAIL;
	ev->len = off + BS_REQ_TAIL;
}

static long iov_step(__u32 i, void *data)
{
	struct req_scratch *s = *(struct req_scratch **)data;
	struct iov_walk *w = &s->walk;
	struct iovec one;
	__u64 n;

	if (i >= w->count || !w->left)
		return 1;
	if (bpf_probe_read_user(&one, sizeof(one), &w->iov[i]))
		return 1;
	n = one.iov_len < w->left ? one.iov_len : w->left;
	w->off = copy_user(&s->ev, w->off, one.iov_base, n, w->limit);
	w->left -= n;
	w->walked += n;
	if (w->walked > capture_bytes && w->limit >= capture_bytes) /* (a probe sends no tail) */
		ring_put(&s->ev, (const __u8 *)one.iov_base + n, n, w->walked);
	return 0;
}

/* The first `size` bytes of an iovec array, and its last. */
static __always_inline void copy_iov(struct req_event *ev, const struct iovec *iov, __u64 count, __u64 size,
				     __u32 limit)
{
	/* ev is the scratch's first member */
	struct req_scratch *s = (struct req_scratch *)ev;
	struct iov_walk *w = &s->walk;

	w->iov = iov;
	w->count = count;
	w->left = size;
	w->walked = 0;
	w->off = 0;
	w->limit = limit;
	bpf_loop(REQ_IOV_MAX, iov_step, &s, 0);
	tail_done(ev, w->off, w->left ? 0 : size); /* the call's end not walked: no tail */
}

static __always_inline void copy_buf(struct req_event *ev, const void *buf, __u64 size, __u32 limit)
{
	__u32 off = copy_user(ev, 0, buf, size, limit);

	if (size > off && off >= capture_bytes) /* (a probe, or a fault, sends no tail) */
		ring_put(ev, (const __u8 *)buf + size, size - off, size);
	tail_done(ev, off, size);
}

/* The peer of a message (recvfrom/sendto/recvmsg/sendmsg on an unconnected socket) as the remote. */
static __always_inline void peer_of(struct req_event *ev, const void *addr)
{
	struct sockaddr_in6 sa = {};

	/* A TCP socket's peer is its connection's (the kernel neither reads nor writes a connected
	 * stream's address argument). */
	if (!addr || ev->protocol != REQ_IPPROTO_UDP || bpf_probe_read_user(&sa, sizeof(sa), addr))
		return;
	if (sa.sin6_family == BS_AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&sa;

		ev->conn.dport = bpf_ntohs(in->sin_port);
		__builtin_memset(ev->conn.daddr, 0, sizeof(ev->conn.daddr));
		__builtin_memcpy(ev->conn.daddr, &in->sin_addr, 4);
	} else if (sa.sin6_family == BS_AF_INET6) {
		ev->conn.dport = bpf_ntohs(sa.sin6_port);
		__builtin_memcpy(ev->conn.daddr, &sa.sin6_addr, 16);
	}
}

static __always_inline void event_header(struct req_event *ev, struct req_call *call, __u64 now)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct req_conn *known = bpf_map_lookup_elem(&conns, &call->cookie);
	struct req_conn fresh = {.seen = 1};

	ev->start_ns = call->start_ns ? call->start_ns : now; /* a receive's: its return */
	ev->end_ns = now;
	ev->cookie = call->cookie;
	ev->cgroup = bpf_get_current_cgroup_id();
	ev->tgid = pid_tgid >> 32;
	ev->tid = pid_tgid;
	ev->fd = call->fd;
	ev->protocol = call->protocol;
	ev->check_peer = call->check_peer;
	ev->kind = BS_REQ_KIND_DATA;
	ev->dir = call->dir;
	ev->source = BS_REQ_SOURCE_SYSCALL;
	ev->conn = call->conn;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (known) {
		ev->role = known->role;
		known->seen = 1;
	} else {
		ev->role = BS_REQ_ROLE_UNKNOWN;
		bpf_map_update_elem(&conns, &call->cookie, &fresh, BPF_NOEXIST);
	}
}

/* The call's place in its direction's bytes (ev->pos), and how many of its first bytes to copy: 0 when
 * user space asked not to be sent it. Set ev->size first. */
static __always_inline __u32 stream_advance(struct req_event *ev)
{
	struct stream_key key = {.cookie = ev->cookie, .dir = ev->dir, .tls = ev->source == BS_REQ_SOURCE_TLS};
	__u64 zero = 0, *pos;

	ev->pos = 0;
	if (ev->protocol != BS_IPPROTO_TCP)
		return capture_bytes;
	pos = bpf_map_lookup_elem(&positions, &key);
	if (!pos) {
		bpf_map_update_elem(&positions, &key, &zero, BPF_NOEXIST);
		pos = bpf_map_lookup_elem(&positions, &key);
		if (!pos)
			return capture_bytes;
	}
	ev->pos = __sync_fetch_and_add(pos, ev->size);
	return stream_limit(bpf_map_lookup_elem(&skips, &key), ev->pos, ev->size);
}

/* stream_advance(), unless early_call() took the call's place already (taken_limit > 0). */
static __always_inline __u32 stream_place(struct req_event *ev, __u32 taken_limit, __u64 taken_pos)
{
	if (!taken_limit)
		return stream_advance(ev);
	ev->pos = taken_pos;
	return taken_limit;
}

/* --- HTTP/1 bodies skipped by the kernel ------------------------------------------------------------
 * User space steps over a long body by asking the kernel to skip its calls (skips), but it asks only once
 * it has read the head: the calls of a body that moves faster than user space drains the ring are sent
 * whole, a copy of capture_bytes and a record each. So the kernel skips an HTTP/1 response's body itself
 * when the call that begins the response holds its whole head: a 2xx (not 204) with a Content-Length and
 * no Transfer-Encoding, at a turn of the connection (its previous record went the other way: the call
 * begins a response, not a body that happens to hold such bytes), unless the request at the turn before
 * began "HEAD " (its answer has a Content-Length and no body). The skip ends exactly where the body does,
 * as user space's would: user space parses the same head and sees the same gap. A skip already there
 * (user space's, or a probe) is left alone. Pipelined responses after the first of a turn are left to
 * user space. */
struct http_scan {
	struct req_scratch *s;
	__u64 length;	/* Content-Length */
	__u32 n;	/* bytes of the call's start to look at */
	__u32 line;	/* where the current line begins */
	__u32 head;	/* the head's length, once its empty line is found */
	__u32 value_at;	/* Content-Length's value: from here to value_end (0: no such header) */
	__u32 value_end;
	__u32 digits;
	__u32 refused;	/* Transfer-Encoding, or a Content-Length that is not one number */
	__u32 blank;	/* a blank after the value's digits: nothing but blanks may follow */
};

#define REQ_MASK (REQ_CAPTURE_MAX - 1)

static __always_inline bool header_is(const __u8 *data, __u32 at, const char *name, __u32 len)
{
	for (__u32 k = 0; k < len; k++) /* ASCII letters, '-' and ':' compare with 0x20 set */
		if ((data[(at + k) & REQ_MASK] | 0x20) != name[k])
			return false;
	return true;
}

/* Byte i of the head: at each line's end, the line's header looked at; the empty line ends the head. */
static long http_step(__u32 i, void *ctx)
{
	struct http_scan *h = ctx;
	const __u8 *data = h->s->ev.data;
	__u32 line = h->line;

	if (i >= h->n || i < line)
		return 1;
	if (data[i & REQ_MASK] != '\n')
		return 0;
	if (i - line <= 1) { /* "\r\n" or "\n": the head's end */
		h->head = i + 1;
		return 1;
	}
	if (i - line > 16 && header_is(data, line, "content-length:", 15)) {
		if (h->value_at)
			h->refused = 1; /* twice */
		h->value_at = line + 15;
		h->value_end = i;
	} else if (i - line > 18 && header_is(data, line, "transfer-encoding:", 18)) {
		h->refused = 1;
	}
	h->line = i + 1;
	return h->refused ? 1 : 0;
}

/* Character k of Content-Length's value: digits, with blanks around them. */
static long length_step(__u32 k, void *ctx)
{
	struct http_scan *h = ctx;
	__u32 at = h->value_at + k;
	__u8 c;

	if (at >= h->value_end)
		return 1;
	c = h->s->ev.data[at & REQ_MASK];
	if (c >= '0' && c <= '9' && h->digits < 16 && !h->blank) {
		h->length = h->length * 10 + (c - '0');
		h->digits++;
		return 0;
	}
	if (c == '\r')
		return 1;
	if (c == ' ' || c == '\t') {
		h->blank = h->digits != 0;
		return 0;
	}
	h->refused = 1;
	return 1;
}

static __always_inline bool begins_2xx_response(const __u8 *d)
{
	return d[0] == 'H' && d[1] == 'T' && d[2] == 'T' && d[3] == 'P' && d[4] == '/' && d[5] == '1' &&
	       d[6] == '.' && (d[7] == '1' || d[7] == '0') && d[8] == ' ' && d[9] == '2' &&
	       !(d[10] == '0' && d[11] == '4');
}

/* A global function: verified once, not at each of event_send's call sites. */
__noinline int skip_http_body(struct req_event *ev)
{
	struct http_scan h = {.s = (struct req_scratch *)ev};
	struct stream_skip body = {}, *skip;
	struct stream_key key = {};
	struct req_conn *known;
	__u8 previous, head;

	if (!ev || ev->protocol != BS_IPPROTO_TCP || ev->source == BS_REQ_SOURCE_SENDFILE)
		return 0;
	key.cookie = ev->cookie;
	key.dir = ev->dir;
	key.tls = ev->source == BS_REQ_SOURCE_TLS;
	known = bpf_map_lookup_elem(&conns, &ev->cookie);
	if (!known)
		return 0;
	previous = known->last_dir;
	if (previous == ev->dir + 1)
		return 0; /* not a turn */
	known->last_dir = ev->dir + 1;
	head = known->head_request;
	known->head_request = ev->len >= 5 && ev->data[0] == 'H' && ev->data[1] == 'E' && ev->data[2] == 'A' &&
			      ev->data[3] == 'D' && ev->data[4] == ' ';
	if (!previous || head || ev->len < 16 || !begins_2xx_response(ev->data))
		return 0;
	h.n = ev->tail ? capture_bytes : ev->len;
	bpf_loop(REQ_CAPTURE_MAX, http_step, &h, 0);
	if (!h.head || h.refused || !h.value_at)
		return 0;
	bpf_loop(32, length_step, &h, 0);
	if (h.refused || !h.digits || h.digits > 15)
		return 0;
	body.until = ev->pos + h.head + h.length;
	if (body.until < ev->pos + ev->size + BS_REQ_SKIP_MIN)
		return 0;
	skip = bpf_map_lookup_elem(&skips, &key);
	if (skip && (skip->probe || skip->until > ev->pos))
		return 0;
	bpf_map_update_elem(&skips, &key, &body, BPF_ANY);
	return 0;
}

static __always_inline void event_send(struct req_event *ev)
{
	__u64 len = ev->len;

	if (ev->check_peer && !port_selected(&ev->conn))
		return;
	/* The barrier keeps clang from using the unclamped copy of len after the check. */
	asm volatile("" : "+r"(len));
	if (len > REQ_CAPTURE_MAX)
		len = REQ_CAPTURE_MAX;
	asm volatile("" : "+r"(len));
	bs_output(&events, ev, offsetof(struct req_event, data) + len);
	skip_http_body(ev);
}

/* One message of a recvmsg/sendmsg/recvmmsg/sendmmsg: its address, its first bytes. taken_limit:
 * the limit early_call() took with the message's place (taken_pos) in its stream, or 0. */
static __noinline void send_msg(struct req_event *ev, const struct user_msghdr *hdr, __u64 size,
				__u32 taken_limit, __u64 taken_pos)
{
	struct user_msghdr msg;
	__u32 limit;

	if (!ev || bpf_probe_read_user(&msg, sizeof(msg), hdr))
		return;
	if (msg.msg_name)
		peer_of(ev, msg.msg_name);
	ev->size = size;
	limit = stream_place(ev, taken_limit, taken_pos);
	if (!limit)
		return;
	copy_iov(ev, msg.msg_iov, msg.msg_iovlen, size, limit);
	event_send(ev);
}

static __always_inline int call_exit(struct req_call *call, long ret)
{
	struct req_event *ev;
	struct mmsghdr *msgs;
	__u32 sent, limit;

	if (ret <= 0 || !call->cookie || call->skip)
		goto done;
	ev = event_begin();
	if (!ev)
		goto done;
	limit = 0;
	if (call->args == BS_REQ_ARGS_BUF || call->args == BS_REQ_ARGS_IOV) {
		/* A call of a skipped body (most calls of a long one) leaves before its record is begun. */
		ev->cookie = call->cookie;
		ev->dir = call->dir;
		ev->source = BS_REQ_SOURCE_SYSCALL;
		ev->protocol = call->protocol;
		ev->size = ret;
		limit = stream_place(ev, call->limit, call->pos);
		if (!limit)
			goto done;
	}
	event_header(ev, call, bpf_ktime_get_ns());
	switch (call->args) {
	case BS_REQ_ARGS_BUF:
		peer_of(ev, (void *)call->addr);
		copy_buf(ev, (void *)call->buf, ret, limit);
		event_send(ev);
		break;
	case BS_REQ_ARGS_IOV:
		copy_iov(ev, (struct iovec *)call->buf, call->count, ret, limit);
		event_send(ev);
		break;
	case BS_REQ_ARGS_MSG:
		send_msg(ev, (struct user_msghdr *)call->buf, ret, call->limit, call->pos);
		break;
	case BS_REQ_ARGS_MMSG:
		/* ret messages; each says its own length */
		msgs = (struct mmsghdr *)call->buf;
		for (int i = 0; i < REQ_MMSG_MAX; i++) {
			if (i >= ret)
				break;
			if (bpf_probe_read_user(&sent, sizeof(sent), &msgs[i].msg_len))
				break;
			send_msg(ev, &msgs[i].msg_hdr, sent, 0, 0);
		}
		break;
	default: /* sendfile: bytes from a file, counted only */
		ev->source = BS_REQ_SOURCE_SENDFILE;
		ev->size = ret;
		ev->len = 0;
		ev->tail = 0;
		if (stream_advance(ev))
			event_send(ev);
	}
done:
	call->active = 0;
	return 0;
}

/* The state of the call that returns, when it is this syscall's. */
static __always_inline struct req_call *call_of(long nr)
{
	struct req_call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);

	if (!call || !call->active)
		return NULL;
	if (call->nr != nr) {
		call->active = 0;
		return NULL;
	}
	return call;
}

/* The context's fields read once, up front: the verifier rejects a load through a context pointer
 * clang has moved, which it does when a field is read late. */
#define REQ_EXIT(name)                                                                                \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                                   \
	int exit_##name(struct trace_event_raw_sys_exit *ctx)                                        \
	{                                                                                            \
		long nr = ctx->id, ret = ctx->ret;                                                   \
		struct req_call *call = call_of(nr);                                                 \
                                                                                                     \
		return call ? call_exit(call, ret) : 0;                                              \
	}

REQ_EXIT(recvfrom)
REQ_EXIT(recvmsg)
REQ_EXIT(recvmmsg)
REQ_EXIT(sendmmsg)
REQ_EXIT(sendfile64)

/* Where most calls are sent from (see the top of this file): the bytes moved are `ret`, the call
 * returns right after. A call's exit program, where records were sent from before, ran on every call
 * of its syscall: now only five of the eleven have one. */
static __always_inline int on_sock_hook(struct sock *sk, int ret, int flags, bool recv)
{
	int early;
	__u64 at = 0;
	__u32 limit = 0;
	struct req_call *call;

	early = early_call(sk, ret, flags, recv, &at, &limit);
	if (early == REQ_EARLY_DONE)
		return 0;
	call = on_sock_io(sk, ret, flags, recv);
	if (!call)
		return 0;
	if (early == REQ_EARLY_ADVANCED) {
		call->pos = at;
		call->limit = limit;
	}
	return call_exit(call, ret);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send, struct sock *sk, int ret, int flags)
{
	return on_sock_hook(sk, ret, flags, false);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv, struct sock *sk, int ret, int flags)
{
	return on_sock_hook(sk, ret, flags, true);
}

static __always_inline void forget_streams(__u64 cookie)
{
	struct stream_key key = {.cookie = cookie};

	for (int dir = 0; dir < 2; dir++) {
		for (int tls = 0; tls < 2; tls++) {
			key.dir = dir;
			key.tls = tls;
			bpf_map_delete_elem(&positions, &key);
			bpf_map_delete_elem(&skips, &key);
		}
	}
}

/* --- roles and closes -------------------------------------------------------------------------------- */

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	struct req_conn fresh = {}, *known;
	struct req_event *ev;
	struct bs_conn conn;
	__u64 cookie;

	if (sk->sk_protocol != BS_IPPROTO_TCP)
		return 0;
	if (newstate == TCP_SYN_SENT || (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED)) {
		bs_conn_of(sk, &conn);
		if (targ_ports && !has_port(&conn))
			return 0;
		cookie = bs_sk_cookie(sk);
		fresh.role = newstate == TCP_SYN_SENT ? BS_REQ_ROLE_CLIENT : BS_REQ_ROLE_SERVER;
		bpf_map_update_elem(&conns, &cookie, &fresh, BPF_ANY);
		return 0;
	}
	if (newstate != TCP_CLOSE)
		return 0;
	cookie = bs_sk_cookie(sk);
	known = bpf_map_lookup_elem(&conns, &cookie);
	if (!known)
		return 0;
	/* Reserved, not built in scratch: a state change in softirq may interrupt a record being built. */
	if (known->seen && (ev = bs_reserve(&events, offsetof(struct req_event, data)))) {
		__builtin_memset(ev, 0, offsetof(struct req_event, data));
		ev->start_ns = ev->end_ns = bpf_ktime_get_ns();
		ev->cookie = cookie;
		ev->kind = BS_REQ_KIND_CLOSE;
		ev->protocol = BS_IPPROTO_TCP;
		ev->fd = -1;
		ev->role = known->role;
		bs_conn_of(sk, &ev->conn);
		bpf_ringbuf_submit(ev, 0);
	}
	bpf_map_delete_elem(&conns, &cookie);
	forget_streams(cookie);
	return 0;
}

/* --- OpenSSL ---------------------------------------------------------------------------------------- */

static __always_inline int ssl_enter(void *ssl, void *buf, void *done_ptr, enum bs_req_dir dir)
{
	struct req_thread *thread;
	struct ssl_call *call;

	if (!bs_task_selected() || !bs_current_in_set())
		return 0;
	thread = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!thread) {
		__sync_fetch_and_add(&calls_unseen, 1);
		return 0;
	}
	call = &thread->ssl;
	*call = (struct ssl_call){
		.ssl = (__u64)ssl,
		.buf = (__u64)buf,
		.done_ptr = (__u64)done_ptr,
		.start_ns = bpf_ktime_get_ns(),
		.dir = dir,
		.active = 1,
	};
	return 0;
}

/* ex: SSL_read_ex/SSL_write_ex, which return 1 and write the byte count; else the count is returned. */
static __always_inline int ssl_exit(long ret, bool ex)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct req_thread *thread = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	struct ssl_call *call = thread ? &thread->ssl : NULL;
	struct ssl_link *link;
	struct ssl_key key = {};
	struct req_conn *known;
	struct req_event *ev;
	__u64 size = 0;
	__u32 limit;

	if (!call || !call->active)
		return 0;
	if (ex) {
		if (ret == 1 && call->done_ptr)
			bpf_probe_read_user(&size, sizeof(size), (void *)call->done_ptr);
	} else if (ret > 0) {
		size = ret;
	}
	if (!size)
		goto done;
	key.ssl = call->ssl;
	key.tgid = pid_tgid >> 32;
	link = bpf_map_lookup_elem(&ssl_links, &key);
	if (!link) {
		__sync_fetch_and_add(&tls_unlinked, 1);
		goto done;
	}
	ev = event_begin();
	if (!ev)
		goto done;
	known = bpf_map_lookup_elem(&conns, &link->cookie);
	ev->start_ns = call->start_ns;
	ev->end_ns = bpf_ktime_get_ns();
	ev->cookie = link->cookie;
	ev->cgroup = bpf_get_current_cgroup_id();
	ev->tgid = pid_tgid >> 32;
	ev->tid = tid;
	ev->fd = link->fd;
	ev->protocol = link->protocol;
	ev->check_peer = 0;
	ev->kind = BS_REQ_KIND_DATA;
	ev->dir = call->dir;
	ev->source = BS_REQ_SOURCE_TLS;
	ev->role = known ? known->role : BS_REQ_ROLE_UNKNOWN;
	if (known)
		known->seen = 1;
	ev->conn = link->conn;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	ev->size = size;
	limit = stream_advance(ev);
	if (limit) {
		copy_buf(ev, (void *)call->buf, size, limit);
		event_send(ev);
	}
done:
	call->active = 0;
	return 0;
}

/* libbpf 1.1 has no BPF_UPROBE: BPF_KPROBE reads the same registers. */
SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf, int num)
{
	return ssl_enter(ssl, buf, NULL, BS_REQ_DIR_INGRESS);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_read_exit, int ret)
{
	return ssl_exit(ret, false);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, const void *buf, int num)
{
	return ssl_enter(ssl, (void *)buf, NULL, BS_REQ_DIR_EGRESS);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_write_exit, int ret)
{
	return ssl_exit(ret, false);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	return ssl_enter(ssl, buf, readbytes, BS_REQ_DIR_INGRESS);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_read_ex_exit, int ret)
{
	return ssl_exit(ret, true);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	return ssl_enter(ssl, (void *)buf, written, BS_REQ_DIR_EGRESS);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_write_ex_exit, int ret)
{
	return ssl_exit(ret, true);
}
