"""Evaluation exports: a trained backbone's weights and batch statistics, without the training.

An export is a directory

  export.json   what the weights are (FORMAT, VERSION; see `export_meta` for every field)
  variables/    an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'} of the
                ResNet trunk, float32 numpy arrays: plain Orbax restores it without vise_jax,
                `orbax.checkpoint.StandardCheckpointer().restore(path / 'variables')`
  torchvision.safetensors, torchvision.pth   (optional) the same weights in torchvision's
                state_dict layout, for `torchvision.models.resnetXX().load_state_dict(...,
                strict=False)` (only fc is missing)

It is made from a training checkpoint (`export_checkpoint`), from torchvision or published VisE
weights (`export_weights_file`), or freshly initialised (`random_export`, the random baseline),
and read back with `load_export` (or `load_backbone`, which also takes weight files). Writes are
atomic: everything goes into a temporary directory beside the target, renamed into place last,
so a crash never leaves a half-written export where a reader looks.

Images go in as uint8 RGB; the model expects x = (pixel / 255 - mean) / std with export.json's
mean and std (`models.normalize_images` does exactly that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vise_jax import artifacts
from vise_jax.configlib import expand_workdir
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
# Fields that may differ between two writes of the same export.
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


def _local_process_options() -> ocp.options.MultiprocessingOptions:
    """Orbax options for I/O by this process alone (no barrier with the others): exports are
    small and written by one process."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


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


def save_variables(path: Path, variables: Variables) -> None:
    with ocp.StandardCheckpointer(multiprocessing_options=_local_process_options()) as ckptr:
        ckptr.save(path.absolute(), variables)
        ckptr.wait_until_finished()


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
        with ocp.StandardCheckpointer(multiprocessing_options=_local_process_options()) as c:
            variables = c.restore(variables_dir.absolute())
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
        if _is_checkpoint_dir(epath.Path(path)):
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
    if _is_checkpoint_dir(epath.Path(path)) or _is_checkpoint_dir(epath.Path(path) / 'checkpoints'):
        checkpoint = read_checkpoint(path)
        return checkpoint.variables, checkpoint.meta
    raise InputError(f'{path}: not an export directory, a training checkpoint directory, or a '
                     f'weights file ({", ".join(weight_files.WEIGHT_SUFFIXES)})'
                     + ('' if epath.Path(path).exists() else ' (it does not exist)'))


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
    run_meta: dict[str, Any]   # the checkpoint's own 'meta' item
    meta: dict[str, Any]       # export metadata


def _is_checkpoint_dir(path: epath.Path) -> bool:
    """A CheckpointManager directory (numbered steps with a 'state' item) or one step of it."""
    try:
        if not path.is_dir():
            return False
        if (path / 'state').is_dir():
            return True
        return any(child.name.isdigit() and (child / 'state').is_dir()
                   for child in path.iterdir())
    except OSError:
        return False


def _resolve_checkpoint_dir(checkpoint_dir: str | os.PathLike,
                            step: int | None) -> tuple[epath.Path, int | None]:
    """(manager directory, step) for a run directory ({workdir}/train), a checkpoint directory,
    or one step's directory."""
    if epath.Path(checkpoint_dir).is_file():
        raise InputError(f'{checkpoint_dir} is a file, not a checkpoint directory')
    directory, named = checkpointing.locate_checkpoint(checkpoint_dir, 'checkpoint')
    if named is not None and step is not None and step != named:
        raise InputError(f'{checkpoint_dir} is step {named}, but step {step} was asked for')
    return directory, step if named is None else named


def read_checkpoint(checkpoint_dir: str | os.PathLike,
                    step: int | None = None) -> CheckpointBackbone:
    """The backbone's parameters and batch statistics of one step (default: the latest) of a
    training run's Orbax checkpoints, as numpy arrays; the optimizer state is not read."""
    directory, step = _resolve_checkpoint_dir(checkpoint_dir, step)
    with _benign_orbax_warnings_dropped():
        return _read_checkpoint(directory, step)


class _BenignOrbaxWarnings(logging.Filter):
    """Drops what Orbax warns about every read-only, partial read: the manager is read-only
    on purpose, and the Grain iterator state ('data') is not wanted here."""

    PHRASES = ('read_only=True', 'is read only', 'Item "data" was found')

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in self.PHRASES)


@contextlib.contextmanager
def _benign_orbax_warnings_dropped():
    benign = _BenignOrbaxWarnings()
    absl_logger = logging.getLogger('absl')
    absl_logger.addFilter(benign)
    try:
        yield
    finally:
        absl_logger.removeFilter(benign)


