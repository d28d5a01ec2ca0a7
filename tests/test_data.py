"""wenlan.data: batches, skip-and-count of bad samples and shards, layout checks, img2dataset shards.

World-size invariance and exact resume: test_data_order.py; malformed-input fuzzing: test_data_fuzz.py.
The shard writers and the tokenizer fixture here are shared with those files.
"""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools.make_demo_data import train_tokenizer
from wenlan.data import (NORMALISE, DataConfig, default_streams, eval_transform, expand_shards, load_tokenizer,
                         make_eval_loader, make_train_loader, missing_local_shards, model_images, train_transform)
from wenlan.data.shards import tar_samples

CAPTIONS = ["红色圆形在左上角", "蓝色方块在右下角", "绿色三角形在中间", "黄色星形在左侧"]


def jpeg(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def write_shards(root, sizes, bad: dict | None = None, name: str = "shard-{:06d}.tar") -> list[str]:
    """Shard s holds sizes[s] samples keyed s{s}-{i:03d}; `bad` maps key -> field overrides (None drops)."""
    bad = bad or {}
    paths = []
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"s{s}-{i:03d}"
            sample = {"__key__": key, "jpg": jpeg(s * 1000 + i), "txt": CAPTIONS[i % 4].encode()}
            sample.update(bad.get(key, {}))
            samples.append({k: v for k, v in sample.items() if v is not None})
        paths.append(write_tar(root / name.format(s), samples))
    return paths


def member_offsets(path) -> dict[str, tuple[int, int]]:
    """name -> (offset of its data, size) in a tar, for cutting shards at a chosen byte."""
    with tarfile.open(path) as t:
        return {m.name: (m.offset_data, m.size) for m in t.getmembers()}


def cut(path, at: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:at])


