"""Ingest on Apache Beam writes the store the single-process ingest writes, byte for byte."""

import codecs
import re

import pytest

pytest.importorskip('apache_beam')

from test_ingest import BAD_ROWS, read_rejected  # noqa: E402

from vise_jax import artifacts, posts  # noqa: E402
from vise_jax.errors import InputError  # noqa: E402
from vise_jax.posts import beam_ingest, ingestion  # noqa: E402

# Worker processes, so rows, DoFns and results really cross process boundaries.
PROCESSES = '--runner=FnApiRunner --direct_running_mode=multi_processing --direct_num_workers=2'


def run(runner, manifests, out, beam_options='--runner=FnApiRunner', **options):
    options = posts.IngestOptions(reaction_types=posts.REACTION_TYPES, **options)
    stage = artifacts.StageDir(out, 'ingest', {'test': True})
    if runner == 'local':
        return posts.ingest(manifests, stage, options)
    return beam_ingest.ingest(manifests, stage, options, beam_options=beam_options)


def make_manifests(m):
    """Four files: every bad row of test_ingest, duplicates within and across files (and of
    rejected rows), blank lines, a UTF-8 BOM, an empty file; ids 7 and '7' collide."""
    bad = [row(m) if callable(row) else row for _, (row, *_) in sorted(BAD_ROWS.items())]
    good = [m.post(f'good{i}', seed=i) for i in range(8)]
    first = m.write([good[0], good[1], '', *bad[:9], good[2], m.post('good1', seed=9), '  '],
                    name='part-0.jsonl')
    second = m.write([m.post('good0', seed=10), good[3],
                      {'id': 7, 'image': m.image('seven.jpg', 11)}, *bad[9:], '', good[4],
                      {'id': 'good3', 'comments': [1], 'reactions': {'like': -1}}],
                     name='part-1.jsonl')
    empty = m.write([], name='part-2.jsonl')
    last = m.root / 'part-3.jsonl'
    m.write([good[5], {'id': '7', 'image': m.image('seven2.jpg', 12)}, good[6], good[7],
             {'id': 'x', 'image': m.image('x-last.jpg', 13)}], name=last.name)
    last.write_bytes(codecs.BOM_UTF8 + last.read_bytes())
    return [first, second, empty, last]


def same_bytes(a, b):
    # Pillow names the stream it could not identify by its address ('<_io.BytesIO object at
    # 0x7f...>'), which differs between any two runs, in one process or not.
    def strip(data):
        return re.sub(rb' at 0x[0-9a-f]+', b' at 0x?', data)
    return strip(a.read_bytes()) == strip(b.read_bytes())


def assert_same_store(local, beamed):
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in beamed.iterdir())
    for name in names:
        if name != artifacts.STAGE_RECORD:  # holds the finishing time
            assert same_bytes(local / name, beamed / name), name
    assert artifacts.read_json(local / artifacts.STAGE_RECORD)['summary'] == \
        artifacts.read_json(beamed / artifacts.STAGE_RECORD)['summary']
    a, b = posts.PostsStore(local), posts.PostsStore(beamed)
    assert [p.id for p in a.iter_meta()] == [p.id for p in b.iter_meta()]
    assert all(a[i] == b[i] for i in range(len(a)))  # metadata and image bytes


