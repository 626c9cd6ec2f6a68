"""Ingest: every bad-input case, exact accounting, the ArrayRecord round trip, resumption."""

import base64
import io
import json
import os
import struct
import zlib

import grain
import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image

from vise_jax import artifacts, posts
from vise_jax.errors import InputError
from vise_jax.inputs import sources
from vise_jax.posts import claims as claims_lib
from vise_jax.posts import images, ingestion, validate


def run_ingest(manifests, out, **options):
    options = posts.IngestOptions(reaction_types=posts.REACTION_TYPES, **options)
    stage = artifacts.StageDir(out, 'ingest', {'test': True})
    return posts.ingest(manifests if isinstance(manifests, list) else [manifests], stage, options)


def read_rejected(out):
    with open(out / 'rejected.jsonl', encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def test_round_trip_preserves_every_field(manifest_maker, tmp_path):
    m = manifest_maker
    rows = [
        m.post('a', seed=1, comments=['héllo 👋', 'ありがとう', ''], reactions={'love': 3}),
        m.post('b', seed=2, comments=[], reactions={}),
        {'id': 7, 'image_b64': base64.b64encode(jpeg_bytes(3)).decode(), 'comments': ['x']},
        m.post('c', seed=4, reactions={'like': 2.0, 'care': None}),  # 2.0 is a whole number
    ]
    manifest = m.write(rows)
    report = run_ingest(manifest, tmp_path / 'store', rows_per_shard=2)

    assert report['input_rows'] == 4 and report['accepted'] == 4 and report['rejected'] == 0
    store = posts.PostsStore(tmp_path / 'store')
    assert len(store) == 4
    assert [store[i].id for i in range(4)] == ['a', 'b', '7', 'c']
    assert store[0].comments == ('héllo 👋', 'ありがとう', '')
    assert store[0].reactions == {'like': 0, 'love': 3, 'haha': 0, 'wow': 0, 'sad': 0,
                                  'angry': 0, 'care': 0}
    assert store[1].comments == () and sum(store[1].reactions.values()) == 0
    assert store[3].reactions['like'] == 2 and store[3].reactions['care'] == 0
    assert store[0].image == (m.root / 'images' / 'a.jpg').read_bytes()
    assert store[2].image == jpeg_bytes(3)
    assert store[0].image_info == posts.ImageInfo('JPEG', 24, 24, 'RGB')
    assert store[0].source == f'{manifest}:1'
    # Metadata reads never touch image bytes; sequential and random access agree.
    assert [p.id for p in store.iter_meta()] == ['a', 'b', '7', 'c']
    assert store.meta(3).image is None and store.meta(3).comments == store[3].comments
    # Two shards of two posts each, opened by Grain as a plain ArrayRecord source.
    assert len(store.index['shards']) == 2
    # Per-chunk bookkeeping is merged into report.json / rejected.jsonl and removed.
    assert not list((tmp_path / 'store').glob('chunk-*')) + \
        list((tmp_path / 'store').glob('rejected-*'))
    dataset = grain.MapDataset.source(store.image_source)
    assert dataset[2] == jpeg_bytes(3)
    with pytest.raises(IndexError, match='out of range'):
        store[4]


def test_blank_lines_and_unknown_fields_are_counted_not_lost(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([m.post('a', url='http://x'), '', '   ', m.post('b', url='y', lang='en')])
    report = run_ingest(manifest, tmp_path / 'store')
    assert report['accepted'] == 2 and report['blank_lines'] == 2
    assert report['ignored_fields'] == {'lang': 1, 'url': 2}


# (raw row or a function of the ManifestMaker, expected reason, expected field, message part)
BAD_ROWS = {
    'malformed_json': ('{"id": "x", "image": ', 'malformed_json', '',
                       'malformed JSON: Expecting value (column 22)'),
    'malformed_json_mid_line': ('{"id": "x" "image": "images/good0.jpg"}', 'malformed_json', '',
                                "Expecting ',' delimiter (column 12)"),
    # Python refuses int() of over 4,300 digits; the row is rejected with its field named.
    'count_of_5000_digits': ('{"id": "x", "image": "images/good0.jpg", "reactions": {"like": '
                             + '9' * 5000 + '}}', 'reaction_too_large', 'reactions.like',
                             '(5,000 digits) is more than the maximum 1,000,000,000,000'),
    'nested_100000_deep': ('{"id": "x", "image": "images/good0.jpg", "extra": '
                           + '[' * 100_000 + ']' * 100_000 + '}', 'malformed_json', '',
                           'nested too deeply'),
    'count_10_to_400': ('{"id": "x", "image": "images/good0.jpg", "reactions": {"love": 1'
                        + '0' * 400 + '}}', 'reaction_too_large', 'reactions.love',
                        'more than the maximum'),
    'count_1e30': (lambda m: m.post('x', reactions={'like': 1e30}), 'reaction_too_large',
                   'reactions.like', 'count 1e+30 is more than the maximum 1,000,000,000,000'),
    'count_1e400': ('{"id": "x", "image": "images/good0.jpg", "reactions": {"wow": 1e400}}',
                    'reaction_too_large', 'reactions.wow', 'more than the maximum'),
    'count_just_over_max': (lambda m: m.post('x', reactions={'sad': 10 ** 12 + 1}),
                            'reaction_too_large', 'reactions.sad', '1000000000001'),
    'bom_not_at_file_start': ('\ufeff{"id": "x", "image": "images/good0.jpg"}', 'malformed_json',
                              '', 'BOM'),
    'image_dev_zero': ({'id': 'x', 'image': '/dev/zero'}, 'image_not_a_file', 'image',
                       'not a regular file (a device, FIFO or folder): /dev/zero'),
    'image_folder': ({'id': 'x', 'image': 'images'}, 'image_not_a_file', 'image',
                     'not a regular file'),
    'image_fifo': (lambda m: {'id': 'x', 'image': _fifo(m)}, 'image_not_a_file', 'image',
                   'not a regular file'),
    'image_nul_in_path': ({'id': 'x', 'image': 'images/a\u0000.jpg'}, 'invalid_image_field',
                          'image', 'not a valid path'),
    'image_bomb_header': (lambda m: {'id': 'x', 'image': _write(m, 'x.png',
                                                               png_header(30_000, 30_000))},
                          'image_too_large', 'image', 'input.max_image_pixels'),
    'image_over_max_pixels': (lambda m: {'id': 'x', 'image': _write(m, 'x.png',
                                                                   png_header(9_000, 9_000))},
                              'image_too_large', 'image',
                              '9000 x 9000 = 81,000,000 pixels, more than the limit of 64,000,000'),
    'truncated_jpeg_scan': (lambda m: {'id': 'x', 'image': _write(
                                m, 'x.jpg', jpeg_bytes(9, size=256)[:-3000])},
                            'undecodable_image', 'image', 'x.jpg: image file is truncated'),
    'not_an_object': ('[1, 2]', 'not_an_object', '', 'got list'),
    'invalid_utf8': (b'{"id": "\xff\xfe"}', 'invalid_utf8', '', 'not valid UTF-8'),
    'missing_id': (lambda m: {'image': m.image('x.jpg')}, 'missing_id', 'id', 'missing'),
    'null_id': (lambda m: {'id': None, 'image': m.image('x.jpg')}, 'missing_id', 'id', 'missing'),
    'bool_id': (lambda m: {'id': True, 'image': m.image('x.jpg')}, 'invalid_id', 'id', 'boolean'),
    'empty_id': (lambda m: {'id': ' ', 'image': m.image('x.jpg')}, 'invalid_id', 'id', 'empty'),
    'duplicate_id': (lambda m: m.post('good0'), 'duplicate_id', 'id', 'first seen at'),
    'missing_image': ({'id': 'x'}, 'missing_image', 'image', 'missing'),
    'both_image_fields': (lambda m: m.post('x', image_b64='AAAA'), 'invalid_image_field',
                          'image', 'not both'),
    'image_not_string': ({'id': 'x', 'image': 5}, 'invalid_image_field', 'image', 'path string'),
    'image_not_found': ({'id': 'x', 'image': 'images/nope.jpg'}, 'image_not_found', 'image',
                        'file not found'),
    'not_an_image': (lambda m: {'id': 'x', 'image': _write(m, 'x.jpg', b'hello')},
                     'undecodable_image', 'image', 'cannot decode'),
    'truncated_jpeg': (lambda m: {'id': 'x', 'image': _write(m, 'x.jpg', jpeg_bytes(9)[:300])},
                       'undecodable_image', 'image', 'cannot decode'),
    'bad_base64': ({'id': 'x', 'image_b64': 'not*base64'}, 'invalid_image_field', 'image_b64',
                   'base64'),
    'base64_not_image': ({'id': 'x', 'image_b64': base64.b64encode(b'abc').decode()},
                         'undecodable_image', 'image_b64',
                         'cannot decode the inline image (3 bytes): cannot identify'),
    'negative_reaction': (lambda m: m.post('x', reactions={'like': -3}), 'negative_reaction',
                          'reactions.like', 'negative'),
    'string_reaction': (lambda m: m.post('x', reactions={'wow': '12'}), 'non_numeric_reaction',
                        'reactions.wow', 'not a number'),
    'fractional_reaction': (lambda m: m.post('x', reactions={'sad': 2.5}),
                            'non_numeric_reaction', 'reactions.sad', 'whole number'),
    'bool_reaction': (lambda m: m.post('x', reactions={'sad': True}), 'non_numeric_reaction',
                      'reactions.sad', 'not a number'),
    'nan_reaction': ('{"id": "x", "image": "images/good0.jpg", "reactions": {"like": NaN}}',
                     'non_numeric_reaction', 'reactions.like', 'whole number'),
    'unknown_reaction': (lambda m: m.post('x', reactions={'yay': 1}), 'unknown_reaction_type',
                         'reactions.yay', 'unknown reaction type'),
    'reactions_not_object': (lambda m: m.post('x', reactions=[1, 2]), 'invalid_reactions',
                             'reactions', 'object of counts'),
    'comments_not_list': (lambda m: m.post('x', comments='hi'), 'invalid_comments', 'comments',
                          'list of strings'),
    'non_string_comment': (lambda m: m.post('x', comments=['ok', 3]), 'non_string_comment',
                           'comments[1]', 'must be a string'),
    'lone_surrogate_comment': ('{"id": "x", "image": "images/good0.jpg", "comments": ["\\ud800"]}',
                               'non_string_comment', 'comments[0]', 'UTF-8'),
}


def _write(m, name, data):
    (m.root / 'images' / name).write_bytes(data)
    return f'images/{name}'


def _fifo(m):
    os.mkfifo(m.root / 'images' / 'fifo.jpg')  # opening it to read would wait for a writer
    return 'images/fifo.jpg'


def png_header(width, height):
    """A PNG claiming a size, with almost no pixel data."""
    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data)))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b''))
            + chunk(b'IEND', b''))


