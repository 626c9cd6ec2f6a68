"""Models: the Flax ResNet against torchvision's outputs (fixtures, no torch needed), weight
conversion both ways and the VisE nn.Sequential layout, parameter counts of all five depths,
the multi-head wrapper, dtypes, and the train step on 1-8 devices."""

import contextlib
import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from vise_jax import sharding
from vise_jax.configlib import default_config
from vise_jax.errors import InputError
from vise_jax.interop import torchvision as tv
from vise_jax.models import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET_DEPTHS,
    MultiHeadResNet,
    ResNet,
    backbone_variables,
    create_model,
    create_resnet,
    normalize_images,
)
from vise_jax.models.resnet import (
    BatchNorm,
    PointwiseConv,
    batch_moments,
    max_pool_3x3_stride_2,
)

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


def load_fixture_script():
    """tests/fixtures/make_resnet_reference.py, for its numpy weight generator (no torch)."""
    path = FIXTURES / 'make_resnet_reference.py'
    spec = importlib.util.spec_from_file_location('make_resnet_reference', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE_SCRIPT = load_fixture_script()
TORCHVISION = json.loads((FIXTURES / 'resnet_torchvision.json').read_text())


@pytest.fixture(scope='module')
def reference():
    return dict(np.load(FIXTURES / 'resnet_reference.npz'))


def torchvision_state_dict(name: str) -> dict[str, np.ndarray]:
    """The fixture's weights for torchvision's `name`, fc included, regenerated with numpy."""
    return REFERENCE_SCRIPT.reference_state_dict(TORCHVISION['state_dict_shapes'][name])


def assert_close(ours, theirs, what: str, rtol: float = 1e-4):
    """Within rtol of the reference, elementwise, with an absolute floor at rtol x its scale."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, what
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max(),
                               err_msg=what)


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def init_shapes(model: nn.Module, *inputs, **kwargs):
    """The variables' shapes without computing them."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))


def random_variables(model: nn.Module, *inputs, seed: int = 3, **kwargs):
    """Variables with the layout `model.init` gives, filled with plausible random values:
    He-scaled kernels, BatchNorm scales near 1 and positive variances. Nothing is compiled
    (jit of a ResNet's init takes seconds on CPU, mostly for the random number generation)."""
    shapes = init_shapes(model, *inputs, **kwargs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ('scale', 'var'):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.1, leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------ torchvision layout, parity


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_torchvision_keys_and_shapes_are_torchvisions(name):
    theirs = {key: tuple(shape) for key, shape in TORCHVISION['state_dict_shapes'][name].items()
              if not key.startswith('fc.')}
    assert list(tv.torchvision_shapes(name).items()) == list(theirs.items())


@pytest.mark.parametrize('depth', sorted(RESNET_DEPTHS))
def test_parameter_counts_equal_torchvisions(depth):
    shapes = init_shapes(create_resnet(depth), jnp.zeros((1, 32, 32, 3)))
    counts = TORCHVISION['param_counts'][f'resnet{depth}']
    assert count(shapes['params']) == counts['total'] - counts['fc']
    assert (BACKBONES[f'resnet{depth}'].feature_dim + 1) * 1000 == counts['fc']
    # Every array has a torchvision counterpart of the same size.
    torch_sizes = {key: int(np.prod(shape)) for key, shape in tv.torchvision_shapes(depth).items()
                   if not key.endswith('num_batches_tracked')}
    assert count(shapes) == sum(torch_sizes.values())


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_matches_torchvision_in_eval_and_train_mode(name, reference):
    state_dict = torchvision_state_dict(name)
    variables = tv.torchvision_to_flax(state_dict, name)
    fc = tv.torchvision_fc(state_dict)
    images = REFERENCE_SCRIPT.reference_images(**REFERENCE_SCRIPT.INPUTS[name])
    images = jnp.asarray(images.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    model = create_resnet(name)

    @jax.jit
    def forward(variables, images):
        eval_features = model.apply(variables, images, train=False)
        train_features, updates = model.apply(variables, images, train=True,
                                              mutable=['batch_stats'])
        return eval_features, train_features, updates['batch_stats']

    eval_features, train_features, running = forward(variables, images)
    assert_close(eval_features, reference[f'{name}/eval_features'], 'eval features')
    assert_close(eval_features @ fc['kernel'] + fc['bias'], reference[f'{name}/eval_logits'],
                 'eval logits through fc')
    assert_close(train_features, reference[f'{name}/train_features'], 'train features')
    flax_path = {w.torch_key: w.flax_path for w in tv.torchvision_weights(name)}
    for bn in REFERENCE_SCRIPT.RECORDED_BATCHNORMS[name]:
        for torch_stat in ('running_mean', 'running_var'):
            path = flax_path[f'{bn}.{torch_stat}']
            assert_close(tv.get_nested(running, path), reference[f'{name}/{torch_stat}/{bn}'],
                         f'{bn}.{torch_stat} after one train step')


def test_running_variance_is_unbiased_like_pytorch():
    x = jax.random.normal(jax.random.key(1), (2, 1, 1, 3)) * 3.0 + 1.0
    variables = BatchNorm().init(jax.random.key(0), x, train=True)
    _, updates = BatchNorm().apply(variables, x, train=True, mutable=['batch_stats'])
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-6)
    np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-6)


def test_batch_moments_stay_accurate_for_a_large_mean_once_shifted():
    x = jax.random.normal(jax.random.key(2), (8, 16, 16, 4)) + 1e4  # std 1, mean 1e4
    exact = np.asarray(x, np.float64).reshape(-1, 4)
    mean, var = batch_moments(x, jnp.full((4,), 1e4 + 0.3))  # a running mean near the batch's
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, exact.var(0), rtol=1e-4)


