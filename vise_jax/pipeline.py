"""The pipeline's stages: each turns the config into library calls and one workdir artefact.

A stage is `fn(config, workdir) -> record`, where the record is the stage's `stage.json`
(artifacts.StageDir). A stage whose output is complete and still matches its config and inputs is
skipped; otherwise it (re)builds or resumes. Stages run in the order of STAGES.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections

from vise_jax import artifacts, evaluate, experiment, export, posts, sharding, text
from vise_jax.cluster import clustering, labels
from vise_jax.configlib import expand_workdir
from vise_jax.demo import world, writer
from vise_jax.errors import InputError, TrainingError
from vise_jax.train import loop as train_loop

log = logging.getLogger(__name__)

Record = dict[str, Any]
EXPERIMENT_REPORT = 'report.md'


def resolve_manifests(pattern: str, workdir: str | os.PathLike) -> list[Path]:
    """Expands '{workdir}', comma-separated entries and globs into a sorted list of files."""
    if not pattern:
        raise InputError('config.posts.manifest is empty: set --config.posts.manifest=PATH '
                         '(a JSONL file, a glob, or several separated by commas; '
                         'see docs/data_format.md)')
    paths = []
    for entry in expand_workdir(pattern, workdir).split(','):
        matches = sorted(glob.glob(entry.strip()))
        if not matches:
            raise InputError(f'config.posts.manifest: no file matches {entry.strip()!r}')
        paths.extend(Path(m) for m in matches)
    return paths


def _run_or_skip(stage: artifacts.StageDir, build: Callable[[], Any]) -> Record:
    if stage.is_complete():
        log.info('%s: up to date in %s, skipped', stage.name, stage.path)
    else:
        log.info('%s: building %s', stage.name, stage.path)
        start = time.perf_counter()
        build()
        log.info('%s: done in %.1f s -> %s', stage.name, time.perf_counter() - start, stage.path)
    return stage.record()


def demo_world_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record | None:
    if not config.demo.enabled:
        log.info('demo_world: config.demo.enabled is False, nothing to generate')
        return None
    spec = world.WorldSpec(seed=config.seed, **config.demo.world)
    sizes = writer.WorldSizes(pretrain=config.demo.num_pretrain,
                              downstream_train=config.demo.num_downstream_train,
                              downstream_test=config.demo.num_downstream_test)
    stage = artifacts.StageDir(workdir / 'world', 'demo_world', {
        'version': writer.FORMAT_VERSION, 'spec': dataclasses.asdict(spec),
        'sizes': sizes.by_split(), 'jpeg_quality': config.demo.jpeg_quality})
    return _run_or_skip(stage, lambda: writer.write_world(
        spec, sizes, stage, posts_per_chunk=config.demo.posts_per_chunk,
        jpeg_quality=config.demo.jpeg_quality, config=config.to_dict()))


def ingest_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    manifests = resolve_manifests(config.posts.manifest, workdir)
    options = posts.IngestOptions(
        reaction_types=tuple(config.posts.reaction_types),
        on_error=config.ingest.on_error,
        max_rejected_fraction=config.ingest.max_rejected_fraction,
        rows_per_shard=config.ingest.rows_per_shard,
        num_threads=config.ingest.num_threads,
        image_root=expand_workdir(config.posts.image_root, workdir))
    # Only what changes the store is fingerprinted: more threads give the same bytes.
    store_options = dataclasses.asdict(options)
    del store_options['num_threads']
    stage = artifacts.StageDir(workdir / 'posts', 'ingest', {
        'version': posts.store.STORE_VERSION, 'options': store_options,
        'manifests': [artifacts.file_identity(m) for m in manifests]})

    def build():
        report = posts.ingest(manifests, stage, options, config=config.to_dict())
        log.info('%s', posts.summarize(report))

    return _run_or_skip(stage, build)


def _mesh(config: ml_collections.ConfigDict):
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


def _finished_record(path: Path, producer: str) -> Record:
    """The record of an upstream stage, which must have finished."""
    record = artifacts.StageDir(path, producer, None).record()
    if record is None:
        raise InputError(f'{path} is not finished: run the {producer} stage first')
    return record


def _make_encoder(embed: ml_collections.ConfigDict, store: posts.PostsStore, out: Path):
    if embed.encoder == 'minilm':
        return text.load_minilm(embed.model_dir or None, matmul_dtype=embed.matmul_dtype)
    if embed.encoder == 'sentencepiece':
        # Trained once on the comments and kept beside the shards, so a resumed run reuses it.
        saved = out / 'sentencepiece.npz'
        if saved.exists():
            return text.SentencePieceTfidfEncoder.load(saved)
        comments = [c for post in store.iter_meta() for c in post.comments if c.strip()]
        encoder = text.SentencePieceTfidfEncoder.train(
            comments, dim=embed.sp_dim, vocab_size=embed.sp_vocab_size)
        encoder.save(saved)
        return encoder
    raise InputError(f"config.embed.encoder must be 'minilm' or 'sentencepiece', "
                     f'got {embed.encoder!r}')


def embed_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    stage = artifacts.StageDir(workdir / 'embeddings', 'embed', {
        'posts': posts_record['fingerprint'], 'embed': config.embed.to_dict()})

    def build():
        stage.prepare()
        store = posts.PostsStore(workdir / 'posts')
        encoder = _make_encoder(config.embed, store, stage.path)
        summary = text.embed_comments(
            text.iter_comments(store.iter_meta()), encoder, stage.path,
            mesh=_mesh(config),
            batch_size=config.embed.batch_size, chunk_size=config.embed.chunk_size)
        stage.finish(config.to_dict(), summary)
        log.info('embed: %d comments embedded (%d empty skipped) with %s',
                 summary['num_embedded'], summary['num_empty'], encoder.name)

    return _run_or_skip(stage, build)


def cluster_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    embed_record = _finished_record(workdir / 'embeddings', 'embed')
    stage = artifacts.StageDir(workdir / 'labels', 'cluster', {
        'version': labels.LABELS_VERSION, 'posts': posts_record['fingerprint'],
        'embeddings': embed_record['fingerprint'], 'seed': config.seed,
        'cluster': config.cluster.to_dict()})

    def build():
        stage.prepare()
        summary = clustering.make_labels(
            posts.PostsStore(workdir / 'posts'), text.EmbeddingShards(workdir / 'embeddings'),
            stage.path, clustering.ClusterSettings.from_config(config, workdir),
            mesh=_mesh(config))
        stage.finish(config.to_dict(), summary)
        log.info('cluster: report in %s', stage.path / 'report' / 'report.md')

    return _run_or_skip(stage, build)


def train_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    """Trains on the posts' images and labels; reruns continue from the latest checkpoint."""
    labels_record = _finished_record(workdir / 'labels', 'cluster')
    return _train(config, workdir, workdir / 'labels', labels_record, workdir / 'train')