def short_key(key: str) -> str:
    return key.split("#", 1)[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(CAPTIONS * 10, out)
    return load_tokenizer(str(out))


def collect(loader):
    """All keys (short form), skip counts by reason, and the batches of a finite loader."""
    keys, skipped, batches = [], Counter(), []
    for b in loader:
        keys += [short_key(k) for k in b["keys"]]
        skipped.update(b["skipped"])
        batches.append(b)
    return keys, skipped, batches


@pytest.fixture
def bad_shards(tmp_path):
    """3 shards x 10; one truncated JPEG, one whitespace caption, the latter last of all."""
    paths = write_shards(tmp_path, [10, 10, 10], bad={"s1-004": {"jpg": jpeg(7)[:300]}, "s2-009": {"txt": b"  \n"}})
    good = [f"s{s}-{i:03d}" for s in range(3) for i in range(10) if (s, i) not in ((1, 4), (2, 9))]
    return paths, good


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_skips_and_counts_bad_samples(bad_shards, tokenizer, num_workers):
    paths, good = bad_shards
    # 28 good samples in batches of 7: the trailing bad sample has no batch left to ride on.
    cfg = DataConfig(shards=paths, batch_size=7, image_size=16, num_workers=num_workers)
    keys, skipped, batches = collect(make_eval_loader(cfg, tokenizer))
    assert skipped == {"undecodable image": 1, "empty caption": 1}
    assert sorted(keys) == sorted(good)
    if num_workers == 0:  # one worker: exact shard order, and only the final batch may be short
        assert keys == good
        assert [len(b["keys"]) for b in batches] == [7, 7, 7, 7, 0]  # B == 0 carries the last skip


def test_eval_keeps_short_last_batch_and_skips_missing_fields(tmp_path, tokenizer):
    bad = {"s0-003": {"txt": None}, "s0-005": {"jpg": None}, "s0-006": {"jpg": b"not a jpeg"},
           "s0-007": {"txt": b"\xff\xfe caption"}}
    paths = write_shards(tmp_path, [10], bad=bad)
    keys, skipped, batches = collect(make_eval_loader(DataConfig(shards=paths, batch_size=4, image_size=16,
                                                                 num_workers=0), tokenizer))
    assert keys == [f"s0-{i:03d}" for i in range(10) if f"s0-{i:03d}" not in bad]
    assert skipped == {"missing caption": 1, "missing image": 1, "undecodable image": 1, "caption not utf-8": 1}
    assert [len(b["keys"]) for b in batches] == [4, 2]  # nothing dropped in eval


def test_train_step_batches_shapes_dtypes(bad_shards, tokenizer):
    paths, good = bad_shards
    cfg = DataConfig(shards=paths, image_size=16, max_text_len=16, num_workers=0, streams=2, shuffle_window=4,
                     color_augment=False)
    keys, skipped, batches = collect(make_train_loader(cfg, tokenizer, rank=0, world_size=1, global_batch=8,
                                                       epochs=1))
    # A finite pass delivers every good sample once; only the last steps may be short.
    assert sorted(keys) == sorted(good) and len(keys) == len(set(keys))
    assert skipped == {"undecodable image": 1, "empty caption": 1}
    assert [len(b["keys"]) for b in batches[:2]] == [8, 8]  # the 1-shard stream runs out in step 3
    for b in batches:
        n = len(b["keys"])
        assert b["images"].shape == (n, 3, 16, 16) and b["images"].dtype == torch.uint8
        assert torch.equal(b["colour_maps"], NORMALISE.expand(n, 3, 7))  # colour_augment=False: normalisation only
        assert b["input_ids"].shape == (n, 16) and b["input_ids"].dtype == torch.long
        assert b["attention_mask"].shape == (n, 16) and b["attention_mask"].dtype == torch.long
        assert (b["input_ids"][:, 0] == tokenizer.cls_token_id).all()
        assert set(b["position"]) == {0, 1}
    # Stream c fills global positions [4c, 4c + 4) of every step, from its own shards only.
    halves = [{short_key(k).split("-")[0] for b in batches[:2] for k in b["keys"][h * 4:(h + 1) * 4]} for h in (0, 1)]
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    assert batches[-1]["position"] == {0: [1, 0, 0], 1: [1, 0, 0]}  # both streams through epoch 0


def test_two_ranks_partition_one_epoch(tmp_path, tokenizer):
    paths = write_shards(tmp_path, [5, 6, 7, 4, 5, 6, 7, 4])
    cfg = DataConfig(shards=paths, image_size=16, num_workers=2, streams=4, shuffle_window=3)
    per_rank = [collect(make_train_loader(cfg, tokenizer, rank=r, world_size=2, global_batch=8, epochs=1))[0]
                for r in (0, 1)]
    for keys in per_rank:
        assert len(keys) == len(set(keys)), "a sample reached two workers of one rank"
    assert not set(per_rank[0]) & set(per_rank[1]), "a sample reached both ranks"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{s}-{i:03d}" for s, n in enumerate([5, 6, 7, 4] * 2)
                                                      for i in range(n))
    owner = {k.split("-")[0]: r for r, keys in enumerate(per_rank) for k in keys}  # whole shards per rank
    assert all(owner[k.split("-")[0]] == r for r, keys in enumerate(per_rank) for k in keys)


def test_default_streams_leave_room_for_the_workers_asked_for():
    from wenlan.data.pipeline import default_streams

    assert default_streams(2, workers=1, global_batch=128) == 8  # the demo's layout is unchanged
    assert default_streams(64, workers=4, global_batch=4096) == 256  # pretrain_10b.sh: 4 workers per GPU, not 1
    assert default_streams(16, workers=4, global_batch=2048) == 64  # pretrain_1b.sh
    assert default_streams(2, workers=8, global_batch=16) == 16
    assert default_streams(2, workers=8, global_batch=24) == 8  # 16 would not divide the batch: fewer workers


def test_capped_workers_are_announced(tmp_path, tokenizer, caplog):
    paths = write_shards(tmp_path, [4, 4])
    cfg = DataConfig(shards=paths, image_size=16, num_workers=3, streams=2, shuffle_window=3)
    with caplog.at_level("WARNING", logger="wenlan.data.pipeline"):
        loader = make_train_loader(cfg, tokenizer, rank=0, world_size=1, global_batch=4, epochs=1)
    assert loader.num_workers == 2
    assert "3 data loader workers per rank asked for, 2 used" in caplog.text


