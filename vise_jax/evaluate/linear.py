"""linear_eval: every export x every task -> features, probe, scores, and the report.

  results = linear_eval(config, workdir)      # config.eval.*, outputs in {workdir}/eval

For each export (config.eval.exports, or every export directory under {workdir}/export), the
features of the train and test sets (config.eval.train / config.eval.test) are extracted, or
loaded from {out_dir}/features, and one probe per task (config.eval.tasks, or all) is fitted on
the usable train images and scored on the usable test images. Every process takes part in the
extraction and fits the same (deterministic) probes; process 0 writes results.json,
results.md and results.png.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from vise_jax import export as export_lib
from vise_jax import sharding, specs
from vise_jax.errors import InputError
from vise_jax.evaluate import datasets, features, probe, report

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
EXPORT_META = export_lib.META_FILE
META_KEYS = ('architecture', 'width', 'feature_dim', 'image_size', 'step', 'source', 'heads')


def resolve_exports(spec: str, workdir: str | os.PathLike) -> dict[str, Path]:
    """config.eval.exports ('name=DIR,...', a bare DIR is named after its folder) -> {name: dir};
    '' = every directory with an export.json under {workdir}/export."""
    if not spec.strip():
        root = Path(workdir) / 'export'
        found = sorted(p.parent for p in root.glob(f'*/{EXPORT_META}')) if root.is_dir() else []
        if not found:
            raise InputError(f'no exports under {root}: run the export stage first, or set '
                             "config.eval.exports='name=DIR,...'")
        return {path.name: path for path in found}
    exports = specs.parse_mapping(spec, 'config.eval.exports', convert=Path, what='DIR',
                                  bare_name=lambda entry: Path(entry).name)
    if not exports:
        raise InputError(f'config.eval.exports={spec!r} names no export')
    return exports


def linear_eval(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                exports: Mapping[str, str | os.PathLike] | None = None,
                out_dir: str | os.PathLike | None = None,
                mesh: Mesh | None = None) -> dict[str, Any]:
    """Probes every export on every task; writes the report into out_dir ({workdir}/eval).

    Returns the results (what results.json holds): 'exports', 'train', 'test', 'tasks',
    'probe' (the settings), 'features' ({export: {train, test}: sizes, unusable images,
    cache use}) and 'results' ({export: {task: ProbeResult.to_json()}}).
    """
    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir is not None else workdir / 'eval'
    ev = config.eval
    export_dirs = ({name: Path(p) for name, p in exports.items()} if exports is not None
                   else resolve_exports(ev.exports, workdir))
    if not export_dirs:
        raise InputError('linear_eval: no exports to evaluate')
    train = datasets.load_dataset(ev.train, 'config.eval.train')
    test = datasets.load_dataset(ev.test, 'config.eval.test')
    tasks = datasets.select_tasks(train, test, tuple(ev.tasks))
    test_labels = {task: datasets.labels_in_train_classes(train, test, task) for task in tasks}
    if mesh is None:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    cache_dir = out_dir / 'features'

    results: dict[str, Any] = {
        'version': RESULTS_VERSION,
        'exports': {}, 'features': {}, 'results': {},
        'train': _dataset_info(train), 'test': _dataset_info(test),
        'tasks': {task: _task_info(train, task) for task in tasks},
        'probe': {'inverse_regularization': list(ev.inverse_regularization),
                  'val_fraction': ev.val_fraction, 'max_iter': ev.max_iter,
                  'seed': config.seed},
    }
    for name, path in export_dirs.items():
        export = export_lib.load_export(path)
        start = time.perf_counter()
        train_features = features.extract_features(export, train.labelled, config, cache_dir,
                                                   mesh)
        test_features = features.extract_features(export, test.labelled, config, cache_dir,
                                                  mesh)
        seconds = time.perf_counter() - start
        results['exports'][name] = {
            'path': str(path), **{k: export.meta.get(k) for k in META_KEYS},
            'eval_image_size': features.eval_image_size(export, config),
            'feature_dim': train_features.feature_dim}
        results['features'][name] = {
            'train': _features_info(train_features), 'test': _features_info(test_features),
            'seconds': round(seconds, 2)}
        results['train']['bad_images'] = train_features.bad_images
        results['test']['bad_images'] = test_features.bad_images
        results['results'][name] = {}
        for task in tasks:
            outcome = _probe_task(train_features, test_features, test_labels[task],
                                  train.labelled.tasks[task], config)
            results['results'][name][task] = outcome.to_json()
            log.info('linear_eval: %s on %s: %s (C=%g)', name, task,
                     ', '.join(f'{m} {100 * v:.1f}' for m, v in outcome.metrics.items()),
                     outcome.c)
    if jax.process_index() == 0:
        paths = report.write_report(results, out_dir)
        log.info('linear_eval: report in %s', paths['markdown'])
    return results


def _probe_task(train_features: features.Features, test_features: features.Features,
                test_labels, task: Any, config: ml_collections.ConfigDict) -> probe.ProbeResult:
    train_rows = train_features.usable
    test_rows = test_features.usable
    try:
        return probe.fit_probe(
            train_features.pooled[train_rows], train_features.labels[task.name][train_rows],
            test_features.pooled[test_rows], test_labels[test_rows], task.type,
            cs=tuple(config.eval.inverse_regularization), val_fraction=config.eval.val_fraction,
            max_iter=config.eval.max_iter, seed=config.seed, class_names=task.classes)
    except InputError as e:
        raise InputError(f'task {task.name!r} ({train_features.description}): {e}') from e


def _dataset_info(dataset: datasets.DownstreamSet) -> dict[str, Any]:
    return {'spec': dataset.spec, 'description': dataset.description,
            'num_examples': len(dataset), 'bad_images': {}}


def _task_info(train: datasets.DownstreamSet, task: str) -> dict[str, Any]:
    spec = train.labelled.tasks[task]
    return {'type': spec.type, 'kind': train.kinds.get(task), 'classes': list(spec.classes),
            'metrics': list(probe.METRICS[spec.type])}


def _features_info(found: features.Features) -> dict[str, Any]:
    return {'num_examples': found.num_examples, 'usable': int(found.usable.sum()),
            'bad_images': found.bad_images, 'cached': found.cached,
            'fingerprint': found.fingerprint}
