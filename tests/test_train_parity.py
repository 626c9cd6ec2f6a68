"""Training-step parity with torchvision (issue #17): the same weights and batch give the same
loss, gradients, updated parameters, momentum and BatchNorm running statistics; and the
initialisation is torchvision's (docs/design.md, "Initialisation").

The network is a width-8 ResNet-18 with two heads (soft multi-label 'comments', one-id
'reactions', both partly masked) trained by vise_jax's own train step (train/step.py), loss
(train/losses.py) and optimiser (train/optim.py: Nesterov momentum, L2 weight decay on kernels)
at a constant learning rate. The torch side is tests/fixtures/make_train_reference.py
(torchvision's ResNet code, torch's cross_entropy and SGD); its float64 results are committed in
tests/fixtures/train_reference.npz, so the comparison runs without torch. Where torch is
installed, the same steps also run live in float32, with torch's own initial weights too.
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vise_jax.configlib import default_config
from vise_jax.interop import torchvision as tv
from vise_jax.models import create_model
from vise_jax.models.resnet import BatchNorm
from vise_jax.train import optim
from vise_jax.train import step as step_lib
from vise_jax.train.state import TrainState

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


def load_reference_script():
    """tests/fixtures/make_train_reference.py: numpy weights and batch, and the torch side."""
    path = FIXTURES / 'make_train_reference.py'
    spec = importlib.util.spec_from_file_location('make_train_reference', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = load_reference_script()
# vise_jax (float32) against the float64 reference and against torch's float32, relative to
# each tensor's largest value. Seen here (2026-12, torch 2.14.1 on an x86 CPU), at most:
# losses 7e-7, gradients and momentum 1.7e-5 (BatchNorm scales), updates 1.7e-6 once the
# float32 rounding of the parameters is allowed for (`rounding_floors`), running statistics
# 9e-7; torch's own float32 run is as far from the float64 one.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
PARAM_RTOL = 1e-4
STATS_RTOL = 1e-5


@pytest.fixture(scope='module')
def reference():
    return dict(np.load(FIXTURES / 'train_reference.npz'))


def shapes(depth: str = REF.DEPTH, width: int = REF.WIDTH) -> dict[str, tuple[int, ...]]:
    """Trunk (torchvision keys) and heads (heads.<head>.weight/bias) of the torch model."""
    trunk = tv.torchvision_shapes(depth, width)
    return {**trunk, **REF.head_shapes(REF.HEADS, width * 8 * (4 if depth == 'resnet50' else 1))}


def initial_state_dict() -> dict[str, np.ndarray]:
    return REF.initial_state_dict(shapes())


def fixture_batch(reference) -> dict:
    """The train step's batch: uint8 NHWC images, a weight per row, sparse targets per head."""
    return {'image': reference['images'],
            'weight': np.ones(len(reference['images']), np.float32),
            'targets': {head: {'ids': reference[f'ids/{head}'],
                               'probs': reference[f'probs/{head}']} for head in REF.HEADS}}


def to_flax(state_dict, depth: str = REF.DEPTH, width: int = REF.WIDTH) -> dict:
    """A torch state_dict (torchvision trunk + heads.*) -> MultiHeadResNet variables."""
    trunk = tv.torchvision_to_flax({key: value for key, value in state_dict.items()
                                    if not key.startswith('heads.')}, depth, width=width)
    heads = {head: {'kernel': np.asarray(state_dict[f'heads.{head}.weight']).T.copy(),
                    'bias': np.asarray(state_dict[f'heads.{head}.bias'])}
             for head in REF.HEADS}
    return {'params': {'backbone': trunk['params'], 'heads': heads},
            'batch_stats': {'backbone': trunk['batch_stats']}}


def to_torch_keys(params, batch_stats) -> dict[str, np.ndarray]:
    """A tree shaped like the params (the params, gradients, momentum) -> torch keys, with the
    running statistics under their own (running_mean, running_var) keys."""
    backbone = tv.flax_to_torchvision({'params': jax.device_get(params['backbone']),
                                       'batch_stats': jax.device_get(batch_stats['backbone'])})
    out = {key: value for key, value in backbone.items() if not key.endswith('num_batches_tracked')}
    for head, dense in params['heads'].items():
        out[f'heads.{head}.weight'] = np.asarray(dense['kernel']).T
        out[f'heads.{head}.bias'] = np.asarray(dense['bias'])
    return out


def parameter_keys(state_dict) -> list[str]:
    return [key for key in state_dict
            if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]


