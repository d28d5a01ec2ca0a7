"""The shard index written by `data_tools/verify_shards.py`: sample counts per shard, for the loader.

    {"shards": [{"path": "train-000000.tar", "samples": 9731, "bytes": ...}, ...], "total": N,
     "broken": [{"path": ..., "error": ...}], "bad": [{"path": ..., "key": ..., "problem": ...}], ...}

Paths are relative to the index file. The loader uses the counts to know the samples per epoch and to
split shards across its data streams by sample count (see pipeline.py). An index that disagrees with
the shards is an error (a shard it does not list, a local shard whose size changed) or a warning (an
indexed shard gone from disk, a shard whose sample count turns out different when read), each naming
the fix: re-run verify_shards.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from wenlan.data.shards import _is_local

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"


@dataclass
class ShardCounts:
    """What an index says about the training shards, aligned with their list.

    samples[i]: good samples of shard i (0 for a shard the index marks broken); raw[i]: all samples in
    its tar (good + bad), or None where unknown; paths: the index file(s) used."""

    samples: list[int]
    raw: list[int | None]
    paths: list[str]
    broken: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.samples)

    def refresh_hint(self) -> str:
        dirs = sorted({os.path.dirname(p) or "." for p in self.paths})
        return " and ".join(f"`python data_tools/verify_shards.py {d}`" for d in dirs)


def find_index(urls: list[str]) -> list[str]:
    """The index files that cover `urls` automatically: INDEX_NAME in the directory of the shards, when
    every shard is a local file and each of their directories has one. A directory with shards but no
    index, beside directories that have one, is warned about and no index is used."""
    if not urls or not all(_is_local(u) for u in urls):
        return []
    dirs = sorted({os.path.dirname(os.path.abspath(u)) for u in urls})
    found = [os.path.join(d, INDEX_NAME) for d in dirs if os.path.isfile(os.path.join(d, INDEX_NAME))]
    if found and len(found) < len(dirs):
        lacking = [d for d in dirs if not os.path.isfile(os.path.join(d, INDEX_NAME))]
        log.warning("shard index: %s has none (but %s has): no index is used, so shards are split round robin and "
                    "the epoch size is unknown. Run `python data_tools/verify_shards.py DIR` on %s",
                    ", ".join(lacking[:3]), found[0], "each of them" if len(lacking) > 1 else "it")
        return []
    return found


def shard_counts(urls: list[str], index: str | None = "auto") -> ShardCounts | None:
    """Counts of `urls` from `index` ("auto": find_index; a path; None: none), or None without an index."""
    paths = find_index(urls) if index == "auto" else [index] if index else []
    return load_counts(paths, urls) if paths else None


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"shard index {path}: cannot be read ({e}). Re-run `python data_tools/verify_shards.py "
                         f"{os.path.dirname(path) or '.'}` to rewrite it") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"shard index {path}: not an index written by data_tools/verify_shards.py (no \"shards\" "
                         "list). Re-run verify_shards to rewrite it")
    return index


def _key(url: str) -> str:
    return os.path.realpath(url) if _is_local(url) else url


def load_counts(index_paths: list[str], urls: list[str]) -> ShardCounts:
    """Sample counts of `urls` from the index files; ValueError, naming the fix, where they disagree."""
    entries: dict[str, dict] = {}  # key -> {"samples", "bytes", "raw"} or {"broken": error}
    suffixes: dict[str, str] = {}  # "/relative/path" -> key, to match URL shards
    missing_on_disk = []
    local_shards = all(_is_local(u) for u in urls)  # else the index may well be a local copy for remote shards
    for path in index_paths:
        index = _read(path)
        base = os.path.dirname(os.path.abspath(path)) if _is_local(path) else path.rsplit("/", 1)[0]
        bad = Counter(b.get("path") for b in index.get("bad", []) if isinstance(b, dict))
        for kind in ("shards", "broken"):
            for e in index.get(kind, []):
                rel = e["path"]
                where = os.path.join(base, rel) if _is_local(path) else f"{base}/{rel}"
                info = ({"samples": int(e["samples"]), "bytes": e.get("bytes"), "raw": int(e["samples"]) + bad[rel]}
                        if kind == "shards" else {"broken": e.get("error", "broken")})
                entries[_key(where)] = info
                suffixes["/" + rel.replace(os.sep, "/").removeprefix("./")] = _key(where)
                if kind == "shards" and local_shards and not os.path.exists(where):
                    missing_on_disk.append(rel)
    counts = ShardCounts(samples=[], raw=[], paths=list(index_paths))
    unlisted, changed = [], []
    for url in urls:
        info = entries.get(_key(url))
        if info is None and not _is_local(url):
            info = next((entries[k] for s, k in suffixes.items() if url.endswith(s)), None)
        if info is None:
            unlisted.append(url)
            continue
        if "broken" in info:
            counts.broken.append(f"{url} ({info['broken']})")
            counts.samples.append(0)
            counts.raw.append(None)
            continue
        if _is_local(url) and info["bytes"] is not None and os.path.getsize(url) != info["bytes"]:
            changed.append(f"{url} ({os.path.getsize(url)} bytes, indexed with {info['bytes']})")
        counts.samples.append(info["samples"])
        counts.raw.append(info["raw"])
    hint = counts.refresh_hint()
    if unlisted:
        raise ValueError(f"shard index {', '.join(index_paths)} does not list {len(unlisted)} of the training shards "
                         f"(e.g. {', '.join(unlisted[:3])}): it is older than the shards. Re-run {hint} to rewrite "
                         "it, or move the index away to train without one")
    if changed:
        raise ValueError(f"{len(changed)} shard(s) changed since the index {', '.join(index_paths)} was written, so "
                         f"its sample counts are stale: {'; '.join(changed[:3])}. Re-run {hint} to rewrite it")
    if missing_on_disk:
        log.warning("shard index %s lists %d shard(s) that are not on disk (e.g. %s); they are simply not read. "
                    "Re-run %s to bring it up to date", ", ".join(index_paths), len(missing_on_disk),
                    ", ".join(missing_on_disk[:3]), hint)
    if counts.broken:
        log.warning("shard index marks %d training shard(s) broken: %s. They are read anyway (their readable samples "
                    "are used, the rest skipped and counted) and count as empty when balancing streams; repair or "
                    "remove them and re-run %s", len(counts.broken), "; ".join(counts.broken[:3]), hint)
    return counts


def balanced_split(order: list[int], samples: list[int], n_streams: int) -> list[list[int]]:
    """Shards (indices into `samples`) of each of `n_streams` streams: largest first, each to the stream
    holding the fewest samples so far (lowest stream on ties); among equal counts `order` decides, and
    each stream reads its shards in `order`. With all counts equal this is order[c::n_streams].
    Every stream's total is within the largest shard of every other's."""
    rank = {s: i for i, s in enumerate(order)}
    least = [(0, c) for c in range(n_streams)]  # a heap of (samples so far, stream)
    streams: list[list[int]] = [[] for _ in range(n_streams)]
    for s in sorted(order, key=lambda s: (-samples[s], rank[s])):
        total, c = heapq.heappop(least)
        streams[c].append(s)
        heapq.heappush(least, (total + samples[s], c))
    return [sorted(mine, key=rank.__getitem__) for mine in streams]
