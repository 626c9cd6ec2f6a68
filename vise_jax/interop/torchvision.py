"""torchvision ResNet weights <-> vise_jax ResNet variables, with numpy only (no torch import).

A torchvision state_dict is a flat mapping of names to arrays (convert torch tensors with
`.numpy()` first). The mapping is one rule applied to every layer of `resnet.block_layouts`:

  torchvision                                   Flax (vise_jax.models.resnet.ResNet)
  conv1.weight (O, I, kh, kw)                   params/conv1/kernel (kh, kw, I, O)
  bn1.weight / bn1.bias                         params/bn1/scale / params/bn1/bias
  bn1.running_mean / bn1.running_var            batch_stats/bn1/mean / batch_stats/bn1/var
  bn1.num_batches_tracked                       (none: read and dropped; written as given)
  layer2.0.conv1.weight                         params/layer2_0/conv1/kernel
  layer2.0.downsample.0.weight                  params/layer2_0/downsample_conv/kernel
  layer2.0.downsample.1.*                       .../layer2_0/downsample_bn/*
  fc.weight (K, C) / fc.bias                    a Dense {kernel (C, K), bias}: `torchvision_fc`

The published VisE trunks are torchvision ResNet-50s without avgpool and fc, saved as an
nn.Sequential: keys 0.* (conv1), 1.* (bn1), 4.*-7.* (layer1-layer4). They are recognised and
renamed (`from_vise_sequential`); `to_vise_sequential` writes that layout back.

`infer_architecture` reads the depth and width from a state_dict's keys and conv1's shape.
Widths other than 64 (toy networks) keep torchvision's key names with narrower tensors.

Floating arrays come out float32; anything missing, unexpected or misshapen raises InputError
naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from vise_jax.errors import InputError
from vise_jax.models.resnet import (
    BACKBONES,
    RESNET_DEPTHS,
    STEM_WIDTH,
    BlockLayout,
    ResNetSpec,
    block_layouts,
    resnet_spec,
)

# nn.Sequential(*list(resnet.children())[:-2]): conv1, bn1, relu, maxpool, layer1..layer4.
VISE_SEQUENTIAL_MODULES = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2',
                           '6': 'layer3', '7': 'layer4'}
# DataParallel / DistributedDataParallel checkpoints prefix every key with this.
DATA_PARALLEL_PREFIX = 'module.'
COUNTER = 'num_batches_tracked'
MAX_KEYS_IN_MESSAGE = 8


@dataclasses.dataclass(frozen=True)
class Weight:
    """One torchvision tensor and where it lives in the Flax variables."""

    torch_key: str
    torch_shape: tuple[int, ...]
    collection: str | None        # 'params' | 'batch_stats'; None for num_batches_tracked
    flax_path: tuple[str, ...]
    is_conv: bool = False         # OIHW in torch, HWIO in Flax


def torchvision_weights(depth_or_name: int | str, width: int = STEM_WIDTH) -> list[Weight]:
    """Every tensor of torchvision's resnet<depth> state_dict except fc, in torchvision's order.

    `width` other than torchvision's 64 gives the same keys with narrower tensors (the toy
    networks of tests and demos; torchvision itself cannot build them)."""
    spec = resnet_spec(depth_or_name)
    weights = [*conv_weight('conv1', ('conv1',), width, 3, 7),
               *batchnorm_weights('bn1', ('bn1',), width)]
    for block in block_layouts(spec.blocks_per_stage, spec.bottleneck, width):
        weights.extend(block_weights(block, spec.bottleneck))
    return weights


def torchvision_shapes(depth_or_name: int | str,
                       width: int = STEM_WIDTH) -> dict[str, tuple[int, ...]]:
    """torchvision's state_dict key -> shape for resnet<depth>, without fc."""
    return {w.torch_key: w.torch_shape for w in torchvision_weights(depth_or_name, width)}


