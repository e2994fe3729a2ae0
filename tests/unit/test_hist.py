import json
import re
from pathlib import Path

import numpy as np
import pytest

from bpfscope.runtime import hist as hist_mod
from bpfscope.runtime.hist import (
    Histogram,
    log2_bounds,
    log2_slot,
    loglin_bounds,
    loglin_slot,
)

U64_MAX = 2**64 - 1
N_SAMPLES = 100_000
QS = (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100)
# Mirrors of the kernel layout, used only to check the header against the Python side.
N_LOG2 = 64
N_LOGLIN = 976


def _lognormal_ns() -> np.ndarray:
    # Median ~50us with sigma 2 spans roughly 100ns .. 10s, several decades.
    rng = np.random.default_rng(20240101)
    return np.floor(rng.lognormal(mean=np.log(50_000), sigma=2.0, size=N_SAMPLES)).astype(np.uint64)


def _uniform() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 1_000_000, size=N_SAMPLES, dtype=np.uint64)


def _uniform_small() -> np.ndarray:
    # Exercises the exact slots below 16 and the first log-linear ranges.
    rng = np.random.default_rng(11)
    return rng.integers(0, 200, size=N_SAMPLES, dtype=np.uint64)


def _bimodal() -> np.ndarray:
    # Cache hits around 2us and device reads around 5ms.
    rng = np.random.default_rng(42)
    fast = rng.normal(2_000, 200, size=N_SAMPLES * 7 // 10)
    slow = rng.normal(5_000_000, 500_000, size=N_SAMPLES - fast.size)
    both = np.concatenate([fast, slow])
    rng.shuffle(both)
    return np.floor(np.clip(both, 0, None)).astype(np.uint64)


DATASETS = {
    "lognormal": _lognormal_ns,
    "uniform": _uniform,
    "uniform_small": _uniform_small,
    "bimodal": _bimodal,
}


def _ref_log2_slot(v: int) -> int:
    return max(v.bit_length() - 1, 0)


def _ref_loglin_slot(v: int) -> int:
    if v < 16:
        return v
    e = v.bit_length() - 1
    return (e - 3) * 16 + ((v >> (e - 4)) & 15)


# --- slot functions -------------------------------------------------------


def _edge_values() -> list[int]:
    vals = [0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 2**32 - 1, 2**32, 2**32 + 1, 2**63, U64_MAX - 1, U64_MAX]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, U64_MAX, size=5000, dtype=np.uint64, endpoint=True)
    shifts = rng.integers(0, 64, size=raw.size)
    # Shifting spreads the samples over all magnitudes instead of clustering near 2**63.
    vals += [int(x) >> int(s) for x, s in zip(raw, shifts, strict=True)]
    return vals


def test_slot_functions_match_reference() -> None:
    vals = _edge_values()
    arr = np.array(vals, dtype=np.uint64)
    assert log2_slot(arr).tolist() == [_ref_log2_slot(v) for v in vals]
    assert loglin_slot(arr).tolist() == [_ref_loglin_slot(v) for v in vals]


def test_slot_extremes() -> None:
    assert log2_slot(np.array([0, 1, 2, U64_MAX], dtype=np.uint64)).tolist() == [0, 0, 1, 63]
    assert loglin_slot(np.array([0, 15, 16, U64_MAX], dtype=np.uint64)).tolist() == [0, 15, 16, 975]
    # Python ints beyond int64 and plain lists are accepted as-is.
    assert loglin_slot([U64_MAX]).tolist() == [975]
    assert loglin_slot(U64_MAX).item() == 975


def test_slot_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        loglin_slot(np.array([-1, 5]))
    with pytest.raises(ValueError):
        log2_slot([2**64])
    with pytest.raises(ValueError):
        loglin_slot(np.array([1.0, float("nan")]))


def test_loglin_bounds_contiguous_and_cover_u64() -> None:
    assert loglin_bounds(0) == (0, 0)
    prev_high = -1
    for slot in range(N_LOGLIN):
        low, high = loglin_bounds(slot)
        assert low == prev_high + 1, slot
        assert high >= low
        if slot >= 16:
            assert (high - low + 1) * 16 <= low, slot
        else:
            assert low == high == slot
        prev_high = high
    assert prev_high == U64_MAX


def test_loglin_bounds_map_back_to_slot() -> None:
    lows, highs = zip(*(loglin_bounds(s) for s in range(N_LOGLIN)), strict=True)
    expected = list(range(N_LOGLIN))
    assert loglin_slot(np.array(lows, dtype=np.uint64)).tolist() == expected
    assert loglin_slot(np.array(highs, dtype=np.uint64)).tolist() == expected


