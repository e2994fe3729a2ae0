"""bench's advice on made-up trees: each lever removes only its share of the p99 band, the best gain per
price comes first, the shipped prices carry their source and date and a user's table overrides them, and
the tree's averages add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpfscope.domains.bench import advice, limits, tree
from bpfscope.errors import BpfscopeError


def band(**lines: float) -> tree.Node:
    """A p99 band of one database under a client: 100 ms end to end, the database's own lines (ms)."""
    top = tree.Node("end-to-end", "client", 1, 100e6)
    db = top.child("db", "per request")
    db.calls, db.time_ns = 1, 100e6
    db.lines = {k: v * 1e6 for k, v in lines.items()}
    return top


def test_shipped_prices_have_source_date_and_every_lever() -> None:
    prices = advice.load_prices()
    assert prices.source.startswith("AWS") and prices.date and prices.currency == "USD"
    assert set(prices.levers) == set(advice.LEVERS)
    # The RAM step is the memory-optimised against general-purpose difference: $0.030/h for 8 GiB.
    assert prices.levers["ram"].step_price == pytest.approx(0.030 * 730)


def test_a_table_overrides_lever_by_lever(tmp_path: Path) -> None:
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"source": "our contract", "levers": {"cpu": {"monthly_per_unit": 10}}}))
    prices = advice.load_prices(str(table))
    assert prices.source == "our contract" and prices.levers["cpu"].monthly_per_unit == 10
    assert prices.levers["ram"] == advice.load_prices().levers["ram"]


@pytest.mark.parametrize(
    "content, words",
    [
        ("[1]", "a price table is a JSON object"),
        ("{", "is not JSON"),
        ('{"levers": {"gpu": {}}}', "levers are ram, iops, cpu"),
        ('{"nonsense": 1}', "unknown key 'nonsense'"),
        ('{"levers": {"iops": {"step": 0}}}', "step must be a number above 0"),
    ],
)
def test_a_bad_table_is_one_error(content: str, words: str, tmp_path: Path) -> None:
    table = tmp_path / "prices.json"
    table.write_text(content)
    with pytest.raises(BpfscopeError, match=words):
        advice.load_prices(str(table))


def test_disk_reads_that_re_read_are_ram_and_cpu_buys_nothing() -> None:
    use = advice.Usage(reads=1000, rereads=800, read_blocks_bytes=100 << 20, cpu_s=1.0)
    verdict = advice.advise(band(disk_read=90, cpu=5, runqueue=1), {"db": use}, advice.load_prices(), 10, 2)
    assert [(a.lever, a.component) for a in verdict.advice] == [("ram", "db")]
    assert verdict.advice[0].gain_ns == pytest.approx(0.8 * 90e6)  # only the re-reads
    assert verdict.advice[0].amount == 8  # the smallest step that holds 100 MiB
    assert "cpu" in {a.lever for a in verdict.considered}  # considered, not worth 5% of the band
    assert verdict.bottleneck.startswith("disk (90%")


def test_run_queue_is_cpu() -> None:
    verdict = advice.advise(
        band(runqueue=70, cpu=25), {"db": advice.Usage(cpu_s=19)}, advice.load_prices(), 10, 2
    )
    assert [a.lever for a in verdict.advice] == ["cpu"]
    assert verdict.bottleneck.startswith("CPU")
    assert "more CPU for db (95% of its 2 CPUs busy)" in verdict.graphs


def test_iops_only_at_the_cap() -> None:
    """At the cap, or queued under it: IOPS removes the queueing; below it, on the device: nothing."""
    prices = advice.load_prices()
    wait = int(10e9)
    for reads, device_ns, levers in ((9000, 5e9, ["iops"]), (2000, 1e9, ["iops"]), (2000, 9e9, [])):
        use = advice.Usage(reads=reads, device_ns=int(device_ns), disk_wait_ns=wait, read_iops_cap=1000)
        verdict = advice.advise(band(disk_read=90), {"db": use}, prices, 10, 2)
        assert [a.lever for a in verdict.advice] == levers, (reads, device_ns)
        if levers:
            assert verdict.advice[0].gain_ns == pytest.approx(90e6 * (1 - device_ns / wait))


def test_an_average_adds_up() -> None:
    a, b = band(disk_read=90, cpu=10), band(cpu=50, runqueue=50)
    mean = tree.average([a, b])
    db = mean.find("db")
    assert db is not None and db.time_ns == pytest.approx(100e6)
    assert db.lines == pytest.approx({"disk_read": 45e6, "cpu": 30e6, "runqueue": 25e6})
    assert tree.quantile([5, 1, 4, 2, 3], 0.5) == 3 and tree.quantile([5, 1, 4, 2, 3], 0.99) == 5


