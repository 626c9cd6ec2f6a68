"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

The batch is one global array per field, rows split over every device of the mesh
(vise_jax.inputs.global_batch). Under `jax.jit` the BatchNorm statistics are then computed over
the whole global batch, like torch's SyncBatchNorm, with no axis names in the model.

Gradient accumulation splits the global batch into `accum_steps` micro-batches and scans over
them, summing gradients; the optimizer then takes one step for the global batch, so schedules,
logging and checkpoints count global steps whatever the accumulation. Each head's loss is its sum
over the global batch divided by the global number of examples with that signal, so the summed
micro-batch gradients equal the full-batch gradient exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.train import losses
from vise_jax.train.state import TrainState

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    head_weights: Mapping[str, float]   # head name -> loss weight (every head the model has)
    label_smoothing: float = 0.0
    accum_steps: int = 1


def _head_counts(batch: Batch, heads) -> dict[str, jax.Array]:
    return {head: jnp.sum(losses.target_mask(batch['targets'][head]['probs']) * batch['weight'])
            for head in heads}


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
    """(B, ...) -> (accum_steps, B / accum_steps, ...), each micro-batch strided over B.

    Striding (row i goes to micro-batch i % accum_steps) keeps every device's rows on that
    device: each device holds a contiguous block of B, and each block splits evenly.
    """
    def split(x):
        rows = x.shape[0] // accum_steps
        return jnp.swapaxes(x.reshape(rows, accum_steps, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _head_sums(logits, batch: Batch, heads, label_smoothing: float = 0.0) -> dict[str, Metrics]:
    return {head: losses.head_sums(logits[head], batch['targets'][head]['ids'],
                                   batch['targets'][head]['probs'], batch['weight'],
                                   label_smoothing)
            for head in heads}


def _loss_and_sums(params, batch_stats, micro: Batch, counts, *, model: flax.linen.Module,
                   options: StepOptions):
    (logits, _), updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, micro['image'], train=True,
        mutable=['batch_stats'])
    sums = _head_sums(logits, micro, options.head_weights, options.label_smoothing)
    total = sum(weight * sums[head]['loss_sum'] / jnp.maximum(counts[head], 1.0)
                for head, weight in options.head_weights.items())
    return total, (updates['batch_stats'], sums)


def train_step(state: TrainState, batch: Batch, *, model: flax.linen.Module,
               optimizer: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               options: StepOptions) -> tuple[TrainState, Metrics]:
    counts = _head_counts(batch, options.head_weights)
    grad_fn = jax.grad(functools.partial(_loss_and_sums, model=model, options=options),
                       has_aux=True)

    if options.accum_steps == 1:
        grads, (batch_stats, sums) = grad_fn(state.params, state.batch_stats, batch, counts)
    else:
        def accumulate(carry, micro):
            grads, batch_stats = carry
            micro_grads, (batch_stats, sums) = grad_fn(state.params, batch_stats, micro, counts)
            return (jax.tree.map(jnp.add, grads, micro_grads), batch_stats), sums

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, batch_stats), sums = jax.lax.scan(
            accumulate, (zeros, state.batch_stats),
            _micro_batches(batch, options.accum_steps))
        sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    metrics = summarize(sums, options.head_weights)
    metrics['learning_rate'] = learning_rate_fn(state.step)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['examples'] = jnp.sum(batch['weight'])
    return new_state, metrics


def summarize(sums: Mapping[str, Metrics], head_weights: Mapping[str, float]) -> Metrics:
    """Per-head sums -> '<head>/loss', '<head>/top1', '<head>/top5' and the weighted 'loss'."""
    metrics = {}
    total = 0.0
    for head, head_sums in sums.items():
        count = jnp.maximum(head_sums['count'], 1.0)
        metrics[f'{head}/loss'] = head_sums['loss_sum'] / count
        metrics[f'{head}/top1'] = head_sums['top1_sum'] / count
        metrics[f'{head}/top5'] = head_sums['top5_sum'] / count
        total = total + head_weights[head] * metrics[f'{head}/loss']
    metrics['loss'] = total
    return metrics


def eval_step(state: TrainState, batch: Batch, *, model: flax.linen.Module,
              heads) -> dict[str, Metrics]:
    """Per-head sums over one batch (padding rows have weight 0), to add up over a pass."""
    logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                            batch['image'], train=False)
    return _head_sums(logits, batch, heads)


def jit_train_step(model: flax.linen.Module, optimizer: optax.GradientTransformation,
                   learning_rate_fn: optax.Schedule, options: StepOptions, mesh: Mesh,
                   state_shardings: Any):
    """train_step jitted for the mesh: the state is donated and keeps its layout."""
    step = functools.partial(train_step, model=model, optimizer=optimizer,
                             learning_rate_fn=learning_rate_fn, options=options)
    return jax.jit(step, in_shardings=(state_shardings, sharding.row_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def jit_eval_step(model: flax.linen.Module, heads, mesh: Mesh, state_shardings: Any):
    step = functools.partial(eval_step, model=model, heads=tuple(heads))
    return jax.jit(step, in_shardings=(state_shardings, sharding.row_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