def test_beam_store_is_the_local_store(manifest_maker, tmp_path):
    manifests = make_manifests(manifest_maker)
    local = run('local', manifests, tmp_path / 'local', rows_per_shard=5)
    beamed = run('beam', manifests, tmp_path / 'beam', beam_options=PROCESSES, rows_per_shard=5)

    assert beamed == local
    assert_same_store(tmp_path / 'local', tmp_path / 'beam')
    # The inputs really exercise what they are meant to.
    assert {reason for _, reason, *_ in BAD_ROWS.values()} <= \
        set(local['rejected_rows_by_reason'])
    assert local['blank_lines'] == 3 and local['input_rows'] == len(BAD_ROWS) + 14
    duplicates = [(r['location'], e['message']) for r in read_rejected(tmp_path / 'beam')
                  for e in r['errors'] if e['reason'] == 'duplicate_id']
    assert (f'{manifests[1]}:1', f"duplicate id 'good0' (first seen at {manifests[0]}:1)") \
        in duplicates
    assert (f'{manifests[3]}:2', f"duplicate id '7' (first seen at {manifests[1]}:3)") \
        in duplicates
    # 'x' is first held by a rejected row; its later rows are duplicates all the same.
    assert any(loc == f'{manifests[3]}:5' and "'x'" in msg for loc, msg in duplicates)
    # Shards without an accepted post (rows 4-8 are all bad) are left out of the index.
    shards = -(-(local['input_rows'] + local['blank_lines']) // 5)
    assert len(posts.PostsStore(tmp_path / 'beam').index['shards']) < shards


def test_shard_workers_seek_to_their_lines_and_ids_come_in_batches(manifest_maker, tmp_path,
                                                                   monkeypatch):
    """Workers read their shard's lines from the manifests, seeking to a byte offset kept every
    _STRIDE lines: with a stride of 2 and 3 rows per shard, shards start at every position
    relative to a kept offset, mid-file and across files, and after a too-long line. Ids reach
    their bucket in batches of at most 2 (a reader holding 5 sends them all), so duplicates
    meet across batches."""
    monkeypatch.setattr(beam_ingest, '_STRIDE', 2)    # the in-process runner sees these
    monkeypatch.setattr(beam_ingest, '_BATCH', 2)
    monkeypatch.setattr(beam_ingest, '_PENDING', 5)
    m = manifest_maker
    long_rows = m.write([m.post('a'), m.post('long', comments=['x' * 5000]), m.post('b'),
                         '{"id": "' + 'y' * 3000, m.post('c'), m.post('d')], name='long.jsonl')
    manifests = [*make_manifests(m), long_rows]
    local = run('local', manifests, tmp_path / 'local', rows_per_shard=3, max_row_bytes=1000)
    beamed = run('beam', manifests, tmp_path / 'beam', rows_per_shard=3, max_row_bytes=1000)
    too_long = [r['location'] for r in read_rejected(tmp_path / 'beam')
                if any(e['reason'] == 'row_too_long' for e in r['errors'])]
    assert f'{long_rows}:2' in too_long and f'{long_rows}:4' in too_long
    assert beamed == local
    assert_same_store(tmp_path / 'local', tmp_path / 'beam')


def test_fail_policy_stops_at_the_same_row(manifest_maker, tmp_path):
    manifests = make_manifests(manifest_maker)
    errors = []
    for runner in ('local', 'beam'):
        with pytest.raises(InputError) as raised:
            run(runner, manifests, tmp_path / runner, rows_per_shard=5, on_error='fail')
        errors.append(str(raised.value))
        assert not (tmp_path / runner / artifacts.STAGE_RECORD).exists()
    assert errors[0] == errors[1]
    assert errors[0].startswith(f'{manifests[0]}:4: ')


def test_beam_resumes_a_local_ingest_that_was_killed(manifest_maker, tmp_path, monkeypatch):
    manifests = make_manifests(manifest_maker)
    run('local', manifests, tmp_path / 'reference', rows_per_shard=5)

    real_commit, commits = ingestion._commit_chunk, []

    def commit_then_die(out, shard, result, reaction_types):
        if len(commits) == 4:
            raise KeyboardInterrupt('killed')
        commits.append(shard)
        real_commit(out, shard, result, reaction_types)

    monkeypatch.setattr(ingestion, '_commit_chunk', commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        run('local', manifests, tmp_path / 'store', rows_per_shard=5)
    monkeypatch.setattr(ingestion, '_commit_chunk', real_commit)
    kept = tmp_path / 'store' / 'meta-00000.array_record'
    mtime = kept.stat().st_mtime_ns

    run('beam', manifests, tmp_path / 'store', rows_per_shard=5)
    assert kept.stat().st_mtime_ns == mtime  # committed shards are not redone
    assert_same_store(tmp_path / 'reference', tmp_path / 'store')


def test_beam_options():
    assert beam_ingest.parse_beam_options('') == ['--runner=FnApiRunner']
    assert beam_ingest.parse_beam_options(
        "--runner=DataflowRunner --project=p --labels='a=b c'") == \
        ['--runner=DataflowRunner', '--project=p', '--labels=a=b c']
    assert beam_ingest.parse_beam_options(('--runner=FlinkRunner', '--flink_master=h:8081')) == \
        ['--runner=FlinkRunner', '--flink_master=h:8081']
    with pytest.raises(InputError, match=r"\['runner=DirectRunner'\] are not --flag=value"):
        beam_ingest.parse_beam_options('runner=DirectRunner')


def test_the_ingest_stage_runs_either_runner(manifest_maker, tmp_path):
    from vise_jax import configlib, stages

    m = manifest_maker
    m.write([m.post('a'), m.post('b', seed=1)], name='part-0.jsonl')
    m.write([m.post('a', seed=2), m.post('c', seed=3)], name='part-1.jsonl')
    config = configlib.default_config()
    config.posts.manifest = str(m.root / 'part-*.jsonl')
    config.ingest.max_rejected_fraction = 0.5
    config.ingest.runner = 'beam'
    config.ingest.beam_options = '--runner=FnApiRunner --direct_num_workers=1'
    beamed = stages.ingest_stage(config, tmp_path / 'beam')
    config.ingest.runner = 'local'
    local = stages.ingest_stage(config, tmp_path / 'local')
    assert beamed['summary'] == local['summary']
    assert (beamed['summary']['accepted'], beamed['summary']['rejected']) == (3, 1)
    assert_same_store(tmp_path / 'local' / 'posts', tmp_path / 'beam' / 'posts')
    # Only the runner changed: the finished store is up to date, not rebuilt.
    assert stages.ingest_stage(config, tmp_path / 'beam')['finished'] == beamed['finished']
    config.ingest.runner = 'spark'
    with pytest.raises(InputError, match="runner must be 'local' or 'beam', got 'spark'"):
        stages.ingest_stage(config, tmp_path / 'other')
