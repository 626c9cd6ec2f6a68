"""Ingest: every bad-input case, exact accounting, the ArrayRecord round trip, resumption."""

import base64
import json

import grain
import pytest
from conftest import jpeg_bytes

from vise_jax import artifacts, posts
from vise_jax.errors import InputError
from vise_jax.posts import ingestion


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
    'malformed_json': ('{"id": "x", "image": ', 'malformed_json', '', 'malformed JSON'),
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
                         'undecodable_image', 'image_b64', 'cannot decode'),
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
