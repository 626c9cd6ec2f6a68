"""Row validation: every way a posts row can be wrong, with the file, line and field named.

A row is checked completely (all its field errors are collected, not just the first) so that a
report of rejected rows tells the user everything to fix in one pass.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vise_jax.posts.schema import ImageInfo

KNOWN_FIELDS = frozenset({'id', 'image', 'image_b64', 'comments', 'reactions'})

# Reasons, used as keys of the rejection counts in the ingest report.
INVALID_UTF8 = 'invalid_utf8'
MALFORMED_JSON = 'malformed_json'
NOT_AN_OBJECT = 'not_an_object'
MISSING_ID = 'missing_id'
INVALID_ID = 'invalid_id'
DUPLICATE_ID = 'duplicate_id'
MISSING_IMAGE = 'missing_image'
INVALID_IMAGE_FIELD = 'invalid_image_field'
IMAGE_NOT_FOUND = 'image_not_found'
UNDECODABLE_IMAGE = 'undecodable_image'
INVALID_COMMENTS = 'invalid_comments'
NON_STRING_COMMENT = 'non_string_comment'
INVALID_REACTIONS = 'invalid_reactions'
UNKNOWN_REACTION_TYPE = 'unknown_reaction_type'
NON_NUMERIC_REACTION = 'non_numeric_reaction'
NEGATIVE_REACTION = 'negative_reaction'


@dataclasses.dataclass(frozen=True)
class FieldError:
    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field else ''
        return f'{where}{self.message}'


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A rejected row: where it was, its id if one could be read, and everything wrong with it."""

    location: str
    post_id: str | None
    errors: tuple[FieldError, ...]

    def __str__(self) -> str:
        return '; '.join(f'{self.location}: {error}' for error in self.errors)

    def to_json(self) -> dict[str, Any]:
        return {
            'location': self.location,
            'id': self.post_id,
            'errors': [dataclasses.asdict(e) for e in self.errors],
        }


@dataclasses.dataclass
class Draft:
    """A row whose fields parsed; the image is still to be read and decoded."""

    location: str
    post_id: str | None
    comments: tuple[str, ...] = ()
    reactions: dict[str, int] = dataclasses.field(default_factory=dict)
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_info: ImageInfo | None = None
    ignored_fields: tuple[str, ...] = ()
    errors: list[FieldError] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Line:
    location: str
    text: bytes
    manifest_dir: Path

    @property
    def is_blank(self) -> bool:
        return not self.text.strip()


def iter_manifest_lines(manifests: Sequence[str | os.PathLike]) -> Iterator[Line]:
    """Yields every line of the JSONL manifests, in order, with its 'file:line' location."""
    for manifest in manifests:
        manifest = Path(manifest)
        with open(manifest, 'rb') as f:
            for number, text in enumerate(f, start=1):
                yield Line(f'{manifest}:{number}', text, manifest.parent)


def parse_line(line: Line, reaction_types: Sequence[str], image_root: Path | None) -> Draft:
    """Parses one JSONL line into a Draft; problems are collected in `draft.errors`."""
    draft = Draft(location=line.location, post_id=None)
    try:
        text = line.text.decode('utf-8')
    except UnicodeDecodeError as e:
        draft.errors.append(FieldError('', INVALID_UTF8, f'not valid UTF-8 at byte {e.start}'))
        return draft
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        draft.errors.append(FieldError('', MALFORMED_JSON,
                                       f'malformed JSON: {e.msg} (column {e.colno})'))
        return draft
    if not isinstance(record, dict):
        draft.errors.append(FieldError('', NOT_AN_OBJECT,
                                       f'a row must be a JSON object, got {_kind(record)}'))
        return draft
    draft.post_id = _parse_id(record, draft.errors)
    draft.comments = _parse_comments(record.get('comments'), draft.errors)
    draft.reactions = _parse_reactions(record.get('reactions'), reaction_types, draft.errors)
    _parse_image_ref(record, draft, image_root or line.manifest_dir)
    draft.ignored_fields = tuple(sorted(set(record) - KNOWN_FIELDS))
    return draft


def _parse_id(record: dict, errors: list[FieldError]) -> str | None:
    if 'id' not in record or record['id'] is None:
        errors.append(FieldError('id', MISSING_ID, 'missing'))
        return None
    value = record['id']
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        errors.append(FieldError('id', INVALID_ID,
                                 f'must be a string or integer, got {_kind(value)}'))
        return None
    post_id = str(value)
    if not post_id.strip():
        errors.append(FieldError('id', INVALID_ID, 'is empty'))
        return None
    if not _is_encodable(post_id):
        errors.append(FieldError('id', INVALID_ID, 'not valid UTF-8 (lone surrogate escape)'))
        return None
    return post_id


