"""Two processes run the whole pipeline on one shared workdir (a pod's hosts on one filesystem):
every artefact is written once, none is read half-written, and the result is the one-process
result wherever the arithmetic is the same."""

import json

import numpy as np
from conftest import load_config
from training_processes import REPO, run_processes

from vise_jax import artifacts, posts, stages, text

PIPELINE = REPO / 'launch' / 'pipeline.py'
ARGS = ['--config=configs/demo.py:size=tiny', '--distributed_timeout_s=900']
RECORDED = ('world', 'posts', 'embeddings', 'labels', 'train', 'baselines/supervised/labels',
            'baselines/supervised/train', 'eval')


def run_pipeline(workdir, compile_cache):
    results = run_processes(workdir, ARGS, devices=2, cache_dir=compile_cache, num_processes=2,
                            script=PIPELINE)
    for index, result in enumerate(results):
        assert result.returncode == 0, f'process {index}: {result.describe()}'


def embeddings(workdir):
    return np.concatenate([rows for rows, _, _ in text.EmbeddingShards(workdir / 'embeddings')])


def records(workdir):
    return {name: (workdir / name / artifacts.STAGE_RECORD).stat().st_mtime_ns
            for name in RECORDED}


def test_two_processes_run_the_pipeline_on_one_workdir(tmp_path, compile_cache):
    workdir = tmp_path / 'shared'
    run_pipeline(workdir, compile_cache)

    written = records(workdir)          # every stage finished and recorded
    leftovers = [p for p in workdir.rglob('*')
                 if p.name == artifacts.PARTIAL_RECORD or p.name.endswith('.tmp')]
    assert leftovers == []
    results = json.loads((workdir / 'eval' / 'results.json').read_text())
    assert sorted(results['results']) == ['random', 'supervised', 'vise']
    assert (workdir / 'report.md').is_file()

    # One process writes the world and the store: the same as a one-process run's.
    one = tmp_path / 'one'
    stages.run(load_config('demo.py', 'size=tiny'), one, ['demo_world', 'ingest', 'embed'])
    for path in sorted((one / 'world').rglob('*')):
        if path.is_file() and path.name != artifacts.STAGE_RECORD:
            assert path.read_bytes() == (workdir / path.relative_to(one)).read_bytes(), path
    shared, alone = posts.PostsStore(workdir / 'posts'), posts.PostsStore(one / 'posts')
    assert len(shared) == len(alone)
    for index in range(len(alone)):
        a, b = shared[index], alone[index]       # `source` names the manifest's own path
        assert (a.id, a.comments, a.reactions, a.image) == (b.id, b.comments, b.reactions, b.image)
    # Each process embeds its own chunks on its own devices: the same up to float16 rounding.
    np.testing.assert_allclose(embeddings(workdir), embeddings(one), atol=2e-3)

    # The same command again finds every stage done and rewrites nothing.
    run_pipeline(workdir, compile_cache)
    assert records(workdir) == written