def first_max_pool_gradient(x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """PyTorch's max-pool (3x3, stride 2, pad 1) gradient: each window's upstream gradient goes
    to its first maximum in row-major order."""
    out = np.zeros_like(x)
    height, width = x.shape[1:3]
    for b, i, j, c in np.ndindex(grad.shape):
        rows = range(max(2 * i - 1, 0), min(2 * i + 2, height))
        cols = range(max(2 * j - 1, 0), min(2 * j + 2, width))
        window = [(r, q) for r in rows for q in cols]
        r, q = max(window, key=lambda rq: (x[b, rq[0], rq[1], c], -window.index(rq)))
        out[b, r, q, c] += grad[b, i, j, c]
    return out


@pytest.mark.parametrize('size', [7, 8])
def test_max_pool_is_pytorchs_with_the_gradient_to_the_first_maximum(size):
    rng = np.random.default_rng(size)
    x = rng.integers(0, 3, (2, size, size, 3)).astype(np.float32)  # many ties
    grad = rng.normal(size=(2, (size + 1) // 2, (size + 1) // 2, 3)).astype(np.float32)
    pooled, pullback = jax.vjp(max_pool_3x3_stride_2, jnp.asarray(x))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    np.testing.assert_array_equal(pooled, windows[:, ::2, ::2].max(axis=(-2, -1)))
    np.testing.assert_allclose(pullback(jnp.asarray(grad))[0], first_max_pool_gradient(x, grad),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_is_a_1x1_conv(stride):
    x = jax.random.normal(jax.random.key(0), (2, 7, 5, 6))
    pointwise = PointwiseConv(4, stride)
    variables = pointwise.init(jax.random.key(1), x)
    reference = nn.Conv(4, (1, 1), strides=stride, padding='VALID', use_bias=False)
    np.testing.assert_allclose(pointwise.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- weight round trips


def test_torchvision_to_flax_to_torchvision_is_exact():
    state_dict = torchvision_state_dict('resnet50')
    variables = tv.torchvision_to_flax(state_dict, 50)
    back = tv.flax_to_torchvision(variables, fc=tv.torchvision_fc(state_dict),
                                  num_batches_tracked=7)
    assert list(back) == list(state_dict)  # torchvision's key order
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_flax_to_torchvision_to_flax_is_exact():
    variables = random_variables(create_resnet(18), jnp.zeros((1, 32, 32, 3)))
    back = tv.torchvision_to_flax(tv.flax_to_torchvision(variables), 'resnet18')
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for ours, theirs in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables),
                            strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_conv_kernels_are_transposed_oihw_to_hwio():
    state_dict = torchvision_state_dict('resnet18')
    variables = tv.torchvision_to_flax(state_dict, 18)
    kernel = variables['params']['layer2_0']['downsample_conv']['kernel']
    assert kernel.shape == (1, 1, 64, 128)
    torch_kernel = state_dict['layer2.0.downsample.0.weight']  # (128, 64, 1, 1)
    np.testing.assert_array_equal(kernel[0, 0], torch_kernel[:, :, 0, 0].T)
    stem = variables['params']['conv1']['kernel']
    np.testing.assert_array_equal(stem[1, 4, 2, 5], state_dict['conv1.weight'][5, 2, 1, 4])
    np.testing.assert_array_equal(variables['batch_stats']['layer4_1']['bn2']['var'],
                                  state_dict['layer4.1.bn2.running_var'])


def test_vise_sequential_trunk_is_recognised_and_written_back():
    state_dict = torchvision_state_dict('resnet50')
    trunk = tv.to_vise_sequential(state_dict)
    assert 'fc.weight' not in trunk and len(trunk) == len(state_dict) - 2
    for key in ('0.weight', '1.running_var', '1.num_batches_tracked', '4.0.conv1.weight',
                '4.0.downsample.0.weight', '5.3.bn2.bias', '7.2.bn3.running_mean'):
        assert key in trunk, key
    np.testing.assert_array_equal(trunk['7.2.conv3.weight'], state_dict['layer4.2.conv3.weight'])
    assert tv.is_vise_sequential(trunk) and not tv.is_vise_sequential(state_dict)
    from_trunk = tv.torchvision_to_flax(trunk, 'resnet50')
    direct = tv.torchvision_to_flax(state_dict, 'resnet50')
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_trunk, direct)
    assert tv.torchvision_fc(trunk) is None


def test_data_parallel_prefix_is_stripped():
    state_dict = torchvision_state_dict('resnet18')
    prefixed = {f'module.{key}': value for key, value in state_dict.items()}
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           tv.torchvision_to_flax(prefixed, 18),
                           tv.torchvision_to_flax(state_dict, 18))


def test_num_batches_tracked_may_be_absent():
    state_dict = {key: value for key, value in torchvision_state_dict('resnet18').items()
                  if not key.endswith('num_batches_tracked')}
    assert count(tv.torchvision_to_flax(state_dict, 18)) == (
        TORCHVISION['param_counts']['resnet18']['total'] - 513_000 + 2 * 4800)


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('layer3.1.bn1.running_var'), 'lacks 1 key.*layer3.1.bn1.running_var'),
    (lambda sd: sd.update({'layer5.0.conv1.weight': np.zeros(1)}),
     'does not.*layer5.0.conv1.weight'),
    (lambda sd: sd.update({'layer1.0.conv2.weight': np.zeros((64, 64, 1, 1), np.float32)}),
     r'layer1.0.conv2.weight has shape \(64, 64, 1, 1\); expected \(64, 64, 3, 3\)'),
    (lambda sd: sd.update({'bn1.weight': np.arange(64)}), 'bn1.weight has dtype int'),
])
def test_bad_state_dicts_are_refused_naming_the_key(change, message):
    state_dict = torchvision_state_dict('resnet18')
    change(state_dict)
    with pytest.raises(InputError, match=message):
        tv.torchvision_to_flax(state_dict, 'resnet18')


