"""Image transforms on the host: encoded bytes in, uint8 HxWx3 at the model's size out.

Training: torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, ten attempts, then the
centre-crop fallback) and a horizontal flip. Evaluation: resize the shorter side to
size / crop_fraction (256 for 224) and take the centre crop. Normalisation happens on device, in
the model; the host only ships uint8.

Cost is the JPEG decode, so each transform first plans its crop box from the header alone, then
asks libjpeg for the smallest DCT-domain reduction (1/2, 1/4, 1/8: PIL's draft mode) that still
leaves at least `size` pixels across the crop, and crops and resizes in one `Image.resize(box=)`
call. A 500x375 photo cropped at 300 px and resized to 224 decodes at 1/1; a 4000x3000 one at
1/8.

Randomness is not drawn from a generator the pipeline carries: `example_uniforms` hashes
(seed, epoch, example) into the numbers a crop needs. The crop of post 17 in epoch 3 is the
same whatever the batch size, worker count or number of hosts, and a restored iterator repeats
it exactly.

Decoding is vise_jax.posts.images, the same decode ingest validates with: every Pillow mode to
8-bit RGB (16-bit and float greyscale scaled, not clipped; transparency over white) and the
EXIF orientation applied, so crops are planned on the upright image.

A transform writes into a preallocated row of the batch and returns a reason code from
bad_images; a bad image leaves its row black.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from vise_jax.errors import InputError
from vise_jax.inputs.bad_images import NOT_AN_IMAGE, OK, TOO_LARGE, TRUNCATED, UNDECODABLE
from vise_jax.posts import images

CROP_ATTEMPTS = 10
# Per crop attempt: area, log aspect ratio, top, left; then one for the flip.
TRAIN_UNIFORMS = 4 * CROP_ATTEMPTS + 1
DRAFT_SCALES = (8, 4, 2, 1)
# A float box in source pixels: (left, top, right, bottom), as Image.resize(box=) takes it.
Box = tuple[float, float, float, float]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_uniforms(seed: int, epochs: np.ndarray, examples: np.ndarray,
                     count: int) -> np.ndarray:
    """float64 [B, count] in [0, 1), a pure function of (seed, epoch, example, column)."""
    with np.errstate(over='ignore'):
        key = _mix64(np.full(len(examples), int(seed) & 0xFFFFFFFFFFFFFFFF, np.uint64) + _GOLDEN)
        key = _mix64(key ^ (np.asarray(epochs).astype(np.uint64) + _GOLDEN))
        key = _mix64(key ^ (np.asarray(examples).astype(np.uint64) & _MASK64))
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(key[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def random_resized_crop_box(width: int, height: int, uniforms: Sequence[float],
                            scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, crop_width, crop_height).

    Up to CROP_ATTEMPTS draws of an area fraction and a log-uniform aspect ratio; the first that
    fits is placed uniformly. If none fits, the centre crop of the whole image clamped to the
    ratio range.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_left * (width - w + 1)), int(u_top * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, crop_fraction: float) -> Box:
    """Where torchvision's Resize(size / crop_fraction) + CenterCrop(size) samples the source."""
    shorter = math.floor(size / crop_fraction)
    if width <= height:
        new_w, new_h = shorter, int(shorter * height / width)
    else:
        new_w, new_h = int(shorter * width / height), shorter
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def draft_scale(box: Box, size: int) -> int:
    """The largest JPEG reduction (8, 4, 2, 1) that keeps >= size source pixels across the box."""
    across = min(box[2] - box[0], box[3] - box[1]) / size
    return next(s for s in DRAFT_SCALES if s <= across or s == 1)


# The one decode ingest and training share (modes, EXIF orientation, limits): posts.images.
to_rgb = images.to_rgb
PIL_DECODE_ERRORS = images.DECODE_ERRORS


def decode_crop(data: bytes, out: np.ndarray, plan: Callable[[int, int], tuple[Box, bool]],
                max_pixels: int) -> int:
    """Decodes `data`, crops plan(width, height)'s box, resizes into `out`; a reason code.

    The plan sees the upright size (EXIF orientation applied) and its box is in upright
    pixels. `out` (HxWx3 uint8) is written only on success, so a bad image leaves it as it
    was. Only PIL's calls are guarded: an error in the plan is a bug and propagates.
    """
    size = out.shape[0]
    try:
        opened = images.open_image(data, max_pixels)
    except images.TooLarge:
        return TOO_LARGE
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except PIL_DECODE_ERRORS as e:
        return failure_reason(e)
    with opened:
        box, flip = plan(opened.width, opened.height)
        try:
            rgb, scale = opened.decode(draft_scale(box, size))
            if scale > 1:
                box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
            resized = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if flip:  # PIL flips in a third of the time of a negative-stride numpy copy
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(resized)
        except PIL_DECODE_ERRORS as e:
            return failure_reason(e)
    out[...] = pixels
    return OK


def failure_reason(error: Exception) -> int:
    """PIL reports a short file as 'image file is truncated ...' or 'Truncated File Read'."""
    return TRUNCATED if 'truncated' in str(error).lower() else UNDECODABLE


def _check_size(size: int, max_pixels: int) -> None:
    if size < 1:
        raise InputError(f'input.image_size must be positive, got {size}')
    if max_pixels < 1:
        raise InputError(f'input.max_image_pixels must be positive, got {max_pixels}')


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Random-resized crop + horizontal flip, driven by TRAIN_UNIFORMS numbers per example."""

    size: int
    max_pixels: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    num_uniforms = TRAIN_UNIFORMS

    def __post_init__(self):
        _check_size(self.size, self.max_pixels)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise InputError(f'input.crop_scale must satisfy 0 < low <= high <= 1, '
                             f'got {self.scale}')
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise InputError(f'input.crop_ratio must satisfy 0 < low <= high, got {self.ratio}')

    def __call__(self, data: bytes, uniforms: Sequence[float], out: np.ndarray) -> int:
        def plan(width: int, height: int) -> tuple[Box, bool]:
            left, top, w, h = random_resized_crop_box(width, height, uniforms, self.scale,
                                                      self.ratio)
            return (left, top, left + w, top + h), uniforms[-1] < 0.5

        return decode_crop(data, out, plan, self.max_pixels)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Shorter side to size / crop_fraction, then the centre size x size; no randomness."""

    size: int
    max_pixels: int
    crop_fraction: float = 0.875
    num_uniforms = 0

    def __post_init__(self):
        _check_size(self.size, self.max_pixels)
        if not 0 < self.crop_fraction <= 1:
            raise InputError(f'input.eval_crop_fraction must be in (0, 1], '
                             f'got {self.crop_fraction}')

    def __call__(self, data: bytes, uniforms: Sequence[float], out: np.ndarray) -> int:
        del uniforms
        return decode_crop(
            data, out,
            lambda width, height: (center_crop_box(width, height, self.size,
                                                   self.crop_fraction), False),
            self.max_pixels)
