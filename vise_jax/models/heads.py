"""The multi-task model: one ResNet backbone, one linear softmax head per engagement head.

Each pseudo-label head (engagement type x clustering K, e.g. 'comments_k1000') gets a Dense layer
on the pooled features. Variables:

  params/backbone/...          the ResNet trunk (torchvision names; vise_jax/interop)
  params/heads/<head>/{kernel, bias}
  batch_stats/backbone/...     BatchNorm running statistics

Logits and features are float32 whatever the compute dtype: the heads are a negligible share
of the FLOPs, and float32 keeps the softmax over thousands of clusters precise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vise_jax.errors import InputError
from vise_jax.models.preprocess import normalize_images
from vise_jax.models.resnet import BACKBONES, STEM_WIDTH, create_resnet

Dtype = Any

FLOAT_DTYPES = ('float32', 'bfloat16', 'float16')


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear initialisation (torchvision's fc), for a kernel or a bias: uniform
    within +-1/sqrt(fan_in) (kaiming_uniform_(a=sqrt(5)) for the weight: std 1/sqrt(3 fan_in)).

    Flax's Dense default (lecun_normal: std 1/sqrt(fan_in), sqrt(3) times this; zero bias),
    used before issue #17, made runs descend about a step ahead of torchvision's from the same
    kind of start (docs/design.md, "Initialisation")."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape, dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Heads(nn.Module):
    """A float32 Dense layer per head, each named after its head, initialised like PyTorch's
    nn.Linear (`torch_linear_init`)."""

    num_classes: Mapping[str, int]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
        init = torch_linear_init(features.shape[-1])
        return {name: nn.Dense(k, dtype=jnp.float32, param_dtype=self.param_dtype,
                               kernel_init=init, bias_init=init, name=name)(features)
                for name, k in self.num_classes.items()}


class MultiHeadResNet(nn.Module):
    """uint8 images -> (logits per head, pooled features).

    Attributes:
      backbone: a name in BACKBONES ('resnet18' ... 'resnet152').
      heads: head name -> number of classes (clusters).
      dtype: compute dtype of the backbone (bfloat16 on accelerators).
      param_dtype: dtype of every parameter.
      zero_init_last_bn: see ResNet.
      width: ResNet width; 64 is torchvision's, smaller only for toy models.
    """

    backbone: str
    heads: Mapping[str, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    zero_init_last_bn: bool = True
    width: int = STEM_WIDTH

    @nn.compact
    def __call__(self, images: jax.Array,
                 train: bool) -> tuple[dict[str, jax.Array], jax.Array]:
        """images: (B, H, W, 3) uint8. Returns ({head: (B, K) float32}, (B, C) float32)."""
        x = normalize_images(images, self.dtype)
        trunk = create_resnet(self.backbone, width=self.width,
                              zero_init_last_bn=self.zero_init_last_bn, dtype=self.dtype,
                              param_dtype=self.param_dtype, name='backbone')
        features = trunk(x, train=train).astype(jnp.float32)
        logits = Heads(self.heads, param_dtype=self.param_dtype, name='heads')(features)
        return logits, features


def create_model(model_config: Mapping[str, Any], heads: Mapping[str, int]) -> MultiHeadResNet:
    """The model that config.model describes (name, width, zero_init_last_bn, compute_dtype,
    param_dtype), with a head per entry of `heads` (name -> number of classes)."""
    name = str(model_config['name']).lower()
    if name not in BACKBONES:
        raise InputError(f'config.model.name={model_config["name"]!r} is not a known backbone; '
                         f'known: {sorted(BACKBONES)}')
    return MultiHeadResNet(
        backbone=name,
        heads=dict(checked_heads(heads)),
        dtype=float_dtype(model_config['compute_dtype'], 'config.model.compute_dtype'),
        param_dtype=float_dtype(model_config['param_dtype'], 'config.model.param_dtype'),
        zero_init_last_bn=bool(model_config['zero_init_last_bn']),
        width=checked_width(model_config.get('width', STEM_WIDTH)),
    )


def checked_heads(heads: Mapping[str, int]) -> Mapping[str, int]:
    if not heads:
        raise InputError('the model needs at least one head')
    for name, k in heads.items():
        if not isinstance(name, str) or not name or '/' in name:
            raise InputError(f'head name {name!r} must be a non-empty string without "/"')
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise InputError(f'head {name!r} has {k!r} classes; it needs a positive integer')
    return {name: int(k) for name, k in heads.items()}


def checked_width(width: Any) -> int:
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise InputError(f'config.model.width={width!r} must be a positive integer '
                         f'({STEM_WIDTH} is torchvision\'s)')
    return int(width)


def float_dtype(name: str, key: str) -> jnp.dtype:
    if name not in FLOAT_DTYPES:
        raise InputError(f'{key}={name!r} is not one of {FLOAT_DTYPES}')
    return jnp.dtype(name)


def backbone_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The ResNet trunk's {'params', 'batch_stats'} out of a MultiHeadResNet's variables, as
    `interop.torchvision.flax_to_torchvision` and `create_resnet(...).apply` take them."""
    return {'params': variables['params']['backbone'],
            'batch_stats': variables['batch_stats']['backbone']}
