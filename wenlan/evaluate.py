"""Image-text retrieval: R@1/5/10 in both directions and mean recall.

``python -m wenlan.evaluate --checkpoint DIR/checkpoints --val-shards ... --tokenizer DIR``
evaluates a checkpoint of any strategy on CPU; training calls ``evaluate`` on the live model.
Pair i of the validation set is the only correct match for image i and caption i.
"""

import argparse
import json
from pathlib import Path

import torch

from wenlan.data.pipeline import DataConfig, make_eval_loader
from wenlan.data.transforms import model_images

KS = (1, 5, 10)


@torch.no_grad()
def embed_pairs(model, loader) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N, E) image and text embeddings of every val pair, and how many samples were skipped."""
    was_training = model.training
    model.eval()
    images, texts, skipped = [], [], 0
    param = next(model.parameters())
    for batch in loader:
        skipped += sum(batch["skipped"].values())  # {reason: count}
        if batch["images"].shape[0] == 0:
            continue
        pixels = model_images(batch["images"], batch["colour_maps"], param.device, param.dtype)
        images.append(model.encode_image(pixels).float().cpu())
        texts.append(model.encode_text(batch["input_ids"].to(param.device),
                                       batch["attention_mask"].to(param.device)).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts), skipped


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """Recall@K where the match of row i is column i, both directions."""
    sim = image_emb @ text_emb.t()  # (N, N)
    n = sim.shape[0]
    target = torch.arange(n)
    metrics: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        # rank of the true match = number of candidates scored strictly higher
        rank = (s > s[target, target][:, None]).sum(dim=1)  # (N,)
        for k in KS:
            metrics[f"r{k}_{name}"] = (rank < k).float().mean().item()
    metrics["mean_recall"] = sum(metrics[f"r{k}_{d}"] for k in KS for d in ("i2t", "t2i")) / (2 * len(KS))
    metrics["n_pairs"] = n
    return metrics


def evaluate(model, val_shards: list[str], tokenizer, image_size: int, max_text_len: int,
             batch_size: int = 128) -> dict:
    cfg = DataConfig(shards=list(val_shards), batch_size=batch_size, image_size=image_size,
                     max_text_len=max_text_len, num_workers=0, augment=False)
    image_emb, text_emb, skipped = embed_pairs(model, make_eval_loader(cfg, tokenizer))
    metrics = retrieval_metrics(image_emb, text_emb)
    metrics["skipped"] = skipped
    return metrics


def format_table(m: dict) -> str:
    rows = [f"{'':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
        rows.append(f"{label:<14}" + "".join(f"{m[f'r{k}_{d}']:>8.3f}" for k in KS))
    rows.append(f"mean recall {m['mean_recall']:.3f} over {m['n_pairs']} pairs "
                f"(mean R@1 {(m['r1_i2t'] + m['r1_t2i']) / 2:.3f})")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="DIR/checkpoints (latest) or one tag directory")
    parser.add_argument("--val-shards", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", help="write the metrics as JSON here")
    args = parser.parse_args()

    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.export import load_model_from_checkpoint

    model, model_cfg = load_model_from_checkpoint(Path(args.checkpoint))
    metrics = evaluate(model, args.val_shards, load_tokenizer(args.tokenizer), model_cfg.image.image_size,
                       model_cfg.text.max_len, args.batch_size)
    print(format_table(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