def batchnorm_names(state_dict) -> list[str]:
    return [key.removesuffix('.running_var') for key in state_dict
            if key.endswith('.running_var')]


def optim_config(weight_decay: float = REF.WEIGHT_DECAY, base_lr: float = REF.BASE_LR):
    """configlib's optimiser (Nesterov momentum, decay on kernels), REF's rate and decay."""
    config = default_config().optim
    config.base_lr, config.weight_decay = base_lr, weight_decay
    config.momentum, config.nesterov = REF.MOMENTUM, REF.NESTEROV
    config.warmup_epochs = 0.0
    return config


class FlaxTrainer:
    """vise_jax's train step (jitted, as train/step.py defines it) on the toy model, recording
    loss, gradients, parameters, momentum and running statistics after each step, by torch key.
    """

    def __init__(self, depth: str = REF.DEPTH, width: int = REF.WIDTH, heads=REF.HEADS,
                 head_weights=REF.HEAD_WEIGHTS, weight_decay: float = REF.WEIGHT_DECAY,
                 label_smoothing: float = REF.LABEL_SMOOTHING):
        model_config = default_config().model
        model_config.name, model_config.width = depth, width
        model_config.compute_dtype = model_config.param_dtype = 'float32'
        self.model = create_model(model_config, dict(heads))
        config = optim_config(weight_decay)
        # A cosine over a billion steps: the rate is base_lr * batch / 256 to float32 precision.
        schedule = optim.make_schedule(config, steps_per_epoch=1, global_batch_size=REF.BATCH,
                                       epochs=1e9)
        self.learning_rate_fn = optim.learning_rate_fn(schedule)
        self.optimizer = optim.make_optimizer(config, schedule)
        self.options = step_lib.StepOptions(dict(head_weights), label_smoothing)
        self.step = jax.jit(functools.partial(
            step_lib.train_step, model=self.model, optimizer=self.optimizer,
            learning_rate_fn=self.learning_rate_fn, options=self.options))
        loss_fn = functools.partial(step_lib._loss_and_sums, model=self.model,
                                    options=self.options)
        self.grad = jax.jit(lambda params, stats, batch: jax.grad(loss_fn, has_aux=True)(
            params, stats, batch, step_lib._head_counts(batch, self.options.head_weights))[0])

    def run(self, variables, batch, steps: int) -> dict[str, np.ndarray]:
        """Same layout as make_train_reference.torch_training's result."""
        params = jax.tree.map(jnp.asarray, variables['params'])
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=jax.tree.map(jnp.asarray, variables['batch_stats']),
                           opt_state=self.optimizer.init(params))
        out = {'loss': [], **{f'loss/{head}': [] for head in self.options.head_weights},
               'learning_rate': []}
        record = functools.partial(self.record, out)
        record('params/0', to_torch_keys(state.params, state.batch_stats))
        for step in range(1, steps + 1):
            grads = self.grad(state.params, state.batch_stats, batch)
            state, metrics = self.step(state, batch)
            out['loss'].append(float(metrics['loss']))
            out['learning_rate'].append(float(metrics['learning_rate']))
            for head in self.options.head_weights:
                out[f'loss/{head}'].append(float(metrics[f'{head}/loss']))
            record(f'grad/{step}', to_torch_keys(grads, state.batch_stats))
            record(f'params/{step}', to_torch_keys(state.params, state.batch_stats))
            record(f'momentum/{step}', to_torch_keys(momentum_of(state.opt_state),
                                                     state.batch_stats))
            for key, value in to_torch_keys(state.params, state.batch_stats).items():
                if key.endswith(('running_mean', 'running_var')):
                    stat = key.rsplit('.', 1)[1]
                    out[f'{stat}/{step}/{key.rsplit(".", 1)[0]}'] = value
        return {key: np.asarray(value) for key, value in out.items()}

    @staticmethod
    def record(out, prefix, tensors):
        for key, value in tensors.items():
            if not key.endswith(('running_mean', 'running_var')):
                out[f'{prefix}/{key}'] = np.asarray(value, np.float64)


def momentum_of(opt_state):
    """optax's momentum (the trace of sgd), a tree like the params."""
    traces = [leaf for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
        if isinstance(leaf, optax.TraceState)]
    assert len(traces) == 1, opt_state
    return traces[0].trace


def trainer(width: int = REF.WIDTH, label_smoothing: float = REF.LABEL_SMOOTHING) -> FlaxTrainer:
    """One (jitted) trainer per configuration for the whole module."""
    return cached_trainer(width, float(label_smoothing))


