"""Where images and their labels come from: readers of encoded image bytes by index.

An image reader has `len()`, `read(indices) -> list[bytes | None]` (None: the file is missing or
unreadable) and `describe(index)` for messages. Readers pickle small (paths, names) and open
files lazily, because Grain's worker processes are spawned and receive the pipeline by pickle.

Pretraining posts (labels come from the label store, see targets.py):
* StoreImages: the posts store written by ingest (ArrayRecord, one random read per post).
* manifest_posts: posts.jsonl + image files, parsed by the ingest's own validator
  (vise_jax.posts.validate); rows ingest would reject for their fields or a duplicate id are
  left out, so the sequence matches the store's when every image was readable at ingest.

Downstream sets for the linear probes (LabelledImages: a reader plus labels per task):
* csv_manifest: a CSV with an `image` column (paths relative to the CSV) and one column per
  task, described by a tasks.json beside it ({task: {type, column, classes}}; `type` is
  'single_label' or 'multi_label', whose cells list classes separated by '|'), as the demo
  world writes downstream/{train,test}.csv.
* image_folder: root/<class>/<image>, classes in sorted order (torchvision's ImageFolder).
* tfds_images: a registered TFDS dataset through `tfds.data_source`, image bytes undecoded.

The held-out split of the posts is a hash of each post id (`eval_membership`): stable under
reordering, new posts, seeds and process counts.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np

from vise_jax.errors import InputError
from vise_jax.posts import images, validate
from vise_jax.posts import store as store_lib

IMAGE_SUFFIXES = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
SINGLE_LABEL = 'single_label'
MULTI_LABEL = 'multi_label'
MULTI_LABEL_SEPARATOR = '|'
# File-backed readers never read more than this of one image file.
MAX_FILE_BYTES = 256 * 2 ** 20


class ImageReader(Protocol):
    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> list[bytes | None]: ...

    def describe(self, index: int) -> str: ...


class StoreImages:
    """Image bytes of a posts store by post index (batched ArrayRecord reads)."""

    def __init__(self, directory: str | os.PathLike):
        store = store_lib.PostsStore(directory)
        self.directory = str(store.directory)
        self._paths = [str(store.directory / s['images']) for s in store.index['shards']]
        self._num_posts = len(store)
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, '_source': None}

    def __len__(self) -> int:
        return self._num_posts

    def read(self, indices: Sequence[int]) -> list[bytes | None]:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        # One read at a time: the source's batched read starts a thread pool per call, which
        # costs more than it saves on local files.
        return [self._source[int(i)] for i in indices]

    def describe(self, index: int) -> str:
        return f'{self.directory}: post {index}'


class FileImages:
    """Images listed by path (or, for a manifest's image_b64 rows, given inline as bytes).

    A file is read only if it is a regular file of at most `max_bytes` (posts.images
    .read_image_file): a path to a device such as /dev/zero, a FIFO or a huge file reads as
    None (a bad image), never as an endless read.
    """

    def __init__(self, entries: Sequence[str | bytes], max_bytes: int = MAX_FILE_BYTES):
        self.entries = list(entries)
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, indices: Sequence[int]) -> list[bytes | None]:
        return [self._read_one(self.entries[int(i)]) for i in indices]

    def _read_one(self, entry: str | bytes) -> bytes | None:
        if isinstance(entry, bytes):
            return entry
        try:
            return images.read_image_file(entry, self.max_bytes)
        except (OSError, ValueError):  # missing, not a regular file, too large
            return None

    def describe(self, index: int) -> str:
        entry = self.entries[index]
        return entry if isinstance(entry, str) else f'inline image of row {index}'


class TfdsImages:
    """Encoded image bytes of a TFDS split (`tfds.data_source`, image decoding skipped)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None,
                 image_key: str = 'image'):
        self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        self._source = None
        self._length = len(self.source())

    def __getstate__(self):
        return {**self.__dict__, '_source': None}

    def source(self):
        if self._source is None:
            self._source = open_tfds(self.name, self.split, self.data_dir, self.image_key)
        return self._source

    def __len__(self) -> int:
        return self._length

    def read(self, indices: Sequence[int]) -> list[bytes | None]:
        examples = self.source().__getitems__([int(i) for i in indices])
        return [example[self.image_key] for example in examples]

    def describe(self, index: int) -> str:
        return f'tfds {self.name}[{self.split}] example {index}'


