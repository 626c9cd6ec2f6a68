"""Weights in and out of other frameworks: torchvision ResNets and the published VisE trunks."""

from vise_jax.interop.files import (
    read_state_dict,
    torch_available,
    write_pth,
    write_safetensors,
)
from vise_jax.interop.torchvision import (
    flax_to_torchvision,
    from_vise_sequential,
    infer_architecture,
    is_vise_sequential,
    state_dict_layout,
    to_vise_sequential,
    torchvision_fc,
    torchvision_shapes,
    torchvision_to_flax,
    width_of,
)

__all__ = [
    'flax_to_torchvision', 'from_vise_sequential', 'infer_architecture', 'is_vise_sequential',
    'read_state_dict', 'state_dict_layout', 'to_vise_sequential', 'torch_available',
    'torchvision_fc', 'torchvision_shapes', 'torchvision_to_flax', 'width_of', 'write_pth',
    'write_safetensors',
]
