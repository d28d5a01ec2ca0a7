"""Image-text batches from webdataset tar shards, in an order that does not depend on the world size
and resumes exactly.

Order. The data is read as C logical streams (DataConfig.streams, fixed for a run). In a stream's
epoch e the shard list is shuffled with (seed, e), identically everywhere, and stream c reads shards
perm[c::C] one after another. With a shard index (verify_shards' index.json, DataConfig.index), the
shards are instead dealt by sample count, largest first, each to the stream holding the fewest
samples so far (ties: lowest stream, then perm order), and each stream reads its own in perm order:
every stream's epoch then holds about total / C samples, so the streams cross epoch boundaries
together (with equal counts this is exactly perm[c::C]). Inside a shard, samples are read in tar
order and shuffled within windows of `shuffle_window`. The global batch G of an optimizer step is C blocks of G/C good samples,
block c from stream c, and rank r of W takes blocks [r*C/W, (r+1)*C/W) = global positions
[r*G/W, (r+1)*G/W). So every rank's step batch is a slice of the one-rank step batch.

Resume. A stream's position is [epoch, shard cursor in that epoch's list, samples consumed in the
shard]. Every step batch carries its streams' positions after the step; a loader started from them
continues exactly: the windows before the cursor are passed over in the tar without being read, and
the cursor's window is re-read and re-shuffled. Augmentation draws from a generator seeded per sample
(seed, epoch, shard, index in shard), so it is the same at any world size or worker count and after a
resume; with DataConfig.views the second image view and the second textual view draw from generators
seeded from the same sample seed. Bad samples are skipped and counted by reason; they use up
positions like good ones.

Workers. DataLoader worker j of a rank serves the rank's streams j, j + workers, ... and yields one
item per step (its streams' blocks); the DataLoader returns the workers' items round robin, and
TrainLoader joins each step's items in stream order. num_workers=0 gives the same batches.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wenlan.data.index import ShardCounts, balanced_split, shard_counts
from wenlan.data.shards import ShardLost, _is_local, expand_shards, missing_local_shards, tar_samples
from wenlan.data.transforms import NORMALISE, TrainTransform, augment_caption, eval_transform, train_transform

# The tokenizer runs inside forked DataLoader workers; its own thread pool would be unsafe there.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_BAD = 5  # per worker; later bad samples are still counted, just not logged one by one
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit

__all__ = ["DataConfig", "TrainLoader", "check_train_layout", "default_streams", "expand_shards", "make_eval_loader",
           "make_train_loader", "merge_positions", "missing_local_shards"]


@dataclass
class DataConfig:
    """Where the pairs come from and how they are read.

    shards: paths or URLs of tar shards; brace notation (`train-{000000..000019}.tar`) expands and a
        local directory stands for the tar files in it.
    batch_size: the eval loader's batch. A train step's batch is global_batch / world_size, given to
        make_train_loader.
    num_workers: DataLoader workers per rank; the train loader uses at most streams / world_size (and
        warns when that caps the request; the default stream count leaves room for them).
    streams: C, the number of logical data streams (see the module docstring). A property of the run:
        keep it when resuming, at any world size. None: taken from the resume position, else
        default_streams(world_size).
    shuffle_window: samples of a shard shuffled together (and held in memory) per stream.
    augment: BriVL's training augmentation (random resized crop + colour jitter + grayscale);
        False gives train images the eval view.
    color_augment: with augment, also colour jitter and grayscale. Turn it off when captions name
        colours (the demo set): a grayscale "red circle" is a false pair. No transform ever flips
        horizontally, since captions name left and right.
    max_image_pixels: images with more pixels are skipped undecoded ("image too large"), a guard
        against decompression bombs. PIL's own guard (twice its Image.MAX_IMAGE_PIXELS) still applies.
    index: the shard index with sample counts (data_tools/verify_shards.py). "auto": the index.json
        beside the shards, used when every shard is a local file and each shard directory has one;
        a path (or URL): that index; None: none. With an index the train loader knows the samples
        per epoch and splits shards across streams by sample count (see the module docstring); an
        index must be written before a run starts and kept for it, since it decides the order.
    pin_memory: train batches in page-locked host memory (training on a GPU), so that their copies to
        the device run asynchronously, overlapping the previous step's work.
    """

    shards: list[str]
    batch_size: int = 128
    image_size: int = 64
    max_text_len: int = 32
    num_workers: int = 1
    streams: int | None = None
    shuffle_window: int = 1000
    seed: int = 0
    augment: bool = True
    color_augment: bool = True
    max_image_pixels: int = PIL_MAX_IMAGE_PIXELS
    index: str | None = "auto"
    pin_memory: bool = False
    views: bool = False
    """Also a second view of every sample (for the multi-view objectives): ``images2`` /
    ``colour_maps2``, the image through the training augmentation again with its own draws, and
    ``input_ids2`` / ``attention_mask2``, the sample's tags (a ``tags`` member: words separated by
    spaces) or, where a sample has none, its caption through ``augment_caption``. In the eval loader
    the second image view is the training crop (with colour jitter if ``color_augment``), drawn from
    the sample's key, so an evaluation is repeatable."""

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        for name in ("batch_size", "image_size", "max_text_len", "shuffle_window", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"DataConfig.streams must be >= 1 (or None for the default), got {self.streams}")
        missing = missing_local_shards(self.shards)
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(f"DataConfig.shards: missing local shard files: {shown}")
        if not self.expanded_shards():
            raise ValueError("DataConfig.shards is empty: give at least one tar shard")
        if self.index not in (None, "auto") and _is_local(self.index) and not os.path.isfile(self.index):
            raise ValueError(f"DataConfig.index: no such file {self.index!r}; write it with "
                             "`python data_tools/verify_shards.py DIR`, or use index=None")

    def shard_counts(self, urls: list[str] | None = None) -> ShardCounts | None:
        """Sample counts of the shards from the index (None without one); ValueError if it disagrees."""
        return shard_counts(self.expanded_shards() if urls is None else urls, self.index)

    def expanded_shards(self) -> list[str]:
        """Shard list with brace notation and directories expanded, in the given order."""
        return expand_shards(self.shards)


