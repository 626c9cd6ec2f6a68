"""Downstream sets named by a spec string, and the tasks a probe is trained and scored on.

Specs (config.eval.train / config.eval.test):

  csv:PATH                      a CSV manifest, its tasks.json beside it (inputs.csv_manifest)
  folder:ROOT                   ROOT/<class>/<image>, one task 'label' (inputs.image_folder)
  tfds:NAME:SPLIT[:DATA_DIR]    a prepared TFDS dataset (inputs.tfds_images)

A tasks.json may give each task a `kind` ('subjective', 'objective', ...): it is carried into
the results table. Train and test sets must agree on each probed task's type; test labels are
mapped onto the train set's classes by name (an image folder's classes are its sorted folder
names, so a test folder missing a class still lines up).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vise_jax import inputs as input_lib
from vise_jax.errors import InputError
from vise_jax.inputs.sources import MULTI_LABEL
from vise_jax.specs import parse_pair, spec_error

KINDS = ('csv', 'folder', 'tfds')
SPEC_GRAMMAR = 'csv:PATH | folder:ROOT | tfds:NAME:SPLIT[:DATA_DIR]'


@dataclasses.dataclass(frozen=True)
class DownstreamSet:
    """A labelled image set plus what the spec and its tasks.json say about it."""

    spec: str
    labelled: input_lib.LabelledImages
    kinds: dict[str, str]           # task -> 'subjective' | 'objective' | ... (when known)

    @property
    def description(self) -> str:
        return self.labelled.description

    def __len__(self) -> int:
        return len(self.labelled)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed downstream spec: `path` is the CSV or folder, `name`/`split`/`data_dir` TFDS's."""

    kind: str
    path: str = ''
    name: str = ''
    split: str = ''
    data_dir: str = ''


def parse_dataset_spec(spec: str, key: str = 'config.eval.train') -> DatasetSpec:
    """'csv:PATH' | 'folder:ROOT' | 'tfds:NAME:SPLIT[:DATA_DIR]' -> DatasetSpec."""
    spec = (spec or '').strip()
    if not spec:
        raise InputError(f'{key} is empty: set it to {SPEC_GRAMMAR!r}')
    kind, rest = parse_pair(spec, key, expected=SPEC_GRAMMAR)
    if kind not in KINDS:
        raise spec_error(key, spec, f'unknown dataset spec kind {kind!r}', SPEC_GRAMMAR)
    if kind != 'tfds':
        return DatasetSpec(kind, path=rest)
    name, _, rest = rest.partition(':')
    split, _, data_dir = rest.partition(':')
    if not name or not split:
        raise spec_error(key, spec, 'a TFDS set needs a name and a split',
                         'tfds:NAME:SPLIT[:DATA_DIR]')
    return DatasetSpec(kind, name=name, split=split, data_dir=data_dir)


def load_dataset(spec: str, key: str = 'config.eval.train') -> DownstreamSet:
    """The downstream set a spec names; `key` names the config key in error messages."""
    parsed = parse_dataset_spec(spec, key)
    if parsed.kind == 'csv':
        path = Path(parsed.path)
        if not path.is_file():
            raise InputError(f'{key}: downstream CSV not found: {path}' + _workdir_hint(path))
        labelled = input_lib.csv_manifest(path)
        return DownstreamSet(spec, labelled, _task_kinds(path.parent / 'tasks.json'))
    if parsed.kind == 'folder':
        if not Path(parsed.path).is_dir():
            raise InputError(f'{key}: image folder not found: {parsed.path}'
                             + _workdir_hint(parsed.path))
        return DownstreamSet(spec, input_lib.image_folder(parsed.path), {})
    return DownstreamSet(spec, input_lib.tfds_images(parsed.name, parsed.split,
                                                     parsed.data_dir or None), {})


def _workdir_hint(path: str | Path) -> str:
    # Library code takes expanded configs; a '{workdir}' here means a caller skipped that step.
    if '{workdir}' not in str(path):
        return ''
    return " (expand '{workdir}' first: configlib.with_workdir(config, workdir))"


def _task_kinds(tasks_path: Path) -> dict[str, str]:
    try:
        raw = json.loads(tasks_path.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError):
        return {}  # csv_manifest has already read it; nothing more to say
    return {name: str(spec['kind']) for name, spec in raw.items()
            if isinstance(spec, dict) and spec.get('kind')}


def select_tasks(train: DownstreamSet, test: DownstreamSet,
                 tasks: Sequence[str] = ()) -> list[str]:
    """The tasks to probe (`tasks`, or every task of the train set), checked against test."""
    names = list(tasks) or list(train.labelled.tasks)
    for name in names:
        if name not in train.labelled.tasks:
            raise InputError(f'config.eval.tasks: no task {name!r} in the train set '
                             f'{train.description}; its tasks: {sorted(train.labelled.tasks)}')
        if name not in test.labelled.tasks:
            raise InputError(f'task {name!r} of the train set is missing in the test set '
                             f'{test.description} (its tasks: {sorted(test.labelled.tasks)})')
        train_type = train.labelled.tasks[name].type
        test_type = test.labelled.tasks[name].type
        if train_type != test_type:
            raise InputError(f'task {name!r} is {train_type} in {train.description} but '
                             f'{test_type} in {test.description}')
    return names


def labels_in_train_classes(train: DownstreamSet, test: DownstreamSet,
                                 task: str) -> np.ndarray:
    """The test set's labels of `task`, as indices into the train set's classes."""
    train_classes = train.labelled.tasks[task].classes
    test_classes = test.labelled.tasks[task].classes
    labels = test.labelled.labels[task]
    if train_classes == test_classes:
        return labels
    position = {name: i for i, name in enumerate(train_classes)}
    if test.labelled.tasks[task].type == MULTI_LABEL:
        used = np.flatnonzero(labels.any(axis=0))
        unknown = [test_classes[i] for i in used if test_classes[i] not in position]
        if unknown:
            raise InputError(_unknown_classes(task, unknown, train, test))
        mapped = np.zeros((len(labels), len(train_classes)), labels.dtype)
        for i, name in enumerate(test_classes):
            if name in position:
                mapped[:, position[name]] = labels[:, i]
        return mapped
    used = {test_classes[i] for i in np.unique(labels)}
    unknown = sorted(used - set(position))
    if unknown:
        raise InputError(_unknown_classes(task, unknown, train, test))
    lookup = np.array([position.get(name, -1) for name in test_classes], np.int32)
    return lookup[labels]


def _unknown_classes(task: str, unknown: list[str], train: DownstreamSet,
                     test: DownstreamSet) -> str:
    return (f'task {task!r}: the test set {test.description} has classes the train set '
            f'{train.description} lacks: {unknown}')