def open_tfds(name: str, split: str, data_dir: str | None, image_key: str):
    import tensorflow_datasets as tfds  # optional: only TFDS sources need it

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises many types for a missing or unprepared dataset
        raise InputError(f'cannot open TFDS dataset {name!r} split {split!r} '
                         f'(data_dir={data_dir}): {e}') from e


# --- pretraining posts ---------------------------------------------------------------------


def store_post_ids(store_dir: str | os.PathLike) -> list[str]:
    """Post ids of a posts store in index order (the labels are aligned with this sequence)."""
    return list(iter_store_post_ids(store_dir))


def iter_store_post_ids(store_dir: str | os.PathLike) -> Iterator[str]:
    """`store_post_ids` as a stream."""
    return (post.id for post in store_lib.PostsStore(store_dir).iter_meta())


def manifest_posts(manifests: Sequence[str | os.PathLike], image_root: str,
                   reaction_types: Sequence[str],
                   accepted_ids: Sequence[str] | None = None) -> tuple[FileImages, list[str]]:
    """(images, post ids) of the rows of posts.jsonl manifests, in order.

    Rows are parsed by the ingest validator. With `accepted_ids` (the posts store's ids, in
    its order: store_post_ids), exactly the rows ingest accepted are kept, so the sequence is
    the store's and labels made from the store line up, also when ingest rejected rows for
    their images; a manifest that no longer yields that sequence is an error. Without it, a row
    with a field error, or repeating an earlier row's id, is left out as ingest leaves it out,
    but rows ingest rejected for their image are kept. Images are not opened here: an image
    that has gone missing or is corrupt becomes a bad-image code in its batch.
    """
    options = validate.RowOptions(reaction_types=tuple(reaction_types), image_root=image_root)
    keep = None if accepted_ids is None else frozenset(accepted_ids)
    entries: list[str | bytes] = []
    post_ids: list[str] = []
    seen: set[str] = set()
    for line in validate.iter_manifest_lines(manifests):
        if line.is_blank:
            continue
        draft = validate.parse_line(line, options)
        if draft.post_id is None or draft.post_id in seen:
            continue
        seen.add(draft.post_id)  # the first row with an id owns it, accepted or not (as ingest)
        if (draft.errors if keep is None else draft.post_id not in keep):
            continue
        post_ids.append(draft.post_id)
        entries.append(str(draft.image_path) if draft.image_path is not None
                       else draft.image_bytes)
    if accepted_ids is not None and post_ids != list(accepted_ids):
        missing = next((i for i in accepted_ids if i not in seen), None)
        raise InputError(
            f'{[str(m) for m in manifests]} no longer hold the posts the posts store was made '
            f'from ({len(post_ids)} of its {len(accepted_ids)} posts found'
            + (f'; e.g. no row has id {missing!r}' if missing is not None else '')
            + '): rerun ingest (and the stages after it), or use input.pretrain_images=store')
    if not post_ids:
        raise InputError(f'no usable rows in {[str(m) for m in manifests]}')
    return FileImages(entries), post_ids