def default_streams(world_size: int, workers: int = 1, global_batch: int | None = None) -> int:
    """A multiple of lcm(world_size, 8), so that world sizes 1, 2, 4 and 8 (and the divisors of larger
    ones) share it and a run can move between them, with enough streams for every rank's ``workers``
    (a worker serves whole streams): the smallest such multiple >= world_size x workers, or the largest
    one below it that divides ``global_batch`` (each step takes global_batch / C samples per stream)."""
    base = math.lcm(world_size, 8)
    k = max(1, -(-world_size * max(workers, 1) // base))
    while k > 1 and global_batch is not None and global_batch % (base * k):
        k -= 1
    return base * k


def check_train_layout(n_shards: int, streams: int, world_size: int, global_batch: int,
                       nonempty: int | None = None) -> None:
    """Raise ValueError, naming the fields and the fix, unless W | C, C | G and C <= shards (and, where
    an index gives `nonempty`, the shards holding samples)."""
    if streams % world_size:
        raise ValueError(f"DataConfig.streams={streams} is not a multiple of the world size {world_size}: "
                         f"each rank reads whole streams. Use streams={math.lcm(streams, world_size)} for a new "
                         f"run, or a world size that divides {streams} to continue this one")
    if global_batch % streams:
        raise ValueError(f"the global batch {global_batch} is not a multiple of DataConfig.streams={streams}: "
                         f"each step takes global_batch / streams samples from every stream. Use a global batch "
                         f"that is a multiple of {streams}, or (new runs only) a streams value dividing "
                         f"{global_batch} and a multiple of the world size {world_size}")
    if n_shards < streams:
        raise ValueError(f"{n_shards} shard(s) for DataConfig.streams={streams}: every stream needs at least one "
                         f"shard per epoch. Write the data as at least {streams} shards, or (new runs only) use "
                         f"fewer streams (a multiple of the world size {world_size} dividing the global batch)")
    if nonempty is not None and nonempty < streams:
        raise ValueError(f"only {nonempty} of the {n_shards} shards hold samples (per the shard index) for "
                         f"DataConfig.streams={streams}: the streams that get only empty shards would never yield "
                         f"a sample. Remove the empty shards and re-write the data as at least {streams} non-empty "
                         f"shards (then re-run verify_shards), or (new runs only) use fewer streams")


def merge_positions(per_rank: list[dict]) -> dict[int, list[int]]:
    """One position dict for all streams from the ranks' `batch["position"]` dicts (after an all-gather)."""
    return {int(c): [int(x) for x in p] for d in per_rank for c, p in d.items()}


def _seed_of(*parts) -> int:
    """A stable 63-bit seed from its parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def _caption(fields: dict[str, bytes]) -> str:
    if "txt" in fields:
        try:
            caption = fields["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("caption not utf-8") from None
    else:  # img2dataset also keeps the caption in the sample's json
        try:
            meta = json.loads(fields["json"]) if "json" in fields else None
        except (ValueError, RecursionError):
            meta = None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise _Bad("missing caption")
    caption = caption.strip()
    if not caption:
        raise _Bad("empty caption")
    return caption


def _text_view(fields: dict[str, bytes], caption: str, seed: int) -> str:
    """The sample's second textual view: its tags, else its caption through augment_caption."""
    tags = fields.get("tags")
    if tags is not None:
        try:
            text = " ".join(tags.decode("utf-8").split())
        except UnicodeDecodeError:
            raise _Bad("tags not utf-8") from None
        if text:
            return text
    return augment_caption(caption, random.Random(_seed_of(seed, "text view")))


def _second_view(fields: dict[str, bytes], transform, max_pixels: int, seed: int, caption: str) -> tuple:
    """(pixels, colour map) of the image's second view and the second textual view of ``caption``."""
    image, _ = _decode(fields, transform, max_pixels, _seed_of(seed, "image view"), all_captions=True)
    return image, _text_view(fields, caption, seed)


def _eval_captions(fields: dict[str, bytes]) -> list[str]:
    """Every caption of a validation image: the json's ``captions`` list where there is one (datasets
    with several captions per image: Flickr30K-CN, COCO-CN, AIC-ICC), else the one caption."""
    try:
        meta = json.loads(fields["json"]) if "json" in fields else None
    except (ValueError, RecursionError):
        meta = None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if captions is None:
        return [_caption(fields)]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise _Bad("bad captions list")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise _Bad("empty caption")
    return captions


def _decode(fields: dict[str, bytes], transform, max_pixels: int, seed: int | None,
            all_captions: bool = False) -> tuple[object, str | list[str]]:
    """((pixels, colour map), caption), or _Bad saying why not: uint8 pixels # (3, S, S) and their colour
    map # (3, 7) (see wenlan.data.transforms). `seed`: the random draws. ``all_captions``: a list of
    every caption of the image (``_eval_captions``) instead of the one."""
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None:
        raise _Bad("missing image")
    caption = _eval_captions(fields) if all_captions else _caption(fields)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is checked below
            with Image.open(io.BytesIO(fields[ext])) as im:
                if im.width * im.height > max_pixels:  # checked on the header, before decoding
                    raise _Bad("image too large", f"{im.width}x{im.height}")
                if isinstance(transform, TrainTransform):  # decodes as it needs (maybe at reduced scale)
                    return transform.prepare(im, seed, encoded=fields[ext]), caption
                image = im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Image.DecompressionBombError as e:  # over twice PIL's own limit, refused in Image.open
        raise _Bad("image too large", str(e)) from None
    except _Bad:
        raise
    except Exception as e:  # PIL raises many types for bad bytes
        raise _Bad("undecodable image", f"{type(e).__name__}: {e}") from None
    try:
        return (transform(image), NORMALISE), caption
    except Exception as e:  # e.g. a degenerate size the transform cannot handle
        raise _Bad("undecodable image", f"transform: {type(e).__name__}: {e}") from None


class _SkipLog:
    """Logs a worker's first MAX_LOGGED_BAD bad samples one by one and every lost shard."""

    def __init__(self):
        self.logged = 0

    def sample(self, url: str, key: str, bad: _Bad) -> None:
        if self.logged < MAX_LOGGED_BAD:
            self.logged += 1
            more = "; further bad samples are counted but not logged" if self.logged == MAX_LOGGED_BAD else ""
            log.warning("skipping sample %s in %s: %s%s", key, url, bad, more)

    @staticmethod
    def shard(url: str, lost: ShardLost) -> None:
        log.warning("%s: %s (%s); the rest of this shard is skipped", url, lost.reason, lost.detail)


def _window_shuffled(url: str, start: int, window: int, seed_parts: tuple) -> Iterator:
    """(raw index, key, fields) of a shard from position `start` of its window-shuffled order, then its
    ShardLost if any. One window of raw bytes is held; whole windows before `start` are not read."""
    first = start // window
    raw = tar_samples(url, skip=first * window)
    for w in itertools.count(first):
        chunk = list(itertools.islice(raw, window))
        lost = chunk.pop() if chunk and isinstance(chunk[-1], ShardLost) else None
        order = list(range(len(chunk)))
        random.Random(_seed_of(*seed_parts, w)).shuffle(order)
        for j in order[start - first * window if w == first else 0:]:
            yield (w * window + j, *chunk[j])
        if lost is not None:
            yield lost
        if lost is not None or len(chunk) < window:
            return


class _ShardPlan:
    """Which shards each of `n_streams` streams reads in an epoch (see the module docstring): a function
    of (seed, epoch, sample counts) only, so the same on every rank and worker and after a resume."""

    CACHED_EPOCHS = 4  # streams of one worker are at most an epoch or so apart

    def __init__(self, n_shards: int, n_streams: int, seed: int, counts: ShardCounts | None):
        self.n_shards, self.n_streams, self.seed, self.counts = n_shards, n_streams, seed, counts
        self._splits: dict[int, list[list[int]]] = {}
        self._warned: set[int] = set()

    def shards(self, epoch: int, stream: int) -> list[int]:
        """Indices (into the shard list) of `stream`'s shards in `epoch`, in reading order."""
        if epoch not in self._splits:
            order = list(range(self.n_shards))
            random.Random(_seed_of(self.seed, epoch, "shards")).shuffle(order)
            if self.counts is None:
                split = [order[c::self.n_streams] for c in range(self.n_streams)]
            else:
                split = balanced_split(order, self.counts.samples, self.n_streams)
            if len(self._splits) >= self.CACHED_EPOCHS:
                del self._splits[min(self._splits)]
            self._splits[epoch] = split
        return self._splits[epoch][stream]

    def check_read(self, shard: int, url: str, read: int) -> None:
        """A shard was read to its clean end holding `read` samples: warn (once) if the index disagrees."""
        expected = self.counts.raw[shard] if self.counts is not None else None
        if expected is not None and read != expected and shard not in self._warned:
            self._warned.add(shard)
            log.warning("%s holds %d samples but the shard index says %d: the index is stale (the shard was "
                        "rewritten after it). Epoch sizes and the stream balance follow the index until you re-run "
                        "%s (before starting a run: the index decides the order)", url, read, expected,
                        self.counts.refresh_hint())


class _Stream:
    """Logical stream `index` of the plan's streams: good samples in stream order, and its position."""

    def __init__(self, index: int, plan: _ShardPlan, urls: list[str], cfg: DataConfig, transform,
                 position: list[int], epochs: int | None, skip_log: _SkipLog):
        self.index, self.plan, self.urls, self.cfg, self.transform = index, plan, urls, cfg, transform
        self.epoch, self.shard, self.sample = position
        self.epochs, self.skip_log = epochs, skip_log
        self.exhausted = False
        self._items = self._walk()

    @property
    def position(self) -> list[int]:
        return [self.epoch, self.shard, self.sample]

    def shards(self, epoch: int) -> list[int]:
        """Indices (into urls) of this stream's shards in `epoch`."""
        return self.plan.shards(epoch, self.index)

    def _walk(self) -> Iterator[tuple[tuple | None, str | None]]:
        """(item, None) per good sample and (None, reason) per skip; the position is kept right after
        each good sample, which is where every block but a stream's last ends."""
        cfg = self.cfg
        barren = set()  # shards read whole since the last good sample, none of them giving one
        while self.epochs is None or self.epoch < self.epochs:
            shards = self.shards(self.epoch)
            while self.shard < len(shards):
                # Seeds use the shard's index in the list rather than its URL, so moving the data keeps the order.
                index, url = shards[self.shard], self.urls[shards[self.shard]]
                whole = self.sample == 0
                for got in _window_shuffled(url, self.sample, cfg.shuffle_window, (cfg.seed, self.epoch, index)):
                    if isinstance(got, ShardLost):
                        self.skip_log.shard(url, got)
                        yield None, got.reason
                        break
                    raw_index, key, fields = got
                    self.sample += 1
                    sample_seed = _seed_of(cfg.seed, self.epoch, index, raw_index)
                    seed = sample_seed if cfg.augment else None
                    try:
                        image, caption = _decode(fields, self.transform, cfg.max_image_pixels, seed)
                        second = () if not cfg.views else _second_view(
                            fields, self.transform, cfg.max_image_pixels, _seed_of(sample_seed, "views"), caption)
                    except _Bad as e:
                        self.skip_log.sample(url, key, e)
                        yield None, e.reason
                        continue
                    whole = False
                    barren.clear()
                    yield (f"{url}#{key}", image, caption, *second), None
                else:  # the shard's clean end (no ShardLost): self.sample is its sample count
                    self.plan.check_read(index, url, self.sample)
                if whole:
                    barren.add(index)
                    if len(barren) == len(self.urls) and self.epochs is None:  # endless, and nothing will come
                        raise RuntimeError(f"data stream {self.index}: none of the {len(self.urls)} shards gave a "
                                           "usable sample (see the skip warnings); check the shards")
                self.shard, self.sample = self.shard + 1, 0
            self.epoch, self.shard, self.sample = self.epoch + 1, 0, 0

    def block(self, size: int) -> tuple[list, Counter]:
        """The next `size` good samples (fewer at the stream's end) and the skips on the way."""
        items, skipped = [], Counter()
        while len(items) < size and not self.exhausted:
            got = next(self._items, None)
            if got is None:
                self.exhausted = True
            elif got[1] is not None:
                skipped[got[1]] += 1
            else:
                items.append(got[0])
        return items, skipped


def _images(images: list, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' (pixels, colour map) pairs -> uint8 # (B, 3, S, S) and # (B, 3, 7). The pixels are
    channels-last in memory, as the resize leaves them: stacking them so is a plain copy (a tenth of
    the cost of transposing them into NCHW here)."""
    if not images:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, 3, 7)
    pixels, maps = zip(*images)
    return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2), torch.stack(maps)


def _tokens(texts: list[str], tokenizer, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and attention mask, padded to ``text_len``."""
    if not texts:
        return torch.zeros(0, text_len, dtype=torch.long), torch.zeros(0, text_len, dtype=torch.long)
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
    return tok["input_ids"].long(), tok["attention_mask"].long()


def _collate(items: list, skipped: Counter, tokenizer, text_len: int,
             images: tuple[torch.Tensor, torch.Tensor] | None, views: bool = False) -> dict:
    """Items (key, image, caption[, image2, text2]) -> a batch; with ``views`` also the second textual
    view's tokens (the second images travel with the first, see ``_images``)."""
    keys = [item[0] for item in items]
    ids, mask = _tokens([item[2] for item in items], tokenizer, text_len)
    batch = {} if images is None else {"images": images[0], "colour_maps": images[1]}  # (B, 3, S, S), (B, 3, 7)
    if views:
        batch["input_ids2"], batch["attention_mask2"] = _tokens([item[4] for item in items], tokenizer, text_len)
    return {
        **batch,
        "input_ids": ids,  # (B, L)
        "attention_mask": mask,  # (B, L)
        "keys": keys,
        "skipped": dict(skipped),
    }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _as_is(item):
    return item


# A train loader's workers start from a forkserver, not by forking the trainer: a forked worker shares
# the trainer's host pages copy-on-write, and every page the trainer then writes (optimizer steps over
# host-held model states: CPU runs, optimizer offload) is copied, once per worker, for the whole run. At
# the 10b widths on CPU (tests/test_scale.py) each rank's worker held 3.8 GB of the rank's 7 GB and the
# first step ran out of memory. The server imports this module once (through wenlan.data.worker_server,
# which also gives the workers the signal dispositions forked ones inherited), so a worker starts in
# about a second; eval loaders live for one pass, during which nothing is written, and fork.
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["wenlan.data.worker_server"])


def start_worker_server() -> None:
    """Start the forkserver now, while the trainer is small and its imports overlap the engine build
    (it is an exec'd interpreter either way: it never holds the trainer's memory)."""
    from multiprocessing import forkserver

    forkserver.ensure_running()


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False,
            long_lived: bool = False) -> DataLoader:
    # Its own generator: starting the DataLoader would otherwise draw a worker seed from the caller's
    # global RNG (the workers need none: augmentation is seeded per sample).
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is, pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers else None, generator=torch.Generator().manual_seed(0),
                      multiprocessing_context=_FORKSERVER if long_lived and num_workers else None)


