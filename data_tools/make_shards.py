"""Manifest of images + captions -> webdataset tar shards: parallel, restartable, nothing lost silently.

    python data_tools/make_shards.py --manifest pairs.parquet --out data/pairs \\
        [--shard-size 10000] [--workers 16] [--task-index I --num-tasks N] [--max-side 512] [--t2s]

Shard k (`{prefix}-{k:06d}.tar`) holds the clean samples of manifest rows [k*S, (k+1)*S), S =
--shard-size; rows that fail a check are counted by reason (so shards hold up to S samples; run
verify_shards.py for the exact counts). Task I of N writes the shards k with k % N == I, so a Slurm
array splits the work with no coordination, and the bytes do not depend on N or --workers.

Each shard is written under a temp name and renamed when complete: a re-run skips finished shards
and redoes the rest. When a task sees every shard finished, it removes exact duplicates (same image
bytes + caption) across shards, keeping the earliest manifest row (see data_tools/dedup.py), and
writes `{out}/stats.json`. Each task run writes `{out}/stats/task-IIII-of-NNNN.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.dedup import array_bytes, hashes_to_array, remove_cross_shard_duplicates
from data_tools.manifest import (BlockSelection, Columns, ManifestError, ManifestReader, expand_manifest_paths,
                                 manifest_format, resolve_columns)
from data_tools.samples import (REASONS, CaptionCleaner, CleanOptions, Fetcher, FetchOptions, Rejected, build_sample,
                                prepare_row)
from data_tools.shard_io import (META_DIR, ShardWriter, atomic_write_bytes, available_cores, remove_stale_temps,
                                 temp_path)

FORMAT_VERSION = 1  # bump when the bytes written for the same input change


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to turn a block of rows into a shard."""

    out: str
    prefix: str
    shard_size: int
    columns: Columns
    clean: CleanOptions
    fetch: FetchOptions


def shard_name(prefix: str, block: int) -> str:
    return f"{prefix}-{block:06d}.tar"


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- worker side

_W = SimpleNamespace()  # per-process state, set once by _init_worker


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the main process dies, so a killed run leaves no orphan
    still writing (best effort: a no-op elsewhere)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _init_worker(spec: ShardSpec, counter, in_child: bool = True) -> None:
    from PIL import Image

    if in_child:
        _die_with_parent()
        # PIL then refuses images above twice this outright (DecompressionBombError, counted as
        # too_many_pixels); clean_image rejects anything above it before decoding either way. Only
        # in a worker: in-process (--workers 0) it would change PIL for the caller too.
        Image.MAX_IMAGE_PIXELS = spec.clean.max_pixels
    _W.spec, _W.counter = spec, counter
    _W.cleaner = CaptionCleaner(spec.clean)
    _W.fetcher = Fetcher(spec.fetch, spec.clean.max_file_bytes)
    _W.threads = ThreadPoolExecutor(spec.fetch.threads, thread_name_prefix="fetch")


