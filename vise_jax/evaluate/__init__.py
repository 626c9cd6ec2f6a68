"""Linear evaluation of exported backbones: features, scikit-learn probes, the report.

  results = evaluate.linear_eval(config, workdir)   # every export x task -> {workdir}/eval

Modules: datasets (the 'csv:' / 'folder:' / 'tfds:' specs and the tasks), features (batched,
sharded, cached feature extraction), probe (standardised logistic regression, C on a
validation split, metrics), report (results.json / .md / .png), linear (the whole evaluation).
"""

from vise_jax.evaluate.datasets import (
    DownstreamSet,
    load_dataset,
    parse_dataset_spec,
    select_tasks,
)
from vise_jax.evaluate.features import Features, extract_features
from vise_jax.evaluate.linear import linear_eval, resolve_exports
from vise_jax.evaluate.probe import (
    ProbeResult,
    fit_probe,
    multi_label_metrics,
    single_label_metrics,
)
from vise_jax.evaluate.report import write_report

__all__ = [
    'DownstreamSet', 'Features', 'ProbeResult', 'extract_features', 'fit_probe', 'linear_eval',
    'load_dataset', 'multi_label_metrics', 'parse_dataset_spec', 'resolve_exports',
    'select_tasks', 'single_label_metrics', 'write_report',
]