def _first_steps(paths, tokenizer, seed, num_workers, n=6):
    cfg = DataConfig(shards=paths, image_size=16, num_workers=num_workers, seed=seed, streams=2, shuffle_window=4)
    return [b for b, _ in zip(make_train_loader(cfg, tokenizer, 0, 1, global_batch=6), range(n))]


def test_deterministic_for_seed(tmp_path, tokenizer):
    paths = write_shards(tmp_path, [6, 6, 6, 6])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = _first_steps(paths, tokenizer, seed=0, num_workers=0)
    assert torch.equal(torch.get_rng_state(), state), "the loader moved the caller's RNG"
    torch.manual_seed(456)  # the caller's global RNG must not matter...
    b = _first_steps(paths, tokenizer, seed=0, num_workers=1)  # ...nor worker processes
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert all(torch.equal(x["colour_maps"], y["colour_maps"]) for x, y in zip(a, b))
    c = _first_steps(paths, tokenizer, seed=1, num_workers=0)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    assert a[-1]["position"][0][0] >= 1  # 6 steps x 6 samples run past the 24-sample epoch


def test_layout_errors_name_fields_and_fix(tmp_path, tokenizer):
    paths = write_shards(tmp_path, [2, 2, 2])
    cfg = DataConfig(shards=paths, streams=4)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for DataConfig.streams=4.*at least 4 shards.*fewer streams"):
        make_train_loader(cfg, tokenizer, 0, 1, global_batch=8)
    with pytest.raises(ValueError, match=r"DataConfig.streams=4 is not a multiple of the world size 3.*streams=12"):
        make_train_loader(cfg, tokenizer, 0, 3, global_batch=12)
    with pytest.raises(ValueError, match=r"global batch 6 is not a multiple of DataConfig.streams=4"):
        make_train_loader(cfg, tokenizer, 0, 2, global_batch=6)
    ok = DataConfig(shards=paths, streams=2)
    with pytest.raises(ValueError, match=r"position: .*2 streams.*got streams \[0, 1, 2, 3\]"):
        make_train_loader(ok, tokenizer, 0, 1, global_batch=4, position={c: [0, 0, 0] for c in range(4)})
    with pytest.raises(ValueError, match="DataConfig.streams=8"):  # the default for one rank is 8
        make_train_loader(DataConfig(shards=paths), tokenizer, 0, 1, global_batch=8)
    assert [default_streams(w) for w in (1, 2, 4, 8, 16, 3)] == [8, 8, 8, 8, 16, 24]


def test_endless_stream_fails_when_no_shard_has_a_good_sample_but_rides_out_one_bad_shard(tmp_path, tokenizer):
    all_bad = {f"s{s}-{i:03d}": {"txt": b""} for s in range(2) for i in range(3)}
    paths = write_shards(tmp_path, [3, 3], bad=all_bad)
    loader = make_train_loader(DataConfig(shards=paths, num_workers=0, streams=2), tokenizer, 0, 1, global_batch=2)
    with pytest.raises(RuntimeError, match="none of the 2 shards gave a usable sample"):
        next(iter(loader))
    # One stream per shard: in some epochs a stream draws only the bad shard and must move on.
    (tmp_path / "mixed").mkdir()
    paths = write_shards(tmp_path / "mixed", [3, 3, 3], bad={f"s0-{i:03d}": {"txt": b""} for i in range(3)})
    cfg = DataConfig(shards=paths, num_workers=0, streams=3, augment=False, image_size=8)
    steps = [b for b, _ in zip(make_train_loader(cfg, tokenizer, 0, 1, global_batch=3), range(30))]
    assert all(len(b["keys"]) == 3 for b in steps) and sum(b["skipped"].get("empty caption", 0) for b in steps)


