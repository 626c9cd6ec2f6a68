"""Losses, optimizer, sharded state and the train step, on a toy model (no ResNet, no data)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vise_jax import inputs as input_lib
from vise_jax import sharding
from vise_jax.train import losses, optim
from vise_jax.train import state as state_lib
from vise_jax.train import step as step_lib

HEADS = {'comments_k6': (6, 3), 'reactions_k4': (4, 1)}   # name -> (K, M)


class ToyModel(nn.Module):
    """Images -> BatchNorm'd features -> one Dense head per name (the wrapper's interface)."""

    heads: dict

    @nn.compact
    def __call__(self, images, train: bool):
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return {name: nn.Dense(k, name=name)(x) for name, (k, _) in self.heads.items()}, x


def toy_batch(rng, batch=16, size=4, heads=HEADS, masked_every=4):
    """A batch in the input pipeline's contract; every `masked_every`-th post lacks comments."""
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    targets = {}
    for name, (k, m) in heads.items():
        ids = rng.integers(0, k, (batch, m)).astype(np.int32)
        probs = rng.random((batch, m)).astype(np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        if m > 1:
            probs[::masked_every] = 0.0
        targets[name] = {'ids': ids, 'probs': probs}
    return {'image': images, 'weight': np.ones(batch, np.float32),
            'index': np.arange(batch, dtype=np.int32), 'bad_image': np.zeros(batch, np.int32),
            'targets': targets}


def dense_targets(ids, probs, k):
    dense = np.zeros((len(ids), k), np.float32)
    for row in range(len(ids)):
        np.add.at(dense[row], ids[row], probs[row])
    return dense


# ---- losses -----------------------------------------------------------------------------------

def test_soft_cross_entropy_equals_dense_optax_with_and_without_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    ids = np.array([[1, 3, 0], [2, 0, 0], [6, 5, 4], [0, 1, 2], [3, 3, 3]], np.int32)
    probs = np.array([[.5, .5, 0], [1, 0, 0], [.2, .3, .5], [.6, .2, .2], [.5, .25, .25]],
                     np.float32)
    dense = dense_targets(ids, probs, 7)
    for smoothing in (0.0, 0.1):
        expected = optax.softmax_cross_entropy(logits, dense * (1 - smoothing) + smoothing / 7)
        got = losses.soft_cross_entropy(logits, ids, probs, smoothing)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_rows_add_nothing_and_means_ignore_them():
    logits = jnp.array([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    ids = jnp.array([[0], [0], [1]])
    probs = jnp.array([[1.0], [0.0], [1.0]])
    per_example = losses.soft_cross_entropy(logits, ids, probs, label_smoothing=0.1)
    assert per_example[1] == 0.0
    metrics = losses.head_sums(logits, ids, probs, example_weight=jnp.ones(3))
    assert metrics['count'] == 2.0
    unsmoothed = losses.soft_cross_entropy(logits, ids, probs)
    np.testing.assert_allclose(metrics['loss_sum'], unsmoothed[0] + unsmoothed[2], rtol=1e-6)
    assert metrics['top1_sum'] == 1.0   # row 0 right, row 2 a tie resolved to id 0: wrong
    # A zero example weight (an unusable image) also removes the row.
    weighted = losses.head_sums(logits, ids, probs, example_weight=jnp.array([0., 1., 1.]))
    assert weighted['count'] == 1.0


def test_top5_uses_the_most_probable_target_id():
    logits = jnp.arange(10.0)[None]            # ranking 9, 8, 7, 6, 5, ...
    assert losses.top_k_correct(logits, jnp.array([[5, 9]]), 5)[0] == 1.0
    assert losses.top_k_correct(logits, jnp.array([[4, 9]]), 5)[0] == 0.0
    assert losses.top_k_correct(logits[:, :3], jnp.array([[0]]), 5)[0] == 1.0  # k > K


# ---- optimizer ----------------------------------------------------------------------------------

def optim_config(**overrides):
    config = ml_collections.ConfigDict(dict(momentum=0.9, nesterov=True, base_lr=0.1,
                                            weight_decay=1e-4, warmup_epochs=1.0,
                                            label_smoothing=0.0))
    config.update(overrides)
    return config


def test_schedule_scales_with_batch_warms_up_and_decays_to_zero():
    schedule = optim.make_schedule(optim_config(), steps_per_epoch=1000 // 512,
                                   global_batch_size=512, epochs=10)
    assert schedule.steps_per_epoch == 1 and schedule.total_steps == 10
    assert schedule.peak_learning_rate == pytest.approx(0.2)
    lr = optim.learning_rate_fn(schedule)
    assert float(lr(0)) == 0.0 and float(lr(1)) == pytest.approx(0.2)
    assert float(lr(10)) == pytest.approx(0.0, abs=1e-7)
    assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(1, 10))


def test_weight_decay_touches_kernels_only():
    params = {'conv': {'kernel': jnp.ones((2, 2))}, 'bn': {'scale': jnp.ones(2),
                                                           'bias': jnp.ones(2)},
              'head': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}}
    schedule = optim.Schedule(steps_per_epoch=1, total_steps=10, warmup_steps=0,
                              peak_learning_rate=1.0)
    tx = optim.make_optimizer(optim_config(momentum=0.0, weight_decay=0.5), schedule)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates['conv']['kernel'][0, 0]) == pytest.approx(-0.5)
    assert float(updates['head']['kernel'][0, 0]) == pytest.approx(-0.5)
    for leaf in (updates['bn']['scale'], updates['bn']['bias'], updates['head']['bias']):
        assert float(jnp.abs(leaf).max()) == 0.0


