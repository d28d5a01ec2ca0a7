"""Image transforms: BriVL's training augmentation and the deterministic eval view.

The loader ships every image as uint8 pixels # (3, image_size, image_size) plus a colour map # (3, 7)
(see colour_map): the affine map of RGB that is the sample's colour augmentation followed by ImageNet
normalisation (the image backbones are ImageNet-pretrained). `model_images` applies the maps of a batch
where the model runs: on a GPU it costs nothing next to the step, whereas on the loader's CPU it was a
quarter of the work per sample; the host-to-device copy is a quarter of a float batch's too. The eval
view's map is the normalisation alone, so every batch has the same form.

The training transform is built for throughput, since it runs on every sample of every epoch:
- The random resized crop is drawn from the image header before decoding. A JPEG is decoded by
  libjpeg-turbo (simplejpeg) straight into a uint8 array, at 1/2, 1/4 or 1/8 scale in the DCT domain
  when the crop is at least 2x (4x, 8x) the output size, so no crop is upscaled that a full decode
  would not upscale. Other formats (and JPEGs libjpeg-turbo refuses) go through PIL.
- Crop + resize is one antialiased bilinear interpolation of the uint8 crop (torch's vectorised uint8
  kernel); the loader touches no pixel after it.
- Colour jitter, grayscale and the normalisation are one affine colour map: each of them is an affine
  map of RGB (brightness scales, contrast and saturation blend with a grey level or the grey image,
  hue rotates the chroma plane, grayscale projects on luma), so their composition in the drawn order
  is one 3x3 matrix plus an offset. Contrast's grey level is the mean of the image as it is at that
  point, i.e. a linear function of the crop's channel means, so the offset is t + C @ mean(crop) with
  C non-zero only after a contrast step; values are clamped to the valid range once at the end.
Semantics are torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1) applied with p=0.8 in a random order of
the four, then RandomGrayscale(p=0.2), with two documented differences: hue is a rotation in YIQ
space (as NVIDIA DALI's hue / ColorTwist) rather than a shift of HSV hue, which would cost more than
the decode (2.4 ms per 224 px image here); and values are clamped once at the end instead of after
each of the four steps. All random draws come from one generator seeded per sample.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a separate package) and warns
# on every call; its libjpeg-turbo decoder is still the fastest here, and the version is pinned.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


_GREY = np.array(GREY)
_TO_GREY = np.tile(_GREY, (3, 1))  # RGB -> (luma, luma, luma)
_STD = 1.0 / (255.0 * np.array(IMAGENET_STD))  # uint8 -> normalised: x * _STD + _BIAS
_BIAS = -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)
# the normalised image of [0, 255] per channel: where model_images clamps
_LOW, _HIGH = _BIAS.tolist(), (255 * _STD + _BIAS).tolist()


def hue_matrix(hue: float) -> np.ndarray:
    """RGB -> RGB rotation of the chroma (I, Q) plane by hue * 360 degrees, luma kept; the sign follows
    torchvision's adjust_hue (a positive hue turns red towards yellow)."""
    c, s = math.cos(-2 * math.pi * hue), math.sin(-2 * math.pi * hue)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def colour_map(ops: list[tuple[str, float]]) -> torch.Tensor:
    """Colour ops in order (TrainTransform.colour_ops) + the normalisation -> # (3, 7) float32 [M | C | t]:
    normalised = M @ rgb + C @ mean_rgb + t for uint8 RGB values rgb and the crop's channel means
    mean_rgb. The image after each step is m @ x + c @ mean + t; its mean grey level (contrast's blend
    target) is then GREY @ ((m + c) @ mean + t)."""
    m, c, t = np.eye(3), np.zeros((3, 3)), np.zeros(3)
    for name, f in ops:
        if name == "contrast":  # f * image + (1 - f) * its mean grey level, on every channel
            c = f * c + (1 - f) * np.outer(np.ones(3), _GREY @ (m + c))
            m, t = f * m, f * t + (1 - f) * float(_GREY @ t)
            continue
        if name == "brightness":
            step = f * np.eye(3)
        elif name == "saturation":  # blend with the grey image
            step = f * np.eye(3) + (1 - f) * _TO_GREY
        elif name == "hue":
            step = hue_matrix(f)
        elif name == "grayscale":  # every channel <- luma
            step = _TO_GREY
        else:
            raise ValueError(f"unknown colour op {name!r}")
        m, c, t = step @ m, step @ c, step @ t
    return torch.from_numpy(np.concatenate([_STD[:, None] * m, _STD[:, None] * c, (_STD * t + _BIAS)[:, None]],
                                           1).astype(np.float32))


