"""The pipeline's stages: each turns the config into library calls and one workdir artefact.

A stage is `fn(config, workdir) -> record`, where the record is the stage's `stage.json`
(artifacts.StageDir). A stage whose output is complete and still matches its config and inputs is
skipped; otherwise it (re)builds or resumes. Stages run in the order of STAGES.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from etils import epath

from vise_jax import artifacts, evaluate, experiment, export, posts, sharding, specs, text
from vise_jax.cluster import clustering, labels
from vise_jax.configlib import with_workdir
from vise_jax.demo import world, writer
from vise_jax.errors import InputError, TrainingError
from vise_jax.interop import files as weight_files
from vise_jax.posts.manifests import resolve_manifests
from vise_jax.train import checkpointing
from vise_jax.train import loop as train_loop

log = logging.getLogger(__name__)

Record = dict[str, Any]
EXPERIMENT_REPORT = 'report.md'


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
    seed = config.seed if config.demo.world_seed < 0 else config.demo.world_seed
    spec = world.WorldSpec(seed=seed, **config.demo.world)
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
    # Either runner writes the same store (tests/test_beam_ingest.py), so the runner is not
    # fingerprinted, and one resumes what the other left half done.
    if config.ingest.runner == 'local':
        ingest = posts.ingest
    elif config.ingest.runner == 'beam':
        try:
            from vise_jax.posts import beam_ingest
        except ModuleNotFoundError as e:
            if not (e.name or '').startswith('apache_beam'):
                raise
            raise InputError("config.ingest.runner='beam' needs Apache Beam: "
                             "pip install -e '.[beam]'") from None
        ingest = functools.partial(beam_ingest.ingest, beam_options=config.ingest.beam_options)
    else:
        raise InputError("config.ingest.runner must be 'local' or 'beam', "
                         f'got {config.ingest.runner!r}')
    manifests = resolve_manifests(config.posts.manifest)
    options = posts.IngestOptions(
        reaction_types=tuple(config.posts.reaction_types),
        on_error=config.ingest.on_error,
        max_rejected_fraction=config.ingest.max_rejected_fraction,
        rows_per_shard=config.ingest.rows_per_shard,
        num_threads=config.ingest.num_threads,
        image_root=config.posts.image_root,
        confine_images=config.ingest.confine_images,
        max_row_bytes=config.ingest.max_row_bytes,
        max_image_bytes=config.ingest.max_image_bytes,
        # Training skips larger images: ingest rejects them, so every stored post is usable.
        max_image_pixels=config.input.max_image_pixels,
        max_side=config.ingest.max_side,
        resize_side=config.ingest.resize_side,
        jpeg_quality=config.ingest.jpeg_quality)
    # Only what changes the store is fingerprinted: more threads give the same bytes; the
    # re-encode settings (and Pillow's version) count only when images are re-encoded.
    stage = artifacts.StageDir(workdir / 'posts', 'ingest', {
        'version': posts.store.STORE_VERSION, 'options': options.store_fingerprint(),
        'manifests': [artifacts.file_identity(m) for m in manifests]})

    def build():
        report = ingest(manifests, stage, options, config=config.to_dict())
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
        # Trained once, by process 0, on a sample of the comments read from the store as a
        # stream; kept beside the shards, so the other processes and a resumed run load it.
        saved = out / 'sentencepiece.npz'

        def train_once():
            if not saved.exists():
                text.SentencePieceTfidfEncoder.train(
                    _StoreComments(store), dim=embed.sp_dim, vocab_size=embed.sp_vocab_size
                ).save(saved)

        on_process_zero(train_once, 'embed: training the sentencepiece encoder')
        return text.SentencePieceTfidfEncoder.load(saved)
    raise InputError(f"config.embed.encoder must be 'minilm' or 'sentencepiece', "
                     f'got {embed.encoder!r}')


class _StoreComments:
    """Every comment of the store, in post order, read afresh on each iteration."""

    def __init__(self, store: posts.PostsStore):
        self._store = store

    def __iter__(self):
        return (comment for post in self._store.iter_meta() for comment in post.comments)


def embed_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    stage = artifacts.StageDir(workdir / 'embeddings', 'embed', {
        'version': text.embed.FORMAT_VERSION, 'posts': posts_record['fingerprint'],
        'embed': config.embed.to_dict()})

    def build():
        on_process_zero(stage.prepare, 'embed')
        store = posts.PostsStore(workdir / 'posts')
        encoder = _make_encoder(config.embed, store, stage.path)
        # Chunks are post ranges: each process reads only the posts of its own chunks.
        summary = text.embed_comments(
            text.embed.PostComments(store), encoder, stage.path,
            mesh=_mesh(config),
            batch_size=config.embed.batch_size, chunk_size=config.embed.chunk_size)
        on_process_zero(lambda: stage.finish(config.to_dict(), summary), 'embed')
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
        on_process_zero(stage.prepare, 'cluster')
        summary = clustering.make_labels(
            posts.PostsStore(workdir / 'posts'), text.EmbeddingShards(workdir / 'embeddings'),
            stage.path, clustering.ClusterSettings.from_config(config),
            mesh=_mesh(config))
        on_process_zero(lambda: stage.finish(config.to_dict(), summary), 'cluster')
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
    init = (checkpointing.Init(config.train.init,
                               functools.partial(export.load_backbone, config.train.init))
            if config.train.init else None)    # read only if the run starts from it
    summary = train_loop.train(config, workdir, labels_dir=labels_dir, out_dir=out, init=init)
    if not summary['finished']:
        raise TrainingError(f'train: stopped at step {summary["final_step"]} of '
                            f'{summary["total_steps"]} (SIGTERM); rerun the same command to '
                            'continue from the checkpoint just saved')
    log.info('train: done in %.1f s -> %s', time.perf_counter() - start, stage.path)
    on_process_zero(lambda: stage.finish(config.to_dict(), summary), 'train')
    return stage.record()


def supervised_labels_stage(config: ml_collections.ConfigDict, workdir: Path,
                            out: Path) -> Record:
    """Known classes per post (config.experiment.supervised_labels) as a one-head label store."""
    posts_record = _finished_record(workdir / 'posts', 'ingest')
    csv_path, column = labels.parse_class_spec(config.experiment.supervised_labels)
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
    """The trained backbone as an evaluation export: config.export.source (the run's
    checkpoints by default, or a weights file) -> config.export.out (default
    {workdir}/export/vise). Reruns leave an identical export alone and replace a stale one (a
    later step, other weights). Returns export.json's content. In a multi-process run every
    process checks the source, process 0 writes the export and the others wait for it."""
    source = config.export.source
    if not source:
        source = config.train.checkpoint_dir or str(workdir / 'train' / 'checkpoints')
        if not epath.Path(source).exists():
            raise InputError(f'{source}: no checkpoints to export; run the train stage first, '
                             f'or set --config.export.source to a checkpoint directory or a '
                             f'weights file')
        _finished_record(workdir / 'train', 'train')
    out = Path(config.export.out or workdir / 'export' / 'vise')
    step = None if config.export.step is None or config.export.step < 0 else config.export.step
    options = dict(overwrite=True, torchvision=bool(config.export.torch))
    local = '://' not in source
    if local and (Path(source).is_file() or weight_files.is_weights_file(source)):
        if step is not None:
            raise InputError(f'config.export.step={step} applies to checkpoints, not to the '
                             f'weights file {source}')
        write = functools.partial(export.export_weights_file, source, out,
                                  image_size=config.input.image_size, **options)
    elif local and (Path(source) / export.META_FILE).is_file():
        raise InputError(f'config.export.source={source} is already an export; use it '
                         f'directly (config.eval.exports) or copy it')
    else:
        write = functools.partial(export.export_checkpoint, source, out, step=step, **options)
    meta = _export_by_process_zero(write, out)
    log.info('export: %s -> %s', source, out)
    return meta


def baselines_stage(config: ml_collections.ConfigDict, workdir: Path) -> Record:
    """The paper's baselines, same backbone and budget: supervised on known classes, random.

    Exports land beside VisE's in {workdir}/export, so the linear probes compare all of them.
    """
    names = specs.parse_names(config.experiment.baselines, 'config.experiment.baselines',
                              (experiment.SUPERVISED, experiment.RANDOM))
    records = {}
    for name in names:
        out = workdir / 'export' / name
        if name == experiment.SUPERVISED:
            checkpoints = _supervised_baseline(config, workdir) / 'checkpoints'
            write = functools.partial(export.export_checkpoint, checkpoints, out, overwrite=True)
        else:
            write = functools.partial(export.random_export, config.model.name, config.model.width,
                                      config.input.image_size, config.seed, out, overwrite=True)
        records[name] = _export_by_process_zero(write, out)
    return records


def _export_by_process_zero(write: Callable[[], dict[str, Any]], out: Path) -> dict[str, Any]:
    """Runs `write` (which writes the export at `out`) on process 0; every process returns the
    export's metadata."""
    return on_process_zero(write, f'export {out}') or export.read_export_meta(out)


