"""ResNet-50 training step, images/s: vise_jax (Flax, XLA:CPU) against torchvision (PyTorch),
on the same CPU, batch and image size, float32.

  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
      /work/peer-venv/bin/python bench/resnet_bench.py [--quick] [--scaling]

Both sides do the same step: forward in train mode (BatchNorm on batch statistics, running
statistics updated), softmax cross-entropy on 1000 classes, backward, SGD with momentum 0.9
(lr 0.1, no weight decay, the same batch every step). vise_jax runs
`models.MultiHeadResNet('resnet50', {'imagenet': 1000})` on uint8 images (normalised on the
device, as in training) under one jit with the state donated; torchvision runs
`resnet50(zero_init_residual=True)` on the float images, with every core (torch.set_num_threads),
in its default (NCHW) memory format and in channels_last. Contenders take turns, one timed block
of --steps steps each per round, so load from other work on the machine falls on all alike; the
best round of each is reported, with the median. JAX's compile time is excluded and printed on
its own (its compiling call is vise_jax's first warm-up step, so every contender runs the same
number of steps).

Every contender starts from the same weights: torchvision's initialisation (torch.manual_seed
--seed), imported into vise_jax with vise_jax.interop.torchvision (fc becomes the head). The loss
of every step is printed for each contender, with vise_jax's relative difference to torchvision,
so a divergence shows at once. `--init own` lets each start from its own initialisation instead
(vise_jax: jax.random.key(--seed)), as the bench did before issue #17. `--head-init flax` gives
vise_jax's head Flax's Dense default initialisation (lecun_normal kernel, zero bias: vise_jax's
before issue #17) in place of torch's nn.Linear one (vise_jax's now, or the imported fc).

vise_jax splits the cores into one XLA device per core and the batch over them (data parallel,
BatchNorm statistics over the global batch); see bench/README.md for why, and for what else was
tried. --scaling runs the step on 1, 2, 4 and 8 devices, checking that each compiles once and
that the loss does not depend on the device count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

SCALING_DEVICES = (1, 2, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per contender')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--devices', type=int, default=os.cpu_count(),
                        help='XLA CPU devices (default: one per core); the batch is split')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                        help="vise_jax's compute dtype (torch stays float32)")
    parser.add_argument('--quick', action='store_true',
                        help='a smoke test: batch 4 at 64 px, one warm-up, two steps, one round')
    parser.add_argument('--skip-torch', action='store_true')
    parser.add_argument('--init', default='torch', choices=['torch', 'own'],
                        help="'torch': every contender starts from torchvision's initial weights "
                             "(default); 'own': each from its own initialisation")
    parser.add_argument('--seed', type=int, default=0,
                        help='torch.manual_seed (and jax.random.key for --init own)')
    parser.add_argument('--head-init', default='torch', choices=['torch', 'flax'],
                        help="vise_jax's head: as initialised or imported ('torch', default), or "
                             "Flax's Dense default init from jax.random.key(--seed) ('flax', "
                             "vise_jax's before issue #17)")
    parser.add_argument('--no-channels-last', action='store_true',
                        help='run torch in its default layout only (for loss curves)')
    parser.add_argument('--scaling', action='store_true',
                        help='also: the step on 1, 2, 4, 8 devices (compiles, loss, images/s)')
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.warmup, args.steps, args.rounds = 4, 64, 1, 2, 1
    return args


def configure_xla(devices: int) -> None:
    """One XLA CPU device per core unless XLA_FLAGS says otherwise. Must run before JAX starts.

    XLA:CPU runs convolutions on every core of a device (Eigen's thread pool), but most other
    work - BatchNorm's reductions and elementwise fusions, which are a large share of a training
    step - on one thread per device; with a device per core and the batch split, all of it runs
    on every core.
    """
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={devices}')


@dataclasses.dataclass
class Contender:
    """One implementation: `run(n)` does n training steps and waits for them to finish.

    `losses` gets every step's loss, in order (as arrays or tensors: read after timing)."""

    name: str
    run: Callable[[int], float]     # returns the last step's loss
    losses: list
    seconds: list = dataclasses.field(default_factory=list)
    loss: float = float('nan')


def make_batch(batch: int, size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3), np.uint8)
    labels = rng.integers(0, 1000, batch).astype(np.int32)
    return images, labels