def test_refaults_are_what_ram_removes_with_the_waits_after_the_reads() -> None:
    """A refault is a page the cgroup had cached and evicted: a larger cache would have served the read,
    and the thread would neither have blocked nor waited for a CPU after it."""
    top = band(disk_read=60, runqueue=30, cpu=10)
    db = top.find("db")
    assert db is not None
    db.read_wake_ns = 20e6
    # 100 reads of 8 KiB: 200 pages, 150 of them refaults (the rest first reads: cold misses).
    use = advice.Usage(reads=100, read_bytes=100 * 8192, refaults=150, memory_used=64 << 20,
                       memory_limit=64 << 20, rereads=0)  # fmt: skip
    verdict = advice.advise(top, {"db": use}, advice.load_prices(), 10, 2)
    ram = next(a for a in verdict.considered if a.lever == "ram")
    assert ram.gain_ns == pytest.approx(0.75 * (60e6 + 20e6))
    assert ram.amount == 8 and "75% of the 200 pages" in ram.why and "64 MiB limit" in ram.why
    # Re-reads within the run do not matter when the kernel counts refaults (evictions before the run
    # count too); none at all: no RAM gain, however many reads.
    share, _, _ = advice.ram_share(advice.Usage(reads=100, read_bytes=100 * 8192, refaults=0, rereads=90))
    assert share == 0


def test_the_ram_share_is_at_most_all_the_reads() -> None:
    share, extra, why = advice.ram_share(advice.Usage(reads=10, read_bytes=10 * 4096, refaults=25))
    assert share == 1 and extra == 10 * 4096 and "the machine's memory" in why


def test_without_refault_counters_re_reads_are_the_share() -> None:
    share, extra, _ = advice.ram_share(advice.Usage(reads=10, rereads=4, read_blocks_bytes=6 << 20))
    assert share == pytest.approx(0.4) and extra == 6 << 20


@pytest.mark.parametrize("prefix", ["total_", ""])
def test_refaults_from_memory_stat(prefix: str, tmp_path: Path) -> None:
    """cgroup v1 prints the hierarchy's counters with total_ (beside its own), v2 its hierarchical ones."""
    own = "workingset_refault_file 3\n" if prefix else ""
    (tmp_path / "memory.stat").write_text(f"cache 1\n{own}{prefix}workingset_refault_file 42\n")
    assert limits.Limits(tmp_path, None, None).refaults() == 42
    (tmp_path / "memory.stat").write_text("cache 1\n")
    assert limits.Limits(tmp_path, None, None).refaults() is None
    assert limits.Limits(None, None, None).refaults() is None


def test_warm_reads_the_files_up_to_the_budget(tmp_path: Path) -> None:
    """The reading is done by a child that joins the memory cgroup (here a directory standing for one)."""
    (tmp_path / "cgroup.procs").write_text("")
    files = []
    for name in ("a", "b"):
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x" * (3 << 20))
    group = limits.Limits(tmp_path, None, None)
    assert group.warm(files, 1 << 30) == 6 << 20
    assert group.warm(files, 4 << 20) == 4 << 20
    assert int((tmp_path / "cgroup.procs").read_text()) > 0  # the child wrote itself there


def test_levers_are_taken_in_turn_each_counting_what_the_ones_before_left() -> None:
    """RAM removes the waits for a CPU after the reads it saves: CPU after the RAM only gains the
    run-queue time left (here 2 of 6 ms of a 100 ms band, under the 5% floor), though by itself it
    would remove all 6 ms."""
    top = band(disk_read=60, runqueue=6, cpu=10)
    db = top.find("db")
    assert db is not None
    db.read_wake_ns = 4e6
    use = advice.Usage(reads=100, read_bytes=100 * 8192, refaults=200, memory_used=64 << 20,
                       memory_limit=64 << 20)  # fmt: skip
    verdict = advice.advise(top, {"db": use}, advice.load_prices(), 10, 2)
    assert [a.lever for a in verdict.advice] == ["ram"]
    assert verdict.advice[0].gain_ns == pytest.approx(64e6)
    cpu = next(a for a in verdict.considered if a.lever == "cpu")
    assert cpu.alone_ns == pytest.approx(6e6) and cpu.gain_ns == pytest.approx(2e6)
    assert "after ram for db" in cpu.why
    # Without the RAM's reads, CPU is worth its 6 ms by itself: the same lever, advised.
    alone = advice.advise(
        band(runqueue=6, cpu=10), {"db": advice.Usage(cpu_s=1)}, advice.load_prices(), 10, 2
    )
    assert [(a.lever, a.gain_ns) for a in alone.advice] == [("cpu", pytest.approx(6e6))]


def test_iops_after_ram_gains_the_queueing_of_the_reads_left() -> None:
    """IOPS removes the queued share of the disk time that RAM left: half the reads gone, half the gain."""
    top = band(disk_read=80)
    use = advice.Usage(reads=9000, read_bytes=9000 * 4096, refaults=4500, memory_used=64 << 20,
                       memory_limit=64 << 20, device_ns=int(5e9), disk_wait_ns=int(10e9),
                       read_iops_cap=1000)  # fmt: skip
    prices = advice.load_prices()
    verdict = advice.advise(top, {"db": use}, prices, 10, 2)
    ram = next(a for a in verdict.considered if a.lever == "ram")
    iops = next(a for a in verdict.considered if a.lever == "iops")
    first, second = verdict.advice
    assert first.alone_ns == first.gain_ns
    # Each removes half the reads' time by itself (half are refaults; half of the waits queued), and
    # half of what the other left: whichever comes first (by price), the second gains half as much.
    assert ram.alone_ns == pytest.approx(40e6) and iops.alone_ns == pytest.approx(40e6)
    assert first.gain_ns == pytest.approx(40e6) and second.gain_ns == pytest.approx(20e6)
