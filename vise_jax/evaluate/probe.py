"""The linear probe: standardised features, logistic regression, C chosen on a validation split.

Single-label tasks: multinomial logistic regression (scikit-learn's lbfgs); metrics top-1
accuracy and macro-F1. Multi-label tasks: one-vs-rest logistic regression, a class predicted
where its probability is >= 0.5; metrics mAP (macro average precision) and micro/macro-F1.

Choosing C: a validation split of the train set (`val_fraction` of it; stratified by class for
single-label tasks, a plain seeded shuffle for multi-label ones) is scored for every C of the
grid by the task's main metric (top-1, or mAP); the best C (the smallest of equals) is refitted
on the whole train set and scored on the test set. The standardiser is fitted on whatever the
classifier is fitted on, never on validation or test rows. With a grid of one C there is no
validation split. Everything is seeded: the same inputs give the same result.

Classes without a positive example in the scored labels are left out of mAP and of the
multi-label macro-F1 (their average precision is undefined).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from vise_jax.errors import InputError
from vise_jax.inputs.sources import MULTI_LABEL, SINGLE_LABEL

METRICS = {SINGLE_LABEL: ('top1', 'macro_f1'), MULTI_LABEL: ('mAP', 'micro_f1', 'macro_f1')}
MAIN_METRIC = {SINGLE_LABEL: 'top1', MULTI_LABEL: 'mAP'}
METRIC_TITLES = {'top1': 'top-1', 'macro_f1': 'macro-F1', 'micro_f1': 'micro-F1', 'mAP': 'mAP'}
MULTI_LABEL_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    task_type: str
    metrics: dict[str, float]          # on the test set
    c: float                           # the chosen inverse regularisation
    val_metric: str                    # what chose it
    val_score: float | None            # the chosen C's validation score (None: grid of one)
    val_scores: dict[float, float]     # every C's validation score
    num_train: int
    num_val: int
    num_test: int
    converged: bool                    # False if lbfgs stopped at max_iter in the final fit

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out['val_scores'] = {repr(c): score for c, score in self.val_scores.items()}
        return out


# --- metrics -------------------------------------------------------------------------------


def single_label_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {'top1': float(accuracy_score(y_true, y_pred)),
            'macro_f1': float(f1_score(y_true, y_pred, average='macro', zero_division=0))}


def multi_label_metrics(y_true: np.ndarray, scores: np.ndarray,
                        threshold: float = MULTI_LABEL_THRESHOLD) -> dict[str, float]:
    """mAP over classes with a positive in y_true; F1 of scores >= threshold."""
    y_true = np.asarray(y_true).astype(np.int32)
    present = np.flatnonzero(y_true.sum(axis=0) > 0)
    if not len(present):
        raise InputError('no positive labels to score: every class is empty')
    y_pred = (np.asarray(scores) >= threshold).astype(np.int32)
    return {
        'mAP': float(average_precision_score(y_true[:, present], scores[:, present],
                                             average='macro')),
        'micro_f1': float(f1_score(y_true, y_pred, average='micro', zero_division=0)),
        'macro_f1': float(f1_score(y_true[:, present], y_pred[:, present], average='macro',
                                   zero_division=0)),
    }


def score(classifier: Pipeline, x: np.ndarray, y: np.ndarray, task_type: str) -> dict[str, float]:
    if task_type == SINGLE_LABEL:
        return single_label_metrics(y, classifier.predict(x))
    return multi_label_metrics(y, classifier.predict_proba(x))


# --- fitting -------------------------------------------------------------------------------


def make_classifier(task_type: str, c: float, max_iter: int, seed: int) -> Pipeline:
    logistic = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    if task_type == MULTI_LABEL:
        return make_pipeline(StandardScaler(), OneVsRestClassifier(logistic))
    return make_pipeline(StandardScaler(), logistic)


def fit(x: np.ndarray, y: np.ndarray, task_type: str, c: float, max_iter: int,
        seed: int) -> tuple[Pipeline, bool]:
    """The fitted pipeline, and whether lbfgs converged."""
    classifier = make_classifier(task_type, c, max_iter, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ConvergenceWarning)
        # One-vs-rest warns about a class that is always (or never) present, then predicts it
        # as a constant: expected with small multi-label sets.
        warnings.filterwarnings('ignore', message='Label not .* is present in all training')
        classifier.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return classifier, converged


def check_train_labels(y: np.ndarray, task_type: str, class_names: Sequence[str] | None,
                       need_validation: bool) -> None:
    if task_type == MULTI_LABEL:
        if not np.asarray(y).any():
            raise InputError('the train set has no positive label for any class')
        return
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f'the train set has a single class ({_name(classes[0], class_names)}); '
                         'a probe needs two or more')
    if need_validation and counts.min() < 2:
        few = ', '.join(_name(c, class_names) for c, n in zip(classes, counts, strict=True)
                        if n < 2)
        raise InputError(f'classes {few} have a single train example: too few for the '
                         'validation split that chooses C; add examples, or give one C '
                         '(config.eval.inverse_regularization=(C,)) to skip the split')


def _name(label: int, class_names: Sequence[str] | None) -> str:
    return repr(class_names[label]) if class_names is not None else str(label)


def validation_split(y: np.ndarray, task_type: str, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the train set: stratified for single-label tasks."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f'config.eval.val_fraction must be in (0, 1), got {val_fraction}')
    rows = np.zeros((len(y), 1))
    if task_type == MULTI_LABEL:
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        return next(splitter.split(rows))
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    try:
        return next(splitter.split(rows, y))
    except ValueError as e:  # fewer validation (or fit) rows than classes
        raise InputError(f'cannot split {len(y)} train examples of {len(np.unique(y))} classes '
                         f'with config.eval.val_fraction={val_fraction}: {e}') from e


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray, task_type: str, *, cs: Sequence[float] = (1.0,),
              val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0,
              class_names: Sequence[str] | None = None) -> ProbeResult:
    """Chooses C on a validation split of train, refits on all of train, scores on test."""
    if task_type not in METRICS:
        raise InputError(f'unknown task type {task_type!r}; known: {sorted(METRICS)}')
    cs = [float(c) for c in cs]
    if not cs or any(not c > 0 for c in cs):
        raise InputError(f'config.eval.inverse_regularization must be positive numbers, got {cs}')
    if not len(train_x) or not len(test_x):
        raise InputError('the probe needs train and test examples')
    check_train_labels(train_y, task_type, class_names, need_validation=len(cs) > 1)
    metric = MAIN_METRIC[task_type]
    val_scores: dict[float, float] = {}
    num_val = 0
    if len(cs) > 1:
        fit_rows, val_rows = validation_split(train_y, task_type, val_fraction, seed)
        num_val = len(val_rows)
        for c in sorted(cs):
            classifier, _ = fit(train_x[fit_rows], train_y[fit_rows], task_type, c, max_iter,
                                seed)
            val_scores[c] = score(classifier, train_x[val_rows], train_y[val_rows],
                                  task_type)[metric]
        best_c = max(sorted(cs), key=lambda c: val_scores[c])  # first (smallest) of equals
    else:
        best_c = cs[0]
    classifier, converged = fit(train_x, train_y, task_type, best_c, max_iter, seed)
    return ProbeResult(
        task_type=task_type, metrics=score(classifier, test_x, test_y, task_type), c=best_c,
        val_metric=metric, val_score=val_scores.get(best_c), val_scores=val_scores,
        num_train=len(train_x), num_val=num_val, num_test=len(test_x), converged=converged)
