"""Row validation: every way a posts row can be wrong, with the file, line and field named.

A row is checked completely (all its field errors are collected, not just the first) so that a
report of rejected rows tells the user everything to fix in one pass. Nothing a row holds can
stop the ingest: every failure to read, parse or decode it becomes that row's rejection.

The unit of work is one row, a pure function of (line bytes, file, line number, options):

* `validate_row(text, file, line_number, options) -> Post | Rejection | None` does it all
  (None: a blank line, which is not a row). Both ingest runners call it, per row.
* It is `parse_row` (the JSON and its fields, no file I/O), then `load_image` (read the image
  with its limits, decode it, optionally re-encode it), then `Draft.result()`.
* Duplicate ids are the one check across rows: `mark_duplicate(result, first_location)` turns
  a later row with an id already seen into its rejection (the first row keeps the id).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vise_jax.errors import InputError
from vise_jax.posts import images
from vise_jax.posts.schema import ImageInfo, Post

KNOWN_FIELDS = frozenset({'id', 'image', 'image_b64', 'comments', 'reactions'})
# A reaction count above this is an error in the data, not a popular post. It keeps counts, and
# the sum of all seven, exact in float64 (< 2**53) wherever they are featurised.
MAX_REACTION_COUNT = 10 ** 12
UTF8_BOM = b'\xef\xbb\xbf'
# Integers with more digits than this are kept as their text (see _LongInteger).
_MAX_INT_DIGITS = 100
# Ingest checks every image decodes; JPEGs at a reduction that keeps at least this many pixels.
_CHECK_SIZE = 64

# Reasons, used as keys of the rejection counts in the ingest report.
ROW_TOO_LONG = 'row_too_long'
INVALID_UTF8 = 'invalid_utf8'
MALFORMED_JSON = 'malformed_json'
NOT_AN_OBJECT = 'not_an_object'
MISSING_ID = 'missing_id'
INVALID_ID = 'invalid_id'
DUPLICATE_ID = 'duplicate_id'
MISSING_IMAGE = 'missing_image'
INVALID_IMAGE_FIELD = 'invalid_image_field'
IMAGE_NOT_FOUND = 'image_not_found'
IMAGE_NOT_A_FILE = 'image_not_a_file'
IMAGE_OUTSIDE_ROOT = 'image_outside_root'
IMAGE_TOO_LARGE = 'image_too_large'
UNDECODABLE_IMAGE = 'undecodable_image'
INVALID_COMMENTS = 'invalid_comments'
NON_STRING_COMMENT = 'non_string_comment'
INVALID_REACTIONS = 'invalid_reactions'
UNKNOWN_REACTION_TYPE = 'unknown_reaction_type'
NON_NUMERIC_REACTION = 'non_numeric_reaction'
NEGATIVE_REACTION = 'negative_reaction'
REACTION_TOO_LARGE = 'reaction_too_large'


@dataclasses.dataclass(frozen=True)
class RowOptions:
    """What decides whether a row is accepted and what is stored for it (config.ingest.*)."""

    reaction_types: tuple[str, ...]
    image_root: str = ''                 # relative image paths resolve here ('' = manifest dir)
    confine_images: bool = False         # reject image paths that resolve outside that folder
    max_row_bytes: int = 128 * 2 ** 20   # a longer line is rejected unread
    max_image_bytes: int = 64 * 2 ** 20  # a larger image file (or image_b64) is rejected
    max_image_pixels: int = 64_000_000   # config.input.max_image_pixels: training skips larger
    max_side: int = 0                    # > 0: re-encode as JPEG with resize_side <= max_side
    resize_side: str = images.SHORTER    # 'shorter' or 'longer'
    jpeg_quality: int = 90               # of the re-encoded JPEGs

    def __post_init__(self):
        if not self.reaction_types or len(set(self.reaction_types)) != len(self.reaction_types):
            raise InputError('posts.reaction_types must be distinct names, '
                             f'got {self.reaction_types}')
        for key in ('max_row_bytes', 'max_image_bytes', 'max_image_pixels'):
            if getattr(self, key) < 1:
                raise InputError(f'{_config_key(key)} must be positive, got {getattr(self, key)}')
        if self.max_side < 0:
            raise InputError(f'ingest.max_side must be >= 0 (0 = keep the image bytes), '
                             f'got {self.max_side}')
        if self.resize_side not in (images.SHORTER, images.LONGER):
            raise InputError(f"ingest.resize_side must be '{images.SHORTER}' or "
                             f"'{images.LONGER}', got {self.resize_side!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise InputError(f'ingest.jpeg_quality must be in [1, 95], got {self.jpeg_quality}')

    def store_fingerprint(self) -> dict[str, Any]:
        """The options that change which rows are accepted or the bytes stored for them."""
        fields = dataclasses.asdict(self)
        if not self.max_side:  # nothing is re-encoded: how it would be does not matter
            del fields['resize_side'], fields['jpeg_quality']
        else:  # the JPEG encoder's bytes
            fields['pillow'] = Image.__version__
        return fields


def _config_key(key: str) -> str:
    return f"{'input' if key == 'max_image_pixels' else 'ingest'}.{key}"


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
    file: str = ''
    line: int = 0

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
    file: str = ''
    line: int = 0
    comments: tuple[str, ...] = ()
    reactions: dict[str, int] = dataclasses.field(default_factory=dict)
    image_root: Path | None = None
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_info: ImageInfo | None = None
    ignored_fields: tuple[str, ...] = ()
    errors: list[FieldError] = dataclasses.field(default_factory=list)

    def result(self) -> Post | Rejection:
        if self.errors:
            return Rejection(self.location, self.post_id, tuple(self.errors), self.file,
                             self.line)
        return Post(id=self.post_id, comments=self.comments, reactions=self.reactions,
                    image_info=self.image_info, source=self.location, image=self.image_bytes,
                    ignored_fields=self.ignored_fields)


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a manifest: its file, 1-based number and bytes (newline included)."""

    file: str
    number: int
    text: bytes

    @property
    def location(self) -> str:
        return f'{self.file}:{self.number}'

    @property
    def is_blank(self) -> bool:
        return is_blank_line(self.text, self.number)