def test_wrong_depth_and_unknown_depth_are_refused():
    state_dict = torchvision_state_dict('resnet18')
    with pytest.raises(InputError, match='lacks .* torchvision resnet34.*layer1.2.conv1.weight'):
        tv.torchvision_to_flax(state_dict, 34)
    with pytest.raises(InputError, match="unknown ResNet 'resnet19'"):
        tv.torchvision_to_flax(state_dict, 'resnet19')
    with pytest.raises(InputError, match="unexpected key '8.weight'"):
        tv.torchvision_to_flax({**tv.to_vise_sequential(state_dict), '8.weight': 0}, 18)


def test_flax_variables_that_are_not_a_torchvision_resnet_are_refused():
    variables = tv.torchvision_to_flax(torchvision_state_dict('resnet18'), 18)
    del variables['batch_stats']['layer2_1']['bn1']['mean']
    with pytest.raises(InputError, match='lack 1 array.*batch_stats/layer2_1/bn1/mean'):
        tv.flax_to_torchvision(variables)
    del variables['params']['layer4_1']
    with pytest.raises(InputError, match=r'no torchvision ResNet has \[2, 2, 2, 1\] basic'):
        tv.flax_to_torchvision(variables)
    with pytest.raises(InputError, match='backbone_variables'):
        tv.flax_to_torchvision({'params': {'backbone': {}}, 'batch_stats': {}})