NORMALISE = colour_map([])  # (3, 7): the normalisation alone, the eval view's map


def model_images(pixels: torch.Tensor, colour_maps: torch.Tensor, device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch as the loader ships it -> the image tower's input, on `device` in `dtype`.

    pixels: uint8 # (B, 3, H, W), any memory format (the loader's is channels-last); colour_maps:
    # (B, 3, 7) (colour_map). Computed in float32 where `device` says, as one batched 3x3 matrix
    # product per sample; the result is contiguous (B, 3, H, W)."""
    b, _, h, w = pixels.shape
    pixels = pixels.to(device, non_blocking=True)
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format).view(b, 3, h * w)  # (B, 3, HW)
    maps = colour_maps.to(x.device, non_blocking=True)  # (B, 3, 7)
    offset = maps[:, :, 6:] + torch.bmm(maps[:, :, 3:6], x.mean(2, keepdim=True))  # (B, 3, 1)
    y = torch.baddbmm(offset, maps[:, :, :3], x)  # (B, 3, HW)
    for c in range(3):
        y[:, c].clamp_(_LOW[c], _HIGH[c])
    return y.view(b, 3, h, w).to(dtype)


class TrainTransform:
    """BriVL's augmentation: mild random resized crop (scale 0.8-1, ratio 3/4-4/3), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2; then ImageNet normalisation.

    No horizontal flip: captions name left and right, and a flip would make them false.
    `color_augment=False` drops jitter and grayscale for data whose captions name colours (the demo
    set), where those would turn true captions into false ones.

    Call with a PIL image (best: just opened, not yet decoded, so a JPEG can be decoded at reduced
    scale), optionally its encoded bytes (`encoded`, for the tensor JPEG decoder) and a `seed` for
    every random draw (None: drawn from torch's global generator). The loader calls prepare() (uint8
    crop + colour map) per sample; model_images applies a batch's maps on the training device.
    """

    scale, ratio = (0.8, 1.0), (3 / 4, 4 / 3)
    jitter = dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    grayscale_p = 0.2

    def __init__(self, image_size: int, color_augment: bool = True):
        self.size, self.color_augment = image_size, color_augment

    def __repr__(self) -> str:
        return f"TrainTransform(image_size={self.size}, color_augment={self.color_augment})"

    # ------------------------------------------------------------------ random draws
    def crop_box(self, rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w): torchvision RandomResizedCrop.get_params, drawn from `rng`."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: the whole image, cut to the ratio range, centred
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def colour_ops(self, rng: random.Random) -> list[tuple[str, float]]:
        """The colour steps of one sample in order, e.g. [("hue", 0.03), ("brightness", 1.2), ...]."""
        if not self.color_augment:
            return []
        j, ops = self.jitter, []
        if rng.random() < j["p"]:
            factors = {"brightness": rng.uniform(1 - j["brightness"], 1 + j["brightness"]),
                       "contrast": rng.uniform(1 - j["contrast"], 1 + j["contrast"]),
                       "saturation": rng.uniform(1 - j["saturation"], 1 + j["saturation"]),
                       "hue": rng.uniform(-j["hue"], j["hue"])}
            ops = [(name, factors[name]) for name in rng.sample(list(factors), 4)]
        if rng.random() < self.grayscale_p:
            ops.append(("grayscale", 0.0))
        return ops

    # ------------------------------------------------------------------ pixels
    def decode_eighths(self, h: int, w: int) -> int:
        """k: a JPEG whose crop is h x w is decoded at scale k/8, the smallest of 1/8, 1/4, 1/2, 1 at
        which the crop still covers the output. libjpeg-turbo's SIMD inverse DCTs are those four; its
        3/8, 5/8, 6/8 and 7/8 ones cost more than a full decode."""
        k = 8
        while k > 1 and min(h, w) * (k // 2) >= 8 * self.size:
            k //= 2
        return k

    def _pixels(self, image: Image.Image, encoded: bytes | None, box: tuple) -> tuple[torch.Tensor, tuple]:
        """uint8 # (3, H', W') holding the crop box, and the box in its coordinates.

        A JPEG (given its bytes) is decoded by libjpeg-turbo at scale ``decode_eighths(h, w) / 8``, so
        the resize after it never upscales what a full decode would not; anything else (or a JPEG
        libjpeg-turbo refuses, e.g. CMYK) is decoded by PIL."""
        top, left, h, w = box
        width, height = image.size
        if image.format == "JPEG" and encoded is not None:
            k = self.decode_eighths(h, w)
            try:
                rgb = simplejpeg.decode_jpeg(encoded, colorspace="RGB", min_height=math.ceil(height * k / 8),
                                             min_width=math.ceil(width * k / 8))  # (H', W', 3)
            except ValueError:
                rgb = None  # PIL decodes it below, or says why it cannot
            if rgb is not None:
                pixels = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H', W'), channels-last in memory
                if rgb.shape[:2] != (height, width):  # the box at that scale, to the nearest pixel
                    sy, sx = rgb.shape[0] / height, rgb.shape[1] / width
                    top2, left2 = min(round(top * sy), rgb.shape[0] - 1), min(round(left * sx), rgb.shape[1] - 1)
                    box = (top2, left2, max(1, min(rgb.shape[0], round((top + h) * sy)) - top2),
                           max(1, min(rgb.shape[1], round((left + w) * sx)) - left2))
                return pixels, box
        return _hwc(image.convert("RGB")), box

    def prepare(self, image: Image.Image, seed: int | None = None,
                encoded: bytes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's half: the decoded, cropped and resized uint8 image # (3, S, S) and its colour map
        # (3, 7), which model_images applies."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        rng = random.Random(seed)
        width, height = image.size
        box = self.crop_box(rng, height, width)
        ops = self.colour_ops(rng)
        pixels, (top, left, h, w) = self._pixels(image, encoded, box)
        crop = pixels[None, :, top:top + h, left:left + w]  # (1, 3, h, w), a view
        if (h, w) != (self.size, self.size):
            # torch's vectorised uint8 kernel wants a dense channels-last input: copying the crop so is
            # cheaper than interpolating the strided view (0.30 vs 0.43 ms for a ~500 x 400 crop here)
            crop = nnf.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(self.size, self.size),
                                   mode="bilinear", antialias=True, align_corners=False)
        return crop[0], colour_map(ops)

    def __call__(self, image: Image.Image, seed: int | None = None, encoded: bytes | None = None) -> torch.Tensor:
        """Both halves, for one image: the normalised float # (3, S, S) the model sees."""
        pixels, colours = self.prepare(image, seed, encoded)
        return model_images(pixels[None], colours[None])[0]


