"""Input transforms, soft targets and the bad-image tally, without a Grain pipeline."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vise_jax.errors import InputError
from vise_jax.input import BAD_IMAGE_REASONS, BadImageTally, targets, transforms

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
    ('I;16', 'PNG', 100, None),
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