# ------------------------------------------------------------------------------------ vise_jax


def flax_train_step(model, mesh, learning_rate: float = 0.1):
    """(jitted step, optimizer): params and optimizer state replicated, batch split by rows."""
    import jax
    import optax

    from vise_jax import sharding

    optimizer = optax.sgd(learning_rate, momentum=0.9)

    def step(state, images, labels):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            (logits, _), updates = model.apply(
                {'params': params, 'batch_stats': batch_stats}, images, train=True,
                mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits['imagenet'], labels)
            return loss.mean(), updates['batch_stats']

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, changes), batch_stats, opt_state), loss

    whole, rows = sharding.replicated(mesh), sharding.row_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(whole, rows, rows), out_shardings=(whole, whole),
                     donate_argnums=0)
    return jitted, optimizer


def flax_contender(batch: int, size: int, devices: int, dtype: str = 'float32',
                   variables=None, seed: int = 0, head_init: str = 'torch') -> Contender:
    """`variables`: the MultiHeadResNet's {'params', 'batch_stats'} to start from (numpy);
    None initialises them with jax.random.key(seed). head_init 'flax' replaces the head by
    `flax_default_head(seed)`."""
    import jax
    import jax.numpy as jnp

    from vise_jax import sharding
    from vise_jax.models import MultiHeadResNet

    model = MultiHeadResNet('resnet50', {'imagenet': 1000}, dtype=jnp.dtype(dtype))
    images, labels = make_batch(batch, size)
    mesh = sharding.make_mesh(devices=jax.devices()[:devices])
    step, optimizer = flax_train_step(model, mesh)
    if variables is None:
        variables = jax.jit(model.init, static_argnames='train')(jax.random.key(seed),
                                                                 images[:1], train=False)
    if head_init == 'flax':
        variables = {'params': {**variables['params'],
                                'heads': {'imagenet': flax_default_head(seed)}},
                     'batch_stats': variables['batch_stats']}
    state = (variables['params'], variables['batch_stats'],
             optimizer.init(variables['params']))
    holder = [jax.device_put(state, sharding.replicated(mesh))]
    batch_arrays = jax.device_put((images, labels), sharding.row_sharding(mesh))
    losses: list = []

    def run(steps: int) -> float:
        for _ in range(steps):
            holder[0], loss = step(holder[0], *batch_arrays)
            losses.append(loss)
        return float(losses[-1])   # waits for the last step

    return Contender('vise_jax' if dtype == 'float32' else f'vise_jax {dtype}', run, losses)


def flax_default_head(seed: int, features: int = 2048, classes: int = 1000) -> dict:
    """The 'imagenet' head as vise_jax initialised it before issue #17 (a plain nn.Dense:
    lecun_normal kernel, std 1/sqrt(features), and zero bias): the same parameter path
    (heads/imagenet) and key give the same numbers `model.init(jax.random.key(seed))` gave."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class OldHeads(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(classes, name='imagenet')(x)

    class Root(nn.Module):
        @nn.compact
        def __call__(self, x):
            return OldHeads(name='heads')(x)

    params = Root().init(jax.random.key(seed), jnp.zeros((1, features)))['params']
    return jax.device_get(params['heads']['imagenet'])


def torchvision_initial_weights(seed: int) -> dict:
    """torchvision's resnet50(zero_init_residual=True) as initialised after
    torch.manual_seed(seed): its state_dict as numpy arrays."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(zero_init_residual=True)
    return {key: value.numpy().copy() for key, value in model.state_dict().items()}


