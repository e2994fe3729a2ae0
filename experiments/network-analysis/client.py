#!/usr/bin/env python3
"""The mesh's client: HTTP GETs of the large response through the gateway at a steady offered rate, as
a service's users make them, from a pool of workers; one JSON line per request (start time, latency,
bytes, status) on stdout.

    client.py URL RATE WORKERS SECONDS

A request that cannot start on time (every worker busy) starts late: its latency counts from when it
should have started, so that a slow service shows as latency, not as a lower offered rate.
"""

from __future__ import annotations

import http.client
import json
import queue
import sys
import threading
import time
from urllib.parse import urlsplit


def worker(url: str, jobs: queue.Queue[float | None], out: list[str], lock: threading.Lock) -> None:
    parts = urlsplit(url)
    conn: http.client.HTTPConnection | None = None
    while (due := jobs.get()) is not None:
        size, status = 0, 0
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", parts.path)
            resp = conn.getresponse()
            while chunk := resp.read(1 << 20):
                size += len(chunk)
            status = resp.status
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        end = time.time()
        line = json.dumps({"t": due, "latency_s": round(end - due, 6), "bytes": size, "status": status})
        with lock:
            out.append(line)


def main() -> None:
    url, rate, workers, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    jobs: queue.Queue[float | None] = queue.Queue()
    out: list[str] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(url, jobs, out, lock)) for _ in range(workers)]
    for t in threads:
        t.start()
    start = time.time()
    n = 0
    while (due := start + n / rate) < start + seconds:
        time.sleep(max(0.0, due - time.time()))
        jobs.put(due)
        n += 1
    # Requests still waiting for a worker when the time is up were never sent: said so, not waited for.
    with lock:
        while True:
            try:  # a worker may take the last one between a check and the get: ask once
                due = jobs.get_nowait()
            except queue.Empty:
                break
            out.append(json.dumps({"t": due, "latency_s": None, "bytes": 0, "status": 0}))
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
