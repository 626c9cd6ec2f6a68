"""The post: one photo with its comments and reaction counts."""

from __future__ import annotations

import dataclasses

# Facebook's reaction set; the order fixes the layout of reaction vectors everywhere.
REACTION_TYPES = ('like', 'love', 'haha', 'wow', 'sad', 'angry', 'care')


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What decoding the image told us: its format and mode as stored, and its size as shown
    (upright: EXIF orientation applied, so a portrait photo stored sideways is tall)."""

    format: str
    width: int
    height: int
    mode: str


@dataclasses.dataclass(frozen=True)
class Post:
    """A validated post.

    `reactions` has every configured reaction type as a key (missing types are zero).
    `image` holds the encoded file bytes, or None when a reader was asked for metadata only.
    `source` says where the row came from ('posts.jsonl:17'), so every later report can point
    back at the input. `ignored_fields` names the row's fields outside the posts format (counted
    in the ingest report, not stored).
    """

    id: str
    comments: tuple[str, ...]
    reactions: dict[str, int]
    image_info: ImageInfo
    source: str
    image: bytes | None = None
    ignored_fields: tuple[str, ...] = dataclasses.field(default=(), compare=False)
