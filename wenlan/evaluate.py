"""Image-text retrieval: R@1/5/10 in both directions and mean recall.

``python -m wenlan.evaluate (--checkpoint DIR/checkpoints | --model FILE) --val-shards ... --tokenizer DIR``
evaluates a checkpoint of any strategy, or a file of ``wenlan.export`` / ``wenlan.convert``, on CPU;
training calls ``evaluate`` on the live model.

Each validation image's captions are its only correct matches: one caption (pair i matches only pair
i), or several (a ``captions`` list in the sample's json). With several, the standard Flickr30K / COCO
protocol: image -> text counts a hit at K if any of the image's captions is among the top K of all
captions; text -> image ranks the images for every caption.

Unimodal retrieval (``unimodal=True``, for the objectives that claim unimodal gains; ``--unimodal``):
image -> image ranks the second views of all images (the training crop, drawn from each image's key)
for each image's eval view, text -> text ranks the second textual views of all images (the tags, or
the augmented first caption) for each caption. Keys ``r{K}_i2i`` and ``r{K}_t2t``.

Retrieval examples (``examples=[]``, what training's picture of each evaluation shows): the first few
validation images, each with its top-5 captions of all, scored and marked correct or not.
"""

import argparse
import json
from pathlib import Path

import torch

from wenlan.data.pipeline import DataConfig, make_eval_loader
from wenlan.data.transforms import model_images

KS = (1, 5, 10)
EXAMPLE_IMAGES, EXAMPLE_CAPTIONS = 4, 5


def group_rows(keys: list[str]) -> tuple[list[int], torch.Tensor]:
    """The eval loader's rows (one per caption; the rows of one image share its key) -> the first row
    of every image, in order, and for every row the index of its image among those. (rows,), (T,)."""
    first: dict[str, int] = {}
    rows, caption_image = [], []
    for row, key in enumerate(keys):
        if key not in first:
            first[key] = len(rows)
            rows.append(row)
        caption_image.append(first[key])
    return rows, torch.tensor(caption_image, dtype=torch.long)


