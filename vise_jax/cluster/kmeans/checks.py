"""Host-side input checks: plain numpy, before any JAX work, so that bad input never surfaces as
a traceback from inside a compiled computation, nor as NaN centroids.

The devices compute in float32, so besides NaN / Inf and (for cosine) zero rows, the checks
look at each row's scale, in float64:

* cosine: a row's direction is all that counts, however small or large the row. A row whose
  norm is below 2^-40 or above 2^40 is scaled to unit length here, in float64: on the devices its
  float32 squares would underflow (a row at 1e-20 becomes a zero row; its cluster ends empty and
  its centroid NaN) or overflow. Rejecting such a row would refuse a well-defined input, and
  users of cosine k-means expect the rows' scale not to matter. Rows inside that range, which
  means every ordinary embedding, are passed on untouched.
* euclidean: the scale is part of the answer (centroids, inertia and distances come back in the
  rows' units, in float32), so it is not changed here; instead a row whose squared norm would
  overflow float32 is refused with its row number, and so is a fit whose rows are all so small
  that their squared distances underflow. fit also refuses rows whose squared distances to
  their mean sum beyond float32's range (check_spread), which would make the tolerance infinite.
"""

from __future__ import annotations

import math

import numpy as np

from vise_jax import sharding
from vise_jax.cluster.kmeans.options import COSINE, KMeansOptions
from vise_jax.errors import InputError

_CHECK_BLOCK_ROWS = 1 << 16   # the checks walk rows in blocks to bound memory
# Norms inside [2^-40, 2^40] keep every float32 square of a row's largest values far from
# underflow (2^-126) and overflow (2^128), for any width: values too small to square in float32
# (below 2^-63) add less than 2^-46 of the squared norm per feature.
_SMALLEST_NORM = 2.0 ** -40
_LARGEST_NORM = 2.0 ** 40
# Euclidean rows: a squared norm at most float32's largest / 16 keeps distances finite, since
# centring on the mean can double a row's norm and the distance between two such rows is at
# most (2 + 2)^2 times it.
_LARGEST_SQNORM = float(np.finfo(np.float32).max) / 16


def checked_rows(x, metric: str, what: str, row_offset: int = 0,
                 allow_empty: bool = False) -> np.ndarray:
    """`x` as float16 or float32 rows, refused with an InputError naming the bad rows if it has
    any, and for cosine with rows of extreme norm scaled to unit length (module docstring)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f'{what}: expected a 2-D array (rows, features), got shape {x.shape}')
    if x.shape[0] == 0 and not allow_empty:
        raise InputError(f'{what}: no rows to cluster (empty input)')
    if x.shape[1] == 0:
        raise InputError(f'{what}: rows have no features (shape {x.shape})')
    if x.dtype.kind not in 'fiub':
        raise InputError(f'{what}: expected numbers, got dtype {x.dtype}')
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)  # float64 beyond float32's range turns to Inf: caught below
    scales = _largest_values(x)
    _check_finite(scales, what, row_offset)
    if metric == COSINE:
        _check_nonzero_norms(scales, what, row_offset)
        return _unit_rows_of_extreme_norm(x, scales)
    _check_squares_fit(x, scales, what, row_offset)
    return x


def _largest_values(x: np.ndarray) -> np.ndarray:
    """(n,) float64: each row's largest absolute value; NaN where the row has a NaN."""
    scales = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], _CHECK_BLOCK_ROWS):
        block = x[start:start + _CHECK_BLOCK_ROWS]
        scales[start:start + block.shape[0]] = np.abs(block).max(axis=1)
    return scales


def _check_finite(scales: np.ndarray, what: str, row_offset: int) -> None:
    bad = np.flatnonzero(~np.isfinite(scales))
    if bad.size:
        raise InputError(f'{what}: {_rows(bad.size)} NaN or Inf '
                         f'(first at row {row_offset + bad[0]})')


def _check_nonzero_norms(scales: np.ndarray, what: str, row_offset: int) -> None:
    bad = np.flatnonzero(scales == 0)
    if bad.size:
        raise InputError(f'{what} (cosine): {_rows(bad.size, "has", "have")} zero norm '
                         f'(first at row {row_offset + bad[0]}); their direction is undefined')


