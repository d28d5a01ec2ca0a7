"""data_tools/make_shards.py, verify_shards.py, shard_stats.py on real files, real tars, a real HTTP server.

One manifest of 1,500 rows mixes every way a row can fail (each with a known count), duplicates
placed across shards and tasks, URLs served from 127.0.0.1, traditional Chinese and odd Unicode in
captions, images that need RGB conversion, resizing or EXIF rotation. It is sharded three ways
(one uninterrupted run, a run SIGKILLed mid-way then resumed, three tasks as three processes), and
all three must give the same bytes.
"""

import functools
import gzip
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools import make_shards, shard_stats, verify_shards
from data_tools.make_demo_data import train_tokenizer
from data_tools.manifest import read_all
from data_tools.shard_io import ShardWriter, read_samples
from wenlan.data import DataConfig, load_tokenizer, make_eval_loader

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 1500
SHARD_SIZE = 100
N_SHARDS = N_ROWS // SHARD_SIZE
# Limits small enough that the fixture's tiny images can cross them.
FLAGS = ["--shard-size", str(SHARD_SIZE), "--max-pixels", "20000", "--min-side", "8", "--max-side", "48",
         "--max-caption-chars", "64", "--max-file-bytes", "20000", "--timeout", "5", "--retries", "1",
         "--fetch-threads", "4", "--t2s", "--quiet"]
TRADITIONAL = [("這是一張關於貓的圖片", "这是一张关于猫的图片"), ("臺灣的風景與雲", "台湾的风景与云"),
               ("學習語言需要時間", "学习语言需要时间"), ("圖書館裡很安靜", "图书馆里很安静")]


# ----------------------------------------------------------------------------- the fixture data

