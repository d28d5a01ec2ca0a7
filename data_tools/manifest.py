"""Image-caption manifests (JSONL, CSV, TSV, Parquet; .gz for the text ones) read as numbered rows.

Rows are numbered 0.. across the given files in order. Shard k always holds rows
[k * shard_size, (k + 1) * shard_size), whoever writes it, which is what makes the output the same
for any number of tasks and workers. Every task streams the whole manifest but parses only the
rows of its own blocks (Parquet row groups it has no row in are not even read).
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_COLUMNS = ("image", "url", "image_url", "image_path", "path", "filepath", "file", "img")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
ID_COLUMNS = ("id", "key", "uid", "sample_id")
TAG_COLUMNS = ("tags",)
BAD_ROW = "__bad_row__"  # a record holding only this key could not be parsed; its value says why


class ManifestError(ValueError):
    """A manifest that cannot be used as given; the message says what to change."""


def manifest_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "tsv"),
                        (".parquet", "parquet")):
        if name.endswith(suffix):
            if fmt == "parquet" and path.name.lower().endswith(".gz"):
                break
            return fmt
    raise ManifestError(f"{path}: unknown manifest format; use .jsonl, .csv, .tsv (optionally .gz) or .parquet")


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def column_names(path: Path) -> list[str]:
    fmt = manifest_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            return next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}: first line is not JSON ({e})") from None
                if not isinstance(record, dict):
                    raise ManifestError(f"{path}: lines must be JSON objects, the first is {type(record).__name__}")
                return list(record)
    return []


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str
    id: str | None
    tags: str | None = None
    """Object tags (a list of strings, or one string of space-separated tags): written as the sample's
    ``tags`` member, ERNIE-ViL 2.0's tag view."""


def _pick(flag: str, given: str | None, candidates: tuple, names: list[str], path: Path, what: str) -> str | None:
    if given is not None:
        if given not in names:
            raise ManifestError(f"{flag} {given!r} is not a column of {path}; its columns are: "
                                f"{', '.join(names) or '(none)'}. Pass {flag} with one of them.")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and what:
        raise ManifestError(f"{path} has no {what} column (looked for {', '.join(candidates)}); its columns are: "
                            f"{', '.join(names) or '(none)'}. Name it with {flag}.")
    return found


def resolve_columns(paths: list[Path], image: str | None, caption: str | None, id_: str | None,
                    tags: str | None = None) -> Columns:
    """Columns named by the flags, or found by their usual names; checked against every file."""
    first = column_names(paths[0])
    cols = Columns(
        image=_pick("--image-col", image, IMAGE_COLUMNS, first, paths[0], "image path/URL"),
        caption=_pick("--caption-col", caption, CAPTION_COLUMNS, first, paths[0], "caption"),
        id=_pick("--id-col", id_, ID_COLUMNS, first, paths[0], ""),
        tags=_pick("--tags-col", tags, TAG_COLUMNS, first, paths[0], ""),
    )
    for path in paths[1:]:
        names = column_names(path)
        for flag, col in (("--image-col", cols.image), ("--caption-col", cols.caption), ("--id-col", cols.id),
                          ("--tags-col", cols.tags)):
            if col is not None and col not in names:
                raise ManifestError(f"{path} lacks column {col!r} that {paths[0]} has ({flag}); its columns are: "
                                    f"{', '.join(names)}. All manifest files must share the columns.")
    return cols


@dataclass(frozen=True)
class BlockSelection:
    """Which blocks of `shard_size` rows this task writes: block k when k % num_tasks == task_index
    and shard k is not finished yet. Striding (not contiguous ranges) needs no row count up front
    and spreads slow regions of the manifest over all tasks."""

    shard_size: int
    task_index: int = 0
    num_tasks: int = 1
    finished: frozenset = frozenset()

    def owns(self, block: int) -> bool:
        return block % self.num_tasks == self.task_index

    def wants_block(self, block: int) -> bool:
        return self.owns(block) and block not in self.finished

    def wants_row(self, row: int) -> bool:
        return self.wants_block(row // self.shard_size)

    def wants_any(self, lo: int, hi: int) -> bool:
        return any(self.wants_block(b) for b in range(lo // self.shard_size, (hi - 1) // self.shard_size + 1))


class ManifestReader:
    """Streams (row, record) pairs of wanted rows; `rows_seen` is the manifest's row count once
    the stream is exhausted."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.rows_seen = 0

    def blocks(self, sel: BlockSelection) -> Iterator[tuple[int, list[tuple[int, dict]]]]:
        """(block index, [(row, record), ...]) for each wanted block, in manifest order."""
        block, rows = None, []
        for row, record in self._rows(sel):
            b = row // sel.shard_size
            if b != block and rows:
                yield block, rows
                rows = []
            block = b
            rows.append((row, record))
        if rows:
            yield block, rows

    def _rows(self, sel: BlockSelection) -> Iterator[tuple[int, dict]]:
        self.rows_seen = 0
        for path in self.paths:
            reader = {"jsonl": self._jsonl, "csv": self._csv, "tsv": self._csv, "parquet": self._parquet}
            yield from reader[manifest_format(path)](path, sel)

    def _jsonl(self, path: Path, sel: BlockSelection):
        with _open_text(path) as f:
            for line in f:
                if not line.strip():
                    continue  # blank lines are not rows, so numbering survives a trailing newline
                row = self.rows_seen
                self.rows_seen += 1
                if not sel.wants_row(row):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    record = {BAD_ROW: f"invalid JSON ({e})"}
                if not isinstance(record, dict):
                    record = {BAD_ROW: f"a JSON {type(record).__name__}, not an object"}
                yield row, record

    def _csv(self, path: Path, sel: BlockSelection):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions are data, not an error
        delimiter = "\t" if manifest_format(path) == "tsv" else ","
        with _open_text(path) as f:
            for values in csv.DictReader(f, delimiter=delimiter):
                row = self.rows_seen
                self.rows_seen += 1
                if sel.wants_row(row):
                    if None in values:  # more fields than the header names
                        named = len(values) - 1
                        values = {BAD_ROW: f"{named + len(values[None])} fields, the header names {named}"}
                    yield row, values

    def _parquet(self, path: Path, sel: BlockSelection):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for group in range(pf.num_row_groups):
            first = self.rows_seen
            n = pf.metadata.row_group(group).num_rows
            self.rows_seen += n
            if n == 0 or not sel.wants_any(first, first + n):
                continue
            for offset, record in enumerate(pf.read_row_group(group).to_pylist()):
                if sel.wants_row(first + offset):
                    yield first + offset, record


def expand_manifest_paths(patterns: list[str]) -> list[Path]:
    """Paths in the given order; a glob pattern expands in sorted order (so every task numbers the
    rows the same way). Missing files raise ManifestError."""
    paths = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern))
            if not matches:
                raise ManifestError(f"--manifest {pattern!r} matches no file")
            paths += matches
        else:
            path = Path(pattern)
            if not path.is_file():
                raise ManifestError(f"--manifest {pattern!r}: no such file")
            paths.append(path)
    return paths


def read_all(paths: list[Path]) -> list[dict]:
    """Every record, in order (for tests and small tools)."""
    reader = ManifestReader(paths)
    return [record for _, rows in reader.blocks(BlockSelection(shard_size=1 << 30)) for _, record in rows]
