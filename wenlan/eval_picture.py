"""The picture of an evaluation: a few validation images, each beside its top-5 retrieved captions,
the correct ones in green. Logged to MLflow at every evaluation (``key="retrieval"``, step = the
training step), so the run's image grid has a step slider that shows the model learning.

Drawn on the tracker's thread (``Tracker.log_image``), never on the training one. The demo's captions
are Chinese, which PIL draws only with a CJK font: one is looked up at run time (fontconfig, then the
paths of Debian's fonts-wqy-microhei and fonts-noto-cjk). Without one the picture is still drawn, its
non-ASCII captions replaced by a placeholder under a note, and a warning says once what to install.
"""

import functools
import logging
import shutil
import subprocess

log = logging.getLogger(__name__)

KNOWN_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
               "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
FONT_PACKAGE = "fonts-wqy-microhei"
THUMB, ROW_GAP, TEXT_SIZE = 112, 12, 15
CORRECT, WRONG, INK, PAPER = (20, 140, 40), (120, 120, 120), (20, 20, 20), (255, 255, 255)


@functools.cache
def cjk_font_path() -> str | None:
    """A font file that covers Chinese, or None."""
    if shutil.which("fc-list"):
        try:  # fc-list lists only fonts that cover the language (fc-match would always name one)
            found = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10)
            files = sorted(line.split(":")[0].strip() for line in found.stdout.splitlines() if line.strip())
            if files:
                return next((f for f in files if "microhei" in f.lower()), files[0])
        except (OSError, subprocess.TimeoutExpired):
            pass
    from pathlib import Path

    return next((path for path in KNOWN_FONTS if Path(path).exists()), None)


@functools.cache
def _fonts():
    """(caption font, whether it draws Chinese); warns once when it does not."""
    from PIL import ImageFont

    path = cjk_font_path()
    if path is not None:
        return ImageFont.truetype(path, TEXT_SIZE), True
    log.warning("no CJK font found: retrieval pictures leave Chinese captions out; install one, e.g. "
                "`apt-get install %s` (Debian/Ubuntu)", FONT_PACKAGE)
    return ImageFont.load_default(TEXT_SIZE), False


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def retrieval_picture(examples: list[dict], step: int, width: int = 760):
    """``wenlan.evaluate.retrieval_examples`` at training step ``step`` -> a PIL image."""
    from PIL import Image, ImageDraw

    font, cjk = _fonts()
    line = TEXT_SIZE + 6
    top_k = max(len(example["top"]) for example in examples)
    row = max(THUMB, (top_k + 1) * line) + ROW_GAP
    header = 2 * line + 10  # a title line and a line for the no-font note
    picture = Image.new("RGB", (width, header + row * len(examples)), PAPER)
    draw = ImageDraw.Draw(picture)
    draw.text((8, 6), f"step {step}: top-{top_k} captions of all for each image; green = correct", fill=INK, font=font)
    if not cjk:
        draw.text((8, 6 + line), f"no CJK font: Chinese captions not drawn (apt-get install {FONT_PACKAGE})",
                  fill=INK, font=font)
    text_x = 8 + THUMB + 12
    for i, example in enumerate(examples):
        y = header + i * row
        image = Image.fromarray(example["image"].permute(1, 2, 0).numpy()).resize((THUMB, THUMB), Image.BILINEAR)
        picture.paste(image, (8, y))
        hit = any(correct for _, _, correct in example["top"])
        for rank, (caption, score, correct) in enumerate(example["top"], 1):
            shown = caption if cjk or caption.isascii() else "(a Chinese caption)"
            text = f"{rank}. {'[correct] ' if correct else ''}{shown}"
            draw.text((text_x, y + (rank - 1) * line), _fit(draw, f"{text}  ({score:.2f})", font, width - text_x - 8),
                      fill=CORRECT if correct else WRONG, font=font)
        if not hit:
            truth = example["truth"] if cjk or example["truth"].isascii() else "(a Chinese caption)"
            draw.text((text_x, y + top_k * line), _fit(draw, f"correct, not in the top {top_k}: {truth}", font,
                                                         width - text_x - 8), fill=INK, font=font)
    return picture