def test_tar_reader_tells_truncated_and_corrupt_shards_from_clean_ends(tmp_path):
    [path] = write_shards(tmp_path, [4])
    offsets = member_offsets(path)
    data = open(path, "rb").read()
    keys = [f"s0-{i:03d}" for i in range(4)]

    def read(blob, skip=0):
        p = tmp_path / "x.tar"
        p.write_bytes(blob)
        return [(s.reason if not isinstance(s, tuple) else s[0]) for s in tar_samples(str(p), skip=skip)]

    assert read(data) == keys
    assert read(data, skip=3) == keys[3:]
    jpg_at, jpg_size = offsets["s0-002.jpg"]
    txt_at, _ = offsets["s0-002.txt"]
    end_of_last = offsets["s0-003.txt"][0] + 512  # end of the last member's data block
    assert read(data[:jpg_at + jpg_size // 2]) == keys[:2] + ["truncated shard"]  # cut inside a file
    assert read(data[:txt_at - 512]) == keys[:2] + ["truncated shard"]  # cut between members: s0-002 half there
    assert read(data[:txt_at - 300]) == keys[:2] + ["truncated shard"]  # cut inside a header
    assert read(data[:end_of_last]) == keys[:3] + ["truncated shard"]  # no end-of-archive block
    assert read(data[:end_of_last + 512]) == keys  # one zero block is a clean end (as tarfile reads it)
    garbage = data[:txt_at - 512] + bytes(range(256)) * 2 + data[txt_at:]
    assert read(garbage) == keys[:2] + ["corrupt shard"]
    assert read(b"") == ["truncated shard"]
    assert read(bytes(range(256)) * 8) == ["corrupt shard"]
    assert [s.reason for s in tar_samples(str(tmp_path / "nowhere.tar"))] == ["unreadable shard"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_reader_long_names_directories_and_loose_files(tmp_path, fmt):
    long_key = "deep/" + "k" * 150  # over the 100-byte name field: a pax or GNU long-name header
    members = [("deep", None), ("README", b"no extension: not part of any sample"),
               (f"{long_key}.jpg", b"J"), (f"{long_key}.TXT", b"caption"), ("short.seg.png", b"P")]
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    assert list(tar_samples(str(path))) == [(long_key, {"jpg": b"J", "txt": b"caption"}), ("short", {"seg.png": b"P"})]


def test_lost_shards_are_counted_and_the_rest_still_read(tmp_path, tokenizer):
    paths = write_shards(tmp_path, [5, 5, 5])
    offsets = member_offsets(paths[1])
    cut(paths[1], offsets["s1-003.jpg"][0] + 10)
    cfg = DataConfig(shards=paths, batch_size=4, image_size=16, num_workers=0)
    keys, skipped, _ = collect(make_eval_loader(cfg, tokenizer))
    assert skipped == {"truncated shard": 1}
    assert keys == [f"s{s}-{i:03d}" for s in range(3) for i in range(5) if not (s == 1 and i >= 3)]


def _img2dataset_dir(root) -> tuple[str, list[str]]:
    """img2dataset's output layout: 00000.tar with {key}.jpg/.txt/.json, plus .parquet and _stats.json."""
    out = root / "laion"
    out.mkdir()
    keys = []
    for shard in range(2):
        samples = []
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "caption": CAPTIONS[i % 4], "key": key,
                    "status": "success", "error_message": None, "width": 12, "height": 12,
                    "original_width": 640, "original_height": 480, "exif": "{}", "sha256": "0" * 64}
            sample = {"__key__": key, "jpg": jpeg(shard * 10 + i), "txt": CAPTIONS[i % 4].encode(),
                      "json": json.dumps(meta).encode()}
            if i == 4:
                del sample["txt"]  # captions also live in the json
            samples.append(sample)
            keys.append(key)
        write_tar(out / f"{shard:05d}.tar", samples)
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1" + bytes(100) + b"PAR1")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    return str(out), keys


def test_img2dataset_layout_loads_through_both_loaders(tmp_path, tokenizer):
    out, keys = _img2dataset_dir(tmp_path)
    tars = [f"{out}/00000.tar", f"{out}/00001.tar"]
    assert expand_shards([out]) == tars
    assert expand_shards([f"{out}/{{00000..00001}}.tar"]) == tars
    side_files_too = sorted(str(p) for p in (tmp_path / "laion").iterdir())  # what `laion/*` expands to
    assert expand_shards(side_files_too) == tars
    assert missing_local_shards([out]) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert missing_local_shards([str(empty)])
    with pytest.raises(ValueError, match="no .*tar"):
        DataConfig(shards=[str(empty)])

    for shards in ([out], side_files_too):
        cfg = DataConfig(shards=shards, batch_size=4, image_size=16, num_workers=1, streams=2, shuffle_window=3)
        got, skipped, _ = collect(make_eval_loader(cfg, tokenizer))
        assert got == keys and not skipped
        got, skipped, batches = collect(make_train_loader(cfg, tokenizer, 0, 1, global_batch=4, epochs=1))
        assert sorted(got) == keys and not skipped
        assert all(b["images"].shape[1:] == (3, 16, 16) for b in batches)


def test_missing_shard_names_field(tmp_path):
    write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="shards.*shard-000001.tar"):
        DataConfig(shards=[str(tmp_path / "shard-{000000..000001}.tar")])
    with pytest.raises(ValueError, match="shards"):
        DataConfig(shards=[])


def test_load_tokenizer_missing_dir_names_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_train_transform_never_flips():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[:, :24] = (255, 0, 0)  # red left third
    pil = Image.fromarray(img)
    torch.manual_seed(0)
    for color_augment in (False, True):
        t = train_transform(32, color_augment=color_augment)
        for _ in range(20):
            x = t(pil)  # (3, 32, 32)
            assert x.shape == (3, 32, 32)
            assert x[:, :, :8].mean() > x[:, :, -8:].mean()
    assert torch.equal(eval_transform(32)(pil), eval_transform(32)(pil))


def _jpeg_bytes(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(40, 200, (8, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    low.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_colour_maps_match_torchvision_where_nothing_clips():
    """Each sample's colour ops, composed into one map in the loader and applied to a whole batch by
    model_images (as on the training device), equal torchvision's step-by-step ops + Normalize."""
    from torchvision.transforms import functional as F

    from wenlan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, colour_map

    crop = torch.from_numpy(np.random.default_rng(0).integers(70, 170, (3, 16, 16), dtype=np.uint8))  # (3, 16, 16)
    x = crop.float() / 255

    def norm(img):
        return F.normalize(img, IMAGENET_MEAN, IMAGENET_STD)

    cases = [([("brightness", 1.3)], F.adjust_brightness(x, 1.3)),
             ([("contrast", 0.7)], F.adjust_contrast(x, 0.7)),
             ([("saturation", 1.4)], F.adjust_saturation(x, 1.4)),
             ([("grayscale", 0.0)], F.rgb_to_grayscale(x, 3)),
             ([("saturation", 0.8), ("contrast", 1.2), ("brightness", 0.9)],
              F.adjust_brightness(F.adjust_contrast(F.adjust_saturation(x, 0.8), 1.2), 0.9)),
             # a contrast whose grey level depends on an earlier contrast's (the mean term composes)
             ([("brightness", 1.1), ("contrast", 0.6), ("saturation", 1.2), ("contrast", 1.3)],
              F.adjust_contrast(F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, 1.1), 0.6), 1.2), 1.3)),
             ([], x),
             ([("hue", 0.0)], x)]  # hue 0 is the identity
    got = model_images(crop.expand(len(cases), 3, 16, 16), torch.stack([colour_map(ops) for ops, _ in cases]))
    for (ops, want), row in zip(cases, got):
        torch.testing.assert_close(row, norm(want), atol=1e-4, rtol=0, msg=str(ops))
    # hue: a rotation of chroma that keeps luma
    shifted = model_images(crop[None], colour_map([("hue", 0.08)])[None])[0]
    unnorm = shifted * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    torch.testing.assert_close((unnorm * luma).sum(0), (x * luma).sum(0), atol=1e-3, rtol=0)
    assert (unnorm - x).abs().max() > 0.01


def test_train_transform_decoders_agree_and_draws_follow_the_seed():
    from wenlan.data.transforms import TrainTransform

    t = TrainTransform(64)
    big = _jpeg_bytes((640, 560))  # crops ~9x the output: decoded at 1/4 or 1/8 scale in the DCT domain
    small = _jpeg_bytes((90, 80), seed=1)  # crops < 2x the output: decoded in full
    for data in (big, small):
        for seed in range(6):
            with Image.open(io.BytesIO(data)) as im:
                fast = t(im, seed=seed, encoded=data)
            full = t(Image.open(io.BytesIO(data)).convert("RGB"), seed=seed)  # decoded in full by PIL
            assert fast.shape == (3, 64, 64) and fast.is_contiguous()
            if data is small:  # the same libjpeg-turbo decode, the same pixels
                assert torch.equal(fast, full), seed
            else:  # DCT-domain downscale + sub-pixel box rounding: a few grey levels (1.0 here ~ 58 levels)
                assert 0 < (fast - full).abs().mean() < 0.08, seed
    with Image.open(io.BytesIO(small)) as a, Image.open(io.BytesIO(small)) as b, Image.open(io.BytesIO(small)) as c:
        assert torch.equal(t(a, seed=3, encoded=small), t(b, seed=3, encoded=small))
        assert not torch.equal(t(a, seed=3), t(c, seed=4))


def _is_subsequence(short: list[int], long: list[int]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def test_second_views_follow_the_sample_seed_at_any_world_size(tmp_path, tokenizer):
    """views=True: a second image view drawn from the sample's own seed (the same samples and draws on
    1 and 2 ranks; the first view is the one a loader without views gives), and a second textual view:
    the sample's tags where it has them, else its caption with units dropped."""
    tagged = {f"s{s}-{i:03d}": {"tags": "红色  圆形".encode()} for s in (0, 1) for i in range(6)}
    paths = write_shards(tmp_path, [6, 6, 6, 6], bad=tagged)
    cfg = DataConfig(shards=paths, image_size=16, max_text_len=16, num_workers=0, streams=4, shuffle_window=4,
                     views=True)
    one = collect(make_train_loader(cfg, tokenizer, rank=0, world_size=1, global_batch=8, epochs=1))[2]
    two = [collect(make_train_loader(cfg, tokenizer, rank=r, world_size=2, global_batch=8, epochs=1))[2] for r in (0, 1)]
    plain = collect(make_train_loader(DataConfig(**{**cfg.__dict__, "views": False}), tokenizer, rank=0,
                                      world_size=1, global_batch=8, epochs=1))[2]
    fields = ("images", "colour_maps", "images2", "colour_maps2", "input_ids2", "attention_mask2")
    for step, batch in enumerate(one):
        for name in fields:
            assert torch.equal(torch.cat([two[0][step][name], two[1][step][name]]), batch[name]), (step, name)
        assert torch.equal(batch["images"], plain[step]["images"]) and "images2" not in plain[step]
        assert torch.equal(batch["colour_maps"], plain[step]["colour_maps"])
    images, images2 = (torch.cat([b[k] for b in one]) for k in ("images", "images2"))
    maps, maps2 = (torch.cat([b[k] for b in one]) for k in ("colour_maps", "colour_maps2"))
    differ = [not (torch.equal(images[i], images2[i]) and torch.equal(maps[i], maps2[i])) for i in range(len(images))]
    assert all(differ), "a second view repeated the first view's draws"
    tags = tokenizer("红色 圆形")["input_ids"]
    dropped = 0
    for batch in one:
        for key, ids, mask, ids2, mask2 in zip(batch["keys"], batch["input_ids"], batch["attention_mask"],
                                               batch["input_ids2"], batch["attention_mask2"]):
            caption, text2 = ids[mask.bool()].tolist(), ids2[mask2.bool()].tolist()
            if short_key(key) in tagged:
                assert text2 == tags
            else:  # [CLS] units [SEP]: a subsequence of the caption's units, at least one of them
                assert len(text2) >= 3 and _is_subsequence(text2[1:-1], caption[1:-1])
                dropped += len(text2) < len(caption)
    assert dropped > 0
