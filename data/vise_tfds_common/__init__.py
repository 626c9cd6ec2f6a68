"""What the manual-download TFDS builders under data/ share.

Each builder reads a dataset its publishers distribute by hand (a form, an email, a script
that fetches the images) from a `manual_dir` laid out as the release unpacks, checks every
annotation row before anything is written, and writes ArrayRecord files (no TensorFlow needed),
which `tfds.data_source` and `vise_jax.inputs.tfds_images` read with the image bytes undecoded.

Errors name the file and row: `AnnotationError` (an InputError, so launch scripts print it
without a traceback). Where a dataset publishes no split, `splits/<split>.txt` lists in the
dataset root fix one; without them a hash of each image id assigns it (stable under reordering
and additions).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from vise_jax.errors import InputError

IMAGE_SUFFIXES = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
SPLIT_LISTS_DIR = 'splits'
IGNORED_NAMES = frozenset({'__MACOSX', '.DS_Store', 'Thumbs.db', 'desktop.ini', SPLIT_LISTS_DIR})

log = logging.getLogger('vise_tfds')


class AnnotationError(InputError):
    """A file of a manual_dir is missing or malformed; the message names the file and row."""


def at(path: Path | str, row: int | str | None = None) -> str:
    """'path:row' for messages (row: a line number, or e.g. 'annotation 12')."""
    if row is None:
        return str(path)
    return f'{path}:{row}' if isinstance(row, int) else f'{path} ({row})'


def image_feature() -> tfds.features.Image:
    """Encoded image bytes stored as given (JPEG, PNG, ...); readers decode them."""
    return tfds.features.Image(shape=(None, None, 3))


def find_root(manual_dir: Path, marker: str, dataset: str, depth: int = 2) -> Path:
    """The folder holding `marker`: manual_dir, or one a level or two below it.

    Archives unpack into a top folder of their own (Emotion6/, emotion_dataset/, ...); users
    may point manual_dir at either side of it.
    """
    level = [manual_dir]
    for _ in range(depth + 1):
        for folder in level:
            if (folder / marker).exists():
                return folder
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and child.name not in IGNORED_NAMES]
    raise AnnotationError(f'{dataset}: {marker!r} not found in manual_dir {manual_dir} (nor up '
                          f'to {depth} folders below it); see the MANUAL_DOWNLOAD_INSTRUCTIONS '
                          f'in data/README.md')


def require_image(root: Path, relative: str, where: str) -> Path:
    """root/relative, which must be a non-empty file: else an error naming the row."""
    path = root / relative
    if not path.is_file():
        raise AnnotationError(f'{where}: image {relative!r} not found (expected {path})')
    if path.stat().st_size == 0:
        raise AnnotationError(f'{where}: image {relative!r} is an empty file ({path})')
    return path


def class_folders(root: Path, classes: Sequence[str], dataset: str) -> dict[str, Path]:
    """root/<class>/ for each class; a folder that is not a class is an error."""
    folders = {p.name: p for p in sorted(root.iterdir())
               if p.is_dir() and p.name not in IGNORED_NAMES and not p.name.startswith('.')}
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise AnnotationError(f'{dataset}: {root}: unknown class folder(s) {unknown}; classes: '
                              f'{list(classes)}')
    missing = [c for c in classes if c not in folders]
    if missing:
        raise AnnotationError(f'{dataset}: {root}: no folder for class(es) {missing}')
    return folders


def images_under(folder: Path, dataset: str) -> Iterator[Path]:
    """Image files below a folder, at any depth, in sorted order (hidden files left out); an
    empty image file is an error."""
    for path in sorted(folder.rglob('*')):
        if (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                and not any(part.startswith('.') or part in IGNORED_NAMES
                            for part in path.relative_to(folder).parts)):
            if path.stat().st_size == 0:
                raise AnnotationError(f'{dataset}: empty image file {path}')
            yield path


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for a key."""
    digest = hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(digest, 'little') / 2 ** 64


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """The split whose share of [0, 1) the key's hash falls in (fractions in split order)."""
    value, upper = hash_fraction(key), 0.0
    for split, fraction in fractions.items():
        upper += fraction
        if value < upper:
            return split
    return list(fractions)[-1]


