"""Streaming image-text batches from webdataset tar shards.

Train: an endless stream. Each epoch the shard list is shuffled with (seed, epoch), the same on
every rank, then split between ranks and DataLoader workers; a seeded shuffle buffer mixes
samples within a worker; augmentation draws from a per-worker seeded generator. Eval: one
deterministic pass over all shards, no shuffle, no augmentation, nothing dropped.

Bad samples (undecodable image, missing or blank caption) are skipped and counted: every batch
carries "skipped", the number of samples its worker skipped since its previous batch, so the sum
over all batches is the total. A stream that ends with skips but no samples left to batch yields
one final batch with B == 0 to deliver the count; consumers should add batch["skipped"] first and
then `continue` when batch["keys"] is empty.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Iterator

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wenlan.data.transforms import eval_transform, train_transform

# The tokenizer is used inside forked DataLoader workers; its own thread pool would be unsafe there.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_BAD = 5  # per worker; later bad samples are still counted, just not logged one by one
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass
class DataConfig:
    """Where the pairs come from and how they are batched (per rank).

    augment: BriVL's training augmentation (random resized crop + colour jitter + grayscale);
        False gives train images the eval view.
    color_augment: with augment, also apply colour jitter and grayscale. Turn it off when captions
        name colours (the demo set): a grayscale "red circle" is a false pair. No transform ever
        flips horizontally, since captions name left and right.
    """

    shards: list[str]  # paths or URLs; `train-{000000..000019}.tar` expands
    batch_size: int  # per-rank micro-batch
    image_size: int = 64
    max_text_len: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 1000
    seed: int = 0
    augment: bool = True
    color_augment: bool = True

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        for name in ("batch_size", "image_size", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("DataConfig.num_workers and DataConfig.shuffle_buffer must be >= 0")
        if not self.expanded_shards():
            raise ValueError("DataConfig.shards is empty: give at least one tar shard")
        missing = missing_local_shards(self.shards)
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(f"DataConfig.shards: missing local shard files: {shown}")

    def expanded_shards(self) -> list[str]:
        """Shard list with brace notation expanded, in the given order."""
        return [u for pattern in self.shards for u in braceexpand.braceexpand(pattern)]


def missing_local_shards(patterns: list[str]) -> list[str]:
    """Local shard paths (brace notation expanded) that do not exist; URLs are not checked."""
    urls = [u for pattern in patterns for u in braceexpand.braceexpand(pattern)]
    return [u for u in urls if not _URL_SCHEME.match(u) and not os.path.isfile(u)]


def _seed_of(*parts) -> int:
    """A stable 63-bit seed from its parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class _BadSample(Exception):
    pass


def _decode(sample: dict, transform) -> tuple[str, torch.Tensor, str]:
    """(key, image # (3, H, W), caption), or _BadSample saying why not."""
    image_bytes = next((sample[k] for k in IMAGE_EXTS if k in sample), None)
    if image_bytes is None:
        raise _BadSample("no image")
    raw = sample.get("txt")
    try:
        caption = raw.decode("utf-8").strip() if raw is not None else ""
    except UnicodeDecodeError:
        raise _BadSample("caption is not utf-8") from None
    if not caption:
        raise _BadSample("missing or empty caption")
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            image = im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Exception as e:  # PIL raises many types for bad bytes
        raise _BadSample(f"undecodable image ({type(e).__name__}: {e})") from None
    return sample["__key__"], transform(image), caption


def _read_shards(urls: list[str]) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg", "txt", ...}) of the shards in order."""
    from webdataset.tariterators import tarfile_samples

    def on_error(exn):
        # A shard that cannot be opened or read is not a bad sample we can count: say so loudly.
        log.warning("shard read error, rest of the shard is lost: %r", exn)
        return True

    for url in urls:
        yield from tarfile_samples(iter([{"url": url}]), handler=on_error)


