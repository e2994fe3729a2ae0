"""The profile's pure-Python parts: records and their round trip, folded stacks, pprof (written and read
back), speedscope, the HTML flame graph, and the ELF symboliser, with the parsers of captured data
fuzzed (hypothesis): bad bytes are a counted reason or a one-line error, never a traceback."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfscope.domains.profile import flamegraph, formats
from bpfscope.domains.profile.profiles import SCHEMAS, Profile, Thread
from bpfscope.domains.profile.symbols import Frame, SymbolTable, _unwind_table, demangle, read_binary
from bpfscope.domains.profile.unwind import (
    CFA_RBP,
    CFA_RSP,
    Registers,
    Rule,
    StackCopy,
    UnwindTable,
    unwind,
)
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.schema import schema_for

MAIN = Frame("main", "app", "user", "ab12")
A = Frame("hot_a", "app", "user", "ab12")
B = Frame("hot_b", "app", "user", "ab12")
READ = Frame("vfs_read", "[kernel]", "kernel")


def sample_profile() -> Profile:
    profile = Profile(kind="cpu", frequency_hz=99, duration_s=2.0, start_ts=1_700_000_000.0)
    app = Thread(10, 11, "app", 5, None)
    profile.add(app, (MAIN, A), 60, 60 * 10_101_010, "app")
    profile.add(app, (MAIN, B), 30, 30 * 10_101_010, "app")
    profile.add(app, (MAIN, B, READ), 10, 10 * 10_101_010, "app")
    return profile


def test_shares_and_functions() -> None:
    profile = sample_profile()
    shares = profile.shares()
    assert shares["main"] == 100 and shares["hot_a"] == 60 and shares["hot_b"] == 40
    rows = {fn: (own, total) for fn, _, own, total in profile.functions()}
    assert rows["hot_b"] == (30, 40) and rows["vfs_read"] == (10, 10)


def test_of_process_keeps_one_process() -> None:
    profile = sample_profile()
    other = Thread(20, 20, "other", 0, None)
    profile.add(other, (MAIN,), 50, 50 * 10_101_010, "other")
    mine = profile.of_process(10)
    assert mine.stacks() == sample_profile().stacks() and mine.frequency_hz == 99
    assert mine.weights == sample_profile().weights


def test_records_follow_their_schemas_and_round_trip() -> None:
    profile = sample_profile()
    records = list(profile.records(ts=1_700_000_002.0, interval_s=2.0))
    for record in records:
        schema = schema_for(SCHEMAS, record)
        assert schema is not None and schema.check(record) == [], record
    again = Profile.from_records(json.loads(json.dumps(records)))
    assert again.stacks() == profile.stacks()
    assert again.frequency_hz == 99 and again.duration_s == 2.0


def test_folded_round_trip() -> None:
    text = formats.folded(sample_profile())
    assert "app;main;hot_b;vfs_read_[k] 10" in text.splitlines()
    assert formats.parse_folded(text).stacks() == sample_profile().stacks()


def test_pprof_round_trip() -> None:
    profile = sample_profile()
    data = formats.pprof(profile)
    assert data[:2] == b"\x1f\x8b"
    again = formats.parse_pprof(data)
    assert again.stacks() == profile.stacks()
    assert again.frequency_hz == 99
    (thread,) = {t for t, _ in again.samples}
    assert (thread.pid, thread.tid, thread.comm, thread.cgroup) == (10, 11, "app", 5)
    frames = {f for _, fs in again.samples for f in fs}
    assert Frame("hot_a", "app", "user", "ab12") in frames


def test_speedscope() -> None:
    doc = json.loads(formats.speedscope(sample_profile()))
    (prof,) = doc["profiles"]
    assert sum(prof["weights"]) == 100
    names = [f["name"] for f in doc["shared"]["frames"]]
    assert "hot_a" in names and "vfs_read_[k]" in names


def test_html_is_self_contained_and_diffs() -> None:
    page = flamegraph.html(sample_profile(), "t</script>")
    assert "<script>" in page and "</script>" in page and "t&lt;/script&gt;" in page
    data = json.loads(page.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert data["root"][1] == 100 and not data["diff"]
    before = Profile(kind="cpu")
    app = Thread(10, 11, "app")
    before.add(app, (MAIN, A), 90, 0)
    before.add(app, (MAIN, B), 10, 0)
    diff = flamegraph.html(sample_profile(), "diff", baseline=before)
    data = json.loads(diff.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    app_node = data["root"][2][0]
    main = app_node[2][0]
    hot_a = next(n for n in main[2] if n[0] == "hot_a")
    assert data["diff"] and hot_a[1] == 60 and hot_a[3] == 90


def test_format_from_file_name() -> None:
    assert formats.format_for("x.pb.gz", None) == "pprof"
    assert formats.format_for("x.html", None) == "html"
    assert formats.format_for("x.json", None) == "speedscope"
    assert formats.format_for("x.anything", None) == "folded"
    assert formats.format_for("x.html", "folded") == "folded"


LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"


def test_symbol_table_lookup() -> None:
    table = SymbolTable([(0x2000, 0x10, "b"), (0x1000, 0x100, "a"), (0x3000, 0, "asm"), (0x4000, 8, "c")])
    assert table.lookup(0x1000) == "a" and table.lookup(0x10FF) == "a"
    assert table.lookup(0x1100) is None and table.lookup(0xFFF) is None
    assert table.lookup(0x3010) == "asm"


def test_read_binary_names_a_real_function() -> None:
    python = Path(sys.executable).resolve()
    binary = read_binary(str(python))
    assert binary.error is None and len(binary.symbols) > 100
    assert binary.segments and any(seg.vaddr == 0 or seg.offset == 0 for seg in binary.segments)


def test_names_are_demangled_rust_and_cxx() -> None:
    assert demangle("_ZN6shares5hot_a17h0123456789abcdefE") == "shares::hot_a"
    assert demangle("_ZN6shares5hot_a17h0123456789abcdefE.llvm.123") == "shares::hot_a"
    assert demangle("_ZNSt6vectorIiSaIiEE9push_backERKi") == (
        "std::vector<int, std::allocator<int> >::push_back(int const&)"
    )
    assert demangle("_ZL8tiny_fnv") == "tiny_fnv"  # a file-local C++ function
    assert demangle("_Z3foov.cold") == "foo() [clone .cold]"  # the part gcc moved out of foo()
    for name in ("main", "_Znot_mangled", "_ZN3fooE.cold", ""):
        assert demangle(name) == name


def test_a_cxx_library_is_named_as_cxx_writes_it() -> None:
    """libstdc++'s own functions, read from the binary and looked up by address, come out demangled."""
    binary = read_binary(LIBSTDCXX)
    assert binary.error is None
    table = binary.symbols
    at = table.names.index("_ZNSt6thread4joinEv")  # std::thread::join(), exported by every libstdc++ 6
    assert table.lookup(int(table.starts[at])) == "std::thread::join()"