def _smooth_image(rng, width, height, mode="RGB") -> Image.Image:
    """Random smooth colours: distinct bytes per image, small files."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    low = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    im = Image.fromarray(low.squeeze(-1) if channels == 1 else low, mode)
    return im.resize((width, height), Image.Resampling.BILINEAR)


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, http_root):
    """Writes images + manifest.jsonl; returns what a correct run must produce, derived here
    independently of the tool."""
    www, base_url = http_root
    img_dir = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    specs = []  # {"image": ..., "caption": ..., "expect": "ok" | reason, "group": identity of the pair}

    def good(i, image, caption, **extra):
        specs.append(dict(image=image, caption=caption, expect="ok", group=(image_bytes_id(image), caption), **extra))

    def image_bytes_id(image):
        path = www / image.rsplit("/", 1)[1] if image.startswith("http") else img_dir / image
        return path.read_bytes()

    def local_jpeg(name, w, h, mode="RGB", fmt="JPEG", **kw):
        _save(_smooth_image(rng, w, h, mode), img_dir / name, fmt, **kw)
        return name

    def served_jpeg(name, w, h):
        _save(_smooth_image(rng, w, h), www / name, "JPEG")
        return f"{base_url}/{name}"

    def fail(image, caption, reason):
        specs.append(dict(image=image, caption=caption, expect=reason, group=None))

    # Rejections, exact counts.
    for i in range(15):
        fail(f"{base_url}/gone-{i}.jpg", f"死链接{i}", "fetch_failed")  # 404
    for i in range(5):
        fail(f"http://127.0.0.1:{_closed_port()}/x{i}.jpg", f"拒绝连接{i}", "fetch_failed")
    for i in range(10):
        fail(f"missing-{i}.jpg", f"不存在的文件{i}", "missing_file")
    for i in range(15):
        data = (img_dir / local_jpeg(f"trunc-{i}.jpg", 40, 40)).read_bytes()
        (img_dir / f"trunc-{i}.jpg").write_bytes(data[: len(data) // 2])
        fail(f"trunc-{i}.jpg", f"截断的图片{i}", "undecodable")
    for i in range(10):
        (img_dir / f"text-{i}.jpg").write_text(f"this is not an image {i}")
        fail(f"text-{i}.jpg", f"不是图片{i}", "undecodable")
    for i, side in enumerate([200] * 8 + [300] * 2):
        # One colour: a small file with many pixels. 40,000 px is over --max-pixels but under PIL's
        # own hard limit (2x); PIL itself refuses 90,000 (DecompressionBombError).
        Image.new("RGB", (side, side), (i, 2 * i, 3 * i)).save(img_dir / f"bomb-{i}.png")
        fail(f"bomb-{i}.png", f"像素太多{i}", "too_many_pixels")
    for i in range(5):
        fail(local_jpeg(f"tiny-{i}.jpg", 6, 6), f"太小的图片{i}", "image_too_small")
    for i in range(5):  # random noise does not compress: ~30 KB > --max-file-bytes
        Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(img_dir / f"noise-{i}.png")
        fail(f"noise-{i}.png", f"文件太大{i}", "file_too_large")
    for i, caption in enumerate(["", "   ", "\u3000\t", "\u200b", None] * 2):
        fail(local_jpeg(f"nocap-{i}.jpg", 40, 40), caption, "caption_too_short")
    for i in range(10):
        fail(local_jpeg(f"longcap-{i}.jpg", 40, 40), "很长的说明" * 13 + str(i), "caption_too_long")
    for i in range(3):
        specs.append(dict(row={"caption": f"没有图片列{i}"}, expect="bad_row", group=None))
    for i in range(2):
        specs.append(dict(row={"image": None, "caption": f"图片为空{i}"}, expect="bad_row", group=None))
    for i in range(2):
        specs.append(dict(raw_line='{"image": "a.jpg", "caption": ', expect="bad_row", group=None))

    # Samples that must be written, some needing work.
    for i, (trad, simple) in enumerate(TRADITIONAL * 5):
        good(i, local_jpeg(f"trad-{i}.jpg", 40, 40), trad, want_caption=simple)
    for i in range(5):  # NFKC: full-width letters/digits fold, whitespace runs collapse
        good(i, local_jpeg(f"nfkc-{i}.jpg", 40, 40), f"  ＡＢＣ１２３\u3000第{i}张\n\n图 ",
             want_caption=f"ABC123 第{i}张 图")
    for i in range(10):
        good(i, local_jpeg(f"rgba-{i}.png", 40, 30, mode="RGBA", fmt="PNG"), f"透明背景的图{i}")
    for i in range(10):
        good(i, local_jpeg(f"gray-{i}.jpg", 40, 40, mode="L"), f"灰度图{i}")
    for i in range(10):
        good(i, local_jpeg(f"wide-{i}.jpg", 64, 32), f"需要缩小的宽图{i}", want_size=(48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: stored 40x30, upright 30x40
    for i in range(5):
        good(i, local_jpeg(f"exif-{i}.jpg", 40, 30, exif=exif), f"需要旋转的图{i}", want_size=(30, 40))
    for i in range(100):
        good(i, served_jpeg(f"u-{i}.jpg", 40, 36), f"网上的图片{i}")

    n_special = len(specs)
    plain = []
    for i in range(N_ROWS - n_special - 60):
        w, h = (int(v) for v in rng.integers(32, 49, size=2))
        good(i, local_jpeg(f"img-{i:05d}.jpg", w, h), f"第{i}张普通图片：一只猫在草地上")
        plain.append(specs[-1])
    # 60 more rows: 40 exact duplicates of written pairs (5 through a URL serving the same bytes,
    # 5 with a caption that only cleans to the same text), 10 same image + new caption and
    # 10 same caption + new image (both are new pairs, kept).
    for i in range(30):
        good(i, plain[i]["image"], plain[i]["caption"])
    for i in range(30, 35):
        shutil.copy(img_dir / plain[i]["image"], www / f"copy-{i}.jpg")
        good(i, f"{base_url}/copy-{i}.jpg", plain[i]["caption"])
    for i in range(35, 40):
        good(i, plain[i]["image"], "  " + plain[i]["caption"].replace("：", ":") + "\u3000", group_as=plain[i])
    for i in range(40, 50):
        good(i, plain[i]["image"], plain[i]["caption"] + "（另一种说法）")
    for i in range(50, 60):
        good(i, local_jpeg(f"samecap-{i}.jpg", 40, 40), plain[i]["caption"])
    assert len(specs) == N_ROWS

    order = np.random.default_rng(1).permutation(N_ROWS)  # spreads copies over shards and tasks
    specs = [specs[i] for i in order]
    lines, expected, first_of = [], {}, {}
    for row, spec in enumerate(specs):
        if "raw_line" in spec:
            lines.append(spec["raw_line"])
        else:
            record = spec.get("row") or {"image": spec["image"], "caption": spec["caption"]}
            record = dict(record, id=f"pair-{row}", lang="zh")
            lines.append(json.dumps(record, ensure_ascii=False))
        reason = spec["expect"]
        if reason == "ok":
            group = spec["group_as"]["group"] if "group_as" in spec else spec["group"]
            if group in first_of:
                reason = "duplicate"
            else:
                first_of[group] = row
        expected[row] = (reason, spec)
    manifest = img_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest, expected


def run_tool(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "data_tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"make_shards failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def samples_by_key(out: Path) -> dict[str, dict]:
    return {s["__key__"]: s for p in sorted(out.glob("*.tar")) for s in read_samples(p)}


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    manifest, _ = dataset
    out = tmp_path_factory.mktemp("ref") / "shards"
    run_tool("--manifest", manifest, "--out", out, "--workers", "2", *FLAGS)
    return out


# ----------------------------------------------------------------------------- make_shards

def test_every_row_accounted_for_with_exact_counts(dataset, reference):
    _, expected = dataset
    stats = json.loads((reference / "stats.json").read_text())
    want = Counter(reason for reason, _ in expected.values())
    assert stats["read"] == N_ROWS and stats["manifest_rows"] == N_ROWS and stats["shards"] == N_SHARDS
    assert stats["written"] == want["ok"]
    assert {k: v for k, v in stats["rejected"].items() if v} == {k: v for k, v in want.items() if k != "ok"}
    assert stats["accounted"] and stats["written"] + stats["rejected_total"] == N_ROWS
    assert want["duplicate"] == 40 and want["fetch_failed"] == 20 and want["undecodable"] == 25

    # Row by row: written keys, logged rejections and removed duplicates partition the manifest.
    written = {int(k) for k in samples_by_key(reference)}
    assert written == {row for row, (reason, _) in expected.items() if reason == "ok"}
    logged = {}
    for meta_path in (reference / "_meta").glob("*.tar.json"):
        meta = json.loads(meta_path.read_text())
        for line in (reference / "_meta" / f"{meta['shard']}.rejected.jsonl").read_text().splitlines():
            entry = json.loads(line)
            logged[entry["row"]] = entry["reason"]
        for row, kept in meta["duplicates_removed"]:
            assert kept < row and expected[kept][0] == "ok"
            logged[row] = "duplicate"
    assert not written & set(logged) and written | set(logged) == set(range(N_ROWS))
    assert logged == {row: reason for row, (reason, _) in expected.items() if reason != "ok"}


def test_cleaning_of_captions_and_images(dataset, reference):
    _, expected = dataset
    samples = samples_by_key(reference)
    assert len(samples) > 1000
    for key, s in samples.items():
        spec = expected[int(key)][1]
        caption, meta = s["txt"].decode("utf-8"), json.loads(s["json"])
        assert set(s) == {"__key__", "jpg", "txt", "json"}
        assert caption == meta["caption"] and meta["row"] == int(key) and meta["id"] == f"pair-{int(key)}"
        assert meta["lang"] == "zh" and meta["source"] == spec["image"]
        if "want_caption" in spec:
            assert caption == spec["want_caption"]
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 48
        assert im.size == (meta["width"], meta["height"])
        if "want_size" in spec:
            assert im.size == spec["want_size"]
    assert sum("want_caption" in expected[int(k)][1] for k in samples) == 25


def test_killed_run_resumes_to_identical_bytes(dataset, reference, tmp_path):
    manifest, _ = dataset
    out = tmp_path / "shards"
    cmd = [sys.executable, str(ROOT / "data_tools" / "make_shards.py"), "--manifest", str(manifest), "--out", str(out),
           "--workers", "1", *FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not list(out.glob("*.tar")) and proc.poll() is None:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as scancel or a lost node would
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = tars(out)
    assert 1 <= len(finished) < N_SHARDS, "the run finished before it could be killed; nothing was tested"
    ref = tars(reference)
    assert all(finished[name] == ref[name] for name in finished)  # a final name only ever holds a whole shard

    result = run_tool("--manifest", manifest, "--out", out, "--workers", "2", *FLAGS)
    stats = json.loads((out / "stats" / "task-0000-of-0001.json").read_text())
    assert stats["shards_skipped_already_done"] == len(finished), result.stdout
    assert tars(out) == ref
    assert not list(out.glob(".*.tmp.*"))
    resumed, ref_stats = (json.loads((d / "stats.json").read_text()) for d in (out, reference))
    assert resumed["rejected"] == ref_stats["rejected"]


def test_three_tasks_give_the_same_shards_as_one(dataset, reference, tmp_path):
    manifest, _ = dataset
    out = tmp_path / "shards"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "data_tools" / "make_shards.py"), "--manifest", str(manifest),
                               "--out", str(out), "--workers", "1", "--task-index", str(i), "--num-tasks", "3", *FLAGS],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    for i in range(3):
        task = json.loads((out / "stats" / f"task-{i:04d}-of-0003.json").read_text())
        assert task["shards_owned"] == 5 and task["complete"] and task["this_run"]["rows"] == 500
    # The set of samples, by key and content, and beyond that the very bytes of every shard.
    ours, ref = samples_by_key(out), samples_by_key(reference)
    assert ours.keys() == ref.keys()
    assert all(ours[k] == ref[k] for k in ref)
    assert tars(out) == tars(reference)
    assert json.loads((out / "stats.json").read_text()) == json.loads((reference / "stats.json").read_text())


def test_rerun_of_complete_output_changes_nothing(dataset, reference):
    manifest, _ = dataset
    before = {p: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    make_shards.main(["--manifest", str(manifest), "--out", str(reference), "--workers", "0", *FLAGS])
    assert before == {p: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    task = json.loads((reference / "stats" / "task-0000-of-0001.json").read_text())
    assert task["shards_written_this_run"] == 0 and task["shards_skipped_already_done"] == N_SHARDS
    # Different cleaning flags into the same directory would mix two datasets: refused, named.
    flags = [f if f != "48" else "32" for f in FLAGS]
    with pytest.raises(SystemExit, match="max_side"):
        make_shards.main(["--manifest", str(manifest), "--out", str(reference), "--workers", "0", *flags])


def test_shards_decode_with_webdataset_and_the_eval_loader(dataset, reference, tmp_path):
    stats = json.loads((reference / "stats.json").read_text())
    urls = [str(p) for p in sorted(reference.glob("*.tar"))]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(decoded) == stats["written"]
    assert all(im.mode == "RGB" and isinstance(txt, str) and meta["row"] == int(key) for key, im, txt, meta in decoded)

    train_tokenizer([txt for _, _, txt, _ in decoded], tmp_path / "tok")
    cfg = DataConfig(shards=urls, batch_size=64, image_size=32, num_workers=0)
    keys, skipped = [], 0
    for batch in make_eval_loader(cfg, load_tokenizer(str(tmp_path / "tok"))):
        keys += [k.rsplit("#", 1)[-1] for k in batch["keys"]]  # the loader may prefix "url#"
        counts = batch["skipped"]  # {reason: n}, or an int from older loaders
        skipped += sum(counts.values()) if isinstance(counts, dict) else counts
        assert batch["images"].shape[1:] == (3, 32, 32)
    assert skipped == 0 and keys == [key for key, *_ in decoded]


def test_manifest_formats_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"url": f"a/{i}.jpg", "text": f"说明, \"引号\" 第{i}行", "key": str(i), "score": str(i / 2)}
            for i in range(7)]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows)  # blank lines are not rows
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    for sep, name in ((",", "m.csv"), ("\t", "m.tsv")):
        import csv

        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
            writer.writeheader()
            writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=3)
    for name in ("m.jsonl.gz", "m.csv", "m.tsv", "m.parquet"):
        assert read_all([tmp_path / name]) == rows, name


def test_clear_errors_for_bad_arguments(dataset, tmp_path):
    manifest, _ = dataset
    proc = run_tool("--manifest", tmp_path / "nope.jsonl", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and "no such file" in proc.stderr
    proc = run_tool("--manifest", manifest, "--out", tmp_path / "o", "--caption-col", "capton", check=False)
    assert proc.returncode == 2 and "'capton' is not a column" in proc.stderr and "caption, id, lang" in proc.stderr
    (tmp_path / "x.jsonl").write_text('{"picture": "a.jpg", "caption": "c"}\n')
    proc = run_tool("--manifest", tmp_path / "x.jsonl", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no image path/URL column" in proc.stderr and "--image-col" in proc.stderr
    proc = run_tool("--manifest", manifest, "--out", tmp_path / "o", "--task-index", "3", "--num-tasks", "3",
                    check=False)
    assert proc.returncode == 2 and "--task-index 3 must be in 0..2" in proc.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- verify_shards, shard_stats

def test_verify_shards_writes_the_index_and_flags_broken_shards(reference, tmp_path):
    stats = json.loads((reference / "stats.json").read_text())
    script = [sys.executable, str(ROOT / "data_tools" / "verify_shards.py")]
    ok = subprocess.run([*script, str(reference), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    index = json.loads((reference / "index.json").read_text())
    assert index["total"] == stats["written"] and not index["broken"] and index["bad_samples"] == 0
    per_shard = {m["shard"]: m["written"] - len(m["duplicates_removed"])
                 for m in map(json.loads, map(Path.read_text, (reference / "_meta").glob("*.tar.json")))}
    assert {s["path"]: s["samples"] for s in index["shards"]} == per_shard

    broken = tmp_path / "shards"
    shutil.copytree(reference, broken)
    names = sorted(p.name for p in broken.glob("*.tar"))
    data = (broken / names[0]).read_bytes()
    (broken / names[0]).write_bytes(data[: len(data) // 2])  # cut mid-member
    samples = list(read_samples(broken / names[1]))
    (broken / names[1]).write_bytes(b"")
    with ShardWriter(broken / names[1]) as w:  # cut exactly between two samples, end marker intact
        for s in samples[:-3]:
            w.write(s)
    samples = list(read_samples(broken / names[2]))
    bad_key = samples[5]["__key__"]
    samples[5]["jpg"] = samples[5]["jpg"][:200]  # a corrupt image inside an intact tar
    with ShardWriter(broken / names[2]) as w:
        for s in samples:
            w.write(s)
    proc = subprocess.run([*script, str(broken), "--index", str(tmp_path / "idx.json"), "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"BROKEN shards/{names[0]}" in proc.stdout and f"BROKEN shards/{names[1]}" in proc.stdout
    assert f"BAD SAMPLE shards/{names[2]} {bad_key}: undecodable image" in proc.stdout
    index = json.loads((tmp_path / "idx.json").read_text())
    counts = {s["path"]: s["samples"] for s in index["shards"]}
    assert {b["path"] for b in index["broken"]} == {f"shards/{names[0]}", f"shards/{names[1]}"}
    assert counts[f"shards/{names[2]}"] == per_shard[names[2]] - 1 and index["bad_samples"] == 1
    assert index["total"] == stats["written"] - per_shard[names[0]] - per_shard[names[1]] - 1


def test_shard_stats_writes_png_and_json(reference, tmp_path):
    stats = json.loads((reference / "stats.json").read_text())
    assert shard_stats.main([str(reference), "--out", str(tmp_path / "s"), "--workers", "1"]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["samples"] == stats["written"] and out["unreadable"] == 0
    assert out["width"]["max"] <= 48 and sum(out["caption_chars"]["histogram"]["counts"]) == stats["written"]
    assert 1 <= out["caption_chars"]["min"] <= out["caption_chars"]["percentiles"]["p50"] <= 64


def test_verify_detects_truncation_at_member_boundary_without_records(tmp_path):
    """No make_shards record to compare with: the missing end-of-archive blocks still give it away."""
    path = tmp_path / "a.tar"
    with ShardWriter(path) as w:
        for i in range(3):
            w.write({"__key__": f"{i:03d}", "txt": "说明".encode(), "jpg": b"x"})
    with tarfile.open(path) as t:
        last = t.getmembers()[-1]
        cut = last.offset_data + -(-last.size // 512) * 512
    path.write_bytes(path.read_bytes()[:cut])
    result = verify_shards.check_shard(str(path), decode=False)
    assert result["error"] and "truncated" in result["error"]


def test_tags_column_becomes_the_samples_tag_view(tmp_path):
    """A manifest's tags column (a list, a space-separated string, or empty) travels as each sample's
    ``tags`` member, which the loader's second textual view reads; a row without tags gets none, and
    the loader falls back to its augmented caption."""
    rng = np.random.default_rng(0)
    rows = []
    for i, tags in enumerate([["红色", "圆形"], "蓝色  方块", None]):
        path = _save(_smooth_image(rng, 32, 32), tmp_path / f"{i}.jpg", "JPEG")
        rows.append({"image": str(path), "caption": f"第{i}张图的中间有一个形状，它的颜色和名字写在标签里", **({"tags": tags} if tags else {"tags": ""})})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "shards"
    run_tool("--manifest", manifest, "--out", out, "--workers", "1", *FLAGS)
    samples = samples_by_key(out)
    assert [s.get("tags") for _, s in sorted(samples.items())] == ["红色 圆形".encode(), "蓝色 方块".encode(), None]
    assert all("tags" not in json.loads(s["json"]) for s in samples.values())  # not also in the json

    train_tokenizer([r["caption"] for r in rows] + ["红色 圆形 蓝色 方块"], tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    cfg = DataConfig(shards=[str(p) for p in sorted(out.glob("*.tar"))], image_size=32, num_workers=0,
                     augment=False, views=True)
    batch = next(iter(make_eval_loader(cfg, tokenizer)))
    texts = [tokenizer.decode(ids[mask.bool()][1:-1]).replace(" ", "")
             for ids, mask in zip(batch["input_ids2"], batch["attention_mask2"])]
    assert texts[:2] == ["红色圆形", "蓝色方块"]
    assert texts[2] != "" and texts[2] != rows[2]["caption"]  # the caption with characters dropped
