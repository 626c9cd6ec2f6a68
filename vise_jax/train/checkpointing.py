"""Orbax checkpoints of a training run: where a run starts, what is saved, damaged checkpoints.

One `CheckpointManager` (default {workdir}/train/checkpoints; config.train.checkpoint_dir may be
a bucket path) saves a Composite of
  'state'  the TrainState (params, batch statistics, optimizer state, step), sharded as it lives;
  'data'   every process's Grain iterator state (Grain's own Orbax handler), so a resumed run
           reads exactly the batches the uninterrupted one would have;
  'meta'   what the state was made for (model, width, image size, heads and their K, seed), the
           seed and initial RNG key, the whole config and its hash. A restore into a different
           model, width, head set, image size or seed is refused with a message instead of
           failing deep in Orbax. (The train step draws no random numbers: the seed fixes the
           initial weights, the shuffle and the augmentation, and the data position is in 'data'.)
Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it; an
unfinished save's directory is ignored and removed when the next manager opens), at a fixed step
interval and when the runtime signals preemption (the multi-host preemption sync point) or the
process gets SIGTERM. The latest `keep` checkpoints and every `keep_every_steps`-th one are kept.

Where a run starts (`starting_state`, big_vision's order): the newest readable step of its own
checkpoint directory, else config.train.resume (another run's checkpoint: state, step, optimizer
and data position), else config.train.init (backbone weights of an export or a torchvision/VisE
file; heads and optimizer fresh, step 0), else from scratch.

A step of the run's own directory that cannot be read (missing or truncated file, unreadable
metadata) is reported, moved aside to {checkpoints}/corrupt/<step>-<time> (a name Orbax does not
take for a step) and the previous step is tried. A step made for another model, or whose state
does not have the layout the config builds, is refused instead: that is a wrong config, not
damage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from vise_jax import input as input_lib
from vise_jax.errors import InputError

log = logging.getLogger(__name__)

ITEMS = ('state', 'data', 'meta')
CORRUPT_DIR = 'corrupt'   # not a step name, so Orbax never lists what is moved in here
# Meta fields a restore must match: the first four fix the state's layout, the seed the data
# order and augmentation of the rest of the run.
CHECKED_META = ('model', 'width', 'image_size', 'heads', 'seed')
_HINTS = {'seed': ' (the seed fixes the data order and augmentation of the rest of the run)'}
# Storage errors that say "try again later", not "this checkpoint is damaged".
_TRANSIENT = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'Connection reset',
              'Too Many Requests')


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """A local directory made absolute, or a bucket path (gs://...) left as it is."""
    text = os.fspath(directory)
    return epath.Path(text if '://' in text else os.path.abspath(text))


def make_manager(directory: str | os.PathLike, *, every_steps: int, keep: int,
                 keep_every_steps: int | None = None, async_save: bool = True
                 ) -> ocp.CheckpointManager:
    preserve = [policies.LatestN(keep)]
    if keep_every_steps:
        preserve.append(policies.EveryNSteps(keep_every_steps))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,   # a save killed half-way leaves a temporary directory
    )
    return ocp.CheckpointManager(checkpoint_path(directory), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started."""
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=input_lib.iterator_save_args(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=force)


def _abstract(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                        state, shardings)


def check_meta(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Refuses a checkpoint made for another model, width, image size, head set or seed."""
    for key in CHECKED_META:
        if saved.get(key) != expected.get(key):
            raise InputError(f'{where}: checkpoint was made for {key}={saved.get(key)!r}, '
                             f'but the config asks for {expected.get(key)!r}{_HINTS.get(key, "")};'
                             ' use another --workdir (or config.train.checkpoint_dir) or '
                             'settings that match')


# --- where a run starts ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    """The state a run starts from and where it came from."""

    state: Any
    source: str    # 'checkpoint' (the run's own), 'resume', 'init' or 'scratch'
    where: str     # the step directory or file it was read from ('' from scratch)

    def describe(self) -> str:
        step = int(jax.device_get(self.state.step))
        return {
            'checkpoint': f'resuming at step {step} from the run\'s checkpoint {self.where}',
            'resume': f'resuming at step {step} from config.train.resume: {self.where}',
            'init': f'backbone from config.train.init {self.where}; heads and optimizer fresh',
            'scratch': 'from scratch',
        }[self.source]


class CorruptCheckpoint(Exception):
    """A checkpoint step that cannot be read (as opposed to one made for another config)."""

    def __init__(self, where: str, item: str, error: Any):
        super().__init__(f'{where}: cannot read its {item!r} item: {error}')
        self.where = where


def starting_state(manager: ocp.CheckpointManager, state: Any, shardings: Any,
                   data_iterator: Any, meta: Mapping[str, Any], *, resume: str = '',
                   init: str = '') -> Start:
    """The run's own latest checkpoint, else `resume`, else `init`, else `state` (scratch).

    A checkpoint or resume restores the state and moves `data_iterator` to its saved position;
    init replaces the backbone's parameters and batch statistics only.
    """
    restored = restore_latest(manager, state, shardings, data_iterator, meta)
    if restored is not None:
        return Start(restored[0], 'checkpoint', restored[1])
    if resume:
        restored = restore_from(resume, state, shardings, data_iterator, meta)
        return Start(restored[0], 'resume', restored[1])
    if init:
        return Start(init_backbone(init, state, shardings, meta), 'init', str(init))
    return Start(state, 'scratch', '')


def restore_latest(manager: ocp.CheckpointManager, state: Any, shardings: Any,
                   data_iterator: Any, meta: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(state, step directory) of the newest readable step, the iterator moved to its position;
    None when there is none. Unreadable steps are moved aside (see the module docstring)."""
    initial_position = data_iterator.get_state()
    while (step := manager.latest_step()) is not None:
        where = str(manager.directory / str(step))
        try:
            return _restore_step(manager, step, state, shardings, data_iterator, meta, where), where
        except CorruptCheckpoint as error:
            moved = _move_aside(manager, step)
            log.warning('%s; moved it to %s, trying the previous checkpoint', error, moved)
    # A read that failed half-way (another process failed) may have moved the iterator.
    data_iterator.set_state(initial_position)
    return None


def restore_from(path: str | os.PathLike, state: Any, shardings: Any, data_iterator: Any,
                 meta: Mapping[str, Any]) -> tuple[Any, str]:
    """(state, step directory) of config.train.resume: a run directory ({workdir}/train), a
    checkpoint directory (its latest step) or one step's directory of another run."""
    directory, step = locate_checkpoint(path, 'config.train.resume')
    other = ocp.CheckpointManager(
        directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = other.all_steps()
        if step is None:
            if not steps:
                raise InputError(f'config.train.resume={path}: no finished checkpoint in '
                                 f'{directory}')
            step = max(steps)
        elif step not in steps:
            raise InputError(f'config.train.resume={path}: step {step} is not a finished '
                             f'checkpoint of {directory} (it has {sorted(steps)})')
        where = str(directory / str(step))
        try:
            return _restore_step(other, step, state, shardings, data_iterator, meta, where), where
        except CorruptCheckpoint as error:
            raise InputError(f'config.train.resume: {error}') from None
    finally:
        other.close()


def locate_checkpoint(path: str | os.PathLike, what: str) -> tuple[epath.Path, int | None]:
    """(manager directory, step or None for the latest) of a run, checkpoint or step path."""
    directory = checkpoint_path(path)
    if not directory.is_dir():
        raise InputError(f'{what}={path}: no such checkpoint directory')
    if (directory / 'checkpoints').is_dir() and not (directory / 'state').is_dir():
        directory = directory / 'checkpoints'
    if directory.name.isdigit() and (directory / 'state').is_dir():
        return directory.parent, int(directory.name)
    return directory, None


def init_backbone(path: str | os.PathLike, state: Any, shardings: Any,
                  meta: Mapping[str, Any]) -> Any:
    """`state` with the backbone's params and batch_stats of an export directory, a checkpoint
    or a torchvision/VisE weights file (vise_jax.export.load_backbone); heads, optimizer state
    and step stay as they are (fresh; the optimizer's state does not depend on the values)."""
    from vise_jax import export  # the export module imports the training stack's neighbours

    variables, source = export.load_backbone(path)
    found = (source.get('architecture'), source.get('width'))
    if found != (meta['model'], meta['width']):
        raise InputError(f'config.train.init={path} holds a {found[0]} of width {found[1]}, but '
                         f'config.model is {meta["model"]} of width {meta["width"]}; set '
                         'config.model.name and config.model.width to match, or init from '
                         'other weights')
    where = f'config.train.init={path}'
    params = {**state.params, 'backbone': _placed(
        variables['params'], state.params['backbone'], shardings.params['backbone'],
        f'{where}: params')}
    batch_stats = {**state.batch_stats, 'backbone': _placed(
        variables['batch_stats'], state.batch_stats['backbone'],
        shardings.batch_stats['backbone'], f'{where}: batch_stats')}
    return state.replace(params=params, batch_stats=batch_stats)


def _placed(loaded: Any, current: Any, shardings: Any, where: str) -> Any:
    """`loaded` (numpy) in `current`'s dtypes and shardings, after checking names and shapes."""
    have = dict(_flat(loaded))
    want = dict(_flat(current))
    if have.keys() != want.keys():
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        raise InputError(f'{where}: the weights do not fit the model: missing {missing[:5]}, '
                         f'unexpected {extra[:5]}')
    for name, leaf in want.items():
        if tuple(np.shape(have[name])) != tuple(leaf.shape):
            raise InputError(f'{where}: {name} has shape {tuple(np.shape(have[name]))}, the '
                             f'model wants {tuple(leaf.shape)}')

    def put(path, leaf, sharding):
        value = np.asarray(have[_name(path)], dtype=leaf.dtype)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: value[index])

    return jax.tree.map_with_path(put, current, shardings)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return [(_name(path), leaf) for path, leaf in jax.tree.leaves_with_path(tree)]


def _name(path: tuple[Any, ...]) -> str:
    """'params/backbone/conv1/kernel'; tuple indices and named-tuple fields as saved."""
    return '/'.join(str(next((getattr(key, a) for a in ('key', 'idx', 'name') if hasattr(key, a)),
                             key)) for key in path)


# --- reading one step --------------------------------------------------------------------------


def _restore_step(manager: ocp.CheckpointManager, step: int, state: Any, shardings: Any,
                  data_iterator: Any, meta: Mapping[str, Any], where: str) -> Any:
    """The state of `step`, `data_iterator` moved to its position.

    Raises CorruptCheckpoint when an item cannot be read by some process, InputError when the
    checkpoint was made for another model or optimizer.
    """
    saved = _read(where, 'meta', lambda: manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
    if not isinstance(saved, Mapping):
        raise CorruptCheckpoint(where, 'meta', f'not a JSON object: {saved!r:.80}')
    check_meta(saved, meta, where)
    _log_config_changes(saved.get('config'), meta.get('config'), where)
    layout = _read(where, 'state', lambda: _saved_layout(manager, step))
    _check_layout(layout, state, where)
    restored = _read(where, 'state', lambda: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state, shardings))))['state'])
    _read(where, 'data', lambda: manager.restore(step, args=ocp.args.Composite(
        data=input_lib.iterator_restore_args(data_iterator))))
    return restored


