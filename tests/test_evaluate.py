"""Retrieval evaluation with several captions per image (the Flickr30K / COCO protocol), against
references computed here one query at a time, and ``wenlan.evaluate --model FILE``."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.helpers import ROOT, cpu_env
from wenlan.evaluate import KS, evaluate, retrieval_metrics


def reference_metrics(image_emb, text_emb, caption_image) -> dict:
    """Recall@K by sorting, one query at a time: an image's hit at K is any of its captions among the
    K best captions; a caption's hit is its image among the K best images."""
    sim = (image_emb @ text_emb.t()).tolist()
    out = {}
    for k in KS:
        out[f"r{k}_i2t"] = float(np.mean([
            any(caption_image[j] == i for j in sorted(range(len(row)), key=lambda j: -row[j])[:k])
            for i, row in enumerate(sim)]))
        out[f"r{k}_t2i"] = float(np.mean([
            caption_image[j] in sorted(range(len(sim)), key=lambda i: -sim[i][j])[:k]
            for j in range(len(caption_image))]))
    return out


def test_multi_caption_recall_matches_a_per_query_reference():
    g = torch.Generator().manual_seed(0)
    counts = [1 + (i * 7) % 5 for i in range(30)]  # 1 to 5 captions per image
    caption_image = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    images = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    # Captions near their image, so that recall is neither 0 nor 1.
    texts = torch.nn.functional.normalize(images[caption_image] + 0.9 * torch.randn(len(caption_image), 16, generator=g),
                                          dim=1)
    metrics = retrieval_metrics(images, texts, caption_image)
    expected = reference_metrics(images, texts, caption_image.tolist())
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key  # fp32 means; one query moves them by >= 1/90
    assert 0.1 < metrics["r1_i2t"] < 0.9 and 0.1 < metrics["r1_t2i"] < 0.9
    assert metrics["r1_i2t"] != metrics["r1_t2i"]  # i2t counts images (30), t2i captions (90)
    assert (metrics["n_pairs"], metrics["n_captions"]) == (30, len(caption_image))
    # One caption per image is the pairwise protocol.
    single = retrieval_metrics(images, texts[:30])
    assert single == {**retrieval_metrics(images, texts[:30], torch.arange(30))}
    assert "n_captions" not in single


@pytest.fixture(scope="module")
def multi_caption_set(tmp_path_factory):
    """12 images with 1-4 captions each (a ``captions`` list in the json, or one .txt), and a
    WordPiece tokenizer over their characters."""
    import transformers

    root = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(0)
    words = ["红色", "蓝色", "圆形", "方块", "左上方", "右下方", "大", "小"]
    images, captions = [], []
    with wds.TarWriter(str(root / "val-000000.tar")) as sink:
        for i in range(12):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
            caps = ["".join(rng.choice(words, 3)) for _ in range(1 + i % 4)]
            sample = {"__key__": f"{i:06d}", "jpg": buf.getvalue()}
            if len(caps) == 1:
                sample["txt"] = caps[0]
            else:
                sample["json"] = json.dumps({"captions": caps}, ensure_ascii=False)
            sink.write(sample)
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            captions.append(caps)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({c for w in words for c in w})]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "tokenizer")
    return root, images, captions


def test_evaluate_embeds_each_image_once_and_scores_every_caption(multi_caption_set, tmp_path):
    """The loader's rows (one per caption) against embeddings computed here per image and per caption;
    then the same through ``python -m wenlan.evaluate --model FILE``."""
    from safetensors.torch import save_file

    import wenlan
    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.models import BriVL, get_preset
    from wenlan.models.init import init_weights

    root, images, captions = multi_caption_set
    cfg = get_preset("tiny")
    model = BriVL(cfg, momentum=False)
    init_weights(model, seed=3)
    model.eval()
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    shards = [str(root / "val-000000.tar")]
    # A batch of 5 rows: several images' captions straddle two batches.
    metrics = evaluate(model, shards, tokenizer, cfg.image.image_size, cfg.text.max_len, batch_size=5)

    from dataclasses import asdict
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"wenlan_model": json.dumps(asdict(cfg))})
    loaded = wenlan.load(str(path))
    loaded.tokenizer = tokenizer
    flat = [c for caps in captions for c in caps]
    caption_image = [i for i, caps in enumerate(captions) for _ in caps]
    expected = reference_metrics(loaded.encode_image(images), loaded.encode_text(flat), caption_image)
    assert (metrics["n_pairs"], metrics["n_captions"]) == (12, len(flat))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key  # fp32 means; one query moves them by >= 1/90

    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "wenlan.evaluate", "--model", str(path), "--val-shards", *shards,
                           "--tokenizer", str(root / "tokenizer"), "--out", str(out)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"over 12 images, {len(flat)} captions" in proc.stdout
    assert json.loads(out.read_text()) == pytest.approx(metrics)


def test_unimodal_recall_matches_a_per_query_reference(multi_caption_set):
    """image->image: each image's eval view ranks all images' second views; text->text: each caption
    ranks all images' second textual views (here the augmented first caption: the set has no tags).
    Against reference_metrics on embeddings computed here from the same loader's views."""
    from wenlan.data import DataConfig, make_eval_loader, model_images
    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.evaluate import group_rows
    from wenlan.models import BriVL, get_preset
    from wenlan.models.init import init_weights

    root, images, captions = multi_caption_set
    cfg = get_preset("tiny")
    model = BriVL(cfg, momentum=False)
    init_weights(model, seed=5)
    model.eval()
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    shards = [str(root / "val-000000.tar")]
    metrics = evaluate(model, shards, tokenizer, cfg.image.image_size, cfg.text.max_len, batch_size=5, unimodal=True)

    loader = make_eval_loader(DataConfig(shards=shards, batch_size=1000, image_size=cfg.image.image_size,
                                         max_text_len=cfg.text.max_len, num_workers=0, augment=False, views=True,
                                         color_augment=False),
                              tokenizer)
    batch = next(b for b in loader if b["images"].shape[0])
    rows, caption_image = group_rows(batch["keys"])
    assert len(rows) == 12 and not torch.equal(batch["images"][rows], batch["images2"][rows])
    with torch.no_grad():
        view1 = model.encode_image(model_images(batch["images"][rows], batch["colour_maps"][rows]))
        view2 = model.encode_image(model_images(batch["images2"][rows], batch["colour_maps2"][rows]))
        texts = model.encode_text(batch["input_ids"], batch["attention_mask"])
        texts2 = model.encode_text(batch["input_ids2"][rows], batch["attention_mask2"][rows])
    i2i = reference_metrics(view1, view2, list(range(12)))  # its image->text direction: view 1 queries
    t2t = reference_metrics(texts2, texts, caption_image.tolist())  # its text->image direction: captions query
    for k in KS:
        assert metrics[f"r{k}_i2i"] == pytest.approx(i2i[f"r{k}_i2t"], abs=1e-6), k
        assert metrics[f"r{k}_t2t"] == pytest.approx(t2t[f"r{k}_t2i"], abs=1e-6), k
    plain = evaluate(model, shards, tokenizer, cfg.image.image_size, cfg.text.max_len, batch_size=5)
    assert "r1_i2i" not in plain and all(plain[k] == metrics[k] for k in plain)
