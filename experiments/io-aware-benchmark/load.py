#!/usr/bin/env python3
"""An open-loop HTTP load generator with its own per-request log (the truth bench is checked against).

Requests are sent at Poisson arrival times at RATE a second for SECONDS, whatever the answers (open
loop: a slow server does not slow the arrivals down). Each request is ``GET PATH?id=N`` with N uniform
in [1, KEYS] and an X-Request-ID header, sent by a worker process on its own keep-alive connection (a new
worker is started when all are busy). A worker reads the clock right before its send and right after
the receive that completes the response, with blocking calls: no event loop or interpreter lock between
the clock and the socket, so the log is the requests' time on the wire plus microseconds.

    python3 load.py HOST PORT --rate R --seconds S --keys N --log FILE

The log has one line per request: its id, when its first byte was written and when its response's last
byte was read (CLOCK_MONOTONIC ns, the clock bpfscope's records use), and the latency between. When FILE
exists (a second run of the same command, as bench --verify makes), the log goes to FILE.1, FILE.2, ...
and the keys are drawn with the seed plus that number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import time
from pathlib import Path
from typing import IO


class Worker:
    """A process of its own (no interpreter lock to wait for between a receive and the clock), with its
    connection: it takes request numbers and keys from a pipe and writes a log line per request back."""

    def __init__(self, args: argparse.Namespace, results: int) -> None:
        jobs, self.jobs = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.jobs)
            code = 0
            try:
                # The connection is the worker's own from its first call (a tracer sees one process).
                self.sock = socket.create_connection((args.host, args.port))
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.serve(args, os.fdopen(jobs), results)
            except (ConnectionError, OSError):
                code = 1
            os._exit(code)
        os.close(jobs)

    def get(self, request: bytes) -> tuple[int, int]:
        """Send a request and read its whole response (Content-Length framed): the clock right before
        the send and right after the receive that completed the response (the parsing between the
        receives is not the request's time: ~40 us a request of this interpreter's, 2% of a 2 ms median)."""
        sent = time.monotonic_ns()
        self.sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            done = time.monotonic_ns()
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = self.sock.recv(65536)
            done = time.monotonic_ns()
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        return sent, done

    def serve(self, args: argparse.Namespace, jobs: IO[str], results: int) -> None:
        for line in jobs:
            rid, key = line.split()
            request = f"GET {args.path}?id={key} HTTP/1.1\r\nHost: {args.host}\r\nX-Request-ID: {rid}\r\n\r\n"
            sent, done = self.get(request.encode())
            os.write(results, f"{os.getpid()} {rid} {sent} {done}\n".encode())  # one write: atomic

    def send(self, rid: str, key: int) -> None:
        os.write(self.jobs, f"{rid} {key}\n".encode())


def run(args: argparse.Namespace) -> tuple[list[tuple[str, int, int]], int]:
    results_r, results_w = os.pipe()
    os.set_blocking(results_r, False)
    log: list[tuple[str, int, int]] = []
    workers: dict[int, Worker] = {}
    idle: list[Worker] = []
    pending = b""

    def collect() -> None:
        nonlocal pending
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(results_r, 65536):
                pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            pid, rid, sent, done = line.decode().split()
            log.append((rid, int(sent), int(done)))
            idle.append(workers[int(pid)])

    rng = random.Random(args.seed)
    start = time.monotonic()
    due, n = start, 0
    while due < start + args.seconds:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        collect()
        if idle:
            worker = idle.pop()
        else:
            worker = Worker(args, results_w)
            workers[worker.pid] = worker
        worker.send(f"r{n}", rng.randint(1, args.keys))
        n += 1
        due += rng.expovariate(args.rate)
    for worker in workers.values():
        os.close(worker.jobs)  # each ends after its last request
    for worker in workers.values():
        os.waitpid(worker.pid, 0)
    os.set_blocking(results_r, True)
    os.close(results_w)
    while chunk := os.read(results_r, 65536):
        pending += chunk
    for line in pending.decode().splitlines():
        _, rid, sent, done = line.split()
        log.append((rid, int(sent), int(done)))
    return log, n - len(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=50.0, help="requests a second (Poisson)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=1000, help="ids drawn uniformly from 1..KEYS")
    parser.add_argument("--path", default="/item")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", required=True, help="the per-request log (written at the end)")
    args = parser.parse_args()
    path, i = Path(args.log), 0
    while path.exists():
        i += 1
        path = Path(f"{args.log}.{i}")
    # A replay draws other keys: the same keys would find the first run's pages in the caches, and any
    # replay would look faster than the run it replays.
    args.seed += i
    log, failed = run(args)
    with open(path, "w") as f:
        for rid, sent, done in sorted(log, key=lambda r: r[1]):
            f.write(f"{rid} {sent} {done} {done - sent}\n")
    if failed:
        raise SystemExit(f"load: {failed} requests failed")
    print(f"load: {len(log)} requests", flush=True)


if __name__ == "__main__":
    main()
