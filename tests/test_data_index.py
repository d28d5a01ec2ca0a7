"""The train loader with verify_shards' index.json: epoch size, streams balanced by sample count, and
an index that disagrees with the shards (a clear error or warning naming the fix, never a hang).

World-size invariance and exact resume with an index: test_data_order.py.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest

from data_tools.verify_shards import verify
from test_data import collect, tokenizer, write_shards  # noqa: F401  (tokenizer is a fixture)
from wenlan.data import DataConfig, make_train_loader

SIZES = [40, 3, 5, 36, 2, 4, 30, 6, 3, 28, 5, 2, 4, 3, 25, 4]  # 200 samples; ideal 50 per stream of 4


def indexed(root: Path, sizes: list[int], **kw) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = write_shards(root, sizes, **kw)
    verify([Path(p) for p in paths], root / "index.json")
    return paths


def cfg_for(shards, **kw) -> DataConfig:
    return DataConfig(shards=shards, image_size=8, max_text_len=8, num_workers=0, shuffle_window=8, augment=False,
                      **{"streams": 4, **kw})


def stream_totals(shards, tokenizer, **kw) -> tuple[list[int], object]:
    """Samples of each of 4 streams in epoch 0: 4 ranks of one stream each, one epoch."""
    loaders = [make_train_loader(cfg_for(shards, **kw), tokenizer, r, 4, global_batch=8, epochs=1) for r in range(4)]
    return [len(collect(loader)[0]) for loader in loaders], loaders[0]


def test_index_sizes_the_epoch_and_balances_streams(tmp_path, tokenizer, caplog):
    paths = indexed(tmp_path, SIZES)
    with caplog.at_level(logging.INFO, logger="wenlan.data.pipeline"):
        totals, loader = stream_totals([str(tmp_path)], tokenizer)
    assert sum(totals) == loader.samples_per_epoch == 200 and loader.steps_per_epoch == 25
    assert max(totals) - min(totals) <= 5, totals  # largest first to the emptiest stream: 49/50/48/53
    assert "200 samples per epoch (25.0 steps of global batch 8)" in caplog.text
    # Round robin by shard position (no index): the same shards, far less even, epoch size unknown.
    rr_totals, rr_loader = stream_totals(paths, tokenizer, index=None)
    assert sum(rr_totals) == 200 and rr_loader.samples_per_epoch is None
    assert max(rr_totals) - min(rr_totals) > 20, rr_totals


def test_equal_counts_keep_the_round_robin_order(tmp_path, tokenizer):
    indexed(tmp_path, [6] * 8)
    runs = []
    for index in ("auto", None):
        loader = make_train_loader(cfg_for([str(tmp_path)], index=index), tokenizer, 0, 1, global_batch=8, epochs=2)
        runs.append(collect(loader)[0])
    assert runs[0] == runs[1] and len(runs[0]) == 96


def test_explicit_index_elsewhere_and_index_none(tmp_path, tokenizer):
    paths = write_shards(tmp_path, [5, 9, 7, 3])
    elsewhere = tmp_path / "meta" / "pairs-index.json"
    verify([Path(p) for p in paths], elsewhere)  # paths in it are relative: ../shard-000000.tar
    loader = make_train_loader(cfg_for(paths, index=str(elsewhere)), tokenizer, 0, 1, global_batch=8)
    assert loader.samples_per_epoch == 24
    assert make_train_loader(cfg_for(paths), tokenizer, 0, 1, global_batch=8).samples_per_epoch is None  # not beside
    with pytest.raises(ValueError, match=r"DataConfig.index: no such file .*verify_shards.py"):
        cfg_for(paths, index=str(tmp_path / "nowhere.json"))


def test_index_older_than_the_shards_is_an_error_naming_the_fix(tmp_path, tokenizer):
    indexed(tmp_path, [5, 5, 5, 5])
    write_shards(tmp_path, [5, 5, 5, 5, 6])  # a fifth shard (and the same four again) after the index
    with pytest.raises(ValueError, match=r"does not list 1 of the training shards .*shard-000004.tar.*older than "
                                         r"the shards. Re-run `python data_tools/verify_shards.py .*`"):
        make_train_loader(cfg_for([str(tmp_path)]), tokenizer, 0, 1, global_batch=8)


def test_rewritten_shard_is_an_error_naming_the_fix(tmp_path, tokenizer):
    indexed(tmp_path, [5, 5, 5, 5])
    (tmp_path / "new").mkdir()
    [fresh] = write_shards(tmp_path / "new", [9])
    shutil.copy(fresh, tmp_path / "shard-000002.tar")
    with pytest.raises(ValueError, match=r"1 shard\(s\) changed since the index .*stale: .*shard-000002.tar .*"
                                         r"Re-run `python data_tools/verify_shards.py"):
        make_train_loader(cfg_for([str(tmp_path)]), tokenizer, 0, 1, global_batch=8)


def test_stale_count_warns_when_read_and_the_epoch_still_ends(tmp_path, tokenizer, caplog):
    indexed(tmp_path, [5, 6, 7, 8])
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["samples"] = 9  # a count that no longer matches the tar (same bytes)
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = make_train_loader(cfg_for([str(tmp_path)]), tokenizer, 0, 1, global_batch=8, epochs=1)
    assert loader.samples_per_epoch == 29
    with caplog.at_level(logging.WARNING, logger="wenlan.data.pipeline"):
        keys, skipped, _ = collect(loader)
    assert len(keys) == 26 and not skipped
    assert "shard-000001.tar holds 6 samples but the shard index says 9: the index is stale" in caplog.text
    assert "verify_shards.py" in caplog.text


def test_shard_gone_from_disk_warns(tmp_path, tokenizer, caplog):
    indexed(tmp_path, [5, 5, 5, 5, 5])
    (tmp_path / "shard-000003.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="wenlan.data.index"):
        loader = make_train_loader(cfg_for([str(tmp_path)]), tokenizer, 0, 1, global_batch=8, epochs=1)
    assert loader.samples_per_epoch == 20 and len(collect(loader)[0]) == 20
    assert "lists 1 shard(s) that are not on disk (e.g. shard-000003.tar)" in caplog.text


def test_too_few_shards_or_too_few_non_empty_shards_for_the_streams(tmp_path, tokenizer):
    indexed(tmp_path / "three", [4, 4, 4])
    with pytest.raises(ValueError, match=r"3 shard\(s\) for DataConfig.streams=4.*at least 4 shards"):
        make_train_loader(cfg_for([str(tmp_path / "three")]), tokenizer, 0, 1, global_batch=8)
    empty = {f"s{s}-{i:03d}": {"txt": b""} for s in (1, 3) for i in range(4)}
    indexed(tmp_path / "empty", [4, 4, 4, 4, 4], bad=empty)
    with pytest.raises(ValueError, match=r"only 3 of the 5 shards hold samples .*streams=4.*re-run verify_shards"):
        make_train_loader(cfg_for([str(tmp_path / "empty")]), tokenizer, 0, 1, global_batch=8)


def test_index_in_only_some_shard_directories_is_not_used(tmp_path, tokenizer, caplog):
    a = indexed(tmp_path / "a", [5, 5])
    (tmp_path / "b").mkdir()
    b = write_shards(tmp_path / "b", [5, 5], name="more-{:06d}.tar")
    with caplog.at_level(logging.WARNING, logger="wenlan.data.index"):
        loader = make_train_loader(cfg_for(a + b), tokenizer, 0, 1, global_batch=8)
    assert loader.samples_per_epoch is None
    assert "has none" in caplog.text and "verify_shards.py" in caplog.text