def _bad_manifest(m, case):
    """Two good rows, the bad row on line 3, one more good row: 4 input rows."""
    bad, _, _, _ = BAD_ROWS[case]
    good = [m.post(f'good{i}', seed=i) for i in range(3)]
    bad = bad(m) if callable(bad) else bad
    return m.write([good[0], good[1], bad, good[2]])


@pytest.mark.parametrize('case', sorted(BAD_ROWS))
def test_bad_row_is_skipped_and_reported(manifest_maker, tmp_path, case):
    _, reason, field, message = BAD_ROWS[case]
    manifest = _bad_manifest(manifest_maker, case)
    report = run_ingest(manifest, tmp_path / 'store')

    assert report['input_rows'] == 4
    assert report['accepted'] == 3 and report['rejected'] == 1
    assert report['rejected_rows_by_reason'] == {reason: 1}
    [rejected] = read_rejected(tmp_path / 'store')
    assert rejected['location'] == f'{manifest}:3'
    [error] = rejected['errors']
    assert (error['reason'], error['field']) == (reason, field)
    assert message in error['message']
    store = posts.PostsStore(tmp_path / 'store')
    assert [p.id for p in store.iter_meta()] == ['good0', 'good1', 'good2']


@pytest.mark.parametrize('case', ['malformed_json', 'duplicate_id', 'negative_reaction',
                                  'truncated_jpeg', 'non_string_comment'])
