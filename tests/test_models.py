"""Towers, presets and their parameter counts."""

import json
import subprocess
import sys

import pytest
import torch

from wenlan.models import PRESETS, BriVL, count_parameters, get_preset
from wenlan.models.towers import grid_boxes


def tiny_batch(B=3, L=10, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    ids[mask == 0] = 0
    return torch.randn(B, 3, 64, 64, generator=g), ids, mask


def test_tiny_forward_gives_unit_embeddings_and_no_key_grads():
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny")).train()
    img_q, txt_q, img_k, txt_k = model(*tiny_batch())
    for e in (img_q, txt_q, img_k, txt_k):
        assert e.shape == (3, 128)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert img_q.requires_grad and not img_k.requires_grad and not txt_k.requires_grad


def test_padding_does_not_change_text_embedding():
    """Padding is masked in BERT, the attention layers and the mean (BriVL-1.0 attended to it)."""
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"), momentum=False).eval()
    _, ids, mask = tiny_batch()
    short = model.encode_text(ids[:1, :6], mask[:1, :6])
    padded = model.encode_text(ids[:1], mask[:1])
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


def test_region_boxes_are_grid_plus_whole_image():
    boxes = grid_boxes(6)
    assert boxes.shape == (37, 4)
    assert boxes[-1].tolist() == [-1, -1, 1, 1]
    assert boxes[0].tolist() == pytest.approx([-1, -1, -1 + 2 / 6, -1 + 2 / 6])


def test_bf16_model_keeps_fp32_region_sample_positions():
    """model.bfloat16() casts the weights, not the sample grid: bf16 would move the points (by up to
    2^-9 of the map) and grid_sample refuses a bf16 grid for an fp32 map."""
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"), momentum=False)
    grid = model.image_tower.region_pool.sample_grid.clone()
    images = torch.randn(2, 3, 64, 64)
    reference = model.encode_image(images)
    model.bfloat16()
    assert model.image_tower.region_pool.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.image_tower.region_pool.sample_grid, grid)  # still fp32, the same points
    torch.testing.assert_close(model.encode_image(images.bfloat16()).float(), reference, atol=0.05, rtol=0)


def test_preset_sizes():
    counts = {name: count_parameters(cfg) for name, cfg in PRESETS.items() if name != "10b"}
    assert 0.9e9 <= counts["1b"]["online_trainable"] <= 1.1e9
    assert counts["tiny"]["online_trainable"] < 5e6
    assert counts["brivl-1.0"]["frozen"] > 0  # frozen EfficientNet blocks 0-2 and BERT layers 0-7
    for c in counts.values():
        assert c["momentum"] == c["online_trainable"] + c["frozen"]
        assert c["total"] == c["online_trainable"] + c["frozen"] + c["momentum"]


def test_presets_cli_json_counts_on_meta_device():
    out = subprocess.run([sys.executable, "-m", "wenlan.models.presets", "--json"], capture_output=True,
                         text=True, check=True)
    counts = json.loads(out.stdout)
    assert set(counts) == {"tiny", "tiny-vit", "base", "1b", "10b", "brivl-1.0"}
    assert 0.9e10 <= counts["10b"]["online_trainable"] <= 1.1e10
    assert set(counts["10b"]) == {"online_trainable", "frozen", "momentum", "total", "train_flops_per_sample"}
    # ~6 FLOPs per trainable parameter and token, plus the momentum forward's 2; a parameter sees 80
    # (text) to 197 (ViT patches + class token) tokens.
    assert 8 * 1.0e10 * 80 < counts["10b"]["train_flops_per_sample"] < 8 * 1.1e10 * 197


def test_brivl_1_0_shape():
    cfg = get_preset("brivl-1.0")
    with torch.device("meta"):
        model = BriVL(cfg, momentum=False)
    assert model.image_tower.region_pool.num_regions == 37
    assert model.image_tower.backbone.num_features == 2048
    trainable_blocks = {n.split(".")[2] for n, p in model.image_tower.backbone.named_parameters()
                        if p.requires_grad}
    assert trainable_blocks == {"3", "4", "5", "6"}
    bert = model.text_tower.bert
    assert bert.config.vocab_size == 21128 and bert.config.num_hidden_layers == 12
    assert [any(p.requires_grad for p in layer.parameters()) for layer in bert.encoder.layer] == [False] * 8 + [True] * 4
    assert model.text_tower.head.fc1.in_features == 768 and model.text_tower.head.fc2.out_features == 2048


