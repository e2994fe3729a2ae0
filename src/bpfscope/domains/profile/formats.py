"""A profile in the formats other tools read: folded stacks (flamegraph.pl, inferno), pprof (go tool
pprof, Pyroscope, Parca), speedscope JSON, and a self-contained HTML flame graph (flamegraph.py).

pprof is protobuf (github.com/google/pprof, proto/profile.proto), gzip-compressed. Its message types
are built here from a descriptor (:func:`_pprof_messages`) and encoded by the protobuf library, so no
generated code is kept in the tree.
"""

from __future__ import annotations

import gzip
import json
import time
from functools import cache
from typing import Any

from bpfscope.domains.profile.profiles import Profile
from bpfscope.errors import BpfscopeError

FORMATS = ("folded", "pprof", "speedscope", "html")
# What a file name's ending says about the format wanted (-o FILE without --format).
EXTENSIONS = {
    ".folded": "folded",
    ".txt": "folded",
    ".pb.gz": "pprof",
    ".pprof": "pprof",
    ".pb": "pprof",
    ".speedscope.json": "speedscope",
    ".json": "speedscope",
    ".html": "html",
    ".htm": "html",
}


def format_for(path: str | None, wanted: str | None) -> str:
    if wanted:
        return wanted
    if path:
        for ending, fmt in EXTENSIONS.items():
            if path.endswith(ending):
                return fmt
    return "folded"


def folded(profile: Profile, with_comm: bool = True) -> str:
    """One line per stack: frames root first, separated by ``;``, then the value."""
    lines = [f"{';'.join(stack)} {n}" for stack, n in sorted(profile.stacks(with_comm).items()) if n]
    return "\n".join(lines) + ("\n" if lines else "")


def parse_folded(text: str, kind: str = "cpu") -> Profile:
    """A profile from folded stacks (``a;b;c 12`` lines); the first frame is taken as the process name."""
    from bpfscope.domains.profile.profiles import Thread
    from bpfscope.domains.profile.symbols import Frame

    profile = Profile(kind=kind)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            value = int(count)
        except ValueError:
            raise BpfscopeError(
                f"line {number} of the folded stacks does not end with a count: {line[:60]!r}"
            ) from None
        names = stack.split(";")
        frames = tuple(
            Frame(
                n.removesuffix("_[k]"),
                "[kernel]" if n.endswith("_[k]") else "",
                "kernel" if n.endswith("_[k]") else "user",
            )
            for n in names[1:]
        )
        key = (Thread(0, 0, names[0]), frames)
        if kind == "cpu":
            profile.samples[key] += value
        else:
            profile.samples[key] += 1
            profile.weights[key] += value * 1000
    return profile


def speedscope(profile: Profile, name: str = "bpfscope profile") -> str:
    """speedscope's file format (https://www.speedscope.app/file-format-schema.json): one sampled
    profile, frames shared."""
    index: dict[tuple[str, str], int] = {}
    frames: list[dict[str, str]] = []
    samples: list[list[int]] = []
    weights: list[int] = []
    for stack, value in sorted(profile.stacks().items()):
        row = []
        for depth, fn in enumerate(stack):
            key = (fn, "process" if depth == 0 else "")
            if key not in index:
                index[key] = len(frames)
                frames.append({"name": fn})
            row.append(index[key])
        samples.append(row)
        weights.append(value)
    doc = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": [
            {
                "type": "sampled",
                "name": name,
                "unit": "none" if profile.kind == "cpu" else "microseconds",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
        "name": name,
        "exporter": "bpfscope",
    }
    return json.dumps(doc)