def _train(config: ml_collections.ConfigDict, workdir: Path, labels_dir: Path,
           labels_record: Record, out: Path) -> Record:
    """One training run from `labels_dir` into `out`, recorded by its stage.json.

    Unlike the other stages, a changed config never wipes the output: a longer schedule
    continues the run, and a checkpoint made for another model or head set is refused on restore.
    """
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    stage = artifacts.StageDir(out, 'train', {
        'posts': posts_record['fingerprint'], 'labels': labels_record['fingerprint'],
        'seed': config.seed, **{group: config[group].to_dict()
                                for group in ('input', 'model', 'optim', 'train')}})
    if stage.is_complete():
        log.info('train: up to date in %s, skipped', stage.path)
        return stage.record()
    start = time.perf_counter()
    summary = train_loop.train(config, workdir, labels_dir=labels_dir, out_dir=out)
    if not summary['finished']:
        raise TrainingError(f'train: stopped at step {summary["final_step"]} of '
                            f'{summary["total_steps"]} (SIGTERM); rerun the same command to '
                            'continue from the checkpoint just saved')
    log.info('train: done in %.1f s -> %s', time.perf_counter() - start, stage.path)
    if jax.process_index() == 0:
        return stage.finish(config.to_dict(), summary)
    return stage.record() or {}


def supervised_labels_stage(config: ml_collections.ConfigDict, workdir: Path,
                            out: Path) -> Record:
    """Known classes per post (config.experiment.supervised_labels) as a one-head label store."""
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    csv_path, column = labels.parse_class_spec(config.experiment.supervised_labels, workdir)
    stage = artifacts.StageDir(out, 'supervised_labels', {
        'version': labels.LABELS_VERSION, 'posts': posts_record['fingerprint'],
        'csv': artifacts.file_identity(csv_path), 'column': column})

    def build():
        stage.prepare()
        post_ids = [post.id for post in posts.PostsStore(workdir / 'posts').iter_meta()]
        stage.finish(config.to_dict(),
                     labels.write_class_labels(stage.path, csv_path, column, post_ids))

    return _run_or_skip(stage, build)


def export_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    """The trained backbone as an evaluation export ({workdir}/export/vise by default)."""
    if not config.export.source:
        _finished_record(workdir / 'train', 'train')
    return export.export_from_config(config, workdir)