# ---- state layout -------------------------------------------------------------------------------

def test_fsdp_spec_splits_the_largest_divisible_axis_of_large_arrays():
    P = jax.sharding.PartitionSpec
    assert state_lib.fsdp_spec((2048, 1000), fsdp=4, min_size=1) == P('fsdp', None)
    assert state_lib.fsdp_spec((2048, 1000), fsdp=1, min_size=1) == P()
    assert state_lib.fsdp_spec((3, 3, 64, 6), fsdp=4, min_size=1) == P(None, None, 'fsdp', None)
    assert state_lib.fsdp_spec((7, 9), fsdp=2, min_size=1) == P()      # nothing divides
    assert state_lib.fsdp_spec((64,), fsdp=2) == P()                   # too small to bother


# ---- the step -----------------------------------------------------------------------------------

def make_step(mesh, accum_steps=1, min_size=1, head_weights=None):
    model = ToyModel(HEADS)
    schedule = optim.Schedule(steps_per_epoch=10, total_steps=10, warmup_steps=0,
                              peak_learning_rate=0.5)
    tx = optim.make_optimizer(optim_config(), schedule)
    state, shardings = state_lib.create_train_state(model, tx, 4, jax.random.key(0), mesh,
                                                    min_size=min_size)
    weights = head_weights or dict.fromkeys(HEADS, 1.0)
    options = step_lib.StepOptions(weights, accum_steps=accum_steps)
    step = step_lib.jit_train_step(model, tx, optim.learning_rate_fn(schedule), options, mesh,
                                   shardings)
    return state, step


def run_steps(mesh, batches, **kwargs):
    state, step = make_step(mesh, **kwargs)
    losses_seen = []
    for batch in batches:
        state, metrics = step(state, input_lib.global_batch(batch, mesh))
        losses_seen.append(float(metrics['loss']))
    return jax.device_get(state), losses_seen


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_sharded_data_and_fsdp_equal_one_device():
    batches = [toy_batch(np.random.default_rng(i)) for i in range(3)]
    one_device = sharding.make_mesh(devices=jax.devices()[:1])
    expected, expected_losses = run_steps(one_device, batches)
    for data, fsdp in ((8, 1), (2, 4)):
        mesh = sharding.make_mesh(data, fsdp)
        got, got_losses = run_steps(mesh, batches)
        np.testing.assert_allclose(got_losses, expected_losses, rtol=1e-5)
        # Sharded reductions add in another order: after three steps a parameter may move by
        # ~2e-6 (a wrong sharding moves them by 1e-2 and more).
        assert_trees_close(got.params, expected.params, atol=1e-5)
        assert_trees_close(got.batch_stats, expected.batch_stats)


