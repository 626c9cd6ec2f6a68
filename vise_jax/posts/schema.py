"""The post: one photo with its comments and reaction counts."""

from __future__ import annotations

import dataclasses

# Facebook's reaction set; the order fixes the layout of reaction vectors everywhere.
REACTION_TYPES = ('like', 'love', 'haha', 'wow', 'sad', 'angry', 'care')


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What decoding the image told us; readers use it to plan (e.g. JPEG draft decoding)."""

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
    back at the input.
    """

    id: str
    comments: tuple[str, ...]
    reactions: dict[str, int]
    image_info: ImageInfo
    source: str
    image: bytes | None = None
