"""What every block I/O tool shares on the user-space side: disks and their device numbers, the -d DISK
filter, operation and flag letters, and the queue limits of a disk.

The BPF side is ``block.bpf.h``: device numbers arrive as the kernel encodes dev_t internally
(major << 20 | minor, not the user-space encoding of stat(2)), operations as the kernel's enum req_op and
flags in the header's own enum bs_rq_flag: their names are read from BTF, not copied here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from bpfscope.errors import BpfscopeError

if TYPE_CHECKING:
    from bpfscope.engine.bpf import BpfObject

SYS_BLOCK = Path("/sys/block")
SYS_CLASS_BLOCK = Path("/sys/class/block")

# include/linux/kdev_t.h: the kernel's internal dev_t.
MINORBITS = 20
MINORMASK = (1 << MINORBITS) - 1

# Words for request flags (enum bs_rq_flag's members, less BS_RQ_), as libbpf-tools biolatency -F prints
# them; the bits themselves come from BTF.
FLAG_WORDS = {
    "sync": "Sync",
    "meta": "Meta",
    "fua": "FUA",
    "preflush": "PreFlush",
    "rahead": "ReadAhead",
    "background": "Background",
    "prio": "Prio",
    "nowait": "NoWait",
}


@cache
def op_names() -> dict[int, str]:
    """enum req_op value -> its name as blkparse and biolatency -F show it (``Read``, ``SecureErase``),
    from the kernel's own BTF."""
    from bpfscope.engine.btf import kernel_btf

    members = kernel_btf().enum("req_op")
    return {
        value: "".join(word.capitalize() for word in name.removeprefix("REQ_OP_").split("_"))
        for name, value in members
        if name != "REQ_OP_LAST"
    }


@cache
def _bits(enum: str) -> dict[str, int]:
    from bpfscope.engine.btf import object_btf
    from bpfscope.runtime.schema import enum_names

    btf = object_btf(Path(__file__).with_name("biosnoop.bpf.o"))
    return {name: value for value, name in enum_names(btf.enum(enum)).items()}


def flag_bits() -> dict[str, int]:
    """enum bs_rq_flag (block.bpf.h): short name (``sync``) -> bit."""
    return _bits("bs_rq_flag")


def task_sources() -> dict[int, str]:
    """enum bs_task_from (block.bpf.h): value -> where a request's task was seen (``submitter``)."""
    return {value: name for name, value in _bits("bs_task_from").items()}


# A block tool's BPF programs, named the same in every tool, by the tracepoint each attaches to.
PROGRAMS = {
    "io_start": "block_io_start",
    "rq_insert": "block_rq_insert",
    "rq_issue": "block_rq_issue",
    "rq_merge": "block_rq_merge",
    "rq_complete": "block_rq_complete",
}


def tracepoint_exists(name: str) -> bool:
    from bpfscope.engine.system import ensure_tracefs

    return (ensure_tracefs() / "events" / "block" / name).is_dir()


def programs(queue_time: bool = True, submitter: bool = True) -> set[str]:
    """The programs a block tool loads (its ``autoload``): all of PROGRAMS, less rq_insert when the tool
    needs no queue time, less io_start when it needs no submitting process (one program fewer per I/O:
    measurable at 100k IOPS), and less those whose tracepoint this kernel lacks and that the tracking can
    do without (block_io_start came in Linux 6.5: tasks are then those seen at insert or issue)."""
    wanted = set(PROGRAMS)
    if not queue_time:
        wanted.discard("rq_insert")
    if not submitter:
        wanted.discard("io_start")
    for name in ("io_start", "rq_merge"):
        if not tracepoint_exists(PROGRAMS[name]):
            wanted.discard(name)
    return wanted


def unseen(obj: BpfObject) -> int:
    """Requests issued while tracing whose completion no program saw (block.bpf.h's bs_rq_unseen)."""
    return int(obj.bss["bs_rq_unseen"]) if "bs_rq_unseen" in obj.bss else 0


def unseen_note(obj: BpfObject) -> str:
    return f"{unseen(obj)} requests completed unseen (the kernel ran no program at their completion)"


def mkdev(major: int, minor: int) -> int:
    """dev_t as the kernel encodes it inside (what block.bpf.h's BS_MKDEV gives)."""
    return (major << MINORBITS) | minor


