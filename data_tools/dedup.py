"""Cross-shard exact-duplicate removal: the second step of make_shards.

While writing, each shard drops duplicates within itself and records (hash, row) of every sample
it kept in `_meta/<shard>.hashes.npy`. Once every shard exists, this step loads all those records
(24 bytes a sample: 12 GB at 500M pairs), keeps the earliest manifest row of each hash and rewrites
the shards that hold a later copy. "Earliest row wins" depends only on the manifest, never on
which task wrote what, so 1 task and N tasks end with the same bytes.

It is idempotent and safe to run twice at once (two tasks finishing together both may): the keep
rule never changes, a rewrite only removes keys that are gone anyway, and temp names are unique.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_tools.samples import sample_key
from data_tools.shard_io import META_DIR, ShardWriter, atomic_write_bytes, read_samples, temp_path

HASH_DTYPE = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("row", "<i8")])


def hashes_to_array(digests: list[bytes], rows: list[int]) -> np.ndarray:
    arr = np.zeros(len(rows), HASH_DTYPE)
    if rows:
        halves = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
        arr["h0"], arr["h1"], arr["row"] = halves[:, 0], halves[:, 1], rows
    return arr


def array_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def find_later_copies(arrays: list[np.ndarray]) -> dict[int, list[list[int]]]:
    """{shard position in `arrays`: [[row, row of the copy kept], ...]} for every sample whose
    hash appeared at an earlier manifest row."""
    lengths = [len(a) for a in arrays]
    if not sum(lengths):
        return {}
    allh = np.concatenate(arrays)
    shard_of = np.repeat(np.arange(len(arrays)), lengths)
    order = np.lexsort((allh["row"], allh["h1"], allh["h0"]))  # group by hash, earliest row first
    s = allh[order]
    same_as_prev = np.r_[False, (s["h0"][1:] == s["h0"][:-1]) & (s["h1"][1:] == s["h1"][:-1])]
    group_start = np.maximum.accumulate(np.where(same_as_prev, 0, np.arange(len(s))))
    out: dict[int, list[list[int]]] = {}
    for i in np.nonzero(same_as_prev)[0]:
        out.setdefault(int(shard_of[order[i]]), []).append([int(s["row"][i]), int(s["row"][group_start[i]])])
    for removals in out.values():
        removals.sort()
    return out


def _apply(out: str, name: str, removals: list[list[int]]) -> int:
    """Rewrite one shard without `removals`; returns how many samples it holds now."""
    tar_path, meta_path = Path(out) / name, Path(out) / META_DIR / f"{name}.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("duplicates_removed", []) == removals:
        return meta["written"] - len(removals)  # done by an earlier (or a concurrent) run
    drop = {sample_key(row) for row, _ in removals}
    tmp = temp_path(tar_path)
    try:
        with ShardWriter(tmp) as writer:
            for sample in read_samples(tar_path):
                if sample["__key__"] not in drop:
                    writer.write(sample)
        expected = meta["written"] - len(removals)
        if writer.samples != expected:
            raise RuntimeError(f"{name}: holds {writer.samples} samples after removing duplicates, its record "
                               f"says {expected}; delete {name} and re-run make_shards to rebuild it")
        meta["duplicates_removed"] = removals
        meta["tar_bytes"] = tmp.stat().st_size
        # Tar first, record second: a crash in between leaves an old record, and the next run
        # redoes this (now no-op) rewrite and fixes the record.
        tmp.replace(tar_path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return expected


def remove_cross_shard_duplicates(out: Path, names: list[str], workers: int = 1, log=print) -> int:
    """Apply the earliest-row-wins rule to the shards `names` (all shards of the dataset).
    Returns the number of samples removed."""
    arrays = [np.load(out / META_DIR / f"{name}.hashes.npy", allow_pickle=False) for name in names]
    later = find_later_copies(arrays)
    # Every shard whose record disagrees is visited, including ones that now need no removal.
    todo = []
    for i, name in enumerate(names):
        meta = json.loads((out / META_DIR / f"{name}.json").read_text())
        if meta.get("duplicates_removed", []) != later.get(i, []):
            todo.append((str(out), name, later.get(i, [])))
    removed = sum(len(r) for r in later.values())
    log(f"dedup: {removed} later copies of earlier samples across {len(later)} shards; "
        f"{len(todo)} shards to rewrite")
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
            list(pool.map(_apply, *zip(*todo)))
    else:
        for job in todo:
            _apply(*job)
    return removed
