"""Orbax checkpoints of a training run: train state, data iterator state and run metadata.

One `CheckpointManager` in {workdir}/train/checkpoints saves a Composite of
  'state'  the TrainState (params, batch statistics, optimizer state, step), sharded as it lives;
  'data'   every process's Grain iterator state (Grain's own Orbax handler), so a resumed run
           reads exactly the batches the uninterrupted one would have;
  'meta'   what the state was made for (model, heads and their K, image size): a restore into a
           different model or head set is refused with a message instead of failing deep in Orbax.
Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it), at a
fixed step interval and when the runtime signals preemption (the multi-host preemption sync
point) or the process gets SIGTERM. The latest `keep` checkpoints and every `keep_every_steps`-th
one are preserved.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from vise_jax import input as input_lib
from vise_jax.errors import InputError

log = logging.getLogger(__name__)


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
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=('state', 'data', 'meta'))


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


def check_meta(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuses a checkpoint made for another model, head set or image size."""
    for key in ('model', 'heads', 'image_size'):
        if saved.get(key) != expected.get(key):
            raise InputError(f'{where}: checkpoint was made for {key}={saved.get(key)!r}, '
                             f'but the config asks for {expected.get(key)!r}; use another '
                             f'--workdir or restore settings that match')


def restore_latest(manager: ocp.CheckpointManager, state: Any, shardings: Any,
                   data_iterator: Any, meta: dict[str, Any]) -> Any | None:
    """The latest checkpoint's state (and the iterator moved to its position), or None."""
    step = manager.latest_step()
    if step is None:
        return None
    where = f'{manager.directory}/{step}'
    saved_meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    check_meta(saved_meta['meta'], meta, where)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state, shardings)),
        data=input_lib.iterator_restore_args(data_iterator)))
    log.info('resumed from %s', where)
    return restored['state']
