"""Which files a manifest spec names: comma-separated paths and globs, in sorted order."""

from __future__ import annotations

import glob
from pathlib import Path

from vise_jax.errors import InputError
from vise_jax.specs import split_items


def resolve_manifests(pattern: str, key: str = 'config.posts.manifest') -> list[Path]:
    """'a.jsonl,shards/*.jsonl' -> the files, each entry's matches sorted, entries in order."""
    entries = split_items(pattern)
    if not entries:
        raise InputError(f'{key} is empty: set --{key}=PATH '
                         '(a JSONL file, a glob, or several separated by commas; '
                         'see docs/data_format.md)')
    paths = []
    for entry in entries:
        matches = sorted(glob.glob(entry))
        if not matches:
            raise InputError(f'{key}: no file matches {entry!r}')
        paths.extend(Path(m) for m in matches)
    return paths
