"""Input transforms, soft targets and the bad-image tally, without a Grain pipeline."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vise_jax.errors import InputError
from vise_jax.inputs import BAD_IMAGE_REASONS, BadImageTally, targets, transforms
from vise_jax.posts import images

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def reason(code: int) -> str:
    return BAD_IMAGE_REASONS[code]


def test_random_resized_crop_follows_torchvision():
    # All draws 0.5 on a square: area 0.54, aspect 1 -> a 73 px square placed at int(0.5 * 28).
    assert transforms.random_resized_crop_box(100, 100, [0.5] * 41, SCALE, RATIO) == \
        (14, 14, 73, 73)
    # Nothing fits a 1000x10 strip: the fallback is the centre crop at the ratio limit.
    assert transforms.random_resized_crop_box(1000, 10, [0.5] * 41, SCALE, RATIO) == \
        (493, 0, 13, 10)
    assert transforms.random_resized_crop_box(10, 1000, [0.5] * 41, SCALE, RATIO) == \
        (0, 493, 10, 13)
    # A later attempt is taken when the first does not fit (full area at the widest ratio).
    first_fails = [0.99, 0.99, 0.0, 0.0] + [0.0, 0.5, 0.99, 0.99] + [0.5] * 33
    assert transforms.random_resized_crop_box(100, 100, first_fails, SCALE, RATIO) == \
        (72, 72, 28, 28)


def test_random_resized_crops_stay_inside_and_in_range():
    uniforms = transforms.example_uniforms(0, np.zeros(500), np.arange(500), 41)
    for numbers in uniforms.tolist():
        left, top, w, h = transforms.random_resized_crop_box(500, 375, numbers, SCALE, RATIO)
        assert left >= 0 and left + w <= 500 and top >= 0 and top + h <= 375
        assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
        assert 0.74 <= w / h <= 1.35


def test_center_crop_box_is_resize_256_then_centre_224():
    box = transforms.center_crop_box(500, 375, 224, 0.875)  # resized to 341x256
    np.testing.assert_allclose(box, (58 * 500 / 341, 16 * 375 / 256,
                                     282 * 500 / 341, 240 * 375 / 256))
    assert transforms.center_crop_box(256, 256, 224, 0.875) == (16, 16, 240, 240)


def test_draft_scale_keeps_enough_pixels():
    assert transforms.draft_scale((0, 0, 100, 100), 16) == 4
    assert transforms.draft_scale((0, 0, 1000, 900), 100) == 8
    assert transforms.draft_scale((10, 10, 40, 40), 16) == 1
    assert transforms.draft_scale((0, 0, 20, 20), 16) == 1


def test_eval_transform_matches_resize_then_centre_crop():
    image = gradient(160, 120)
    out = np.zeros((64, 64, 3), np.uint8)
    assert transforms.EvalTransform(64, 10 ** 8)(encode(image, 'PNG'), [], out) == 0
    # torchvision: Resize(73) -> 97x73, CenterCrop(64) at (16, 4).
    reference = np.asarray(image.resize((97, 73), Image.Resampling.BILINEAR)
                           .crop((16, 4, 80, 68)), np.float32)
    assert np.abs(out - reference).mean() < 1.5


def test_train_transform_crops_resizes_and_flips():
    image = gradient(120, 90)
    numbers = [0.3, 0.6, 0.2, 0.7] * 10 + [0.2]  # flip (last number < 0.5)
    out = np.zeros((32, 32, 3), np.uint8)
    assert transforms.TrainTransform(32, 10 ** 8)(encode(image, 'PNG'), numbers, out) == 0
    left, top, w, h = transforms.random_resized_crop_box(120, 90, numbers, SCALE, RATIO)
    reference = np.asarray(image.crop((left, top, left + w, top + h))
                           .resize((32, 32), Image.Resampling.BILINEAR), np.float32)[:, ::-1]
    assert np.abs(out - reference).mean() < 1.5
    unflipped = np.zeros_like(out)
    transforms.TrainTransform(32, 10 ** 8)(encode(image, 'PNG'), numbers[:-1] + [0.9], unflipped)
    np.testing.assert_array_equal(unflipped, out[:, ::-1])


def test_draft_decoding_of_a_large_jpeg_matches_the_full_decode():
    image = gradient(800, 600)
    jpeg = encode(image, 'JPEG', quality=95)
    out = np.zeros((64, 64, 3), np.uint8)
    assert transforms.EvalTransform(64, 10 ** 8)(jpeg, [], out) == 0  # decoded at 1/8
    full = np.zeros_like(out)
    transforms.EvalTransform(64, 10 ** 8)(encode(image, 'PNG'), [], full)
    assert np.abs(out.astype(np.float32) - full).mean() < 3


@pytest.mark.parametrize('mode, fmt, colour, expected', [
    ('L', 'JPEG', 120, (120, 120, 120)),
    ('CMYK', 'JPEG', (0, 255, 255, 0), (255, 0, 0)),
    ('P', 'PNG', None, (200, 40, 10)),
    ('RGBA', 'PNG', (200, 40, 10, 255), (200, 40, 10)),
    ('RGBA', 'PNG', (200, 40, 10, 0), (255, 255, 255)),  # transparent: over white
    ('LA', 'PNG', (50, 255), (50, 50, 50)),
    ('I;16', 'PNG', 100, (0, 0, 0)),  # 100 of 65535: near black, as it looks
])
def test_other_modes_are_converted_and_kept(mode, fmt, colour, expected):
    if mode == 'P':
        image = Image.new('RGB', (40, 30), (200, 40, 10)).convert(
            'P', palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (40, 30), colour)
    out = np.zeros((16, 16, 3), np.uint8)
    assert reason(transforms.EvalTransform(16, 10 ** 8)(encode(image, fmt), [], out)) == 'ok'
    if expected is not None:
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), expected, atol=3)


def gradient_f(low: float, high: float) -> Image.Image:
    return Image.fromarray(np.linspace(low, high, 40 * 30, dtype=np.float32).reshape(30, 40))


# Every mode to 8-bit RGB: (image, format to store it in, expected mean colour).
HIGH_DEPTH_AND_OTHER_MODES = {
    # 16-bit greyscale is scaled from 0-65535 (PIL's convert('RGB') clips: solid white).
    'I;16_png': (lambda: Image.fromarray(np.full((30, 40), 40000, np.uint16)), 'PNG', 156),
    'I;16_png_white': (lambda: Image.fromarray(np.full((30, 40), 65535, np.uint16)), 'PNG', 255),
    'I;16B_tiff': (lambda: Image.new('I;16B', (40, 30), 40000), 'TIFF', 156),
    'I_tiff': (lambda: Image.new('I', (40, 30), 40000), 'TIFF', 156),
    'I_tiff_outside_16_bit': (lambda: Image.fromarray(
        np.linspace(-10 ** 6, 10 ** 6, 1200).astype(np.int32).reshape(30, 40)), 'TIFF', 127.5),
    'F_tiff_unit_range': (lambda: Image.new('F', (40, 30), 0.5), 'TIFF', 128),
    'F_tiff_byte_range': (lambda: Image.new('F', (40, 30), 100.0), 'TIFF', 100),
    'F_tiff_other_range': (lambda: gradient_f(-500.0, 1500.0), 'TIFF', 127.5),
    '1_png_white': (lambda: Image.new('1', (40, 30), 1), 'PNG', 255),
    '1_png_black': (lambda: Image.new('1', (40, 30), 0), 'PNG', 0),
    'P_png_transparent': (lambda: _palette_image(), 'PNG', 255),
    'L_png_transparent_colour': (lambda: Image.new('L', (40, 30), 7), 'PNG', 255),
    'LA_png_half': (lambda: Image.new('LA', (40, 30), (0, 128)), 'PNG', 127),
    'LAB_tiff_grey': (lambda: Image.new('LAB', (40, 30), (128, 128, 128)), 'TIFF', 119),
    'YCbCr_jpeg': (lambda: Image.new('YCbCr', (40, 30), (128, 128, 128)), 'JPEG', 128),
}


def _palette_image() -> Image.Image:
    image = Image.new('P', (40, 30), 0)
    image.putpalette([10, 20, 30] * 256)
    return image


@pytest.mark.parametrize('case', sorted(HIGH_DEPTH_AND_OTHER_MODES))
def test_every_mode_decodes_to_8_bit_rgb_not_clipped(case):
    make, fmt, expected = HIGH_DEPTH_AND_OTHER_MODES[case]
    image = make()
    options = {'transparency': image.getpixel((0, 0))} if 'transparen' in case else {}
    data = encode(image, fmt, **options)
    out = np.zeros((16, 16, 3), np.uint8)
    assert reason(transforms.EvalTransform(16, 10 ** 8)(data, [], out)) == 'ok'
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [expected] * 3, atol=2)
    # The decode ingest validates with is this one.
    with images.open_image(data, 10 ** 8) as opened:
        rgb, _ = opened.decode()
        assert rgb.mode == 'RGB' and rgb.size == (40, 30)
        np.testing.assert_allclose(np.asarray(rgb, np.float64).mean(), expected, atol=2)


QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))  # TL, TR, BL, BR


def quadrant_image(width: int = 48, height: int = 32) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    for (top, left), colour in zip([(0, 0), (0, w), (h, 0), (h, w)], QUADRANTS, strict=True):
        pixels[top:top + h, left:left + w] = colour
    return Image.fromarray(pixels)


# EXIF orientation -> how a camera stores the upright picture (the inverse of the display fix).
STORED_AS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    stored = upright if STORED_AS[orientation] is None else upright.transpose(
        STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, 'JPEG', quality=95, exif=exif.tobytes())


def assert_quadrants(pixels: np.ndarray) -> None:
    h, w = pixels.shape[0] // 4, pixels.shape[1] // 4
    for (row, col), colour in zip([(h, w), (h, 3 * w), (3 * h, w), (3 * h, 3 * w)], QUADRANTS,
                                  strict=True):
        np.testing.assert_allclose(pixels[row, col], colour, atol=60)


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_is_applied_before_cropping(orientation):
    data = exif_jpeg(quadrant_image(48, 32), orientation)
    with images.open_image(data, 10 ** 8) as opened:
        assert (opened.orientation, opened.width, opened.height) == (orientation, 48, 32)
        rgb, _ = opened.decode()
        assert rgb.size == (48, 32)
        assert_quadrants(np.asarray(rgb))
    # Eval crop of the upright 48x32: shorter side to 16 (24x16), centre 16x16 -> the middle
    # two thirds of the width, so the quadrants stay where they are.
    out = np.zeros((16, 16, 3), np.uint8)
    assert transforms.EvalTransform(16, 10 ** 8, crop_fraction=1.0)(data, [], out) == 0
    assert_quadrants(out)
    # A JPEG decoded at a DCT reduction is rotated the same way.
    big = exif_jpeg(quadrant_image(480, 320), orientation)
    out = np.zeros((16, 16, 3), np.uint8)
    assert transforms.EvalTransform(16, 10 ** 8, crop_fraction=1.0)(big, [], out) == 0
    assert_quadrants(out)


def test_broken_exif_reads_as_upright():
    data = bytearray(exif_jpeg(quadrant_image(), 6))
    start = data.find(b'Exif\x00\x00') + 6
    data[start:start + 4] = b'ZZZZ'  # neither II nor MM: not a TIFF header
    with images.open_image(bytes(data), 10 ** 8) as opened:
        assert opened.orientation == 1 and (opened.width, opened.height) == (32, 48)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data)))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming a size, with almost no pixel data: a decompression bomb."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr)
            + png_chunk(b'IDAT', zlib.compress(b'')) + png_chunk(b'IEND', b''))


def test_bad_images_get_their_reason_and_leave_the_row_black():
    jpeg = encode(gradient(64, 48), 'JPEG')
    png = bytearray(encode(gradient(64, 48), 'PNG'))
    start = png.find(b'IDAT') + 40
    png[start:start + 20] = bytes(20)
    cases = {
        'truncated': jpeg[:len(jpeg) // 2],
        'not_an_image': b'<html>not found</html>',
        'undecodable': bytes(png),
        'too_large': png_header(30_000, 30_000),  # PIL's DecompressionBombError
    }
    transform = transforms.TrainTransform(16, 10 ** 8)
    for expected, data in cases.items():
        out = np.zeros((16, 16, 3), np.uint8)
        assert reason(transform(data, [0.5] * 41, out)) == expected
        assert not out.any()
    # The configured limit, far below PIL's.
    out = np.zeros((16, 16, 3), np.uint8)
    assert reason(transforms.TrainTransform(16, 64 * 47)(jpeg, [0.5] * 41, out)) == 'too_large'
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_example_uniforms_are_a_function_of_seed_epoch_and_example():
    examples = np.arange(2000)
    base = transforms.example_uniforms(3, np.zeros(2000), examples, 41)
    assert base.shape == (2000, 41) and base.min() >= 0 and base.max() < 1
    assert abs(base.mean() - 0.5) < 0.01 and abs(np.corrcoef(base[:, 0], base[:, 1])[0, 1]) < 0.1
    np.testing.assert_array_equal(
        transforms.example_uniforms(3, np.zeros(3), np.array([5, 9, 5]), 41),
        base[[5, 9, 5]])
    for other in (transforms.example_uniforms(4, np.zeros(2000), examples, 41),
                  transforms.example_uniforms(3, np.ones(2000), examples, 41)):
        assert not np.isclose(other, base).any(axis=1).all()


def test_comment_targets_rank_by_frequency_and_keep_the_top_m():
    # Post 0: clusters 2 x3, 1 x2, 5 x1; post 1: none; post 2: a tie between 7 and 3.
    offsets = np.array([0, 6, 6, 8])
    cluster_ids = np.array([2, 2, 5, 1, 1, 2, 7, 3], np.int32)
    ids, probs = targets.comment_targets(offsets, cluster_ids, 8, np.array([0, 1, 2, -1, 0]), 2)
    np.testing.assert_array_equal(ids, [[2, 1], [0, 0], [3, 7], [0, 0], [2, 1]])
    np.testing.assert_allclose(probs, [[0.6, 0.4], [0, 0], [0.5, 0.5], [0, 0], [0.6, 0.4]])
    assert ids.dtype == np.int32 and probs.dtype == np.float32
    ids, probs = targets.comment_targets(offsets, cluster_ids, 8, np.array([0]), 4)
    np.testing.assert_array_equal(ids, [[2, 1, 5, 0]])
    np.testing.assert_allclose(probs, [[0.5, 1 / 3, 1 / 6, 0]], rtol=1e-6)


def test_reaction_targets_are_one_hot_or_masked():
    ids, probs = targets.reaction_targets(np.array([2, -1, 0]), np.array([0, 1, 2, -1]))
    np.testing.assert_array_equal(ids, [[2], [0], [0], [0]])
    np.testing.assert_array_equal(probs, [[1], [0], [1], [0]])


def test_bad_image_tally_counts_and_fails_past_the_limit():
    tally = BadImageTally(max_fraction=0.25, min_seen=8)
    tally.update(np.array([0, 1, 0, 0]), np.array([1, 0, 1, 1]), np.array([10, 11, 12, 13]))
    # Padding (weight 0, code 0) is not an example; 2 bad of 4 seen, but fewer than min_seen.
    tally.update(np.array([5, 4, 0, 0]), np.array([0, 0, 0, 0]), np.array([20, 21, -1, -1]))
    assert tally.seen == 6 and tally.bad == 3
    assert tally.counts() == {'truncated': 1, 'not_an_image': 0, 'undecodable': 0,
                              'missing_file': 1, 'too_large': 1}
    tally.update(np.zeros(6, np.int32), np.ones(6))  # 3 of 12: exactly at the limit
    with pytest.raises(InputError, match=r'4 of 13 images seen are unusable \(30\.8%\).*'
                                         r'truncated: 2.*too_large at index 20'):
        tally.update(np.array([1]), np.array([0.0]), np.array([30]))
    with pytest.raises(InputError, match='max_bad_image_fraction'):
        BadImageTally(max_fraction=1.5)


def test_transform_settings_are_checked():
    with pytest.raises(InputError, match='image_size'):
        transforms.EvalTransform(0, 100)
    with pytest.raises(InputError, match='crop_scale'):
        transforms.TrainTransform(16, 100, scale=(0.5, 0.1))
    with pytest.raises(InputError, match='eval_crop_fraction'):
        transforms.EvalTransform(16, 100, crop_fraction=1.5)