def _unit_rows_of_extreme_norm(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """`x`, or a float32 copy whose rows of norm outside [2^-40, 2^40] are unit rows."""
    # A row's norm lies in [its largest value, sqrt(d) times that]: only rows near the edges
    # need their norm computed.
    maybe = np.flatnonzero((scales < _SMALLEST_NORM)
                           | (scales * math.sqrt(x.shape[1]) > _LARGEST_NORM))
    if not maybe.size:
        return x
    rows = x[maybe].astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)  # float64 squares of float32 values stay in range
    extreme = (norms < _SMALLEST_NORM) | (norms > _LARGEST_NORM)
    if not extreme.any():
        return x
    x = x.astype(np.float32)  # a copy: the caller's rows are not changed
    x[maybe[extreme]] = (rows[extreme] / norms[extreme, None]).astype(np.float32)
    return x


def _check_squares_fit(x: np.ndarray, scales: np.ndarray, what: str, row_offset: int) -> None:
    # A row's squared norm is at most d times its largest value squared: only rows above the
    # limit by that bound need it computed.
    maybe = np.flatnonzero(scales * scales * x.shape[1] > _LARGEST_SQNORM)
    if not maybe.size:
        return
    sqnorms = np.concatenate([_squared_norms(x[maybe[start:start + _CHECK_BLOCK_ROWS]])
                              for start in range(0, maybe.size, _CHECK_BLOCK_ROWS)])
    bad = np.flatnonzero(sqnorms > _LARGEST_SQNORM)
    if bad.size:
        raise InputError(
            f'{what} (euclidean): {_rows(bad.size, "has", "have")} a squared norm too large for '
            f'float32 arithmetic (first at row {row_offset + maybe[bad[0]]}: '
            f'{sqnorms[bad[0]]:.3g}, above {_LARGEST_SQNORM:.3g}); distances are computed in '
            'float32: scale the rows down')


def _squared_norms(x: np.ndarray) -> np.ndarray:
    rows = x.astype(np.float64)
    return np.einsum('ij,ij->i', rows, rows)


def check_resolvable(x: np.ndarray, metric: str, what: str) -> None:
    """Refuses euclidean rows (of every process) whose values are all so small, though not all
    zero, that their squared distances underflow float32: every row would look alike."""
    if metric == COSINE:
        return
    local = np.max(_largest_values(x), initial=0)
    largest = float(sharding.gather_over_processes(np.array(local)).max())
    if 0 < largest < _SMALLEST_NORM:
        raise InputError(
            f'{what} (euclidean): every value of the rows is below 2^-40 in absolute value '
            f'(the largest is {largest:.3g}), so their squared distances underflow float32 and '
            'the rows would all look alike; scale the rows up (a common scale factor only '
            'scales the centroids)')


def check_spread(spread: float, what: str) -> None:
    """Refuses rows whose squared distances to their mean sum beyond float32's range."""
    if not math.isfinite(spread):
        raise InputError(
            f"{what} (euclidean): the rows' squared distances to their mean sum beyond float32's "
            'range, so the inertia and the tolerance cannot be computed; scale the rows down')


def _rows(count: int, singular: str = 'contains', plural: str = 'contain') -> str:
    return f'1 row {singular}' if count == 1 else f'{count} rows {plural}'


def check_enough_rows(k: int, num_rows: int) -> None:
    if k > num_rows:
        raise InputError(f'k-means: k={k} is larger than the {num_rows} rows to cluster')


def check_width(batch: np.ndarray, d: int | None, what: str) -> int:
    if d is not None and batch.shape[1] != d:
        raise InputError(f'{what}: rows have {batch.shape[1]} features, expected {d}')
    return batch.shape[1]


def checked_centroids(centroids, options: KMeansOptions, d: int) -> np.ndarray | None:
    if centroids is None:
        return None
    centroids = checked_rows(centroids, options.metric, 'k-means init_centroids')
    if centroids.shape != (options.k, d):
        raise InputError(f'k-means: init_centroids has shape {centroids.shape}, '
                         f'expected (k={options.k}, {d})')
    return centroids.astype(np.float32)


def total_rows(local_rows: int) -> int:
    return int(sharding.gather_over_processes(np.array(local_rows)).sum())
