"""The training sample order: the same at any world size and worker count, and exactly resumable.

One reference run (1 rank, no workers) over uneven shards with bad samples and a truncated shard,
8 streams, windows of 4, augmentation on; every other run must reproduce its step batches bitwise.
Two data sets: 10 shards split round robin, and 12 very uneven shards with verify_shards' index.json
beside them, split by sample count (the index also marks the truncated shard broken).
"""

import json
from pathlib import Path

import pytest
import torch

from data_tools.verify_shards import verify
from test_data import cut, member_offsets, tokenizer, write_shards  # noqa: F401  (tokenizer is a fixture)
from wenlan.data import DataConfig, make_train_loader, merge_positions

SIZES = {"round-robin": [7, 9, 5, 11, 6, 8, 10, 5, 12, 7], "index": [3, 14, 5, 21, 9, 2, 16, 6, 3, 11, 4, 2]}
STREAMS, GLOBAL_BATCH, WINDOW, STEPS = 8, 16, 4, 12


@pytest.fixture(scope="module", params=sorted(SIZES))
def shards(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    paths = write_shards(root, SIZES[request.param],
                         bad={"s3-002": {"jpg": b"\xff\xd8 not really"}, "s6-005": {"txt": b" "}})
    cut(paths[4], member_offsets(paths[4])["s4-004.jpg"][0] + 50)  # s4 keeps 4 samples, then is truncated
    if request.param == "index":
        index = verify([Path(p) for p in paths], root / "index.json")
        assert [b["path"] for b in index["broken"]] == ["shard-000004.tar"]
    return paths


def config(shards, num_workers):
    return DataConfig(shards=shards, image_size=16, max_text_len=12, num_workers=num_workers, streams=STREAMS,
                      shuffle_window=WINDOW, seed=3, augment=True, color_augment=True)


def run(shards, tokenizer, world, num_workers, steps, position=None):
    """`steps` step batches of each rank, joined across ranks as one global batch per step."""
    loaders = [iter(make_train_loader(config(shards, num_workers), tokenizer, r, world, global_batch=GLOBAL_BATCH,
                                      position=position)) for r in range(world)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in loaders]
        skipped = {}
        for p in parts:
            for reason, n in p["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        out.append({
            "keys": [k for p in parts for k in p["keys"]],
            "images": torch.cat([p["images"] for p in parts]),  # (G, 3, H, W)
            "colour_maps": torch.cat([p["colour_maps"] for p in parts]),  # (G, 3, 7)
            "input_ids": torch.cat([p["input_ids"] for p in parts]),  # (G, L)
            "skipped": skipped,
            "position": merge_positions([p["position"] for p in parts]),
            "per_rank": [len(p["keys"]) for p in parts],
        })
    return out


@pytest.fixture(scope="module")
def reference(shards, tokenizer):
    return run(shards, tokenizer, world=1, num_workers=0, steps=STEPS)


def assert_same_steps(got, want):
    for step, (g, w) in enumerate(zip(got, want)):
        assert g["keys"] == w["keys"], f"step {step}: keys differ"
        assert torch.equal(g["images"], w["images"]), f"step {step}: images differ"
        assert torch.equal(g["colour_maps"], w["colour_maps"]), f"step {step}: colour augmentation differs"
        assert torch.equal(g["input_ids"], w["input_ids"]), f"step {step}: tokens differ"
        assert g["skipped"] == w["skipped"], f"step {step}: skip counts differ"
        assert g["position"] == w["position"], f"step {step}: positions differ"
    assert len(got) == len(want)


def test_reference_run_covers_epochs_skips_and_augmentation(shards, tokenizer, reference):
    loader = make_train_loader(config(shards, 0), tokenizer, 0, 1, global_batch=GLOBAL_BATCH)
    if (Path(shards[0]).parent / "index.json").is_file():  # the index set: good samples of the intact shards
        assert loader.samples_per_epoch == sum(SIZES["index"]) - 2 - SIZES["index"][4]
    else:
        assert loader.samples_per_epoch is None
    assert all(len(s["keys"]) == GLOBAL_BATCH for s in reference)
    assert min(p[0] for p in reference[-1]["position"].values()) >= 1  # every stream is past epoch 0
    skipped = {}
    for s in reference:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert {"undecodable image", "empty caption", "truncated shard"} <= set(skipped)
    # Augmentation is on and drawn per (epoch, sample): a sample seen in two epochs looks different
    # (bar the odd one that draws no colour change and the same crop twice: 12 px images allow few crops).
    seen = {}
    for s in reference:
        for key, image, colours in zip(s["keys"], s["images"], s["colour_maps"]):
            seen.setdefault(key, []).append((image, colours))
    twice = [views for views in seen.values() if len(views) > 1]
    differ = [not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) for a, b, *_ in twice]
    assert len(twice) > 20 and sum(differ) >= 0.95 * len(twice)


@pytest.mark.parametrize("world,num_workers", [(1, 2), (2, 0), (2, 2), (4, 0), (4, 2)])
def test_any_world_size_and_worker_count_gives_the_one_rank_batches(shards, tokenizer, reference, world, num_workers):
    got = run(shards, tokenizer, world, num_workers, STEPS)
    assert_same_steps(got, reference)
    assert all(s["per_rank"] == [GLOBAL_BATCH // world] * world for s in got)


# (k, world size, workers) of the resumed run; k = steps done before the "kill".
RESUMES = [(1, 1, 0), (3, 2, 2), (5, 4, 0), (6, 1, 2), (8, 2, 0), (10, 4, 2)]


def test_resume_points_cover_mid_window_shard_ends_and_epoch_boundaries(reference):
    positions = [p for k, _, _ in RESUMES for p in reference[k - 1]["position"].values()]
    assert any(p[2] % WINDOW for p in positions), "no resume point inside a shuffle window"
    assert any(p[2] and p[2] % WINDOW == 0 for p in positions), "no resume point on a window boundary"
    assert any(p[0] >= 1 for p in positions), "no resume point after an epoch boundary"
    mixed = [reference[k - 1]["position"] for k, _, _ in RESUMES]
    assert any(len({p[0] for p in pos.values()}) > 1 for pos in mixed), "no point with streams in different epochs"


@pytest.mark.parametrize("k,world,num_workers", RESUMES)
def test_resume_continues_exactly(shards, tokenizer, reference, k, world, num_workers):
    # A checkpoint stores the merged positions, e.g. as JSON (which turns the stream indices into strings).
    position = json.loads(json.dumps(reference[k - 1]["position"]))
    got = run(shards, tokenizer, world, num_workers, STEPS - k, position=position)
    assert_same_steps(got, reference[k:])
