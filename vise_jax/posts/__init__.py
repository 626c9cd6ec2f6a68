"""Posts: the input format, its validation, and the ArrayRecord posts store.

See docs/data_format.md for the format a user writes.
"""

from vise_jax.posts.ingestion import FAIL, SKIP, IngestOptions, ingest, summarize
from vise_jax.posts.schema import REACTION_TYPES, ImageInfo, Post
from vise_jax.posts.store import PostsStore

__all__ = ['FAIL', 'SKIP', 'REACTION_TYPES', 'ImageInfo', 'IngestOptions', 'Post', 'PostsStore',
           'ingest', 'summarize']