@torch.no_grad()
def embed_pairs(model, loader, second: dict | None = None, keep: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(N, E) embeddings of every val image, (T, E) of every caption, (T,) the image of each caption,
    and how many samples were skipped. Each image is embedded once, however many captions it has.
    ``second``: filled with the (N, E) embeddings of each image's second image and text views
    (``image2``, ``text2``) when the loader gives them. ``keep``: filled with the pixels of the first
    ``EXAMPLE_IMAGES`` images (``pixels``, uint8 (n, 3, H, W)) and every caption's token ids without
    padding (``captions``, T lists), for retrieval examples."""
    was_training = model.training
    model.eval()
    images, texts, keys, skipped = [], [], set(), 0
    images2, texts2 = [], []
    all_keys, shown, captions = [], [], []
    param = next(model.parameters())
    for batch in loader:
        skipped += sum(batch["skipped"].values())
        if batch["images"].shape[0] == 0:
            continue
        rows, _ = group_rows(batch["keys"])
        rows = [r for r in rows if batch["keys"][r] not in keys]  # an image's rows may straddle two batches
        if rows:
            pixels = model_images(batch["images"][rows], batch["colour_maps"][rows], param.device, param.dtype)
            images.append(model.encode_image(pixels).float().cpu())
            if keep is not None and sum(len(p) for p in shown) < EXAMPLE_IMAGES:
                shown.append(batch["images"][rows][:EXAMPLE_IMAGES].clone())
            if second is not None and "images2" in batch:
                pixels = model_images(batch["images2"][rows], batch["colour_maps2"][rows], param.device, param.dtype)
                images2.append(model.encode_image(pixels).float().cpu())
                texts2.append(model.encode_text(batch["input_ids2"][rows].to(param.device),
                                                batch["attention_mask2"][rows].to(param.device)).float().cpu())
        texts.append(model.encode_text(batch["input_ids"].to(param.device),
                                       batch["attention_mask"].to(param.device)).float().cpu())
        keys.update(batch["keys"])
        all_keys.extend(batch["keys"])
        if keep is not None:
            captions.extend(ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"]))
    model.train(was_training)
    if keep is not None:
        keep.update(pixels=torch.cat(shown)[:EXAMPLE_IMAGES], captions=captions)
    if second is not None and images2:
        second.update(image2=torch.cat(images2), text2=torch.cat(texts2))
    return torch.cat(images), torch.cat(texts), group_rows(all_keys)[1], skipped


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      caption_image: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@K both ways. image_emb (N, E), text_emb (T, E); caption_image (T,) the image of each
    caption (default: caption i belongs to image i, T = N)."""
    sim = image_emb @ text_emb.t()  # (N, T)
    n, t = sim.shape
    if caption_image is None:
        caption_image = torch.arange(n)
    correct = caption_image[None, :] == torch.arange(n)[:, None]  # (N, T)
    # The rank of a hit = the number of candidates scored strictly higher than the best correct one.
    best_correct = sim.masked_fill(~correct, float("-inf")).amax(dim=1)  # (N,)
    ranks = {"i2t": (sim > best_correct[:, None]).sum(dim=1),  # (N,)
             "t2i": (sim.t() > sim[caption_image, torch.arange(t)][:, None]).sum(dim=1)}  # (T,)
    metrics: dict[str, float] = {}
    for name, rank in ranks.items():
        for k in KS:
            metrics[f"r{k}_{name}"] = (rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics[f"r{k}_{d}"] for k in KS for d in ("i2t", "t2i")) / (2 * len(KS))
    metrics["n_pairs"] = n
    if t != n:
        metrics["n_captions"] = t
    return metrics


def retrieval_examples(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                       pixels: torch.Tensor, caption) -> list[dict]:
    """The first images of ``pixels`` (uint8 (n, 3, H, W)), each with its ``EXAMPLE_CAPTIONS`` best-scored
    captions of all T (``caption(j)``: the text of caption j, asked for the shown ones only):
    [{"image", "top": [(text, score, correct)], "truth"}], ``truth`` the image's first caption.
    image_emb (N, E), text_emb (T, E), caption_image (T,)."""
    n = min(len(pixels), image_emb.shape[0])
    scores, top = (image_emb[:n] @ text_emb.t()).topk(min(EXAMPLE_CAPTIONS, text_emb.shape[0]), dim=1)  # (n, 5)
    return [{"image": pixels[i],
             "top": [(caption(j), s, caption_image[j].item() == i) for j, s in zip(top[i].tolist(), scores[i].tolist())],
             "truth": caption((caption_image == i).nonzero()[0].item())}
            for i in range(n)]


def caption_text(tokenizer, ids: list[int]) -> str:
    """A caption back from its token ids; Chinese characters without the spaces a WordPiece decode puts
    between them."""
    import re

    text = tokenizer.decode(ids, skip_special_tokens=True)
    return re.sub(r"(?<=[^\x00-\x7f]) (?=[^\x00-\x7f])", "", text).strip()


def unimodal_metrics(image_emb: torch.Tensor, image2_emb: torch.Tensor, text_emb: torch.Tensor,
                     text2_emb: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    """R@K image -> image (each image's view against the N second views) and text -> text (each of the T
    captions against the N second textual views, its image's the one correct)."""
    i2i = retrieval_metrics(image_emb, image2_emb)  # its "i2t" direction: view 1 queries, view 2 gallery
    t2t = retrieval_metrics(text2_emb, text_emb, caption_image)  # its "t2i" direction: captions query
    return {**{f"r{k}_i2i": i2i[f"r{k}_i2t"] for k in KS}, **{f"r{k}_t2t": t2t[f"r{k}_t2i"] for k in KS}}


def evaluate(model, val_shards: list[str], tokenizer, image_size: int, max_text_len: int,
             batch_size: int = 128, unimodal: bool = False, color_augment: bool = False,
             examples: list | None = None) -> dict:
    """Cross-modal retrieval metrics, and with ``unimodal`` image->image and text->text ones (the second
    image view with colour jitter if ``color_augment``). ``examples``: extended with
    ``retrieval_examples`` of the first validation images."""
    cfg = DataConfig(shards=list(val_shards), batch_size=batch_size, image_size=image_size,
                     max_text_len=max_text_len, num_workers=0, augment=False, views=unimodal,
                     color_augment=color_augment)
    second = {} if unimodal else None
    keep = {} if examples is not None else None
    image_emb, text_emb, caption_image, skipped = embed_pairs(model, make_eval_loader(cfg, tokenizer), second, keep)
    metrics = retrieval_metrics(image_emb, text_emb, caption_image)
    if examples is not None:
        examples.extend(retrieval_examples(image_emb, text_emb, caption_image, keep["pixels"],
                                           lambda j: caption_text(tokenizer, keep["captions"][j])))
    if unimodal:
        metrics.update(unimodal_metrics(image_emb, second["image2"], text_emb, second["text2"], caption_image))
    metrics["skipped"] = skipped
    return metrics


def format_table(m: dict) -> str:
    rows = [f"{'':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        rows.append(f"{label:<14}" + "".join(f"{m[f'r{k}_{d}']:>8.3f}" for k in KS))
    over = f"{m['n_pairs']} images, {m['n_captions']} captions" if "n_captions" in m else f"{m['n_pairs']} pairs"
    for d, label in (("i2i", "image->image"), ("t2t", "text->text")):
        if f"r1_{d}" in m:
            rows.append(f"{label:<14}" + "".join(f"{m[f'r{k}_{d}']:>8.3f}" for k in KS))
    rows.append(f"mean recall {m['mean_recall']:.3f} over {over} (mean R@1 {(m['r1_i2t'] + m['r1_t2i']) / 2:.3f})")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="DIR/checkpoints (latest) or one tag directory")
    source.add_argument("--model", help="a .safetensors of wenlan.export or wenlan.convert")
    parser.add_argument("--val-shards", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--unimodal", action="store_true",
                        help="also image->image (two views of each image) and text->text (caption vs its tags view)")
    parser.add_argument("--out", help="write the metrics as JSON here")
    args = parser.parse_args()

    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.export import load, load_model_from_checkpoint

    if args.checkpoint:
        model, model_cfg = load_model_from_checkpoint(Path(args.checkpoint))
    else:
        model = load(args.model).model  # the towers; captions are tokenised with --tokenizer either way
        model_cfg = model.cfg
    metrics = evaluate(model, args.val_shards, load_tokenizer(args.tokenizer), model_cfg.image.image_size,
                       model_cfg.text.max_len, args.batch_size, unimodal=args.unimodal)
    print(format_table(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
