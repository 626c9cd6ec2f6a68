"""The optimiser: SGD with (Nesterov) momentum, decoupled-from-BN weight decay, warmup + cosine.

Goyal et al.'s recipe, as in the Flax ImageNet example and big_vision: the learning rate is
`base_lr * global_batch / 256`, ramps up linearly for `warmup_epochs`, then follows a cosine to
zero at the last step. Weight decay (L2 added to the gradient, as torchvision's SGD does) applies
to conv and dense kernels only: BatchNorm scales/biases and dense biases are left alone.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How many steps the run has and where warmup ends."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_learning_rate: float


def make_schedule(optim: ml_collections.ConfigDict, *, steps_per_epoch: int,
                  global_batch_size: int, epochs: float) -> Schedule:
    """`steps_per_epoch` comes from the input pipeline (which refuses a split under one batch)."""
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=max(1, round(epochs * steps_per_epoch)),
        warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
        peak_learning_rate=optim.base_lr * global_batch_size / 256)


def learning_rate_fn(schedule: Schedule) -> optax.Schedule:
    decay_steps = max(schedule.total_steps, schedule.warmup_steps + 1)
    if schedule.warmup_steps == 0:
        return optax.cosine_decay_schedule(schedule.peak_learning_rate, decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=schedule.peak_learning_rate,
        warmup_steps=schedule.warmup_steps, decay_steps=decay_steps)


def decay_mask(params) -> object:
    """True for conv and dense kernels: the only parameters weight decay applies to."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   schedule: Schedule) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_fn(schedule), momentum=optim.momentum or None,
                  nesterov=optim.nesterov),
    )
