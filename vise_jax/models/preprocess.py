"""Image normalisation, run on the device as the model's first step.

The input pipeline ships uint8 NHWC images (4x less host-to-device traffic than float32); the
model turns them into ImageNet-normalised floats. torchvision's models, and the VisE trunks,
expect the same normalisation, so exported weights work with their usual transforms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's ImageNet statistics on [0, 1] RGB; recorded in export metadata.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """(..., 3) uint8 RGB in [0, 255] -> (pixel / 255 - mean) / std, in `dtype`.

    Computed in float32 as one multiply-add per element, then cast.
    """
    scale = 1.0 / (255.0 * np.asarray(IMAGENET_STD, np.float32))
    offset = -np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32)
    normalised = jnp.asarray(images, jnp.float32) * scale + offset
    return normalised.astype(dtype)
