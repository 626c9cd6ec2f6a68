"""Models: the torchvision-shaped ResNet family, on-device preprocessing, the multi-head wrapper."""

from vise_jax.models.heads import MultiHeadResNet, backbone_variables, create_model
from vise_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from vise_jax.models.resnet import (
    BACKBONES,
    RESNET_DEPTHS,
    ResNet,
    ResNetSpec,
    create_resnet,
    resnet_spec,
)

__all__ = [
    'BACKBONES', 'IMAGENET_MEAN', 'IMAGENET_STD', 'RESNET_DEPTHS', 'MultiHeadResNet', 'ResNet',
    'ResNetSpec', 'backbone_variables', 'create_model', 'create_resnet', 'normalize_images',
    'resnet_spec',
]
