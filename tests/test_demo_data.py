"""data_tools/make_demo_data.py: reproducible bytes, idempotent rerun, well-posed val, tokenizer."""

import io
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from data_tools import make_demo_data as demo

ARGS = dict(n_train=300, n_val=100, seed=0, image_size=32, shard_size=128)


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_split(root: Path, split: str) -> list[dict]:
    shards = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    demo.write_demo_shards(out, **ARGS, quiet=True)
    return out


def test_same_seed_same_bytes_other_seed_differs(demo_dir, tmp_path):
    demo.write_demo_shards(tmp_path / "b", **ARGS, workers=2, quiet=True)  # process count must not matter
    a, b = tree_bytes(demo_dir), tree_bytes(tmp_path / "b")
    assert a == b
    assert set(a) >= {"train-000000.tar", "train-000002.tar", "val-000000.tar", "DONE", "tokenizer/tokenizer.json"}
    assert not any(name.endswith(".tmp") for name in a)
    demo.write_demo_shards(tmp_path / "c", **dict(ARGS, seed=1), quiet=True)
    assert tree_bytes(tmp_path / "c")["train-000000.tar"] != a["train-000000.tar"]


def test_rerun_does_nothing(demo_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")}
    demo.write_demo_shards(demo_dir, **ARGS)
    assert "already complete" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*")}
    with pytest.raises(SystemExit, match="other arguments"):
        demo.write_demo_shards(demo_dir, **dict(ARGS, seed=5), quiet=True)


def test_sample_counts_and_val_combos_unique(demo_dir):
    train, val = read_split(demo_dir, "train"), read_split(demo_dir, "val")
    assert len(train) == ARGS["n_train"] and len(val) == ARGS["n_val"]
    combos = [json.loads(s["json"])["combo_id"] for s in val]
    assert len(set(combos)) == len(combos)
    keys = [s["__key__"] for s in train + val]
    assert len(set(keys)) == len(keys)
    assert Image.open(io.BytesIO(val[0]["jpg"])).size == (ARGS["image_size"], ARGS["image_size"])


def test_captions_name_every_attribute(demo_dir):
    for s in read_split(demo_dir, "train") + read_split(demo_dir, "val"):
        caption, meta = s["txt"].decode(), json.loads(s["json"])
        assert demo.combo_attributes(meta["combo_id"]) == {a: meta[a] for a in demo.ATTRIBUTES}
        for attr in demo.ATTRIBUTES:
            assert any(w in caption for w in demo.synonyms(attr, meta[attr])), (attr, caption)


def test_tags_are_the_drawn_attributes(demo_dir):
    """The tag view: the five canonical attribute names, in attribute order, separated by spaces."""
    for s in read_split(demo_dir, "train") + read_split(demo_dir, "val"):
        meta = json.loads(s["json"])
        assert s["tags"].decode().split(" ") == [meta[a] for a in demo.ATTRIBUTES]


def test_tokenizer_loads_and_round_trips(demo_dir):
    tok = AutoTokenizer.from_pretrained(str(demo_dir / "tokenizer"))
    assert {tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token} == set(demo.SPECIAL_TOKENS)
    for s in read_split(demo_dir, "val"):
        caption = s["txt"].decode()
        ids = tok(caption)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) <= 32  # fits the default DataConfig.max_text_len
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == caption


def test_vocabulary_is_large_and_colours_contrast():
    assert demo.N_COMBOS >= 5000 and len(demo.TEMPLATES) >= 5
    for (rgb, _), (bg, _) in product(demo.COLORS.values(), demo.BACKGROUNDS.values()):
        assert np.linalg.norm(np.subtract(rgb, bg)) >= 90, (rgb, bg)
    # Every template names every attribute slot.
    for t in demo.TEMPLATES:
        assert all(slot in t for slot in ("{shape}", "{color}", "{pos}", "{bg}")) and "{size_" in t
    with pytest.raises(ValueError, match="n_val"):
        demo.split_combos(10, demo.N_COMBOS + 1, 0)
