"""The export format: a trunk's weights and batch statistics in a directory, written atomically.

  export.json   what the weights are (FORMAT, VERSION; see `export_meta` for every field)
  variables/    an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'} of the
                ResNet trunk, float32 numpy arrays: plain Orbax restores it without vise_jax
  torchvision.safetensors, torchvision.pth   (optional) the same weights in torchvision's
                state_dict layout (`write_torchvision_layout`)

Writes are atomic: everything goes into a temporary directory beside the target, renamed into
place last, so a crash never leaves a half-written export where a reader looks. Where the
weights come from is vise_jax.export.sources.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.interop import files as weight_files
from vise_jax.interop import torchvision as tv
from vise_jax.models import IMAGENET_MEAN, IMAGENET_STD, ResNet, create_resnet
from vise_jax.models.resnet import STEM_WIDTH
from vise_jax.train import checkpointing

log = logging.getLogger(__name__)

FORMAT = 'vise_jax.export'
VERSION = 1
META_FILE = 'export.json'
VARIABLES_DIR = 'variables'
TORCHVISION_PREFIX = 'torchvision'
NORMALIZATION = 'RGB in [0, 1] (pixel / 255), then (x - mean) / std per channel'
DEFAULT_IMAGE_SIZE = 224
SOURCE_KINDS = ('checkpoint', 'torchvision', 'vise_sequential', 'random')
# export.json fields that may differ between two writes of the same export (the one list:
# evaluate's feature cache ignores them too).
VOLATILE_FIELDS = ('created', 'torchvision')
COLLECTIONS = ('params', 'batch_stats')

Variables = dict[str, Any]


# ------------------------------------------------------------------------------ the export


@dataclasses.dataclass
class Export:
    """A loaded export: its directory, backbone variables (numpy float32) and metadata."""

    path: Path
    variables: Variables
    meta: dict[str, Any]

    def model(self, dtype: Any = jnp.float32) -> ResNet:
        """The ResNet these variables belong to; apply it to normalised images
        (`models.normalize_images`): model.apply(export.variables, x) -> (B, feature_dim)."""
        return create_resnet(self.meta['architecture'], width=self.meta['width'], dtype=dtype)

    @property
    def architecture(self) -> str:
        return self.meta['architecture']

    @property
    def feature_dim(self) -> int:
        return self.meta['feature_dim']

    @property
    def image_size(self) -> int:
        return self.meta['image_size']


def export_meta(variables: Variables, *, image_size: int, source_kind: str,
                source_path: str = '', heads: Mapping[str, int] | None = None,
                step: int | None = None, config_hash: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """export.json's content for `variables` (architecture, width and feature size are read from
    them). write_export adds 'created', 'variables_sha256' and 'torchvision'."""
    if source_kind not in SOURCE_KINDS:
        raise ValueError(f'source_kind {source_kind!r} is not one of {SOURCE_KINDS}')
    spec, width = tv.spec_of(variables), tv.width_of(variables)
    meta = {
        'format': FORMAT,
        'version': VERSION,
        'architecture': spec.name,
        'width': width,
        'feature_dim': spec.feature_dim * width // STEM_WIDTH,
        'image_size': int(image_size),
        'mean': list(IMAGENET_MEAN),
        'std': list(IMAGENET_STD),
        'normalization': NORMALIZATION,
        'heads': {str(name): int(k) for name, k in (heads or {}).items()},
        'step': None if step is None else int(step),
        'source': {'kind': source_kind, 'path': str(source_path), 'config_hash': config_hash},
    }
    meta.update(extra)
    return meta


def numpy_variables(variables: Mapping[str, Any]) -> Variables:
    """{'params', 'batch_stats'} as float32 numpy arrays (from jax arrays, any float dtype)."""
    if not isinstance(variables, Mapping) or set(variables) != set(COLLECTIONS):
        found = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise InputError(f'an export holds a ResNet trunk\'s {{"params", "batch_stats"}}, got '
                         f'{found}; for a MultiHeadResNet pass models.backbone_variables(...)')
    return jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf), np.float32),
                        {name: dict(variables[name]) for name in COLLECTIONS})


def variables_sha256(variables: Variables) -> str:
    """A hash of every array's path, dtype, shape and bytes: equal hashes, equal weights."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.asarray(leaf, order='C')
        digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ writing