def test_pretrained_weights_load_from_local_files(tmp_path):
    """Backbone from a local timm checkpoint, text encoder from a save_pretrained directory."""
    import dataclasses

    import timm
    import transformers
    from safetensors.torch import save_file

    from wenlan.parallel.engine import copy_state

    def load_pretrained(model):  # what the trainer runs after construction (module by module under ZeRO-3)
        copy_state(model, model.pretrained_state(), "pretrained weights")

    cfg = get_preset("tiny")
    torch.manual_seed(1)
    backbone = timm.create_model(cfg.image.backbone, pretrained=False, num_classes=10,
                                 **cfg.image.backbone_kwargs)  # with a classifier, as released checkpoints are
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=128),
                                  add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")

    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, pretrained_path=str(tmp_path / "backbone.safetensors")),
                              text=dataclasses.replace(cfg.text, pretrained_path=str(tmp_path / "bert")))
    model = BriVL(cfg, momentum=False)
    load_pretrained(model)
    torch.testing.assert_close(model.image_tower.backbone.net.conv_stem.weight, backbone.conv_stem.weight)
    torch.testing.assert_close(model.text_tower.bert.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    assert model.text_tower.head.fc1.in_features == 64  # the attention layers and head follow the loaded width
    ids = torch.randint(1, 99, (2, 7))
    assert model.encode_text(ids, torch.ones_like(ids)).shape == (2, 128)

    wrong = dataclasses.replace(cfg.image, backbone="resnet10t", backbone_kwargs={})
    with pytest.raises(ValueError, match="does not fit backbone"):
        load_pretrained(BriVL(dataclasses.replace(cfg, image=wrong), momentum=False))


@pytest.mark.parametrize("backbone, kwargs", [("test_efficientnet_gn", dict(output_stride=16)),
                                              ("vit_base_patch16_224", dict(embed_dim=64, depth=2, num_heads=2))])
def test_blocks_in_order_compute_the_forward(backbone, kwargs):
    """The pipeline cuts a tower between its blocks(): run in order they must be the tower's forward,
    and together they must own every parameter of the tower exactly once."""
    import dataclasses

    tiny = get_preset("tiny")
    image = dataclasses.replace(tiny.image, backbone=backbone, backbone_kwargs=kwargs, dim=64, heads=2)
    torch.manual_seed(0)
    model = BriVL(dataclasses.replace(tiny, image=image), momentum=False).eval()
    images = torch.randn(2, 3, 64, 64)
    input_ids = torch.randint(5, 2000, (2, tiny.text.max_len))
    mask = torch.ones_like(input_ids)
    mask[0, 10:] = 0
    x = images
    for block in model.image_tower.blocks():
        x = block.run(x)
    assert torch.equal(x, model.image_tower(images))
    x = None
    for block in model.text_tower.blocks():
        x = block.run(x, input_ids, mask)
    assert torch.allclose(x, model.text_tower(input_ids, mask), atol=1e-6)
    for tower in (model.image_tower, model.text_tower):
        names = []
        for block in tower.blocks():
            for path in block.owns:
                parent, _, attr = path.rpartition(".")
                obj = getattr(tower.get_submodule(parent) if parent else tower, attr)
                names += [path] if isinstance(obj, torch.nn.Parameter) else \
                    [f"{path}.{n}" for n, _ in obj.named_parameters()]
        assert sorted(names) == sorted(n for n, _ in tower.named_parameters())


def test_training_modes_of_key_towers_and_frozen_batchnorm():
    """In training the momentum (key) towers run without dropout and with batch-statistics BatchNorm;
    BatchNorm of frozen blocks keeps its running statistics in both towers. The modes survive the
    eval/train switch of an evaluation, and a pipeline layer gets the same modes as the whole model."""
    from dataclasses import replace

    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.parallel.momentum import MomentumEMA
    from wenlan.parallel.pipeline import ObjectiveLayer, TowerLayer, pipeline_layers

    tiny = get_preset("tiny")
    cfg = replace(tiny, image=replace(tiny.image, backbone="test_efficientnet", dropout=0.3,
                                      trainable_prefixes=("blocks.1", "blocks.2", "conv_head", "bn2")),
                  text=replace(tiny.text, dropout=0.3))
    torch.manual_seed(0)
    model = BriVL(cfg)
    MomentumEMA(list(model.named_momentum_pairs())).update(0.0)
    for _ in range(2):  # the second round: after an evaluation's eval()/train()
        model.train()
        for tower in (model.image_tower, model.momentum_image_tower):
            assert not tower.backbone.net.bn1.training  # frozen (stem): running statistics
            assert tower.backbone.net.bn2.training  # trainable: batch statistics, in both towers
        assert not any(m.training for m in model.momentum_text_tower.modules())  # no dropout, no BatchNorm
        assert all(m.training for m in model.text_tower.modules())
        images, ids, mask = tiny_batch()
        first, second = model(images, ids, mask), model(images, ids, mask)
        assert not torch.equal(first[1], second[1])  # online: dropout draws differ
        torch.testing.assert_close(first[3], second[3], rtol=0, atol=0)  # keys: deterministic
        model.eval()
        assert not any(m.training for m in model.modules())
    layers = [layer for layer in pipeline_layers(model, ObjectiveLayer(ObjectiveConfig(), cfg.embed_dim))
              if isinstance(layer, TowerLayer)]
    model.train()
    expected = {id(m): m.training for m in model.modules()}
    for layer in layers:
        layer.train()
        assert all(m.training == expected[id(m)] for m in layer.modules() if id(m) in expected)


def test_brivl_region_sampling_matches_brivl_code():
    """The brivl-1.0 preset samples its 6x6 + 1 boxes where BriVL's code does (issue: embedding cosine
    0.974 with cell-centre sampling on the same weights)."""
    import dataclasses

    from brivl_reference import grid_boxes_px, roi_grid_pool
    from wenlan.models.init import parameters_on_meta
    from wenlan.models.towers import ImageTower, RegionPool

    cfg = get_preset("brivl-1.0").image
    with parameters_on_meta():
        preset_pool = ImageTower(cfg, 2048).region_pool
    assert (preset_pool.sampling, preset_pool.map_size) == ("brivl", 12)  # EfficientNet-B5 at 380 px

    C, D, size = 16, 8, cfg.image_size
    torch.manual_seed(0)
    pool = RegionPool(C, D, cfg.grid, cfg.box_samples, "brivl", map_size=12)
    torch.testing.assert_close(pool.sample_grid, preset_pool.sample_grid, rtol=0, atol=0)
    conv = torch.nn.Conv2d(C, D, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(pool.proj.weight[:, :, None, None])
        conv.bias.copy_(pool.proj.bias)

    # The numbers: the whole image's samples at 1.136, 4.409, 7.682, 10.955 (pixel i centred at i).
    whole = pool.sample_grid.view(37, 4, 4, 2)[-1, 0, :, 0]
    torch.testing.assert_close((whole + 1) * 12 / 2 - 0.5, torch.tensor([1.136, 4.409, 7.682, 10.955]),
                               rtol=0, atol=1e-3)

    boxes_px = grid_boxes_px(cfg.grid, size)
    fmap = torch.randn(2, C, 12, 12)
    with torch.no_grad():
        ours = pool(fmap)  # (2, 37, D)
        theirs = torch.stack([roi_grid_pool(f, boxes_px, size, cfg.box_samples, conv) for f in fmap])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        centred = dataclasses.replace(cfg, region_sampling="centred")
        centred_pool = RegionPool(C, D, centred.grid, centred.box_samples, centred.region_sampling)
        centred_pool.load_state_dict(pool.state_dict())
        assert (centred_pool(fmap) - theirs).abs().max() > 0.1  # the test can tell the two apart
        with pytest.raises(ValueError, match="12x12 feature map"):
            pool(torch.randn(1, C, 10, 10))
    with pytest.raises(ValueError, match="image.region_sampling"):
        RegionPool(C, D, 6, 4, "aligned")
