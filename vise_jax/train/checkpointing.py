"""Orbax checkpoints of a training run: where a run starts, what is saved, damaged checkpoints.

One `CheckpointManager` (default {workdir}/train/checkpoints; config.train.checkpoint_dir may be
a bucket path) saves a Composite of
  'state'  the TrainState (params, batch statistics, optimizer state, step), sharded as it lives;
  'data'   every process's Grain iterator state (Grain's own Orbax handler), so a resumed run
           reads exactly the batches the uninterrupted one would have;
  'meta'   what the state was made for (model, width, image size, heads and their K, seed), the
           seed and initial RNG key, the whole config and its hash, and a checksum of every
           state array (`state_digest`). A restore into a different model, width, head set,
           image size or seed is refused with a message instead of failing deep in Orbax. (The
           train step draws no random numbers: the seed fixes the initial weights, the shuffle
           and the augmentation, and the data position is in 'data'.)
Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it; an
unfinished save's directory is ignored and removed when the next manager opens), at a fixed step
interval and when the runtime signals preemption (the multi-host preemption sync point) or the
process gets SIGTERM. The latest `keep` checkpoints and every `keep_every_steps`-th one are kept.

Where a run starts (`starting_state`, big_vision's order): the newest readable step of its own
checkpoint directory, else config.train.resume (another run's checkpoint: state, step, optimizer
and data position), else config.train.init (backbone weights the caller reads, `Init`: the train
stage passes vise_jax.export.load_backbone, training never reads exports itself; heads and
optimizer fresh, step 0), else from scratch.

A step of the run's own directory that cannot be read (missing or truncated file, unreadable
metadata) or whose restored arrays are damaged (an array whose checksum differs from the one saved
with it, a non-finite value) is reported, moved aside to {checkpoints}/corrupt/<step>-<time> (a
name Orbax does not take for a step) and the previous step is tried. A step made for another
model, or whose state does not have the layout the config builds, is refused instead: that is a
wrong config, not damage.

This module is the one place that knows a training checkpoint's layout (item names, the state's
tree): `read_backbone` reads one step's trunk for vise_jax.export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from vise_jax import inputs as input_lib
from vise_jax.errors import InputError

log = logging.getLogger(__name__)

# The Composite's items: the train state, the Grain iterator positions, the JSON record.
STATE, DATA, META = 'state', 'data', 'meta'
ITEMS = (STATE, DATA, META)
BACKBONE = 'backbone'      # the trunk's subtree of params and batch_stats (models.MultiHeadResNet)
HEADS = 'heads'            # the heads' subtree of params
COLLECTIONS = ('params', 'batch_stats')
DIGEST_KEY = 'state_digest'   # in the meta item: {'algorithm', 'arrays': {name: 'dtype:hex'}}
DIGEST_ALGORITHM = 'vise_jax.u32sum2.v1'
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


def local_process_options() -> ocp.options.MultiprocessingOptions:
    """Orbax options for I/O by this process alone, with no barrier with the others (reading a
    checkpoint into numpy, writing or reading a small export)."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


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
    """Saves if the policy says so (or `force`), with the state's checksums in the meta item;
    returns whether a save started."""
    if not force and not manager.should_save(step):
        return False
    meta = {**meta, DIGEST_KEY: state_digest(state)}
    # Saving copies the state to the host: a deliberate transfer (the loop disallows implicit
    # ones).
    with jax.transfer_guard('allow'):
        return manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: input_lib.iterator_save_args(data_iterator),
            META: ocp.args.JsonSave(meta)}), force=force)


# --- checksums of the state ----------------------------------------------------------------------
#
# Per array: the sum of its elements' bit patterns as uint32 words, and the sum of each word times
# an odd weight drawn from its row-major position, both modulo 2**32 (so any one changed word
# changes both). Integer sums modulo 2**32 do not depend on the order of addition, so the
# digest is computed on the devices, on the arrays as they are sharded, and is the same for any
# mesh, any number of processes and any device layout; every process gets the whole (replicated)
# result. Made for damage (flipped bits, torn writes), not for tampering.

_WORD_TYPES = {1: (jnp.uint8, np.uint8), 2: (jnp.uint16, np.uint16), 4: (jnp.uint32, np.uint32)}
_ODD_MULTIPLIER = 0x9E3779B1