# -------------------------------------------------------------------------- modules and options


HEADS = {'comments_k8': 8, 'reactions_k3': 3}


@pytest.fixture(scope='module')
def toy_heads_model():
    """A width-8 ResNet-18 MultiHeadResNet, random variables and uint8 images."""
    model = MultiHeadResNet('resnet18', HEADS, width=8)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    return model, random_variables(model, images, train=False), images


def batchnorm_zero_init(model: nn.Module, *inputs, **kwargs) -> dict[str, bool]:
    """'path/of/bn' -> its zero_init_scale, for every BatchNorm `model` builds (traced only)."""
    found = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == '__call__':
            found['/'.join(context.module.path)] = context.module.zero_init_scale
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        init_shapes(model, *inputs, **kwargs)
    return found


@pytest.mark.parametrize('depth, last', [(18, 'bn2'), (50, 'bn3')])
def test_zero_init_last_bn_zeroes_only_each_blocks_last_scale(depth, last):
    images = jnp.zeros((1, 32, 32, 3))
    zero_init = batchnorm_zero_init(create_resnet(depth, zero_init_last_bn=True), images)
    torch_bns = [key for key in tv.torchvision_shapes(depth) if key.endswith('.running_var')]
    assert len(zero_init) == len(torch_bns)
    for path, zeroed in zero_init.items():
        assert zeroed == path.endswith(f'/{last}'), path
    assert not any(batchnorm_zero_init(create_resnet(depth), images).values())
    params = BatchNorm(zero_init_scale=True).init(jax.random.key(0), images, train=False)
    np.testing.assert_array_equal(params['params']['scale'], np.zeros(3))


def test_multi_head_model_outputs_and_variable_layout(toy_heads_model):
    model, variables, images = toy_heads_model
    assert set(variables['params']) == {'backbone', 'heads'}
    assert set(variables['params']['heads']) == set(HEADS)
    assert set(variables['batch_stats']) == {'backbone'}
    assert variables['params']['heads']['comments_k8']['kernel'].shape == (64, 8)
    trunk = create_resnet('resnet18', width=8)

    @jax.jit
    def outputs(variables, images):
        train_outputs, updates = model.apply(variables, images, train=True,
                                             mutable=['batch_stats'])
        eval_features = model.apply(variables, images, train=False)[1]
        trunk_features = trunk.apply(backbone_variables(variables), normalize_images(images))
        return train_outputs, updates, eval_features, trunk_features

    (logits, features), updates, eval_features, trunk_features = outputs(variables, images)
    assert all(np.isfinite(value).all() for value in logits.values())
    assert {name: value.shape for name, value in logits.items()} == {
        'comments_k8': (2, 8), 'reactions_k3': (2, 3)}
    assert features.shape == (2, 64) and features.dtype == jnp.float32
    assert jax.tree_util.tree_structure(updates['batch_stats']) == jax.tree_util.tree_structure(
        variables['batch_stats'])
    np.testing.assert_allclose(trunk_features, eval_features, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_logits_and_features():
    model = MultiHeadResNet('resnet18', {'a': 5}, dtype=jnp.bfloat16, width=8)
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    shapes = init_shapes(model, images, train=False)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('float32')}
    logits, features = jax.eval_shape(lambda v: model.apply(v, images, train=False), shapes)
    assert logits['a'].dtype == jnp.float32 and features.dtype == jnp.float32
    trunk = create_resnet(18, width=8, dtype=jnp.bfloat16)
    _, spatial = jax.eval_shape(
        lambda v: trunk.apply(v, jnp.zeros((2, 64, 64, 3)), return_spatial=True),
        backbone_variables(shapes))
    assert spatial.shape == (2, 2, 2, 64) and spatial.dtype == jnp.bfloat16
    convs_in_bf16 = str(jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(shapes))
    assert 'conv_general_dilated' in convs_in_bf16 and 'bf16[2,16,16,8]' in convs_in_bf16


def test_return_spatial_gives_the_last_stage_map_that_pools_to_the_features():
    model = create_resnet(50, width=4)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = random_variables(model, images)
    pooled, spatial = jax.jit(
        lambda v, x: model.apply(v, x, return_spatial=True))(variables, images)
    assert spatial.shape == (2, 2, 2, 4 * 8 * 4) and pooled.shape == (2, 128)
    np.testing.assert_allclose(pooled, spatial.mean(axis=(1, 2)), rtol=1e-6)