def write_export(out_dir: str | os.PathLike, variables: Mapping[str, Any],
                 meta: Mapping[str, Any], *, overwrite: bool = False,
                 torchvision: bool = False) -> Path:
    """Writes an export of `variables` with `meta` (see `export_meta`) to `out_dir`, atomically.

    An existing export with the same weights and metadata is left as it is (a rerun). A
    different export is replaced only with `overwrite`; a directory that holds anything else is
    never touched. With `torchvision`, torchvision.safetensors (and .pth where torch is
    installed) are written into the export too.
    """
    out = _local_dir(out_dir)
    variables = numpy_variables(variables)
    meta = complete_meta(variables, meta)
    existing = _existing_export(out)
    if existing is not None and _same_export(existing, meta):
        missing = torchvision and not _torchvision_files(out)
        if missing:
            existing['torchvision'] = _write_torchvision_files(variables, existing, out)
            write_meta_file(out, existing)
        log.info('export: up to date: %s already holds this export', out)
        return out
    if existing is not None and not overwrite:
        raise InputError(
            f'{out} already holds a different export ({_describe(existing)}); pass '
            f'overwrite=True to replace it, or choose another output directory')
    tmp = out.parent / f'.{out.name}.tmp-{uuid.uuid4().hex[:8]}'
    try:
        tmp.mkdir(parents=True)
        save_variables(tmp / VARIABLES_DIR, variables)
        if torchvision:
            meta['torchvision'] = _write_torchvision_files(variables, meta, tmp)
        write_meta_file(tmp, meta)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info('export: wrote %s (%s)', out, _describe(meta))
    return out


