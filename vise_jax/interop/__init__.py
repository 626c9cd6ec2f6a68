"""Weights in and out of other frameworks: torchvision ResNets and the published VisE trunks."""

from vise_jax.interop.torchvision import (
    flax_to_torchvision,
    from_vise_sequential,
    is_vise_sequential,
    to_vise_sequential,
    torchvision_fc,
    torchvision_shapes,
    torchvision_to_flax,
)

__all__ = [
    'flax_to_torchvision', 'from_vise_sequential', 'is_vise_sequential', 'to_vise_sequential',
    'torchvision_fc', 'torchvision_shapes', 'torchvision_to_flax',
]
