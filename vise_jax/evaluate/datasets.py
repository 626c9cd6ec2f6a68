"""Downstream sets named by a spec string, and the tasks a probe is trained and scored on.

Specs (config.eval.train / config.eval.test; '{workdir}' is replaced by --workdir):

  csv:PATH                      a CSV manifest, its tasks.json beside it (input.csv_manifest)
  folder:ROOT                   ROOT/<class>/<image>, one task 'label' (input.image_folder)
  tfds:NAME:SPLIT[:DATA_DIR]    a prepared TFDS dataset (input.tfds_images)

A tasks.json may give each task a `kind` ('subjective', 'objective', ...): it is carried into
the results table. Train and test sets must agree on each probed task's type; test labels are
mapped onto the train set's classes by name (an image folder's classes are its sorted folder
names, so a test folder missing a class still lines up).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vise_jax import input as input_lib
from vise_jax.configlib import expand_workdir
from vise_jax.errors import InputError
from vise_jax.input.sources import MULTI_LABEL

KINDS = ('csv', 'folder', 'tfds')


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


def load_dataset(spec: str, workdir: str | os.PathLike | None = None,
                 key: str = 'config.eval.train') -> DownstreamSet:
    """The downstream set a spec names; `key` names the config key in error messages."""
    spec = (spec or '').strip()
    if not spec:
        raise InputError(f"{key} is empty: set it to 'csv:PATH', 'folder:ROOT' or "
                         "'tfds:NAME:SPLIT'")
    if workdir is not None:
        spec = expand_workdir(spec, workdir)
    kind, _, rest = spec.partition(':')
    if kind not in KINDS or not rest:
        raise InputError(f"{key}={spec!r}: unknown dataset spec; use 'csv:PATH', "
                         "'folder:ROOT' or 'tfds:NAME:SPLIT[:DATA_DIR]'")
    if kind == 'csv':
        path = Path(rest)
        if not path.is_file():
            raise InputError(f'{key}: downstream CSV not found: {path}')
        labelled = input_lib.csv_manifest(path)
        return DownstreamSet(spec, labelled, _task_kinds(path.parent / 'tasks.json'))
    if kind == 'folder':
        if not Path(rest).is_dir():
            raise InputError(f'{key}: image folder not found: {rest}')
        return DownstreamSet(spec, input_lib.image_folder(rest), {})
    name, _, rest = rest.partition(':')
    split, _, data_dir = rest.partition(':')
    if not name or not split:
        raise InputError(f"{key}={spec!r}: a TFDS spec is 'tfds:NAME:SPLIT[:DATA_DIR]'")
    return DownstreamSet(spec, input_lib.tfds_images(name, split, data_dir or None), {})


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
