"""Data throughput per process, measured side by side on the same shards in one run.

1. Loader: the project's training loader (wenlan.data: tar read, decode, BriVL train augmentation
   with colour jitter, tokenisation, collation), one process, samples/s. It ships uint8 crops and
   per-sample colour maps; applying those (model_images) is the training device's work, timed here
   on this CPU separately for reference.
2. Decode-only floor: the same tars read and decoded with nothing else, by PIL (full decode), PIL with
   draft() (JPEG DCT-domain downscale to the training size), torchvision.io.decode_jpeg and simplejpeg
   (libjpeg-turbo, full scale); the fastest is the floor. Prints loader / floor (target >= 0.6: augmentation and tokenisation should
   not cost more than the decode itself... or the loader should decode smarter).
3. make_shards: rows/s of one process turning local JPEGs into shards, keeping the original bytes
   (images within --max-side) and re-encoding them (--max-side smaller than the images).
Then what 500M pairs would take at those rates on N cores.

Rates are per CPU-second of this process (time.process_time), i.e. samples/s of a worker process
that has a core to itself; that keeps them meaningful on a machine shared with other jobs.
Images are synthetic "web-like" JPEGs (smooth colour fields, shapes and noise, 400-640 px on the
long side, ~50 KB), so file sizes and decode costs are in the range of real web images. Every
process is held to one torch thread, as a DataLoader worker is.

    python bench/data_throughput.py [--images 320] [--image-size 224] [--rounds 3]
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data_tools import make_shards  # noqa: E402
from data_tools.make_demo_data import train_tokenizer  # noqa: E402
from data_tools.shard_io import read_samples  # noqa: E402

PAIRS_500M = 500_000_000


def web_like_jpeg(rng: np.random.Generator) -> bytes:
    w = int(rng.integers(400, 641))
    h = int(w * rng.uniform(0.6, 1.0))
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(10, 120))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_inputs(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = []
    for i in range(n):
        (root / "img" / f"{i:05d}.jpg").write_bytes(web_like_jpeg(rng))
        lines.append(json.dumps({"image": f"img/{i:05d}.jpg", "caption": f"第{i}张图片：草地上有一只猫和一个红色的球"},
                                ensure_ascii=False))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "manifest.jsonl"


def shard_writing_rate(manifest: Path, out: Path, shard_size: int, extra: list[str]) -> float:
    """Rows per CPU-second of make_shards in this one process (--workers 0; its reader threads included)."""
    t0 = time.process_time()
    make_shards.main(["--manifest", str(manifest), "--out", str(out), "--shard-size", str(shard_size),
                      "--workers", "0", "--quiet", *extra])
    rows = json.loads((out / "stats" / "task-0000-of-0001.json").read_text())["this_run"]["rows"]
    return rows / (time.process_time() - t0)


# ----------------------------------------------------------------------------- decode-only

def decode_pil(data: bytes, size: int):
    return Image.open(io.BytesIO(data)).convert("RGB")


def decode_pil_draft(data: bytes, size: int):
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (size, size))  # largest 1/2^k scale that keeps both sides >= size
    return im.convert("RGB")


def decode_simplejpeg(data: bytes, size: int):
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_torchvision(data: bytes, size: int):
    from torchvision.io import decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def augment_rate(shards: list[Path], transform, size: int) -> float:
    """Decode + the train transform's loader half as the loader calls it (on the just-opened image,
    with its bytes), no loader around it: where the loader's time goes."""
    n, t0 = 0, time.process_time()
    for shard in shards:
        for sample in read_samples(shard):
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                transform.prepare(im, seed=n, encoded=sample["jpg"])
            n += 1
    return n / (time.process_time() - t0)


