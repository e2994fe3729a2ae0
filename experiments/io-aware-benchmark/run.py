#!/usr/bin/env python3
"""I/O-aware benchmarking, end to end: five components on this machine, each in a cgroup of its own,
under an open-loop load, measured by `bpfscope bench`; two scenarios whose bottlenecks differ.

    client (load.py) -> gateway (nginx) -> sidecar (haproxy) -> app (app.py, a thread per request)
                                                                  -> database (PostgreSQL)
                                                                  -> messaging (Redis, AOF fsync always)

Each request reads a page of 40 accounts (app.py --rows) from pgbench's table, scale 10.

- disk: the database with too little RAM for its data (64 MB for 160 MB), in the steady state of a
  database that has run so (every page read once under the limit, the kernel evicting what does not
  fit), on a volume capped at a cloud volume's 3,000 read IOPS, below which its reads stay. Expected:
  the database is the largest part of the p99 band, its reads most of it (the disk's time and the wait
  for a CPU after each); the advice is RAM first, never IOPS; --verify raises the memory limit and
  measures the p99 again.
- cpu: the database warm and unlimited, the app spending 6 ms of CPU per request under a CPU quota of
  a quarter of a CPU. Expected: the app waits for a CPU, and the advice is CPU for it.

    .venv/bin/python experiments/io-aware-benchmark/run.py [--short] [--json]

--short (CI) runs each scenario for a few seconds at a lower rate; the checks are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rig

from bpfscope.domains.bench.limits import disk_of
from bpfscope.domains.bench.tree import quantile

WORK = Path("/var/tmp/bpfscope-io-aware")
SCALE = 10
READ_IOPS = 3000  # a cloud volume's cap (gp3's baseline)
CPUS = 0.25  # the app's quota in the CPU scenario: 30 requests of 6 ms a second need 0.18 of a CPU
ROWS = 40  # accounts a request reads: a page of a listing, each a random index leaf and table page
NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream sidecar {{ server 127.0.0.1:{sidecar}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sidecar;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
HAPROXY = """
global
    maxconn 1024
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend in
    bind 127.0.0.1:{port}
    default_backend app
backend app
    http-reuse always
    server app 127.0.0.1:{app}
