"""ResNet v1.5 (18, 34, 50, 101, 152) in Flax Linen, layer for layer torchvision's.

The same layers, strides and paddings as `torchvision.models.resnet*`, so weights move both ways
by renaming and transposing (vise_jax/interop/torchvision.py):

* v1.5: a bottleneck block strides on its 3x3 conv, not on the first 1x1.
* Explicit symmetric padding as in PyTorch (stem 7x7/2 pad 3, 3x3 convs pad 1, max pool 3x3/2
  pad 1 with -inf). Flax's 'SAME' would pad (2, 3) for the stem and (0, 1) for the strided
  convs, shifting every feature map by a pixel relative to torchvision.
* No conv biases; BatchNorm with PyTorch's semantics (see `BatchNorm`).

Module names follow torchvision's attribute names, with '.' replaced by '_' where Flax needs
one name per level: conv1, bn1, layer1_0/{conv1, bn1, ..., downsample_conv, downsample_bn}, ...

Input: NHWC, already normalised (models/preprocess.py). Output: globally average-pooled features
(B, C), C = 512 (18, 34) or 2048 (50, 101, 152), in float32.

Three computations differ from the plain Flax ones, for the speed of training on XLA:CPU (each
gives the same results up to rounding; bench/README.md has the measurements): 1x1 convs are
matrix products (`PointwiseConv`), BatchNorm statistics take one pass (`batch_moments`), and
the max pool has its own gradient (`max_pool_3x3_stride_2`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vise_jax.errors import InputError

Dtype = Any

# PyTorch's BatchNorm2d defaults. PyTorch's momentum weighs the new batch (0.1); the running
# average below weighs the old value, as Flax's does: 1 - 0.1.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

STEM_WIDTH = 64
STAGE_WIDTHS = (64, 128, 256, 512)  # torchvision's `planes` per stage, for width 64
BOTTLENECK_EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """One member of the family: residual blocks per stage and the block type."""

    depth: int
    blocks_per_stage: tuple[int, ...]
    bottleneck: bool

    @property
    def name(self) -> str:
        return f'resnet{self.depth}'

    @property
    def expansion(self) -> int:
        return BOTTLENECK_EXPANSION if self.bottleneck else 1

    @property
    def feature_dim(self) -> int:
        return STAGE_WIDTHS[-1] * self.expansion


RESNET_DEPTHS: dict[int, ResNetSpec] = {
    spec.depth: spec for spec in (
        ResNetSpec(18, (2, 2, 2, 2), bottleneck=False),
        ResNetSpec(34, (3, 4, 6, 3), bottleneck=False),
        ResNetSpec(50, (3, 4, 6, 3), bottleneck=True),
        ResNetSpec(101, (3, 4, 23, 3), bottleneck=True),
        ResNetSpec(152, (3, 8, 36, 3), bottleneck=True),
    )
}
BACKBONES: dict[str, ResNetSpec] = {spec.name: spec for spec in RESNET_DEPTHS.values()}


def resnet_spec(depth_or_name: int | str) -> ResNetSpec:
    """The spec for 50, '50' or 'resnet50'; InputError naming the known ones otherwise."""
    if isinstance(depth_or_name, str):
        key = depth_or_name.strip().lower()
        if key in BACKBONES:
            return BACKBONES[key]
        depth_or_name = int(key) if key.isdigit() else key
    if depth_or_name in RESNET_DEPTHS:
        return RESNET_DEPTHS[depth_or_name]
    raise InputError(f'unknown ResNet {depth_or_name!r}; known: {sorted(BACKBONES)}')


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where one residual block sits and what it maps: the one description of the network's
    shape, shared by the Flax modules and the torchvision weight mapping."""

    stage: int          # 1..4, torchvision's layer1..layer4
    index: int          # block number within the stage
    in_features: int
    width: int          # torchvision's `planes`: channels of the 3x3 convs
    out_features: int
    stride: int
    downsample: bool    # a 1x1 conv + BN on the shortcut

    @property
    def name(self) -> str:
        return f'layer{self.stage}_{self.index}'


def block_layouts(blocks_per_stage: Sequence[int], bottleneck: bool,
                  width: int = STEM_WIDTH) -> Iterator[BlockLayout]:
    """The residual blocks in order, as torchvision's `_make_layer` builds them."""
    expansion = BOTTLENECK_EXPANSION if bottleneck else 1
    in_features = width
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        planes = width * 2 ** (stage - 1)
        out_features = planes * expansion
        for index in range(num_blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            yield BlockLayout(stage, index, in_features, planes, out_features, stride,
                              downsample=stride != 1 or in_features != out_features)
            in_features = out_features


# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, stride: int, name: str, dtype: Dtype,
         param_dtype: Dtype) -> nn.Module:
    """A bias-free conv padded like PyTorch: (k - 1) // 2 on every side. 1x1 convs are
    `PointwiseConv`s: the same parameter, computed as a matrix product."""
    if kernel_size == 1:
        return PointwiseConv(features, stride, dtype=dtype, param_dtype=param_dtype, name=name)
    pad = (kernel_size - 1) // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=conv_kernel_init, name=name)


