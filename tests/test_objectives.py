"""The multi-view objectives (ernie-vil2, cookie) against plain references written here, on random
inputs, in one process (tests/test_zero_equivalence.py runs them on 1 and 2 ranks of real engines)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from wenlan.losses.multiview import VIEWS, CookieConfig, ErnieVil2Config, multiview_objective
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig
from wenlan.models import BriVL, get_preset


def reference_pair_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE one query at a time: -log(e^{s a_i.b_i} / sum_j e^{s a_i.b_j}), and b -> a."""
    losses = []
    for queries, keys in ((a, b), (b, a)):
        for i in range(queries.shape[0]):
            logits = torch.stack([scale * queries[i] @ keys[j] for j in range(keys.shape[0])])
            losses.append(torch.logsumexp(logits, dim=0) - logits[i])
    return torch.stack(losses).sum() / (2 * a.shape[0])


# The pairs each paper contrasts, written out here rather than read from the configs.
ERNIE_PAIRS = [("image", "caption", "caption_weight"), ("image2", "caption", "caption_weight"),
               ("image", "text2", "tags_weight"), ("image2", "text2", "tags_weight"),
               ("image", "image2", "image_image_weight"), ("caption", "text2", "text_text_weight")]
COOKIE_PAIRS = [("image", "caption", "cross_weight"), ("image", "image2", "image_image_weight"),
                ("caption", "text2", "text_text_weight")]


def reference_loss(views: dict, cfg, pairs, scale) -> torch.Tensor:
    return sum(getattr(cfg, weight) * reference_pair_loss(views[a], views[b], scale) for a, b, weight in pairs)


CASES = [("ernie-vil2", ErnieVil2Config(), ERNIE_PAIRS),
         ("ernie-vil2", ErnieVil2Config(caption_weight=0.5, tags_weight=2.0, image_image_weight=0.0,
                                        text_text_weight=0.25), ERNIE_PAIRS),
         ("cookie", CookieConfig(), COOKIE_PAIRS),
         ("cookie", CookieConfig(cross_weight=2.0, image_image_weight=0.5, text_text_weight=0.0), COOKIE_PAIRS)]


@pytest.mark.parametrize("name, cfg, pairs", CASES)
def test_loss_and_gradients_equal_the_reference_on_random_embeddings(name, cfg, pairs):
    g = torch.Generator().manual_seed(len(pairs))
    views = {v: F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_() for v in VIEWS}
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    objective = ObjectiveConfig(name=name, ernie_vil2=cfg if name == "ernie-vil2" else ErnieVil2Config(),
                                cookie=cfg if name == "cookie" else CookieConfig())
    loss, stats = multiview_objective(views, objective.view_pairs(), log_scale.exp())
    got = torch.autograd.grad(loss, [*views.values(), log_scale])
    expected_loss = reference_loss(views, cfg, pairs, log_scale.exp())
    expected = torch.autograd.grad(expected_loss, [*views.values(), log_scale])
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for view, a, b in zip([*VIEWS, "log_scale"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=view)
    assert 0.0 <= stats["acc_i2t"].item() <= 1.0
    # The image-caption pair's two directions, as the log shows them: their mean is the pair's term.
    caption_term = reference_pair_loss(views["image"], views["caption"], log_scale.exp())
    torch.testing.assert_close((stats["loss_i2t"] + stats["loss_t2i"]) / 2, caption_term.detach(), rtol=1e-5, atol=1e-6)


def reference_queue_pair_loss(a, b, queue_b, queue_a, ids, queue_ids, scale) -> torch.Tensor:
    """reference_pair_loss with each query's candidates extended by the queue of its target's modality,
    minus the queue entries that carry the query's own id."""
    losses = []
    for queries, keys, queue in ((a, b, queue_b), (b, a, queue_a)):
        for i in range(queries.shape[0]):
            candidates = [scale * queries[i] @ keys[j] for j in range(keys.shape[0])]
            candidates += [scale * queries[i] @ queue[j] for j in range(queue.shape[0]) if queue_ids[j] != ids[i]]
            logits = torch.stack(candidates)
            losses.append(torch.logsumexp(logits, dim=0) - logits[i])
    return torch.stack(losses).sum() / (2 * a.shape[0])


def test_queue_option_adds_each_target_modalitys_queue_as_negatives():
    """ernie-vil2 with queues: image-view targets bring the image queue, textual targets the text queue."""
    g = torch.Generator().manual_seed(7)
    views = {v: F.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_() for v in VIEWS}
    image_queue, text_queue = (F.normalize(torch.randn(10, 8, generator=g), dim=-1) for _ in range(2))
    ids, queue_ids = torch.arange(6), torch.tensor([0, 9, 9, 3, 9, 9, 9, 5, 9, 9])  # three are duplicates
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    cfg = ErnieVil2Config(tags_weight=0.5, queue=True)
    objective = ObjectiveConfig(name="ernie-vil2", ernie_vil2=cfg)
    assert objective.uses_momentum and not ObjectiveConfig(name="ernie-vil2").uses_momentum
    loss, _ = multiview_objective(views, objective.view_pairs(), log_scale.exp(),
                                  queues=(image_queue, text_queue, queue_ids, ids))
    queue_of = {"image": image_queue, "image2": image_queue, "caption": text_queue, "text2": text_queue}
    expected = sum(getattr(cfg, w) * reference_queue_pair_loss(views[a], views[b], queue_of[b], queue_of[a], ids,
                                                               queue_ids, log_scale.exp())
                   for a, b, w in ERNIE_PAIRS)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, [*views.values(), log_scale])
    for view, x, y in zip([*VIEWS, "log_scale"], got, torch.autograd.grad(expected, [*views.values(), log_scale])):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=view)
    without, _ = multiview_objective(views, objective.view_pairs(), log_scale.exp())
    assert loss > without  # the queue's negatives count