def read_split_lists(root: Path, splits: Sequence[str]) -> dict[str, str] | None:
    """{image id: split} from root/splits/<split>.txt (one id a line, '#' comments), if present.

    Lists, when there, must cover every split; an id listed twice is an error.
    """
    folder = root / SPLIT_LISTS_DIR
    if not folder.is_dir():
        return None
    assignment: dict[str, str] = {}
    first_seen: dict[str, str] = {}
    for split in splits:
        path = folder / f'{split}.txt'
        if not path.is_file():
            raise AnnotationError(f'{folder}: split lists must cover every split {list(splits)};'
                                  f' {path.name} is missing')
        for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
            image_id = line.split('#', 1)[0].strip()
            if not image_id:
                continue
            if image_id in assignment:
                raise AnnotationError(f'{at(path, number)}: {image_id!r} is already listed at '
                                      f'{first_seen[image_id]}')
            assignment[image_id] = split
            first_seen[image_id] = at(path, number)
    return assignment


def assign_splits(records: Sequence[dict[str, Any]], root: Path,
                  fractions: Mapping[str, float], dataset: str,
                  counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Records by split: from root/splits/*.txt if present, else by a hash of the image id.

    With split lists, records they leave out are dropped and counted (counts['unlisted']); a
    listed id with no record is an error.
    """
    by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in fractions}
    lists = read_split_lists(root, list(fractions))
    if lists is None:
        counts['split_source'] = f'hash of image_id, fractions {dict(fractions)}'
        for record in records:
            by_split[hash_split(record['image_id'], fractions)].append(record)
        return by_split
    counts['split_source'] = f'{root / SPLIT_LISTS_DIR}/*.txt'
    known = {record['image_id'] for record in records}
    unknown = sorted(set(lists) - known)
    if unknown:
        raise AnnotationError(f'{dataset}: {root / SPLIT_LISTS_DIR}: {len(unknown)} listed image '
                              f'id(s) are not in the dataset, e.g. {unknown[:3]}')
    unlisted = 0
    for record in records:
        split = lists.get(record['image_id'])
        if split is None:
            unlisted += 1
        else:
            by_split[split].append(record)
    counts['unlisted'] = unlisted
    return by_split


class ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder reading a manual_dir into {split: [example dict]} before anything is written.

    Subclasses define `_info` and `_read_manual_dir(manual_dir, counts)`; each example dict has
    an 'image_id' (its key) and the features. `counts` ends up in the dataset's metadata
    (skipped rows, how splits were made) and in the log.
    """

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release.'}
    SPLITS: tuple[str, ...] = ('train', 'test')

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9 finds a builder package's file through `importlib_resources`, a backport it
        # does not install on Python >= 3.9 (ModuleNotFoundError); the file is what it wants.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        # ArrayRecord: random access for tfds.data_source, and no TensorFlow needed to write.
        super().__init__(file_format=file_format or 'array_record', **kwargs)

    def _read_manual_dir(self, manual_dir: Path,
                         counts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS's word for a manual_dir that is missing or empty
            raise AnnotationError(f'{self.name}: {e}') from None
        counts: dict[str, Any] = {}
        by_split = self._read_manual_dir(manual_dir, counts)
        for split in self.SPLITS:
            if not by_split.get(split):
                raise AnnotationError(f'{self.name}: split {split!r} has no examples (read from '
                                      f'{manual_dir}; {counts})')
        counts['examples'] = {split: len(by_split[split]) for split in self.SPLITS}
        log.info('%s: %s', self.name, counts)
        if self.info.metadata is not None:
            self.info.metadata.update(counts)
        return {split: self._generate_examples(by_split[split]) for split in self.SPLITS}

    def _generate_examples(self, records: Sequence[dict[str, Any]]):
        for record in records:
            yield record['image_id'], record
