"""Caption length and image size distributions of webdataset shards, as a PNG of histograms + JSON.

    python data_tools/shard_stats.py data/pairs [--out data/pairs/shard_stats] [--max-samples 200000]

Writes OUT.png (caption length in characters, image width, height and aspect ratio) and OUT.json
(count, min, max, mean, percentiles and the histogram counts of each). Image sizes come from the
file headers, so no image is decoded; a sample that cannot be read is counted as unreadable.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `data_tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.shard_io import IMAGE_EXTS, atomic_write_bytes, available_cores, expand_shards, map_shards, read_samples

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
METRICS = {  # name -> (axis label, log-spaced bins?)
    "caption_chars": ("caption length (characters)", False),
    "width": ("image width (px)", False),
    "height": ("image height (px)", False),
    "aspect": ("aspect ratio width / height", True),
}


def shard_values(path: str, limit: int | None) -> dict:
    """Per-sample values of one shard (at most `limit` samples)."""
    from PIL import Image

    values = {name: [] for name in METRICS}
    unreadable = 0
    try:
        for i, sample in enumerate(read_samples(Path(path))):
            if limit is not None and i >= limit:
                break
            try:
                image = next(sample[e] for e in IMAGE_EXTS if e in sample)
                width, height = Image.open(io.BytesIO(image)).size  # header only
                caption = sample["txt"].decode("utf-8").strip()
            except Exception:
                unreadable += 1
                continue
            values["caption_chars"].append(len(caption))
            values["width"].append(width)
            values["height"].append(height)
            values["aspect"].append(width / height)
    except Exception:
        unreadable += 1  # a broken tar: verify_shards.py says which and why
    return {"values": values, "unreadable": unreadable}


def describe(xs: np.ndarray, log_bins: bool, bins: int = 40) -> dict:
    if not len(xs):
        return {"count": 0}
    if log_bins and xs.min() > 0:
        edges = np.geomspace(xs.min(), xs.max() * (1 + 1e-9), bins + 1)
    else:
        edges = np.histogram_bin_edges(xs, bins=bins)
    counts, edges = np.histogram(xs, bins=edges)
    return {
        "count": int(len(xs)), "min": float(xs.min()), "max": float(xs.max()), "mean": float(xs.mean()),
        "percentiles": {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(xs, PERCENTILES))},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def collect(shards: list[Path], max_samples: int | None, workers: int) -> dict:
    per_shard = None if max_samples is None else max(1, -(-max_samples // len(shards)))
    paths = [str(p) for p in shards]
    parts = map_shards(shard_values, paths, workers, per_shard)
    stats = {"shards": len(paths), "unreadable": sum(p["unreadable"] for p in parts)}
    for name, (_, log_bins) in METRICS.items():
        xs = np.array([x for p in parts for x in p["values"][name]], dtype=np.float64)
        stats[name] = describe(xs, log_bins)
    stats["samples"] = stats["caption_chars"]["count"]
    return stats


def plot(stats: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, (label, log_bins)) in zip(axes.flat, METRICS.items()):
        d = stats[name]
        if d["count"]:
            edges, counts = d["histogram"]["edges"], d["histogram"]["counts"]
            ax.stairs(counts, edges, fill=True, alpha=0.8)
            ax.axvline(d["percentiles"]["p50"], color="k", lw=1, ls="--", label=f"median {d['percentiles']['p50']:.3g}")
            ax.legend(loc="upper right", fontsize=8)
            if log_bins:
                ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
    fig.suptitle(f"{stats['samples']} samples from {stats['shards']} shards")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard files, directories (all *.tar inside) or quoted globs")
    p.add_argument("--out", help="output path without extension (default: DIR/shard_stats for one directory)")
    p.add_argument("--max-samples", type=int,
                   help="read about this many samples, spread over all shards (default: all)")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="processes (default: the cores this process may use)")
    a = p.parse_args(argv)
    try:
        shards = expand_shards(a.shards)
    except FileNotFoundError as e:
        p.error(str(e))
    if a.max_samples is not None and a.max_samples < 1:
        p.error("--max-samples must be >= 1")
    if a.out:
        out = Path(a.out)
    elif len(a.shards) == 1 and Path(a.shards[0]).is_dir():
        out = Path(a.shards[0]) / "shard_stats"
    else:
        p.error("--out is required unless a single directory is given")
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = collect(shards, a.max_samples, max(1, a.workers))
    atomic_write_bytes(Path(f"{out}.json"), (json.dumps(stats, indent=1) + "\n").encode())
    plot(stats, Path(f"{out}.png"))
    c, w = stats["caption_chars"], stats["width"]
    if stats["samples"]:
        print(f"{stats['samples']} samples: caption chars median {c['percentiles']['p50']:.0f} "
              f"(p5 {c['percentiles']['p5']:.0f}, p95 {c['percentiles']['p95']:.0f}); width median "
              f"{w['percentiles']['p50']:.0f} px; {stats['unreadable']} unreadable")
    print(f"wrote {Path(f'{out}.png')} and {Path(f'{out}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