def _ordered_map(pool: ThreadPoolExecutor, fn, items: list, window: int):
    """fn over items on the pool, results in input order, at most `window` in flight (bounded memory)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    for fut in pending:
        yield fut.result()


def _read_row(item):
    """(row, Prepared, bytes) or (row, Rejected, None); runs on a fetch thread."""
    row, record = item
    try:
        prepared = prepare_row(row, record, _W.spec.columns, _W.cleaner)
        return row, prepared, _W.fetcher(prepared.source)
    except Rejected as r:
        return row, r, None


def write_shard(block: int, rows: list[tuple[int, dict]]) -> dict:
    """Write shard `block` from its rows; returns its record (also saved in _meta/)."""
    spec = _W.spec
    out = Path(spec.out)
    name = shard_name(spec.prefix, block)
    final, meta_dir = out / name, out / META_DIR
    remove_stale_temps(final)
    counts, rejected_log = Counter(), []
    first_row_of = {}  # content hash -> row written, for duplicates within this shard
    kept_hashes, kept_rows = [], []
    bytes_in = done_since_tick = 0
    tmp = temp_path(final)
    try:
        with ShardWriter(tmp) as writer:
            for row, prepared, data in _ordered_map(_W.threads, _read_row, rows, 4 * spec.fetch.threads):
                try:
                    if isinstance(prepared, Rejected):
                        raise prepared
                    bytes_in += len(data)
                    sample, digest = build_sample(prepared, data, spec.clean)
                    if digest in first_row_of:
                        raise Rejected("duplicate", f"same image bytes and caption as row {first_row_of[digest]}")
                    first_row_of[digest] = row
                    writer.write(sample)
                    kept_hashes.append(digest)
                    kept_rows.append(row)
                except Rejected as r:
                    counts[r.reason] += 1
                    rejected_log.append({"row": row, "reason": r.reason, "detail": r.detail})
                done_since_tick += 1
                if done_since_tick >= 32:
                    _tick(done_since_tick)
                    done_since_tick = 0
        _tick(done_since_tick)
        meta = {
            "shard": name, "block": block, "first_row": block * spec.shard_size, "rows_read": len(rows),
            "written": writer.samples, "rejected": dict(sorted(counts.items())), "bytes_in": bytes_in,
            "tar_bytes": tmp.stat().st_size, "duplicates_removed": [], "format_version": FORMAT_VERSION,
        }
        assert meta["written"] + sum(counts.values()) == len(rows)
        # Records first, tar last: a shard under its final name always has its records.
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected_log)
        atomic_write_bytes(meta_dir / f"{name}.rejected.jsonl", lines.encode("utf-8"))
        atomic_write_bytes(meta_dir / f"{name}.hashes.npy", array_bytes(hashes_to_array(kept_hashes, kept_rows)))
        atomic_write_bytes(meta_dir / f"{name}.json", _json_bytes(meta))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _tick(n: int) -> None:
    if n:
        with _W.counter.get_lock():
            _W.counter.value += n


# ----------------------------------------------------------------------------- main side

class _InlineExecutor:
    """--workers 0: run shards in this process (debugging, profiling)."""

    def submit(self, fn, *args):
        fut = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, **_):
        pass


def finished_blocks(out: Path, prefix: str) -> set[int]:
    done = set()
    for path in out.glob(f"{prefix}-*.tar"):
        number = path.name[len(prefix) + 1:-len(".tar")]
        if number.isdigit() and (out / META_DIR / f"{path.name}.json").is_file():
            done.add(int(number))
    return done


def check_config(out: Path, record: dict) -> None:
    """The first run records what decides the bytes; a later run (any task) must match it, or
    shards made two ways would be mixed silently."""
    path = out / META_DIR / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            shown = "; ".join(f"{k}: was {old.get(k)!r}, now {record.get(k)!r}" for k in diff)
            raise SystemExit(f"error: {out} holds shards made with other settings ({shown}). "
                             f"Use the same flags to resume, or another --out.")
    else:
        atomic_write_bytes(path, _json_bytes(record))


def load_metas(out: Path, names: list[str]) -> list[dict]:
    return [json.loads((out / META_DIR / f"{n}.json").read_text()) for n in names]


def totals(metas: list[dict]) -> dict:
    """Counts over shard records, after cross-shard dedup where it has run."""
    rejected = Counter({reason: 0 for reason in REASONS})
    read = written = bytes_in = tar_bytes = 0
    for m in metas:
        read += m["rows_read"]
        written += m["written"] - len(m["duplicates_removed"])
        rejected.update(m["rejected"])
        rejected["duplicate"] += len(m["duplicates_removed"])
        bytes_in += m["bytes_in"]
        tar_bytes += m["tar_bytes"]
    return {"read": read, "written": written, "rejected": dict(rejected), "rejected_total": sum(rejected.values()),
            "accounted": read == written + sum(rejected.values()), "bytes_in": bytes_in, "tar_bytes": tar_bytes}


def finish_dataset(out: Path, prefix: str, num_blocks: int, manifest_rows: int, workers: int, log=print) -> dict:
    """Cross-shard dedup over all shards, then the dataset-wide stats.json."""
    names = [shard_name(prefix, b) for b in range(num_blocks)]
    remove_cross_shard_duplicates(out, names, workers, log=log)
    summary = {"manifest_rows": manifest_rows, "shards": num_blocks, **totals(load_metas(out, names))}
    atomic_write_bytes(out / "stats.json", _json_bytes(summary))
    return summary


def run(args) -> int:
    from tqdm import tqdm

    paths = expand_manifest_paths(args.manifest)
    columns = resolve_columns(paths, args.image_col, args.caption_col, args.id_col, args.tags_col)
    out = Path(args.out)
    (out / META_DIR).mkdir(parents=True, exist_ok=True)
    (out / "stats").mkdir(exist_ok=True)
    clean = CleanOptions(args.min_caption_chars, args.max_caption_chars, args.t2s, args.max_pixels, args.min_side,
                         args.max_side, args.jpeg_quality, args.max_file_bytes)
    image_root = str(Path(args.image_root or paths[0].parent).resolve())  # one spelling for every task
    spec = ShardSpec(str(out), args.prefix, args.shard_size, columns, clean,
                     FetchOptions(image_root, args.timeout, args.retries, args.fetch_threads))
    check_config(out, {
        "format_version": FORMAT_VERSION, "prefix": args.prefix, "shard_size": args.shard_size,
        "manifest": [{"name": p.name, "bytes": p.stat().st_size} for p in paths],
        "columns": asdict(columns), "clean": asdict(clean), "image_root": image_root,
    })
    if args.t2s:
        CaptionCleaner(clean)  # fail here, once, if OpenCC is missing

    stats_path = out / "stats" / f"task-{args.task_index:04d}-of-{args.num_tasks:04d}.json"
    if args.dedup_only:
        return _dedup_only(out, args)

    finished = finished_blocks(out, args.prefix)
    sel = BlockSelection(args.shard_size, args.task_index, args.num_tasks, frozenset(finished))
    reader = ManifestReader(paths)
    ctx = get_context("spawn")  # no fork: the main process runs tqdm and reader threads
    counter = ctx.Value("q", 0)
    if args.workers > 0:
        pool = ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, counter))
    else:
        _init_worker(spec, counter, in_child=False)
        pool = _InlineExecutor()

    t0 = time.time()
    new_metas, failures, pending = [], [], {}
    blocks = reader.blocks(sel)
    interval = 0.2 if sys.stderr.isatty() else 15.0
    bar = tqdm(desc=f"task {args.task_index}/{args.num_tasks} rows", unit="row", mininterval=interval,
               disable=args.quiet, total=_parquet_rows_owned(paths, sel))
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < max(2, 2 * args.workers):
                nxt = next(blocks, None)
                if nxt is None:
                    exhausted = True
                    break
                pending[pool.submit(write_shard, *nxt)] = shard_name(args.prefix, nxt[0])
            if not pending:
                break
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.update(counter.value - bar.n)
            for fut in done:
                name = pending.pop(fut)
                try:
                    new_metas.append(fut.result())
                except Exception as e:  # a broken shard must not stop the others; reported below
                    failures.append({"shard": name, "error": f"{type(e).__name__}: {e}"})
                    tqdm.write(f"error: shard {name} failed ({type(e).__name__}: {e}); re-run to retry it")
    finally:
        bar.update(counter.value - bar.n)
        bar.close()
        pool.shutdown(cancel_futures=True)
    seconds = time.time() - t0

    num_blocks = -(-reader.rows_seen // args.shard_size)
    owned = [b for b in range(num_blocks) if sel.owns(b)]
    now_finished = finished_blocks(out, args.prefix)
    owned_done = [b for b in owned if b in now_finished]
    rows_now = sum(m["rows_read"] for m in new_metas)
    stats = {
        "task_index": args.task_index, "num_tasks": args.num_tasks, "manifest_rows": reader.rows_seen,
        "shards_total": num_blocks, "shards_owned": len(owned), "shards_done": len(owned_done),
        "shards_written_this_run": len(new_metas), "shards_skipped_already_done": len(finished & set(owned)),
        "failed_shards": failures, "complete": len(owned_done) == len(owned),
        # Over every shard this task owns (this run or earlier). Duplicates here are within-shard only;
        # stats.json adds the cross-shard ones.
        **totals(load_metas(out, [shard_name(args.prefix, b) for b in owned_done])),
        "this_run": {
            "rows": rows_now, "written": sum(m["written"] for m in new_metas), "seconds": round(seconds, 3),
            "workers": args.workers, "rows_per_s": round(rows_now / seconds, 2) if seconds else None,
            "rows_per_s_per_worker": round(rows_now / seconds / max(1, args.workers), 2) if seconds else None,
            "mb_in_per_s": round(sum(m["bytes_in"] for m in new_metas) / seconds / 1e6, 3) if seconds else None,
        },
    }
    atomic_write_bytes(stats_path, _json_bytes(stats))
    _say(args, f"task {args.task_index}/{args.num_tasks}: {len(new_metas)} shards written, "
               f"{stats['shards_skipped_already_done']} already done, {len(failures)} failed; "
               f"{stats['written']} samples kept of {stats['read']} rows; stats: {stats_path}")
    if failures:
        print(f"error: {len(failures)} shards failed (listed in {stats_path}); re-run the same command to retry",
              file=sys.stderr)
        return 1
    if len(now_finished & set(range(num_blocks))) == num_blocks:
        summary = finish_dataset(out, args.prefix, num_blocks, reader.rows_seen, args.workers,
                                 log=lambda line: _say(args, line))
        _say(args, _summary_line(summary, out))
    else:
        missing = num_blocks - len(now_finished & set(range(num_blocks)))
        _say(args, f"{missing} of {num_blocks} shards still to be written by other tasks; the last task to "
                   f"finish removes cross-shard duplicates and writes {out / 'stats.json'}")
    return 0


def _dedup_only(out: Path, args) -> int:
    """Finish a dataset whose tasks are all done: cross-shard dedup and stats.json only."""
    task_stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("task-*.json"))]
    if not task_stats:
        raise SystemExit(f"error: {out}/stats has no task record; run make_shards (without --dedup-only) first")
    rows = task_stats[0]["manifest_rows"]
    num_blocks = -(-rows // args.shard_size)
    missing = sorted(set(range(num_blocks)) - finished_blocks(out, args.prefix))
    if missing:
        shown = ", ".join(shard_name(args.prefix, b) for b in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise SystemExit(f"error: {len(missing)} of {num_blocks} shards are not finished ({shown}); re-run "
                         f"their tasks (shard k belongs to task k % num_tasks) before --dedup-only")
    summary = finish_dataset(out, args.prefix, num_blocks, rows, args.workers, log=lambda line: _say(args, line))
    _say(args, _summary_line(summary, out))
    return 0


def _parquet_rows_owned(paths: list[Path], sel: BlockSelection) -> int | None:
    """Rows this task will process, when the manifest says its size for free (Parquet)."""
    if not all(manifest_format(p) == "parquet" for p in paths):
        return None
    import pyarrow.parquet as pq

    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    blocks = range(-(-total // sel.shard_size))
    return sum(min(sel.shard_size, total - b * sel.shard_size) for b in blocks if sel.wants_block(b))


def _summary_line(summary: dict, out: Path) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected"].items() if v)
    return (f"dataset: {summary['written']} samples in {summary['shards']} shards from {summary['read']} rows; "
            f"rejected {summary['rejected_total']} ({reasons or 'none'}); {out / 'stats.json'}")


def _say(args, line: str) -> None:
    if not args.quiet:
        print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--manifest", nargs="+", required=True, metavar="FILE",
                     help="JSONL, CSV or TSV (optionally .gz) or Parquet; several files or a quoted glob are read "
                          "as one manifest in the given (glob: sorted) order")
    io_.add_argument("--out", required=True, help="output directory for the shards")
    io_.add_argument("--image-col", help="column with the image path or http(s) URL "
                                         "(default: the first of image, url, image_url, image_path, path, ...)")
    io_.add_argument("--caption-col", help="caption column (default: the first of caption, text, txt, title)")
    io_.add_argument("--id-col", help="id column, kept in the sample's .json (default: id, key, uid if present); "
                                      "sample keys are always the manifest row number")
    io_.add_argument("--tags-col", help="object tags column (a list of strings or a space-separated string), written "
                                        "as each sample's .tags member for ERNIE-ViL 2.0's tag view (default: tags if "
                                        "present)")
    io_.add_argument("--image-root", help="directory relative image paths are resolved against "
                                          "(default: the first manifest file's directory)")
    io_.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar ... (default: train)")
    io_.add_argument("--shard-size", type=int, default=10000, help="manifest rows per shard (default: 10000)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--workers", type=int, default=available_cores(),
                     help="processes writing shards (default: the cores this process may use; 0 = in this process)")
    par.add_argument("--fetch-threads", type=int, default=16,
                     help="concurrent reads/downloads per worker (default: 16)")
    par.add_argument("--task-index", type=int, default=0, help="this task's index, 0..num-tasks-1 (default: 0)")
    par.add_argument("--num-tasks", type=int, default=1,
                     help="tasks splitting the manifest, e.g. a Slurm array's size (default: 1)")
    par.add_argument("--dedup-only", action="store_true",
                     help="only remove cross-shard duplicates and write stats.json (all shards must exist)")
    cl = p.add_argument_group("cleaning")
    cl.add_argument("--min-caption-chars", type=int, default=1, help="shorter captions are rejected (default: 1)")
    cl.add_argument("--max-caption-chars", type=int, default=256, help="longer captions are rejected (default: 256)")
    cl.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (OpenCC t2s)")
    cl.add_argument("--max-pixels", type=int, default=50_000_000,
                    help="reject images with more pixels, before decoding (decompression bombs; default: 50M)")
    cl.add_argument("--min-side", type=int, default=0, help="reject images whose shorter side is smaller (default: 0)")
    cl.add_argument("--max-side", type=int, default=0,
                    help="resize so the long side is at most this (default: 0 = keep)")
    cl.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images (default: 95)")
    cl.add_argument("--max-file-bytes", type=int, default=32 << 20, help="reject larger files (default: 32 MiB)")
    net = p.add_argument_group("URLs")
    net.add_argument("--timeout", type=float, default=10.0, help="connect and read timeout, seconds (default: 10)")
    net.add_argument("--retries", type=int, default=2, help="retries on connection errors, 429 and 5xx (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.num_tasks < 1 or not 0 <= a.task_index < a.num_tasks:
        p.error(f"--task-index {a.task_index} must be in 0..{a.num_tasks - 1} (--num-tasks {a.num_tasks})")
    for flag in ("shard_size", "fetch_threads", "max_caption_chars", "max_pixels", "max_file_bytes"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    for flag in ("workers", "min_side", "max_side", "retries", "min_caption_chars"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if not 1 <= a.jpeg_quality <= 100:
        p.error(f"--jpeg-quality must be in 1..100, got {a.jpeg_quality}")
    if a.min_caption_chars > a.max_caption_chars:
        p.error("--min-caption-chars is larger than --max-caption-chars")
    if "/" in a.prefix or not a.prefix:
        p.error(f"--prefix {a.prefix!r} must be a non-empty file name prefix without '/'")
    if a.timeout <= 0:
        p.error("--timeout must be > 0")
    try:
        paths = expand_manifest_paths(a.manifest)
        resolve_columns(paths, a.image_col, a.caption_col, a.id_col, a.tags_col)
    except ManifestError as e:
        p.error(str(e))
    if a.t2s:
        try:
            import opencc  # noqa: F401
        except ImportError:
            p.error("--t2s needs the opencc package (pinned in requirements.txt): pip install -r requirements.txt")
    return a


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
