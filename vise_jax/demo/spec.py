"""The demo world's knobs, light to import: configs read their defaults without the generator."""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_IMAGE_SIZE = 16   # smallest image the drawings stay recognisable at


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """All knobs of the demo world. Rates are probabilities in [0, 1]."""

    seed: int = 0
    image_size: int = 64
    mean_comments: float = 3.0
    max_comments: int = 12
    # Gamma shape of the per-post comment rate: smaller means more posts with no comments and
    # more with many; very large gives plain Poisson counts.
    comment_count_shape: float = 2.0
    comment_mood_fidelity: float = 0.75  # prob. a comment reflects the post's true mood
    object_mention_rate: float = 0.3
    off_topic_rate: float = 0.1
    typo_rate: float = 0.03
    no_reactions_rate: float = 0.05
    reaction_median: float = 30.0  # median total reactions of a post that gets any
    reaction_log_sigma: float = 1.2  # spread of the lognormal total
    # Dirichlet concentration around the mood profile: smaller means noisier per-post mixes.
    reaction_concentration: float = 15.0
    mood_strength_min: float = 0.35  # per-post mood expression strength in [min, 1]

    def __post_init__(self):
        for name in ('seed', 'image_size', 'max_comments'):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f'{name} must be an int, got {value!r}')
        if self.seed < 0:
            raise ValueError(f'seed must be >= 0, got {self.seed}')
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f'image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}'
            )
        for name in (
            'comment_mood_fidelity',
            'object_mention_rate',
            'off_topic_rate',
            'typo_rate',
            'no_reactions_rate',
            'mood_strength_min',
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {value}')
        for name in ('mean_comments', 'max_comments', 'reaction_log_sigma'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        for name in ('comment_count_shape', 'reaction_median', 'reaction_concentration'):
            if not getattr(self, name) > 0:
                raise ValueError(f'{name} must be > 0, got {getattr(self, name)}')
