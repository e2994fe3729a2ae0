#!/usr/bin/env python3
"""The app: a thread-per-request HTTP service that reads rows from PostgreSQL and publishes a message.

    python3 app.py PORT --db DSN [--redis HOST:PORT] [--work-ms W] [--rows R]

``GET /item?id=N`` reads a page of R accounts (pgbench's table, by its primary key: N and the R - 1
accounts spread evenly after it across the table, as a listing's items are), publishes an event to a Redis
list when --redis is given (the messaging component; Redis fsyncs its append-only file before it
answers), spends W ms of CPU when asked (the CPU-bound scenario), and answers with the balance. Each
connection has a thread of its own, with its own database and Redis connections: a request is served
by one thread from its first byte to its last, as thread-per-request servers do.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import psycopg
import redis

QUERY = "SELECT aid, abalance FROM pgbench_accounts WHERE aid = ANY(%s)"
ACCOUNTS = 1_000_000  # pgbench's accounts at scale 10: the page's keys wrap around within them


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sidecar reuses its connections
    # Headers and body go out in two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK, 40 ms (bench showed it as network time between the client and the app).
    disable_nagle_algorithm = True
    local = threading.local()
    args: argparse.Namespace

    def connections(self) -> tuple[psycopg.Connection, redis.Redis | None]:
        if not hasattr(self.local, "db"):
            self.local.db = psycopg.connect(self.args.db, autocommit=True)
            self.local.mq = None
            if self.args.redis:
                host, port = self.args.redis.rsplit(":", 1)
                self.local.mq = redis.Redis(host=host, port=int(port), single_connection_client=True)
        return self.local.db, self.local.mq

    def do_GET(self) -> None:
        url = urlparse(self.path)
        key = int(parse_qs(url.query).get("id", ["1"])[0])
        db, mq = self.connections()
        rows = self.args.rows
        keys = [(key - 1 + i * (ACCOUNTS // rows)) % ACCOUNTS + 1 for i in range(rows)]
        found = dict(db.execute(QUERY, (keys,)).fetchall())
        if mq is not None:
            mq.rpush("events", json.dumps({"id": key, "request": self.headers.get("X-Request-ID", "")}))
        if self.args.work_ms:
            end = time.thread_time() + self.args.work_ms / 1000
            while time.thread_time() < end:
                pass
        body = json.dumps({"id": key, "balance": found.get(key)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--db", required=True, help="libpq connection string")
    parser.add_argument("--redis", help="HOST:PORT of the messaging Redis")
    parser.add_argument("--work-ms", type=float, default=0.0, help="CPU time spent per request")
    parser.add_argument("--rows", type=int, default=1, help="accounts read per request")
    Handler.args = parser.parse_args()
    server = ThreadingHTTPServer((Handler.args.host, Handler.args.port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