class PointwiseConv(nn.Module):
    """A bias-free 1x1 conv (stride s: every s-th pixel) as a matrix product over channels.

    Same parameter as nn.Conv's, `kernel` (1, 1, in, out), same results. XLA:CPU runs a 1x1
    conv's weight gradient as a generic convolution at a few GFLOP/s; as the gradient of a
    matrix product it is a matrix product, 5-10x faster, and these are most of a ResNet-50
    step's weight gradients. The rows are flattened to 2-D first: with a 4-D product XLA
    gave each weight gradient a transposed copy of the output gradient (over a quarter of
    the step). On TPUs and GPUs XLA lowers 1x1 convs to such products anyway.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', conv_kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(rows, kernel[0, 0].astype(self.dtype))
        return y.reshape(*x.shape[:-1], self.features)


class BatchNorm(nn.Module):
    """BatchNorm over all but the last axis with PyTorch's semantics, which Flax's lacks:

    the running variance is updated with the *unbiased* batch variance (n / (n - 1) times the
    biased one that normalises the batch), as torch.nn.BatchNorm2d does. With Flax's BatchNorm,
    running statistics trained here would differ from torchvision's for the same data, most
    in late stages where n = batch x h x w is small.

    Statistics and the affine factors are computed in float32 (or float64 if that is `dtype`);
    the output is `dtype`. Variables: params {scale, bias}, batch_stats {mean, var}.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    zero_init_scale: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
        scale = self.param('scale', scale_init, (features,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        # float32 at least, also when computing in bfloat16: sums over B x H x W values.
        stats_dtype = jnp.promote_types(self.dtype, jnp.float32)
        if train:
            mean, var = batch_moments(x, running_mean.value.astype(stats_dtype))
            if not self.is_initializing():
                count = x.size // features
                unbiased_var = var * (count / max(count - 1, 1))
                running_mean.value = ema(running_mean.value, mean, self.momentum)
                running_var.value = ema(running_var.value, unbiased_var, self.momentum)
        else:
            mean, var = running_mean.value, running_var.value
        # y = (x - mean) * s + bias == x * s + (bias - mean * s): one multiply-add per element.
        multiplier = scale.astype(stats_dtype) * jax.lax.rsqrt(var.astype(stats_dtype)
                                                              + self.epsilon)
        offset = bias.astype(stats_dtype) - mean * multiplier
        return x.astype(self.dtype) * multiplier.astype(self.dtype) + offset.astype(self.dtype)


def batch_moments(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over every axis but the last, in shift's dtype.

    One pass over x (both sums in one fusion; with a two-pass variance a BatchNorm's forward
    and backward took 40 % longer on CPU). The sums are of d = x - shift, with shift the
    running mean: once that tracks the batch mean, E[d^2] - E[d]^2 does not cancel
    catastrophically even where the mean is large against the spread.
    """
    axes = tuple(range(x.ndim - 1))
    shift = jax.lax.stop_gradient(shift)
    centred = x.astype(shift.dtype) - shift
    mean_centred = jnp.mean(centred, axes)
    var = jnp.mean(jnp.square(centred), axes) - jnp.square(mean_centred)
    return shift + mean_centred, jnp.maximum(var, 0.0)


def ema(average: jax.Array, value: jax.Array, momentum: float) -> jax.Array:
    return momentum * average + (1.0 - momentum) * value


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 (stride) -> 3x3, plus the shortcut."""

    layout: BlockLayout
    zero_init_last_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layout, types = self.layout, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(layout.width, 3, layout.stride, 'conv1', **types)(x)
        y = nn.relu(BatchNorm(name='bn1', **types)(y, train))
        y = conv(layout.width, 3, 1, 'conv2', **types)(y)
        y = BatchNorm(zero_init_scale=self.zero_init_last_bn, name='bn2', **types)(y, train)
        return nn.relu(y + shortcut(x, layout, train, **types))


class Bottleneck(nn.Module):
    """ResNet-50/101/152 block, v1.5: 1x1 -> 3x3 (stride) -> 1x1 (x4), plus the shortcut."""

    layout: BlockLayout
    zero_init_last_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layout, types = self.layout, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(layout.width, 1, 1, 'conv1', **types)(x)
        y = nn.relu(BatchNorm(name='bn1', **types)(y, train))
        y = conv(layout.width, 3, layout.stride, 'conv2', **types)(y)
        y = nn.relu(BatchNorm(name='bn2', **types)(y, train))
        y = conv(layout.out_features, 1, 1, 'conv3', **types)(y)
        y = BatchNorm(zero_init_scale=self.zero_init_last_bn, name='bn3', **types)(y, train)
        return nn.relu(y + shortcut(x, layout, train, **types))


def shortcut(x: jax.Array, layout: BlockLayout, train: bool, dtype: Dtype,
             param_dtype: Dtype) -> jax.Array:
    """Identity, or torchvision's `downsample` (1x1 conv with the block's stride, then BN).

    Called inside a block's compact __call__, so its modules belong to the block.
    """
    if not layout.downsample:
        return x
    y = conv(layout.out_features, 1, layout.stride, 'downsample_conv', dtype, param_dtype)(x)
    return BatchNorm(name='downsample_bn', dtype=dtype, param_dtype=param_dtype)(y, train)


class ResNet(nn.Module):
    """torchvision's ResNet trunk (no fc). `create_resnet(name)` builds the published depths.

    Attributes:
      blocks_per_stage: residual blocks in layer1..layer4.
      bottleneck: Bottleneck blocks (50, 101, 152) or BasicBlocks (18, 34).
      width: channels of the stem and of layer1's 3x3 convs; torchvision's is 64. Smaller widths
        make toy networks for tests and demos (their weights do not map to torchvision).
      zero_init_last_bn: start each block's last BN scale at zero, so every block starts as the
        identity (torchvision's `zero_init_residual`; Goyal et al. 2017).
      dtype: compute dtype of convs and activations (e.g. bfloat16); statistics stay float32.
      param_dtype: dtype of the parameters.
    """

    blocks_per_stage: tuple[int, ...]
    bottleneck: bool
    width: int = STEM_WIDTH
    zero_init_last_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        return self.width * 2 ** (len(self.blocks_per_stage) - 1) * (
            BOTTLENECK_EXPANSION if self.bottleneck else 1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 return_spatial: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) normalised images -> (B, C) float32 pooled features, and with
        `return_spatial` also the last stage's map (B, H/32, W/32, C) in the compute dtype."""
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.width, 7, 2, 'conv1', **types)(x.astype(self.dtype))
        x = nn.relu(BatchNorm(name='bn1', **types)(x, train))
        x = max_pool_3x3_stride_2(x)
        block = Bottleneck if self.bottleneck else BasicBlock
        for layout in block_layouts(self.blocks_per_stage, self.bottleneck, self.width):
            x = block(layout, self.zero_init_last_bn, name=layout.name, **types)(x, train)
        pooled = jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))
        return (pooled, x) if return_spatial else pooled