def test_log2_bounds_contiguous_and_map_back() -> None:
    assert log2_bounds(0) == (0, 1)
    prev_high = -1
    for slot in range(N_LOG2):
        low, high = log2_bounds(slot)
        assert low == prev_high + 1
        assert log2_slot(np.array([low, high], dtype=np.uint64)).tolist() == [slot, slot]
        prev_high = high
    assert prev_high == U64_MAX


def test_header_constants_match_python_mirror() -> None:
    # The header ships inside the package; a drift between C and Python would
    # silently mislabel every bucket.
    header = Path(hist_mod.__file__).resolve().parents[1] / "include" / "hist.bpf.h"
    if not header.exists():
        pytest.skip("hist.bpf.h not found next to the package")
    defines = dict(re.findall(r"^#define\s+(BS_\w+)\s+(\d+)\s*$", header.read_text(), flags=re.M))
    assert int(defines["BS_LOG2_SLOTS"]) == int(log2_slot(U64_MAX)) + 1
    assert int(defines["BS_LOGLIN_SLOTS"]) == int(loglin_slot(U64_MAX)) + 1
    sub = 1 << int(defines["BS_LOGLIN_SUB_BITS"])
    # 2**SUB_BITS exact slots first, then 2**SUB_BITS slots per power of two.
    assert loglin_bounds(sub - 1) == (sub - 1, sub - 1)
    assert loglin_bounds(sub) == (sub, sub)
    assert int(loglin_slot(2**21)) - int(loglin_slot(2**20)) == sub


# --- percentiles against numpy --------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_loglin_percentiles_match_numpy(name: str) -> None:
    samples = DATASETS[name]()
    h = Histogram.from_values(samples, "loglin")
    assert h.total == samples.size
    expected = np.percentile(samples, QS)
    for q, ref in zip(QS, expected, strict=True):
        ours = h.percentile(q)
        assert ours is not None
        assert abs(ours - ref) <= ref / 16 + 1, (name, q, ours, ref)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_log2_percentiles_in_numpy_slot(name: str) -> None:
    samples = DATASETS[name]()
    h = Histogram.from_values(samples, "log2")
    expected = np.percentile(samples, QS)
    for q, ref in zip(QS, expected, strict=True):
        ours = h.percentile(q)
        assert ours is not None
        low, high = log2_bounds(int(log2_slot(int(ref))))
        assert low <= ours <= high, (name, q, ours, ref, low, high)


def test_percentile_stays_inside_slot_and_is_monotonic() -> None:
    h = Histogram.from_values(_bimodal(), "loglin")
    values = [h.percentile(q) for q in np.linspace(0, 100, 1001)]
    assert all(v is not None for v in values)
    assert values == sorted(values)
    assert values[0] == h.min_bound()
    assert values[-1] == h.max_bound()


def test_percentile_of_exact_values() -> None:
    h = Histogram.from_values([3] * 10 + [7] * 10, "loglin")
    assert h.percentile(0) == 3
    assert h.percentile(50) == 3
    assert h.percentile(51) == 7
    assert h.percentile(100) == 7
    with pytest.raises(ValueError):
        h.percentile(101)


def test_percentiles_keys() -> None:
    h = Histogram.from_values(_uniform(), "loglin")
    p = h.percentiles()
    assert list(p) == ["p50", "p90", "p95", "p99", "p99.9"]
    assert p["p50"] == h.percentile(50)
    assert list(h.percentiles((25, 75.5))) == ["p25", "p75.5"]


def test_mean_close_to_numpy() -> None:
    samples = _lognormal_ns()
    h = Histogram.from_values(samples, "loglin")
    mean = h.mean()
    assert mean is not None
    ref = float(samples.mean())
    assert abs(mean - ref) <= ref / 32


def test_extreme_values() -> None:
    h = Histogram.from_values(np.array([0, U64_MAX], dtype=np.uint64), "loglin")
    assert h.min_bound() == 0
    assert h.max_bound() == U64_MAX
    assert h.percentile(0) == 0
    assert h.percentile(100) == float(U64_MAX)
    assert h.to_log2().max_bound() == U64_MAX


# --- structure ------------------------------------------------------------


def test_from_values_lengths() -> None:
    h = Histogram.from_values([5, 40], "loglin")
    assert len(h.counts) == int(loglin_slot(40)) + 1
    assert h.counts.dtype == np.uint64
    fixed = Histogram.from_values([5, 40], "loglin", nslots=N_LOGLIN)
    assert len(fixed.counts) == N_LOGLIN
    assert fixed == h
    with pytest.raises(ValueError):
        Histogram.from_values([U64_MAX], "log2", nslots=10)
    with pytest.raises(ValueError):
        Histogram(np.zeros(4), "linear")  # type: ignore[arg-type]