class ShardStream(IterableDataset):
    """Batches from `urls`, split between `world_size` ranks x DataLoader workers.

    With at least as many shards as ranks x workers, each (rank, worker) reads every n-th shard
    of the epoch's shuffled list. With fewer, every worker reads all shards and keeps every n-th
    sample: correct and disjoint, but each worker then reads n times the data, so give
    production runs plenty of shards.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, tokenizer, transform, *, rank: int = 0,
                 world_size: int = 1, epoch_offset: int = 0, epochs: int | None = None,
                 shuffle: bool = True, drop_last: bool = True, rng_transform: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.urls, self.cfg, self.tokenizer, self.transform = list(urls), cfg, tokenizer, transform
        self.rank, self.world_size = rank, world_size
        self.epoch_offset, self.epochs = epoch_offset, epochs
        self.shuffle, self.drop_last, self.rng_transform = shuffle, drop_last, rng_transform

    def _epoch_samples(self, epoch: int, split: int, n_splits: int) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            # Same order on every rank and worker: the split below must partition one list.
            random.Random(_seed_of(self.cfg.seed, epoch, "shards")).shuffle(urls)
        if len(urls) >= n_splits:
            yield from _read_shards(urls[split::n_splits])
        else:
            for i, sample in enumerate(_read_shards(urls)):
                if i % n_splits == split:
                    yield sample

    def _samples(self, split: int, n_splits: int) -> Iterator[dict]:
        epoch = self.epoch_offset
        while self.epochs is None or epoch < self.epoch_offset + self.epochs:
            yield from self._epoch_samples(epoch, split, n_splits)
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        split, n_splits = self.rank * n_workers + worker, self.world_size * n_workers
        stream_id = (self.cfg.seed, self.epoch_offset, split, n_splits)
        samples = self._samples(split, n_splits)
        if self.shuffle and self.cfg.shuffle_buffer > 1:
            samples = _shuffled(samples, self.cfg.shuffle_buffer, random.Random(_seed_of(*stream_id, "buffer")))
        # Augmentation draws from this stream's own generator state, so a stream is reproducible
        # with or without worker processes and the caller's global RNG is left untouched.
        rng_state = torch.Generator().manual_seed(_seed_of(*stream_id, "augment")).get_state()

        pending: list[tuple[str, torch.Tensor, str]] = []
        skipped = logged = 0
        batch_size = self.cfg.batch_size
        for sample in samples:
            try:
                if self.rng_transform:
                    with torch.random.fork_rng(devices=[]):
                        torch.set_rng_state(rng_state)
                        pending.append(_decode(sample, self.transform))
                        rng_state = torch.get_rng_state()
                else:
                    pending.append(_decode(sample, self.transform))
            except _BadSample as e:
                skipped += 1
                if logged < MAX_LOGGED_BAD:
                    logged += 1
                    more = "; further bad samples are counted but not logged" if logged == MAX_LOGGED_BAD else ""
                    log.warning("skipping sample %s from %s: %s%s", sample.get("__key__"), sample.get("__url__"), e, more)
                continue
            if len(pending) == batch_size:
                yield self._collate(pending, skipped)
                pending, skipped = [], 0
        if pending and not self.drop_last:
            yield self._collate(pending, skipped)
        elif skipped:
            yield self._collate([], skipped)

    def _collate(self, items: list, skipped: int) -> dict:
        size, length = self.cfg.image_size, self.cfg.max_text_len
        if not items:
            empty = torch.zeros(0, length, dtype=torch.long)
            return {"images": torch.zeros(0, 3, size, size), "input_ids": empty, "attention_mask": empty.clone(),
                    "keys": [], "skipped": skipped}
        keys, images, captions = zip(*items)
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                             return_tensors="pt")
        return {
            "images": torch.stack(images),  # (B, 3, H, W)
            "input_ids": tok["input_ids"].long(),  # (B, L)
            "attention_mask": tok["attention_mask"].long(),  # (B, L)
            "keys": list(keys),
            "skipped": skipped,
        }


def _shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: yields a random element of the last `size` seen."""
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _loader(dataset: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if num_workers > 0 else None)


def make_train_loader(cfg: DataConfig, tokenizer, rank: int, world_size: int, epoch_offset: int = 0,
                      *, epochs: int | None = None) -> DataLoader:
    """Endless per-rank training batches (`epochs` makes it finite, for tests and tools).

    Yields {"images": (B, 3, H, W) float, "input_ids": (B, L) long, "attention_mask": (B, L) long,
    "keys": list[str], "skipped": int}, B = cfg.batch_size (partial batches are dropped). To
    resume, pass the epoch to start from as epoch_offset; rank and world_size are explicit, never
    read from the environment.
    """
    if cfg.augment:
        transform = train_transform(cfg.image_size, color_augment=cfg.color_augment)
    else:
        transform = eval_transform(cfg.image_size)
    stream = ShardStream(cfg.expanded_shards(), cfg, tokenizer, transform, rank=rank, world_size=world_size,
                         epoch_offset=epoch_offset, epochs=epochs, shuffle=True, drop_last=True,
                         rng_transform=cfg.augment)
    return _loader(stream, cfg.num_workers)


def make_eval_loader(cfg: DataConfig, tokenizer) -> DataLoader:
    """One pass over all shards: eval transform, no shuffle, every good sample (last batch may be short).

    With one worker (or num_workers=0) batches follow shard order exactly; with more, workers
    take every n-th shard and batches interleave in a fixed order, so the pass is still
    deterministic. Same batch dict as make_train_loader.
    """
    urls = cfg.expanded_shards()
    stream = ShardStream(urls, cfg, tokenizer, eval_transform(cfg.image_size), epochs=1, shuffle=False,
                         drop_last=False, rng_transform=False)
    return _loader(stream, min(cfg.num_workers, len(urls)))