def _supervised_baseline(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Trains the VisE run's model, schedule and budget on one known class per post."""
    base = workdir / 'baselines' / experiment.SUPERVISED
    on_process_zero(lambda: supervised_labels_stage(config, workdir, base / 'labels'),
                     'supervised_labels')
    labels_record = _finished_record(base / 'labels', 'supervised_labels')
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
        'datasets': [_dataset_identity(spec, key) for spec, key in (
            (config.eval.train, 'config.eval.train'), (config.eval.test, 'config.eval.test'))],
        'eval': config.eval.to_dict(), 'input': config.input.to_dict(), 'seed': config.seed,
        'experiment': config.experiment.to_dict()})

    def build():
        # A bad dataset spec must fail before the previous results (and feature cache) go.
        for spec, key in ((config.eval.train, 'config.eval.train'),
                          (config.eval.test, 'config.eval.test')):
            evaluate.load_dataset(spec, key)
        on_process_zero(stage.prepare, 'linear_eval')
        results = evaluate.linear_eval(config, workdir, exports, stage.path)

        def finish():
            if config.experiment.baselines:
                experiment_report(results, workdir)
            stage.finish(config.to_dict(), {'results': results['results']})

        on_process_zero(finish, 'linear_eval')

    record = _run_or_skip(stage, build)
    report = workdir / EXPERIMENT_REPORT
    if config.experiment.baselines and report.exists():   # the last line a run shows
        log.info('experiment: the report is %s', report)
    return record


