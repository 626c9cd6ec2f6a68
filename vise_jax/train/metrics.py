"""Where training metrics go: a JSONL file (for scripts and plots) and TensorBoard, process 0 only.

Each record is one line `{"step": N, "split": "train"|"eval", ...}`; TensorBoard gets the same
scalars under `<split>/<name>`. Other processes get a writer that drops everything, so call sites
need no `if process_index == 0`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class MetricWriter:
    def __init__(self, directory: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter  # only the writing process needs it

            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(directory / 'metrics.jsonl', 'a', encoding='utf-8')  # noqa: SIM115
            self._tensorboard = SummaryWriter(str(directory / 'tensorboard'))

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _to_float(value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({'step': step, 'split': split, **values}) + '\n')
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f'{split}/{name}', value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_float(value: Any) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None   # JSON has no NaN


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


class MeanAccumulator:
    """Averages host-side scalar metrics over a logging interval."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, metrics: Mapping[str, Any]) -> None:
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def result(self) -> dict[str, float]:
        return {name: total / max(self._count, 1) for name, total in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count