def flax_variables_from_torchvision(state_dict: dict) -> dict:
    """The MultiHeadResNet variables holding those weights (fc as the 'imagenet' head)."""
    from vise_jax.interop import torchvision as tv

    trunk = tv.torchvision_to_flax(state_dict, 'resnet50')
    return {'params': {'backbone': trunk['params'],
                       'heads': {'imagenet': tv.torchvision_fc(state_dict)}},
            'batch_stats': {'backbone': trunk['batch_stats']}}


# ----------------------------------------------------------------------------------- torchvision


def torch_contender(batch: int, size: int, threads: int, channels_last: bool,
                    state_dict=None, seed: int = 0) -> Contender:
    """`state_dict`: numpy weights to start from; None: torchvision's init after
    torch.manual_seed(seed)."""
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.resnet50(zero_init_residual=True)  # as vise_jax's default
    if state_dict is not None:
        model.load_state_dict({key: torch.from_numpy(value.copy())
                               for key, value in state_dict.items()}, strict=True)
    model = model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = make_batch(batch, size)
    mean = np.asarray([0.485, 0.456, 0.406], np.float32)
    std = np.asarray([0.229, 0.224, 0.225], np.float32)
    floats = ((images / np.float32(255.0) - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(floats)).to(memory_format=memory_format)
    y = torch.from_numpy(labels.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    losses: list = []

    def run(steps: int) -> float:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return float(losses[-1])

    return Contender('torchvision channels_last' if channels_last else 'torchvision', run,
                     losses)


# ------------------------------------------------------------------------------------- timing


def race(contenders: list[Contender], warmup: int, steps: int, rounds: int) -> None:
    """Warms every contender up to `warmup` steps (counting steps already run, such as
    vise_jax's compiling one), then times `steps` steps of each, round after round."""
    for contender in contenders:
        contender.run(max(0, warmup - len(contender.losses)))
    for _ in range(rounds):
        for contender in contenders:
            begin = time.perf_counter()
            contender.loss = contender.run(steps)
            contender.seconds.append(time.perf_counter() - begin)


def images_per_second(contender: Contender, batch: int, steps: int, best: bool = True) -> float:
    seconds = min(contender.seconds) if best else statistics.median(contender.seconds)
    return batch * steps / seconds


def compile_seconds_listener(spent: list) -> Callable:
    def listen(event: str, seconds: float, **_) -> None:
        if event == '/jax/core/compile/backend_compile_duration':
            spent.append(seconds)
    return listen


def describe_machine(args: argparse.Namespace) -> None:
    import jax

    print(f'date: {datetime.date.today()}  machine: {platform.processor() or platform.machine()}'
          f', {os.cpu_count()} cores')
    print(f'jax {jax.__version__}, {len(jax.devices())} XLA devices, '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(f'ResNet-50 train step: batch {args.batch}, {args.size} px, {args.dtype}; '
          f'{args.warmup} warm-up steps, {args.rounds} rounds of {args.steps} timed steps')
    start = ("torchvision's initial weights for all" if args.init == 'torch' and not args.skip_torch
             else 'each its own initial weights')
    head = ", vise_jax's head Flax's Dense default init" if args.head_init == 'flax' else ''
    print(f'start: {start} (seed {args.seed}){head}')
    for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE'):
        if name in os.environ:
            print(f'warning: {name}={os.environ[name]} is set; it can slow numpy and the peers')


def describe_torch() -> None:
    try:
        import torch
    except ImportError:
        return
    print(f'torch {torch.__version__}: {torch.get_num_threads()} threads, '
          f'mkldnn={torch.backends.mkldnn.is_available()}')


def report(contenders: list[Contender], args: argparse.Namespace, compile_time: float) -> None:
    print(f'\n{"":28s}{"img/s best":>11s}{"img/s median":>14s}{"s/step best":>13s}'
          f'{"last loss":>11s}')
    for contender in contenders:
        print(f'{contender.name:28s}{images_per_second(contender, args.batch, args.steps):11.2f}'
              f'{images_per_second(contender, args.batch, args.steps, best=False):14.2f}'
              f'{min(contender.seconds) / args.steps:13.3f}{contender.loss:11.4f}')
    print(f'vise_jax compile time (first call): {compile_time:.1f} s')
    ours = contenders[0]
    peers = contenders[1:]
    if peers:
        best_peer = max(peers, key=lambda peer: images_per_second(peer, args.batch, args.steps))
        ratio = (images_per_second(ours, args.batch, args.steps)
                 / images_per_second(best_peer, args.batch, args.steps))
        print(f'images/s ratio vise_jax / {best_peer.name} (the faster torch layout): '
              f'{ratio:.3f}')


def report_losses(contenders: list[Contender]) -> None:
    """Every step's loss for each contender, and vise_jax's relative difference to the first
    torch one: the steps are the same, so the curves are too, up to float32 rounding (which a
    chaotic trajectory amplifies over the steps)."""
    import numpy as np

    curves = [np.asarray([float(loss) for loss in c.losses]) for c in contenders]
    steps = min(len(curve) for curve in curves)
    names = ''.join(f'{c.name:>28s}' for c in contenders)
    compare = len(contenders) > 1
    print(f'\nloss per step (the same batch every step)\n{"step":>5s}{names}'
          + (f'{"rel. diff":>11s}' if compare else ''))
    for i in range(steps):
        row = ''.join(f'{curve[i]:28.6f}' for curve in curves)
        if compare:
            row += f'{abs(curves[0][i] - curves[1][i]) / abs(curves[1][i]):11.1e}'
        print(f'{i + 1:5d}{row}')


# ------------------------------------------------------------------------------------ scaling


def scaling_check(args: argparse.Namespace) -> None:
    """The step on 1, 2, 4, 8 devices: one compile each, the same loss, and images/s."""
    import jax
    import numpy as np

    available = len(jax.devices())
    print(f'\nscaling: the step on 1..{available} XLA devices, batch {args.batch} split over them')
    print(f'{"devices":>8s}{"compiles":>10s}{"loss step 1":>13s}{"loss step 2":>13s}'
          f'{"img/s":>8s}')
    reference = None
    for devices in (d for d in SCALING_DEVICES if d <= available and args.batch % d == 0):
        compiles: list = []
        listener = compile_seconds_listener(compiles)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            contender = flax_contender(args.batch, args.size, devices, args.dtype)
            compiles.clear()   # count the step's compiles, not the init's
            losses = (contender.run(1), contender.run(1))
            begin = time.perf_counter()
            contender.run(args.steps)
            rate = args.batch * args.steps / (time.perf_counter() - begin)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        print(f'{devices:8d}{len(compiles):10d}{losses[0]:13.6f}{losses[1]:13.6f}{rate:8.2f}',
              flush=True)
        reference = reference or losses
        if not np.allclose(losses, reference, rtol=1e-4):
            print(f'  warning: loss differs from 1 device ({reference})')


def main() -> None:
    args = parse_args()
    configure_xla(args.devices)
    import jax

    describe_machine(args)
    torch_weights = variables = None
    if not args.skip_torch and args.init == 'torch':
        torch_weights = torchvision_initial_weights(args.seed)
        variables = flax_variables_from_torchvision(torch_weights)
    contenders = [flax_contender(args.batch, args.size, min(args.devices, len(jax.devices())),
                                 args.dtype, variables, args.seed, args.head_init)]
    spent: list = []
    listener = compile_seconds_listener(spent)
    jax.monitoring.register_event_duration_secs_listener(listener)
    contenders[0].run(1)   # compiles the step
    jax.monitoring.unregister_event_duration_listener(listener)
    if not args.skip_torch:
        contenders += [torch_contender(args.batch, args.size, args.threads, channels_last,
                                       torch_weights, args.seed)
                       for channels_last in ((False,) if args.no_channels_last
                                             else (False, True))]
        describe_torch()
    race(contenders, args.warmup, args.steps, args.rounds)
    report(contenders, args, sum(spent))
    report_losses(contenders)
    if args.scaling:
        scaling_check(args)


if __name__ == '__main__':
    main()
