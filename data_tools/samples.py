"""One manifest row -> one clean sample (key.jpg + key.txt + key.json), or a rejection with a reason.

Checks run cheapest first: the row itself, the caption, then the bytes (read or fetched), then the
image. A row that fails any of them raises Rejected; make_shards counts it and moves on.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from data_tools.manifest import BAD_ROW, Columns

# Every way a row can fail, in the order they are checked. Each is counted in stats.json.
REASONS = (
    "bad_row",            # unparsable line, or no image path/URL in the row
    "caption_too_short",  # empty after cleaning, or shorter than --min-caption-chars
    "caption_too_long",   # longer than --max-caption-chars after cleaning
    "missing_file",       # local image path that does not exist or cannot be read
    "fetch_failed",       # URL: connection error, timeout or HTTP error after --retries
    "file_too_large",     # more bytes than --max-file-bytes
    "undecodable",        # not an image, or truncated / corrupt image data
    "too_many_pixels",    # width x height above --max-pixels (decompression bomb guard)
    "image_too_small",    # shorter side below --min-side
    "duplicate",          # same image bytes and caption as a sample written from an earlier row
)
EXIF_ORIENTATION = 0x0112
INVISIBLE = ("Cc", "Cf", "Cs", "Co")  # control, format (zero-width), surrogate, private-use characters
USER_AGENT = "wenlan-make-shards/1.0 (image-text dataset builder)"


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class CleanOptions:
    """Everything that decides which rows survive and what their bytes are."""

    min_caption_chars: int = 1
    max_caption_chars: int = 256
    t2s: bool = False  # traditional -> simplified Chinese through OpenCC
    max_pixels: int = 50_000_000
    min_side: int = 0
    max_side: int = 0  # 0 keeps the size; otherwise the long side is resized down to this
    jpeg_quality: int = 95
    max_file_bytes: int = 32 << 20


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are fetched; does not change which bytes a live URL gives."""

    image_root: str = ""  # relative paths are resolved against this
    timeout_s: float = 10.0
    retries: int = 2
    threads: int = 16


# ----------------------------------------------------------------------------- captions

def _t2s_converter():
    try:
        import opencc
    except ImportError:
        raise RuntimeError("--t2s needs the opencc package: pip install -r requirements.txt") from None
    return opencc.OpenCC("t2s")


class CaptionCleaner:
    def __init__(self, opts: CleanOptions):
        self.opts = opts
        self._t2s = _t2s_converter() if opts.t2s else None

    def __call__(self, raw) -> str:
        """NFKC (full-width letters/digits to ASCII, compatibility forms folded), invisible
        control/format characters dropped, whitespace runs collapsed, optionally simplified."""
        text = unicodedata.normalize("NFKC", "" if raw is None else str(raw))
        if not text.isprintable():  # rare: only then pay for a per-character pass
            text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in INVISIBLE)
        text = " ".join(text.split())
        if self._t2s is not None and text:
            text = self._t2s.convert(text)
        return text

    def checked(self, raw) -> str:
        caption = self(raw)
        if len(caption) < max(1, self.opts.min_caption_chars):
            raise Rejected("caption_too_short", f"{len(caption)} chars")
        if len(caption) > self.opts.max_caption_chars:
            raise Rejected("caption_too_long", f"{len(caption)} chars > {self.opts.max_caption_chars}")
        return caption


# ----------------------------------------------------------------------------- bytes

