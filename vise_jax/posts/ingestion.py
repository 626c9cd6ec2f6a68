"""Ingest: validate every posts row and write the posts store plus a report of rejected rows.

Input lines are processed in chunks of `rows_per_shard` lines; each chunk becomes one store shard
and is committed by writing `chunk-NNNNN.json` last, so an interrupted ingest resumes at the first
uncommitted chunk. Accounting is exact: input rows = accepted + rejected (blank lines are counted
apart, not rows), and every rejected row is listed with its file, line, field and reason.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tqdm

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.posts import claims as claims_lib
from vise_jax.posts import store as store_lib
from vise_jax.posts import validate
from vise_jax.posts.schema import Post

log = logging.getLogger(__name__)

FAIL = 'fail'
SKIP = 'skip'
REPORT = 'report.json'
REJECTED = 'rejected.jsonl'
# id -> the location of the first row holding it: IdClaims here, a dict of one shard's claims
# on Beam.
Claims = claims_lib.IdClaims | dict[str, str]


@dataclasses.dataclass(frozen=True)
class IngestOptions(validate.RowOptions):
    """The row options (validate.RowOptions: limits, image root, re-encoding) and the run's."""

    on_error: str = SKIP                 # 'fail': stop at the first bad row; 'skip': report it
    max_rejected_fraction: float = 1.0   # with 'skip': fail when more rows than this are bad
    rows_per_shard: int = 10_000
    num_threads: int = 8                 # image reads and decodes overlap in threads

    def __post_init__(self):
        super().__post_init__()
        if self.on_error not in (FAIL, SKIP):
            raise InputError(f"ingest.on_error must be '{FAIL}' or '{SKIP}', got {self.on_error!r}")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise InputError('ingest.max_rejected_fraction must be in [0, 1], '
                             f'got {self.max_rejected_fraction}')
        if self.rows_per_shard < 1 or self.num_threads < 1:
            raise InputError('ingest.rows_per_shard and ingest.num_threads must be positive')

    def store_fingerprint(self) -> dict[str, Any]:
        """What changes the store's bytes (more threads give the same bytes)."""
        fields = super().store_fingerprint()
        del fields['num_threads']
        return fields


@dataclasses.dataclass
class ChunkResult:
    rows: int
    accepted: list[Post]
    rejected: list[validate.Rejection]
    blank_lines: int
    ignored_fields: collections.Counter


def ingest(manifests: Sequence[str | os.PathLike], stage: artifacts.StageDir,
           options: IngestOptions, config: Any = None) -> dict[str, Any]:
    """Validates the manifests' rows into a posts store in `stage.path`; returns the report."""
    manifests = _check_manifests(manifests)
    stage.prepare()
    out = stage.path
    claims = claims_lib.IdClaims([str(m) for m in manifests])
    _replay_committed_claims(out, options.reaction_types, claims)
    lines = validate.iter_manifest_lines(manifests, options.max_row_bytes)
    total_bytes = sum(os.path.getsize(m) for m in manifests)
    image_root = _image_root(options)
    with tqdm.tqdm(total=total_bytes, unit='B', unit_scale=True, desc='ingest',
                   disable=None) as progress, \
         concurrent.futures.ThreadPoolExecutor(options.num_threads) as pool:
        for shard, chunk in enumerate(_chunks(lines, options.rows_per_shard)):
            progress.update(sum(len(line.text) for line in chunk))
            if _chunk_record(out, shard).exists():
                continue  # committed by an earlier, interrupted run; its claims were replayed
            result = _validate_chunk(chunk, claims, options, image_root, pool)
            claims.flush()
            _check_fail_policy(result.rejected, options)
            _commit_chunk(out, shard, result, options.reaction_types)
    return finish(stage, manifests, options, config)


# The Beam runner (posts/beam_ingest.py) calls _parse_rows, _validate_chunk, _commit_chunk,
# _check_fail_policy and finish below, so both runners validate rows and write shards, the
# report and the stage record with this one code.


