"""wenlan.data: skip-and-count of bad samples, shapes, rank/worker partition, determinism."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools.make_demo_data import train_tokenizer
from wenlan.data import DataConfig, eval_transform, load_tokenizer, make_eval_loader, make_train_loader, train_transform

CAPTIONS = ["红色圆形在左上角", "蓝色方块在右下角", "绿色三角形在中间", "黄色星形在左侧"]


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(root, n_shards: int, per_shard: int, bad: dict | None = None) -> list[str]:
    """Shards of `per_shard` samples keyed s{shard}-{i}; `bad` maps key -> field overrides (None drops)."""
    bad = bad or {}
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
            for i in range(per_shard):
                key = f"s{s}-{i:03d}"
                sample = {"__key__": key, "jpg": _jpeg(s * 1000 + i), "txt": CAPTIONS[i % 4].encode()}
                sample.update(bad.get(key, {}))
                sample = {k: v for k, v in sample.items() if v is not None}
                sink.write(sample)
        paths.append(str(path))
    return paths


def all_keys(n_shards, per_shard):
    return [f"s{s}-{i:03d}" for s in range(n_shards) for i in range(per_shard)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(CAPTIONS * 10, out)
    return load_tokenizer(str(out))


@pytest.fixture
def bad_shards(tmp_path):
    """3 shards x 10; one truncated JPEG, one whitespace caption, the latter last of all."""
    truncated = _jpeg(7)[:300]
    paths = write_shards(tmp_path, 3, 10, bad={"s1-004": {"jpg": truncated}, "s2-009": {"txt": b"  \n"}})
    good = [k for k in all_keys(3, 10) if k not in ("s1-004", "s2-009")]
    return paths, good


def collect(loader):
    keys, skipped, batches = [], 0, []
    for b in loader:
        keys += b["keys"]
        skipped += b["skipped"]
        batches.append(b)
    return keys, skipped, batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_skips_and_counts_bad_samples(bad_shards, tokenizer, num_workers):
    paths, good = bad_shards
    # 28 good samples in batches of 7: the trailing bad sample has no batch left to ride on.
    cfg = DataConfig(shards=paths, batch_size=7, image_size=32, num_workers=num_workers)
    keys, skipped, batches = collect(make_eval_loader(cfg, tokenizer))
    assert skipped == 2
    assert sorted(keys) == sorted(good)
    if num_workers == 0:  # one worker: exact shard order, and only the final batch may be short
        assert keys == good
        assert [len(b["keys"]) for b in batches] == [7, 7, 7, 7, 0]  # B == 0 carries the last skip


def test_eval_keeps_short_last_batch_and_skips_missing_fields(tmp_path, tokenizer):
    bad = {"s0-003": {"txt": None}, "s0-005": {"jpg": None}, "s0-006": {"jpg": b"not a jpeg"}}
    paths = write_shards(tmp_path, 1, 10, bad=bad)
    cfg = DataConfig(shards=paths, batch_size=4, image_size=32, num_workers=0)
    keys, skipped, batches = collect(make_eval_loader(cfg, tokenizer))
    assert skipped == 3 and keys == [k for k in all_keys(1, 10) if k not in bad]
    assert [len(b["keys"]) for b in batches] == [4, 3]  # nothing dropped in eval


def test_train_batches_shapes_dtypes_drop_last(bad_shards, tokenizer):
    paths, good = bad_shards
    cfg = DataConfig(shards=paths, batch_size=8, image_size=32, max_text_len=16, num_workers=0,
                     shuffle_buffer=5, color_augment=False)
    keys, skipped, batches = collect(make_train_loader(cfg, tokenizer, rank=0, world_size=1, epochs=1))
    full = [b for b in batches if b["keys"]]
    assert len(full) == len(good) // 8 and len(keys) == 24  # 28 good -> 3 full batches, 4 dropped
    assert skipped == 2  # skips in the dropped tail still arrive
    for b in full:
        assert b["images"].shape == (8, 3, 32, 32) and b["images"].dtype == torch.float32
        assert b["input_ids"].shape == (8, 16) and b["input_ids"].dtype == torch.long
        assert b["attention_mask"].shape == (8, 16) and b["attention_mask"].dtype == torch.long
        assert (b["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert set(keys) <= set(good)


@pytest.mark.parametrize("n_shards", [8, 3])  # 8 >= 2 ranks x 2 workers; 3 < 4 uses the per-sample split
def test_ranks_and_workers_partition_one_epoch(tmp_path, tokenizer, n_shards):
    paths = write_shards(tmp_path, n_shards, 5)
    cfg = DataConfig(shards=paths, batch_size=1, image_size=16, num_workers=2, shuffle_buffer=4)
    per_rank = [collect(make_train_loader(cfg, tokenizer, rank=r, world_size=2, epochs=1))[0] for r in (0, 1)]
    for keys in per_rank:
        assert len(keys) == len(set(keys)), "a sample reached two workers of one rank"
    assert not set(per_rank[0]) & set(per_rank[1]), "a sample reached both ranks"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys(n_shards, 5))
    if n_shards == 8:  # shard-level split: a shard's samples all go to one rank
        owner = {k.split("-")[0]: r for r, keys in enumerate(per_rank) for k in keys}
        assert all(owner[k.split("-")[0]] == r for r, keys in enumerate(per_rank) for k in keys)


def _first_batches(paths, tokenizer, seed, num_workers, n=4, epoch_offset=0):
    cfg = DataConfig(shards=paths, batch_size=6, image_size=24, num_workers=num_workers, seed=seed,
                     shuffle_buffer=10)
    out = []
    for b in make_train_loader(cfg, tokenizer, rank=0, world_size=1, epoch_offset=epoch_offset):
        out.append(b)
        if len(out) == n:
            return out


def test_deterministic_for_seed(tmp_path, tokenizer):
    paths = write_shards(tmp_path, 4, 6)
    torch.manual_seed(123)
    a = _first_batches(paths, tokenizer, seed=0, num_workers=0)
    torch.manual_seed(456)  # the caller's global RNG must not matter
    b = _first_batches(paths, tokenizer, seed=0, num_workers=1)  # nor worker processes
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    c = _first_batches(paths, tokenizer, seed=1, num_workers=0)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    # The stream runs past one epoch (24 samples, 4 x 6 = 24, then more).
    assert len(_first_batches(paths, tokenizer, seed=0, num_workers=0, n=9)) == 9


def test_missing_shard_names_field(tmp_path):
    write_shards(tmp_path, 1, 2)
    with pytest.raises(ValueError, match="shards.*shard-000001.tar"):
        DataConfig(shards=[str(tmp_path / "shard-{000000..000001}.tar")], batch_size=2)
    with pytest.raises(ValueError, match="shards"):
        DataConfig(shards=[], batch_size=2)


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