def dev_major(dev: int) -> int:
    return dev >> MINORBITS


def dev_minor(dev: int) -> int:
    return dev & MINORMASK


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _parse_dev(text: str | None) -> int | None:
    """``"254:0"`` (a sysfs ``dev`` file) -> kernel dev_t."""
    if not text or ":" not in text:
        return None
    major, minor = text.split(":", 1)
    return mkdev(int(major), int(minor))


@dataclass(frozen=True)
class Disk:
    name: str
    dev: int
    partition: bool
    parent: str | None = None  # the whole disk of a partition

    @property
    def major(self) -> int:
        return dev_major(self.dev)

    @property
    def minor(self) -> int:
        return dev_minor(self.dev)


def _scan(partitions: bool) -> dict[int, Disk]:
    found: dict[int, Disk] = {}
    root = SYS_CLASS_BLOCK if partitions else SYS_BLOCK
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        dev = _parse_dev(_read(entry / "dev"))
        if dev is None:
            continue
        is_part = (entry / "partition").exists()
        parent = entry.resolve().parent.name if is_part else None
        found[dev] = Disk(entry.name, dev, is_part, parent)
    return found


def disks(partitions: bool = False) -> dict[int, Disk]:
    """Block devices by kernel dev_t: whole disks, and with ``partitions`` their partitions too."""
    return _scan(partitions)


class DiskNames:
    """dev_t -> name for output, read from sysfs once and again when a device appears that is not known
    (a disk plugged in while tracing), at most once per unknown device."""

    def __init__(self) -> None:
        self._names = {dev: d.name for dev, d in disks(partitions=True).items()}
        self._missed: set[int] = set()

    def __call__(self, dev: int) -> str:
        name = self._names.get(dev)
        if name is not None:
            return name
        if dev not in self._missed:
            self._missed.add(dev)
            self._names.update({d: disk.name for d, disk in disks(partitions=True).items()})
            name = self._names.get(dev)
            if name is not None:
                return name
        # A device gone since (or never in sysfs): its numbers, as ls -l shows them.
        return "?" if dev == 0 else f"{dev_major(dev)}:{dev_minor(dev)}"


def resolve_disk(name: str, partitions: bool = False) -> Disk:
    """The disk a user named with -d: ``vda``, ``/dev/vda`` or ``254:0`` (major:minor).

    Unknown names are a one-line error that lists the disks there are.
    """
    wanted = name.removeprefix("/dev/")
    known = disks(partitions=True)
    match = None
    if ":" in wanted:
        try:
            dev = _parse_dev(wanted)
        except ValueError:
            dev = None
        match = known.get(dev) if dev is not None else None
    else:
        match = next((d for d in known.values() if d.name == wanted), None)
        if match is None and os.path.exists(name) and Path(name).is_block_device():
            rdev = Path(name).stat().st_rdev
            match = known.get(mkdev(os.major(rdev), os.minor(rdev)))
    if match is None:
        # Empty devices (unattached loop devices) are accepted but not worth listing.
        whole = sorted(
            d.name for d in known.values() if not d.partition and _read(SYS_BLOCK / d.name / "size") != "0"
        )
        raise BpfscopeError(f"unknown disk {name!r}", hint="disks here: " + (", ".join(whole) or "none"))
    if match.partition and not partitions:
        raise BpfscopeError(
            f"{match.name} is a partition; this tool shows whole disks", hint=f"use -d {match.parent}"
        )
    return match


def device_filter(name: str | None) -> dict[str, int]:
    """The .rodata value for block.bpf.h's -d filter (bs_targ_dev); 0 means every disk.

    A bio-based disk is refused: no request of it ever reaches the tracepoints, so the tool would show
    nothing and seem to say the disk is idle."""
    if name is None:
        return {"bs_targ_dev": 0}
    disk = resolve_disk(name)
    if not request_based(disk.name):
        raise BpfscopeError(
            f"{disk.name} is a bio-based device: its I/O never passes the block request tracepoints",
            hint="trace the disks it sits on, if any",
        )
    return {"bs_targ_dev": disk.dev}


