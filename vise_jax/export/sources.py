"""Where an export's weights come from: a training checkpoint, torchvision or published VisE
weights, or a fresh initialisation (the random baseline); `load_backbone` reads any of them.

A training checkpoint is read through vise_jax.train.checkpointing (the one module that knows its
Orbax layout): only the trunk's params and batch statistics, by this process alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.export.format import (
    DEFAULT_IMAGE_SIZE,
    META_FILE,
    Variables,
    export_meta,
    load_export,
    numpy_variables,
    read_export_meta,
    write_export,
)
from vise_jax.interop import files as weight_files
from vise_jax.interop import torchvision as tv
from vise_jax.models import create_resnet
from vise_jax.train import checkpointing

log = logging.getLogger(__name__)


def load_backbone(path: str | os.PathLike, *,
                  image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Variables, dict[str, Any]]:
    """Backbone variables and export-style metadata from an export directory, a training
    checkpoint directory, or a torchvision / VisE nn.Sequential state_dict file (.safetensors;
    .pth needs torch). The architecture of a weights file is read from its keys and shapes;
    `image_size` is recorded for weights files, which do not say."""
    if '://' not in str(path):
        local = Path(path)
        if local.is_file() or weight_files.is_weights_file(local):
            state_dict = weight_files.read_state_dict(local)
            return import_state_dict(state_dict, source_path=str(local.absolute()),
                                     image_size=image_size)
        if (local / META_FILE).is_file():
            loaded = load_export(local)
            return loaded.variables, loaded.meta
    if checkpointing.is_checkpoint_dir(path) or checkpointing.is_checkpoint_dir(
            checkpointing.checkpoint_path(path) / 'checkpoints'):
        checkpoint = read_checkpoint(path)
        return checkpoint.variables, checkpoint.meta
    raise InputError(f'{path}: not an export directory, a training checkpoint directory, or a '
                     f'weights file ({", ".join(weight_files.WEIGHT_SUFFIXES)})'
                     + ('' if checkpointing.checkpoint_path(path).exists()
                        else ' (it does not exist)'))


def import_state_dict(state_dict: Mapping[str, Any], *, source_path: str = '',
                      image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Variables, dict[str, Any]]:
    """A torchvision or VisE nn.Sequential state_dict -> (variables, export metadata)."""
    kind = tv.state_dict_layout(state_dict)
    architecture, width = tv.infer_architecture(state_dict)
    try:
        variables = tv.torchvision_to_flax(state_dict, architecture, width=width)
    except InputError as error:
        raise InputError(f'{source_path or "state_dict"}: {error}') from None
    fc = tv.torchvision_fc(state_dict)
    extra = {'fc_classes': int(fc['bias'].shape[0])} if fc is not None else {}
    meta = export_meta(variables, image_size=image_size, source_kind=kind,
                       source_path=source_path, **extra)
    return variables, meta


# ------------------------------------------------------------------------------ checkpoints


@dataclasses.dataclass
class CheckpointBackbone:
    """The backbone of one step of a training run's checkpoints."""

    directory: str
    step: int
    variables: Variables
    heads: dict[str, int]
    run_meta: dict[str, Any]   # the checkpoint's own meta item
    meta: dict[str, Any]       # export metadata


def read_checkpoint(checkpoint_dir: str | os.PathLike,
                    step: int | None = None) -> CheckpointBackbone:
    """The backbone's parameters and batch statistics of one step (default: the latest) of a
    training run's Orbax checkpoints (a run, checkpoint or step directory), as float32 numpy
    arrays, with export metadata; the optimizer state is not read."""
    saved = checkpointing.read_backbone(checkpoint_dir, step)
    where = f'{saved.directory}/{saved.step}'
    variables = numpy_variables(saved.variables)
    meta = export_meta(
        variables, image_size=_run_image_size(saved.meta, where), source_kind='checkpoint',
        source_path=str(saved.directory), heads=saved.heads, step=saved.step,
        config_hash=_config_hash(saved.meta))
    _check_run_meta(saved.meta, meta, saved.heads, where)
    return CheckpointBackbone(str(saved.directory), saved.step, variables, saved.heads,
                              saved.meta, meta)


