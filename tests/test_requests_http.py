"""bpfscope requests on HTTP/1.1 against nginx: every request counted, its path and status right (the
Python clients' own logs), its latency as wrk measured it, for keep-alive, pipelining, chunked bodies
and large responses, plain and through TLS (OpenSSL uprobes on nginx and on the client's Python ssl
module); gRPC through grpcio."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from test_requests_servers import (  # noqa: F401
    Nginx,
    Traced,
    free_port,
    nginx_server,
    python_client,
    quantile,
)

# Each client process: one keep-alive connection, requests one after another, timed by the client
# around its own send and receive (perf_counter_ns), written as JSON lines.
KEEPALIVE_CLIENT = r"""
import json, socket, ssl, sys, time
port, count, paths, tls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4] == "tls"
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if tls:
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    sock = ctx.wrap_socket(sock)
out = []
for i in range(count):
    path = paths[i % len(paths)]
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer secret\r\n\r\n".encode()
    start = time.perf_counter_ns()
    sock.sendall(request)
    data = sock.recv(65536)
    end = time.perf_counter_ns()  # when the response's last byte arrived: right after its recv
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
        end = time.perf_counter_ns()
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(l.lower().split(b": ", 1) for l in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
        end = time.perf_counter_ns()
    out.append({"path": path, "status": int(head.split(b" ")[1]), "ns": end - start})
print(json.dumps(out))
"""
PATHS = "/hello,/missing,/small,/page,/fail,/hello?user=alice"


def run_clients(port: int, processes: int, count: int, tls: bool = False) -> tuple[list[int], list[dict]]:
    clients = [
        python_client(KEEPALIVE_CLIENT, str(port), str(count), PATHS, "tls" if tls else "plain")
        for _ in range(processes)
    ]
    truth = []
    for client in clients:
        out, _ = client.communicate(timeout=120)
        assert client.returncode == 0
        truth.extend(json.loads(out))
    return [c.pid for c in clients], truth


def check_against_client(traced: Traced, pids: list[int], truth: list[dict], server_pids: list[int]) -> None:
    clients = [r for r in traced.table("http_events", trace_role="client") if r["pid"] in pids]
    servers = [r for r in traced.table("http_events", trace_role="server") if r["pid"] in server_pids]
    expected = Counter((t["path"].split("?")[0], t["status"]) for t in truth)
    for side in (clients, servers):
        assert len(side) == len(truth)
        assert Counter((r["req_path"].split("?")[0], r["resp_status"]) for r in side) == expected
        assert all(r["req_method"] == "GET" and r["remote_addr"] == "127.0.0.1" for r in side)
    # Secrets stay out by default: the header's value and the query's value.
    assert {r["req_headers"]["authorization"] for r in clients} == {"<redacted>"}
    assert {r["req_path"] for r in clients if r["req_path"].startswith("/hello?")} == {
        "/hello?user=<redacted>"
    }
    sizes = {r["req_path"]: r["resp_body_size"] for r in servers}
    assert sizes["/page"] == 20_000 and sizes["/small"] == 3


def test_http_keepalive_counts_paths_statuses_and_latency(nginx: Nginx) -> None:
    with Traced("--port", str(nginx.port)) as traced:
        pids, truth = run_clients(nginx.port, processes=3, count=400)
    check_against_client(traced, pids, truth, nginx.worker_pids)
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


def wrk_latency(output: str) -> dict[float, float]:
    """wrk --latency's distribution: quantile -> ns."""
    units = {"us": 1e3, "ms": 1e6, "s": 1e9}
    out = {}
    for q, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)$", output, re.M):
        out[int(q) / 100] = float(value) * units[unit]
    return out