def is_blank_line(text: bytes, line_number: int) -> bool:
    if line_number == 1 and text.startswith(UTF8_BOM):
        text = text[len(UTF8_BOM):]
    return not text.strip()


def iter_manifest_lines(manifests: Sequence[str | os.PathLike],
                        max_row_bytes: int = RowOptions.max_row_bytes) -> Iterator[Line]:
    """Yields every line of the JSONL manifests, in order, with its file and line number.

    A line longer than max_row_bytes is not held in memory: its first max_row_bytes + 1 bytes
    stand for it (parse_row rejects it as too long), the rest is skipped.
    """
    for manifest in manifests:
        yield from iter_file_lines(manifest, max_row_bytes)


def iter_file_lines(manifest: str | os.PathLike, max_row_bytes: int = RowOptions.max_row_bytes,
                    *, offset: int = 0, number: int = 0,
                    with_offsets: bool = False) -> Iterator[Line] | Iterator[tuple[int, Line]]:
    """The lines of one manifest from byte `offset`, where line `number` + 1 starts (the start
    of the file by default); with `with_offsets`, (byte offset of the line, line) pairs."""
    with open(manifest, 'rb') as f:
        f.seek(offset)
        while True:
            start = offset
            text = f.readline(max_row_bytes + 1)
            if not text:
                return
            offset += len(text)
            number += 1
            if len(text) > max_row_bytes and not text.endswith(b'\n'):
                while rest := f.readline(1 << 20):
                    offset += len(rest)
                    if rest.endswith(b'\n'):
                        break
            line = Line(str(manifest), number, text)
            yield (start, line) if with_offsets else line