def _dataset_identity(spec: str, key: str) -> Any:
    """A downstream set's spec, with the identity of its CSV file when it is one."""
    parsed = evaluate.parse_dataset_spec(spec, key)
    return [spec, artifacts.file_identity(parsed.path)
            if parsed.kind == 'csv' and os.path.isfile(parsed.path) else None]


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


def on_process_zero(work: Callable[[], Any], what: str,
                     failure: type[Exception] = TrainingError) -> Any:
    """Runs `work` on process 0 only and returns its result there (None elsewhere); every
    process returns once it has finished, or raises if it failed (process 0 its own error, the
    others `failure`). N processes on one shared workdir thus write a stage's directory and
    record once, and none reads them half-written."""
    if jax.process_count() == 1:
        return work()
    import numpy as np
    from jax.experimental import multihost_utils

    result = error = None
    if jax.process_index() == 0:
        try:
            result = work()
        except Exception as e:   # the others must hear of it, not wait for the outcome
            error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise failure(f'{what}: process 0 failed (its log says why); stopping')
    return result


def _by_process_zero(stage: Callable[[ml_collections.ConfigDict, Path], Record | None]):
    """A stage that one process writes whole (the world, the posts store)."""
    @functools.wraps(stage)
    def run_once(config: ml_collections.ConfigDict, workdir: Path) -> Record | None:
        return on_process_zero(lambda: stage(config, workdir), stage.__name__)

    return run_once


STAGES: dict[str, Callable[[ml_collections.ConfigDict, Path], Record | None]] = {
    'demo_world': _by_process_zero(demo_world_stage),
    'ingest': _by_process_zero(ingest_stage),
    'embed': embed_stage,
    'cluster': cluster_stage,
    'train': train_stage,
    'export': export_stage,
    'baselines': baselines_stage,
    'linear_eval': linear_eval_stage,
}


def _outputs(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Path]:
    """Where each stage's output is, as the stages after it read it."""
    return {'demo_world': workdir / 'world', 'ingest': workdir / 'posts',
            'embed': workdir / 'embeddings', 'cluster': workdir / 'labels',
            'train': workdir / 'train',
            'export': Path(config.export.out or workdir / 'export' / 'vise'),
            'baselines': workdir / 'baselines', 'linear_eval': workdir / 'eval'}