def _words(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(x, _WORD_TYPES[x.dtype.itemsize][0]).astype(jnp.uint32)


def _position_weights(shape: tuple[int, ...]) -> jax.Array:
    """(2 * row-major index + 1) * an odd constant, modulo 2**32, without reshaping (a reshape
    of a sharded array could move it between devices)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + (jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
                         * jnp.uint32(stride % 2 ** 32))
        stride *= shape[axis]
    return (index * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(_ODD_MULTIPLIER)


def _leaf_check(x: jax.Array) -> jax.Array:
    """uint32 [sum, weighted sum, 1 if every element is finite]."""
    words = _words(x)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.asarray(True))
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * _position_weights(x.shape), dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


@functools.cache
def _checker(out_sharding: Any) -> Callable[[Any], Any]:
    check = functools.partial(jax.tree.map, _leaf_check)
    return jax.jit(check) if out_sharding is None else jax.jit(check, out_shardings=out_sharding)


def _format(dtype: Any, sums: Any) -> str:
    return f'{np.dtype(dtype).name}:{int(sums[0]):08x}{int(sums[1]):08x}'


def array_checks(state: Any) -> dict[str, tuple[str, bool]]:
    """{array name: (its digest 'dtype:hex', whether every element is finite)} of a tree of jax
    arrays (sharded any way), computed on the devices; the same in every process."""
    replicated = next((jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
                       for leaf in jax.tree.leaves(state)
                       if isinstance(getattr(leaf, 'sharding', None), jax.sharding.NamedSharding)),
                      None)
    results = dict(_flat(jax.device_get(_checker(replicated)(state))))
    return {name: (_format(leaf.dtype, results[name][:2]), bool(results[name][2]))
            for name, leaf in _flat(state)}


def numpy_checks(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """`array_checks` of host arrays, {name: array} (the same digests, computed with numpy)."""
    checks = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        words = (array.astype(np.uint8) if array.dtype == np.bool_ else array)
        words = words.view(_WORD_TYPES[words.dtype.itemsize][1]).astype(np.uint32).reshape(-1)
        index = np.arange(words.size, dtype=np.uint32)
        weights = (index * np.uint32(2) + np.uint32(1)) * np.uint32(_ODD_MULTIPLIER)
        sums = (np.sum(words, dtype=np.uint32), np.sum(words * weights, dtype=np.uint32))
        finite = (bool(np.all(np.isfinite(array)))
                  if np.issubdtype(array.dtype, np.inexact) else True)
        checks[name] = (_format(array.dtype, sums), finite)
    return checks


def state_digest(state: Any) -> dict[str, Any]:
    """What `save` records in the meta item: every state array's digest."""
    return {'algorithm': DIGEST_ALGORITHM,
            'arrays': {name: digest for name, (digest, _) in array_checks(state).items()}}


class DamagedState(ValueError):
    """Restored arrays that are not what was saved (a checksum differs) or hold NaN or inf."""


def find_damage(checks: Mapping[str, tuple[str, bool]], recorded: Any) -> str | None:
    """What is wrong with arrays of these `checks` given the digest saved with them
    (`state_digest`, or None for a checkpoint saved without one); None when nothing is."""
    non_finite = sorted(name for name, (_, finite) in checks.items() if not finite)
    if non_finite:
        return f'non-finite values (NaN or inf) in {_some(non_finite)}'
    if not isinstance(recorded, Mapping) or recorded.get('algorithm') != DIGEST_ALGORITHM:
        return None     # saved before checksums were, or by another algorithm
    saved = recorded.get('arrays') or {}
    differ = sorted(
        name for name, (digest, _) in checks.items()
        if name in saved and saved[name].split(':')[0] == digest.split(':')[0]  # same dtype
        and saved[name] != digest)
    if differ:
        return (f'{len(differ)} of {len(checks)} arrays differ from the checksums saved with '
                f'them: {_some(differ)}')
    return None


def verify_state(state: Any, recorded: Any) -> None:
    """Raises DamagedState when the restored `state` is not what was saved (see find_damage)."""
    problem = find_damage(array_checks(state), recorded)
    if problem:
        raise DamagedState(problem)


def _some(names: list[str], limit: int = 3) -> str:
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit
                                       else '')


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