def validate_row(text: bytes, file: str | os.PathLike, line_number: int,
                 options: RowOptions) -> Post | Rejection | None:
    """One manifest line -> the accepted post, its rejection, or None for a blank line.

    Deterministic, touching nothing but the row's image file: the same line, file contents and
    options give the same result (the same stored bytes). Duplicate ids are for the caller
    (mark_duplicate).
    """
    if is_blank_line(text, line_number):
        return None
    draft = parse_row(text, file, line_number, options)
    load_image(draft, options)
    return draft.result()


def mark_duplicate(result: Post | Rejection, first_location: str) -> Rejection:
    """A row whose id an earlier row (at first_location) holds: its rejection."""
    error = FieldError('id', DUPLICATE_ID,
                       f'duplicate id {_post_id(result)!r} (first seen at {first_location})')
    if isinstance(result, Rejection):
        return dataclasses.replace(result, errors=(*result.errors, error))
    file, _, line = result.source.rpartition(':')
    return Rejection(result.source, result.id, (error,), file, int(line))


def _post_id(result: Post | Rejection) -> str | None:
    return result.post_id if isinstance(result, Rejection) else result.id


def parse_line(line: Line, options: RowOptions) -> Draft:
    return parse_row(line.text, line.file, line.number, options)


def parse_row(text: bytes, file: str | os.PathLike, line_number: int,
              options: RowOptions) -> Draft:
    """Parses one JSONL line into a Draft; problems are collected in `draft.errors`.

    No file is opened: the image is read by load_image.
    """
    file = str(file)
    draft = Draft(location=f'{file}:{line_number}', post_id=None, file=file, line=line_number)
    if len(text) > options.max_row_bytes:
        draft.errors.append(FieldError('', ROW_TOO_LONG,
                                       f'line longer than ingest.max_row_bytes='
                                       f'{options.max_row_bytes:,} bytes'))
        return draft
    offset = 0
    if line_number == 1 and text.startswith(UTF8_BOM):  # a BOM is allowed at the file's start
        offset = len(UTF8_BOM)
    try:
        decoded = text[offset:].decode('utf-8')
    except UnicodeDecodeError as e:
        draft.errors.append(FieldError(
            '', INVALID_UTF8, f'not valid UTF-8 at byte {offset + e.start + 1} of the line'))
        return draft
    record = _parse_json(decoded.removesuffix('\n').removesuffix('\r'), draft.errors)
    if record is None:
        return draft
    if not isinstance(record, dict):
        draft.errors.append(FieldError('', NOT_AN_OBJECT,
                                       f'a row must be a JSON object, got {_kind(record)}'))
        return draft
    draft.post_id = _parse_id(record, draft.errors)
    draft.comments = _parse_comments(record.get('comments'), draft.errors)
    draft.reactions = _parse_reactions(record.get('reactions'), options.reaction_types,
                                       draft.errors)
    draft.image_root = Path(options.image_root) if options.image_root else Path(file).parent
    _parse_image_ref(record, draft, options)
    draft.ignored_fields = tuple(sorted(set(record) - KNOWN_FIELDS))
    return draft


class _LongInteger:
    """A JSON integer too long to be a count, kept as its digits.

    Python refuses to convert integers over 4,300 digits (a ValueError out of json.loads with
    no field named); this keeps the row parsing so the field can be named.
    """

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f'{self.digits[:12]}...({len(self.digits):,} digits)'


def _json_int(digits: str) -> int | _LongInteger:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else _LongInteger(digits)


def _parse_json(text: str, errors: list[FieldError]) -> Any:
    """The row's JSON value, or None after recording why it has none."""
    try:
        value = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:  # e.pos counts characters from the line's start
        message = f'malformed JSON: {e.msg} (column {e.pos + 1})'
    except RecursionError:
        message = 'malformed JSON: nested too deeply'
    except (ValueError, MemoryError) as e:
        message = f'malformed JSON: {_shorten(str(e))}'
    else:
        if value is None:
            errors.append(FieldError('', NOT_AN_OBJECT, 'a row must be a JSON object, got null'))
        return value
    errors.append(FieldError('', MALFORMED_JSON, message))
    return None