"""


class System:
    """The five components, started in their cgroups; torn down on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.stack = contextlib.ExitStack()
        self.groups = {name: rig.Group(name) for name in ("gw", "sidecar", "app", "db", "mq")}
        # The load generator (and bench, its parent) in the run's CPU weight too: not a component.
        self.client = rig.Group("client")
        self.stack.callback(self.client.close)
        self.client.weigh_run()
        for g in self.groups.values():
            self.stack.callback(g.close)

    def start(self, work_ms: float) -> None:
        self.db = rig.Postgres(self.work / "pg", self.groups["db"], shared_buffers="16MB")
        self.db.start()
        self.stack.callback(self.db.stop)
        self.db.pgbench_init(SCALE)
        self.db.sql("ALTER SYSTEM SET autovacuum = off")
        self.db.sql("SELECT pg_reload_conf()")
        mq_port, app_port, sidecar_port, self.port = (rig.free_port() for _ in range(4))
        mq_dir = self.work / "redis"
        mq_dir.mkdir(parents=True, exist_ok=True)
        redis = ["redis-server", "--port", str(mq_port), "--bind", "127.0.0.1", "--dir", str(mq_dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
        self.stack.enter_context(rig.started(redis, self.groups["mq"], ready=None))
        rig.wait_port("127.0.0.1", mq_port)
        app = rig.app_command(app_port, self.db.dsn, f"127.0.0.1:{mq_port}", work_ms, ROWS)
        self.stack.enter_context(rig.started(app, self.groups["app"]))
        conf = self.work / "haproxy.cfg"
        conf.write_text(HAPROXY.format(port=sidecar_port, app=app_port))
        self.stack.enter_context(
            rig.started(["haproxy", "-f", str(conf)], self.groups["sidecar"], ready=None)
        )
        rig.wait_port("127.0.0.1", sidecar_port)
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX.format(dir=self.work, port=self.port, sidecar=sidecar_port))
        self.stack.enter_context(rig.started(["nginx", "-c", str(conf)], self.groups["gw"], ready=None))
        rig.wait_port("127.0.0.1", self.port)

    def components(self) -> str:
        return ",".join(f"{name}=cgroup:{g.cgroup2}" for name, g in self.groups.items())

    def close(self) -> None:
        self.stack.close()


def bench(system: System, rate: float, seconds: float, log: Path, verify: bool) -> list[dict[str, Any]]:
    # Keys over the whole table (1M rows, 130 MB): more than the database's RAM holds.
    load = rig.load_command("127.0.0.1", system.port, rate, seconds, SCALE * 100_000, log)
    cmd = [sys.executable, "-m", "bpfscope", "bench", "--json", "--entry", "gw", "--components",
           system.components(), *(["--verify"] if verify else []), "--", *load]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, preexec_fn=system.client.preexec()
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench failed: {result.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def summary(records: list[dict[str, Any]], log: Path) -> dict[str, Any]:
    """What a scenario showed, and the load generator's own p50/p99 beside bench's."""
    summ = next(r for r in records if r["record"] == "bench.summary")
    nodes = [r for r in records if r["record"] == "bench.node" and r["band"] == "p99"]
    every = [r for r in records if r["record"] == "bench.node" and r["band"] == "all"]
    advice = [r for r in records if r["record"] == "bench.advice" and r["advised"]]
    not_worth = [r for r in records if r["record"] == "bench.advice" and not r["advised"]]
    verified = next((r for r in records if r["record"] == "bench.verify"), None)
    logged = [ns / 1e6 for ns in rig.read_load_log(log)]
    replay = Path(f"{log}.1")
    replayed = [ns / 1e6 for ns in rig.read_load_log(replay)] if replay.exists() else []
    lines = ("cpu_ms", "runqueue_ms", "read_wake_ms", "disk_read_ms", "disk_write_ms", "lock_ms", "net_ms",
             "other_ms")  # fmt: skip
    return {
        "requests": summ["requests"],
        "client_requests": len(logged),
        "p50_ms": summ["p50_ms"],
        "client_p50_ms": round(quantile(logged, 0.5), 3),
        "p99_ms": summ["p99_ms"],
        "client_p99_ms": round(quantile(logged, 0.99), 3),
        "client_p90_ms": round(quantile(logged, 0.9), 3),
        "bottleneck": summ["bottleneck"],
        "graphs_would_buy": summ["graphs_would_buy"],
        "tree": [
            {
                "path": n["path"],
                "time_ms": n["time_ms"],
                "network_ms": n["network_ms"],
                "residual_ms": n["residual_ms"],
                **{k: n[k] for k in lines},
            }
            for n in nodes
        ],
        # Every request's tree, averaged: what a component's time is made of, beyond the two requests
        # of the short mode's p99 band.
        "tree_all": [{"path": n["path"], "time_ms": n["time_ms"], **{k: n[k] for k in lines}} for n in every],
        "advice": [
            {k: a[k] for k in ("lever", "component", "amount", "unit", "monthly", "gain_ms")} for a in advice
        ],
        # Levers considered and not worth 5% of the band after the advice (e.g. CPU for the database
        # once the RAM removes its reads and the waits for a CPU after them).
        "not_worth": [{k: a[k] for k in ("lever", "component", "gain_ms", "alone_ms")} for a in not_worth],
        "verify": verified,
        # The replay's own log (load.py writes a second run's beside the first's).
        **{
            f"verify_client_p{q}_ms": round(quantile(replayed, q / 100), 3) if replayed else None
            for q in (90, 99)
        },
    }


@contextlib.contextmanager
def scenario(work: Path, work_ms: float) -> Iterator[System]:
    system = System(work)
    try:
        system.start(work_ms)
        yield system
    finally:
        system.close()


def run(short: bool) -> dict[str, Any]:
    rate, seconds = (30.0, 6.0) if short else (30.0, 30.0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        with scenario(WORK, 0.0) as system:
            db = system.groups["db"].limits
            disk = disk_of(WORK)
            db.set_memory_bytes(64 << 20)
            # A database that has run with too little RAM: every page of its data has been read under
            # its limit, the cache holds what fits and the kernel evicted the rest (remembering each
            # eviction). Its misses are then capacity misses, which RAM removes, not the cold misses of
            # a cache emptied by hand (evicted first: no page is resident by someone else's reads).
            system.db.evict()
            system.db.warm()
            db.set_read_iops(disk, READ_IOPS)
            log = Path(tmp) / "disk.log"
            out["disk"] = summary(bench(system, rate, seconds, log, verify=True), log)
        with scenario(WORK, 6.0) as system:
            system.groups["app"].limits.set_cpus(CPUS)
            # Warm: every page of its tables and indexes in its cache (no limit: they all fit).
            system.db.warm()
            log = Path(tmp) / "cpu.log"
            out["cpu"] = summary(bench(system, rate, seconds, log, verify=False), log)
    return out


def show(result: dict[str, Any]) -> None:
    for name, s in result.items():
        print(f"\n== scenario {name}: {s['requests']} requests (client: {s['client_requests']})")
        print(f"p50 {s['p50_ms']} ms (client {s['client_p50_ms']}), p99 {s['p99_ms']} ms ", end="")
        print(f"(client {s['client_p99_ms']})")
        heads = ("ms", "cpu", "runq", "dread", "dwrite", "net", "resid")
        print(f"{'p99 band':28} {heads[0]:>8}" + "".join(f" {h:>7}" for h in heads[1:]))
        for n in s["tree"]:
            print(
                f"{n['path']:28} {n['time_ms']:8.2f} {n['cpu_ms']:7.2f} {n['runqueue_ms']:7.2f} "
                f"{n['disk_read_ms']:7.2f} {n['disk_write_ms']:7.2f} {n['network_ms']:7.2f} "
                f"{n['residual_ms']:7.2f}"
            )
        print(f"bottleneck: {s['bottleneck']}")
        for a in s["advice"]:
            print(f"advice: {a['lever']} for {a['component']}: {a['amount']:g} {a['unit']}, "
                  f"{a['monthly']:.2f}/month, p99 -{a['gain_ms']} ms")  # fmt: skip
        for a in s["not_worth"]:
            print(f"not worth it: {a['lever']} for {a['component']}: p99 -{a['gain_ms']} ms after the advice "
                  f"({a['alone_ms']} ms by itself)")  # fmt: skip
        print(f"CPU and RAM graphs alone would buy: {s['graphs_would_buy']}")
        if s["verify"]:
            v = s["verify"]
            verdict = "confirmed" if v["confirmed"] else "withdrawn"
            print(
                f"verify: {v['limit']}: p99 {v['before_p99_ms']} -> predicted {v['predicted_p99_ms']}, ",
                end="",
            )
            print(f"measured {v['measured_p99_ms']} ms (client {s['verify_client_p99_ms']}): {verdict}")
            print(f"client p90: {s['client_p90_ms']} ms before, {s['verify_client_p90_ms']} ms in the replay")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", action="store_true", help="a few seconds per scenario (CI)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.short)
    if args.json:
        print(json.dumps(result))
    else:
        show(result)


if __name__ == "__main__":
    main()