def _config_hash(run_meta: Mapping[str, Any]) -> str | None:
    """The run's own config hash if it recorded one, else a fingerprint of its config."""
    if run_meta.get('config_hash'):
        return str(run_meta['config_hash'])
    return artifacts.fingerprint(run_meta['config']) if run_meta.get('config') else None


def _run_image_size(run_meta: Mapping[str, Any], where: str) -> int:
    size = run_meta.get('image_size')
    if size is None:
        size = ((run_meta.get('config') or {}).get('input') or {}).get('image_size')
    if size is None:
        log.warning('export: %s does not record its image size; assuming %d', where,
                    DEFAULT_IMAGE_SIZE)
        size = DEFAULT_IMAGE_SIZE
    return int(size)


def _check_run_meta(run_meta: Mapping[str, Any], meta: Mapping[str, Any],
                    heads: Mapping[str, int], where: str) -> None:
    """The checkpoint's meta item should agree with the state's shapes; the shapes win."""
    width = run_meta.get('width')
    if width is None:
        width = ((run_meta.get('config') or {}).get('model') or {}).get('width')
    for key, recorded, actual in (('model', run_meta.get('model'), meta['architecture']),
                                  ('width', width, meta['width']),
                                  ('heads', run_meta.get('heads'), dict(heads))):
        if recorded is not None and recorded != actual:
            log.warning('export: %s records %s=%r but its state holds %r; exporting the state',
                        where, key, recorded, actual)


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      step: int | None = None, overwrite: bool = False,
                      torchvision: bool = False) -> dict[str, Any]:
    """Exports one step (default: the latest) of a training run's checkpoints; returns the
    export's metadata."""
    checkpoint = read_checkpoint(checkpoint_dir, step)
    out = write_export(out_dir, checkpoint.variables, checkpoint.meta, overwrite=overwrite,
                       torchvision=torchvision)
    return read_export_meta(out)


def export_weights_file(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                        image_size: int = DEFAULT_IMAGE_SIZE, overwrite: bool = False,
                        torchvision: bool = False) -> dict[str, Any]:
    """Imports torchvision or published VisE weights (.safetensors, or .pth with torch) as an
    export; returns its metadata."""
    path = Path(path)
    if not weight_files.is_weights_file(path):
        raise InputError(f'{path}: not a weights file ({", ".join(weight_files.WEIGHT_SUFFIXES)})')
    variables, meta = load_backbone(path, image_size=image_size)
    out = write_export(out_dir, variables, meta, overwrite=overwrite, torchvision=torchvision)
    return read_export_meta(out)


# ------------------------------------------------------------------------------ random baseline


def random_export(architecture: str, width: int, image_size: int, seed: int,
                  out_dir: str | os.PathLike, *, overwrite: bool = False,
                  torchvision: bool = False) -> dict[str, Any]:
    """A freshly initialised backbone as an export: the random-features baseline."""
    variables = initial_variables(architecture, width, seed)
    meta = export_meta(variables, image_size=image_size, source_kind='random', seed=int(seed))
    out = write_export(out_dir, variables, meta, overwrite=overwrite, torchvision=torchvision)
    return read_export_meta(out)


def initial_variables(architecture: str, width: int, seed: int) -> Variables:
    """torchvision's initialisation of a ResNet trunk, drawn with numpy: conv kernels normal
    with std sqrt(2 / fan_out) (kaiming_normal_, mode='fan_out'), BatchNorm scale 1 and bias 0
    (no zero-init of the last BatchNorm of a block), running mean 0 and variance 1.

    The model's own `init` draws the same distributions, but on CPU compiling it (or running it
    op by op) takes half a minute; the layout comes from `jax.eval_shape`, nothing is compiled.
    Each array has its own generator, seeded by `seed` and its path.
    """
    model = create_resnet(architecture, width=width)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    constants = {'scale': 1.0, 'bias': 0.0, 'mean': 0.0, 'var': 1.0}

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        name = path[-1].key
        if name == 'kernel':   # HWIO: fan_out = kh * kw * out
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            return rng.normal(0.0, np.sqrt(2.0 / fan_out), leaf.shape).astype(np.float32)
        if name in constants:
            return np.full(leaf.shape, constants[name], np.float32)
        raise ValueError(f'no initialisation rule for {key}')

    return jax.tree_util.tree_map_with_path(draw, shapes)