def _parse_id(record: dict, errors: list[FieldError]) -> str | None:
    if 'id' not in record or record['id'] is None:
        errors.append(FieldError('id', MISSING_ID, 'missing'))
        return None
    value = record['id']
    if isinstance(value, _LongInteger):
        return value.digits
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
    too_large = FieldError('', REACTION_TOO_LARGE,
                           f'count {count!r} is more than the maximum {MAX_REACTION_COUNT:,}')
    if isinstance(count, _LongInteger):
        return too_large if not count.digits.startswith('-') else FieldError(
            '', NEGATIVE_REACTION, f'negative count: {count!r}')
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        return FieldError('', NON_NUMERIC_REACTION, f'not a number: {_shorten(repr(count))}')
    if isinstance(count, float) and count == math.inf:  # 1e400 parses as inf
        return too_large
    if isinstance(count, float) and not (math.isfinite(count) and count.is_integer()):
        return FieldError('', NON_NUMERIC_REACTION, f'not a whole number: {count!r}')
    if count < 0:
        return FieldError('', NEGATIVE_REACTION, f'negative count: {_shorten(repr(count))}')
    if count > MAX_REACTION_COUNT:
        return dataclasses.replace(too_large, message=(
            f'count {_shorten(repr(count))} is more than the maximum {MAX_REACTION_COUNT:,}'))
    return int(count)


def _parse_image_ref(record: dict, draft: Draft, options: RowOptions) -> None:
    has_path, has_bytes = record.get('image') is not None, record.get('image_b64') is not None
    if has_path and has_bytes:
        draft.errors.append(FieldError('image', INVALID_IMAGE_FIELD,
                                       "give either 'image' (a path) or 'image_b64', not both"))
    elif has_path:
        value = record['image']
        if not isinstance(value, str) or not value.strip():
            draft.errors.append(FieldError('image', INVALID_IMAGE_FIELD,
                                           f'must be a non-empty path string, '
                                           f'got {_shorten(repr(value))}'))
        elif '\x00' in value or not _is_encodable(value):
            draft.errors.append(FieldError('image', INVALID_IMAGE_FIELD,
                                           'not a valid path (NUL character or lone surrogate)'))
        else:
            draft.image_path = draft.image_root / value
    elif has_bytes:
        value = record['image_b64']
        # Checked before decoding: base64 holds 3 bytes in every 4 characters.
        if isinstance(value, str) and len(value) // 4 * 3 > options.max_image_bytes + 3:
            draft.errors.append(FieldError(
                'image_b64', IMAGE_TOO_LARGE, f'about {len(value) // 4 * 3:,} bytes, more than '
                f'ingest.max_image_bytes={options.max_image_bytes:,}'))
            return
        try:
            draft.image_bytes = base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            draft.errors.append(FieldError('image_b64', INVALID_IMAGE_FIELD,
                                           f'not valid base64: {e}'))
            return
        if len(draft.image_bytes) > options.max_image_bytes:
            draft.errors.append(FieldError(
                'image_b64', IMAGE_TOO_LARGE, f'{len(draft.image_bytes):,} bytes, more than '
                f'ingest.max_image_bytes={options.max_image_bytes:,}'))
            draft.image_bytes = None
    else:
        draft.errors.append(FieldError('image', MISSING_IMAGE,
                                       "missing; give 'image' (a path) or 'image_b64'"))