# --- pprof ---------------------------------------------------------------------------------------------
# profile.proto, message by message: (field name, number, type, repeated, message type name).
_PPROF_FIELDS: dict[str, list[tuple[str, int, str, bool, str]]] = {
    "Profile": [
        ("sample_type", 1, "message", True, "ValueType"),
        ("sample", 2, "message", True, "Sample"),
        ("mapping", 3, "message", True, "Mapping"),
        ("location", 4, "message", True, "Location"),
        ("function", 5, "message", True, "Function"),
        ("string_table", 6, "string", True, ""),
        ("drop_frames", 7, "int64", False, ""),
        ("keep_frames", 8, "int64", False, ""),
        ("time_nanos", 9, "int64", False, ""),
        ("duration_nanos", 10, "int64", False, ""),
        ("period_type", 11, "message", False, "ValueType"),
        ("period", 12, "int64", False, ""),
        ("comment", 13, "int64", True, ""),
        ("default_sample_type", 14, "int64", False, ""),
    ],
    "ValueType": [("type", 1, "int64", False, ""), ("unit", 2, "int64", False, "")],
    "Sample": [
        ("location_id", 1, "uint64", True, ""),
        ("value", 2, "int64", True, ""),
        ("label", 3, "message", True, "Label"),
    ],
    "Label": [
        ("key", 1, "int64", False, ""),
        ("str", 2, "int64", False, ""),
        ("num", 3, "int64", False, ""),
        ("num_unit", 4, "int64", False, ""),
    ],
    "Mapping": [
        ("id", 1, "uint64", False, ""),
        ("memory_start", 2, "uint64", False, ""),
        ("memory_limit", 3, "uint64", False, ""),
        ("file_offset", 4, "uint64", False, ""),
        ("filename", 5, "int64", False, ""),
        ("build_id", 6, "int64", False, ""),
        ("has_functions", 7, "bool", False, ""),
        ("has_filenames", 8, "bool", False, ""),
        ("has_line_numbers", 9, "bool", False, ""),
        ("has_inline_frames", 10, "bool", False, ""),
    ],
    "Location": [
        ("id", 1, "uint64", False, ""),
        ("mapping_id", 2, "uint64", False, ""),
        ("address", 3, "uint64", False, ""),
        ("line", 4, "message", True, "Line"),
        ("is_folded", 5, "bool", False, ""),
    ],
    "Line": [("function_id", 1, "uint64", False, ""), ("line", 2, "int64", False, "")],
    "Function": [
        ("id", 1, "uint64", False, ""),
        ("name", 2, "int64", False, ""),
        ("system_name", 3, "int64", False, ""),
        ("filename", 4, "int64", False, ""),
        ("start_line", 5, "int64", False, ""),
    ],
}


@cache
def _pprof_messages() -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    types = descriptor_pb2.FieldDescriptorProto
    kinds = {
        "message": types.TYPE_MESSAGE,
        "string": types.TYPE_STRING,
        "int64": types.TYPE_INT64,
        "uint64": types.TYPE_UINT64,
        "bool": types.TYPE_BOOL,
    }
    file = descriptor_pb2.FileDescriptorProto(
        name="bpfscope_pprof.proto", package="perftools.profiles", syntax="proto3"
    )
    for message, fields in _PPROF_FIELDS.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, repeated, type_name in fields:
            f = proto.field.add(name=name, number=number, type=kinds[kind])
            f.label = types.LABEL_REPEATED if repeated else types.LABEL_OPTIONAL
            if type_name:
                f.type_name = f".perftools.profiles.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"perftools.profiles.{name}"))
        for name in _PPROF_FIELDS
    }


class _Strings:
    def __init__(self) -> None:
        self.table = [""]
        self.index = {"": 0}

    def __call__(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.table)
            self.table.append(text)
        return self.index[text]


def pprof(profile: Profile) -> bytes:
    """The profile as gzip-compressed pprof protobuf, with a mapping per binary (its build-id), a
    function and a location per named frame, and pid, tid, comm, cgroup and container labels."""
    messages = _pprof_messages()
    out = messages["Profile"]()
    s = _Strings()
    if profile.kind == "cpu":
        out.sample_type.add(type=s("samples"), unit=s("count"))
        out.sample_type.add(type=s("cpu"), unit=s("nanoseconds"))
        out.period_type.type, out.period_type.unit = s("cpu"), s("nanoseconds")
        out.period = 1_000_000_000 // profile.frequency_hz if profile.frequency_hz else 0
    else:
        out.sample_type.add(type=s("blocks"), unit=s("count"))
        out.sample_type.add(type=s("offcpu"), unit=s("nanoseconds"))
        out.period_type.type, out.period_type.unit = s("offcpu"), s("nanoseconds")
        out.period = 1
    mappings: dict[tuple[str, str], int] = {}
    locations: dict[Any, int] = {}
    for (thread, frames), samples in profile.samples.items():
        ids = []
        for frame in reversed(frames):  # pprof lists a sample's locations leaf first
            if frame not in locations:
                mkey = (frame.module, frame.build_id)
                if mkey not in mappings:
                    mappings[mkey] = len(mappings) + 1
                    out.mapping.add(
                        id=mappings[mkey],
                        filename=s(frame.module),
                        build_id=s(frame.build_id),
                        has_functions=True,
                    )
                fid = len(locations) + 1
                out.function.add(
                    id=fid, name=s(frame.function), system_name=s(frame.function), filename=s(frame.module)
                )
                location = out.location.add(id=fid, mapping_id=mappings[mkey])
                location.line.add(function_id=fid)
                locations[frame] = fid
            ids.append(locations[frame])
        sample = out.sample.add(location_id=ids, value=[samples, profile.weights[(thread, frames)]])
        sample.label.add(key=s("pid"), num=thread.pid)
        sample.label.add(key=s("tid"), num=thread.tid)
        sample.label.add(key=s("comm"), str=s(thread.comm))
        if thread.cgroup:
            sample.label.add(key=s("cgroup"), num=thread.cgroup)
        if thread.container:
            sample.label.add(key=s("container"), str=s(thread.container))
    out.string_table.extend(s.table)
    start = profile.start_ts or time.time()
    out.time_nanos = int(start * 1e9)
    out.duration_nanos = int(profile.duration_s * 1e9)
    return gzip.compress(out.SerializeToString())