@dataclasses.dataclass(frozen=True)
class Init:
    """config.train.init: backbone weights to start from, read only if the run starts from them.

    `load()` returns (variables, source): a ResNet trunk's {'params', 'batch_stats'} (numpy or
    jax arrays) and a record naming its 'architecture' and 'width'. The train stage passes
    vise_jax.export.load_backbone (an export, a checkpoint, a torchvision/VisE weights file);
    training never reads exports itself.
    """

    path: str
    load: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]


class CorruptCheckpoint(Exception):
    """A checkpoint step that cannot be read (as opposed to one made for another config)."""

    def __init__(self, where: str, item: str, error: Any):
        super().__init__(f'{where}: cannot read its {item!r} item: {error}')
        self.where = where


def starting_state(manager: ocp.CheckpointManager, state: Any, shardings: Any,
                   data_iterator: Any, meta: Mapping[str, Any], *, resume: str = '',
                   init: Init | None = None) -> Start:
    """The run's own latest checkpoint, else `resume`, else `init`, else `state` (scratch).

    A checkpoint or resume restores the state and moves `data_iterator` to its saved position;
    init replaces the backbone's parameters and batch statistics only (its weights are read
    only then).
    """
    restored = restore_latest(manager, state, shardings, data_iterator, meta)
    if restored is not None:
        return Start(restored[0], 'checkpoint', restored[1])
    if resume:
        restored = restore_from(resume, state, shardings, data_iterator, meta)
        return Start(restored[0], 'resume', restored[1])
    if init is not None:
        variables, source = init.load()
        return Start(init_backbone(variables, source, state, shardings, meta, path=init.path),
                     'init', str(init.path))
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
    if (directory / 'checkpoints').is_dir() and not (directory / STATE).is_dir():
        directory = directory / 'checkpoints'
    if directory.name.isdigit() and (directory / STATE).is_dir():
        return directory.parent, int(directory.name)
    return directory, None


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A CheckpointManager directory (numbered steps with a 'state' item) or one step of it."""
    path = epath.Path(path)
    try:
        if not path.is_dir():
            return False
        if (path / STATE).is_dir():
            return True
        return any(child.name.isdigit() and (child / STATE).is_dir() for child in path.iterdir())
    except OSError:
        return False


def init_backbone(variables: Mapping[str, Any], source: Mapping[str, Any], state: Any,
                  shardings: Any, meta: Mapping[str, Any], *, path: str = '') -> Any:
    """`state` with `variables` (a trunk's {'params', 'batch_stats'}, e.g. from
    vise_jax.export.load_backbone, which also gives `source`) as the backbone; heads, optimizer
    state and step stay as they are (fresh; the optimizer's state does not depend on the
    values). `path` names config.train.init in messages."""
    found = (source.get('architecture'), source.get('width'))
    if found != (meta['model'], meta['width']):
        raise InputError(f'config.train.init={path} holds a {found[0]} of width {found[1]}, but '
                         f'config.model is {meta["model"]} of width {meta["width"]}; set '
                         'config.model.name and config.model.width to match, or init from '
                         'other weights')
    where = f'config.train.init={path}'
    params = {**state.params, BACKBONE: _placed(
        variables['params'], state.params[BACKBONE], shardings.params[BACKBONE],
        f'{where}: params')}
    batch_stats = {**state.batch_stats, BACKBONE: _placed(
        variables['batch_stats'], state.batch_stats[BACKBONE],
        shardings.batch_stats[BACKBONE], f'{where}: batch_stats')}
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
        value = np.asarray(jax.device_get(have[_name(path)]), dtype=leaf.dtype)
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

    Raises CorruptCheckpoint when an item cannot be read by some process or the restored state
    is damaged (checksums, non-finite values), InputError when the checkpoint was made for
    another model or optimizer.
    """
    saved = _read(where, META, lambda: manager.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
    if not isinstance(saved, Mapping):
        raise CorruptCheckpoint(where, META, f'not a JSON object: {saved!r:.80}')
    check_meta(saved, meta, where)
    _log_config_changes(saved.get('config'), meta.get('config'), where)
    layout = _read(where, STATE, lambda: _saved_layout(manager, step))
    _check_layout(layout, state, where)
    restored = _read(where, STATE, lambda: manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(_abstract(state, shardings))}))[STATE])
    # Only once every process holds the state: the checks are one computation over all of them.
    if DIGEST_KEY not in saved:
        log.info('%s: saved without checksums; checking only for non-finite values', where)
    _read(where, STATE, lambda: verify_state(restored, saved.get(DIGEST_KEY)))
    _read(where, DATA, lambda: manager.restore(step, args=ocp.args.Composite(**{
        DATA: input_lib.iterator_restore_args(data_iterator)})))
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
    metadata = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / STATE)
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


