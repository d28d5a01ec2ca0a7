"""Procedurally drawn image-caption pairs with Chinese captions, as webdataset shards.

Each image shows one shape with five attributes (shape, colour, grid position, size, background);
its caption names all five in one of several templates with synonyms. Only a model that really
aligns image content with words can retrieve the right caption, so the demo's R@K means something.
Each sample also has a `tags` member: the five drawn attributes by their canonical names, separated
by spaces (the object-tag view of ERNIE-ViL 2.0, see wenlan.losses.multiview).

    python data_tools/make_demo_data.py --out data/demo [--seed 0] [--n-train 20000] [--n-val 1000]

Writes `<out>/train-000000.tar ...`, `<out>/val-000000.tar ...`, a WordPiece tokenizer at
`<out>/tokenizer/` (loads with `transformers.AutoTokenizer`) and `<out>/DONE` last. The same seed
gives the same bytes; a complete output is left alone.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Attribute vocab. The first name of each entry is canonical (stored in the json); the rest are
# caption synonyms, so the model has to learn meanings rather than exact strings.
SHAPES = {
    "圆形": ["圆形", "圆"],
    "正方形": ["正方形", "方块"],
    "三角形": ["三角形", "三角"],
    "星形": ["星形", "五角星"],
    "十字": ["十字", "十字形"],
    "菱形": ["菱形", "菱块"],
    "六边形": ["六边形", "六角形"],
    "半圆形": ["半圆形", "半圆"],
}
# Fill colours, RGB. Chosen to stay far (RGB distance >= 100) from every background below.
COLORS = {
    "红色": ((220, 30, 30), ["红色", "红色的"]),
    "绿色": ((30, 170, 40), ["绿色", "绿色的"]),
    "蓝色": ((30, 60, 220), ["蓝色", "蓝色的"]),
    "黄色": ((250, 220, 0), ["黄色", "黄色的"]),
    "紫色": ((140, 40, 180), ["紫色", "紫色的"]),
    "橙色": ((255, 130, 0), ["橙色", "橙色的"]),
    "白色": ((255, 255, 255), ["白色", "白色的"]),
    "黑色": ((0, 0, 0), ["黑色", "黑色的"]),
}
BACKGROUNDS = {
    "灰色": ((120, 120, 120), ["灰色", "灰"]),
    "浅蓝色": ((170, 200, 235), ["浅蓝色", "淡蓝色"]),
    "浅绿色": ((175, 220, 170), ["浅绿色", "淡绿色"]),
    "米色": ((225, 210, 175), ["米色", "浅米色"]),
}
# 3x3 grid, row-major; (row, col).
POSITIONS = {
    "左上": ((0, 0), ["左上角", "左上方"]),
    "上方": ((0, 1), ["上方", "正上方", "上边"]),
    "右上": ((0, 2), ["右上角", "右上方"]),
    "左侧": ((1, 0), ["左侧", "左边"]),
    "中间": ((1, 1), ["中间", "中央", "正中间"]),
    "右侧": ((1, 2), ["右侧", "右边"]),
    "左下": ((2, 0), ["左下角", "左下方"]),
    "下方": ((2, 1), ["下方", "正下方", "下边"]),
    "右下": ((2, 2), ["右下角", "右下方"]),
}
# Radius as a fraction of the image side; adjective form (before a noun) and noun form (after 尺寸).
# No bare 大 before a colour: 大红色 reads as one colour word (scarlet).
SIZES = {
    "大": (0.145, ["大的", "较大的", "大号"], ["较大", "偏大"]),
    "中": (0.11, ["中等大小的", "中号", "不大不小的"], ["中等", "适中"]),
    "小": (0.08, ["小的", "较小的", "小号"], ["较小", "偏小"]),
}
# Every template names every attribute; word order and phrasing vary.
TEMPLATES = [
    "{bg}背景的{pos}有一个{size_adj}{color}{shape}",
    "一个{size_adj}{color}{shape}位于{bg}背景的{pos}",
    "在{bg}的背景上，{pos}画着一个{size_adj}{color}{shape}",
    "{pos}是一个{color}{shape}，尺寸{size_noun}，背景为{bg}",
    "图中{bg}背景上有一个{color}{shape}，位于{pos}，大小{size_noun}",
    "{color}{shape}出现在画面{pos}，尺寸{size_noun}，底色是{bg}",
]

ATTRIBUTES = ("shape", "color", "position", "size", "background")
VOCAB = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "position": list(POSITIONS),
    "size": list(SIZES),
    "background": list(BACKGROUNDS),
}
N_COMBOS = math.prod(len(v) for v in VOCAB.values())
SPLITS = {"train": 0, "val": 1}  # feeds the per-sample seed so the splits never share draws
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FORMAT_VERSION = 2  # bump when drawing or captions change, so DONE from an older run is stale (2: tags)


def combo_attributes(combo_id: int) -> dict[str, str]:
    """Mixed-radix decode of a combination id into canonical attribute names."""
    out = {}
    for name in reversed(ATTRIBUTES):
        values = VOCAB[name]
        combo_id, i = divmod(combo_id, len(values))
        out[name] = values[i]
    return {name: out[name] for name in ATTRIBUTES}


def synonyms(attribute: str, value: str) -> list[str]:
    """All the caption words that may name `value` (used by tests to check captions)."""
    if attribute == "shape":
        return SHAPES[value]
    if attribute == "color":
        return COLORS[value][1]
    if attribute == "position":
        return POSITIONS[value][1]
    if attribute == "size":
        return SIZES[value][1] + SIZES[value][2]
    return BACKGROUNDS[value][1]


def make_caption(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, int]:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    t = int(rng.integers(len(TEMPLATES)))
    caption = TEMPLATES[t].format(
        shape=pick(SHAPES[attrs["shape"]]),
        color=pick(COLORS[attrs["color"]][1]),
        pos=pick(POSITIONS[attrs["position"]][1]),
        size_adj=pick(SIZES[attrs["size"]][1]),
        size_noun=pick(SIZES[attrs["size"]][2]),
        bg=pick(BACKGROUNDS[attrs["background"]][1]),
    )
    return caption, t


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Polygon vertices of `shape` of radius r centred at (cx, cy), rotated by `angle` rad."""

    def ring(n, radius, phase=-math.pi / 2):
        return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "圆形":
        pts = ring(64, r)
    elif shape == "正方形":
        pts = ring(4, r, phase=math.pi / 4)
    elif shape == "三角形":
        pts = [(x, y + 0.2 * r) for x, y in ring(3, 1.15 * r)]  # centroid sits low; recentre
    elif shape == "星形":
        outer, inner = ring(5, 1.1 * r), ring(5, 0.45 * r, phase=-math.pi / 2 + math.pi / 5)
        pts = [p for pair in zip(outer, inner) for p in pair]
    elif shape == "十字":
        a = 0.35 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    elif shape == "菱形":
        pts = [(0, -1.15 * r), (0.7 * r, 0), (0, 1.15 * r), (-0.7 * r, 0)]
    elif shape == "六边形":
        pts = ring(6, r, phase=0.0)
    elif shape == "半圆形":
        # Half a disc has half the area; a larger radius keeps small ones recognisable.
        pts = [(1.35 * r * math.cos(math.pi * k / 32), 1.35 * r * (0.4 - math.sin(math.pi * k / 32))) for k in range(33)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw_image(attrs: dict[str, str], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw at 4x and downsample, so small shapes keep clean anti-aliased edges."""
    ss = 4
    side = size * ss
    bg = np.array(BACKGROUNDS[attrs["background"]][0]) + rng.integers(-5, 6, size=3)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in np.clip(bg, 0, 255)))
    row, col = POSITIONS[attrs["position"]][0]
    # Cell centres at 0.2/0.5/0.8 (not 1/6..5/6) so a RandomResizedCrop(scale>=0.8) keeps every
    # shape inside its named third of the image.
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = (0.2 + 0.3 * col + jitter[0]) * side, (0.2 + 0.3 * row + jitter[1]) * side
    radius = SIZES[attrs["size"]][0] * rng.uniform(0.9, 1.1) * side
    angle = math.radians(rng.uniform(-15, 15))
    ImageDraw.Draw(img).polygon(_shape_points(attrs["shape"], cx, cy, radius, angle), fill=COLORS[attrs["color"]][0])
    img = img.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 5.0, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def make_sample(split: str, index: int, combo_id: int, seed: int, image_size: int) -> dict:
    """One sample; its randomness depends only on (seed, split, index), so any process may draw it."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    attrs = combo_attributes(combo_id)
    caption, template = make_caption(attrs, rng)
    buf = io.BytesIO()
    draw_image(attrs, image_size, rng).save(buf, format="JPEG", quality=90)
    meta = dict(attrs, combo_id=combo_id, template=template)
    return {
        "__key__": f"{split}-{index:07d}",
        "jpg": buf.getvalue(),
        "txt": caption.encode("utf-8"),
        "tags": " ".join(attrs[name] for name in ATTRIBUTES).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _make_sample_star(job):
    return make_sample(*job)


def split_combos(n_train: int, n_val: int, seed: int) -> dict[str, np.ndarray]:
    """Train combos are drawn with replacement; val combos are unique so retrieval is well posed."""
    if n_val > N_COMBOS:
        raise ValueError(f"n_val={n_val} exceeds the {N_COMBOS} distinct attribute combinations")
    rng = np.random.default_rng([seed, 1234])
    return {
        "train": rng.integers(0, N_COMBOS, size=n_train),
        "val": rng.choice(N_COMBOS, size=n_val, replace=False),
    }


def _write_shards(out: Path, split: str, combos: np.ndarray, seed: int, image_size: int,
                  shard_size: int, workers: int, progress) -> tuple[list[str], list[str]]:
    import webdataset as wds

    jobs = [(split, i, int(c), seed, image_size) for i, c in enumerate(combos)]
    names, captions = [], []
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        samples = pool.imap(_make_sample_star, jobs, chunksize=64) if pool else map(_make_sample_star, jobs)
        for start in range(0, len(jobs), shard_size):
            name = f"{split}-{start // shard_size:06d}.tar"
            tmp = out / (name + ".tmp")
            # mtime fixed so equal seeds give byte-identical tars; tmp + rename so an
            # interrupted run never leaves a half shard under the final name.
            with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
                for _ in range(min(shard_size, len(jobs) - start)):
                    sample = next(samples)
                    captions.append(sample["txt"].decode("utf-8"))
                    sink.write(sample)
                    progress.update(1)
            os.replace(tmp, out / name)
            names.append(name)
    finally:
        if pool:
            pool.close()
            pool.join()
    return names, captions


def train_tokenizer(captions: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    """WordPiece on the train captions, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # one token per CJK character
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )
    fast.save_pretrained(str(out_dir))


@dataclass
class DemoArgs:
    """Everything that determines the output bytes; stored in DONE to recognise a complete run."""

    n_train: int = 20000
    n_val: int = 1000
    seed: int = 0
    image_size: int = 64
    shard_size: int = 2000
    format_version: int = FORMAT_VERSION


def write_demo_shards(out_dir, n_train: int = 20000, n_val: int = 1000, seed: int = 0,
                      image_size: int = 64, shard_size: int = 2000, workers: int = 0,
                      quiet: bool = False) -> dict:
    """Write the demo set to out_dir (shards, tokenizer/, DONE). Returns the DONE record.

    Does nothing when out_dir already holds a complete set made with the same arguments.
    `workers` > 1 draws images in a process pool; output bytes do not depend on it.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    args = DemoArgs(n_train, n_val, seed, image_size, shard_size)
    done = out / "DONE"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("args") == asdict(args):
            if not quiet:
                print(f"{out}: demo data already complete (seed={seed}); nothing to do")
            return record
        older = dict(record.get("args") or {}, format_version=FORMAT_VERSION) == asdict(args)
        if older:  # the same set by an older version of this script: written again in place
            print(f"{out}: demo data of format {record['args'].get('format_version')}, this script writes format "
                  f"{FORMAT_VERSION}; writing it again")
            done.unlink()
        else:
            raise SystemExit(f"{out} holds demo data made with other arguments {record.get('args')}; "
                             f"remove it or choose another --out")
    if min(n_train, n_val, shard_size, image_size) < 1:
        raise ValueError("n_train, n_val, shard_size and image_size must all be positive")
    out.mkdir(parents=True, exist_ok=True)

    combos = split_combos(n_train, n_val, seed)
    files = {}
    # In a log file (no TTY) redraw rarely instead of hundreds of carriage-return updates.
    interval = 0.1 if sys.stderr.isatty() else 10.0
    with tqdm(total=n_train + n_val, desc="demo images", unit="img", disable=quiet, mininterval=interval) as bar:
        files["train"], train_captions = _write_shards(out, "train", combos["train"], seed, image_size, shard_size, workers, bar)
        files["val"], _ = _write_shards(out, "val", combos["val"], seed, image_size, shard_size, workers, bar)

    tmp_tok = out / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    train_tokenizer(train_captions, tmp_tok)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp_tok, out / "tokenizer")

    record = {"files": files, "n_combos": N_COMBOS, "args": asdict(args)}  # args last, as promised
    tmp = out / "DONE.tmp"
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, done)
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory, e.g. data/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="drawing processes (output does not depend on it)")
    a = p.parse_args(argv)
    rec = write_demo_shards(a.out, a.n_train, a.n_val, a.seed, a.image_size, a.shard_size, a.workers)
    print(f"{a.out}: {len(rec['files']['train'])} train + {len(rec['files']['val'])} val shards, tokenizer/")


if __name__ == "__main__":
    sys.exit(main())