def _parse_comments(value: Any, errors: list[FieldError]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append(FieldError('comments', INVALID_COMMENTS,
                                 f'must be a list of strings, got {_kind(value)}'))
        return ()
    comments = []
    for i, comment in enumerate(value):
        if not isinstance(comment, str):
            errors.append(FieldError(f'comments[{i}]', NON_STRING_COMMENT,
                                     f'must be a string, got {_kind(comment)}'))
        elif not _is_encodable(comment):
            errors.append(FieldError(f'comments[{i}]', NON_STRING_COMMENT,
                                     'not valid UTF-8 (lone surrogate escape)'))
        else:
            comments.append(comment)
    return tuple(comments)


def _parse_reactions(value: Any, reaction_types: Sequence[str],
                     errors: list[FieldError]) -> dict[str, int]:
    counts = dict.fromkeys(reaction_types, 0)
    if value is None:
        return counts
    if not isinstance(value, dict):
        errors.append(FieldError('reactions', INVALID_REACTIONS,
                                 f'must be an object of counts by type, got {_kind(value)}'))
        return counts
    for name, count in value.items():
        field = f'reactions.{name}'
        if name not in counts:
            errors.append(FieldError(field, UNKNOWN_REACTION_TYPE,
                                     f'unknown reaction type; expected one of {list(counts)}'))
            continue
        parsed = _parse_count(count)
        if isinstance(parsed, FieldError):
            errors.append(dataclasses.replace(parsed, field=field))
        else:
            counts[name] = parsed
    return counts


def _parse_count(count: Any) -> int | FieldError:
    if count is None:
        return 0
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        return FieldError('', NON_NUMERIC_REACTION, f'not a number: {count!r}')
    if isinstance(count, float) and not (math.isfinite(count) and count.is_integer()):
        return FieldError('', NON_NUMERIC_REACTION, f'not a whole number: {count!r}')
    if count < 0:
        return FieldError('', NEGATIVE_REACTION, f'negative count: {count!r}')
    return int(count)


def _parse_image_ref(record: dict, draft: Draft, image_root: Path) -> None:
    has_path, has_bytes = record.get('image') is not None, record.get('image_b64') is not None
    if has_path and has_bytes:
        draft.errors.append(FieldError('image', INVALID_IMAGE_FIELD,
                                       "give either 'image' (a path) or 'image_b64', not both"))
    elif has_path:
        value = record['image']
        if isinstance(value, str) and value.strip():
            draft.image_path = image_root / value
        else:
            draft.errors.append(FieldError('image', INVALID_IMAGE_FIELD,
                                           f'must be a non-empty path string, got {value!r}'))
    elif has_bytes:
        try:
            draft.image_bytes = base64.b64decode(record['image_b64'], validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            draft.errors.append(FieldError('image_b64', INVALID_IMAGE_FIELD,
                                           f'not valid base64: {e}'))
    else:
        draft.errors.append(FieldError('image', MISSING_IMAGE,
                                       "missing; give 'image' (a path) or 'image_b64'"))


def load_image(draft: Draft) -> None:
    """Reads the image bytes if they live in a file, and checks that they decode.

    Safe to call from worker threads: it touches only this draft, and PIL releases the GIL
    while decoding.
    """
    field = 'image' if draft.image_path is not None else 'image_b64'
    if draft.image_path is not None:
        try:
            draft.image_bytes = draft.image_path.read_bytes()
        except FileNotFoundError:
            draft.errors.append(FieldError(field, IMAGE_NOT_FOUND,
                                           f'file not found: {draft.image_path}'))
            return
        except OSError as e:
            draft.errors.append(FieldError(field, IMAGE_NOT_FOUND,
                                           f'cannot read {draft.image_path}: {e.strerror}'))
            return
    if draft.image_bytes is None:
        return
    try:
        draft.image_info = inspect_image(draft.image_bytes)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        what = draft.image_path or f'{len(draft.image_bytes)} bytes'
        draft.errors.append(FieldError(field, UNDECODABLE_IMAGE, f'cannot decode {what}: {e}'))


def inspect_image(data: bytes) -> ImageInfo:
    """Decodes the image fully (at reduced size where the codec allows) and describes it."""
    with Image.open(io.BytesIO(data)) as image:
        info = ImageInfo(format=image.format or 'unknown', width=image.width,
                         height=image.height, mode=image.mode)
        # JPEG draft mode scales the DCT down: every byte is still entropy-decoded, so truncated
        # or corrupt files fail here, at a fraction of the full decode's cost.
        image.draft('RGB', (64, 64))
        image.load()
    return info


def _is_encodable(text: str) -> bool:
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    return {dict: 'object', list: 'list', str: 'string', bool: 'boolean', type(None): 'null',
            int: 'integer', float: 'number'}.get(type(value), type(value).__name__)