@functools.cache
def cached_trainer(width: int, label_smoothing: float) -> FlaxTrainer:
    return FlaxTrainer(width=width, label_smoothing=label_smoothing)


def relative_error(ours, theirs, floor: float = 0.0) -> float:
    """max |ours - theirs| / max |theirs|: the error on the tensor's own scale, not counting
    `floor` of absolute error."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    error = max(np.abs(ours - theirs).max() - floor, 0.0)
    scale = np.abs(theirs).max()
    return float(error / scale) if scale else float(error)


def assert_all_close(ours: dict, theirs: dict, keys, rtol: float, what: str,
                     floors: dict | None = None) -> None:
    errors = {key: relative_error(ours[key], theirs[key], (floors or {}).get(key, 0.0))
              for key in keys}
    worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
    assert worst[0][1] <= rtol, f'{what}: worst relative errors {worst} (rtol {rtol})'


def rounding_floors(params: dict, keys) -> dict[str, float]:
    """An update read off float32 parameters (new - old) carries their rounding: half an ulp
    of each, here 2 eps |p| (a BatchNorm scale near 1 moving by 1e-4 is known to 1e-3 only)."""
    return {key: 2 * float(np.finfo(np.float32).eps) * float(np.abs(params[key]).max())
            for key in keys}


# ----------------------------------------------------------------- against the committed fixture


def test_fixture_weights_regenerate_with_this_numpy(reference):
    state_dict = initial_state_dict()
    for key, value in REF.checksums(state_dict).items():
        np.testing.assert_allclose(value, reference[key], rtol=1e-6, err_msg=(
            f'{key}: numpy generates other initial weights than the fixture was made with; '
            f'rerun tests/fixtures/make_train_reference.py'))


@pytest.fixture(scope='module')
def flax_run(reference):
    """Three vise_jax steps from the fixture's weights on the fixture's batch."""
    return trainer().run(to_flax(initial_state_dict()), fixture_batch(reference), REF.STEPS)


def test_learning_rate_is_constant_and_scaled_by_batch(flax_run):
    np.testing.assert_allclose(flax_run['learning_rate'], REF.learning_rate(), rtol=1e-7)


def test_losses_match_torch_for_every_step_and_head(flax_run, reference):
    for key in ('loss', *(f'loss/{head}' for head in REF.HEADS)):
        np.testing.assert_allclose(flax_run[key], reference[key], rtol=LOSS_RTOL, err_msg=key)
    assert reference['loss'][-1] < 0.8 * reference['loss'][0]   # the steps do train


def test_first_step_gradients_match_torch(flax_run, reference):
    keys = parameter_keys(initial_state_dict())
    ours = {key: flax_run[f'grad/1/{key}'] for key in keys}
    theirs = {key: reference[f'grad/{key}'] for key in keys}
    assert_all_close(ours, theirs, keys, GRAD_RTOL, 'gradients of step 1')
    # Every path carries gradient (no zero-initialised scale hides one).
    assert all(np.abs(theirs[key]).max() > 0 for key in keys)


def test_first_update_is_torch_sgd_with_nesterov_and_decay_on_weights_only(flax_run, reference):
    """params_1 = params_0 - lr (1 + momentum) (grad + wd * params_0 [weights only]): torch's
    SGD on its first step (momentum buffer = the gradient; optax's trace starts at zero, which
    gives the same), computed here from torch's gradients."""
    initial, lr = initial_state_dict(), REF.learning_rate()
    keys = parameter_keys(initial)
    expected = {}
    for key in keys:
        decay = REF.WEIGHT_DECAY if initial[key].ndim > 1 else 0.0
        d_p = reference[f'grad/{key}'].astype(np.float64) + decay * initial[key]
        expected[key] = -lr * (1 + REF.MOMENTUM) * d_p
    ours = {key: flax_run[f'params/1/{key}'] - flax_run[f'params/0/{key}'] for key in keys}
    assert_all_close(ours, expected, keys, PARAM_RTOL, 'updates of step 1',
                     rounding_floors(initial, keys))
    # The decay is large enough to show: without it, the conv updates would be off.
    conv = 'layer1.0.conv1.weight'
    undecayed = -lr * (1 + REF.MOMENTUM) * reference[f'grad/{conv}']
    assert relative_error(ours[conv], undecayed) > 10 * PARAM_RTOL