def parse_pprof(data: bytes) -> Profile:
    """A profile from pprof (gzip-compressed or not), as bpfscope and other profilers write it."""
    from google.protobuf.message import DecodeError

    from bpfscope.domains.profile.profiles import Thread
    from bpfscope.domains.profile.symbols import Frame

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        message = _pprof_messages()["Profile"]()
        message.ParseFromString(raw)
    except (OSError, EOFError, DecodeError, ValueError) as exc:
        raise BpfscopeError(f"not a pprof profile: {exc}") from None
    if not message.sample_type:
        raise BpfscopeError("not a pprof profile: it declares no sample type")
    strings = list(message.string_table)

    def text(i: int) -> str:
        return strings[i] if 0 <= i < len(strings) else ""

    types = [text(t.type) for t in message.sample_type]
    kind = "offcpu" if "offcpu" in types else "cpu"
    functions = {f.id: f for f in message.function}
    mappings = {m.id: m for m in message.mapping}
    frames: dict[int, Frame] = {}
    for loc in message.location:
        m = mappings.get(loc.mapping_id)
        module = text(m.filename) if m else ""
        build_id = text(m.build_id) if m else ""
        fn = functions.get(loc.line[-1].function_id) if loc.line else None
        name = text(fn.name) if fn else f"[{module}+0x{loc.address:x}]"
        frames[loc.id] = Frame(name, module, "kernel" if module == "[kernel]" else "user", build_id)
    profile = Profile(kind=kind, duration_s=message.duration_nanos / 1e9, start_ts=message.time_nanos / 1e9)
    if kind == "cpu" and message.period:
        profile.frequency_hz = round(1e9 / message.period)
    for sample in message.sample:
        labels = {text(label.key): (text(label.str) if label.str else label.num) for label in sample.label}
        thread = Thread(
            int(labels.get("pid", 0) or 0),
            int(labels.get("tid", 0) or 0),
            str(labels.get("comm", "") or ""),
            int(labels.get("cgroup", 0) or 0),
            labels.get("container") or None,  # type: ignore[arg-type]
        )
        stack = tuple(
            frames.get(i, Frame(f"[location {i}]", "", "user")) for i in reversed(sample.location_id)
        )
        values = [*list(sample.value), 0, 0]
        profile.samples[(thread, stack)] += values[0]
        profile.weights[(thread, stack)] += values[1]
    return profile


def render(profile: Profile, fmt: str, title: str = "bpfscope profile") -> bytes:
    from bpfscope.domains.profile import flamegraph

    if fmt == "folded":
        return folded(profile).encode()
    if fmt == "pprof":
        return pprof(profile)
    if fmt == "speedscope":
        return speedscope(profile, title).encode()
    if fmt == "html":
        return flamegraph.html(profile, title).encode()
    raise BpfscopeError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def load(path: str) -> Profile:
    """A profile from a file bpfscope (or another profiler) wrote: pprof or folded stacks."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BpfscopeError(f"cannot read profile {path}: {exc.strerror}") from None
    if data[:2] == b"\x1f\x8b" or path.endswith((".pb", ".pprof", ".pb.gz")):
        return parse_pprof(data)
    try:
        return parse_folded(data.decode())
    except UnicodeDecodeError:
        raise BpfscopeError(f"{path} is neither pprof nor folded stacks") from None