def _read_checkpoint(directory: epath.Path, step: int | None) -> CheckpointBackbone:
    local = _local_process_options()
    manager = ocp.CheckpointManager(
        directory, item_names=('state', 'meta'),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                       'meta': ocp.JsonCheckpointHandler(multiprocessing_options=local)},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             multiprocessing_options=local))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise InputError(f'{directory}: no finished checkpoint in it; train first (an '
                             f'interrupted first save leaves only a temporary directory)')
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise InputError(f'{directory}: no checkpoint of step {step}; it has steps {steps}')
        where = f'{directory}/{step}'
        run_meta = _restore_run_meta(manager, step)
        tree = _state_tree(manager, step, where)
        wanted = {name: {'backbone': tree[name]['backbone']} for name in COLLECTIONS}
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))['state']
        except Exception as error:  # Orbax / tensorstore errors of a damaged checkpoint
            raise InputError(f'{where}: cannot restore the backbone ({error})') from None
    finally:
        manager.close()
    variables = numpy_variables({name: restored[name]['backbone'] for name in COLLECTIONS})
    heads = {name: int(leaf['kernel'].shape[-1])
             for name, leaf in tree['params'].get('heads', {}).items()}
    meta = export_meta(
        variables, image_size=_run_image_size(run_meta, where), source_kind='checkpoint',
        source_path=str(directory), heads=heads, step=step,
        config_hash=_config_hash(run_meta))
    _check_run_meta(run_meta, meta, heads, where)
    return CheckpointBackbone(str(directory), step, variables, heads, run_meta, meta)


def _restore_run_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception:  # a checkpoint without the 'meta' item: read what the state says
        log.warning('export: checkpoint step %d has no readable meta item', step)
        return {}
    return dict(restored['meta'] or {})


def _state_tree(manager: ocp.CheckpointManager, step: int, where: str) -> dict[str, Any]:
    try:
        metadata = manager.item_metadata(step)['state']
    except Exception as error:
        raise InputError(f'{where}: no readable train state ({error})') from None
    tree = getattr(metadata, 'tree', metadata)
    if not isinstance(tree, Mapping) or any(
            not isinstance(tree.get(name), Mapping) or 'backbone' not in tree[name]
            for name in COLLECTIONS):
        raise InputError(f'{where}: not a vise_jax training checkpoint (its state has no '
                         f'params/backbone and batch_stats/backbone)')
    return tree


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


# ------------------------------------------------------------------------------ the stage


def written_by_process_zero(write: Callable[[], dict[str, Any]],
                            out: str | os.PathLike) -> dict[str, Any]:
    """Runs `write` (which writes the export at `out`) on process 0 only; every process
    returns the export's metadata once it is there."""
    if jax.process_count() == 1:
        return write()
    from jax.experimental import multihost_utils

    meta = write() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f'vise_jax.export:{out}')
    return meta or read_export_meta(out)


def export_from_config(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, Any]:
    """The export stage: config.export.source (a run's checkpoints by default, or a weights
    file) -> config.export.out (default {workdir}/export/vise). Reruns leave an identical export
    alone and replace a stale one (a later step, other weights). Returns export.json's content.
    In a multi-process run, process 0 writes it and the others wait for it."""
    workdir = Path(workdir)
    source = expand_workdir(config.export.source, workdir)
    if not source:
        source = (expand_workdir(config.train.checkpoint_dir, workdir)
                  or str(workdir / 'train' / 'checkpoints'))
        if not epath.Path(source).exists():
            raise InputError(f'{source}: no checkpoints to export; run the train stage first, '
                             f'or set --config.export.source to a checkpoint directory or a '
                             f'weights file')
    out = Path(expand_workdir(config.export.out, workdir) or workdir / 'export' / 'vise')
    step = None if config.export.step is None or config.export.step < 0 else config.export.step
    options = dict(overwrite=True, torchvision=bool(config.export.torch))

    def run() -> dict[str, Any]:
        if '://' not in source and (Path(source).is_file() or weight_files.is_weights_file(source)):
            if step is not None:
                raise InputError(f'config.export.step={step} applies to checkpoints, not to the '
                                 f'weights file {source}')
            return export_weights_file(source, out, image_size=config.input.image_size,
                                       **options)
        if '://' not in source and (Path(source) / META_FILE).is_file():
            raise InputError(f'config.export.source={source} is already an export; use it '
                             f'directly (config.eval.exports) or copy it')
        return export_checkpoint(source, out, step=step, **options)

    meta = written_by_process_zero(run, out)
    log.info('export: %s -> %s', source, out)
    return meta
