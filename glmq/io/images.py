"""Image files in and out, shared by ``glmq generate``, the server and the ComfyUI nodes: sizes as users
write them, output paths checked before minutes of generation, reference images read safely, and images
written atomically (a name of this process's own, then a rename: two writers of one path never mix bytes)."""

from __future__ import annotations

import os
from pathlib import Path

from glmq.errors import GlmqError

GRID = 32  # GLM-Image works on a 32-pixel token grid


def parse_size(text: str, what: str = "--size") -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)`` (width, height), positive multiples of 32."""
    try:
        w, h = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
        raise GlmqError(f"{what} must look like 1024x1024 (WIDTHxHEIGHT), got {text!r}") from None
    if w <= 0 or h <= 0 or w % GRID or h % GRID:
        raise GlmqError(f"{what} {text}: width and height must be positive multiples of {GRID} (GLM-Image works "
                        f"on a {GRID}-pixel token grid)")
    return w, h


def image_format(out: Path) -> str:
    """The PIL format that ``out``'s suffix names."""
    from PIL import Image

    if out.name in ("", ".", ".."):
        raise GlmqError(f"--out {str(out)!r} must name an image file, e.g. out.png")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise GlmqError(f"--out {out}: unknown image type {out.suffix or '(no suffix)'!r}; use .png, .jpg or .webp")
    return fmt


def check_image_out(out: Path, *, force: bool) -> str:
    """Refuse an output path that cannot be written (before any work); returns its PIL format."""
    fmt = image_format(out)
    if out.is_dir():
        raise GlmqError(f"{out} is a folder; --out names the image file to write")
    if os.path.lexists(out) and not force:
        raise GlmqError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise GlmqError(f"{out.parent}: output folder does not exist")
    return fmt


def read_image(path: str | Path):
    """An RGB PIL image, or a one-line :class:`GlmqError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise GlmqError(f"{path}: cannot read image ({e.__class__.__name__})") from None


def decode_image(data: bytes, what: str, *, max_pixels: int):
    """An RGB PIL image from the bytes of an image file (an upload), or a one-line :class:`GlmqError`.

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded, so a
    small file that claims a huge image (a decompression bomb) costs nothing."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise GlmqError(f"{what} is {width}x{height}, more than {max_pixels} pixels")
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise GlmqError(f"{what} is not a readable image ({e.__class__.__name__})") from None


def save_image(image, out: Path, fmt: str | None = None) -> None:
    """Write ``image`` to ``out`` atomically."""
    fmt = fmt or image_format(out)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        image.save(partial, format=fmt)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