def eval_membership(post_ids: Iterable[str], eval_fraction: float) -> np.ndarray:
    """bool [N]: True for the posts held out for evaluation (a hash of the id < fraction)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f'input.eval_fraction must be in [0, 1), got {eval_fraction}')
    threshold = int(eval_fraction * 2 ** 64)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(post_id.encode('utf-8'), digest_size=8).digest(),
                        'little') < threshold for post_id in post_ids), dtype=bool)


# --- downstream sets -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    type: str                 # SINGLE_LABEL or MULTI_LABEL
    classes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """A downstream set: images plus, per task, int32 labels [N] (multi-label: multi-hot [N, C])."""

    images: ImageReader
    tasks: dict[str, Task]
    labels: dict[str, np.ndarray]
    description: str

    def __len__(self) -> int:
        return len(self.images)

    def task(self, name: str) -> Task:
        if name not in self.tasks:
            raise InputError(f'{self.description}: no task {name!r}; tasks: {sorted(self.tasks)}')
        return self.tasks[name]


def csv_manifest(csv_path: str | os.PathLike,
                 tasks_path: str | os.PathLike | None = None) -> LabelledImages:
    """A CSV of images and labels; tasks.json beside it (or at `tasks_path`) names the tasks."""
    csv_path = Path(csv_path)
    tasks_path = Path(tasks_path) if tasks_path else csv_path.parent / 'tasks.json'
    tasks, columns = _read_tasks(tasks_path)
    try:
        with open(csv_path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in ['image', *columns.values()]:
                if column not in header:
                    raise InputError(f'{csv_path}: no column {column!r} (header: {header})')
            rows = [(number, row) for number, row in enumerate(reader, start=2)]
    except FileNotFoundError as e:
        raise InputError(f'downstream manifest not found: {csv_path}') from e
    if not rows:
        raise InputError(f'{csv_path}: no rows')
    entries = [str(csv_path.parent / _cell(csv_path, number, row, 'image'))
               for number, row in rows]
    labels = {name: _encode_labels(csv_path, rows, columns[name], task)
              for name, task in tasks.items()}
    return LabelledImages(FileImages(entries), tasks, labels, str(csv_path))


def _read_tasks(path: Path) -> tuple[dict[str, Task], dict[str, str]]:
    try:
        raw = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError as e:
        raise InputError(f'{path} not found: a downstream CSV needs its tasks.json '
                         '({task: {"type", "column", "classes"}})') from e
    except json.JSONDecodeError as e:
        raise InputError(f'{path}: malformed JSON: {e}') from e
    tasks, columns = {}, {}
    for name, spec in raw.items():
        kind = spec.get('type', SINGLE_LABEL)
        classes = spec.get('classes')
        if kind not in (SINGLE_LABEL, MULTI_LABEL):
            raise InputError(f"{path}: task {name!r}: type must be '{SINGLE_LABEL}' or "
                             f"'{MULTI_LABEL}', got {kind!r}")
        if not isinstance(classes, list) or not classes:
            raise InputError(f'{path}: task {name!r}: field classes must be a non-empty list')
        tasks[name] = Task(name, kind, tuple(str(c) for c in classes))
        columns[name] = spec.get('column', name)
    return tasks, columns


def _cell(path: Path, number: int, row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or not value.strip():
        raise InputError(f'{path}:{number}: column {column!r} is empty')
    return value.strip()


def _encode_labels(path: Path, rows: list[tuple[int, dict[str, Any]]], column: str,
                   task: Task) -> np.ndarray:
    index = {name: i for i, name in enumerate(task.classes)}

    def class_index(number: int, name: str) -> int:
        if name not in index:
            raise InputError(f'{path}:{number}: column {column!r}: unknown class {name!r} for '
                             f'task {task.name!r}; classes: {list(task.classes)}')
        return index[name]

    if task.type == SINGLE_LABEL:
        return np.array([class_index(n, _cell(path, n, row, column)) for n, row in rows],
                        np.int32)
    multi_hot = np.zeros((len(rows), len(task.classes)), np.int32)
    for i, (number, row) in enumerate(rows):
        for name in filter(None, (row.get(column) or '').split(MULTI_LABEL_SEPARATOR)):
            multi_hot[i, class_index(number, name.strip())] = 1
    return multi_hot


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """root/<class>/<image>; one task, 'label', whose classes are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f'image folder not found: {root}')
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    entries, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob('*')):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                entries.append(str(path))
                labels.append(label)
    if not entries:
        raise InputError(f'{root}: no images in class folders (expected root/<class>/<image>)')
    task = Task('label', SINGLE_LABEL, tuple(classes))
    return LabelledImages(FileImages(entries), {'label': task},
                          {'label': np.array(labels, np.int32)}, str(root))


def tfds_images(name: str, split: str, data_dir: str | None = None, image_key: str = 'image',
                label_key: str = 'label') -> LabelledImages:
    """A TFDS split; labels are read once here (every record), images per batch later.

    A ClassLabel feature is a single-label task; a Sequence of ClassLabel (the class ids
    present, e.g. data/vise_intentonomy) a multi-label one, given as multi-hot [N, C].
    """
    images = TfdsImages(name, split, data_dir, image_key)
    source = images.source()
    feature = source.dataset_info.features[label_key]
    inner = getattr(feature, 'feature', None)  # tfds.features.Sequence(ClassLabel(...))
    multi_label = inner is not None and hasattr(inner, 'num_classes')
    class_feature = inner if multi_label else feature
    classes = tuple(getattr(class_feature, 'names', None) or
                    (str(i) for i in range(int(getattr(class_feature, 'num_classes', 0)))))
    if multi_label:
        labels = np.zeros((len(source), len(classes)), np.int32)
        for i in range(len(source)):
            labels[i, np.asarray(source[i][label_key], np.int64)] = 1
    else:
        labels = np.array([int(source[i][label_key]) for i in range(len(source))], np.int32)
    task = Task(label_key, MULTI_LABEL if multi_label else SINGLE_LABEL, classes)
    return LabelledImages(images, {label_key: task}, {label_key: labels},
                          f'tfds {name}[{split}]')