@jax.custom_vjp
def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
    """PyTorch's MaxPool2d(3, stride=2, padding=1) over NHWC: padding never wins (-inf).

    The gradient goes to the first maximum of each window in row-major order, as PyTorch's
    does. It is computed here from the nine strided taps (compare, select, strided scatter as a
    pad): XLA:CPU's select-and-scatter, autodiff's default, takes about 3x as long.
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pooled = max_pool_3x3_stride_2(x)
    return pooled, (x, pooled)


def max_pool_backward(residuals: tuple[jax.Array, jax.Array],
                      grad: jax.Array) -> tuple[jax.Array]:
    x, pooled = residuals
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = pooled.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    taken = jnp.zeros(pooled.shape, bool)
    grad_padded = jnp.zeros(padded.shape, grad.dtype)
    for i in range(3):
        for j in range(3):
            tap = padded[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2, :]
            first_max = (tap == pooled) & ~taken
            taken = taken | first_max
            # The transpose of the strided slice: interior padding puts values 2 apart.
            grad_padded += jax.lax.pad(
                jnp.where(first_max, grad, zero), zero,
                ((0, 0, 0), (i, padded.shape[1] - i - 2 * out_h + 1, 1),
                 (j, padded.shape[2] - j - 2 * out_w + 1, 1), (0, 0, 0)))
    return (grad_padded[:, 1:-1, 1:-1, :],)


max_pool_3x3_stride_2.defvjp(max_pool_forward, max_pool_backward)


def create_resnet(depth_or_name: int | str, **options) -> ResNet:
    """The torchvision-shaped ResNet of that depth; `options` are ResNet's other attributes."""
    spec = resnet_spec(depth_or_name)
    return ResNet(spec.blocks_per_stage, spec.bottleneck, **options)
