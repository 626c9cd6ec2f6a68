"""A deterministic synthetic social world for demos and tests.

Posts have an object and a mood (independent latent factors); images show both, comments and
reactions mostly follow the mood. See world.py for the model and sample_post for the entry point.
"""

from vise_jax.demo.comments import sample_comments
from vise_jax.demo.images import render_image
from vise_jax.demo.world import (
    MOODS,
    OBJECTS,
    REACTION_TYPES,
    SPLITS,
    DemoPost,
    WorldSpec,
    contact_sheet,
    sample_factors,
    sample_post,
    sample_reactions,
)

__all__ = [
    'MOODS',
    'OBJECTS',
    'REACTION_TYPES',
    'SPLITS',
    'DemoPost',
    'WorldSpec',
    'contact_sheet',
    'render_image',
    'sample_comments',
    'sample_factors',
    'sample_post',
    'sample_reactions',
]
