"""Per-head losses and accuracies on the sparse targets the input pipeline ships.

Every head's target arrives as the post's distinct cluster ids and their probabilities,
`ids` (B, M) and `probs` (B, M), most frequent first (see vise_jax/inputs). A comment head's
target is the distribution over its comments' clusters (M of them at most); a reaction head's is
one id with probability 1 (M = 1). One soft cross-entropy therefore serves both kinds: the dense
(B, K) target is never built, which matters for K = 5000 heads at batch 4096.

A post lacking a head's signal has all-zero probs: it adds nothing to that head's loss, and the
head's mean is taken over the posts that have the signal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, ids: jax.Array, probs: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against a sparse target distribution.

    logits (B, K); ids, probs (B, M). With label smoothing e the target is
    (1 - e) * target + e / K, whose cross-entropy splits into the two terms below.
    Rows whose probs are all zero give 0.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, ids, axis=-1)
    loss = -jnp.sum(probs * picked, axis=-1)
    if label_smoothing:
        has_target = jnp.sum(probs, axis=-1) > 0
        uniform = -jnp.mean(log_probs, axis=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * jnp.where(has_target, uniform, 0.)
    return loss


def target_mask(probs: jax.Array) -> jax.Array:
    """(B,) 1.0 where the example has this head's signal."""
    return (jnp.sum(probs, axis=-1) > 0).astype(jnp.float32)


def top_k_correct(logits: jax.Array, ids: jax.Array, k: int) -> jax.Array:
    """(B,) 1.0 where the target's most probable id is among the k highest logits.

    For a comment head the most probable id is the post's most common comment cluster.
    """
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == ids[:, :1], axis=-1).astype(jnp.float32)


def head_sums(logits: jax.Array, ids: jax.Array, probs: jax.Array, example_weight: jax.Array,
              label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Loss, top-1 and top-5 of one head, summed over usable examples with the signal, and their
    count: sums add up correctly over micro-batches, steps and evaluation passes however the
    signal is spread; divide by the count for means (step.summarize).
    """
    weights = target_mask(probs) * example_weight
    loss = soft_cross_entropy(logits, ids, probs, label_smoothing)
    return {
        'loss_sum': jnp.sum(loss * weights),
        'top1_sum': jnp.sum(top_k_correct(logits, ids, 1) * weights),
        'top5_sum': jnp.sum(top_k_correct(logits, ids, 5) * weights),
        'count': jnp.sum(weights),
    }