def test_fsdp_really_shards_parameters_and_momentum():
    mesh = sharding.make_mesh(2, 4)
    state, _ = make_step(mesh)
    kernel = state.params['Dense_0']['kernel']            # (48, 16)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
    assert kernel.addressable_shards[0].data.shape == (12, 16)
    momentum = jax.tree.leaves(state.opt_state)
    assert any(getattr(leaf, 'shape', None) == (48, 16)
               and leaf.sharding.spec == kernel.sharding.spec for leaf in momentum)


class NoBatchNorm(ToyModel):
    @nn.compact
    def __call__(self, images, train: bool):
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        x = nn.relu(nn.Dense(16)(x))
        return {name: nn.Dense(k, name=name)(x) for name, (k, _) in self.heads.items()}, x


def test_gradient_accumulation_gives_the_full_batch_gradient():
    # BatchNorm's batch statistics differ by micro-batch by design, so compare without it.
    batch = toy_batch(np.random.default_rng(1))
    mesh = sharding.make_mesh(devices=jax.devices()[:4])
    schedule = optim.Schedule(10, 10, 0, 0.5)
    tx = optim.make_optimizer(optim_config(), schedule)
    results = []
    for accum in (1, 4):
        model = NoBatchNorm(HEADS)
        state, shardings = state_lib.create_train_state(model, tx, 4, jax.random.key(0), mesh)
        step = step_lib.jit_train_step(
            model, tx, optim.learning_rate_fn(schedule),
            step_lib.StepOptions(dict.fromkeys(HEADS, 1.0), accum_steps=accum), mesh, shardings)
        state, metrics = step(state, input_lib.global_batch(batch, mesh))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (params_1, metrics_1), (params_4, metrics_4) = results
    assert_trees_close(params_1, params_4, rtol=1e-5, atol=1e-6)
    for name in ('loss', 'comments_k6/loss', 'reactions_k4/top1', 'grad_norm'):
        np.testing.assert_allclose(metrics_1[name], metrics_4[name], rtol=1e-5)


def test_a_post_without_comments_contributes_nothing_to_comment_heads():
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = NoBatchNorm(HEADS)
    tx = optax.sgd(1.0)
    state, _ = state_lib.create_train_state(model, tx, 4, jax.random.key(0), mesh)
    batch = toy_batch(np.random.default_rng(2))
    loss_fn = functools.partial(step_lib._loss_and_sums, model=model,
                                options=step_lib.StepOptions({'comments_k6': 1.0}))

    def comment_grads(batch):
        counts = step_lib._head_counts(batch, ['comments_k6'])
        return jax.grad(loss_fn, has_aux=True)(state.params, {}, batch, counts)[0]

    masked_row = 0   # toy_batch masks comments of rows 0, 4, 8, 12
    assert batch['targets']['comments_k6']['probs'][masked_row].sum() == 0
    changed = jax.tree.map(np.copy, batch)
    changed['image'][masked_row] = 255 - changed['image'][masked_row]
    changed['targets']['comments_k6']['ids'][masked_row] = 5
    assert_trees_close(comment_grads(batch), comment_grads(changed), rtol=0, atol=0)


def test_loss_decreases_on_a_learnable_toy():
    # Targets are a function of the image: the model can learn them.
    rng = np.random.default_rng(3)
    batch = toy_batch(rng, batch=32)
    brightness = batch['image'].reshape(32, -1).mean(axis=1)
    for name, (k, m) in HEADS.items():
        ids = np.zeros((32, m), np.int32)
        ids[:, 0] = (np.argsort(np.argsort(brightness)) * k // 32)
        probs = np.zeros((32, m), np.float32)
        probs[:, 0] = 1.0
        batch['targets'][name] = {'ids': ids, 'probs': probs}
    mesh = sharding.make_mesh(devices=jax.devices()[:2])
    _, seen = run_steps(mesh, [batch] * 10)
    assert seen[-1] < 0.6 * seen[0], seen
