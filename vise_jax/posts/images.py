"""Reading and decoding images: the one decode that ingest and the input pipeline share.

* `read_image_file(path, max_bytes)`: the bytes of a regular file, never more than `max_bytes`
  (a device such as /dev/zero, a FIFO or a directory is refused before a byte is read).
* `open_image(data, max_pixels)`: the header only, refused over `max_pixels`; the `Opened`
  it returns knows the EXIF orientation and the upright size, and `decode(scale)` gives the
  pixels as upright 8-bit RGB, JPEGs optionally at a DCT reduction (1/2, 1/4, 1/8).
* `to_rgb(image)`: every Pillow mode to 8-bit RGB. 16-bit greyscale (I;16*) and 32-bit
  integer (I) images are scaled from 0-65535 (not clipped, which turns them white); float (F)
  images from 0-1, or 0-255, or else their own min-max range; transparency (RGBA, LA, PA,
  palette or greyscale with a transparent colour) is composited over white; 1-bit, CMYK,
  YCbCr, LAB and HSV by Pillow's conversions.
* `fit_size` / `encode_jpeg`: the re-encode ingest applies with `config.ingest.max_side`.

Everything is deterministic: the same bytes and the same Pillow give the same pixels.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin

from vise_jax.posts.schema import ImageInfo

# What Pillow raises on malformed files, besides UnidentifiedImageError (an OSError) and
# DecompressionBombError (turned into TooLarge by open_image).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, KeyError,
                 struct.error, ZeroDivisionError)
DRAFT_SCALES = (8, 4, 2, 1)
SHORTER, LONGER = 'shorter', 'longer'

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose showing the stored pixels upright (ImageOps.exif_transpose's).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRANSPARENT_MODES = frozenset({'RGBA', 'LA', 'PA', 'RGBa', 'La'})


class TooLarge(ValueError):
    """More bytes or more pixels than the configured limit."""


class NotARegularFile(OSError):
    """A device, FIFO, socket or directory where an image file was expected."""


def read_image_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The file's bytes; FileNotFoundError, NotARegularFile, TooLarge or another OSError.

    The file is stat'ed before it is opened (opening a FIFO would wait for a writer, opening a
    device can have effects), opened non-blocking, checked again, and read to at most
    max_bytes + 1 bytes, so a file that grows while read is caught too.
    """
    path = os.fspath(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotARegularFile(f'not a regular file: {path}')
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
    with open(fd, 'rb', closefd=True) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f'not a regular file: {path}')
        if info.st_size > max_bytes:
            raise TooLarge(f'{info.st_size:,} bytes, more than the limit of {max_bytes:,}')
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f'more than the limit of {max_bytes:,} bytes')
    return data


def confined(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `root` (also resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


@dataclasses.dataclass
class Opened:
    """An image whose header has been read: its orientation and upright size are known."""

    image: Image.Image
    orientation: int
    width: int     # upright, as displayed
    height: int

    def info(self) -> ImageInfo:
        return ImageInfo(format=self.image.format or 'unknown', width=self.width,
                         height=self.height, mode=self.image.mode)

    def draft_scale_for(self, min_width: int, min_height: int) -> int:
        """The largest JPEG reduction that keeps at least min_width x min_height (upright)."""
        return next(s for s in DRAFT_SCALES
                    if s == 1 or (self.width // s >= min_width and self.height // s >= min_height))

    def decode(self, scale: int = 1) -> tuple[Image.Image, int]:
        """(upright 8-bit RGB pixels, the reduction applied: `scale` for JPEGs, else 1).

        Reading every byte: truncated or corrupt data raises one of DECODE_ERRORS. The pixels
        may be the opened image itself: use them before closing this.
        """
        applied = 1
        image = self.image
        if scale > 1 and image.draft('RGB', (image.width // scale, image.height // scale)):
            applied = scale
        image.load()
        rgb = to_rgb(image)
        if self.orientation in _UPRIGHT:
            rgb = rgb.transpose(_UPRIGHT[self.orientation])
        return rgb, applied

    def close(self) -> None:
        self.image.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_image(data: bytes, max_pixels: int) -> Opened:
    """Reads the header (and, for formats without a reduced decode, the pixels).

    Raises TooLarge over max_pixels (Pillow's own DecompressionBombError included),
    UnidentifiedImageError for bytes that are no image, or one of DECODE_ERRORS.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooLarge(str(e)) from e
    try:
        if image.width * image.height > max_pixels:
            raise TooLarge(f'{image.width} x {image.height} = {image.width * image.height:,} '
                           f'pixels, more than the limit of {max_pixels:,}')
        if not isinstance(image, JpegImagePlugin.JpegImageFile):
            # Only JPEG decodes at reduced size, and a PNG's EXIF may follow its pixel data.
            image.load()
        turn = orientation(image)
    except BaseException:
        image.close()
        raise
    width, height = image.size
    if turn >= 5:
        width, height = height, width
    return Opened(image, turn, width, height)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1-8; 1 when absent or unreadable (browsers ignore a broken one)."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 -- a malformed EXIF block must not reject a good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB (see the module docstring for how each mode is mapped)."""
    mode = image.mode
    if mode == 'RGB':
        return image
    if mode.startswith('I;16') or mode in ('I', 'F'):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image), mode)).convert('RGB')
    if mode in _TRANSPARENT_MODES or 'transparency' in image.info:
        rgba = image.convert('RGBA') if mode != 'La' else image.convert('LA').convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def _high_depth_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    if mode == 'F':
        values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif not (low >= 0.0 and high <= 255.0):
            values = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
        return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    values = pixels.astype(np.int64)
    if mode == 'I' and values.size and (values.min() < 0 or values.max() > 65535):
        low, high = int(values.min()), int(values.max())
        values = (values - low) * 65535 // max(high - low, 1)
    # Round to nearest: 0 -> 0, 65535 -> 255, 32896 (0x8080) -> 128.
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def fit_size(width: int, height: int, target: int, side: str = SHORTER) -> tuple[int, int]:
    """(width, height) scaled so the shorter (or longer) side is at most `target`; never up."""
    if side not in (SHORTER, LONGER):
        raise ValueError(f"side must be '{SHORTER}' or '{LONGER}', got {side!r}")
    chosen = min(width, height) if side == SHORTER else max(width, height)
    if target <= 0 or chosen <= target:
        return width, height

    def scaled(length: int) -> int:  # round half up, in integers
        return max(1, (2 * length * target + chosen) // (2 * chosen))

    return scaled(width), scaled(height)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline RGB JPEG, no metadata (orientation is applied to the pixels)."""
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='JPEG', quality=quality, optimize=False,
                              progressive=False)
    return buffer.getvalue()
