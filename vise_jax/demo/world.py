"""The demo social world: latent factors, reactions, and whole posts.

Each post has two independent latent factors: an object (what is in the picture) and a mood (its
subjective tone), plus a mood strength saying how clearly the post expresses that mood. The
image shows both (images.py); comments mostly follow the mood and sometimes name the object
(comments.py); reactions follow the mood only (here). So engagement signals carry the mood, and a
representation trained to predict them should beat object-supervised features on mood tasks:
the VisE hypothesis, testable without real social-media data.

Everything is a pure function of ``(spec.seed, split, index)``: each post draws from its own
numpy Generators seeded with that tuple (one stream per component, so changing how comments are
written leaves images unchanged). No global random state is read or written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vise_jax.demo import comments as comments_lib
from vise_jax.demo import images as images_lib
from vise_jax.demo.comments import sample_comments
from vise_jax.demo.images import render_image
from vise_jax.demo.spec import WorldSpec
from vise_jax.posts.schema import REACTION_TYPES

OBJECTS: tuple[str, ...] = (
    'ball',
    'house',
    'tree',
    'mountain',
    'flower',
    'car',
    'boat',
    'fish',
    'star',
    'cat',
)
MOODS: tuple[str, ...] = ('joy', 'calm', 'sadness', 'fear', 'anger', 'awe')
SPLITS = ('pretrain', 'downstream_train', 'downstream_test')

# Mean share of each reaction type at full mood strength, in REACTION_TYPES order.
REACTION_PROFILES: dict[str, tuple[float, ...]] = {
    'joy': (0.45, 0.25, 0.22, 0.04, 0.01, 0.01, 0.02),
    'calm': (0.55, 0.25, 0.02, 0.04, 0.01, 0.01, 0.12),
    'sadness': (0.20, 0.04, 0.01, 0.03, 0.50, 0.02, 0.20),
    'fear': (0.15, 0.01, 0.04, 0.35, 0.25, 0.18, 0.02),
    'anger': (0.30, 0.01, 0.05, 0.06, 0.05, 0.52, 0.01),
    'awe': (0.35, 0.25, 0.01, 0.35, 0.01, 0.01, 0.02),
}
# What a post that expresses no mood gets: mostly polite likes.
NEUTRAL_REACTION_PROFILE = (0.75, 0.12, 0.03, 0.04, 0.02, 0.02, 0.02)

_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}
# One random stream per post component, so each is stable when another changes.
_STREAM_FACTORS, _STREAM_IMAGE, _STREAM_COMMENTS, _STREAM_REACTIONS = range(4)


def _check_tables_follow_factor_order() -> None:
    """images.py and comments.py index their tables by these ids; their order must match."""
    tables = {
        'images.OBJECT_DRAWINGS': (tuple(images_lib.OBJECT_DRAWINGS), OBJECTS),
        'images.MOOD_STYLES': (tuple(images_lib.MOOD_STYLES), MOODS),
        'comments.OBJECT_NOUNS': (tuple(comments_lib.OBJECT_NOUNS), OBJECTS),
        'comments.MOOD_LEXICON': (tuple(comments_lib.MOOD_LEXICON), MOODS),
        'REACTION_PROFILES': (tuple(REACTION_PROFILES), MOODS),
    }
    for name, (keys, expected) in tables.items():
        if keys != expected:
            raise ImportError(f'{name} keys {keys} do not follow {expected}')


_check_tables_follow_factor_order()


# eq=False: the image array and reactions dict make field-wise equality and hashing meaningless;
# compare posts with post.image.tobytes() and the other fields explicitly.
@dataclasses.dataclass(frozen=True, eq=False)
class DemoPost:
    """One sampled post with its latent factors (for evaluation; a real post has none)."""

    id: str
    split: str
    object: int  # index into OBJECTS
    mood: int  # index into MOODS
    image: np.ndarray  # uint8 (image_size, image_size, 3)
    comments: tuple[str, ...]
    reactions: dict[str, int]  # every REACTION_TYPES key, counts >= 0
    mood_strength: float = 1.0  # how clearly the image and reactions express the mood

    @property
    def object_name(self) -> str:
        return OBJECTS[self.object]

    @property
    def mood_name(self) -> str:
        return MOODS[self.mood]


def post_id(split: str, index: int) -> str:
    """Stable id, unique across splits: 'pretrain-000123'."""
    return f'{split}-{index:06d}'


def _post_rng(spec: WorldSpec, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_CODES[split], index, stream])


def _validate_post_address(split: str, index: int) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
    if index < 0:
        raise ValueError(f'index must be >= 0, got {index}')


def sample_factors(spec: WorldSpec, split: str, index: int) -> tuple[int, int, float]:
    """(object id, mood id, mood strength) of a post; object and mood are independent."""
    _validate_post_address(split, index)
    rng = _post_rng(spec, split, index, _STREAM_FACTORS)
    object_id = int(rng.integers(len(OBJECTS)))
    mood_id = int(rng.integers(len(MOODS)))
    mood_strength = float(rng.uniform(spec.mood_strength_min, 1.0))
    return object_id, mood_id, mood_strength


def sample_reactions(
    mood_id: int, rng: np.random.Generator, spec: WorldSpec, mood_strength: float = 1.0
) -> dict[str, int]:
    """Reaction counts of one post, keyed by every name in REACTION_TYPES.

    The expected mix moves from a neutral, like-heavy profile to the mood's profile as
    ``mood_strength`` goes from 0 to 1; each post draws its own mix around that (Dirichlet) and
    a lognormal total. A fraction ``spec.no_reactions_rate`` of posts gets none at all.
    """
    if not 0 <= mood_id < len(MOODS):
        raise ValueError(f'mood_id must be in [0, {len(MOODS)}), got {mood_id}')
    if not 0.0 <= mood_strength <= 1.0:
        raise ValueError(f'mood_strength must be in [0, 1], got {mood_strength}')
    if rng.random() < spec.no_reactions_rate:
        return dict.fromkeys(REACTION_TYPES, 0)
    profile = np.asarray(REACTION_PROFILES[MOODS[mood_id]])
    expected_mix = mood_strength * profile + (1 - mood_strength) * np.asarray(
        NEUTRAL_REACTION_PROFILE
    )
    mix = rng.dirichlet(spec.reaction_concentration * expected_mix)
    total = int(round(rng.lognormal(math.log(spec.reaction_median), spec.reaction_log_sigma)))
    counts = rng.multinomial(total, mix)
    return {name: int(count) for name, count in zip(REACTION_TYPES, counts, strict=True)}


def sample_post(spec: WorldSpec, split: str, index: int) -> DemoPost:
    """The post at ``index`` of ``split``: a pure function of (spec, split, index)."""
    object_id, mood_id, mood_strength = sample_factors(spec, split, index)
    image = render_image(
        object_id,
        mood_id,
        _post_rng(spec, split, index, _STREAM_IMAGE),
        spec.image_size,
        mood_strength,
    )
    comments = sample_comments(
        object_id, mood_id, _post_rng(spec, split, index, _STREAM_COMMENTS), spec
    )
    reactions = sample_reactions(
        mood_id, _post_rng(spec, split, index, _STREAM_REACTIONS), spec, mood_strength
    )
    return DemoPost(
        id=post_id(split, index),
        split=split,
        object=object_id,
        mood=mood_id,
        image=image,
        comments=comments,
        reactions=reactions,
        mood_strength=mood_strength,
    )


def contact_sheet(posts: Sequence[DemoPost], columns: int = 8, scale: int = 2) -> Image.Image:
    """A grid of post images, each enlarged ``scale`` times and labelled 'object/mood'."""
    if not posts:
        raise ValueError('contact_sheet needs at least one post')
    if columns < 1 or scale < 1:
        raise ValueError(f'columns and scale must be >= 1, got {columns} and {scale}')
    font = ImageFont.load_default(size=10)
    labels = [f'{post.object_name}/{post.mood_name}' for post in posts]
    label_width = max(math.ceil(font.getlength(label)) for label in labels) + 4
    image_size = max(max(post.image.shape[:2]) for post in posts) * scale
    cell_width, label_height = max(image_size, label_width), 14
    cell_height = image_size + label_height
    rows = math.ceil(len(posts) / columns)
    sheet = Image.new('RGB', (min(columns, len(posts)) * cell_width, rows * cell_height), 'white')
    draw = ImageDraw.Draw(sheet)
    for position, (post, label) in enumerate(zip(posts, labels, strict=True)):
        left = (position % columns) * cell_width
        top = (position // columns) * cell_height
        height, width = post.image.shape[:2]
        tile = Image.fromarray(post.image).resize(
            (width * scale, height * scale), Image.Resampling.NEAREST
        )
        sheet.paste(tile, (left + (cell_width - tile.width) // 2, top))
        draw.text((left + 2, top + image_size + 1), label, fill='black', font=font)
    return sheet