# --- one step's backbone, for exports ----------------------------------------------------------


@dataclasses.dataclass
class SavedBackbone:
    """The trunk of one step of a training run's checkpoints, as saved."""

    directory: epath.Path        # the CheckpointManager directory
    step: int
    variables: dict[str, Any]    # {'params', 'batch_stats'} of the trunk, numpy arrays
    heads: dict[str, int]        # head name -> K, from the saved head kernels
    meta: dict[str, Any]         # the step's meta item ({} when it has none)


def read_backbone(path: str | os.PathLike, step: int | None = None) -> SavedBackbone:
    """The backbone's params and batch statistics of one step (default: the latest) of a run
    directory ({workdir}/train), a checkpoint directory or one step's directory, as numpy
    arrays. Only those arrays are read (an Orbax partial restore by this process alone, so a
    run saved sharded on a pod is read on one CPU); the optimizer state is not. The arrays are
    checked against the checksums saved with them."""
    if epath.Path(path).is_file():
        raise InputError(f'{path} is a file, not a checkpoint directory')
    directory, named = locate_checkpoint(path, 'checkpoint')
    if named is not None and step is not None and step != named:
        raise InputError(f'{path} is step {named}, but step {step} was asked for')
    with _benign_orbax_warnings_dropped():
        return _read_backbone(directory, step if named is None else named)


class _BenignOrbaxWarnings(logging.Filter):
    """Drops what Orbax warns about every read-only, partial read: the manager is read-only
    on purpose, and the Grain iterator state is not wanted here."""

    PHRASES = ('read_only=True', 'is read only', f'Item "{DATA}" was found')

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


def _read_backbone(directory: epath.Path, step: int | None) -> SavedBackbone:
    local = local_process_options()
    manager = ocp.CheckpointManager(
        directory, item_names=(STATE, META),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                       META: ocp.JsonCheckpointHandler(multiprocessing_options=local)},
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
        wanted = {name: {BACKBONE: tree[name][BACKBONE]} for name in COLLECTIONS}
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                              partial_restore=True)}))[STATE]
        except Exception as error:  # Orbax / tensorstore errors of a damaged checkpoint
            raise InputError(f'{where}: cannot restore the backbone ({error})') from None
    finally:
        manager.close()
    problem = find_damage(numpy_checks(dict(_flat(restored))), run_meta.get(DIGEST_KEY))
    if problem:
        raise InputError(f'{where}: the backbone is damaged: {problem}')
    heads = {name: int(leaf['kernel'].shape[-1])
             for name, leaf in tree['params'].get(HEADS, {}).items()}
    return SavedBackbone(directory, step, {name: restored[name][BACKBONE] for name in COLLECTIONS},
                         heads, run_meta)


def _restore_run_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            META: ocp.args.JsonRestore()}))
    except Exception:  # a checkpoint without the meta item: read what the state says
        log.warning('checkpoint step %d has no readable %s item', step, META)
        return {}
    return dict(restored[META] or {})


def _state_tree(manager: ocp.CheckpointManager, step: int, where: str) -> dict[str, Any]:
    try:
        metadata = manager.item_metadata(step)[STATE]
    except Exception as error:
        raise InputError(f'{where}: no readable train state ({error})') from None
    tree = getattr(metadata, 'tree', metadata)
    if not isinstance(tree, Mapping) or any(
            not isinstance(tree.get(name), Mapping) or BACKBONE not in tree[name]
            for name in COLLECTIONS):
        raise InputError(f'{where}: not a vise_jax training checkpoint (its state has no '
                         f'params/{BACKBONE} and batch_stats/{BACKBONE})')
    return tree