def _cat(tensors: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """torch.cat, into page-locked memory if asked (from the caching host allocator: no allocation per step)."""
    if not pin_memory:
        return torch.cat(tensors)
    first = tensors[0]
    out = torch.empty((sum(t.shape[0] for t in tensors), *first.shape[1:]), dtype=first.dtype, pin_memory=True)
    return torch.cat(tensors, out=out)


class _RankStreams(IterableDataset):
    """A rank's streams; worker j of n serves streams[j::n] and yields one item per step:
    {"worker": j, "last": no more items after this one, "blocks": {stream: block dict},
    "images", "colour_maps": the blocks' images, one tensor each in the blocks' (stream) order}."""

    def __init__(self, cfg: DataConfig, tokenizer, transform, urls: list[str], streams: list[int], plan: _ShardPlan,
                 block_size: int, start: dict[int, list[int]], epochs: int | None):
        self.cfg, self.tokenizer, self.transform, self.urls = cfg, tokenizer, transform, urls
        self.streams, self.plan, self.block_size, self.start, self.epochs = streams, plan, block_size, start, epochs

    def __iter__(self):
        worker, n_workers = _worker()
        skip_log = _SkipLog()
        mine = [_Stream(c, self.plan, self.urls, self.cfg, self.transform, self.start[c], self.epochs, skip_log)
                for c in self.streams[worker::n_workers]]
        while True:
            blocks, images, images2 = {}, [], []
            for s in mine:
                items, skipped = s.block(self.block_size)
                images += [item[1] for item in items]
                images2 += [item[3] for item in items if self.cfg.views]
                blocks[s.index] = _collate(items, skipped, self.tokenizer, self.cfg.max_text_len, None, self.cfg.views)
                blocks[s.index]["position"] = s.position
            last = all(s.exhausted for s in mine)
            pixels, maps = _images(images, self.cfg.image_size)
            item = {"worker": worker, "last": last, "blocks": blocks, "images": pixels, "colour_maps": maps}
            if self.cfg.views:
                item["images2"], item["colour_maps2"] = _images(images2, self.cfg.image_size)
            yield item
            if last:
                return


class TrainLoader:
    """Step batches of one rank, one per optimizer step (see make_train_loader).

    samples_per_epoch: good samples in one epoch of all streams, from the shard index (None without
    one); steps_per_epoch: samples_per_epoch / global batch."""

    def __init__(self, dataset: _RankStreams, num_workers: int, global_batch: int):
        self.dataset, self.num_workers = dataset, num_workers
        counts = dataset.plan.counts
        self.samples_per_epoch = counts.total if counts is not None else None
        self.steps_per_epoch = self.samples_per_epoch / global_batch if counts is not None else None

    def __iter__(self) -> Iterator[dict]:
        pin = self.dataset.cfg.pin_memory
        loader = _loader(self.dataset, self.num_workers, pin, long_lived=True)  # pins what the workers send
        items = iter(loader)
        streams = self.dataset.streams
        position = {c: list(self.dataset.start[c]) for c in streams}
        active = list(range(max(self.num_workers, 1)))
        while active:
            # The DataLoader hands out items round robin over the workers still running.
            got = [next(items) for _ in active]
            if [g["worker"] for g in got] != active:
                raise RuntimeError(f"data workers out of step: expected items of {active}, got {[g['worker'] for g in got]}")
            blocks = {c: b for g in got for c, b in g["blocks"].items()}
            parts = [blocks[c] for c in streams if c in blocks]  # stream order = global batch order
            pixel_keys = [k for k in ("images", "colour_maps", "images2", "colour_maps2") if k in got[0]]
            if len(got) == 1:  # one worker's blocks: already one tensor in stream order
                pixels = {k: got[0][k] for k in pixel_keys}
            else:
                for g in got:
                    at = 0
                    for b in g["blocks"].values():
                        rows, at = slice(at, at + len(b["keys"])), at + len(b["keys"])
                        b.update({k: g[k][rows] for k in pixel_keys})
                pixels = {k: _cat([b[k] for b in parts], pin) for k in pixel_keys}
            views = {k: _cat([b[k] for b in parts], pin) for k in ("input_ids2", "attention_mask2") if k in parts[0]}
            skipped = Counter()
            for c, b in blocks.items():
                skipped.update(b["skipped"])
                position[c] = b["position"]
            yield {
                **pixels,  # images (G/W, 3, S, S) uint8, colour_maps (G/W, 3, 7); images2, colour_maps2 too with views
                **views,  # input_ids2, attention_mask2 (G/W, L) with views
                "input_ids": _cat([b["input_ids"] for b in parts], pin),  # (G/W, L)
                "attention_mask": _cat([b["attention_mask"] for b in parts], pin),  # (G/W, L)
                "keys": [k for b in parts for k in b["keys"]],
                "skipped": dict(skipped),
                "position": {c: list(p) for c, p in position.items()},
            }
            active = [g["worker"] for g in got if not g["last"]]


def _start_positions(position: dict | None, streams: int) -> dict[int, list[int]]:
    if position is None:
        return {c: [0, 0, 0] for c in range(streams)}
    start = merge_positions([position])
    if sorted(start) != list(range(streams)) or any(len(p) != 3 or min(p) < 0 for p in start.values()):
        raise ValueError(f"position: expected [epoch, shard_cursor, sample_cursor] for each of the {streams} "
                         f"streams 0..{streams - 1} (DataConfig.streams={streams}), got streams {sorted(start)}. "
                         "Resume with the streams value the run started with, from the merged positions of all ranks")
    return start


def make_train_loader(cfg: DataConfig, tokenizer, rank: int, world_size: int, *, global_batch: int,
                      position: dict | None = None, epochs: int | None = None) -> TrainLoader:
    """Step batches for `rank` of `world_size`, endless unless `epochs` is given (tests and tools).

    Each item is one optimizer step's share of the global batch, B = global_batch / world_size:
    {"images": (B, 3, S, S) uint8, "colour_maps": (B, 3, 7) float (the sample's colour augmentation and
    normalisation: wenlan.data.model_images(images, colour_maps, device) gives the model's input),
    "input_ids": (B, L) long, "attention_mask": (B, L) long,
    "keys": list[str] ("url#key"), "skipped": {reason: count} this step,
    "position": {stream: [epoch, shard_cursor, sample_cursor]} of this rank's streams after the step}.
    `position`: the merged positions of all streams (merge_positions of every rank's last batch) to
    resume from; any world size dividing the streams count works. With `epochs`, each stream stops
    after that many epochs (counted from 0) and the last steps are short, so every sample of the
    rank's streams is delivered; ranks may then end at different steps.
    With a shard index (cfg.index) shards are split across streams by sample count and the loader's
    samples_per_epoch / steps_per_epoch are known (rank 0 logs them).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    urls = cfg.expanded_shards()
    if cfg.streams is not None:
        n_streams = cfg.streams
    else:
        n_streams = len(position) if position else default_streams(world_size)
    counts = cfg.shard_counts(urls)
    check_train_layout(len(urls), n_streams, world_size, global_batch,
                       nonempty=sum(n > 0 for n in counts.samples) if counts is not None else None)
    plan = _ShardPlan(len(urls), n_streams, cfg.seed, counts)
    if rank == 0:
        _log_plan(plan, global_batch)
    start = _start_positions(position, n_streams)
    per_rank = n_streams // world_size
    if rank == 0 and cfg.num_workers > per_rank:
        log.warning("%d data loader workers per rank asked for, %d used: a worker serves whole streams and each "
                    "rank reads %d of the run's %d (set with --data-streams when the run starts)",
                    cfg.num_workers, per_rank, per_rank, n_streams)
    streams = list(range(rank * per_rank, (rank + 1) * per_rank))
    if cfg.augment:
        transform = train_transform(cfg.image_size, color_augment=cfg.color_augment)
    else:
        transform = eval_transform(cfg.image_size)
    dataset = _RankStreams(cfg, tokenizer, transform, urls, streams, plan, global_batch // n_streams, start, epochs)
    return TrainLoader(dataset, min(cfg.num_workers, per_rank), global_batch)


def _log_plan(plan: _ShardPlan, global_batch: int) -> None:
    counts = plan.counts
    if counts is None:
        log.info("%d shards, %d data streams, no shard index: shards are split round robin and the epoch size is "
                 "unknown (write one with data_tools/verify_shards.py)", plan.n_shards, plan.n_streams)
        return
    totals = [sum(counts.samples[s] for s in plan.shards(0, c)) for c in range(plan.n_streams)]
    log.info("shard index %s: %d shards, %d samples per epoch (%.1f steps of global batch %d); %d data streams "
             "balanced by sample count: %d..%d samples each in epoch 0", ", ".join(counts.paths), plan.n_shards,
             counts.total, counts.total / global_batch, global_batch, plan.n_streams, min(totals), max(totals))


class _EvalPass(IterableDataset):
    """Worker j of n reads shards[j::n] in order, batches of cfg.batch_size, the last one short."""

    def __init__(self, cfg: DataConfig, tokenizer, urls: list[str]):
        self.cfg, self.tokenizer, self.urls = cfg, tokenizer, urls
        self.transform = eval_transform(cfg.image_size)
        self.view_transform = train_transform(cfg.image_size, color_augment=cfg.color_augment) if cfg.views else None

    def __iter__(self):
        worker, n_workers = _worker()
        cfg, skip_log = self.cfg, _SkipLog()
        pending, skipped = [], Counter()
        for url in self.urls[worker::n_workers]:
            for got in tar_samples(url):
                if isinstance(got, ShardLost):
                    skip_log.shard(url, got)
                    skipped[got.reason] += 1
                    continue
                key, fields = got
                try:
                    image, captions = _decode(fields, self.transform, cfg.max_image_pixels, None, all_captions=True)
                    seed = _seed_of(cfg.seed, "eval", key)  # the same views at every evaluation
                    second = () if not cfg.views else \
                        _second_view(fields, self.view_transform, cfg.max_image_pixels, seed, captions[0])
                except _Bad as e:
                    skip_log.sample(url, key, e)
                    skipped[e.reason] += 1
                    continue
                for caption in captions:  # one row per (image, caption): rows of one image share its key
                    pending.append((f"{url}#{key}", image, caption, *second))
                    if len(pending) == cfg.batch_size:
                        yield self._batch(pending, skipped)
                        pending, skipped = [], Counter()
        if pending or skipped:
            yield self._batch(pending, skipped)

    def _batch(self, pending: list, skipped: Counter) -> dict:
        images = _images([item[1] for item in pending], self.cfg.image_size)
        batch = _collate(pending, skipped, self.tokenizer, self.cfg.max_text_len, images, self.cfg.views)
        if self.cfg.views:
            batch["images2"], batch["colour_maps2"] = _images([item[3] for item in pending], self.cfg.image_size)
        return batch


def make_eval_loader(cfg: DataConfig, tokenizer) -> DataLoader:
    """One deterministic pass over all shards: eval transform, no shuffle, every good sample; a sample
    with several captions (a ``captions`` list in its json) gives one row per caption, the rows sharing
    the sample's key (``wenlan.evaluate.group_rows`` turns them into images and their captions).

    Batches {"images", "colour_maps", "input_ids", "attention_mask", "keys", "skipped": {reason: count}}
    (as make_train_loader's; the colour maps are the normalisation alone; with cfg.views the second
    views too, the second textual view made from an image's first caption and repeated on its rows) of
    cfg.batch_size, the last one short; skips after the last good sample arrive in a final batch with
    B == 0 (add batch["skipped"], then skip empty batches). With one worker (or none) batches follow
    shard order exactly; with more, workers take every n-th shard and their batches interleave in a
    fixed order.
    """
    urls = cfg.expanded_shards()
    workers = min(cfg.num_workers, len(urls))
    return _loader(_EvalPass(cfg, tokenizer, urls), workers)
