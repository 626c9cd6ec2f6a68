"""Linear evaluation: the probe, feature extraction from an export, and linear_eval end to end."""

import dataclasses
import io
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from vise_jax import configlib, sharding
from vise_jax import export as export_lib
from vise_jax import inputs as input_lib
from vise_jax.errors import InputError
from vise_jax.evaluate import datasets, features, linear, probe
from vise_jax.models import normalize_images

MOODS = ['calm', 'happy', 'sad']
TAGS = ['a', 'b', 'c']
IMAGE_SIZE = 32
WIDTH = 8


# --- the probe on synthetic features -------------------------------------------------------


def blobs(sizes, dim=16, separation=3.0, seed=0):
    """Gaussian blobs, one per class with `sizes[k]` points; (x, y), rows shuffled."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(sizes), dim)) * separation
    y = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    rng.shuffle(y)
    return (means[y] + rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_probe_separates_separable_classes():
    x, y = blobs([150] * 4)
    result = probe.fit_probe(x[:400], y[:400], x[400:], y[400:], 'single_label',
                             cs=(0.01, 1.0), val_fraction=0.2)
    assert result.metrics['top1'] > 0.95 and result.metrics['macro_f1'] > 0.95
    assert (result.num_train, result.num_val, result.num_test) == (400, 80, 200)
    assert result.converged and result.val_score == result.val_scores[result.c]


def test_probe_on_random_labels_stays_at_chance():
    rng = np.random.default_rng(1)
    classes, n_train, n_test = 5, 600, 2000
    x = rng.normal(size=(n_train + n_test, 20)).astype(np.float32)
    y = rng.integers(0, classes, n_train + n_test)
    result = probe.fit_probe(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                             'single_label', cs=(0.1, 1.0), val_fraction=0.2)
    # Predictions are independent of the test labels: correct ~ Binomial(n_test, ~1/classes).
    chance = 1 / classes
    tolerance = 4 * math.sqrt(chance * (1 - chance) / n_test) + 0.01
    assert abs(result.metrics['top1'] - chance) < tolerance, result.metrics


def test_probe_chooses_c_where_one_end_of_the_grid_is_wrong():
    # Imbalanced (80/10/10) separable classes: a tiny C shrinks the weights until the
    # intercept predicts the majority class (0.8); a moderate C separates them.
    x, y = blobs([240, 30, 30], seed=2)
    result = probe.fit_probe(x, y, x, y, 'single_label', cs=(1e-6, 1.0, 1e-5),
                             val_fraction=0.25)
    assert result.c == 1.0
    assert result.val_scores[1e-6] < 0.85 < 0.95 < result.val_scores[1.0]
    assert list(result.val_scores) == [1e-6, 1e-5, 1.0]


def test_multi_label_metrics_match_sklearn_on_a_hand_made_case():
    y_true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    scores = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.4], [0.6, 0.4, 0.1],
                       [0.2, 0.1, 0.8], [0.4, 0.3, 0.7], [0.1, 0.9, 0.3]])
    got = probe.multi_label_metrics(y_true, scores)
    predicted = (scores >= 0.5).astype(int)
    assert got['mAP'] == pytest.approx(average_precision_score(y_true, scores, average='macro'))
    assert got['micro_f1'] == pytest.approx(f1_score(y_true, predicted, average='micro'))
    assert got['macro_f1'] == pytest.approx(f1_score(y_true, predicted, average='macro'))
    # By hand: class 0 ranks 0.9 (+), 0.6 (+), 0.4 (+): AP 1; predictions miss row 4 there.
    assert average_precision_score(y_true[:, 0], scores[:, 0]) == 1.0
    # A class without a positive is left out of mAP rather than scored 0.
    empty = np.concatenate([y_true, np.zeros((6, 1), int)], axis=1)
    padded = np.concatenate([scores, np.full((6, 1), 0.2)], axis=1)
    assert probe.multi_label_metrics(empty, padded)['mAP'] == pytest.approx(got['mAP'])


def test_multi_label_probe_learns_separable_tags():
    rng = np.random.default_rng(3)
    y = (rng.random((400, 3)) < 0.4).astype(np.int32)
    x = (y @ rng.normal(size=(3, 12)) * 3 + rng.normal(size=(400, 12))).astype(np.float32)
    result = probe.fit_probe(x[:300], y[:300], x[300:], y[300:], 'multi_label',
                             cs=(0.1, 1.0), val_fraction=0.2)
    assert set(result.metrics) == {'mAP', 'micro_f1', 'macro_f1'}
    assert result.metrics['mAP'] > 0.95 and result.val_metric == 'mAP'


def test_probe_refuses_a_class_too_small_for_the_validation_split():
    x, y = blobs([20, 20, 1])
    with pytest.raises(InputError, match="classes 'sad' have a single train example"):
        probe.fit_probe(x, y, x, y, 'single_label', cs=(0.1, 1.0), class_names=MOODS)
    # One C needs no validation split.
    assert probe.fit_probe(x, y, x, y, 'single_label', cs=(1.0,)).val_score is None


# --- a tiny downstream set and tiny exports ------------------------------------------------


def png_bytes(color, noise_seed, size=40):
    rng = np.random.default_rng(noise_seed)
    pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='PNG')
    return buffer.getvalue()


def write_split(root, name, num_rows, offset=0, corrupt_rows=()):
    """{name}.csv (image,mood,tags): mood colours the image, so a probe can learn it."""
    lines = ['image,mood,tags']
    for row in range(num_rows):
        mood = row % 3
        path = root / 'images' / f'{name}{row}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = [(200, 60, 60), (60, 200, 60), (60, 60, 200)][mood]
        data = b'not a png' if row in corrupt_rows else png_bytes(colour, offset + row)
        path.write_bytes(data)
        tags = '|'.join(t for i, t in enumerate(TAGS) if (row + i) % 2 == 0 or i == mood)
        lines.append(f'images/{name}{row}.png,{MOODS[mood]},{tags}')
    (root / f'{name}.csv').write_text('\n'.join(lines) + '\n')
    return root / f'{name}.csv'


def write_downstream(root, num_train=30, num_test=12, corrupt_test_rows=()):
    root.mkdir(parents=True, exist_ok=True)
    (root / 'tasks.json').write_text(json.dumps({
        'mood': {'type': 'single_label', 'classes': MOODS, 'kind': 'subjective'},
        'tags': {'type': 'multi_label', 'classes': TAGS}}))
    write_split(root, 'train', num_train)
    write_split(root, 'test', num_test, offset=1000, corrupt_rows=corrupt_test_rows)
    return root


def make_export(directory, seed=0):
    """A randomly initialised ResNet-18 of width 8 at 32 px, written and loaded back."""
    export_lib.random_export('resnet18', WIDTH, IMAGE_SIZE, seed, directory, overwrite=True)
    return export_lib.load_export(directory)


def eval_config(**overrides):
    config = configlib.default_config()
    config.input.update(dict(num_workers=0, global_batch_size=8))
    config.eval.update(dict(batch_size=8, inverse_regularization=(0.1, 1.0)))
    config.eval.update(overrides)
    return config


# --- feature extraction --------------------------------------------------------------------


def direct_features(export, labelled, config):
    """model.apply on the images the eval pipeline gives, in set order (no padding)."""
    config = config.copy_and_resolve_references()
    config.input.image_size = IMAGE_SIZE
    data = input_lib.downstream_data(labelled, 'mood', config, global_batch_size=8)
    images = np.zeros((len(labelled), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    iterator = data.iterator()
    for batch in iterator:
        rows = batch['index'] >= 0
        images[batch['index'][rows]] = batch['image'][rows]
    iterator.close()
    apply = jax.jit(export.model().apply, static_argnames='train')
    return np.asarray(apply(export.variables, normalize_images(images), train=False))


def test_features_equal_a_direct_forward_pass_and_are_cached(tmp_path, monkeypatch):
    root = write_downstream(tmp_path / 'set', num_train=13)
    labelled = input_lib.csv_manifest(root / 'train.csv')
    export = make_export(tmp_path / 'export_a', seed=0)
    # Running statistics other than (0, 1), so eval-mode BatchNorm is exercised.
    rng = np.random.default_rng(0)
    export.variables['batch_stats'] = jax.tree_util.tree_map_with_path(
        lambda path, v: (v * rng.uniform(0.5, 1.5, v.shape) if path[-1].key == 'var'
                         else v + rng.normal(0, 0.1, v.shape)).astype(np.float32),
        export.variables['batch_stats'])
    config = eval_config()
    mesh = sharding.make_mesh()
    calls = []
    real_make_forward = features.make_forward
    monkeypatch.setattr(features, 'make_forward',
                        lambda *a, **k: calls.append(1) or real_make_forward(*a, **k))

    first = features.extract_features(export, labelled, config, tmp_path / 'cache', mesh)
    assert len(calls) == 1 and not first.cached
    assert first.pooled.shape == (13, 8 * WIDTH) and first.pooled.dtype == np.float32
    # 13 rows in batches of 8: the 3 padding rows are dropped, every example is in its place.
    np.testing.assert_allclose(first.pooled, direct_features(export, labelled, config),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(first.labels['mood'], labelled.labels['mood'])
    assert first.usable.all() and first.bad_images == {} and first.spatial is None

    second = features.extract_features(export, labelled, config, tmp_path / 'cache', mesh)
    assert len(calls) == 1 and second.cached and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.pooled, first.pooled)

    # The export rewritten with other weights misses the cache and runs the model.
    other = make_export(tmp_path / 'export_a', seed=5)
    third = features.extract_features(other, labelled, config, tmp_path / 'cache', mesh)
    assert len(calls) == 2 and not third.cached
    assert not np.allclose(third.pooled, first.pooled)

    # Spatial maps: at 32 px the last stage is 1 x 1, so it is the pooled feature (float16).
    spatial = features.extract_features(export, labelled, eval_config(spatial=True),
                                        tmp_path / 'cache', mesh)
    assert len(calls) == 3 and spatial.spatial.shape == (13, 1, 1, 8 * WIDTH)
    np.testing.assert_allclose(spatial.spatial[:, 0, 0].astype(np.float32), first.pooled,
                               rtol=1e-2, atol=1e-2)


def test_extraction_refuses_exports_that_do_not_fit(tmp_path):
    labelled = input_lib.csv_manifest(write_downstream(tmp_path / 'set') / 'train.csv')
    config = eval_config()
    export = make_export(tmp_path / 'export')
    wrong_dim = dataclasses.replace(export, meta={**export.meta, 'feature_dim': 512})
    with pytest.raises(InputError, match='feature_dim=512 but the model gives 64-d'):
        features.extract_features(wrong_dim, labelled, config, None)
    wrong_width = dataclasses.replace(export, meta={**export.meta, 'width': 16})
    with pytest.raises(InputError, match='variables do not fit a resnet18 of width 16'):
        features.extract_features(wrong_width, labelled, config, None)
    too_small = dataclasses.replace(export, meta={**export.meta, 'image_size': 16})
    with pytest.raises(InputError, match='image_size=16 does not fit'):
        features.extract_features(too_small, labelled, config, None)
    with pytest.raises(InputError, match='config.eval.image_size=8 does not fit'):
        features.extract_features(export, labelled, eval_config(image_size=8), None)


# --- datasets and exports by name ----------------------------------------------------------


def test_dataset_specs_and_tasks_give_clear_errors(tmp_path):
    root = write_downstream(tmp_path / 'set')
    train = datasets.load_dataset(f'csv:{tmp_path}/set/train.csv')
    assert train.kinds == {'mood': 'subjective'} and len(train) == 30
    with pytest.raises(InputError, match='unknown dataset spec'):
        datasets.load_dataset('parquet:x')
    with pytest.raises(InputError, match='is empty'):
        datasets.load_dataset('', 'config.eval.test')
    with pytest.raises(InputError, match='downstream CSV not found'):
        datasets.load_dataset(f'csv:{tmp_path}/nope.csv')
    with pytest.raises(InputError, match='image folder not found'):
        datasets.load_dataset(f'folder:{tmp_path}/nope')

    (root / 'other').mkdir()
    (root / 'other' / 'tasks.json').write_text(json.dumps(
        {'mood': {'type': 'single_label', 'classes': ['happy', 'calm', 'sad']}}))
    lines = (root / 'test.csv').read_text().splitlines()
    (root / 'other' / 'test.csv').write_text('\n'.join(
        ['image,mood'] + [f'../{line.split(",")[0]},{line.split(",")[1]}'
                          for line in lines[1:]]) + '\n')
    test = datasets.load_dataset(f'csv:{root}/other/test.csv')
    with pytest.raises(InputError, match="task 'tags' of the train set is missing in the test"):
        datasets.select_tasks(train, test)
    assert datasets.select_tasks(train, test, ('mood',)) == ['mood']
    # Test labels are mapped onto the train set's class order by name.
    original = datasets.load_dataset(f'csv:{root}/test.csv')
    np.testing.assert_array_equal(datasets.labels_in_train_classes(train, test, 'mood'),
                                  original.labelled.labels['mood'])


def test_exports_by_config_string_or_found_in_the_workdir(tmp_path):
    assert linear.resolve_exports(f'a={tmp_path}/x, /data/y', tmp_path) == {
        'a': tmp_path / 'x', 'y': Path('/data/y')}
    with pytest.raises(InputError, match='no exports under'):
        linear.resolve_exports('', tmp_path)
    for name in ('vise', 'random'):
        (tmp_path / 'export' / name).mkdir(parents=True)
        (tmp_path / 'export' / name / 'export.json').write_text('{}')
    (tmp_path / 'export' / 'not_an_export').mkdir()
    assert list(linear.resolve_exports('', tmp_path)) == ['random', 'vise']
    with pytest.raises(InputError, match='twice'):
        linear.resolve_exports('a=x,a=y', tmp_path)


# --- end to end ----------------------------------------------------------------------------


def test_linear_eval_writes_table_json_and_chart(tmp_path):
    write_downstream(tmp_path / 'world', corrupt_test_rows=(5,))
    make_export(tmp_path / 'export' / 'vise', seed=0)
    make_export(tmp_path / 'export' / 'random', seed=1)
    config = eval_config(train='csv:{workdir}/world/train.csv',
                         test='csv:{workdir}/world/test.csv')
    with pytest.raises(InputError, match=r"world/train.csv \(expand '\{workdir\}' first"):
        linear.linear_eval(config, tmp_path)

    config = configlib.with_workdir(config, tmp_path)
    results = linear.linear_eval(config, tmp_path)

    out = tmp_path / 'eval'
    saved = json.loads((out / 'results.json').read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved['results']) == ['random', 'vise']
    assert list(saved['tasks']) == ['mood', 'tags']
    assert saved['tasks']['mood']['kind'] == 'subjective' and saved['tasks']['tags']['kind'] is None
    for name in ('random', 'vise'):
        mood, tags = saved['results'][name]['mood'], saved['results'][name]['tags']
        assert set(mood['metrics']) == {'top1', 'macro_f1'}
        assert set(tags['metrics']) == {'mAP', 'micro_f1', 'macro_f1'}
        assert mood['c'] in (0.1, 1.0) and mood['num_test'] == 11  # one corrupt test image
    assert saved['test']['bad_images'] == {'not_an_image': 1}
    assert saved['exports']['vise']['feature_dim'] == 8 * WIDTH
    # The colours make mood easy even for random features.
    assert saved['results']['vise']['mood']['metrics']['top1'] > 0.6

    table = (out / 'results.md').read_text().splitlines()
    header = next(line for line in table if line.startswith('| export |'))
    assert header == ('| export | mood (subjective) top-1 | mood (subjective) macro-F1 | '
                      'tags mAP | tags micro-F1 | tags macro-F1 |')
    rows = [line for line in table if line.startswith(('| random |', '| vise |'))]
    assert len(rows) == 4 and rows[0].count('|') == 7  # metrics table, then chosen C table
    assert 'not_an_image 1' in (out / 'results.md').read_text()
    assert (out / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # A rerun loads every feature from the cache.
    again = linear.linear_eval(config, tmp_path)
    assert all(f[split]['cached'] for f in again['features'].values()
               for split in ('train', 'test'))
    assert again['results'] == results['results']