def as_wrk_reports(latencies_ns: list[int], runtime_s: float, connections: int) -> dict[float, float]:
    """Latencies summarised as wrk 4 summarises its own: whole microseconds, and its correction for
    coordinated omission (stats_correct: a request slower than twice the expected interval between
    one connection's requests adds samples at that latency less one, two, ... intervals), then the
    percentile at rank round(q * count + 0.5)."""
    hist = Counter(ns // 1000 for ns in latencies_ns)
    expected = int(runtime_s * 1e6) // (len(latencies_ns) // connections)
    for n, count in sorted(hist.items()):
        m = n - expected
        while n >= 2 * expected and m > expected:
            hist[m] += count
            m -= expected
    total = sum(hist.values())
    out = {}
    for q in (0.5, 0.99):
        rank, seen = round(q * total + 0.5), 0
        for n in sorted(hist):
            seen += hist[n]
            if seen >= rank:
                out[q] = n * 1000.0
                break
    return out


def test_http_latency_as_wrk_measures_it(nginx: Nginx, tmp_path: Path) -> None:
    """wrk times each request in C around its own calls: its p50 and p99 against the client-side
    records of its requests, at a moderate load (two keep-alive connections, 1 ms between a response and
    the next request: about 1,500 requests/s here) and summarised as wrk does."""
    pace = tmp_path / "pace.lua"
    pace.write_text("function delay() return 1 end\n")
    with Traced("--port", str(nginx.port)) as traced:
        run = subprocess.run(
            ["wrk", "-t1", "-c2", "-d3s", "--latency", "-s", str(pace), f"http://127.0.0.1:{nginx.port}/page"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    # wrk stops with a request out on each connection: those are answered after it closed, or never.
    lost = {k: v for k, v in traced.losses["reasons"].items() if v and k != "unanswered"}
    assert not lost and traced.losses["reasons"]["unanswered"] <= 2, (traced.losses, traced.stderr)
    theirs = wrk_latency(run.stdout)
    records = traced.table("http_events", trace_role="client", comm="wrk")
    got = {(r["req_path"], r["resp_status"], r["resp_body_size"]) for r in records}
    assert got == {("/page", 200, 20_000)}
    done, runtime = re.search(r"(\d+) requests in ([\d.]+)s", run.stdout).groups()  # type: ignore[union-attr]
    # (a request in flight when wrk stops is answered but not counted by wrk)
    assert int(done) <= len(records) <= int(done) + 2
    ours = as_wrk_reports([r["latency"] for r in records], float(runtime), 2)
    for q in (0.5, 0.99):
        assert abs(ours[q] - theirs[q]) <= 0.10 * theirs[q], (q, ours, theirs)


def test_https_is_decrypted_through_openssl(nginx: Nginx) -> None:
    with Traced("--port", str(nginx.tls_port)) as traced:
        pids, truth = run_clients(nginx.tls_port, processes=2, count=200, tls=True)
    check_against_client(traced, pids, truth, nginx.worker_pids)
    assert all(r["encrypted"] for r in traced.table("http_events"))


PIPELINE_CLIENT = r"""
import socket, sys, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
paths = [f"/hello?n={i}" if i % 3 else "/missing" for i in range(12)]
sock.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
chunked = b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + sys.argv[2].encode()
data = b""
while data.count(b"HTTP/1.1 ") < len(paths):
    data += sock.recv(65536)
sock.sendall(chunked)
while data.count(b"HTTP/1.1 ") < len(paths) + 1:
    data += sock.recv(65536)
sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
while chunk := sock.recv(1 << 20):
    data += chunk
print(len(data))
"""


CHUNKED_BODY = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def test_pipelining_chunked_bodies_and_large_responses(nginx: Nginx) -> None:
    """Twelve requests in one write, answered in order; a chunked request body; a 1 MB response of
    which only the first bytes are captured (counted whole)."""
    with Traced("--port", str(nginx.port), "--no-redact") as traced:
        client = python_client(PIPELINE_CLIENT, str(nginx.port), CHUNKED_BODY.decode())
        client.communicate(timeout=60)
    server = traced.table("http_events", trace_role="server")
    expected = [f"/hello?n={i}" if i % 3 else "/missing" for i in range(12)] + ["/hello", "/big"]
    assert [r["req_path"] for r in server] == expected
    assert [r["resp_status"] for r in server] == [200 if i % 3 else 404 for i in range(12)] + [200, 200]
    post = server[12]
    assert post["req_method"] == "POST" and post["req_body_size"] == len(CHUNKED_BODY)
    assert post["req_body"] == "hello world"
    assert server[13]["resp_body_size"] == 1_000_000
    client_side = traced.table("http_events", trace_role="client")
    assert [r["req_path"] for r in client_side] == expected
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)


# One keep-alive connection: GET /big (1 MB) five times, HEAD /big (a Content-Length, no body), GET
# /hello, GET /big; each response read whole; the paths in the order fetched.
BIG_CLIENT = r"""
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for method, path in [("GET", "/big")] * 5 + [("HEAD", "/big"), ("GET", "/hello"), ("GET", "/big")]:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(dict(l.lower().split(b": ", 1) for l in head.split(b"\r\n")[1:])[b"content-length"])
    while method == "GET" and len(body) < length:
        body += sock.recv(65536)
    print(method, path, len(body))
"""


def test_the_kernel_skips_a_long_bodys_calls_itself(nginx: Nginx) -> None:
    """A 1 MB response's body is stepped over by the kernel from its head, not one record per call:
    nothing is read from the ring until the client is done, so user space could ask for no skip in
    time. The answer to HEAD (a Content-Length, no body) skips nothing, and what follows it is seen."""
    from bpfscope.domains.requests.requests import RequestsCollector, RequestsConfig

    with RequestsCollector(RequestsConfig(ports=(nginx.port,), tls=False, include_self=True)) as collector:
        collector.open()
        collector.start()
        client = python_client(BIG_CLIENT, str(nginx.port))
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        records = []
        while (batch := collector.drain()) is not None:
            records += list(batch.records())
        sent = collector.rings["events"].consumed
    assert out.split("\n")[:7] == ["GET /big 1000000"] * 5 + ["HEAD /big 0", "GET /hello 6"]
    client_side = [r for r in records if r["record"] == "http_events" and r["pid"] == client.pid]
    fetched = [(r["req_method"], r["req_path"], r["resp_status"]) for r in client_side]
    assert fetched == [("GET", "/big", 200)] * 5 + [
        ("HEAD", "/big", 200),
        ("GET", "/hello", 200),
        ("GET", "/big", 200),
    ]
    server_side = [r for r in records if r["record"] == "http_events" and r["trace_role"] == "server"]
    for side in (client_side, server_side):
        assert [r["resp_body_size"] for r in side] == [1_000_000] * 5 + [0, 6, 1_000_000], side
    # 7 MB of calls of 32-64 kB on each side: 304-315 records in three runs without the kernel's skip;
    # with it, 46 (each response's first and last calls on each side, and the requests).
    assert sent <= 80, sent


# A server thread that receives a request through io_uring, reads a file, answers; then receives the
# client's second request with recv and answers again. Then the client writes a file and sends its third
# request through io_uring.
URING_PROGRAM = r"""
/* A server thread that receives a request through io_uring, then reads a file, then answers; the client
 * then asks again with plain calls; then it writes a file and sends its last request through io_uring. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *file_path;

static int must(int ret, const char *what)
{
    if (ret < 0) {
        perror(what);
        exit(1);
    }
    return ret;
}

/* One IORING_OP_RECV or IORING_OP_SEND, submitted and waited for in one io_uring_enter. */
static int uring(int opcode, int fd, char *buf, unsigned len)
{
    struct io_uring_params p = {0};
    int ring = must(syscall(__NR_io_uring_setup, 4, &p), "io_uring_setup");
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    struct io_uring_cqe *cqe;
    unsigned tail;

    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED)
        must(-1, "mmap");
    memset(&sqes[0], 0, sizeof(sqes[0]));
    sqes[0].opcode = opcode;
    sqes[0].fd = fd;
    sqes[0].addr = (unsigned long)buf;
    sqes[0].len = len;
    tail = *(unsigned *)(sq + p.sq_off.tail);
    ((unsigned *)(sq + p.sq_off.array))[tail & *(unsigned *)(sq + p.sq_off.ring_mask)] = 0;
    __atomic_store_n((unsigned *)(sq + p.sq_off.tail), tail + 1, __ATOMIC_RELEASE);
    must(syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0), "io_uring_enter");
    cqe = &((struct io_uring_cqe *)(cq + p.cq_off.cqes))[*(unsigned *)(cq + p.cq_off.head) &
                                  *(unsigned *)(cq + p.cq_off.ring_mask)];
    return must(cqe->res, "io_uring");
}

static void answer(int fd)
{
    const char *ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    must(write(fd, ok, strlen(ok)), "write");
}

static void *server(void *arg)
{
    int listener = *(int *)arg, fd = must(accept(listener, 0, 0), "accept"), file;
    char buf[4096];

    uring(IORING_OP_RECV, fd, buf, sizeof(buf));
    file = must(open(file_path, O_RDONLY), "open");
    must(read(file, buf, sizeof(buf)), "read the file");
    close(file);
    answer(fd);
    must(recv(fd, buf, sizeof(buf), 0), "recv");
    answer(fd);
    must(recv(fd, buf, sizeof(buf), 0), "recv");
    answer(fd);
    close(fd);
    return NULL;
}

static void ask(int fd, const char *path)
{
    char request[256], buf[4096];
    int n = snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", path);

    must(write(fd, request, n), "write");
    must(recv(fd, buf, sizeof(buf), 0), "recv");
}

int main(int argc, char **argv)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    int listener = must(socket(AF_INET, SOCK_STREAM, 0), "socket"), fd;
    pthread_t thread;

    file_path = argv[1];
    addr.sin_port = htons(atoi(argv[2]));
    must(bind(listener, (struct sockaddr *)&addr, len), "bind");
    must(listen(listener, 1), "listen");
    pthread_create(&thread, NULL, server, &listener);
    fd = must(socket(AF_INET, SOCK_STREAM, 0), "socket");
    must(connect(fd, (struct sockaddr *)&addr, len), "connect");
    ask(fd, "/through-io-uring");
    ask(fd, "/by-recv");
    {
        static const char written[] = "GET /from-a-written-file HTTP/1.1\r\nHost: localhost\r\n\r\n";
        static char sent[] = "GET /sent-through-io-uring HTTP/1.1\r\nHost: localhost\r\n\r\n";
        char buf[4096];
        int file = must(open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0600), "open");

        must(write(file, written, strlen(written)), "write the file");
        close(file);
        uring(IORING_OP_SEND, fd, sent, strlen(sent));
        must(recv(fd, buf, sizeof(buf), 0), "recv");
    }
    pthread_join(thread, NULL);
    printf("done\n");
    return 0;
}
"""


def test_calls_io_uring_makes_are_not_taken_for_others(tmp_path: Path) -> None:
    """A receive has no entry program: its state begins at its socket hook, read from the syscall it was
    made in. io_uring's receive runs inside io_uring_enter; the server's read of a file (an HTTP
    request's text) right after it must not be taken for the socket's bytes (each byte would be a
    request nobody sent). And a send's state, begun at its entry, is not ended by an exit: the client's
    write of a file (an HTTP request's text) must not be taken for the bytes io_uring sends on the
    socket after it. The plain calls around them are captured."""
    from bpfscope.domains.requests.requests import RequestsCollector, RequestsConfig

    source, program = tmp_path / "uring.c", tmp_path / "uring"
    source.write_text(URING_PROGRAM)
    subprocess.run(["gcc", "-O1", "-o", str(program), str(source), "-lpthread"], check=True)
    text = tmp_path / "request.txt"
    text.write_bytes(b"GET /from-a-file HTTP/1.1\r\nHost: localhost\r\n\r\n")
    port = free_port()
    with RequestsCollector(RequestsConfig(ports=(port,), tls=False, include_self=True)) as collector:
        collector.open()
        collector.start()
        run = subprocess.run(
            [str(program), str(text), str(port), str(tmp_path / "written.txt")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        records = []
        while (batch := collector.drain()) is not None:
            records += list(batch.records())
    http = [r for r in records if r["record"] == "http_events"]
    served = [(r["req_path"], r["resp_status"]) for r in http if r["trace_role"] == "server"]
    asked = [(r["req_path"], r["resp_status"]) for r in http if r["trace_role"] == "client"]
    assert asked == [("/through-io-uring", 200), ("/by-recv", 200)], http
    assert served == [("/by-recv", 200), ("/sent-through-io-uring", 200)], http


# A client that reads a UNIX socket and then its HTTP answer from TCP, with read() both times.
STALE_PROGRAM = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char local[4096], answer[65536];

int main(int argc, char **argv)
{
    int port = atoi(argv[1]), n = atoi(argv[2]), pair[2], s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    /* What the UNIX socket carries: an answer of its own, which the TCP read must not be given. */
    const char *unix_text = "HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n";
    const char *request = "GET /small HTTP/1.1\r\nHost: localhost\r\n\r\n";

    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) || connect(s, (struct sockaddr *)&addr, sizeof(addr)))
        return 1;
    for (int i = 0; i < n; i++) {
        size_t got = 0;
        char *end;

        /* The UNIX socket read last before the answer's: no traced call's entry in between. */
        if (write(s, request, strlen(request)) < 0)
            return 2;
        if (write(pair[1], unix_text, strlen(unix_text)) < 0 || read(pair[0], local, sizeof(local)) <= 0)
            return 3;
        /* Until the head and its 3-byte body are in. */
        do {
            ssize_t r = read(s, answer + got, sizeof(answer) - 1 - got);
            if (r <= 0)
                return 4;
            got += r;
            answer[got] = 0;
            end = strstr(answer, "\r\n\r\n");
        } while (!end || got < (size_t)(end - answer) + 4 + 3);
    }
    return 0;
}
"""


def test_a_read_the_tracer_leaves_is_not_taken_for_the_next(nginx: Nginx, tmp_path: Path) -> None:
    """read() has no exit program: its state begins at its socket hook and is ended by the record the
    hook sends. A read of a UNIX socket leaves its state there (nothing to send); the next read, of a
    traced TCP socket, must begin its own and not take that one's buffer: it did, and the UNIX socket's
    bytes were taken for each answer, of which none was recognised."""
    source, program = tmp_path / "stale.c", tmp_path / "stale"
    source.write_text(STALE_PROGRAM)
    subprocess.run(["gcc", "-O1", "-o", str(program), str(source)], check=True)
    with Traced("--port", str(nginx.port)) as traced:
        run = subprocess.run([str(program), str(nginx.port), "50"], capture_output=True, timeout=60)
    assert run.returncode == 0, run
    asked = traced.table("http_events", trace_role="client", comm="stale")
    assert Counter((r["req_path"], r["resp_status"], r["resp_body_size"]) for r in asked) == {
        ("/small", 200, 3): 50
    }, asked


GRPC_SERVER = r"""
import sys, time
from concurrent import futures
import grpc

def hello(request, context):
    return b"hello " + request

def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

def slow(request, context):
    time.sleep(0.002)
    return request * 100  # 10 kB answers: DATA beyond the capture limit, stepped over

handlers = {name: grpc.unary_unary_rpc_method_handler(f) for name, f in
            (("Hello", hello), ("Fail", fail), ("Echo", slow))}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", handlers),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
"""

GRPC_CLIENT = r"""
import json, sys
import grpc
port, count = sys.argv[1], int(sys.argv[2])
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
out = []
for i in range(count):
    method = ("Hello", "Fail", "Echo")[i % 3]
    call = channel.unary_unary(f"/demo.Greeter/{method}")
    try:
        call(b"x" * 100, timeout=10)
        code = 0
    except grpc.RpcError as exc:
        code = exc.code().value[0]
    out.append({"path": f"/demo.Greeter/{method}", "code": code})
print(json.dumps(out))
"""


def test_grpc_methods_and_status_codes(nginx: Nginx) -> None:
    """grpcio server and client (HTTP/2, HPACK): each call's method and gRPC status, counted exactly."""
    server = subprocess.Popen(
        [sys.executable, "-c", GRPC_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with Traced("--port", str(port)) as traced:
            out, _ = python_client(GRPC_CLIENT, str(port), "60").communicate(timeout=120)
    finally:
        server.kill()
        server.wait()
    truth = Counter((t["path"], str(t["code"])) for t in json.loads(out))
    assert truth[("/demo.Greeter/Fail", "5")] == 20
    for role in ("client", "server"):
        records = traced.table("http_events", trace_role=role)
        assert all(r["major_version"] == 2 and r["resp_status"] == 200 for r in records), records
        assert Counter((r["req_path"], r["resp_headers"].get("grpc-status")) for r in records) == truth, role
        assert {r["req_method"] for r in records} == {"POST"}
        echo = [r for r in records if r["req_path"].endswith("Echo")]
        assert all(r["resp_body_size"] >= 10_000 for r in echo)
    assert traced.losses.get("total") == 0, (traced.losses, traced.stderr)
