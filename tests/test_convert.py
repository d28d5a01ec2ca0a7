"""Importing a released BriVL-1.0 checkpoint: every tensor placed, nothing invented, and the imported
model computing what BriVL's own code computes with the same weights."""

import argparse
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from brivl_reference import grid_boxes_px, released_learnable
from helpers import ROOT, cpu_env
from wenlan.convert import check_against_preset, released_to_wenlan, wenlan_to_released

# What the import leaves out, each unread by BriVL's forward: the ImageNet classifier, BERT's pooler
# and its position-id constant (the last exists only in checkpoints of older transformers versions).
DROPPED = ("backbone.classifier.", "backbone.bert.pooler.", "backbone.bert.embeddings.position_ids")


@pytest.fixture(scope="module")
def released():
    state, image, text = released_learnable(seed=0)
    towers = ("imgencoder.", "imgencoder_mom.", "textencoder.", "textencoder_mom.")
    # A checkpoint of an older transformers also carries BERT's position ids.
    for tower in towers[2:]:
        state[tower + "backbone.bert.embeddings.position_ids"] = torch.arange(512)[None]
    return state, image, text


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    """`python -m wenlan.convert brivl` on the released layout, as a user runs it."""
    tmp = tmp_path_factory.mktemp("convert")
    torch.save({"learnable": released[0], "epoch": 3}, tmp / "BriVL-1.0-test.pth")
    tokenizer = tmp / "tokenizer"  # a WordPiece tokenizer directory, as chinese-roberta-wwm-ext's is
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "色"]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tokenizer)
    out = tmp / "brivl-1.0.safetensors"
    proc = subprocess.run([sys.executable, "-m", "wenlan.convert", "brivl", "--checkpoint",
                           str(tmp / "BriVL-1.0-test.pth"), "--tokenizer", str(tokenizer), "--out", str(out)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "brivl-1.0 preset" in proc.stdout
    (tmp / "BriVL-1.0-test.pth").unlink()
    yield out
    # 2 GB at full size: gone before the modules that follow write their own checkpoints.
    shutil.rmtree(tmp, ignore_errors=True)


def test_every_released_tensor_lands_where_it_should(released, converted):
    from safetensors.torch import load_file

    state = released[0]
    tensors = load_file(str(converted))
    kept = {k: v for k, v in state.items() if not k.split(".", 1)[1].startswith(DROPPED)}
    assert len(kept) < len(state)  # classifier, pooler and position ids were there and were left out
    back = wenlan_to_released(tensors)
    assert set(back) == set(kept)
    for name, tensor in kept.items():
        assert torch.equal(back[name], tensor), name
    # Spot checks of the mapping itself, not only of its inverse.
    torch.testing.assert_close(tensors["image_tower.region_pool.proj.weight"],
                               state["imgencoder.learnable.max_pool.0.weight"][:, :, 0, 0], rtol=0, atol=0)
    assert torch.equal(tensors["momentum.text_tower.encoder.3.qkv.weight"],
                       state["textencoder_mom.learnable.textAtt.layers.3.self_attn.in_proj_weight"])
    assert torch.equal(tensors["image_tower.backbone.net.bn2.running_var"],
                       state["imgencoder.backbone.bn2.running_var"])
    assert tensors["log_scale"].item() == pytest.approx(torch.tensor(1 / 0.07).log().item())


def test_imported_model_computes_what_brivl_computes(released, converted):
    """Same weights, same 380x380 input with the 6x6 + whole-image boxes, same unpadded token ids:
    embeddings equal to BriVL's (cosine > 0.9999), with BriVL's region sampling."""
    import wenlan

    _, image, text = released
    model = wenlan.load(str(converted))
    torch.manual_seed(1)
    images = torch.randn(2, 3, 380, 380)
    ids = torch.randint(5, 21128, (2, 17))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours_img = model.encode_image(images)
        ours_txt = model.encode_text({"input_ids": ids, "attention_mask": mask})
        theirs_img = F.normalize(image(images, grid_boxes_px()), dim=-1)
        theirs_txt = F.normalize(text(ids, mask), dim=-1)
    assert F.cosine_similarity(ours_img, theirs_img).min() > 0.9999
    assert F.cosine_similarity(ours_txt, theirs_txt).min() > 0.9999
    # The check can fail: the two images' (and texts') embeddings are told apart at this bound.
    assert F.cosine_similarity(ours_img, theirs_img[[1, 0]]).max() < 0.99
    assert F.cosine_similarity(ours_txt, theirs_txt[[1, 0]]).max() < 0.99
    assert model.tokenizer("红色")["input_ids"] == [2, 5, 6, 3]  # the tokenizer travelled with the weights


def test_import_fails_loudly(released, tmp_path):
    state = released[0]
    with pytest.raises(ValueError, match="no place in the brivl-1.0 preset"):
        released_to_wenlan({**state, "imgencoder.learnable.generator.fc.weight": torch.zeros(2)})
    wrong = released_to_wenlan({k: v for k, v in state.items() if "textencoder." in k})
    wrong["text_tower.head.fc2.weight"] = torch.zeros(1024, 2048)
    with pytest.raises(ValueError, match=r"preset tensors not in it .*shapes differ.*text_tower.head.fc2.weight"):
        check_against_preset(wrong)
    bad_positions = {"textencoder.backbone.bert.embeddings.position_ids": torch.arange(512).flip(0)}
    with pytest.raises(ValueError, match="position"):
        released_to_wenlan(bad_positions)

    # A checkpoint with pickled objects besides tensors is not unpickled unless asked to.
    torch.save({"learnable": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    (tmp_path / "tok").mkdir()
    proc = subprocess.run([sys.executable, "-m", "wenlan.convert", "brivl", "--checkpoint", str(tmp_path / "pickled.pth"),
                           "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x.safetensors")],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--allow-pickle" in proc.stderr