def infer_architecture(state_dict: Mapping[str, Any]) -> tuple[str, int]:
    """(name, width) of the ResNet a torchvision or VisE nn.Sequential state_dict belongs to,
    read from its keys (blocks per stage, block type) and conv1's shape (width)."""
    state_dict = canonical_keys(state_dict)
    if 'conv1.weight' not in state_dict:
        raise InputError(f'not a torchvision ResNet state_dict: no conv1.weight (nor 0.weight of '
                         f'a VisE nn.Sequential trunk) among its {len(state_dict)} keys '
                         f'{listing(sorted(state_dict))}')
    blocks = [len({key.split('.')[1] for key in state_dict
                   if key.startswith(f'layer{stage}.') and key.split('.')[1].isdigit()})
              for stage in range(1, 5)]
    bottleneck = 'layer1.0.conv3.weight' in state_dict
    kind = 'bottleneck' if bottleneck else 'basic'
    spec = next((s for s in RESNET_DEPTHS.values()
                 if s.blocks_per_stage == tuple(blocks) and s.bottleneck == bottleneck), None)
    if spec is None:
        raise InputError(f'no torchvision ResNet has {blocks} {kind} blocks per stage; known: '
                         f'{sorted(BACKBONES)}')
    shape = np.shape(state_dict['conv1.weight'])
    if len(shape) != 4 or shape[1:] != (3, 7, 7):
        raise InputError(f'conv1.weight has shape {tuple(shape)}; expected (width, 3, 7, 7)')
    return spec.name, int(shape[0])


def block_weights(block: BlockLayout, bottleneck: bool) -> Iterator[Weight]:
    torch_prefix, flax_prefix = f'layer{block.stage}.{block.index}', (block.name,)
    if bottleneck:
        convs = [('1', 1, block.in_features, block.width),
                 ('2', 3, block.width, block.width),
                 ('3', 1, block.width, block.out_features)]
    else:
        convs = [('1', 3, block.in_features, block.width),
                 ('2', 3, block.width, block.width)]
    for number, kernel_size, in_features, out_features in convs:
        yield from conv_weight(f'{torch_prefix}.conv{number}', (*flax_prefix, f'conv{number}'),
                               out_features, in_features, kernel_size)
        yield from batchnorm_weights(f'{torch_prefix}.bn{number}', (*flax_prefix, f'bn{number}'),
                                     out_features)
    if block.downsample:
        yield from conv_weight(f'{torch_prefix}.downsample.0', (*flax_prefix, 'downsample_conv'),
                               block.out_features, block.in_features, 1)
        yield from batchnorm_weights(f'{torch_prefix}.downsample.1',
                                     (*flax_prefix, 'downsample_bn'), block.out_features)


def conv_weight(torch_name: str, flax_module: tuple[str, ...], out_features: int,
                in_features: int, kernel_size: int) -> Iterator[Weight]:
    yield Weight(f'{torch_name}.weight', (out_features, in_features, kernel_size, kernel_size),
                 'params', (*flax_module, 'kernel'), is_conv=True)


def batchnorm_weights(torch_name: str, flax_module: tuple[str, ...],
                      features: int) -> Iterator[Weight]:
    for torch_leaf, collection, flax_leaf in (('weight', 'params', 'scale'),
                                              ('bias', 'params', 'bias'),
                                              ('running_mean', 'batch_stats', 'mean'),
                                              ('running_var', 'batch_stats', 'var')):
        yield Weight(f'{torch_name}.{torch_leaf}', (features,), collection,
                     (*flax_module, flax_leaf))
    yield Weight(f'{torch_name}.{COUNTER}', (), None, ())


# ------------------------------------------------------------------------- torchvision -> Flax


def torchvision_to_flax(state_dict: Mapping[str, Any], depth_or_name: int | str, *,
                        width: int = STEM_WIDTH) -> dict[str, dict]:
    """A torchvision (or VisE nn.Sequential) ResNet state_dict -> {'params', 'batch_stats'} for
    `vise_jax.models.create_resnet(depth_or_name, width=width)`. fc.* is ignored (see
    `torchvision_fc`); num_batches_tracked may be absent (older checkpoints).
    `infer_architecture` reads depth and width from a state_dict."""
    state_dict = canonical_keys(state_dict)
    weights = torchvision_weights(depth_or_name, width)
    check_keys(state_dict, weights, depth_or_name)
    variables: dict[str, dict] = {'params': {}, 'batch_stats': {}}
    for weight in weights:
        if weight.collection is None:
            continue
        array = checked_array(state_dict[weight.torch_key], weight.torch_key, weight.torch_shape)
        if weight.is_conv:
            array = oihw_to_hwio(array)
        set_nested(variables[weight.collection], weight.flax_path, array)
    return variables


