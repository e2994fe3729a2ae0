"""A component's resource limits, as its cgroups hold them: memory, disk read IOPS, CPU.

--verify emulates a change (more RAM, more IOPS, more CPU) by raising a limit the component already runs
under, then puts it back. Where a controller is mounted decides the file: cgroup v2 (``memory.max``,
``io.max``, ``cpu.max``) or the v1 hierarchies of a hybrid machine (``memory.limit_in_bytes``,
``blkio.throttle.read_iops_device``, ``cpu.cfs_quota_us``). A component's cgroup in each is read from one
of its processes (/proc/PID/cgroup).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from bpfscope.errors import BpfscopeError

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 62  # what a v1 memory limit reads when none is set (rounded to pages: 2**63 - 4096)


def controllers() -> dict[str, Path]:
    """Each controller (memory, blkio or io, cpu) -> the root of the hierarchy it is mounted in."""
    out: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "cgroup":
            for option in parts[3].split(","):
                if option in ("memory", "blkio", "cpu"):
                    out[option] = Path(parts[1])
        elif parts[2] == "cgroup2":
            enabled = (Path(parts[1]) / "cgroup.controllers").read_text().split()
            for controller in enabled:
                if controller in ("memory", "io", "cpu"):
                    out.setdefault(controller, Path(parts[1]))
    return out


def _v2(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


def disk_of(path: str | Path) -> str:
    """MAJOR:MINOR of the whole disk a file is on (throttles apply to disks, not partitions)."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    if (sys_dev / "partition").exists():
        sys_dev = sys_dev.parent
    return (sys_dev / "dev").read_text().strip()


