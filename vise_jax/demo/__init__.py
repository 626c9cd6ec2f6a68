"""A deterministic synthetic social world for demos and tests.

Posts have an object and a mood (independent latent factors); images show both, comments and
reactions mostly follow the mood. See world.py for the model and sample_post for the entry point.

The names below load on first use (PEP 562): `vise_jax.demo.spec` (the knobs every config reads)
must stay importable without PIL's drawing code or the generator.
"""

import importlib

_HOMES = {
    'sample_comments': 'comments',
    'render_image': 'images',
    'WorldSpec': 'spec',
    **{name: 'world' for name in ('MOODS', 'OBJECTS', 'REACTION_TYPES', 'SPLITS', 'DemoPost',
                                  'contact_sheet', 'sample_factors', 'sample_post',
                                  'sample_reactions')},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{_HOMES[name]}'), name)