def torchvision_fc(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """torchvision's fc as a Flax Dense's {'kernel' (C, K), 'bias' (K,)}, or None if absent."""
    state_dict = canonical_keys(state_dict)
    if 'fc.weight' not in state_dict:
        return None
    kernel = checked_array(state_dict['fc.weight'], 'fc.weight', None)
    if kernel.ndim != 2:
        raise InputError(f'fc.weight has shape {kernel.shape}; expected (classes, features)')
    bias = checked_array(state_dict.get('fc.bias', np.zeros(kernel.shape[0])), 'fc.bias',
                         (kernel.shape[0],))
    return {'kernel': np.ascontiguousarray(kernel.T), 'bias': bias}


def canonical_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Plain torchvision keys: without a DataParallel 'module.' prefix, and renamed from the
    VisE nn.Sequential layout when that is what the keys are."""
    state_dict = dict(state_dict)
    if state_dict and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(DATA_PARALLEL_PREFIX):]: v for key, v in state_dict.items()}
    if is_vise_sequential(state_dict):
        state_dict = from_vise_sequential(state_dict)
    return state_dict


def state_dict_layout(state_dict: Mapping[str, Any]) -> str:
    """'vise_sequential' for a VisE nn.Sequential trunk's keys, else 'torchvision'."""
    keys = list(state_dict)
    if keys and all(key.startswith(DATA_PARALLEL_PREFIX) for key in keys):
        keys = [key[len(DATA_PARALLEL_PREFIX):] for key in keys]
    return 'vise_sequential' if is_vise_sequential(dict.fromkeys(keys)) else 'torchvision'


def is_vise_sequential(state_dict: Mapping[str, Any]) -> bool:
    """True for keys of an nn.Sequential trunk (0.weight, 1.running_mean, 4.0.conv1.weight...)."""
    return bool(state_dict) and all(key.split('.', 1)[0].isdigit() for key in state_dict)


def from_vise_sequential(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {}
    for key, value in state_dict.items():
        index, _, rest = key.partition('.')
        if index not in VISE_SEQUENTIAL_MODULES:
            raise InputError(
                f'unexpected key {key!r}: an nn.Sequential ResNet trunk has parameters only in '
                f'modules {sorted(VISE_SEQUENTIAL_MODULES, key=int)} '
                f'({", ".join(VISE_SEQUENTIAL_MODULES.values())})')
        renamed[f'{VISE_SEQUENTIAL_MODULES[index]}.{rest}'] = value
    return renamed


def to_vise_sequential(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision keys -> the VisE nn.Sequential trunk's keys, without fc (theirs has none)."""
    index_of = {module: index for index, module in VISE_SEQUENTIAL_MODULES.items()}
    renamed = {}
    for key, value in state_dict.items():
        module, _, rest = key.partition('.')
        if module == 'fc':
            continue
        if module not in index_of:
            raise InputError(f'key {key!r} belongs to no module of a ResNet trunk')
        renamed[f'{index_of[module]}.{rest}'] = value
    return renamed


def check_keys(state_dict: Mapping[str, Any], weights: list[Weight],
               depth_or_name: int | str) -> None:
    expected = {w.torch_key for w in weights}
    optional = {w.torch_key for w in weights if w.collection is None}
    missing = [w.torch_key for w in weights
               if w.torch_key not in state_dict and w.torch_key not in optional]
    unexpected = [key for key in state_dict
                  if key not in expected and not key.startswith('fc.')]
    name = resnet_spec(depth_or_name).name
    if missing:
        raise InputError(f'state_dict lacks {len(missing)} key(s) of torchvision {name}: '
                         f'{listing(missing)}')
    if unexpected:
        raise InputError(f'state_dict has {len(unexpected)} key(s) that torchvision {name} '
                         f'does not: {listing(unexpected)}')


def checked_array(value: Any, key: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """`value` as a numpy array of `shape` (float32 if floating), or InputError naming `key`."""
    try:
        array = np.asarray(value)
    except Exception as error:  # torch tensors that need .numpy() first, arbitrary objects
        raise InputError(f'{key}: cannot read as an array ({error}); pass numpy arrays') from None
    if shape is not None and array.shape != tuple(shape):
        raise InputError(f'{key} has shape {array.shape}; expected {tuple(shape)}')
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    if shape == ():
        return array
    raise InputError(f'{key} has dtype {array.dtype}; expected floating point')


def oihw_to_hwio(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))


def hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def set_nested(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def listing(keys: list[str]) -> str:
    shown = ', '.join(repr(key) for key in keys[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return shown + (f' and {more} more' if more > 0 else '')


# ------------------------------------------------------------------------- Flax -> torchvision


def flax_to_torchvision(variables: Mapping[str, Any], *,
                        fc: Mapping[str, Any] | None = None,
                        num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """ResNet variables {'params', 'batch_stats'} -> a torchvision state_dict (numpy arrays, in
    torchvision's key order) that `torchvision.models.resnet<depth>().load_state_dict` takes
    with strict=False, or strict=True when `fc` (a Dense's {kernel, bias}) is given.

    The depth is read from the variables' layout. num_batches_tracked, which Flax does not
    count, is written as given for every BatchNorm (PyTorch reads it only when momentum=None).
    """
    spec, width = spec_of(variables), width_of(variables)
    weights = torchvision_weights(spec.depth, width)
    check_flax_leaves(variables, weights)
    state_dict = {}
    for weight in weights:
        if weight.collection is None:
            state_dict[weight.torch_key] = np.asarray(num_batches_tracked, np.int64)
            continue
        flax_key = '/'.join((weight.collection, *weight.flax_path))
        array = checked_array(get_nested(variables, (weight.collection, *weight.flax_path)),
                              flax_key, hwio_shape(weight))
        state_dict[weight.torch_key] = hwio_to_oihw(array) if weight.is_conv else array
    if fc is not None:
        kernel = checked_array(fc['kernel'], 'fc kernel', None)
        feature_dim = spec.feature_dim * width // STEM_WIDTH
        if kernel.ndim != 2 or kernel.shape[0] != feature_dim:
            raise InputError(f'fc kernel has shape {kernel.shape}; expected '
                             f'({feature_dim}, classes)')
        state_dict['fc.weight'] = np.ascontiguousarray(kernel.T)
        state_dict['fc.bias'] = checked_array(fc['bias'], 'fc bias', (kernel.shape[1],))
    return state_dict


def spec_of(variables: Mapping[str, Any]) -> ResNetSpec:
    """The member of the family whose layout `variables` has (blocks per stage, block type)."""
    try:
        params = variables['params']
        blocks = [sum(1 for name in params if name.startswith(f'layer{stage}_'))
                  for stage in range(1, 5)]
        bottleneck = 'conv3' in params['layer1_0']
    except (KeyError, TypeError) as error:
        raise InputError(f'variables are not a vise_jax ResNet\'s {{"params", "batch_stats"}} '
                         f'(missing {error}); for a MultiHeadResNet pass '
                         f'models.backbone_variables(variables)') from None
    for spec in RESNET_DEPTHS.values():
        if spec.blocks_per_stage == tuple(blocks) and spec.bottleneck == bottleneck:
            return spec
    kind = 'bottleneck' if bottleneck else 'basic'
    raise InputError(f'no torchvision ResNet has {blocks} {kind} blocks per stage')


def width_of(variables: Mapping[str, Any]) -> int:
    """The stem's output channels: 64 for torchvision's ResNets, fewer for toy ones."""
    try:
        return int(np.shape(variables['params']['conv1']['kernel'])[-1])
    except (KeyError, TypeError, IndexError) as error:
        raise InputError(f'variables have no params/conv1/kernel (missing {error}): not a '
                         f'vise_jax ResNet\'s {{"params", "batch_stats"}}') from None


def check_flax_leaves(variables: Mapping[str, Any], weights: list[Weight]) -> None:
    expected = {(w.collection, *w.flax_path) for w in weights if w.collection is not None}
    present = set(leaf_paths(variables))
    missing = sorted('/'.join(path) for path in expected - present)
    unexpected = sorted('/'.join(path) for path in present - expected)
    if missing:
        raise InputError(f'variables lack {len(missing)} array(s): {listing(missing)}')
    if unexpected:
        raise InputError(f'variables hold {len(unexpected)} array(s) that torchvision does not: '
                         f'{listing(unexpected)}')


def leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaf_paths(value, (*prefix, name))
        else:
            yield (*prefix, name)


def get_nested(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def hwio_shape(weight: Weight) -> tuple[int, ...]:
    if not weight.is_conv:
        return weight.torch_shape
    out_features, in_features, height, width = weight.torch_shape
    return (height, width, in_features, out_features)