def complete_meta(variables: Variables, meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` checked against the variables, with created / variables_sha256 filled in."""
    meta = json.loads(json.dumps(dict(meta)))   # a JSON-clean copy; fails early if it is not
    required = ('architecture', 'width', 'image_size', 'source')
    missing = [key for key in required if key not in meta]
    if missing:
        raise InputError(f'export metadata lacks {missing}; build it with export_meta(...)')
    spec, width = tv.spec_of(variables), tv.width_of(variables)
    if (meta['architecture'], meta['width']) != (spec.name, width):
        raise InputError(f'export metadata says {meta["architecture"]} width {meta["width"]}, '
                         f'but the variables are {spec.name} width {width}')
    meta.setdefault('format', FORMAT)
    meta.setdefault('version', VERSION)
    meta.setdefault('feature_dim', spec.feature_dim * width // STEM_WIDTH)
    meta['variables_sha256'] = variables_sha256(variables)
    meta['created'] = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
    meta['torchvision'] = []
    return meta


def _checkpointer() -> ocp.StandardCheckpointer:
    """Orbax reads by this process alone (no barrier with the others)."""
    return ocp.StandardCheckpointer(
        multiprocessing_options=checkpointing.local_process_options())


def save_variables(path: Path, variables: Variables) -> None:
    """Writes `variables` as a StandardCheckpointer checkpoint in the new directory `path`.

    Orbax's handler, not a Checkpointer: every Checkpointer save advances a process-wide
    operation counter that names the directory-creation signals of the next saves, so a save
    by process 0 alone would put the processes' counters out of step, and another process's
    next training save would write into a step directory not yet created. Atomicity is the
    caller's (the export's temporary directory)."""
    path.mkdir()
    handler = ocp.StandardCheckpointHandler(
        multiprocessing_options=checkpointing.local_process_options())
    handler.save(path.absolute(), args=ocp.args.StandardSave(variables))
    handler.finalize(path.absolute())


def write_meta_file(directory: Path, meta: Mapping[str, Any]) -> None:
    with artifacts.atomic_path(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + '\n', encoding='utf-8')


def _local_dir(out_dir: str | os.PathLike) -> Path:
    if '://' in str(out_dir):
        raise InputError(f'{out_dir}: exports are written to a local path (the rename that makes '
                         f'them atomic needs a file system); copy the directory afterwards')
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f'{out} exists and is not a directory')
    return out


def _existing_export(out: Path) -> dict[str, Any] | None:
    """export.json of the export at `out`; None if nothing (or an empty directory) is there;
    InputError for a directory that holds something else."""
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        meta = artifacts.read_json(out / META_FILE)
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise InputError(f'{out} exists and is not a vise_jax export (no readable {META_FILE}); '
                         f'it is left alone: move it away or choose another output directory')
    return meta


def _same_export(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    def stable(meta):
        return {k: v for k, v in meta.items() if k not in VOLATILE_FIELDS}
    return stable(old) == stable(new)


def _describe(meta: Mapping[str, Any]) -> str:
    source = meta.get('source') or {}
    step = f' step {meta["step"]}' if meta.get('step') is not None else ''
    return (f'{meta.get("architecture")} width {meta.get("width")} from {source.get("kind")} '
            f'{source.get("path") or ""}{step}').replace('  ', ' ').strip()


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames `tmp` to `out`; an existing `out` (an export, or empty) goes only after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f'.{out.name}.old-{uuid.uuid4().hex[:8]}'
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _torchvision_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f'{TORCHVISION_PREFIX}.*'))


def _write_torchvision_files(variables: Variables, meta: Mapping[str, Any],
                             directory: Path) -> list[str]:
    written = write_torchvision_layout(variables, meta, directory / TORCHVISION_PREFIX)
    return sorted(path.name for path in written)


# ------------------------------------------------------------------------------ reading


def load_export(path: str | os.PathLike) -> Export:
    """The export in `path`, its variables as float32 numpy arrays."""
    path = Path(path)
    meta = read_export_meta(path)
    variables_dir = path / VARIABLES_DIR
    if not variables_dir.is_dir():
        raise InputError(f'{path}: export has {META_FILE} but no {VARIABLES_DIR}/ directory')
    try:
        with _checkpointer() as ckptr:
            variables = ckptr.restore(variables_dir.absolute())
    except Exception as error:  # Orbax raises ValueError, FileNotFoundError, tensorstore errors
        raise InputError(f'{variables_dir}: cannot restore the export\'s variables ({error})'
                         ) from None
    variables = numpy_variables(variables)
    spec, width = tv.spec_of(variables), tv.width_of(variables)
    if (spec.name, width) != (meta.get('architecture'), meta.get('width')):
        raise InputError(f'{path}: {META_FILE} says {meta.get("architecture")} width '
                         f'{meta.get("width")}, but variables/ holds {spec.name} width {width}')
    return Export(path, variables, meta)


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    """export.json of the export in `path`, checked for format and version."""
    path = Path(path)
    if not path.exists():
        raise InputError(f'{path}: no such export directory')
    if not path.is_dir():
        raise InputError(f'{path} is a file, not an export directory')
    meta_file = path / META_FILE
    if not meta_file.is_file():
        hint = ''
        if checkpointing.is_checkpoint_dir(path):
            hint = ' It looks like a training checkpoint directory: export it first ' \
                   '(launch/export.py --config.export.source=...)'
        raise InputError(f'{path} is not a vise_jax export: it has no {META_FILE} (an export '
                         f'holds {META_FILE} and {VARIABLES_DIR}/).{hint}')
    try:
        meta = artifacts.read_json(meta_file)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f'{meta_file}: unreadable ({error})') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise InputError(f'{meta_file}: not a vise_jax export (format is '
                         f'{meta.get("format") if isinstance(meta, dict) else None!r}, '
                         f'expected {FORMAT!r})')
    if not isinstance(meta.get('version'), int) or meta['version'] > VERSION:
        raise InputError(f'{meta_file}: export format version {meta.get("version")!r}; this '
                         f'vise_jax reads versions up to {VERSION}: upgrade vise_jax')
    return meta


# ------------------------------------------------------------------------------ torchvision


def write_torchvision_layout(variables: Variables, meta: Mapping[str, Any],
                             out_prefix: str | os.PathLike) -> list[Path]:
    state_dict = tv.flax_to_torchvision(variables)
    prefix = Path(out_prefix)
    header = {'format': 'torchvision.resnet.state_dict', 'architecture': meta['architecture'],
              'width': str(meta['width']), 'source': json.dumps(meta.get('source', {})),
              'written_by': FORMAT}
    written = [weight_files.write_safetensors(
        state_dict, prefix.with_name(prefix.name + '.safetensors'), header)]
    if weight_files.torch_available():
        written.append(weight_files.write_pth(state_dict,
                                              prefix.with_name(prefix.name + '.pth')))
    else:
        log.info('export: torch is not installed, so no .pth (%s)', weight_files.TORCH_HINT)
    if meta['width'] != STEM_WIDTH:
        # Not a problem to fix (toy widths are deliberate), so not a warning.
        log.info("export: width %d is not torchvision's %d: the state_dict has torchvision's "
                 'keys, but torchvision.models.%s cannot build a model to load it',
                 meta['width'], STEM_WIDTH, meta['architecture'])
    return written


def write_torchvision(export: Export | str | os.PathLike,
                      out_prefix: str | os.PathLike) -> list[Path]:
    """Writes `<out_prefix>.safetensors` and, where torch is installed, `<out_prefix>.pth`: the
    export's backbone as a torchvision ResNet state_dict (no fc), for
    `torchvision.models.resnetXX().load_state_dict(state_dict, strict=False)`."""
    if not isinstance(export, Export):
        export = load_export(export)
    return write_torchvision_layout(export.variables, export.meta, out_prefix)
