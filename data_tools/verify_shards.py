"""Check webdataset shards end to end and write an index of their sample counts.

    python data_tools/verify_shards.py data/pairs [--index data/pairs/index.json] [--workers 8] [--no-decode]

Reads every shard: a tar that is corrupt or truncated, and every sample whose image does not decode
or whose caption is missing, empty or not UTF-8, is reported. Where make_shards left its record of a
shard (`_meta/<shard>.json`), the sample count must match it, which also catches a tar cut exactly
between two samples.

The index lists the intact shards and their good samples, paths relative to the index file:
    {"shards": [{"path": "train-000000.tar", "samples": 9731, "bytes": ...}, ...], "total": N,
     "broken": [{"path": ..., "error": ...}], "bad_samples": M}
A loader can size epochs and split shards evenly across ranks from it. Exit status 1 when any shard
or sample is broken, with a summary; 0 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.shard_io import IMAGE_EXTS, META_DIR, atomic_write_bytes, available_cores, expand_shards, map_shards, read_samples

MAX_LISTED = 10  # per category in the printed summary; the index JSON has them all


def sample_problem(sample: dict, decode: bool) -> str | None:
    """Why the loader would skip this sample, or None."""
    from PIL import Image

    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        return "no image member"
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return "invalid .json"
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "caption is not UTF-8"
    else:  # img2dataset keeps the caption in the .json too; the loader reads it from there
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            return "no caption (.txt, or \"caption\" in the .json)"
    if not caption.strip():
        return "empty caption"
    if decode:
        try:
            with Image.open(io.BytesIO(image)) as im:
                im.convert("RGB")  # the full decode, as the loader does
        except Exception as e:
            return f"undecodable image ({type(e).__name__}: {e})"[:200]
    return None


def check_shard(path: str, decode: bool = True) -> dict:
    """{"path", "samples" (good ones), "bad": [[key, why], ...], "error": str | None, "bytes"}."""
    result = {"path": path, "samples": 0, "bad": [], "error": None, "bytes": os.path.getsize(path)}
    seen = set()
    try:
        for sample in read_samples(Path(path)):
            key = sample["__key__"]
            problem = "key repeated in this shard" if key in seen else sample_problem(sample, decode)
            seen.add(key)
            if problem:
                result["bad"].append([key, problem])
            else:
                result["samples"] += 1
    except Exception as e:  # tarfile.ReadError, EOFError, OSError: the shard as a whole is broken
        result["error"] = f"{type(e).__name__}: {e}"[:300]
        return result
    record = Path(path).parent / META_DIR / f"{Path(path).name}.json"
    if record.is_file():
        meta = json.loads(record.read_text())
        expected = meta["written"] - len(meta.get("duplicates_removed", []))
        found = result["samples"] + len(result["bad"])
        if found != expected:
            result["error"] = f"holds {found} samples, make_shards recorded {expected}: truncated or replaced"
    return result


def verify(shards: list[Path], index_path: Path, decode: bool = True, workers: int = 1) -> dict:
    paths = [str(p) for p in shards]
    results = map_shards(check_shard, paths, workers, decode)
    base = index_path.parent.resolve()

    def rel(p: str) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    good = [r for r in results if r["error"] is None]
    index = {
        "shards": [{"path": rel(r["path"]), "samples": r["samples"], "bytes": r["bytes"]} for r in good],
        "total": sum(r["samples"] for r in good),
        "broken": [{"path": rel(r["path"]), "error": r["error"]} for r in results if r["error"]],
        "bad_samples": sum(len(r["bad"]) for r in good),
        "bad": [{"path": rel(r["path"]), "key": k, "problem": why} for r in good for k, why in r["bad"]],
        "decoded": decode,
    }
    index_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(index_path, index_json(index).encode("utf-8"))
    return index


def index_json(index: dict) -> str:
    """Pretty at the top level, one line per list entry: readable and diffable at 50,000 shards."""
    parts = []
    for name, value in index.items():
        if isinstance(value, list) and value:
            rows = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f' "{name}": [\n{rows}\n ]')
        else:
            parts.append(f" {json.dumps(name)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def summary(index: dict, index_path: Path) -> str:
    lines = [f"{len(index['shards'])} intact shards, {index['total']} good samples; "
             f"{len(index['broken'])} broken shards, {index['bad_samples']} bad samples; index: {index_path}"]
    for b in index["broken"][:MAX_LISTED]:
        lines.append(f"  BROKEN {b['path']}: {b['error']}")
    for b in index["bad"][:MAX_LISTED]:
        lines.append(f"  BAD SAMPLE {b['path']} {b['key']}: {b['problem']}")
    hidden = max(0, len(index["broken"]) - MAX_LISTED) + max(0, len(index["bad"]) - MAX_LISTED)
    if hidden:
        lines.append(f"  ... and {hidden} more in the index")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard files, directories (all *.tar inside) or quoted globs")
    p.add_argument("--index", help="where to write the index JSON (default: DIR/index.json for one directory)")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="processes (default: the cores this process may use)")
    p.add_argument("--no-decode", action="store_true", help="check tar structure and captions only, not images")
    a = p.parse_args(argv)
    try:
        shards = expand_shards(a.shards)
    except FileNotFoundError as e:
        p.error(str(e))
    if a.index:
        index_path = Path(a.index)
    elif len(a.shards) == 1 and Path(a.shards[0]).is_dir():
        index_path = Path(a.shards[0]) / "index.json"
    else:
        p.error("--index is required unless a single directory is given")
    index = verify(shards, index_path, decode=not a.no_decode, workers=max(1, a.workers))
    print(summary(index, index_path))
    return 1 if index["broken"] or index["bad_samples"] else 0


if __name__ == "__main__":
    sys.exit(main())