def _is_finished(config: ml_collections.ConfigDict, workdir: Path, name: str) -> bool:
    out = _outputs(config, workdir)[name]
    if name == 'export':
        return (out / export.META_FILE).is_file()
    return (out / artifacts.STAGE_RECORD).is_file()


def _needs(config: ml_collections.ConfigDict, workdir: Path, name: str) -> list[str]:
    """The stages whose finished output stage `name` reads, in this config."""
    if name == 'ingest':
        return ['demo_world'] if config.demo.enabled else []
    if name == 'embed':
        return ['ingest']
    if name == 'cluster':
        return ['embed', 'ingest']
    if name == 'train':
        return ['cluster', 'ingest']
    if name == 'export':
        return [] if config.export.source else ['train']
    if name == 'baselines':
        names = specs.parse_names(config.experiment.baselines, 'config.experiment.baselines',
                                  (experiment.SUPERVISED, experiment.RANDOM))
        return ['ingest'] if experiment.SUPERVISED in names else []
    if name == 'linear_eval':
        exports = workdir / 'export'
        found = exports.is_dir() and any(exports.glob(f'*/{export.META_FILE}'))
        return [] if config.eval.exports.strip() or found else ['export']
    return []


def check_inputs(config: ml_collections.ConfigDict, workdir: Path, stages: Sequence[str],
                 command: Callable[[str], str] | None = None) -> None:
    """Raises, before anything is written, when a stage would start without its inputs.

    The message names the first unfinished stage of the chain, and how to start it (the
    `command` for a stage name, when given), instead of one stage upstream per attempt.
    A stage counts as ready when its output is finished or it runs earlier in `stages`.
    """
    def ready(name: str) -> bool:
        return name in stages or _is_finished(config, workdir, name)

    outputs = _outputs(config, workdir)

    def shown(name: str) -> str:
        path = outputs[name]
        return path.name if path.parent == workdir else str(path)

    for name in (name for name in STAGES if name in stages):
        levels, seen = [], set()
        frontier = [need for need in _needs(config, workdir, name) if not ready(need)]
        while frontier:
            levels.append(frontier)
            seen.update(frontier)
            frontier = list(dict.fromkeys(
                need for stage in frontier for need in _needs(config, workdir, stage)
                if need not in seen and not ready(need)))
        if not levels:
            continue
        missing = [stage for stage in STAGES if stage in seen]
        first = missing[0]
        text = f'{name} needs ' + ' and '.join(str(outputs[need]) for need in levels[0])
        for before, level in zip(levels, levels[1:], strict=False):
            verb = 'needs' if len(before) == 1 else 'need'
            text += f', which {verb} ' + ' and '.join(shown(need) for need in level)
        text += (', which is not finished' if len(missing) == 1 else
                 ': neither is finished' if len(missing) == 2 else
                 ': none of them is finished')
        start = command(first) if command else f'the {first} stage'
        raise InputError(f'{text}; start with {start}')


def lock_workdir(workdir: Path):
    """Process 0 takes the workdir's lock (returned there; None elsewhere).

    Taken once per run, not per process: the others never touch the lock file. When process 0
    fails (another run holds the workdir) every process raises at once, instead of waiting in
    the stages' first collective for a process that has gone.
    """
    from vise_jax import workdir_lock

    lock = on_process_zero(lambda: workdir_lock.acquire(workdir), f'{workdir}: locking it',
                            failure=workdir_lock.WorkdirBusy)
    workdir.mkdir(parents=True, exist_ok=True)
    return lock


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        stages: Sequence[str] = tuple(STAGES), *,
        command: Callable[[str], str] | None = None) -> dict[str, Record | None]:
    """Runs the named stages in pipeline order; returns each stage's record.

    '{workdir}' in the config's strings is expanded here, once: the library sees plain paths.
    Stages missing their inputs fail before anything is created (`check_inputs`; `command`
    turns a stage name into the command that runs it, for the message). The workdir is locked
    while the stages run (vise_jax/workdir_lock.py): a second run on it fails at once.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise InputError(f'unknown stages {sorted(unknown)}; known: {list(STAGES)}')
    workdir = Path(workdir)
    config = with_workdir(config, workdir)
    check_inputs(config, workdir, stages, command)
    lock = lock_workdir(workdir)
    try:
        return {name: STAGES[name](config, workdir) for name in STAGES if name in stages}
    finally:
        if lock is not None:
            lock.release()
