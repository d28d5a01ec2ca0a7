"""Malformed input through both loaders: no crash, and every written sample is either delivered or
counted as skipped under the reason its defect should give."""

import io
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from test_data import CAPTIONS, collect, cut, jpeg, member_offsets, tokenizer, write_tar  # noqa: F401
from wenlan.data import DataConfig, make_eval_loader, make_train_loader

MAX_PIXELS = 5000


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def giant_png() -> bytes:
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (a decompression bomb's calling card)."""
    data = bytearray(png(1, 1))
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    return bytes(data)


# defect -> (fields of a sample with it, the skip reason it must get; None: a good sample)
DEFECTS = {
    "good": lambda rng, image, caption: ({"jpg": image, "txt": caption}, None),
    "garbage image": lambda rng, image, caption: (
        {"jpg": rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes(), "txt": caption},
        "undecodable image"),
    "truncated jpeg": lambda rng, image, caption: (
        {"jpg": image[:int(rng.integers(10, len(image) - 10))], "txt": caption}, "undecodable image"),
    "jpeg header only": lambda rng, image, caption: (
        {"jpg": b"\xff\xd8\xff\xe0" + bytes(20), "txt": caption}, "undecodable image"),
    "non-utf8 caption": lambda rng, image, caption: (
        {"jpg": image, "txt": b"\xff\xfe" + rng.integers(128, 256, 8, dtype=np.uint8).tobytes()}, "caption not utf-8"),
    "empty caption": lambda rng, image, caption: (
        {"jpg": image, "txt": [b"", b" ", b"\n\t "][int(rng.integers(3))]}, "empty caption"),
    "no caption": lambda rng, image, caption: ({"jpg": image}, "missing caption"),
    "garbage json, no caption": lambda rng, image, caption: (
        {"jpg": image, "json": b'{"caption": \xff'}, "missing caption"),
    "no image": lambda rng, image, caption: ({"txt": caption, "json": b"{}"}, "missing image"),
    "giant png": lambda rng, image, caption: ({"png": GIANT_PNG, "txt": caption}, "image too large"),
    "png over max_image_pixels": lambda rng, image, caption: ({"png": png(80, 80), "txt": caption},
                                                              "image too large"),
}
GIANT_PNG = giant_png()


@pytest.fixture(scope="module")
def fuzz_shards(tmp_path_factory):
    """6 shards x 100 samples, ~90% malformed, the last shard cut inside its last sample."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    expected, paths = Counter(), []
    bad_kinds = [k for k in DEFECTS if k != "good"]
    for s in range(6):
        samples = []
        for i in range(100):
            kind = "good" if rng.random() < 0.1 else bad_kinds[int(rng.integers(len(bad_kinds)))]
            fields, reason = DEFECTS[kind](rng, jpeg(s * 100 + i), CAPTIONS[i % 4].encode())
            samples.append({"__key__": f"f{s}-{i:03d}", **fields})
            expected[reason or "good"] += 1
        paths.append(write_tar(root / f"fuzz-{s:02d}.tar", samples))
    # Cut the last shard inside its last sample's first member: that sample is counted as the shard's
    # loss ("truncated shard") rather than under its own defect.
    expected[reason or "good"] -= 1
    expected["truncated shard"] += 1
    first_member = min(offset for name, (offset, _) in member_offsets(paths[-1]).items() if name.startswith("f5-099."))
    cut(paths[-1], first_member + 7)
    assert sum(expected.values()) == 600 and 600 - expected["good"] >= 500
    return paths, expected


def check_accounting(keys, skipped, expected):
    counts = Counter(skipped)
    counts["good"] = len(keys)
    assert len(keys) == len(set(keys))
    assert counts == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fuzzed_eval_pass(fuzz_shards, tokenizer, num_workers):
    paths, expected = fuzz_shards
    cfg = DataConfig(shards=paths, batch_size=16, image_size=16, num_workers=num_workers, max_image_pixels=MAX_PIXELS)
    keys, skipped, _ = collect(make_eval_loader(cfg, tokenizer))
    check_accounting(keys, skipped, expected)


def test_fuzzed_train_pass(fuzz_shards, tokenizer):
    paths, expected = fuzz_shards
    cfg = DataConfig(shards=paths, image_size=16, num_workers=2, streams=2, shuffle_window=16,
                     max_image_pixels=MAX_PIXELS)
    keys, skipped, batches = collect(make_train_loader(cfg, tokenizer, 0, 1, global_batch=8, epochs=1))
    check_accounting(keys, skipped, expected)
    assert all(len(b["keys"]) == 8 for b in batches[:3])
