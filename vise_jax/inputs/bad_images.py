"""Bad images: the reason codes a batch carries, and the tally that turns too many into an error.

An image that cannot be used (truncated, not an image, missing, too large) does not stop the
input pipeline: its example gets weight 0, a black image and a reason code in `bad_image`
(an index into BAD_IMAGE_REASONS; 0 means fine). The training loop feeds every batch to a
BadImageTally, which raises a clear InputError once bad images exceed the configured share of
the examples seen, so a broken dataset fails loudly instead of training on black squares.
Greyscale, CMYK, palette and alpha images are converted to RGB and are not bad.
"""

from __future__ import annotations

import numpy as np

from vise_jax.errors import InputError

BAD_IMAGE_REASONS = (
    'ok',            # 0: decoded (possibly converted to RGB)
    'truncated',     # the file ends early (PIL: 'image file is truncated')
    'not_an_image',  # PIL cannot identify the bytes as any image format
    'undecodable',   # identified, but decoding or converting failed otherwise
    'missing_file',  # a file-backed source (manifest, CSV, folder) could not read the file
    'too_large',     # more pixels than input.max_image_pixels: a decompression bomb
)
OK, TRUNCATED, NOT_AN_IMAGE, UNDECODABLE, MISSING_FILE, TOO_LARGE = range(len(BAD_IMAGE_REASONS))


class BadImageTally:
    """Counts bad images per reason over the batches seen; raises when there are too many.

    Call `update(batch['bad_image'], batch['weight'], batch['index'])` with the process-local
    batch (numpy, before `global_batch`): each process then checks its own shard. Padding rows
    of evaluation batches (weight 0 and code 0) are not counted as seen.
    """

    def __init__(self, max_fraction: float, min_seen: int = 1000):
        if not 0.0 <= max_fraction <= 1.0:
            raise InputError(f'input.max_bad_image_fraction must be in [0, 1], got {max_fraction}')
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.seen = 0
        self._counts = np.zeros(len(BAD_IMAGE_REASONS), np.int64)
        self._first_index: dict[int, int] = {}

    @classmethod
    def from_config(cls, config) -> BadImageTally:
        return cls(config.input.max_bad_image_fraction, config.input.bad_image_min_seen)

    @property
    def bad(self) -> int:
        return int(self._counts[1:].sum())

    def update(self, bad_image, weight, index=None) -> None:
        codes = np.asarray(bad_image).astype(np.int64)
        real = (np.asarray(weight) > 0) | (codes != OK)
        self.seen += int(real.sum())
        self._counts += np.bincount(codes[real], minlength=len(BAD_IMAGE_REASONS))
        if index is not None:
            self._remember_examples(codes, np.asarray(index))
        self._check()

    def counts(self) -> dict[str, int]:
        """Bad images seen so far, per reason (every reason listed, zeros included)."""
        return {reason: int(n) for reason, n in zip(BAD_IMAGE_REASONS[1:], self._counts[1:],
                                                     strict=True)}

    def _remember_examples(self, codes: np.ndarray, index: np.ndarray) -> None:
        for code in np.unique(codes[codes != OK]):
            self._first_index.setdefault(int(code), int(index[np.argmax(codes == code)]))

    def _check(self) -> None:
        if self.seen < self.min_seen or self.bad <= self.max_fraction * self.seen:
            return
        found = ', '.join(f'{reason}: {n}' for reason, n in self.counts().items() if n)
        examples = ', '.join(f'{BAD_IMAGE_REASONS[code]} at index {i}'
                             for code, i in sorted(self._first_index.items()))
        raise InputError(
            f'{self.bad} of {self.seen} images seen are unusable ({self.bad / self.seen:.1%}), '
            f'more than input.max_bad_image_fraction={self.max_fraction:.1%} ({found})'
            + (f'; e.g. {examples}' if examples else '')
            + '. Fix or remove these images (rerun ingest), or raise the limit.')