def _read(where: str, item: str, read: Callable[[], Any]) -> Any:
    """read(), or CorruptCheckpoint on every process when it failed on any of them."""
    value, failure = None, None
    try:
        value = read()
    except InputError:
        raise
    except Exception as error:  # Orbax, tensorstore, JSON and file errors of a damaged step
        if any(marker in str(error) for marker in _TRANSIENT):
            raise   # a storage hiccup: fail the run (a restart retries) rather than discard
        failure = f'{type(error).__name__}: {error}'
    if _on_any_process(failure is not None):
        raise CorruptCheckpoint(where, item, failure or 'another process could not read it')
    return value


def _on_any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _saved_layout(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    metadata = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / 'state')
    tree = getattr(metadata, 'tree', metadata)
    if tree is None:
        raise ValueError('no state metadata')
    return {name: tuple(leaf.shape) for name, leaf in _flat(tree)}


def _check_layout(saved: Mapping[str, tuple[int, ...]], state: Any, where: str) -> None:
    """Refuses a state whose arrays are not those the config builds (e.g. another optimizer):
    Orbax would fail on it, and that failure must not pass for a damaged checkpoint."""
    want = {name: tuple(leaf.shape) for name, leaf in _flat(state)}
    if saved == want:
        return
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    shapes = sorted(n for n in want.keys() & saved.keys() if want[n] != saved[n])
    raise InputError(f'{where}: the checkpoint\'s train state does not have the layout the '
                     f'config builds (missing {missing[:3]}, unexpected {extra[:3]}, other '
                     f'shapes {shapes[:3]}); was config.optim or config.model changed? Use '
                     'another --workdir or the settings of the run')


def _log_config_changes(saved: Any, current: Any, where: str) -> None:
    if not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return
    old, new = _flat_config(saved), _flat_config(current)
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if changed:
        log.info('%s: config changed since this checkpoint: %s', where,
                 ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:10])
                 + (f' and {len(changed) - 10} more' if len(changed) > 10 else ''))


def _flat_config(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat_config(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Renames a damaged step to {directory}/corrupt/<step>-<time> (process 0; every process
    waits), so Orbax no longer sees it and a later save of that step can be written. Returns
    the new path (other processes: its directory)."""
    source = manager.directory / str(step)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    target = manager.directory / CORRUPT_DIR / f'{step}-{stamp}'
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = 0
        while target.exists():
            suffix += 1
            target = manager.directory / CORRUPT_DIR / f'{step}-{stamp}-{suffix}'
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'vise_jax checkpoint {step} moved aside')
    manager.reload()
    return target if jax.process_index() == 0 else target.parent