def baselines_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    """The paper's baselines, same backbone and budget: supervised on known classes, random.

    Exports land beside VisE's in {workdir}/export, so the linear probes compare all of them.
    """
    known = (experiment.SUPERVISED, experiment.RANDOM)
    # A tuple in the config; 'supervised,random' from the command line arrives as one item.
    names = [name.strip() for item in config.experiment.baselines for name in item.split(',')
             if name.strip()]
    unknown = set(names) - set(known)
    if unknown:
        raise InputError(f'config.experiment.baselines: unknown {sorted(unknown)}; known: {known}')
    records = {}
    for name in names:
        out = workdir / 'export' / name
        if name == experiment.SUPERVISED:
            checkpoints = _supervised_baseline(config, workdir) / 'checkpoints'
            write = functools.partial(export.export_checkpoint, checkpoints, out, overwrite=True)
        else:
            write = functools.partial(export.random_export, config.model.name, config.model.width,
                                      config.input.image_size, config.seed, out, overwrite=True)
        records[name] = export.written_by_process_zero(write, out)
    return records


def _supervised_baseline(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Trains the VisE run's model, schedule and budget on one known class per post."""
    base = workdir / 'baselines' / experiment.SUPERVISED
    labels_record = supervised_labels_stage(config, workdir, base / 'labels')
    baseline = copy.deepcopy(config)
    with baseline.unlocked():
        baseline.input.heads = ()            # the label store's one class head
        baseline.train.head_weights = ''
        baseline.train.init = baseline.train.resume = baseline.train.checkpoint_dir = ''
    _train(baseline, workdir, base / 'labels', labels_record, base / 'train')
    return base / 'train'


def linear_eval_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    """Linear probes of every export on the downstream tasks; with baselines, the verdict.

    Redone when an export's weights, the eval settings or a dataset's listing change.
    """
    exports = evaluate.resolve_exports(config.eval.exports, workdir)
    stage = artifacts.StageDir(workdir / 'eval', 'linear_eval', {
        'exports': {name: export.read_export_meta(path)['variables_sha256']
                    for name, path in exports.items()},
        'datasets': [_dataset_identity(spec, workdir)
                     for spec in (config.eval.train, config.eval.test)],
        'eval': config.eval.to_dict(), 'input': config.input.to_dict(), 'seed': config.seed,
        'experiment': config.experiment.to_dict()})

    def build():
        # A bad dataset spec must fail before the previous results (and feature cache) go.
        for spec, key in ((config.eval.train, 'config.eval.train'),
                          (config.eval.test, 'config.eval.test')):
            evaluate.load_dataset(spec, workdir, key)
        stage.prepare()
        results = evaluate.linear_eval(config, workdir, exports, stage.path)
        if jax.process_index() == 0:
            if config.experiment.baselines:
                experiment_report(results, workdir)
            stage.finish(config.to_dict(), {'results': results['results']})

    record = _run_or_skip(stage, build)
    report = workdir / EXPERIMENT_REPORT
    if config.experiment.baselines and report.exists():   # the last line a run shows
        log.info('experiment: the report is %s', report)
    return record


def _dataset_identity(spec: str, workdir: Path) -> Any:
    """A downstream set's spec, with the identity of its CSV file when it is one."""
    kind, _, rest = expand_workdir(spec, workdir).partition(':')
    return [spec, artifacts.file_identity(rest) if kind == 'csv' and os.path.isfile(rest)
            else None]


def experiment_report(results: Record, workdir: Path) -> Path:
    """{workdir}/report.md: the verdict on the paper's pattern, the probes, links to the rest."""
    headline = {task: info['metrics'][0] for task, info in results['tasks'].items()}
    scores = {name: {task: by_task[task]['metrics'][headline[task]] for task in by_task}
              for name, by_task in results['results'].items()}
    kinds = {task: info.get('kind') for task, info in results['tasks'].items()}
    training = 'VisE: [curves](train/curves.png), metrics in train/metrics.jsonl.'
    supervised_curves = Path('baselines') / experiment.SUPERVISED / 'train' / 'curves.png'
    if (workdir / supervised_curves).exists():
        training += f' Supervised baseline: [curves]({supervised_curves.as_posix()}).'
    sections = {
        'Pseudo labels': '[cluster report](labels/report/report.md)',
        'Training': training,
        'Probe details': '[eval/results.md](eval/results.md) (chosen C, validation scores), '
                         'eval/results.json (everything).',
    }
    return experiment.write_report(
        workdir / EXPERIMENT_REPORT, found=experiment.claims(scores, kinds), metric_of=headline,
        results_table=evaluate.report.markdown_table(results), chart='eval/results.png',
        sections=sections)


STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path], Record | None]] = {
    'demo_world': demo_world_stage,
    'ingest': ingest_stage,
    'embed': embed_stage,
    'cluster': cluster_stage,
    'train': train_stage,
    'export': export_stage,
    'baselines': baselines_stage,
    'linear_eval': linear_eval_stage,
}


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        stages: Sequence[str] = tuple(STAGES)) -> dict[str, Record | None]:
    """Runs the named stages in pipeline order; returns each stage's record."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise InputError(f'unknown stages {sorted(unknown)}; known: {list(STAGES)}')
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return {name: STAGES[name](config, workdir) for name in STAGES if name in stages}
