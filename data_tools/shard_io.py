"""Byte-reproducible webdataset tars and crash-safe file writes, shared by the shard tools.

A shard is a plain tar whose members are `<key>.<ext>`; consecutive members with the same key form
one sample (webdataset's and img2dataset's layout). Every header field that could differ between
two runs (mtime, uid, owner names, mode) is fixed, so the same samples always give the same bytes.
"""

from __future__ import annotations

import io
import os
import socket
import tarfile
import time
from pathlib import Path
from typing import Iterator

TAR_MTIME = 0  # the demo shards use 0 too; a fixed value is what makes re-runs byte-identical
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the loader accepts as a sample's image
META_DIR = "_meta"  # make_shards' per-shard records, beside the shards
MEMBER_ORDER = ("jpg", "jpeg", "png", "webp", "txt", "json")


def available_cores() -> int:
    """Cores this process may run on (a Slurm allocation, a cpuset), not all the node's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


def split_member(name: str) -> tuple[str, str]:
    """'dir/0000000012.jpg' -> ('dir/0000000012', 'jpg'): the key ends at the first dot of the
    basename, as in webdataset."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


class ShardWriter:
    """Writes samples {"__key__": str, ext: bytes, ...} into one tar with fixed headers."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        exts = sorted((k for k in sample if not k.startswith("__")),
                      key=lambda e: (MEMBER_ORDER.index(e) if e in MEMBER_ORDER else len(MEMBER_ORDER), e))
        for ext in exts:
            data = sample[ext]
            info = tarfile.TarInfo(member_name(key, ext))
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; the file object stays ours to close
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename that follows must never publish unwritten data
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._file.close()  # no end-of-archive marker: a failed shard must not look complete


def read_samples(path: Path) -> Iterator[dict]:
    """Samples of a tar in order, {"__key__": key, ext: bytes, ...}. Raises tarfile.ReadError /
    EOFError on a corrupt or truncated file (callers decide what that means)."""
    # One open file throughout: a concurrent atomic replace of `path` must not mix two versions.
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        current: dict | None = None
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member(info.name)
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name} is truncated")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        # tarfile stops quietly at EOF on a member boundary, so a tar cut between two members
        # reads as shorter but fine. A complete one ends in at least two zero blocks.
        f.seek(tar.offset)
        tail = f.read()
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
            raise tarfile.ReadError(f"no end-of-archive marker after offset {tar.offset}: the file is truncated")
        if current is not None:
            yield current


def expand_shards(inputs: list[str]) -> list[Path]:
    """Directories (their `*.tar`, sorted), tar files and quoted glob patterns, in the given order.
    Raises FileNotFoundError naming an input that gives no shard."""
    import glob

    shards = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item))
        else:
            found = [path] if path.is_file() else []
        if not found:
            raise FileNotFoundError(f"{item!r}: no such shard, directory with *.tar files, or matching glob")
        shards += found
    return shards


def temp_path(final: Path) -> Path:
    """A hidden sibling unique to this host and process, so two writers never share a temp file
    and `*.tar` globs never see one."""
    return final.with_name(f".{final.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = temp_path(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def remove_stale_temps(final: Path, stale_after_s: float = 3600.0) -> None:
    """Remove temp files of `final` left by dead writers: ours on this host whose process is gone,
    or any not written to for `stale_after_s` (a writer on another host that died)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".{final.name}.tmp.*"):
        owner_host, _, pid = tmp.name.split(".tmp.", 1)[1].rpartition(".")
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        dead_here = owner_host == host and pid.isdigit() and not _alive(int(pid))
        if dead_here or age > stale_after_s:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker can linger as a zombie until it is reaped: that is dead too
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def map_shards(fn, paths: list[str], workers: int, *args) -> list:
    """fn(path, *args) for every shard, in spawned worker processes when there are several of both."""
    if workers > 1 and len(paths) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(min(workers, len(paths)), mp_context=get_context("spawn")) as pool:
            return list(pool.map(fn, paths, *([a] * len(paths) for a in args)))
    return [fn(p, *args) for p in paths]