def _check_fail_policy(rejected: Sequence[validate.Rejection], options: IngestOptions) -> None:
    """With on_error='fail', the first rejected row stops the ingest with its message."""
    if rejected and options.on_error == FAIL:
        raise InputError(f'{rejected[0]}\n(ingest.on_error={FAIL!r}; set it to {SKIP!r} to '
                         'skip bad rows and get a report of all of them)')


def finish(stage: artifacts.StageDir, manifests: Sequence[Path], options: IngestOptions,
           config: Any) -> dict[str, Any]:
    """Merges the committed chunks into the finished store; returns the report."""
    out = stage.path
    report = _finalize(out, list(manifests), options)
    _check_rejected_fraction(report, options, out)
    stage.finish(config, summary=report)
    _remove_chunk_bookkeeping(out)
    return report


def _check_manifests(manifests: Sequence[str | os.PathLike]) -> list[Path]:
    if not manifests:
        raise InputError('posts.manifest names no files')
    paths = [Path(m) for m in manifests]
    for path in paths:
        if not path.is_file():
            raise InputError(f'posts manifest not found: {path}')
    return paths


def _chunks(lines: Iterable[validate.Line], size: int) -> Iterator[list[validate.Line]]:
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _image_root(options: IngestOptions) -> Path | None:
    return Path(options.image_root) if options.image_root else None


def _parse_rows(chunk: Sequence[validate.Line], options: IngestOptions,
                image_root: Path | None = None) -> list[validate.Draft]:
    """The chunk's rows (blank lines are not rows), parsed; the image is not read yet.

    `image_root` is unused: options.image_root says where relative paths resolve.
    """
    del image_root
    return [validate.parse_line(line, options) for line in chunk if not line.is_blank]


def _validate_chunk(chunk: list[validate.Line], claims: Claims,
                    options: IngestOptions, image_root: Path | None,
                    pool: concurrent.futures.Executor) -> ChunkResult:
    """Every row of the chunk through validate.validate_row, then the duplicate-id check."""
    del image_root  # options.image_root
    rows = [line for line in chunk if not line.is_blank]
    # Image I/O and decoding dominate; they run in threads, results stay in input order.
    results = list(pool.map(
        lambda line: validate.validate_row(line.text, line.file, line.number, options), rows))
    result = ChunkResult(rows=len(rows), accepted=[], rejected=[],
                         blank_lines=len(chunk) - len(rows),
                         ignored_fields=collections.Counter())
    for row in results:
        row = _claim_id(row, claims)
        if isinstance(row, validate.Rejection):
            result.rejected.append(row)
        else:
            result.accepted.append(row)
            result.ignored_fields.update(row.ignored_fields)
    return result


def _claim_id(row: Post | validate.Rejection, claims: Claims) -> Post | validate.Rejection:
    """The first row with an id owns it; later rows with that id are duplicates."""
    post_id = row.post_id if isinstance(row, validate.Rejection) else row.id
    if post_id is None:
        return row
    location = row.location if isinstance(row, validate.Rejection) else row.source
    first = claims.setdefault(post_id, location)
    return row if first == location else validate.mark_duplicate(row, first)


def _chunk_record(out: Path, shard: int) -> Path:
    return out / f'chunk-{shard:05d}.json'


def _chunk_rejected(out: Path, shard: int) -> Path:
    return out / f'rejected-{shard:05d}.jsonl'


def _commit_chunk(out: Path, shard: int, result: ChunkResult,
                  reaction_types: Sequence[str]) -> None:
    if result.accepted:
        store_lib.write_shard(out, shard, result.accepted, reaction_types)
    artifacts.atomic_write_text(_chunk_rejected(out, shard), ''.join(
        json.dumps(r.to_json(), ensure_ascii=False) + '\n' for r in result.rejected))
    reasons = collections.Counter(
        reason for r in result.rejected for reason in {e.reason for e in r.errors})
    artifacts.atomic_write_json(_chunk_record(out, shard), {
        'rows': result.rows,
        'accepted': len(result.accepted),
        'rejected': len(result.rejected),
        'blank_lines': result.blank_lines,
        'rejected_rows_by_reason': dict(reasons),
        'ignored_fields': dict(result.ignored_fields),
    })


