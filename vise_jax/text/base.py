"""What every text encoder offers, and the length-bucketed batch schedule the JAX ones share.

An encoder turns texts into L2-normalised float32 vectors. The k-means stage clusters these
vectors, so the rows must be comparable by cosine (hence the normalisation), and the encoder's
`describe()` must say everything that changes them (it goes into the embed stage's fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vise_jax import sharding


@runtime_checkable
class TextEncoder(Protocol):
    """The interface the embed stage programs against."""

    name: str   # e.g. 'all-MiniLM-L6-v2', 'sentencepiece-tfidf'
    dim: int

    def describe(self) -> dict[str, Any]:
        """JSON-able identity for fingerprints: name, dim, weights hash, max length, ..."""
        ...

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids per text, as the encoder will see them (truncated); used for bucketing."""
        ...

    def encode(self, texts: Sequence[str], batch_size: int = 256, mesh=None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit L2 norm (or zero for an empty text).

        With a mesh spanning several processes, every process calls this the same number of
        times, each with its own texts (possibly none). `progress`, if given, is called with the
        number of texts finished after each step (for progress bars; the calls may add up to
        fewer than len(texts) when repeated texts are computed once).
        """
        ...


def l2_normalise(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero (as torch's F.normalize does)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, eps)).astype(np.float32)


# Fine steps where comments are (most are under 32 tokens): padding a 9-token comment to 10
# rather than 16 saves a third of the work, for one more compiled program of about a second.
DEFAULT_BUCKET_LENGTHS = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 80, 96, 128, 160, 192,
                          256, 320, 384, 448, 512)


def bucket_lengths_for(max_length: int,
                       candidates: Sequence[int] = DEFAULT_BUCKET_LENGTHS) -> tuple[int, ...]:
    """Padded lengths for batches: the candidates below `max_length`, then `max_length` itself.

    A fixed set of lengths keeps the number of compiled programs bounded while a comment of 9
    tokens is padded to 10, not to the longest comment of the run.
    """
    return tuple(sorted({n for n in candidates if n < max_length} | {max_length}))


@dataclass(frozen=True)
class Batch:
    """One step of the schedule: these local rows (positions in the input), padded to
    `num_rows` x `length`."""

    length: int
    num_rows: int
    rows: np.ndarray   # int64 positions into the caller's token list; may be empty


def rows_per_bucket(bucket_lengths: Sequence[int], batch_size: int, tokens_per_batch: int,
                    row_multiple: int = 1) -> tuple[int, ...]:
    """Rows per batch for each bucket: `batch_size`, fewer where that exceeds the token budget.

    On CPU a step of about a thousand tokens keeps the activations in cache: 64 x 256 tokens runs
    at two thirds of the speed per token of 8 x 128 (bench/embed_bench.py). Rows stay a multiple
    of `row_multiple` (the devices they are sharded over).
    """
    return tuple(_round_up(max(1, min(batch_size, tokens_per_batch // length)), row_multiple)
                 for length in bucket_lengths)


def bucket_schedule(token_lengths: Sequence[int], bucket_lengths: Sequence[int],
                    rows_per_batch: int | Sequence[int], row_multiple: int = 1) -> list[Batch]:
    """The batches every process runs, in the same order and with the same shapes everywhere.

    Texts are sorted by length and go to the smallest bucket that holds them. Each bucket runs
    only full batches (of `rows_per_batch`, or its entry for that bucket); its remainder (its
    longest texts) moves up to the next bucket, so each bucket has one main shape and little
    padding. The final remainder is split by bucket again, each part padded to the next power
    of two rows (a multiple of `row_multiple`): a handful of long texts does not cost a full
    batch of the longest length.

    Each process may have different texts, but every process must call the jitted step with the
    same shapes the same number of times (a collective program): batch counts and tail sizes are
    the maximum over processes, and a process short of rows runs all-padding batches.
    """
    lengths = np.asarray(token_lengths, dtype=np.int64).reshape(-1)
    buckets = np.asarray(bucket_lengths, dtype=np.int64)
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(f'a text has {lengths.max()} tokens, more than the largest bucket '
                         f'{buckets[-1]}; tokenize with truncation')
    # Never more rows for a longer bucket: then the final remainder, fewer texts than the last
    # bucket's batch, fits any bucket's batch.
    rows = np.minimum.accumulate(
        np.broadcast_to(np.asarray(rows_per_batch, np.int64), buckets.shape)).tolist()
    order = np.argsort(lengths, kind='stable')
    bucket_of = np.searchsorted(buckets, lengths, side='left')
    full_batches, carried = [], np.empty(0, np.int64)
    for b in range(len(buckets)):
        members = np.concatenate([carried, order[bucket_of[order] == b]])
        full = len(members) - len(members) % rows[b]
        full_batches.append(list(members[:full].reshape(-1, rows[b])))
        carried = members[full:]
    tails = [carried[bucket_of[carried] == b] for b in range(len(buckets))]
    plan = _max_over_processes(np.array([len(batches) for batches in full_batches]
                                        + [len(tail) for tail in tails]))
    num_full, tail_sizes = plan[:len(buckets)], plan[len(buckets):]
    schedule = []
    for b, length in enumerate(buckets.tolist()):
        for j in range(int(num_full[b])):
            members = full_batches[b][j] if j < len(full_batches[b]) else np.empty(0, np.int64)
            schedule.append(Batch(length, rows[b], members))
    for b, length in enumerate(buckets.tolist()):
        if tail_sizes[b]:
            padded_rows = _round_up(_next_power_of_two(int(tail_sizes[b])), row_multiple)
            schedule.append(Batch(length, min(rows[b], padded_rows), tails[b]))
    return schedule


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _max_over_processes(counts: np.ndarray) -> np.ndarray:
    return sharding.gather_over_processes(counts).max(axis=0)
