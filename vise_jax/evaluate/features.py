"""Features of a downstream set under an exported backbone: batched, sharded, cached on disk.

`extract_features(export, labelled, config, cache_dir)` runs the export's ResNet (train=False,
BatchNorm running statistics) over every image of the set, in the input pipeline's eval order
(shorter side to size / input.eval_crop_fraction, centre crop), at the export's image size
unless config.eval.image_size says otherwise. Images are normalised on the device with the
export's mean and std. Rows are split over every device of the mesh; the outputs come back
replicated, so every process holds all N rows. Padding rows of the last batch are dropped by
their index.

Unusable images (truncated, missing, ...) keep their row (the feature of a black image) but are
marked `usable=False`, counted per reason in `bad_images`, logged, and left out of the probes;
more than input.max_bad_image_fraction of them fails the extraction (inputs.BadImageTally).

The cache: `{cache_dir}/features-<key>.npz`, written atomically, where the key is a fingerprint
of the export (its metadata and a hash of its variables' bytes), of the set (description,
size, every image's identity: path, size and modification time for files) and of the
preprocessing (image size, crop fraction, normalisation, spatial). A rerun with the same export
and set loads the file instead of running the model; a changed export or set misses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from vise_jax import artifacts, sharding
from vise_jax import export as export_lib
from vise_jax import inputs as input_lib
from vise_jax.errors import InputError
from vise_jax.inputs.bad_images import BAD_IMAGE_REASONS, OK
from vise_jax.inputs.sources import FileImages
from vise_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
MIN_IMAGE_SIZE = 32      # a ResNet downsamples by 32: smaller inputs leave no spatial map
BATCH_KEYS = ('image', 'index', 'weight', 'bad_image')


class ExportLike(Protocol):
    """What extraction needs of an export (vise_jax.export.Export)."""

    path: Any
    variables: Mapping[str, Any]    # {'params', 'batch_stats'} of the ResNet trunk
    meta: Mapping[str, Any]         # export.json: architecture, width, feature_dim, image_size,
                                    # mean, std, ...

    def model(self) -> Any: ...


@dataclasses.dataclass
class Features:
    """Features of every example of a set, in its order."""

    pooled: np.ndarray                 # float32 [N, D]
    labels: dict[str, np.ndarray]      # task -> int32 [N] (multi-label: multi-hot [N, C])
    usable: np.ndarray                 # bool [N]: False where the image could not be used
    bad_images: dict[str, int]         # unusable images per reason (only reasons that occur)
    spatial: np.ndarray | None = None  # float16 [N, h, w, D]: the last stage's map
    fingerprint: str = ''              # the cache key
    cached: bool = False               # loaded from the cache rather than computed
    description: str = ''

    @property
    def num_examples(self) -> int:
        return len(self.pooled)

    @property
    def feature_dim(self) -> int:
        return self.pooled.shape[1]

    @property
    def num_bad(self) -> int:
        return int(sum(self.bad_images.values()))


# --- fingerprints --------------------------------------------------------------------------


def export_fingerprint(export: ExportLike) -> str:
    meta = {k: v for k, v in dict(export.meta).items() if k not in export_lib.VOLATILE_FIELDS}
    return artifacts.fingerprint({'meta': meta,
                                  'variables': export_lib.variables_sha256(export.variables)})


def images_digest(labelled: input_lib.LabelledImages) -> str:
    """A hash of every image's identity: a file's path, size and mtime; inline bytes' hash;
    otherwise the reader's description of the index (e.g. a TFDS split and position)."""
    digest = hashlib.blake2b(digest_size=16)
    reader = labelled.images
    if isinstance(reader, FileImages):
        for entry in reader.entries:
            if isinstance(entry, bytes):
                digest.update(hashlib.blake2b(entry, digest_size=16).digest())
                continue
            try:
                stat = os.stat(entry)
                identity = f'{entry}|{stat.st_size}|{stat.st_mtime_ns}'
            except OSError:
                identity = f'{entry}|missing'
            digest.update(identity.encode('utf-8', 'surrogatepass') + b'\n')
    else:
        for index in range(len(reader)):
            digest.update(reader.describe(index).encode('utf-8', 'surrogatepass') + b'\n')
    return digest.hexdigest()


def dataset_fingerprint(labelled: input_lib.LabelledImages, image_size: int,
                        input_config: ml_collections.ConfigDict) -> str:
    return artifacts.fingerprint({
        'description': labelled.description, 'num_examples': len(labelled),
        'images': images_digest(labelled), 'image_size': image_size,
        'crop_fraction': input_config.eval_crop_fraction,
        'max_image_pixels': input_config.max_image_pixels,
    })


# --- the export's model --------------------------------------------------------------------


