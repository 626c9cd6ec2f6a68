"""A light text encoder trained on the corpus itself: sentencepiece pieces, TF-IDF, projection.

For runs that want no pretrained weights (or no 90 MB download). Steps:

1. a unigram sentencepiece model trained on (a seeded sample of) the comments, with NFKC
   normalisation and case folding, so 'WOW' and 'wow' share pieces and emoji survive as pieces;
2. each text becomes a bag of piece counts, weighted by sublinear TF (1 + log count) times
   smoothed IDF (log((1 + n) / (1 + df)) + 1, n and df from the same sample), L2-normalised;
3. projected to `dim` dimensions and L2-normalised again.

The projection is, by default, a truncated SVD of the sample's TF-IDF matrix (latent semantic
analysis). Unlike a random Gaussian projection, which only preserves piece overlap (with a
distortion of about 1/sqrt(dim)), the SVD keeps the directions along which comments actually
vary and merges pieces that occur together ('aww', 'cute', '😍'), which is what k-means on the
vectors should find. `projection='random'` (Gaussian / sqrt(dim), seeded) is there for corpora too
small for an SVD of that size, or to compare.

The whole encoder (sentencepiece model bytes, idf, projection, settings) saves to one .npz, so the
embed stage can record it and reuse it on a rerun. Same texts and seed give the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import sentencepiece as spm

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.text import base

log = logging.getLogger(__name__)

NAME = 'sentencepiece-tfidf'
FORMAT_VERSION = 1
PROJECTIONS = ('svd', 'random')


class SentencePieceTfidfEncoder:
    """A `TextEncoder` computed on the host with numpy/scipy (the mesh is not needed)."""

    name = NAME

    def __init__(self, model_proto: bytes, idf: np.ndarray, projection: np.ndarray,
                 settings: dict[str, Any]):
        self.model_proto = bytes(model_proto)
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.idf = np.asarray(idf, np.float32)
        self.projection = np.asarray(projection, np.float32)
        self.settings = dict(settings)
        vocab = self.processor.get_piece_size()
        if self.idf.shape != (vocab,) or self.projection.shape[0] != vocab:
            raise InputError(f'{NAME}: idf {self.idf.shape} and projection '
                             f'{self.projection.shape} do not match the {vocab} pieces')
        self.dim = int(self.projection.shape[1])

    # -- training

    @classmethod
    def train(cls, texts: Iterable[str], *, dim: int = 256, vocab_size: int = 8000,
              seed: int = 0, projection: str = 'svd',
              max_train_texts: int = 200_000) -> SentencePieceTfidfEncoder:
        """Fits the pieces, idf and projection on (a seeded sample of at most
        `max_train_texts` of) the non-empty `texts`: a list, or an iterable that yields the
        same texts each time (read twice; only the sample is held in memory).

        A vocabulary larger than the corpus supports is capped (sentencepiece's soft limit),
        with a warning; the actual size is in `describe()`.
        """
        if projection not in PROJECTIONS:
            raise InputError(f'{NAME}: projection must be one of {PROJECTIONS}, got {projection!r}')
        if dim < 1 or vocab_size < 8:
            raise InputError(f'{NAME}: dim ({dim}) must be >= 1 and vocab_size ({vocab_size}) '
                             '>= 8')
        sample = _training_sample(texts, max_train_texts, seed)
        if not sample:
            raise InputError(f'{NAME}: no non-empty text to train on')
        model_proto = train_sentencepiece(sample, vocab_size, seed)
        processor = spm.SentencePieceProcessor(model_proto=model_proto)
        pieces = processor.get_piece_size()
        if pieces < vocab_size:
            log.warning('%s: the corpus (%d texts) supports only %d pieces; vocab_size %d was '
                        'capped', NAME, len(sample), pieces, vocab_size)
        counts = piece_counts(_encode_ids(processor, sample), pieces)
        idf = smoothed_idf(counts)
        tfidf = tfidf_rows(counts, idf)
        if projection == 'svd':
            matrix = svd_projection(tfidf, dim, seed)
        else:
            matrix = random_projection(pieces, dim, seed)
        settings = {'requested_vocab_size': vocab_size, 'seed': seed, 'projection': projection,
                    'train_texts': len(sample), 'max_train_texts': max_train_texts}
        return cls(model_proto, idf, matrix, settings)

    # -- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Writes everything needed to encode to one .npz, atomically."""
        path = Path(path)
        with artifacts.atomic_path(path) as tmp, open(tmp, 'wb') as f:
            np.savez(f, model_proto=np.frombuffer(self.model_proto, np.uint8), idf=self.idf,
                     projection=self.projection,
                     settings=np.asarray(json.dumps({'format_version': FORMAT_VERSION,
                                                     **self.settings}, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTfidfEncoder:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in ('model_proto', 'idf', 'projection', 'settings')}
        except FileNotFoundError:
            raise InputError(f'{path}: {NAME} encoder file not found') from None
        except (KeyError, ValueError, OSError) as e:
            raise InputError(f'{path}: not a saved {NAME} encoder: {e}') from None
        settings = json.loads(str(fields['settings']))
        if settings.pop('format_version', None) != FORMAT_VERSION:
            raise InputError(f'{path}: saved by another version of the {NAME} encoder')
        return cls(fields['model_proto'].tobytes(), fields['idf'], fields['projection'], settings)

    # -- the TextEncoder interface

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.model_proto)
        digest.update(self.idf.tobytes())
        digest.update(self.projection.tobytes())
        return {'name': self.name, 'kind': NAME, 'dim': self.dim,
                'vocab_size': self.processor.get_piece_size(), 'normalised': True,
                'sha256': digest.hexdigest(), **self.settings}

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in _encode_ids(self.processor, texts)]

    def encode(self, texts: Sequence[str], batch_size: int = 4096, mesh=None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(texts), dim) float32; a text with no pieces gives a zero row.

        Runs on the host: a sparse (batch x pieces) by dense (pieces x dim) product is cheaper
        than moving the batch to a device. `mesh` is accepted for the interface and unused; no
        collective is involved, so processes need not call this in step.
        """
        del mesh
        out = np.zeros((len(texts), self.dim), np.float32)
        pieces = self.processor.get_piece_size()
        for start in range(0, len(texts), max(1, batch_size)):
            batch = texts[start:start + batch_size]
            counts = piece_counts(_encode_ids(self.processor, batch), pieces)
            out[start:start + len(batch)] = base.l2_normalise(
                tfidf_rows(counts, self.idf) @ self.projection)
            if progress is not None:
                progress(len(batch))
        return out


# --------------------------------------------------------------------------- building blocks


def _training_sample(texts: Iterable[str], limit: int, seed: int) -> list[str]:
    """A seeded sample of at most `limit` of the non-empty `texts`, in their order.

    Two passes over `texts` (a list, or an iterable that yields the same texts each time it is
    iterated, e.g. a store's comments), holding only the sample: memory does not grow with
    the corpus."""
    count = sum(1 for t in texts if t.strip())
    if count <= limit:
        return [t for t in texts if t.strip()]
    keep = np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))
    sample, position = [], 0
    non_empty = (t for t in texts if t.strip())
    for index, text in enumerate(non_empty):
        if index == keep[position]:
            sample.append(text)
            position += 1
            if position == limit:
                break
    return sample


def train_sentencepiece(texts: Sequence[str], vocab_size: int, seed: int) -> bytes:
    """A unigram model's bytes. One trainer thread: the result then depends only on the input."""
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
            model_type='unigram', hard_vocab_limit=False,   # cap, do not fail, on small corpora
            normalization_rule_name='nmt_nfkc_cf', character_coverage=0.9995,
            num_threads=1, minloglevel=2, input_sentence_size=0)
    except RuntimeError as e:
        raise InputError(f'{NAME}: sentencepiece training failed on {len(texts)} texts: '
                         f'{e}') from None
    return buffer.getvalue()


def _encode_ids(processor: spm.SentencePieceProcessor, texts: Sequence[str]) -> list[list[int]]:
    return processor.encode([str(t) for t in texts], out_type=int)


def piece_counts(ids: Sequence[Sequence[int]], num_pieces: int) -> scipy.sparse.csr_matrix:
    """(texts x pieces) counts."""
    lengths = np.fromiter((len(row) for row in ids), np.int64, len(ids))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    columns = np.fromiter((i for row in ids for i in row), np.int64, int(indptr[-1]))
    counts = scipy.sparse.csr_matrix(
        (np.ones(columns.size, np.float32), columns, indptr), shape=(len(ids), num_pieces))
    counts.sum_duplicates()
    return counts


def smoothed_idf(counts: scipy.sparse.csr_matrix) -> np.ndarray:
    """log((1 + n) / (1 + df)) + 1, as scikit-learn's TfidfTransformer(smooth_idf=True)."""
    document_frequency = np.bincount(counts.indices, minlength=counts.shape[1])
    return (np.log((1 + counts.shape[0]) / (1 + document_frequency)) + 1).astype(np.float32)


def tfidf_rows(counts: scipy.sparse.csr_matrix, idf: np.ndarray) -> scipy.sparse.csr_matrix:
    """Sublinear TF times IDF, each row L2-normalised (empty rows stay empty)."""
    weighted = counts.copy()
    weighted.data = (1 + np.log(weighted.data)) * idf[weighted.indices]
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=1)).ravel())
    weighted.data /= np.repeat(np.maximum(norms, 1e-12), np.diff(weighted.indptr))
    return weighted.astype(np.float32)


def svd_projection(tfidf: scipy.sparse.csr_matrix, dim: int, seed: int) -> np.ndarray:
    """(pieces x dim): the top right singular vectors of the TF-IDF matrix (LSA)."""
    from sklearn.utils.extmath import randomized_svd

    most = min(tfidf.shape)
    if dim > most:
        raise InputError(f'{NAME}: an SVD projection to {dim} dimensions needs at least {dim} '
                         f'texts and pieces; the corpus gives {tfidf.shape[0]} texts and '
                         f"{tfidf.shape[1]} pieces. Use a smaller dim or projection='random'")
    _, _, components = randomized_svd(tfidf.astype(np.float64), dim, n_iter=7,
                                      random_state=seed)
    return components.T.astype(np.float32)


def random_projection(num_pieces: int, dim: int, seed: int) -> np.ndarray:
    """(pieces x dim) Gaussian / sqrt(dim): preserves inner products in expectation."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((num_pieces, dim)) / np.sqrt(dim)).astype(np.float32)