def test_parameters_after_three_steps_match_torch(flax_run, reference):
    keys = parameter_keys(initial_state_dict())
    ours = {key: flax_run[f'params/{REF.STEPS}/{key}'] - flax_run[f'params/0/{key}']
            for key in keys}
    theirs = {key: reference[f'delta/{key}'] for key in keys}
    assert_all_close(ours, theirs, keys, PARAM_RTOL, f'updates after {REF.STEPS} steps',
                     rounding_floors(initial_state_dict(), keys))


@pytest.mark.parametrize('step', [1, REF.STEPS])
def test_running_statistics_match_torch(flax_run, reference, step):
    names = batchnorm_names(initial_state_dict())
    for stat in ('running_mean', 'running_var'):
        keys = [f'{stat}/{step}/{name}' for name in names]
        assert_all_close(flax_run, reference, keys, STATS_RTOL, f'{stat} after step {step}')


# ------------------------------------------------------------------- against torch, live


def torch_model(state_dict=None, depth: int = 18, width: int = REF.WIDTH, heads=REF.HEADS,
                **kwargs):
    """make_train_reference's torch model; torch's own initial weights unless state_dict."""
    torch = pytest.importorskip('torch')
    torch.manual_seed(0)
    trunk = REF.toy_torchvision_resnet(depth, width, **kwargs)
    features = width * 8 * (4 if depth == 50 else 1)
    model = REF.multi_head_model(trunk, heads, features)
    if state_dict is not None:
        REF.load_flat_state_dict(model, state_dict)
    return model


def compare_runs(ours: dict, theirs: dict, steps: int) -> None:
    """Everything both runs recorded: losses, and per step gradients, parameters, momentum
    buffers and running statistics."""
    for key in [key for key in theirs if key.startswith('loss')]:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=LOSS_RTOL, err_msg=key)
    for step in range(1, steps + 1):
        for kind, rtol in (('grad', GRAD_RTOL), ('params', PARAM_RTOL),
                           ('momentum', GRAD_RTOL), ('running_mean', STATS_RTOL),
                           ('running_var', STATS_RTOL)):
            keys = [key for key in theirs if key.startswith(f'{kind}/{step}/')]
            assert keys, (kind, step)
            if kind == 'params':   # the update, not the weights it is added to
                ours_d = {k: ours[k] - ours[k.replace(f'/{step}/', '/0/')] for k in keys}
                theirs_d = {k: theirs[k] - theirs[k.replace(f'/{step}/', '/0/')] for k in keys}
                assert_all_close(ours_d, theirs_d, keys, rtol, f'{kind} {step}',
                                 rounding_floors(theirs, keys))
            else:
                assert_all_close(ours, theirs, keys, rtol, f'{kind} {step}')


def test_float32_torch_agrees_with_the_fixture_and_with_vise_jax(reference, flax_run):
    """The fixture's weights, live: torch float32 gives the fixture's (float64) figures, and
    vise_jax's to the same precision, momentum buffers included."""
    torch = pytest.importorskip('torch')
    images, targets = REF.make_batch()
    np.testing.assert_array_equal(images, reference['images'])
    theirs = REF.torch_training(torch_model(initial_state_dict()), images, targets,
                                dtype=torch.float32)
    np.testing.assert_allclose(theirs['loss'], reference['loss'], rtol=LOSS_RTOL)
    compare_runs(flax_run, theirs, REF.STEPS)


@pytest.mark.parametrize('width, label_smoothing', [(REF.WIDTH, 0.0), (64, 0.1)])
def test_torchvisions_own_initial_weights_train_alike(reference, width, label_smoothing):
    """torchvision's initialisation (zero_init_residual, kaiming convs, nn.Linear heads) imported
    through vise_jax.interop, then the same three float32 steps on both sides; at width 64 the
    trunk is torchvision.models.resnet18 itself."""
    torch = pytest.importorskip('torch')
    model = torch_model(width=width, zero_init_residual=True)
    state_dict = {key: value.numpy().copy() for key, value in REF.flat_state_dict(model).items()}
    images, targets = REF.make_batch()
    theirs = REF.torch_training(model, images, targets, dtype=torch.float32,
                                label_smoothing=label_smoothing)
    ours = trainer(width, label_smoothing).run(to_flax(state_dict, width=width),
                                               fixture_batch(reference), REF.STEPS)
    compare_runs(ours, theirs, REF.STEPS)


# -------------------------------------------------------------------------- initialisation


@pytest.fixture(scope='module')
def resnet50_init():
    """A full-width ResNet-50 MultiHeadResNet as vise_jax initialises it (config defaults)."""
    model_config = default_config().model
    model_config.compute_dtype = 'float32'
    model = create_model(model_config, {'head_a': 1000, 'head_b': 50})
    images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    return jax.device_get(jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), images))