def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class Fetcher:
    """Reads local files and fetches URLs (one requests.Session per thread, with urllib3 retries
    on connection errors and 429/5xx, a connect/read timeout and a size cap)."""

    def __init__(self, fetch: FetchOptions, max_file_bytes: int):
        self.fetch, self.max_bytes = fetch, max_file_bytes
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(total=self.fetch.retries, connect=self.fetch.retries, read=self.fetch.retries,
                          status=self.fetch.retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                          allowed_methods=frozenset({"GET"}), raise_on_status=False)
            session = requests.Session()
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    def __call__(self, source: str) -> bytes:
        return self._get_url(source) if is_url(source) else self._read_file(source)

    def _read_file(self, source: str) -> bytes:
        path = Path(source)
        if not path.is_absolute() and self.fetch.image_root:
            path = Path(self.fetch.image_root) / path
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                raise Rejected("file_too_large", f"{size} bytes")
            return path.read_bytes()
        except OSError as e:
            raise Rejected("missing_file", f"{type(e).__name__}: {e.strerror or e}") from None

    def _get_url(self, url: str) -> bytes:
        import requests

        try:
            with self._session().get(url, timeout=self.fetch.timeout_s, stream=True) as resp:
                if resp.status_code != 200:
                    raise Rejected("fetch_failed", f"HTTP {resp.status_code}")
                declared = int(resp.headers.get("Content-Length") or 0)
                if declared > self.max_bytes:
                    raise Rejected("file_too_large", f"Content-Length {declared}")
                chunks, size = [], 0
                for chunk in resp.iter_content(1 << 16):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise Rejected("file_too_large", f"over {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except requests.RequestException as e:
            raise Rejected("fetch_failed", type(e).__name__) from None


# ----------------------------------------------------------------------------- images

def fit_long_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (not on black garbage)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def clean_image(data: bytes, opts: CleanOptions) -> tuple[bytes, dict]:
    """(JPEG bytes, size info). The original bytes are kept when they are already an upright RGB
    JPEG of an allowed size; anything else is decoded and re-encoded (deterministically)."""
    try:
        with warnings.catch_warnings():
            # Our own pixel check below gives the count a reason; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)[:120]) from None
    except Exception as e:  # PIL raises many types for bad bytes
        raise Rejected("undecodable", f"{type(e).__name__}: {e}"[:200]) from None
    width, height = im.size
    if width * height > opts.max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height}")
    if min(width, height) < opts.min_side:
        raise Rejected("image_too_small", f"{width}x{height}")
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        target = fit_long_side(width, height, opts.max_side)
        keep = im.format == "JPEG" and im.mode == "RGB" and orientation == 1 and target == (width, height)
        if im.format == "JPEG" and target != (width, height):
            im.draft("RGB", target)  # DCT-domain downscale: decodes large JPEGs several times faster
        im.load()  # the full decode: truncated or corrupt data fails here
        if keep:
            return data, {"width": width, "height": height, "original_width": width, "original_height": height}
        im = _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
        # Orientations 5-8 swap the axes: the target is measured on the upright image.
        out_size = fit_long_side(height, width, opts.max_side) if orientation in (5, 6, 7, 8) else target
        if im.size != out_size:  # also after draft(), which lands near but not on the target
            im = im.resize(out_size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=opts.jpeg_quality)
    except Rejected:
        raise
    except Exception as e:
        raise Rejected("undecodable", f"{type(e).__name__}: {e}"[:200]) from None
    return buf.getvalue(), {"width": out_size[0], "height": out_size[1],
                            "original_width": width, "original_height": height}


def content_hash(image_bytes: bytes, caption: str) -> bytes:
    """16-byte identity of a pair: the original image bytes and the cleaned caption. 128 bits keep
    the chance of one false duplicate among 10^9 pairs below 10^-20."""
    h = hashlib.blake2b(digest_size=16)
    h.update(len(image_bytes).to_bytes(8, "little"))
    h.update(image_bytes)
    h.update(caption.encode("utf-8"))
    return h.digest()


# ----------------------------------------------------------------------------- rows

RESERVED_JSON = ("row", "id", "source", "caption", "width", "height", "original_width", "original_height")


@dataclass
class Prepared:
    """A row whose fields and caption passed; its bytes are still to be read."""

    row: int
    source: str
    caption: str
    meta: dict
    tags: str | None = None
    """Space-separated tags from the manifest's tags column; None: the sample gets no ``tags`` member."""


def prepare_row(row: int, record: dict, cols: Columns, cleaner: CaptionCleaner) -> Prepared:
    if BAD_ROW in record:
        raise Rejected("bad_row", record[BAD_ROW])
    source = record.get(cols.image)
    if not isinstance(source, str) or not source.strip():
        raise Rejected("bad_row", f"no image path/URL in column {cols.image!r}")
    source = source.strip()
    if "://" in source and not is_url(source):
        raise Rejected("bad_row", f"unsupported URL scheme in {source[:60]!r} (http/https or a local path)")
    caption = cleaner.checked(record.get(cols.caption))
    # Extra columns travel in the sample's .json; a name that clashes with ours is kept, renamed.
    meta = {}
    for name, value in record.items():
        if name in (cols.image, cols.caption, cols.id, cols.tags):
            continue
        meta[f"manifest_{name}" if name in RESERVED_JSON else name] = value
    meta.update(row=row, source=source, caption=caption)
    if cols.id is not None and record.get(cols.id) is not None:
        meta["id"] = record[cols.id]
    return Prepared(row, source, caption, meta, _tags(record.get(cols.tags)) if cols.tags else None)


def _tags(value) -> str | None:
    """A manifest's tags cell (a list of tags, or a string of space-separated tags) as one string;
    None where the cell is empty."""
    if value is None:
        return None
    if isinstance(value, str):
        words = value.split()
    elif isinstance(value, (list, tuple)):
        words = [w for tag in value for w in str(tag).split()]
    else:
        raise Rejected("bad_row", f"tags cell is a {type(value).__name__}; use a list of strings or a string")
    return " ".join(words) or None


def sample_key(row: int) -> str:
    """The manifest row number: unique, stable, and free of the dots webdataset splits keys on.
    The manifest's own id travels in the .json."""
    return f"{row:010d}"


def build_sample(prepared: Prepared, data: bytes, opts: CleanOptions) -> tuple[dict, bytes]:
    """(webdataset sample, content hash)."""
    image, size_info = clean_image(data, opts)
    meta = dict(prepared.meta, **size_info)
    sample = {
        "__key__": sample_key(prepared.row),
        "jpg": image,
        "txt": prepared.caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"),
    }
    if prepared.tags is not None:
        sample["tags"] = prepared.tags.encode("utf-8")
    return sample, content_hash(data, prepared.caption)