def _committed_shards(out: Path) -> list[int]:
    return sorted(int(p.stem.split('-')[1]) for p in out.glob('chunk-*.json'))


def _replay_committed_claims(out: Path, reaction_types: Sequence[str],
                             claims: claims_lib.IdClaims) -> None:
    """Claims the ids of the chunks an interrupted run committed."""
    for shard in _committed_shards(out):
        for post in store_lib.read_shard_meta(out, shard, reaction_types):
            claims.setdefault(post.id, post.source)
        for rejection in _read_jsonl(_chunk_rejected(out, shard)):
            if rejection['id'] is not None:
                claims.setdefault(rejection['id'], rejection['location'])
        claims.flush()


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding='utf-8') as f:
        for line in f:
            yield json.loads(line)


def _finalize(out: Path, manifests: list[Path], options: IngestOptions) -> dict[str, Any]:
    """Merges the committed chunks into store.json, report.json and rejected.jsonl."""
    shards = _committed_shards(out)
    chunk_records = {k: artifacts.read_json(_chunk_record(out, k)) for k in shards}
    with artifacts.atomic_path(out / REJECTED) as tmp, open(tmp, 'w', encoding='utf-8') as merged:
        for k in shards:
            merged.write(_chunk_rejected(out, k).read_text(encoding='utf-8'))
    reasons, ignored = collections.Counter(), collections.Counter()
    for record in chunk_records.values():
        reasons.update(record['rejected_rows_by_reason'])
        ignored.update(record['ignored_fields'])
    report = {
        'manifests': [str(m) for m in manifests],
        'input_rows': sum(r['rows'] for r in chunk_records.values()),
        'accepted': sum(r['accepted'] for r in chunk_records.values()),
        'rejected': sum(r['rejected'] for r in chunk_records.values()),
        'blank_lines': sum(r['blank_lines'] for r in chunk_records.values()),
        # A row with several problems counts once under each of its reasons.
        'rejected_rows_by_reason': dict(sorted(reasons.items())),
        'ignored_fields': dict(sorted(ignored.items())),
        'on_error': options.on_error,
        'rejected_rows_file': REJECTED,
    }
    artifacts.atomic_write_json(out / REPORT, report)
    store_lib.write_index(out, {k: r['accepted'] for k, r in chunk_records.items()},
                          options.reaction_types, extra={'report': REPORT})
    return report


def _remove_chunk_bookkeeping(out: Path) -> None:
    """Once the store is finished, the per-chunk records are merged and no longer needed."""
    for path in [*out.glob('chunk-*.json'), *out.glob('rejected-*.jsonl')]:
        path.unlink()


def _check_rejected_fraction(report: dict[str, Any], options: IngestOptions, out: Path) -> None:
    rows = report['input_rows']
    fraction = report['rejected'] / rows if rows else 0.0
    if fraction > options.max_rejected_fraction:
        raise InputError(
            f"ingest rejected {report['rejected']} of {rows} rows ({fraction:.1%}), more than "
            f'ingest.max_rejected_fraction={options.max_rejected_fraction:.1%}; see '
            f'{out / REPORT} and {out / REJECTED}')
    if report['accepted'] == 0:
        raise InputError(f'ingest accepted no posts out of {rows} rows; see {out / REJECTED}')


def summarize(report: dict[str, Any]) -> str:
    """A few human-readable lines for the console."""
    lines = [f"ingest: {report['input_rows']} rows -> {report['accepted']} accepted, "
             f"{report['rejected']} rejected"]
    for reason, count in report['rejected_rows_by_reason'].items():
        lines.append(f'  {reason}: {count}')
    if report['ignored_fields']:
        lines.append(f"  fields ignored (not in the posts format): {report['ignored_fields']}")
    return '\n'.join(lines)