def test_fail_policy_names_file_line_and_field(manifest_maker, tmp_path, case):
    _, _, field, message = BAD_ROWS[case]
    manifest = _bad_manifest(manifest_maker, case)
    with pytest.raises(InputError) as raised:
        run_ingest(manifest, tmp_path / 'store', on_error='fail')
    text = str(raised.value)
    assert text.startswith(f'{manifest}:3: ')
    assert message in text and (not field or f"field '{field}'" in text)
    # Nothing that looks finished is left behind.
    assert not (tmp_path / 'store' / artifacts.STAGE_RECORD).exists()
    with pytest.raises(InputError, match='not a finished posts store'):
        posts.PostsStore(tmp_path / 'store')


def test_row_with_several_problems_reports_all(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([m.post('a'), {'id': 'a', 'comments': [1], 'reactions': {'like': -1}}])
    report = run_ingest(manifest, tmp_path / 'store')
    [rejected] = read_rejected(tmp_path / 'store')
    assert {e['reason'] for e in rejected['errors']} == {
        'duplicate_id', 'non_string_comment', 'negative_reaction', 'missing_image'}
    assert report['rejected'] == 1 and sum(report['rejected_rows_by_reason'].values()) == 4


def test_too_many_rejections_fail_after_writing_the_report(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([m.post('a'), {'id': 'b'}, {'id': 'c'}])
    with pytest.raises(InputError, match=r'rejected 2 of 3 rows .*report.json'):
        run_ingest(manifest, tmp_path / 'store', max_rejected_fraction=0.5)
    assert len(read_rejected(tmp_path / 'store')) == 2
    assert not (tmp_path / 'store' / artifacts.STAGE_RECORD).exists()


def test_several_manifests_and_image_root(manifest_maker, tmp_path):
    m = manifest_maker
    first = m.write([m.post('a')], name='part-0.jsonl')
    second = m.write([m.post('b'), m.post('a')], name='part-1.jsonl')
    report = run_ingest([first, second], tmp_path / 'store', image_root=str(m.root))
    assert (report['input_rows'], report['accepted']) == (3, 2)
    [rejected] = read_rejected(tmp_path / 'store')
    assert rejected['location'] == f'{second}:2'
    assert f'first seen at {first}:1' in rejected['errors'][0]['message']


def test_interrupted_ingest_resumes_without_redoing_committed_chunks(
        manifest_maker, tmp_path, monkeypatch):
    m = manifest_maker
    rows = [m.post(f'p{i}', seed=i) for i in range(10)]
    rows[8] = m.post('p1', seed=8)  # a duplicate across the interruption boundary
    manifest = m.write(rows)
    reference = run_ingest(manifest, tmp_path / 'reference', rows_per_shard=3)

    real_commit, commits = ingestion._commit_chunk, []

    def commit_then_die(out, shard, result, reaction_types):
        if len(commits) == 2:
            raise KeyboardInterrupt('killed')
        commits.append(shard)
        real_commit(out, shard, result, reaction_types)

    monkeypatch.setattr(ingestion, '_commit_chunk', commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(manifest, tmp_path / 'store', rows_per_shard=3)
    first_shard = tmp_path / 'store' / 'meta-00000.array_record'
    mtime = first_shard.stat().st_mtime_ns

    monkeypatch.setattr(ingestion, '_commit_chunk', real_commit)
    resumed = run_ingest(manifest, tmp_path / 'store', rows_per_shard=3)
    assert first_shard.stat().st_mtime_ns == mtime  # committed work was kept, not redone
    assert resumed['rejected_rows_by_reason'] == {'duplicate_id': 1}
    assert {k: resumed[k] for k in ('input_rows', 'accepted', 'rejected')} == \
        {k: reference[k] for k in ('input_rows', 'accepted', 'rejected')}
    ids = [p.id for p in posts.PostsStore(tmp_path / 'store').iter_meta()]
    assert ids == [p.id for p in posts.PostsStore(tmp_path / 'reference').iter_meta()]
    assert read_rejected(tmp_path / 'store') == read_rejected(tmp_path / 'reference')


def test_missing_manifest_and_bad_options_are_clear(tmp_path):
    with pytest.raises(InputError, match='posts manifest not found'):
        run_ingest(tmp_path / 'nope.jsonl', tmp_path / 'store')
    with pytest.raises(InputError, match="on_error must be 'fail' or 'skip'"):
        posts.IngestOptions(reaction_types=posts.REACTION_TYPES, on_error='ignore')


# --- rows that used to stop the whole ingest, limits, encodings (issue 14) -----------------


def test_bom_at_file_start_is_accepted_and_counts_are_exact(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([m.post('a'), m.post('b')])
    manifest.write_bytes(validate.UTF8_BOM + manifest.read_bytes())
    blank = m.write([b'\xef\xbb\xbf', m.post('c')], name='bom_only.jsonl')  # a BOM, then nothing
    report = run_ingest([manifest, blank], tmp_path / 'store')
    assert (report['input_rows'], report['accepted'], report['rejected'],
            report['blank_lines']) == (3, 3, 0, 1)
    store = posts.PostsStore(tmp_path / 'store')
    assert [p.id for p in store.iter_meta()] == ['a', 'b', 'c']
    assert store.meta(0).source == f'{manifest}:1'


def test_huge_numbers_outside_counts_do_not_stop_the_ingest(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([
        m.post('a'),
        '{"id": 1' + '0' * 5000 + ', "image": "images/a.jpg"}',   # an id: its digits
        '{"id": "c", "image": "images/a.jpg", "extra": ' + '7' * 5000 + '}',  # ignored
        m.post('d', reactions={'like': 10 ** 12}),                 # the maximum itself
    ])
    report = run_ingest(manifest, tmp_path / 'store')
    assert (report['input_rows'], report['accepted'], report['rejected']) == (4, 4, 0)
    assert report['ignored_fields'] == {'extra': 1}
    store = posts.PostsStore(tmp_path / 'store')
    assert store.meta(1).id == '1' + '0' * 5000
    assert store.meta(3).reactions['like'] == validate.MAX_REACTION_COUNT == 10 ** 12


def test_a_line_over_max_row_bytes_is_rejected_unread(manifest_maker, tmp_path):
    m = manifest_maker
    long_row = m.post('long', comments=['x' * 5000])
    manifest = m.write([m.post('a'), long_row, m.post('b'), '{"id": "' + 'y' * 3000, m.post('c')])
    report = run_ingest(manifest, tmp_path / 'store', max_row_bytes=1000)
    assert (report['input_rows'], report['accepted'], report['rejected']) == (5, 3, 2)
    assert report['rejected_rows_by_reason'] == {'row_too_long': 2}
    assert [r['location'] for r in read_rejected(tmp_path / 'store')] == \
        [f'{manifest}:2', f'{manifest}:4']
    store = posts.PostsStore(tmp_path / 'store')
    assert [(p.id, p.source) for p in store.iter_meta()] == [
        ('a', f'{manifest}:1'), ('b', f'{manifest}:3'), ('c', f'{manifest}:5')]


def encode_image(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_image_byte_and_pixel_limits(manifest_maker, tmp_path):
    m = manifest_maker
    big = jpeg_bytes(5, size=200)  # about 30 kB, 40,000 pixels
    manifest = m.write([
        m.post('a'),
        {'id': 'file_bytes', 'image': _write(m, 'big.jpg', big)},
        {'id': 'inline_bytes', 'image_b64': base64.b64encode(big).decode()},
        {'id': 'pixels', 'image': _write(m, 'wide.png', encode_image(
            Image.new('L', (2000, 20)), 'PNG'))},  # small file, 40,000 pixels
        m.post('b'),
    ])
    report = run_ingest(manifest, tmp_path / 'store', max_image_bytes=len(big) - 1,
                        max_image_pixels=30_000)
    assert (report['input_rows'], report['accepted'], report['rejected']) == (5, 2, 3)
    assert report['rejected_rows_by_reason'] == {'image_too_large': 3}
    messages = {r['id']: r['errors'][0] for r in read_rejected(tmp_path / 'store')}
    assert messages['file_bytes']['field'] == 'image'
    assert f'big.jpg: {len(big):,} bytes, more than the limit of {len(big) - 1:,}' in \
        messages['file_bytes']['message']
    assert 'ingest.max_image_bytes' in messages['file_bytes']['message']
    assert messages['inline_bytes']['field'] == 'image_b64'
    assert 'ingest.max_image_bytes' in messages['inline_bytes']['message']
    assert '2000 x 20 = 40,000 pixels' in messages['pixels']['message']
    assert [p.id for p in posts.PostsStore(tmp_path / 'store').iter_meta()] == ['a', 'b']


def test_confine_images_rejects_paths_resolving_outside_the_root(manifest_maker, tmp_path):
    m = manifest_maker
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    (outside / 'o.jpg').write_bytes(jpeg_bytes(1))
    (m.root / 'images' / 'link_out.jpg').symlink_to(outside / 'o.jpg')
    m.image('target.jpg', seed=2)
    (m.root / 'images' / 'link_in.jpg').symlink_to(m.root / 'images' / 'target.jpg')
    rows = [m.post('a'),
            {'id': 'dotdot', 'image': '../elsewhere/o.jpg'},
            {'id': 'absolute', 'image': str(outside / 'o.jpg')},
            {'id': 'symlink_out', 'image': 'images/link_out.jpg'},
            {'id': 'symlink_in', 'image': 'images/link_in.jpg'},
            {'id': 'absolute_in', 'image': str(m.root / 'images' / 'a.jpg')}]
    manifest = m.write(rows)
    # By default paths may point anywhere (absolute paths are used as they are).
    report = run_ingest(manifest, tmp_path / 'open')
    assert (report['accepted'], report['rejected']) == (6, 0)
    report = run_ingest(manifest, tmp_path / 'confined', confine_images=True)
    assert (report['input_rows'], report['accepted'], report['rejected']) == (6, 3, 3)
    rejected = read_rejected(tmp_path / 'confined')
    assert [r['id'] for r in rejected] == ['dotdot', 'absolute', 'symlink_out']
    for r in rejected:
        [error] = r['errors']
        assert (error['field'], error['reason']) == ('image', 'image_outside_root')
        assert f"resolves to {outside / 'o.jpg'}" in error['message']
    assert [p.id for p in posts.PostsStore(tmp_path / 'confined').iter_meta()] == \
        ['a', 'symlink_in', 'absolute_in']
    # With posts.image_root, that folder is the root: the symlink to elsewhere/ is inside it.
    rooted = m.write([{'id': 'in', 'image': 'data/images/link_out.jpg'},
                      {'id': 'also_in', 'image': 'elsewhere/o.jpg'},
                      {'id': 'out', 'image': '/dev/zero'}], name='rooted.jsonl')
    report = run_ingest(rooted, tmp_path / 'rooted', confine_images=True,
                        image_root=str(tmp_path))
    assert (report['accepted'], report['rejected_rows_by_reason']) == \
        (2, {'image_outside_root': 1})


def test_16_bit_and_exif_rotated_images_are_accepted_with_their_upright_size(
        manifest_maker, tmp_path):
    m = manifest_maker
    sixteen = encode_image(Image.fromarray(np.full((30, 40), 40000, np.uint16)), 'PNG')
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    rotated = encode_image(Image.new('RGB', (30, 50)), 'JPEG', exif=exif.tobytes())
    manifest = m.write([{'id': 'deep', 'image': _write(m, 'deep.png', sixteen)},
                        {'id': 'turned', 'image': _write(m, 'turned.jpg', rotated)}])
    run_ingest(manifest, tmp_path / 'store')
    store = posts.PostsStore(tmp_path / 'store')
    assert store[0].image_info == posts.ImageInfo('PNG', 40, 30, 'I;16')
    assert store[1].image_info == posts.ImageInfo('JPEG', 50, 30, 'RGB')
    assert store[0].image == sixteen and store[1].image == rotated  # bytes kept by default


def test_validate_row_is_the_per_row_function(manifest_maker, tmp_path):
    """What the Beam runner calls per row: (line bytes, file, line number, options)."""
    m = manifest_maker
    options = posts.IngestOptions(reaction_types=posts.REACTION_TYPES)
    file = str(m.root / 'posts.jsonl')
    good = json.dumps(m.post('a', comments=['hi'])).encode() + b'\n'
    post = validate.validate_row(good, file, 7, options)
    assert isinstance(post, posts.Post) and post.id == 'a' and post.source == f'{file}:7'
    assert post.image == (m.root / 'images' / 'a.jpg').read_bytes()
    assert validate.validate_row(good, file, 7, options) == post  # deterministic
    bad = validate.validate_row(b'{"id": "b", "reactions": {"like": -1}}\n', file, 8, options)
    assert isinstance(bad, validate.Rejection)
    assert (bad.file, bad.line, bad.location, bad.post_id) == (file, 8, f'{file}:8', 'b')
    assert {(e.field, e.reason) for e in bad.errors} == {
        ('reactions.like', 'negative_reaction'), ('image', 'missing_image')}
    assert validate.validate_row(b'  \r\n', file, 9, options) is None  # blank: not a row
    duplicate = validate.mark_duplicate(post, f'{file}:2')
    assert duplicate.errors[0].reason == 'duplicate_id' and duplicate.line == 7


def test_manifest_mode_lines_up_with_the_store_after_ingest_rejected_rows(
        manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([
        m.post('a'),
        {'id': 'gone', 'image': 'images/missing.jpg'},        # rejected for its image only
        {'id': 'b', 'image': _write(m, 'bad.jpg', b'not a jpeg')},
        {'id': 'c', 'image': m.image('c.jpg'), 'reactions': {'like': -1}},  # a field error
        m.post('c'),                                            # duplicate of a rejected row
        m.post('d'),
        m.post('a'),                                            # duplicate of an accepted row
    ])
    run_ingest(manifest, tmp_path / 'store')
    store_ids = sources.store_post_ids(tmp_path / 'store')
    assert store_ids == ['a', 'd']
    reader, ids = sources.manifest_posts([manifest], '', posts.REACTION_TYPES, store_ids)
    assert ids == store_ids
    assert reader.read([0, 1]) == [posts.PostsStore(tmp_path / 'store')[i].image for i in (0, 1)]
    # Without the store's ids, rows rejected for their image are still there.
    assert sources.manifest_posts([manifest], '', posts.REACTION_TYPES)[1] == ['a', 'gone', 'b',
                                                                               'd']
    # A manifest edited since ingest is named as such, not as a labels problem.
    edited = m.write([m.post('a')], name='edited.jsonl')
    with pytest.raises(InputError, match=r'1 of its 2 posts found; e.g. no row has id .d.*'
                                         r'rerun ingest'):
        sources.manifest_posts([edited], '', posts.REACTION_TYPES, store_ids)


def test_file_images_never_read_devices_or_past_the_limit(tmp_path):
    small, large = tmp_path / 'small.jpg', tmp_path / 'large.jpg'
    small.write_bytes(b'x' * 10)
    large.write_bytes(b'x' * 11)
    reader = sources.FileImages([str(small), str(large), '/dev/zero', str(tmp_path)],
                                max_bytes=10)
    assert reader.read([0, 1, 2, 3]) == [b'x' * 10, None, None, None]


# --- optional re-encode at ingest (issue 15) ---------------------------------------------


def quadrants(width, height, noise=0):
    """Red top-left, green top-right, blue bottom-left, white bottom-right (+- noise)."""
    pixels = np.zeros((height, width, 3), np.int64)
    h, w = height // 2, width // 2
    pixels[:h, :w], pixels[:h, w:] = (255, 0, 0), (0, 255, 0)
    pixels[h:, :w], pixels[h:, w:] = (0, 0, 255), (255, 255, 255)
    pixels += np.random.default_rng(0).integers(-noise, noise + 1, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def assert_upright_quadrants(image):
    pixels = np.asarray(image.convert('RGB'), np.float64)
    h, w = pixels.shape[0] // 4, pixels.shape[1] // 4
    for (row, col), colour in zip([(h, w), (h, 3 * w), (3 * h, w), (3 * h, 3 * w)],
                                  [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)],
                                  strict=True):
        np.testing.assert_allclose(pixels[row, col], colour, atol=40)


def reencode_manifest(m):
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = quadrants(300, 200).transpose(Image.Transpose.ROTATE_90)  # stored 200x300
    return m.write([
        {'id': 'large_png', 'image': _write(m, 'large.png', encode_image(
            quadrants(640, 400, noise=20), 'PNG'))},
        {'id': 'sideways', 'image': _write(m, 'sideways.jpg', encode_image(
            sideways, 'JPEG', quality=95, exif=exif.tobytes()))},
        {'id': 'small_jpeg', 'image': _write(m, 'small.jpg', encode_image(
            quadrants(120, 80), 'JPEG', quality=95))},
        {'id': 'small_png', 'image': _write(m, 'small.png', encode_image(quadrants(60, 40),
                                                                         'PNG'))},
    ])


def test_reencode_stores_smaller_upright_jpegs_keeping_the_aspect(manifest_maker, tmp_path):
    manifest = reencode_manifest(manifest_maker)
    report = run_ingest(manifest, tmp_path / 'store', max_side=100, jpeg_quality=90)
    assert report['accepted'] == 4
    store = posts.PostsStore(tmp_path / 'store')
    expected = {'large_png': (160, 100), 'sideways': (150, 100), 'small_jpeg': (120, 80),
                'small_png': (60, 40)}
    for i in range(4):
        post = store[i]
        image = Image.open(io.BytesIO(post.image))
        assert image.format == 'JPEG' and image.mode == 'RGB'
        assert image.size == expected[post.id]
        assert post.image_info == posts.ImageInfo('JPEG', *expected[post.id], 'RGB')
        assert images.orientation(image) == 1  # upright in its pixels, no EXIF left to apply
        assert_upright_quadrants(image)
    source = manifest.parent / 'images'
    assert len(store[0].image) < len((source / 'large.png').read_bytes())
    # An upright RGB JPEG within the size is kept as it is (no second lossy encode).
    assert store[2].image == (source / 'small.jpg').read_bytes()
    # The longer side instead: 640x400 -> 100x62 (62.5 rounds up to 63).
    run_ingest(manifest, tmp_path / 'longer', max_side=100, resize_side='longer')
    assert posts.PostsStore(tmp_path / 'longer')[0].image_info.width == 100
    assert posts.PostsStore(tmp_path / 'longer')[0].image_info.height == 63


def test_reencode_is_deterministic_and_off_by_default(manifest_maker, tmp_path):
    manifest = reencode_manifest(manifest_maker)
    run_ingest(manifest, tmp_path / 'one', max_side=100)
    run_ingest(manifest, tmp_path / 'two', max_side=100, num_threads=1)
    for shard in sorted(p.name for p in (tmp_path / 'one').glob('*.array_record')):
        assert (tmp_path / 'one' / shard).read_bytes() == (tmp_path / 'two' / shard).read_bytes()
    run_ingest(manifest, tmp_path / 'default')
    store = posts.PostsStore(tmp_path / 'default')
    source = manifest.parent / 'images'
    assert [store[i].image for i in range(4)] == [
        (source / name).read_bytes()
        for name in ('large.png', 'sideways.jpg', 'small.jpg', 'small.png')]


def test_store_fingerprint_follows_what_changes_the_bytes():
    def fingerprint(**options):
        return posts.IngestOptions(reaction_types=posts.REACTION_TYPES,
                                   **options).store_fingerprint()

    base = fingerprint()
    assert 'num_threads' not in base and 'jpeg_quality' not in base
    assert fingerprint(num_threads=2) == base
    assert fingerprint(jpeg_quality=50) == base  # nothing is re-encoded
    assert fingerprint(max_side=256) != base
    assert fingerprint(max_side=256, jpeg_quality=50) != fingerprint(max_side=256)
    assert 'pillow' in fingerprint(max_side=256)
    for key in ('max_image_pixels', 'max_image_bytes', 'confine_images', 'max_row_bytes'):
        assert key in base
    with pytest.raises(InputError, match='jpeg_quality'):
        fingerprint(max_side=256, jpeg_quality=0)
    with pytest.raises(InputError, match='resize_side'):
        fingerprint(resize_side='middle')
    with pytest.raises(InputError, match='max_image_bytes must be positive'):
        fingerprint(max_image_bytes=0)


def test_ingest_stage_takes_the_limits_and_re_encode_from_the_config(manifest_maker, tmp_path):
    from vise_jax import configlib, stages

    m = manifest_maker
    manifest = reencode_manifest(m)
    config = configlib.default_config()
    config.posts.manifest = str(manifest)
    stages.ingest_stage(config, tmp_path)
    first = posts.PostsStore(tmp_path / 'posts')[0].image
    assert first == (m.root / 'images' / 'large.png').read_bytes()
    config.ingest.max_side = 100
    stages.ingest_stage(config, tmp_path)  # a new fingerprint: rebuilt
    assert posts.PostsStore(tmp_path / 'posts')[0].image_info.format == 'JPEG'
    config.input.max_image_pixels = 100_000  # the 640x400 PNG (256,000 px) is now too large
    config.ingest.max_rejected_fraction = 0.5
    stages.ingest_stage(config, tmp_path)
    report = artifacts.read_json(tmp_path / 'posts' / 'report.json')
    assert report['rejected_rows_by_reason'] == {'image_too_large': 1}


def test_id_claims_answer_like_a_dict_of_first_locations():
    """IdClaims (24 bytes per id, sorted runs) against the dict it replaces, over many flushes
    (runs of every size merged), duplicates within a chunk and across chunks, and a file
    that was not named up front (a resumed run's manifests named otherwise)."""
    rng = np.random.default_rng(0)
    files = ['/data/a.jsonl', '/data/b.jsonl']
    claims, expected = claims_lib.IdClaims(files), {}
    line = 0
    for chunk in range(40):
        for _ in range(int(rng.integers(1, 60))):
            line += 1
            post_id = f'p{int(rng.integers(0, 1500))}'
            location = f'{files[line % 2] if chunk < 35 else "other.jsonl"}:{line}'
            assert claims.setdefault(post_id, location) == expected.setdefault(post_id, location)
        claims.flush()
    assert len(claims) == len(expected) > 500
    assert all(claims.setdefault(key, 'x:1') == value for key, value in expected.items())