def conv_kernels(params) -> dict[str, np.ndarray]:
    found = {}

    def visit(path, leaf):
        names = [p.key for p in path]
        if names[-1] == 'kernel' and names[0] == 'backbone':
            found['/'.join(names[1:-1])] = np.asarray(leaf)

    jax.tree_util.tree_map_with_path(visit, params)
    return found


def test_conv_kernels_are_kaiming_normal_fan_out_like_torchvisions(resnet50_init):
    """torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out),
    fan_out = out_channels x kh x kw; 1x1 convs (PointwiseConv) included."""
    kernels = conv_kernels(resnet50_init['params'])
    assert len(kernels) == 53   # the stem, 16 blocks x 3, 4 downsamples
    for name, kernel in kernels.items():
        kh, kw, _, out_channels = kernel.shape
        expected = np.sqrt(2.0 / (out_channels * kh * kw))
        # Standard error of a sample std: std / sqrt(2n); 4 of them, and 3 % at least.
        tolerance = max(0.03, 4 / np.sqrt(2 * kernel.size))
        assert abs(kernel.std() / expected - 1) < tolerance, (name, kernel.std(), expected)
        assert abs(kernel.mean()) < 4 * expected / np.sqrt(kernel.size), name
        # Normal, not truncated: ~0.27 % beyond 3 std (a truncated normal has none).
        assert np.mean(np.abs(kernel) > 3 * expected) > 0.0005, name


def test_batchnorms_start_at_one_and_zero_with_each_blocks_last_scale_zero(resnet50_init):
    params = resnet50_init['params']['backbone']
    stats = resnet50_init['batch_stats']['backbone']
    names = [key.removesuffix('.running_var') for key in tv.torchvision_shapes('resnet50')
             if key.endswith('.running_var')]
    flax_paths = {w.torch_key.rsplit('.', 1)[0]: w.flax_path[:-1]
                  for w in tv.torchvision_weights('resnet50') if w.collection == 'params'}
    for name in names:
        scale = tv.get_nested(params, (*flax_paths[name], 'scale'))
        bias = tv.get_nested(params, (*flax_paths[name], 'bias'))
        mean = tv.get_nested(stats, (*flax_paths[name], 'mean'))
        var = tv.get_nested(stats, (*flax_paths[name], 'var'))
        expected_scale = 0.0 if name.endswith('.bn3') else 1.0   # zero_init_last_bn (default)
        np.testing.assert_array_equal(scale, np.full(scale.shape, expected_scale), err_msg=name)
        np.testing.assert_array_equal(bias, np.zeros(bias.shape), err_msg=name)
        np.testing.assert_array_equal(mean, np.zeros(mean.shape), err_msg=name)
        np.testing.assert_array_equal(var, np.ones(var.shape), err_msg=name)
    assert BatchNorm.momentum == 0.9 and BatchNorm.epsilon == 1e-5


def test_heads_are_initialised_like_torchs_linear(resnet50_init):
    """PyTorch's nn.Linear (torchvision's fc): weight and bias uniform within 1/sqrt(fan_in),
    std 1/sqrt(3 fan_in)."""
    for head, dense in resnet50_init['params']['heads'].items():
        kernel, bias = np.asarray(dense['kernel']), np.asarray(dense['bias'])
        bound = 1 / np.sqrt(kernel.shape[0])
        assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.03, head
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound, head
        assert np.abs(bias).max() <= bound and bias.std() > 0.4 * bound, head


def test_init_statistics_equal_torchvisions_layer_by_layer(resnet50_init):
    """Per layer, vise_jax's std against torchvision's resnet50() (live; torch only)."""
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    theirs = {key: value.numpy() for key, value in
              torchvision.models.resnet50(zero_init_residual=True).state_dict().items()}
    ours = tv.flax_to_torchvision({'params': resnet50_init['params']['backbone'],
                                   'batch_stats': resnet50_init['batch_stats']['backbone']},
                                  fc=resnet50_init['params']['heads']['head_a'])
    for key, value in theirs.items():
        if key.endswith('num_batches_tracked'):
            continue
        if value.std() == 0:
            np.testing.assert_array_equal(ours[key], value, err_msg=key)
        else:
            tolerance = max(0.03, 4 / np.sqrt(2 * value.size))
            assert abs(ours[key].std() / value.std() - 1) < tolerance, (key, ours[key].std(),
                                                                        value.std())
