"""experiments/io-aware-benchmark in its short mode: five components under an open-loop load, measured
by bpfscope bench. The truths: the load generator's own log (every request counted, p50/p99 within 2%),
closure (residuals under 1%), and advice that follows the bottleneck: RAM for the database in the disk
scenario (replayed by --verify, measured against the replay's own log), CPU for the app when its CPU
quota holds it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "io-aware-benchmark" / "run.py"


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, str(EXPERIMENT), "--short", "--json"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", ["disk", "cpu"])
def test_end_to_end_as_the_client_logged_it(result: dict[str, Any], name: str) -> None:
    s = result[name]
    assert s["requests"] == s["client_requests"] > 0, s
    for key in ("p50_ms", "p99_ms"):
        truth = s[f"client_{key}"]
        assert abs(s[key] - truth) <= 0.02 * truth, (name, key, s[key], truth)
    for node in s["tree"]:
        assert abs(node["residual_ms"]) <= 0.01 * node["time_ms"] + 0.001, node
    paths = {n["path"] for n in s["tree"]}
    # Every component joined below the gateway: the tree is the whole path.
    assert {"end-to-end/gw/sidecar/app/db", "end-to-end/gw/sidecar/app/mq"} <= paths, paths


def test_disk_scenario(result: dict[str, Any]) -> None:
    s = result["disk"]
    # The database is the slowest component below the app over every request, not only in the p99 band:
    # the short mode's band is two requests, and in one of them the queue's fsync once stalled 24.2 ms
    # against the database's 7.9 ms of reads (in a quiet run, over every request: 7.3 ms a request for
    # the database, 0.57 for the queue).
    every_node = {n["path"].rsplit("/", 1)[-1]: n for n in s["tree_all"]}
    below_app = [n for n in s["tree_all"] if n["path"].startswith("end-to-end/gw/sidecar/app/")]
    assert every_node["db"] == max(below_app, key=lambda n: n["time_ms"]), below_app
    # Its time is more its reads than its own work: the disk's time and the wait for a CPU once each
    # read is done (on a busy machine that wait can be the larger part), both gone with the reads a
    # larger cache serves. (Not more than its other waits for a CPU too: at a load average of 17 on the
    # two CPUs, one band's database waited 6.3 ms for a CPU beside 4.9 ms of reads.) Over every request:
    # the short mode's p99 band is two requests, and on a quiet machine one of three runs had a band
    # whose database worked 10.7 ms beside 9.1 ms of reads (reads 15.9 and 20.6 against 5.0 and 6.0 in
    # the other two).
    every = every_node["db"]
    reads = every["disk_read_ms"] + every["read_wake_ms"]
    assert reads > every["cpu_ms"] + every["disk_write_ms"], every
    # (Not the bottleneck's words: the short mode's p99 band is two requests, and one slow hop elsewhere
    # in one of them can outweigh the database's reads in the sum over the path.)
    # RAM first: its reads are pages its too small cache had evicted, on a volume below its cap (more
    # IOPS would not shorten them); CPU, if advised at all, comes after.
    first = s["advice"][0]
    assert (first["lever"], first["component"]) == ("ram", "db"), s["advice"]
    assert "iops" not in {a["lever"] for a in s["advice"]}, s["advice"]
    v = s["verify"]
    assert v is not None and v["lever"] == "ram", v
    # With the memory raised (and its cache warm, as a larger one would be), the requests are faster, as
    # the load generator logged them: its p90 (the 18th slowest request of the short mode's 180; the p99
    # is the second, and one hiccup of the machine's made the replay's 73.2 ms against 33.3) went from
    # 10.3 and 11.3 ms to 3.6 and 3.5 in two runs. (Whether the p99 gained half the predicted gain, so
    # that the advice is confirmed, depends on what else the machine runs meanwhile: the run's own words
    # say.)
    assert s["verify_client_p90_ms"] < 0.75 * s["client_p90_ms"], s
    # The replay's p99 as bench measured it, against the load generator's log of the replay.
    assert abs(v["measured_p99_ms"] - s["verify_client_p99_ms"]) <= 0.02 * s["verify_client_p99_ms"], v


def test_cpu_scenario(result: dict[str, Any]) -> None:
    s = result["cpu"]
    first = s["advice"][0]
    assert (first["lever"], first["component"]) == ("cpu", "app"), s["advice"]
    app = next(n for n in s["tree"] if n["path"].endswith("/app"))
    # Throttled by its quota, the app waits for a CPU, and its time is CPU, not disk. (Not "run queue
    # above CPU": at 30 requests/s of 6 ms the quota throttles in bursts, and a two-request band once
    # had 2.8 ms of run queue beside 6.9 ms of CPU and 9.9 ms of lock, its threads waiting for the GIL
    # a throttled thread held.)
    assert app["runqueue_ms"] > 0, app
    assert app["cpu_ms"] + app["runqueue_ms"] > app["disk_read_ms"] + app["disk_write_ms"], app
    # (The bottleneck's words may say network: the app's throttled accept shows as the sidecar's hop.)