def colour_maps_rate(shards: list[Path], transform, batch: int) -> float:
    """model_images (colour maps + normalisation, the training device's part) on this CPU, one torch
    thread, in batches: samples/s."""
    from wenlan.data import model_images

    prepared = []
    for shard in shards:
        for sample in read_samples(shard):
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                prepared.append(transform.prepare(im, seed=len(prepared), encoded=sample["jpg"]))
    t0 = time.process_time()
    for i in range(0, len(prepared), batch):
        pixels, maps = zip(*prepared[i:i + batch])
        model_images(torch.stack(pixels), torch.stack(maps))
    return len(prepared) / (time.process_time() - t0)


def tokenise_rate(captions: list[str], tokenizer, batch: int) -> float:
    t0 = time.process_time()
    for i in range(0, len(captions), batch):
        tokenizer(captions[i:i + batch], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    return len(captions) / (time.process_time() - t0)


def decode_rate(shards: list[Path], decode, size: int) -> float:
    n, t0 = 0, time.process_time()
    for shard in shards:
        for sample in read_samples(shard):
            decode(sample["jpg"], size)
            n += 1
    return n / (time.process_time() - t0)


# ----------------------------------------------------------------------------- the loader

def make_loader(shards: list[Path], tokenizer, image_size: int, batch: int):
    """wenlan.data's training loader for one epoch in this process; adapts to its signature."""
    from wenlan.data import DataConfig, make_train_loader

    fields = inspect.signature(DataConfig).parameters
    extra = {"streams": 1} if "streams" in fields else {}  # one process reads every shard in turn
    cfg = DataConfig(shards=[str(s) for s in shards], batch_size=batch, image_size=image_size, num_workers=0,
                     augment=True, color_augment=True, **extra)
    params = inspect.signature(make_train_loader).parameters
    kwargs = {"epochs": 1} if "epochs" in params else {}
    if "global_batch" in params:
        kwargs["global_batch"] = batch
    return make_train_loader(cfg, tokenizer, 0, 1, **kwargs)


def loader_rate(shards: list[Path], tokenizer, image_size: int, batch: int) -> float:
    n, t0 = 0, time.process_time()
    for b in make_loader(shards, tokenizer, image_size, batch):
        n += len(b["keys"])
    return n / (time.process_time() - t0)


def decoded_share(shards: list[Path], transform) -> tuple[float, float]:
    """(share of the samples decoded below full scale, mean share of the pixels decoded) by the train
    transform, for crops drawn with seeds 0, 1, ... as a stand-in for the loader's."""
    import random

    import simplejpeg

    scaled, pixels, n = 0, 0.0, 0
    for shard in shards:
        for sample in read_samples(shard):
            height, width = simplejpeg.decode_jpeg_header(sample["jpg"])[:2]
            _, _, h, w = transform.crop_box(random.Random(n), height, width)
            k = transform.decode_eighths(h, w)
            scaled, pixels, n = scaled + (k < 8), pixels + (k / 8) ** 2, n + 1
    return scaled / n, pixels / n


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=320, help="synthetic images (default: 320)")
    p.add_argument("--image-size", type=int, default=224, help="training image size (default: 224, the 1b/10b presets)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; the median is reported")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_inputs(root, a.images)
        shard_size = max(1, a.images // 8)
        keep = shard_writing_rate(manifest, root / "shards", shard_size, [])
        resize = shard_writing_rate(manifest, root / "resized", shard_size, ["--max-side", "256"])
        shards = sorted((root / "shards").glob("*.tar"))
        captions = [s["txt"].decode() for s in read_samples(shards[0])]
        train_tokenizer(captions * 4, root / "tok")
        from wenlan.data import load_tokenizer

        tokenizer = load_tokenizer(str(root / "tok"))
        from wenlan.data.transforms import train_transform

        decoders = {"PIL full decode": decode_pil, "PIL draft()": decode_pil_draft,
                    "torchvision.io.decode_jpeg": decode_torchvision, "simplejpeg (libjpeg-turbo)": decode_simplejpeg}
        parts = {"decode + crop + colour map (colour on)": train_transform(a.image_size, color_augment=True),
                 "decode + crop + colour map (colour off)": train_transform(a.image_size, color_augment=False)}
        rates = {name: [] for name in ["loader", *decoders, *parts, "tokenise", "device part"]}
        all_captions = [s["txt"].decode() for shard in shards for s in read_samples(shard)]
        loader_rate(shards[:1], tokenizer, a.image_size, a.batch)  # warm-up: imports, first-call costs
        for _ in range(a.rounds):
            rates["loader"].append(loader_rate(shards, tokenizer, a.image_size, a.batch))
            for name, fn in decoders.items():
                rates[name].append(decode_rate(shards, fn, a.image_size))
            for name, transform in parts.items():
                rates[name].append(augment_rate(shards, transform, a.image_size))
            rates["tokenise"].append(tokenise_rate(all_captions, tokenizer, a.batch))
            rates["device part"].append(colour_maps_rate(shards, parts["decode + crop + colour map (colour on)"],
                                                         a.batch))
        mean_kb = np.mean([len(s["jpg"]) for s in read_samples(shards[0])]) / 1024
        scaled, decoded_pixels = decoded_share(shards, train_transform(a.image_size))

    med = {k: statistics.median(v) for k, v in rates.items()}
    floor_name = max(decoders, key=lambda k: med[k])
    # loader and floor of the same round were measured back to back: the median of the per-round ratios
    # is steadier than a ratio of medians when other jobs come and go on the machine
    round_ratios = [lo / fl for lo, fl in zip(rates["loader"], rates[floor_name])]
    ratio = statistics.median(round_ratios)
    print(f"device: {platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per process, no GPU")
    print(f"data: {a.images} synthetic JPEGs, 400-640 px long side, mean {mean_kb:.0f} KB; train size {a.image_size}; "
          f"median of {a.rounds} rounds; rates per CPU-second of one process")
    print(f"loader (tar read + decode + augment + tokenise + collate): {med['loader']:8.1f} samples/s per process "
          f"({scaled:.0%} of the crops decoded at reduced scale, {decoded_pixels:.0%} of the pixels decoded)")
    for name in decoders:
        mark = "  <- floor" if name == floor_name else ""
        print(f"decode only, {name:28s}: {med[name]:8.1f} samples/s per process{mark}")
    print(f"ratio loader / decode floor: {ratio:.2f} (median of the rounds' ratios "
          f"{', '.join(f'{r:.2f}' for r in round_ratios)}; target >= 0.6: {'met' if ratio >= 0.6 else 'NOT met'})")
    print(f"ratio loader / PIL full decode: {med['loader'] / med['PIL full decode']:.2f}")
    print("where the loader's time goes (same samples, no loader around them):")
    for name in [*parts, "tokenise"]:
        label = f"tokenise only (batches of {a.batch})" if name == "tokenise" else name
        print(f"  {label:40s}: {med[name]:8.1f} samples/s  ({1000 / med[name]:.2f} ms/sample)")
    print(f"not in the loader: model_images (colour maps + normalisation, run on the training device) would cost "
          f"{1000 / med['device part']:.2f} ms/sample on this CPU")
    print(f"make_shards, keep original bytes: {keep:8.1f} rows/s per process")
    print(f"make_shards, resize to --max-side 256: {resize:8.1f} rows/s per process")
    for cores in (64, 512):
        print(f"500M pairs on {cores} cores: {hours(PAIRS_500M / (keep * cores))} keeping bytes, "
              f"{hours(PAIRS_500M / (resize * cores))} resizing (local files; URL fetching is usually "
              f"network-bound instead)")
    print(f"one epoch of 500M pairs through the loader: {PAIRS_500M / med['loader'] / 3600:.0f} worker-hours; "
          f"{1000 / med['loader']:.1f} worker processes per 1,000 samples/s of training")
    print(f"bench wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