def cookie_reference_embeddings(model: BriVL, images, input_ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """COOKIE's forward written out: each tower up to its token features, the same shared layers over
    both, then each tower's pooling and head."""
    shared = model.shared_encoder
    regions = model.image_tower.tokens(images)  # (B, R, dim)
    for layer in shared.layers:
        regions = layer(regions)
    tokens = shared.text_in(model.text_tower.tokens(input_ids, mask))  # (B, L, dim)
    for layer in shared.layers:
        tokens = layer(tokens, key_padding_mask=mask == 0)
    return model.image_tower.embed(regions), model.text_tower.embed(shared.text_out(tokens), input_ids, mask)


@pytest.mark.parametrize("name", ["ernie-vil2", "cookie"])
def test_module_loss_and_parameter_gradients_equal_the_reference(name):
    """The whole objective module on the tiny towers: both views of a modality go through its tower in
    one batch, cookie's through the shared layers; the reference embeds each view on its own."""
    model_cfg = get_preset("tiny")
    if name == "cookie":
        model_cfg = dataclasses.replace(model_cfg, shared_layers=CookieConfig().shared_layers)
    objective = ObjectiveConfig(name=name)
    torch.manual_seed(0)
    module = ContrastivePretraining(BriVL(model_cfg, momentum=False), objective).train()
    model = module.model
    assert (model.shared_encoder is not None) == (name == "cookie")
    g = torch.Generator().manual_seed(1)
    B, L = 5, model_cfg.text.max_len
    images = [torch.randn(B, 3, 64, 64, generator=g) for _ in range(2)]
    input_ids = [torch.randint(5, 400, (B, L), generator=g) for _ in range(2)]
    masks = [(torch.arange(L)[None] < torch.randint(4, L, (B, 1), generator=g)).long() for _ in range(2)]

    loss = module(images[0], input_ids[0], masks[0], torch.arange(B), views=(images[1], input_ids[1], masks[1]))
    params = [p for p in module.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)

    if name == "cookie":
        (img, cap), (img2, text2) = (cookie_reference_embeddings(model, images[i], input_ids[i], masks[i])
                                     for i in range(2))
    else:
        img, img2 = model.image_tower(images[0]), model.image_tower(images[1])
        cap, text2 = model.text_tower(input_ids[0], masks[0]), model.text_tower(input_ids[1], masks[1])
    views = dict(image=img, image2=img2, caption=cap, text2=text2)
    cfg, pairs = (objective.cookie, COOKIE_PAIRS) if name == "cookie" else (objective.ernie_vil2, ERNIE_PAIRS)
    expected_loss = reference_loss(views, cfg, pairs, module.log_scale.exp())
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, got, expected):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    if name == "cookie":  # the shared layers learn from both modalities' terms
        layer = "model.shared_encoder.layers.0.qkv.weight"
        assert got[names.index(layer)].abs().sum() > 0


def test_configs_round_trip_through_their_json():
    cfg = ObjectiveConfig(name="cookie", cookie=CookieConfig(shared_layers=3, text_text_weight=0.5),
                          ernie_vil2=ErnieVil2Config(tags_weight=0.0))
    assert ObjectiveConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    older = {k: v for k, v in dataclasses.asdict(ObjectiveConfig()).items() if k not in ("cookie", "ernie_vil2")}
    assert ObjectiveConfig.from_dict(older) == ObjectiveConfig()  # configs written before these objectives


def test_all_zero_weights_and_a_shared_transformer_without_layers_are_refused():
    with pytest.raises(ValueError, match="every pair weight in objective.ernie_vil2 is 0"):
        ObjectiveConfig(name="ernie-vil2", ernie_vil2=ErnieVil2Config(0.0, 0.0, 0.0, 0.0)).validate()
    with pytest.raises(ValueError, match=r"objective.cookie.shared_layers=0: .* \(--shared-layers\)"):
        ObjectiveConfig(name="cookie", cookie=CookieConfig(shared_layers=0)).validate()