def kernel_issue_clock(name: str | None) -> bool:
    """Whether the kernel keeps each request's issue time itself (rq->io_start_time_ns) on disk ``name``
    (every request-based disk when None): it does where the queue collects I/O statistics, which
    writeback throttling (wbt_lat_usec > 0) turns on, and where that time is the issue's (see
    :func:`plug_caches_time`)."""
    if plug_caches_time():
        return False
    names = [resolve_disk(name).name] if name else [d.name for d in disks().values() if request_based(d.name)]
    return bool(names) and all(
        (_read(SYS_BLOCK / n / "queue" / "wbt_lat_usec") or "0").strip() not in ("", "0") for n in names
    )


@cache
def plug_caches_time() -> bool:
    """Whether the block layer reads the clock once per plug (struct blk_plug has cur_ktime: Linux 6.9
    and later). blk_mq_start_request then sets rq->io_start_time_ns to the plug's cached time, taken when
    the submission began, before the request was even inserted (submit_bio itself plugs on recent
    kernels): not the issue time. Measured on 6.18 against block_rq_issue, it added 3.6 us to the
    mean of single 4k reads and 41 us (20%) to batches of 16."""
    from bpfscope.engine.btf import kernel_btf

    plug = kernel_btf().struct("blk_plug")
    return any(f.name == "cur_ktime" for f in plug.fields)


def rwbs(op: int, flags: int) -> str:
    """The letters blktrace, blkparse and biosnoop show (the kernel's blk_fill_rwbs): the operation
    (R, W, D, DE, F, N), led by F for a preflush, then F (FUA), A (readahead), S (sync), M (metadata)."""
    bits = flag_bits()
    name = op_names().get(op, "")
    out = "F" if flags & bits["preflush"] else ""
    out += {"Write": "W", "Discard": "D", "SecureErase": "DE", "Flush": "F", "Read": "R"}.get(name, "N")
    for word, letter in (("fua", "F"), ("rahead", "A"), ("sync", "S"), ("meta", "M")):
        if flags & bits[word]:
            out += letter
    return out


def op_name(op: int) -> str:
    return op_names().get(op, f"Op{op}")


def flag_list(flags: int) -> list[str]:
    """Flag names (``["Sync", "FUA"]``), in bit order."""
    return [FLAG_WORDS.get(name, name) for name, bit in flag_bits().items() if flags & bit]


def describe(op: int, flags: int) -> str:
    """Operation and flags in words, as libbpf-tools biolatency -F prints them: ``Sync-Write``."""
    return "-".join([*flag_list(flags), op_name(op)])


@dataclass(frozen=True)
class QueueLimits:
    name: str
    # Requests the I/O scheduler (or, without one, the driver's tags) lets in flight; None if bio-based.
    nr_requests: int | None
    scheduler: str | None  # the active I/O scheduler: "mq-deadline", "none"; None if bio-based
    hw_queues: int  # blk-mq hardware queues (0 if bio-based)
    logical_block_size: int
    max_sectors_kb: int | None
    rotational: bool


def queue_limits(name: str) -> QueueLimits:
    """The request queue limits of disk ``name`` from /sys/block/NAME/queue."""
    queue = SYS_BLOCK / name / "queue"
    if not queue.is_dir():
        raise BpfscopeError(f"no queue for disk {name!r} in {SYS_BLOCK}")

    def number(attr: str) -> int | None:
        text = _read(queue / attr)
        return int(text) if text and text.lstrip("-").isdigit() else None

    scheduler = None
    text = _read(queue / "scheduler")
    if text:
        # "none [mq-deadline] kyber bfq": the active one is in brackets.
        active = [w.strip("[]") for w in text.split() if w.startswith("[")]
        scheduler = active[0] if active else text.split()[0]
    mq = SYS_BLOCK / name / "mq"
    hw_queues = sum(1 for _ in mq.iterdir()) if mq.is_dir() else 0
    return QueueLimits(
        name=name,
        nr_requests=number("nr_requests"),
        scheduler=scheduler,
        hw_queues=hw_queues,
        logical_block_size=number("logical_block_size") or 512,
        max_sectors_kb=number("max_sectors_kb"),
        rotational=number("rotational") == 1,
    )


def request_based(name: str) -> bool:
    """Whether the block_rq_* tracepoints see this disk's I/O: request-based (blk-mq) disks do; bio-based
    ones (zram, device-mapper, md) have no requests, and no nr_requests."""
    return (SYS_BLOCK / name / "queue" / "nr_requests").exists()