def test_a_go_binary_is_known_by_its_go_build_id() -> None:
    """The Go toolchain writes no GNU build-id: its own (as `go tool buildid` prints it) names and caches
    a Go binary."""
    import os
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (./setup.sh test installs golang-go)")
    binary = os.path.realpath(go)
    truth = subprocess.run([go, "tool", "buildid", binary], capture_output=True, text=True, check=True)
    assert read_binary(binary).build_id == truth.stdout.strip()


def test_read_binary_counts_bad_files(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("not an ELF")
    assert read_binary(str(tmp_path / "text")).error == "unreadable"
    assert read_binary(str(tmp_path / "missing (deleted)")).error == "deleted_file"
    assert read_binary(str(tmp_path / "missing")).error == "unreadable"


def _elf_prefix() -> bytes:
    true = shutil.which("true") or "/bin/true"
    return Path(true).read_bytes()


ELF = _elf_prefix()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(ELF) - 1), st.binary(min_size=1, max_size=64), st.integers(64, len(ELF)))
def test_fuzz_corrupt_elf_is_a_reason_not_a_traceback(offset: int, junk: bytes, cut: int) -> None:
    data = (ELF[:offset] + junk + ELF[offset + len(junk) :])[:cut]
    binary = read_binary("/fuzz", data=data)
    assert binary.error in (None, "unreadable")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_pprof_bytes_are_an_error_or_a_profile(data: bytes) -> None:
    with contextlib.suppress(BpfscopeError):
        formats.parse_pprof(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_folded_text_is_an_error_or_a_profile(text: str) -> None:
    with contextlib.suppress(BpfscopeError):
        formats.parse_folded(text)


@pytest.mark.parametrize("data", [b"", b"\x1f\x8b", b"\x1f\x8bgarbage"])
def test_bad_pprof_is_one_line(data: bytes) -> None:
    with pytest.raises(BpfscopeError, match="not a pprof profile"):
        formats.parse_pprof(data)


# --- unwinding -------------------------------------------------------------------------------------


class FakeTable:
    """Rules by address, as UnwindTable gives them."""

    def __init__(self, rules: dict[int, Rule]) -> None:
        self.rules = rules

    def rule(self, pc: int) -> Rule | None:
        return self.rules.get(pc & ~0xFF)


def test_unwind_walks_cfa_rules_and_frame_pointers() -> None:
    # leaf at 0x1010: frameless, CFA = rsp + 8; its caller at 0x2000: rbp saved, CFA = rbp + 16;
    # the caller's caller at 0x3000 has no table (frame pointer); then the root (return address 0).
    base = 0x7000
    words = {
        0x7000: 0x2010,  # leaf's return address (rsp + 8 - 8)
        0x7010: 0x7040,  # caller's saved rbp, at CFA - 16
        0x7018: 0x3010,  # caller's return address, at CFA - 8
        0x7040: 0x0,  # the frame-pointer frame's saved rbp
        0x7048: 0x0,  # ... and its return address: none, the root
    }
    data = b"".join(struct.pack("<Q", words.get(base + i, 0xDEAD)) for i in range(0, 0x60, 8))
    table = FakeTable({0x1000: Rule(CFA_RSP, 8, None, False), 0x2000: Rule(CFA_RBP, 16, -16, False)})
    result = unwind(Registers(0x1010, 0x7000, 0x7010), StackCopy(base, data), table.rule)
    assert result.addresses == [0x1010, 0x2010, 0x3010] and result.status == "root"


def test_unwind_stops_at_the_end_of_the_copy() -> None:
    table = FakeTable({0x1000: Rule(CFA_RSP, 64, None, False)})
    result = unwind(Registers(0x1010, 0x7000, 0), StackCopy(0x7000, b"\0" * 16), table.rule)
    assert result.status == "truncated" and result.addresses == [0x1010]


def test_unwind_table_of_a_real_binary() -> None:
    from elftools.elf.elffile import ELFFile

    python = Path(sys.executable).resolve()
    with open(python, "rb") as f:
        elf = ELFFile(f)
        table = UnwindTable.of(elf)
        symbols = read_binary(str(python)).symbols
    assert table is not None and len(table) > 1000
    entry = int(symbols.starts[len(symbols) // 2])
    rule = table.rule(entry)
    # At a function's first instruction the return address is on top of the stack.
    assert rule is not None and rule.cfa_kind == CFA_RSP and rule.cfa_offset == 8


def _pyelftools_rows(cfi: object, offset: int) -> tuple[int, int, dict[int, Rule]]:
    """An entry's rows as pyelftools decodes them: the independent reading the decoder is checked
    against (one row per address, the last one at an address standing)."""
    from elftools.dwarf.callframe import RegisterRule

    from bpfscope.domains.profile.unwind import CFA_PLT, CFA_UNSUPPORTED, RBP, RSP, _plt_threshold

    fde = cfi._parse_entry_at(offset)  # type: ignore[attr-defined]
    rows: dict[int, Rule] = {}
    for line in fde.get_decoded().table:
        cfa = line["cfa"]
        if cfa.expr is not None:
            threshold = _plt_threshold(bytes(cfa.expr))
            kind, offset_ = (CFA_PLT, threshold) if threshold is not None else (CFA_UNSUPPORTED, 0)
        else:
            kind, offset_ = {RSP: (CFA_RSP, cfa.offset), RBP: (CFA_RBP, cfa.offset)}.get(
                cfa.reg, (CFA_UNSUPPORTED, 0)
            )
        rbp, ra = line.get(RBP), line.get(16)
        rows[line["pc"]] = Rule(
            kind,
            offset_,
            rbp.arg if rbp is not None and rbp.type == RegisterRule.OFFSET else None,
            ra is not None and ra.type == RegisterRule.UNDEFINED,
        )
    start = fde["initial_location"]
    return start, start + fde["address_range"], rows


@pytest.mark.parametrize(
    "path", ["/usr/bin/python3.11", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6"]
)
def test_call_frames_decode_as_pyelftools_does(path: str) -> None:
    """Entries of real binaries decoded here give pyelftools' rows (and those pyelftools cannot
    decode are decoded too)."""
    import io
    import random

    from elftools.dwarf.callframe import CallFrameInfo
    from elftools.dwarf.structs import DWARFStructs
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        table = UnwindTable.of(elf)
        eh_frame = elf.get_section_by_name(".eh_frame")
        data = eh_frame.data()
        cfi = CallFrameInfo(
            stream=io.BytesIO(data),
            size=len(data),
            address=eh_frame["sh_addr"],
            base_structs=DWARFStructs(little_endian=True, dwarf_format=32, address_size=8),
            for_eh_frame=True,
        )
        assert table is not None
        # pyelftools takes 0.2-0.45 ms an entry: a sample of them, the same every run.
        offsets = random.Random(11).sample([int(o) for o in table.fde_offsets], min(600, len(table)))
        for offset in offsets:
            entry = table._frames.entry(offset)
            try:
                start, end, rows = _pyelftools_rows(cfi, offset)
            except ValueError:  # pyelftools does not take DW_CFA_GNU_args_size (one entry of libc)
                continue
            assert (entry.start, entry.end) == (start, end)
            assert dict(zip(entry.pcs, entry.rules, strict=True)) == rows, hex(start)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(ELF) - 1), st.binary(min_size=1, max_size=64), st.integers(0, 1 << 20))
def test_fuzz_corrupt_unwind_tables_are_none_or_rules(offset: int, junk: bytes, pc: int) -> None:
    data = ELF[:offset] + junk + ELF[offset + len(junk) :]
    table = _unwind_table(data=data)
    if table is not None:
        rule = table.rule(pc)
        assert rule is None or isinstance(rule, Rule)


def test_python_frames_take_the_place_of_the_interpreter_loops_that_ran_them() -> None:
    from bpfscope.domains.profile.python import merge

    native = ["_start", "main", "EVAL", "PyObject_Call", "EVAL", "leaf"]
    # Innermost first; the first frame each run of the loop ran is its entry frame.
    python = [("inner_b", False), ("inner_a", True), ("outer_b", False), ("<module>", True)]
    merged = merge(native, python, lambda f: f == "EVAL")
    assert merged == ["_start", "main", "<module>", "outer_b", "PyObject_Call", "inner_a", "inner_b", "leaf"]
    # No interpreter frame unwound: the Python frames go on top.
    assert merge(["_start"], [("f", True)], lambda f: f == "EVAL") == ["_start", "f"]


def test_diff_compares_shares_not_counts() -> None:
    from bpfscope.domains.profile.diff import changes

    before = sample_profile()  # hot_a 60%, hot_b 40%
    after = Profile(kind="cpu")
    app = Thread(10, 11, "app")
    after.add(app, (MAIN, A), 300, 0)  # ten times the samples, hot_a 30%
    after.add(app, (MAIN, B), 700, 0)
    by_name = {c.function: c for c in changes(before, after)}
    assert by_name["hot_a"].delta == pytest.approx(-30) and by_name["hot_b"].delta == pytest.approx(30)
    assert by_name["main"].delta == 0
    assert changes(before, after)[0].function in ("hot_a", "hot_b")


def test_profile_diff_command(tmp_path: Path) -> None:
    import subprocess

    before, after, page = tmp_path / "a.folded", tmp_path / "b.folded", tmp_path / "d.html"
    before.write_text("app;main;hot_a 60\napp;main;hot_b 40\n")
    after.write_text("app;main;hot_a 30\napp;main;hot_b 70\n")
    run = [sys.executable, "-m", "bpfscope", "profile", "diff", str(before), str(after)]
    result = subprocess.run([*run, "-o", str(page)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:4] == ["hot_a", "60.0", "30.0", "-30.0"] for line in lines), lines
    data = json.loads(page.read_text().split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert data["diff"] and data["root"][1] == 100
    bad = subprocess.run([*run[:-1], str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