def test_merge_adds_counts() -> None:
    a = Histogram(np.array([1, 2, 3], dtype=np.uint64), "log2")
    b = Histogram(np.array([10, 0, 0, 0, 5], dtype=np.uint64), "log2")
    merged = a + b
    assert merged.counts.tolist() == [11, 2, 3, 0, 5]
    assert merged.total == a.total + b.total
    assert a.merge(b) == merged
    # Samples bucketed separately or together give the same histogram.
    x, y = _uniform(), _bimodal()
    assert Histogram.from_values(x, "loglin") + Histogram.from_values(y, "loglin") == Histogram.from_values(
        np.concatenate([x, y]), "loglin"
    )
    with pytest.raises(ValueError):
        a + Histogram(np.array([1], dtype=np.uint64), "loglin")


def test_to_log2_preserves_total_and_membership() -> None:
    samples = np.concatenate([_lognormal_ns(), _bimodal(), _uniform_small()])
    loglin = Histogram.from_values(samples, "loglin")
    collapsed = loglin.to_log2()
    assert collapsed.kind == "log2"
    assert collapsed.total == loglin.total == samples.size
    assert collapsed == Histogram.from_values(samples, "log2")


def test_every_loglin_slot_inside_one_log2_slot() -> None:
    counts = np.ones(N_LOGLIN, dtype=np.uint64)
    collapsed = Histogram(counts, "loglin").to_log2()
    assert collapsed.total == N_LOGLIN
    for slot in range(N_LOGLIN):
        low, high = loglin_bounds(slot)
        assert int(log2_slot(low)) == int(log2_slot(high)), slot


# --- rendering ------------------------------------------------------------


def test_ascii_known_histogram() -> None:
    h = Histogram(np.array([0, 12, 100, 0, 0], dtype=np.uint64), "log2")
    expected = "\n".join(
        [
            "     usecs               : count    distribution",
            "         0 -> 1          : 0        |                                        |",
            "         2 -> 3          : 12       |****                                    |",
            "         4 -> 7          : 100      |****************************************|",
        ]
    )
    assert h.ascii("usecs") == expected


def test_ascii_loglin_renders_as_log2() -> None:
    samples = [0, 1, 2, 3, 5, 6, 7, 100, 130]
    loglin = Histogram.from_values(samples, "loglin")
    log2 = Histogram.from_values(samples, "log2")
    assert loglin.ascii("bytes") == log2.ascii("bytes")
    assert loglin.ascii().splitlines()[0] == "     value               : count    distribution"


def test_ascii_widens_for_large_values() -> None:
    h = Histogram.from_values([2**40, 2**40, 3], "log2")
    lines = h.ascii("nsecs").splitlines()
    assert lines[0] == " " * 15 + "nsecs".ljust(29) + " : count    distribution"
    assert len(lines) == 1 + 41
    assert lines[2] == f"{2:>20} -> {3:<20} : {1:<8} |{'*' * 10}{' ' * 10}|"
    assert lines[-1] == f"{2**40:>20} -> {2**41 - 1:<20} : {2:<8} |{'*' * 20}|"


def test_empty_histogram() -> None:
    for empty in (
        Histogram(np.zeros(0, dtype=np.uint64), "loglin"),
        Histogram(np.zeros(N_LOG2, dtype=np.uint64), "log2"),
        Histogram.from_values(np.array([], dtype=np.uint64), "loglin"),
    ):
        assert empty.total == 0
        assert empty.percentile(50) is None
        assert all(v is None for v in empty.percentiles().values())
        assert empty.mean() is None
        assert empty.min_bound() is None
        assert empty.max_bound() is None
        assert empty.ascii("usecs") == ""
        assert empty.to_log2().total == 0
        assert empty.to_dict()["slots"] == []


def test_to_dict_is_json_ready() -> None:
    h = Histogram(np.array([0, 12, 100], dtype=np.uint64), "log2")
    d = json.loads(json.dumps(h.to_dict()))
    assert d["kind"] == "log2"
    assert d["total"] == 112
    assert set(d["percentiles"]) == {"p50", "p90", "p95", "p99", "p99.9"}
    assert d["slots"] == [{"low": 2, "high": 3, "count": 12}, {"low": 4, "high": 7, "count": 100}]
    top = Histogram.from_values([U64_MAX], "loglin").to_dict()
    assert top["slots"] == [{"low": loglin_bounds(975)[0], "high": U64_MAX, "count": 1}]