def test_normalize_images_is_torchvisions_to_tensor_and_normalize():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), np.uint8)
    expected = (pixels / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(normalize_images(pixels), expected, rtol=1e-5, atol=1e-6)
    assert normalize_images(pixels, jnp.bfloat16).dtype == jnp.bfloat16


def test_create_model_reads_config_model():
    model_config = load_config('vise_resnet50.py').model
    model = create_model(model_config, {'comments_k1000': 1000})
    assert model.backbone == model_config.name
    assert model.dtype == jnp.dtype(model_config.compute_dtype)
    assert model.param_dtype == jnp.float32 and model.heads == {'comments_k1000': 1000}
    assert model.zero_init_last_bn == model_config.zero_init_last_bn
    assert model.width == 64
    assert create_model(load_config('demo.py', 'size=tiny').model, {'a': 2}).width < 64


@pytest.mark.parametrize('override, heads, message', [
    (dict(name='resnet51'), {'a': 2}, "config.model.name='resnet51'.*known: .*resnet50"),
    (dict(compute_dtype='float8'), {'a': 2}, "compute_dtype='float8'"),
    (dict(param_dtype='int32'), {'a': 2}, "param_dtype='int32'"),
    ({}, {}, 'at least one head'),
    ({}, {'a': 0}, "head 'a' has 0 classes"),
    ({}, {'a/b': 3}, 'without "/"'),
    (dict(width=0), {'a': 2}, 'config.model.width=0 must be a positive integer'),
])
def test_create_model_refuses_bad_configs(override, heads, message):
    model_config = default_config().model
    model_config.update(override)
    with pytest.raises(InputError, match=message):
        create_model(model_config, heads)


# ------------------------------------------------------------------------------ sharded training


def sharded_train_step(model: nn.Module, mesh):
    """One SGD step of softmax cross-entropy on a row-sharded batch, replicated params.

    BatchNorm statistics are over the global batch (jit partitions the reductions), so the loss
    must not depend on the number of devices.
    """
    optimizer = optax.sgd(0.1, momentum=0.9)

    def step(state, images, labels):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                          train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, changes)
        return (params, updates['batch_stats'], opt_state), loss

    rows, whole = sharding.row_sharding(mesh), sharding.replicated(mesh)
    return optimizer, jax.jit(step, in_shardings=(whole, rows, rows),
                              out_shardings=(whole, whole), donate_argnums=0)


@contextlib.contextmanager
def backend_compiles():
    """Yields a list that collects one entry per XLA compilation inside the block."""
    compiles = []

    def listen(event: str, seconds: float, **_) -> None:
        if event == '/jax/core/compile/backend_compile_duration':
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


class TinyClassifier(nn.Module):
    """Two width-4 stages (one with a strided downsample block) and a Dense: the train step's
    shape at a toy's compile time (about 1 s on CPU; four stages take four times as long)."""

    @nn.compact
    def __call__(self, images, train: bool):
        features = ResNet((1, 1), bottleneck=False, width=4)(images, train=train)
        return nn.Dense(10)(features)


def test_train_step_gives_the_same_loss_on_1_2_4_8_devices_compiling_once_each():
    model = TinyClassifier()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    variables = random_variables(model, images, train=False)  # numpy: fresh device copies
    losses = {}
    for num_devices in (1, 2, 4, 8):
        mesh = sharding.make_mesh(devices=jax.devices()[:num_devices])
        optimizer, step = sharded_train_step(model, mesh)
        state = (variables['params'], variables['batch_stats'],
                 optimizer.init(variables['params']))
        state = jax.device_put(state, sharding.replicated(mesh))
        batch = jax.device_put((images, labels), sharding.row_sharding(mesh))
        with backend_compiles() as compiles:
            state, first = step(state, *batch)
            state, second = step(state, *batch)
        assert len(compiles) == 1, f'{num_devices} devices: {len(compiles)} compiles'
        losses[num_devices] = (float(first), float(second))
    assert losses[1][1] < losses[1][0]
    for num_devices, pair in losses.items():
        np.testing.assert_allclose(pair, losses[1], rtol=1e-5, err_msg=f'{num_devices} devices')