def eval_image_size(export: ExportLike, config: ml_collections.ConfigDict) -> int:
    """config.eval.image_size, or the export's training image size when that is 0."""
    size = config.eval.image_size or export.meta.get('image_size')
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_IMAGE_SIZE:
        source = ('config.eval.image_size' if config.eval.image_size
                  else f'{export.path}: export.json image_size')
        raise InputError(f'{source}={size!r} does not fit a ResNet: use an integer >= '
                         f'{MIN_IMAGE_SIZE} (the network downsamples by 32)')
    return int(size)


def normalisation(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) so that uint8 * scale + offset = (pixel / 255 - mean) / std."""
    mean = np.asarray(meta.get('mean', IMAGENET_MEAN), np.float32)
    std = np.asarray(meta.get('std', IMAGENET_STD), np.float32)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
        raise InputError(f'export mean/std must be 3 numbers each (std > 0), got {mean}, {std}')
    return 1.0 / (255.0 * std), -mean / std


def check_export(export: ExportLike, model: Any, image_size: int) -> int:
    """The feature dimension, after checking the variables and metadata fit the model."""
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    expected = jax.eval_shape(functools.partial(model.init, train=False),
                              jax.random.key(0), dummy)
    got = _shapes(export.variables)
    want = _shapes(expected)
    if got != want:
        differ = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise InputError(f'{export.path}: the variables do not fit a '
                         f'{export.meta.get("architecture")} of width '
                         f'{export.meta.get("width")} (export.json and variables/ disagree), '
                         f'e.g. {[(k, got.get(k), want.get(k)) for k in differ[:3]]} '
                         '(path, found, expected)')
    pooled = jax.eval_shape(functools.partial(model.apply, train=False), expected, dummy)
    feature_dim = int(pooled.shape[-1])
    meta_dim = export.meta.get('feature_dim')
    if meta_dim is not None and int(meta_dim) != feature_dim:
        raise InputError(f'{export.path}: export.json says feature_dim={meta_dim} but the '
                         f'model gives {feature_dim}-d features')
    return feature_dim


def _shapes(tree: Any, prefix: str = '') -> dict[str, tuple[int, ...]]:
    if isinstance(tree, Mapping):
        return {k: v for name, sub in tree.items()
                for k, v in _shapes(sub, f'{prefix}/{name}').items()}
    return {prefix: tuple(np.shape(tree))}


def make_forward(model: Any, variables: Mapping[str, Any], mesh: Mesh, *,
                 scale: np.ndarray, offset: np.ndarray,
                 spatial: bool) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]]:
    """A global batch -> {pooled, [spatial], index, weight, bad_image}, all replicated (every
    process gets every row); the variables are placed on the mesh once. The jitted function
    is shared by every export of the same architecture (one compilation)."""
    variables = jax.device_put(dict(variables), sharding.replicated(mesh))
    forward = _jitted_forward(model, mesh, tuple(np.asarray(scale, np.float32).tolist()),
                              tuple(np.asarray(offset, np.float32).tolist()), bool(spatial))
    return lambda batch: forward(variables, batch)


@functools.lru_cache(maxsize=8)
def _jitted_forward(model: Any, mesh: Mesh, scale: tuple[float, ...], offset: tuple[float, ...],
                    spatial: bool) -> Callable:
    scale_array = np.asarray(scale, np.float32)
    offset_array = np.asarray(offset, np.float32)

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def forward(variables, batch):
        images = batch['image'].astype(jnp.float32) * scale_array + offset_array
        out = model.apply(variables, images, train=False, return_spatial=spatial)
        pooled, spatial_map = out if spatial else (out, None)
        result = {key: batch[key] for key in ('index', 'weight', 'bad_image')}
        result['pooled'] = pooled.astype(jnp.float32)
        if spatial:
            result['spatial'] = spatial_map.astype(jnp.float16)
        return result

    return forward


# --- extraction ----------------------------------------------------------------------------


def extraction_batch_size(batch_size: int, mesh: Mesh) -> int:
    """config.eval.batch_size rounded up to split evenly over processes and row shards."""
    if batch_size < 1:
        raise InputError(f'config.eval.batch_size must be positive, got {batch_size}')
    unit = math.lcm(sharding.num_row_shards(mesh), jax.process_count())
    return -(-batch_size // unit) * unit


def extract_features(export: ExportLike, labelled: input_lib.LabelledImages,
                     config: ml_collections.ConfigDict, cache_dir: str | os.PathLike | None,
                     mesh: Mesh | None = None) -> Features:
    """Pooled (and with config.eval.spatial, spatial) features of every image of `labelled`.

    cache_dir=None disables the cache. Every process must call this (the forward pass is
    collective); each returns all rows.
    """
    if not len(labelled) or not labelled.tasks:
        raise InputError(f'{labelled.description}: no examples or no tasks to extract for')
    if mesh is None:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    spatial = bool(config.eval.spatial)
    image_size = eval_image_size(export, config)
    scale, offset = normalisation(export.meta)
    model = export.model()
    feature_dim = check_export(export, model, image_size)
    key = artifacts.fingerprint({
        'version': FEATURES_VERSION, 'export': export_fingerprint(export),
        'dataset': dataset_fingerprint(labelled, image_size, config.input),
        'scale': scale.tolist(), 'offset': offset.tolist(), 'spatial': spatial})
    cache_path = Path(cache_dir) / f'features-{key}.npz' if cache_dir is not None else None
    labels = {task: np.asarray(values) for task, values in labelled.labels.items()}

    cached = _load_cache(cache_path, key, len(labelled), feature_dim, spatial)
    # Every process must take the same branch: the forward pass is collective.
    if bool(sharding.gather_over_processes(np.array(cached is not None)).all()):
        log.info('features of %s: loaded %s', labelled.description, cache_path)
        return _features(*cached, labels, key, True, labelled.description)

    input_config = config.copy_and_resolve_references()
    input_config.input.image_size = image_size
    batch_size = extraction_batch_size(config.eval.batch_size, mesh)
    data = input_lib.downstream_data(labelled, next(iter(labelled.tasks)), input_config,
                                     training=False, global_batch_size=batch_size)
    forward = make_forward(model, export.variables, mesh, scale=scale, offset=offset,
                           spatial=spatial)
    pooled, codes, spatial_map = _run(forward, data, mesh, config, len(labelled), feature_dim,
                                      spatial, f'features {Path(str(export.path)).name} '
                                      f'{Path(labelled.description).name}')
    if cache_path is not None:
        _save_cache(cache_path, key, pooled, codes, spatial_map)
    return _features(pooled, codes, spatial_map, labels, key, False, labelled.description)


def _run(forward, data: input_lib.DownstreamData, mesh: Mesh, config: ml_collections.ConfigDict,
         num_examples: int, feature_dim: int, spatial: bool,
         desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    pooled = np.zeros((num_examples, feature_dim), np.float32)
    codes = np.zeros(num_examples, np.int32)
    seen = np.zeros(num_examples, bool)
    spatial_map = None
    tally = input_lib.BadImageTally.from_config(config)

    def collect(out: dict[str, jax.Array]) -> None:
        nonlocal spatial_map
        host = {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}
        rows = host['index'] >= 0
        index = host['index'][rows]
        tally.update(host['bad_image'], host['weight'], host['index'])
        pooled[index] = host['pooled'][rows]
        codes[index] = host['bad_image'][rows]
        seen[index] = True
        if spatial:
            if spatial_map is None:
                spatial_map = np.zeros((num_examples, *host['spatial'].shape[1:]), np.float16)
            spatial_map[index] = host['spatial'][rows]

    iterator = data.iterator()
    pending = None
    try:
        for _ in tqdm(range(data.steps_per_epoch), desc=desc, unit='batch', leave=False,
                      disable=jax.process_index() != 0):
            local = next(iterator)
            out = forward(input_lib.global_batch({k: local[k] for k in BATCH_KEYS}, mesh))
            if pending is not None:  # read one step late: the host prepares the next batch
                collect(pending)     # while the device computes
            pending = out
        if pending is not None:
            collect(pending)
    finally:
        iterator.close()
    if not seen.all():  # the eval pass covers every example once; anything else is a bug
        raise RuntimeError(f'feature extraction missed {int((~seen).sum())} examples')
    return pooled, codes, spatial_map


def _features(pooled: np.ndarray, codes: np.ndarray, spatial_map: np.ndarray | None,
              labels: dict[str, np.ndarray], key: str, cached: bool,
              description: str) -> Features:
    counts = np.bincount(codes, minlength=len(BAD_IMAGE_REASONS))
    bad = {BAD_IMAGE_REASONS[i]: int(n) for i, n in enumerate(counts) if i != OK and n}
    if bad:
        log.warning('%s: %d of %d images are unusable (%s); they are left out of the probes',
                    description, sum(bad.values()), len(codes), bad)
    return Features(pooled, labels, codes == OK, bad, spatial_map, key, cached, description)


def _load_cache(path: Path | None, key: str, num_examples: int, feature_dim: int,
                spatial: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path) as saved:
            if str(saved['fingerprint']) != key:
                return None
            pooled, codes = saved['pooled'], saved['bad_image']
            spatial_map = saved['spatial'] if spatial else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        log.warning('features cache %s is unreadable (%s); recomputing', path, e)
        return None
    if pooled.shape != (num_examples, feature_dim) or codes.shape != (num_examples,):
        log.warning('features cache %s has shape %s, expected (%d, %d); recomputing', path,
                    pooled.shape, num_examples, feature_dim)
        return None
    return pooled, codes, spatial_map


def _save_cache(path: Path, key: str, pooled: np.ndarray, codes: np.ndarray,
                spatial_map: np.ndarray | None) -> None:
    arrays = {'fingerprint': np.array(key), 'pooled': pooled, 'bad_image': codes,
              'meta': np.array(json.dumps({'version': FEATURES_VERSION}))}
    if spatial_map is not None:
        arrays['spatial'] = spatial_map
    with artifacts.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, **arrays)  # to the open file: np.savez would add '.npz' to a name
