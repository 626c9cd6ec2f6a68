"""The pipeline on the tiny demo world: end to end, deterministic, skipping and resuming."""

import hashlib
import json
import re

import numpy as np
import pytest
from conftest import load_config, run_launch

from vise_jax import artifacts, posts, stages
from vise_jax.cluster import clustering, kmeans, labels
from vise_jax.demo import writer

TINY = 'size=tiny'


def tiny_config():
    return load_config('demo.py', TINY)


def tree_digest(root):
    """Hash of every file under root except the stage records (they hold timestamps)."""
    digest = {}
    for path in sorted(root.rglob('*')):
        if path.is_file() and path.name != artifacts.STAGE_RECORD:
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def test_command_line_runs_every_stage_on_the_tiny_world(tmp_path):
    result = run_launch('pipeline.py', f'--config=configs/demo.py:{TINY}', f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr
    store = posts.PostsStore(tmp_path / 'posts')
    assert len(store) == 48
    report = json.loads((tmp_path / 'posts' / 'report.json').read_text())
    assert (report['input_rows'], report['accepted'], report['rejected']) == (48, 48, 0)
    world_dir = tmp_path / 'world'
    assert (world_dir / 'contact_sheet.png').stat().st_size > 0
    test_rows = (world_dir / 'downstream' / 'test.csv').read_text().splitlines()
    assert test_rows[0] == 'image,object,mood' and len(test_rows) == 1 + 40
    # The store holds exactly the bytes of the generated files.
    first = json.loads((world_dir / 'posts.jsonl').read_text().splitlines()[0])
    assert store[0].id == first['id']
    assert store[0].image == (world_dir / first['image']).read_bytes()

    # Labels: one head per configured K, aligned with the store's posts, and a report.
    label_store = labels.LabelStore(tmp_path / 'labels')
    label_store.check_aligned(p.id for p in store.iter_meta())
    assert label_store.head_names == ['comments_k4', 'comments_k8', 'reactions_k3']
    # 'auto' is recorded as what it meant on this machine.
    assert {info['matmul_precision'] for info in label_store.index['heads'].values()} == {
        kmeans.resolve_matmul_precision('auto')}
    comments = label_store.head('comments_k4')
    assert comments.num_posts == 48 and comments.ids.max() < 4
    # A post's labels are as many as its non-empty comments.
    np.testing.assert_array_equal(np.diff(comments.offsets),
                                  [sum(bool(c.strip()) for c in p.comments)
                                   for p in store.iter_meta()])
    reactions = label_store.head('reactions_k3')
    np.testing.assert_array_equal(reactions.mask(),
                                  [sum(p.reactions.values()) > 0 for p in store.iter_meta()])
    report_text = (tmp_path / 'labels' / 'report' / 'report.md').read_text()
    assert '## comments_k8' in report_text and 'Agreement with the latent mood' in report_text

    # And a model trained on them, with its metrics.
    assert (tmp_path / 'train' / artifacts.STAGE_RECORD).exists()
    assert (tmp_path / 'train' / 'metrics.jsonl').stat().st_size > 0

    # The experiment: three exports of the same backbone, probed on both tasks, and a verdict.
    exports = {p.name for p in (tmp_path / 'export').iterdir()}
    assert exports == {'vise', 'supervised', 'random'}
    results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
    assert set(results['results']) == exports
    assert all(set(by_task) == {'mood', 'object'} for by_task in results['results'].values())
    assert (tmp_path / 'eval' / 'results.png').stat().st_size > 0
    report_lines = (tmp_path / 'report.md').read_text().splitlines()
    assert report_lines[2].startswith('Verdict: ')
    assert sum(line.startswith(('- holds: ', '- FAILS: ')) for line in report_lines) == 6

    again = run_launch('pipeline.py', f'--config=configs/demo.py:{TINY}', f'--workdir={tmp_path}')
    assert again.returncode == 0
    # Every stage skipped, the baselines' parts included; no export rewritten.
    for name in [*stages.STAGES, 'supervised_labels']:
        if name != 'baselines':
            assert f'{name}: up to date' in again.stderr, name
    assert again.stderr.count('train: up to date') == 2
    assert again.stderr.count('export: up to date') == 3 and 'export: wrote' not in again.stderr

    # Evaluated again with worker processes: the same features, so the same probes.
    workers = run_launch('linear_eval.py', f'--config=configs/demo.py:{TINY}',
                         f'--workdir={tmp_path}', '--config.input.num_workers=2',
                         '--config.eval.batch_size=16')
    assert workers.returncode == 0, workers.stderr
    assert json.loads((tmp_path / 'eval' / 'results.json').read_text())['results'] == \
        results['results']
    results = json.loads((tmp_path / 'eval' / 'results.json').read_text())

    # A mistyped downstream set fails before the finished evaluation is thrown away.
    bad = run_launch('pipeline.py', f'--config=configs/demo.py:{TINY}', f'--workdir={tmp_path}',
                     '--config.eval.test=csv:{workdir}/world/downstream/tset.csv')
    assert bad.returncode == 2 and 'tset.csv' in bad.stderr and 'Traceback' not in bad.stderr
    assert json.loads((tmp_path / 'eval' / 'results.json').read_text()) == results


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        config = tiny_config()
        config.seed = seed
        stages.run(config, tmp_path / name, stages=['demo_world'])
    assert tree_digest(tmp_path / 'a' / 'world') == tree_digest(tmp_path / 'b' / 'world')
    digest_c = tree_digest(tmp_path / 'c' / 'world')
    assert digest_c.keys() == tree_digest(tmp_path / 'a' / 'world').keys()
    assert digest_c != tree_digest(tmp_path / 'a' / 'world')


def count_written_posts(monkeypatch, die_after=None):
    """Records the ids of the posts the writer writes; raises KeyboardInterrupt after N."""
    real_write_post, written = writer._write_post, []

    def write_post(out, post, quality):
        if len(written) == die_after:
            raise KeyboardInterrupt('killed')
        written.append(post.id)
        return real_write_post(out, post, quality)

    monkeypatch.setattr(writer, '_write_post', write_post)
    return written


def test_interrupted_world_resumes_to_identical_bytes(tmp_path, monkeypatch):
    stages.run(tiny_config(), tmp_path / 'reference', stages=['demo_world'])
    with monkeypatch.context() as patch:
        count_written_posts(patch, die_after=40)
        with pytest.raises(KeyboardInterrupt):
            stages.run(tiny_config(), tmp_path / 'run', stages=['demo_world'])
    assert not (tmp_path / 'run' / 'world' / artifacts.STAGE_RECORD).exists()

    resumed = count_written_posts(monkeypatch)
    stages.run(tiny_config(), tmp_path / 'run', stages=['demo_world'])
    # Chunks of 16 posts: the first two chunks (32 posts) were committed and are not redone.
    assert len(resumed) == 48 + 80 + 40 - 32
    assert tree_digest(tmp_path / 'run' / 'world') == tree_digest(tmp_path / 'reference' / 'world')


def test_changed_config_rebuilds_downstream_stages(tmp_path):
    stages.run(tiny_config(), tmp_path, stages=['demo_world', 'ingest'])
    before = posts.PostsStore(tmp_path / 'posts')[0].image
    config = tiny_config()
    config.demo.world.image_size = 32
    stages.run(config, tmp_path, stages=['demo_world', 'ingest'])
    after = posts.PostsStore(tmp_path / 'posts')[0]
    assert after.image != before and after.image_info.width == 32


def test_bad_manifest_on_the_command_line_names_line_and_field(manifest_maker, tmp_path):
    m = manifest_maker
    manifest = m.write([m.post('a'), m.post('b', reactions={'like': -3})])
    result = run_launch('ingest.py', '--config=configs/vise_resnet50.py', f'--workdir={tmp_path}',
                        f'--config.posts.manifest={manifest}', '--config.ingest.on_error=fail')
    assert result.returncode == 2
    assert f"error: {manifest}:2: field 'reactions.like': negative count: -3" in result.stderr
    assert 'Traceback' not in result.stderr


def test_a_stage_before_its_inputs_says_which_stage_to_run(tmp_path):
    result = run_launch('cluster.py', f'--config=configs/demo.py:{TINY}', f'--workdir={tmp_path}')
    assert result.returncode == 2
    assert re.search(r'start with the demo_world stage: python \S*launch/generate_demo.py '
                     r'--config=configs/demo.py', result.stderr)
    assert 'Traceback' not in result.stderr


def test_interrupted_cluster_stage_keeps_finished_heads(tmp_path, monkeypatch):
    stages.run(tiny_config(), tmp_path, stages=['demo_world', 'ingest', 'embed'])

    def killed(*args):
        raise KeyboardInterrupt('killed')

    with monkeypatch.context() as patch:
        patch.setattr(clustering, '_reaction_head', killed)
        with pytest.raises(KeyboardInterrupt):
            stages.run(tiny_config(), tmp_path, stages=['cluster'])
    assert not (tmp_path / 'labels' / artifacts.STAGE_RECORD).exists()
    finished = {p.stem for p in (tmp_path / 'labels' / 'heads').glob('*.json')}
    assert finished == {'comments_k4', 'comments_k8'}

    monkeypatch.setattr(clustering, '_comment_head', killed)  # must not run again
    stages.run(tiny_config(), tmp_path, stages=['cluster'])
    label_store = labels.LabelStore(tmp_path / 'labels')
    assert label_store.head_names == ['comments_k4', 'comments_k8', 'reactions_k3']
    assert '## comments_k4' in (tmp_path / 'labels' / 'report' / 'report.md').read_text()