@dataclass
class Limits:
    """The cgroup directories of one component, per controller."""

    memory: Path | None
    io: Path | None
    cpu: Path | None

    @classmethod
    def of_pid(cls, pid: int) -> Limits:
        mounts = controllers()
        paths: dict[str, str] = {}
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            raise BpfscopeError(f"no process {pid} to find the cgroups of") from None
        for line in text.splitlines():
            _, names, path = line.split(":", 2)
            for name in names.split(",") if names else ["cgroup2"]:
                paths[name] = path
        found: dict[str, Path | None] = {}
        for key, names in (("memory", ("memory",)), ("io", ("blkio", "io")), ("cpu", ("cpu",))):
            found[key] = None
            for name in names:
                root = mounts.get(name)
                if root is None:
                    continue
                path = paths.get(name if not _v2(root) else "cgroup2")
                if path is not None:
                    found[key] = root / path.lstrip("/")
                break
        return cls(found["memory"], found["io"], found["cpu"])

    @classmethod
    def of_dir(cls, name: str) -> Limits:
        """The cgroup ``name`` (a path below each hierarchy's root) in every controller's hierarchy."""
        mounts = controllers()

        def where(*keys: str) -> Path | None:
            root = next((mounts[k] for k in keys if k in mounts), None)
            return None if root is None else root / name.lstrip("/")

        return cls(where("memory"), where("blkio", "io"), where("cpu"))

    # --- memory ------------------------------------------------------------------------------------
    def memory_bytes(self) -> int | None:
        """The memory limit, or None when there is none."""
        if self.memory is None:
            return None
        if (self.memory / "memory.max").exists():
            text = (self.memory / "memory.max").read_text().strip()
            return None if text == "max" else int(text)
        value = int((self.memory / "memory.limit_in_bytes").read_text())
        return None if value >= UNLIMITED else value

    def set_memory_bytes(self, limit: int | None) -> None:
        assert self.memory is not None
        if (self.memory / "memory.max").exists():
            (self.memory / "memory.max").write_text("max" if limit is None else str(limit))
        else:
            (self.memory / "memory.limit_in_bytes").write_text("-1" if limit is None else str(limit))

    def memory_used(self) -> int:
        assert self.memory is not None
        name = "memory.current" if (self.memory / "memory.current").exists() else "memory.usage_in_bytes"
        return int((self.memory / name).read_text())

    def _stat(self) -> dict[str, int]:
        assert self.memory is not None
        return {
            k: int(v)
            for k, v in (line.split() for line in (self.memory / "memory.stat").read_text().splitlines())
        }

    def refaults(self) -> int | None:
        """File pages read back into this cgroup's page cache after it had evicted them (the kernel's
        workingset refaults, this cgroup and those below it): each is a read a larger cache would have
        served, as long as the kernel still remembered the eviction (its shadow entries, which it keeps
        for a few times the cgroup's memory). None where the kernel does not count them."""
        if self.memory is None:
            return None
        stat = self._stat()
        # v1 prints its own counters and, prefixed total_, the hierarchy's; v2's are hierarchical.
        value = stat.get("total_workingset_refault_file", stat.get("workingset_refault_file"))
        return None if value is None else value

    def working_set(self) -> int:
        """Usage less the inactive file pages (what the kernel can drop first), as the VPA reads it."""
        stat = self._stat()
        inactive = stat.get("inactive_file", stat.get("total_inactive_file", 0))
        return max(0, self.memory_used() - inactive)

    def open_files(self, disk: str) -> list[Path]:
        """The regular files the memory cgroup's processes hold open on a disk (MAJOR:MINOR): what its
        page cache holds when it is warm."""
        assert self.memory is not None
        files: dict[tuple[int, int], Path] = {}
        for pid in (self.memory / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError, ValueError):
                        path = fd.resolve(strict=True)
                        st = path.stat()
                        if (
                            stat.S_ISREG(st.st_mode)
                            and (st.st_dev, st.st_ino) not in files
                            and disk_of(path) == disk
                        ):
                            files[(st.st_dev, st.st_ino)] = path
        return sorted(files.values())

    def warm(self, files: list[Path], budget: int) -> int:
        """Read ``files`` (up to ``budget`` bytes) into the page cache from a child in this memory cgroup,
        so that their pages are charged to it; the bytes read. A child of this memory cgroup only: on a
        hybrid machine its blkio throttle does not slow the reading down."""
        assert self.memory is not None
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            total = 0
            with contextlib.suppress(BaseException):
                os.close(read)
                (self.memory / "cgroup.procs").write_text(str(os.getpid()))
                for path in files:
                    with contextlib.suppress(OSError), open(path, "rb", buffering=0) as f:
                        while total < budget and (chunk := f.read(1 << 20)):
                            total += len(chunk)
                os.write(write, str(total).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as r:
            text = r.read()
        os.waitpid(pid, 0)
        return int(text or 0)

    # --- disk reads --------------------------------------------------------------------------------
    def read_iops(self, disk: str) -> int | None:
        """The read IOPS cap on a disk (MAJOR:MINOR), or None."""
        if self.io is None:
            return None
        if (self.io / "io.max").exists():
            for line in (self.io / "io.max").read_text().splitlines():
                dev, *pairs = line.split()
                if dev == disk:
                    values = dict(p.split("=") for p in pairs)
                    return None if values.get("riops", "max") == "max" else int(values["riops"])
            return None
        for line in (self.io / "blkio.throttle.read_iops_device").read_text().splitlines():
            dev, value = line.split()
            if dev == disk:
                return int(value)
        return None

    def set_read_iops(self, disk: str, iops: int | None) -> None:
        assert self.io is not None
        if (self.io / "io.max").exists():
            (self.io / "io.max").write_text(f"{disk} riops={'max' if iops is None else iops}")
        else:
            # 0 removes a v1 throttle.
            (self.io / "blkio.throttle.read_iops_device").write_text(f"{disk} {iops or 0}")

    # --- CPU ---------------------------------------------------------------------------------------
    def cpus(self) -> float | None:
        """The CPU quota in CPUs (quota / period), or None."""
        if self.cpu is None:
            return None
        if (self.cpu / "cpu.max").exists():
            quota, period = (self.cpu / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota = int((self.cpu / "cpu.cfs_quota_us").read_text())
        period = int((self.cpu / "cpu.cfs_period_us").read_text())
        return None if quota < 0 else quota / period

    def set_cpus(self, cpus: float | None) -> None:
        assert self.cpu is not None
        if (self.cpu / "cpu.max").exists():
            period = 100_000
            (self.cpu / "cpu.max").write_text("max" if cpus is None else f"{int(cpus * period)} {period}")
        else:
            period = int((self.cpu / "cpu.cfs_period_us").read_text())
            (self.cpu / "cpu.cfs_quota_us").write_text("-1" if cpus is None else str(int(cpus * period)))