CAPTION_DROP = 0.2
"""A caption's second textual view where a sample has no tags: each unit (a whitespace-separated word,
or a character in text without spaces, as Chinese captions are) is dropped with this probability."""


def augment_caption(caption: str, rng: random.Random) -> str:
    """The caption with random units deleted (EDA's random deletion, at ``CAPTION_DROP``): a second
    textual view that keeps most of the words, drawn from the sample's own generator. At least one
    unit survives."""
    spaced = any(c.isspace() for c in caption.strip())
    units = caption.split() if spaced else list(caption)
    kept = [u for u in units if rng.random() >= CAPTION_DROP]
    if not kept:
        kept = [units[rng.randrange(len(units))]]
    return (" " if spaced else "").join(kept)


def _hwc(image: Image.Image) -> torch.Tensor:
    """A decoded RGB PIL image as uint8 # (3, H, W) (a view of its H x W x 3 bytes)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)


def train_transform(image_size: int, color_augment: bool = True) -> TrainTransform:
    """BriVL's training augmentation (see TrainTransform)."""
    return TrainTransform(image_size, color_augment=color_augment)


def eval_transform(image_size: int):
    """Resize the short side, centre crop: the same uint8 pixels # (3, S, S) every time; their colour map
    is NORMALISE."""
    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.PILToTensor()])