def load_image(draft: Draft, options: RowOptions) -> None:
    """Reads the image bytes if they live in a file, checks that they decode, re-encodes them
    when options.max_side is set. Problems go to draft.errors; nothing is raised.

    Safe to call from worker threads: it touches only this draft, and PIL releases the GIL
    while decoding.
    """
    if draft.image_path is not None:
        _read_image_file(draft, options)
    if draft.image_bytes is None:
        return
    field = 'image' if draft.image_path is not None else 'image_b64'
    what = (str(draft.image_path) if draft.image_path is not None
            else f'the inline image ({len(draft.image_bytes):,} bytes)')
    try:
        draft.image_bytes, draft.image_info = _decode(draft.image_bytes, options)
    except images.TooLarge as e:
        draft.errors.append(FieldError(field, IMAGE_TOO_LARGE, f'{what}: {e} '
                                       f'(input.max_image_pixels={options.max_image_pixels:,})'))
    except Exception as e:  # noqa: BLE001 -- whatever a hostile file makes Pillow raise is the
        # row's problem, never the ingest's
        detail = str(e) if isinstance(e, images.DECODE_ERRORS) else f'{type(e).__name__}: {e}'
        # Pillow names the in-memory file by its address ('<_io.BytesIO object at 0x7f..>'):
        # the same bytes must give the same rejection on every run.
        detail = re.sub(r'<_io\.BytesIO object at 0x[0-9a-f]+>', 'the bytes', detail)
        draft.errors.append(FieldError(field, UNDECODABLE_IMAGE,
                                       f'cannot decode {what}: {_shorten(detail, 300)}'))
    if draft.errors:
        draft.image_bytes = None  # a rejected row holds no image in memory


def _read_image_file(draft: Draft, options: RowOptions) -> None:
    path = draft.image_path
    if options.confine_images and not images.confined(path, draft.image_root):
        draft.errors.append(FieldError(
            'image', IMAGE_OUTSIDE_ROOT, f'{path} resolves to {os.path.realpath(path)}, outside '
            f'{os.path.realpath(draft.image_root)} (ingest.confine_images=True)'))
        return
    try:
        draft.image_bytes = images.read_image_file(path, options.max_image_bytes)
    except FileNotFoundError:
        draft.errors.append(FieldError('image', IMAGE_NOT_FOUND, f'file not found: {path}'))
    except images.NotARegularFile:
        draft.errors.append(FieldError('image', IMAGE_NOT_A_FILE,
                                       f'not a regular file (a device, FIFO or folder): {path}'))
    except images.TooLarge as e:
        draft.errors.append(FieldError('image', IMAGE_TOO_LARGE, f'{path}: {e} '
                                       f'(ingest.max_image_bytes={options.max_image_bytes:,})'))
    except (OSError, ValueError) as e:
        draft.errors.append(FieldError('image', IMAGE_NOT_FOUND,
                                       f'cannot read {path}: {getattr(e, "strerror", None) or e}'))


def _decode(data: bytes, options: RowOptions) -> tuple[bytes, ImageInfo]:
    """(the bytes to store, what they hold): the image decoded completely, as training will.

    JPEGs decode at a DCT reduction, which still entropy-decodes every byte, so truncated or
    corrupt files fail here at a fraction of the full decode's cost. With options.max_side,
    the image is stored re-encoded, upright, resized (see docs/data_format.md).
    """
    with images.open_image(data, options.max_image_pixels) as opened:
        info = opened.info()
        size = (opened.width, opened.height)
        if options.max_side:
            size = images.fit_size(opened.width, opened.height, options.max_side,
                                   options.resize_side)
        keep = (not options.max_side or (
            size == (opened.width, opened.height) and info.format == 'JPEG'
            and info.mode in ('RGB', 'L') and opened.orientation == 1))
        if keep:
            opened.decode(opened.draft_scale_for(_CHECK_SIZE, _CHECK_SIZE))
            return data, info
        rgb, _ = opened.decode(opened.draft_scale_for(*size))
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        return (images.encode_jpeg(rgb, options.jpeg_quality),
                ImageInfo(format='JPEG', width=size[0], height=size[1], mode='RGB'))


def _shorten(text: str, limit: int = 40) -> str:
    if len(text) <= limit:
        return text
    return f'{text[:limit // 2]}...{text[-8:]} ({len(text):,} characters)'


def _is_encodable(text: str) -> bool:
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    if isinstance(value, _LongInteger):
        return 'integer'
    return {dict: 'object', list: 'list', str: 'string', bool: 'boolean', type(None): 'null',
            int: 'integer', float: 'number'}.get(type(value), type(value).__name__)
