"""Ingest on Apache Beam: the single-process ingest's rows, checks and store, run by workers.

`ingest(manifests, stage, options, beam_options=...)` writes the same posts store as
`ingestion.ingest` (the same shards holding the same posts in the same order, byte for byte, the
same report.json and rejected.jsonl), with the work spread over a Beam runner's workers: local
processes (FnApiRunner/DirectRunner/PrismRunner) or Dataflow, Flink, Spark. Rows are parsed,
checked and written by ingestion.py's own functions; this module only moves lines and ids.

The pipeline (g = a line's number over all manifests in order, from 0; shard = g // rows_per_shard,
the single-process path's chunk, so shard k holds the same rows on either runner):

  manifests -> CountLines    per file: its lines, and the byte offset of every _STRIDE-th line
            -> Layout        (side input) each file's first g, the shards, where to seek
  manifests -> ReadIds       (bucket, [(id, g), ...]) for the rows whose id parsed, batched
                             per hash bucket of the id (one bucket per shard)
            -> GroupByKey(bucket) -> per bucket: each id's first g and the shards holding it
            -> (shard, (id, first g))  for each later shard holding the id
  shards to write + those claims -> CoGroupByKey(shard) -> WriteShard: reads the shard's lines
        from the manifests (seeking to a kept offset), ingestion._validate_chunk with the
        claims as its id -> first-location map (so later rows are duplicates exactly as in one
        process, the first row in (file, line) order keeping the id), then
        ingestion._commit_chunk (the shard's ArrayRecord files, rejected rows, chunk record)
  driver: ingestion.finish merges the chunk records into store.json, report.json, rejected.jsonl
        and writes stage.json.

Memory: the driver holds the list of manifest files and of shards already committed, never
anything per post; a worker holds one shard's rows (as the single-process path does), one
bucket's ids, or at most _PENDING ids of the manifest it reads. Only ids and line numbers go
through Beam's shuffle, packed in batches, never the rows: a distributed runner spreads them
over its workers (and disks), the in-process FnApiRunner holds them in memory (a few tens of
bytes per post). Images are read and decoded by the workers. Resumption: a shard whose chunk
record exists is not redone, whichever runner wrote it. Workers write into the stage
directory, so on a distributed runner the workdir, the manifests and the images must be at the
same paths on every worker (a shared filesystem).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import itertools
import json
import logging
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from vise_jax import artifacts
from vise_jax.errors import InputError
from vise_jax.posts import ingestion, validate

log = logging.getLogger(__name__)

IDS = 'ids'
# Beam's own default (DirectRunner) first tries PrismRunner, which downloads a binary from the
# internet; the FnApiRunner runs in this process (or in local worker processes with
# --direct_running_mode=multi_processing --direct_num_workers=N) and needs nothing more.
DEFAULT_RUNNER = 'FnApiRunner'


def parse_beam_options(value: str | Iterable[str],
                       key: str = 'config.ingest.beam_options') -> list[str]:
    """'--runner=DataflowRunner --project=p' (shell quoting allowed) or a tuple -> Beam's args."""
    args = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    bad = [arg for arg in args if not arg.startswith('--')]
    if bad:
        raise InputError(f'{key}={value!r}: {bad} are not --flag=value items '
                         "(expected '--runner=NAME --flag=value ...')")
    if not any(arg.startswith('--runner=') for arg in args):
        args = [f'--runner={DEFAULT_RUNNER}', *args]
    return args


def ingest(manifests: Sequence[str | os.PathLike], stage: artifacts.StageDir,
           options: ingestion.IngestOptions, config: Any = None,
           beam_options: str | Iterable[str] = '') -> dict[str, Any]:
    """Like ingestion.ingest (same store, report and errors), run as a Beam pipeline."""
    args = parse_beam_options(beam_options)
    manifests = ingestion._check_manifests(manifests)
    stage.prepare()
    out = stage.path
    committed = frozenset(ingestion._committed_shards(out))
    log.info('ingest on Beam (%s): %d manifest files, %d shards already committed',
             ' '.join(args), len(manifests), len(committed))
    with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
        _build(pipeline, [str(m) for m in manifests], out, options, committed)
    _check_fail_policy(out, options)
    return ingestion.finish(stage, manifests, options, config)


def _build(pipeline, manifests: list[str], out: Path, options: ingestion.IngestOptions,
           committed: frozenset[int]) -> None:
    files = pipeline | 'Manifests' >> beam.Create(list(enumerate(manifests)))
    layout = beam.pvalue.AsSingleton(
        files
        | 'CountLines' >> beam.Map(_count_lines, options.max_row_bytes)
        | 'AllCounts' >> beam.combiners.ToList()
        | 'Layout' >> beam.Map(_Layout, manifests, options.rows_per_shard))
    claims = (files
              | 'ReadIds' >> beam.ParDo(_ReadIds(options), layout)
              | 'IdsByBucket' >> beam.GroupByKey()
              | 'Claims' >> beam.FlatMap(_claims_of_bucket, options.rows_per_shard))
    shards = (pipeline
              | 'Start' >> beam.Create([None])
              | 'Shards' >> beam.FlatMap(lambda _, plan: ((shard, None) for shard in
                                                          range(plan.num_shards)
                                                          if shard not in committed), layout)
              | 'Spread' >> beam.Reshuffle())
    _ = ({'todo': shards, 'claims': claims}
         | 'ByShard' >> beam.CoGroupByKey()
         | 'WriteShard' >> beam.ParDo(_WriteShard(out, options), layout))


# A file's byte offset is kept every _STRIDE lines, so a shard's worker seeks near its first
# line and reads only its own lines: lines never go through Beam's shuffle, only ids do.
_STRIDE = 1024


def _count_lines(element: tuple[int, str], max_row_bytes: int
                 ) -> tuple[int, int, list[int]]:
    """One manifest -> (its index, its number of lines, the byte offset of every _STRIDE-th
    line from the first)."""
    index, path = element
    count, offsets = 0, []
    for offset, _ in validate.iter_file_lines(path, max_row_bytes, with_offsets=True):
        if count % _STRIDE == 0:
            offsets.append(offset)
        count += 1
    return index, count, offsets


class _Layout:
    """Where each global line g (0-based over all manifests in order) is: its file, its line
    number there, the shard holding it (g // rows_per_shard) and a byte offset to seek to."""

    def __init__(self, counts: list[tuple[int, int, list[int]]], manifests: list[str],
                 rows_per_shard: int):
        counts = sorted(counts)
        self.manifests = manifests
        self.rows_per_shard = rows_per_shard
        self.offsets = [offsets for _, _, offsets in counts]
        self.first = list(itertools.accumulate((count for _, count, _ in counts),
                                               initial=0))   # each file's first g, then total
        self.num_shards = -(-self.first[-1] // rows_per_shard)

    def location(self, g: int) -> str:
        index = bisect.bisect_right(self.first, g) - 1
        return f'{self.manifests[index]}:{g - self.first[index] + 1}'

    def shard_lines(self, shard: int, max_row_bytes: int) -> Iterator[validate.Line]:
        """The lines of `shard`, read from the manifests."""
        start = shard * self.rows_per_shard
        stop = min(start + self.rows_per_shard, self.first[-1])
        while start < stop:
            index = bisect.bisect_right(self.first, start) - 1
            skip = start - self.first[index]       # lines of this file before the shard's
            take = min(stop, self.first[index + 1]) - start
            checkpoint = skip // _STRIDE
            lines = validate.iter_file_lines(
                self.manifests[index], max_row_bytes, offset=self.offsets[index][checkpoint],
                number=checkpoint * _STRIDE)
            before = skip - checkpoint * _STRIDE
            yield from itertools.islice(lines, before, before + take)
            lines.close()
            start += take


# Ids are grouped by a hash bucket, one bucket per shard, not by id: a runner then holds or
# shuffles a few packed batches per bucket, not one entry per id (the in-process runner
# keeps its groupings in memory), and a worker sees one bucket's ids (N / shards) at a time.
_BATCH = 1024   # (id, g) pairs a manifest's reader packs into one element per bucket
_PENDING = 1 << 18   # pairs a reader holds at most: then every bucket's batch goes out


@beam.typehints.with_output_types(tuple[int, list[tuple[str, int]]])  # encoded, not pickled
class _ReadIds(beam.DoFn):
    """One manifest file -> (bucket, [(id, g), ...]) batches for the rows whose id parsed."""

    def __init__(self, options: ingestion.IngestOptions):
        self._options = options

    def process(self, element: tuple[int, str], layout: _Layout):
        index, path = element
        buckets = max(layout.num_shards, 1)
        batches: dict[int, list[tuple[str, int]]] = {}
        pending = 0
        lines = validate.iter_file_lines(path, self._options.max_row_bytes)
        for g, line in enumerate(lines, start=layout.first[index]):
            # Every row's id, committed shards' too: a later shard may hold its duplicates.
            for draft in ingestion._parse_rows([line], self._options):
                if draft.post_id is None:
                    continue
                bucket = _bucket(draft.post_id, buckets)
                batch = batches.setdefault(bucket, [])
                batch.append((draft.post_id, g))
                pending += 1
                if len(batch) == _BATCH:
                    pending -= len(batch)
                    yield bucket, batches.pop(bucket)
                elif pending >= _PENDING:    # many buckets, one big file: bound the reader
                    yield from batches.items()
                    batches, pending = {}, 0
        yield from batches.items()


def _bucket(post_id: str, buckets: int) -> int:
    digest = hashlib.blake2b(post_id.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(digest, 'little') % buckets


def _claims_of_bucket(element, rows_per_shard: int):
    """One bucket's ids -> (shard, (id, first g)) for every later shard that holds an id: the
    shard of an id's first row (in (file, line) order) needs no claim, its row claims it."""
    _, batches = element
    first: dict[str, int] = {}
    shards: dict[str, set[int]] = {}        # only the ids seen more than once
    for batch in batches:
        for post_id, g in batch:
            earlier = first.setdefault(post_id, g)
            if earlier != g:
                shards.setdefault(post_id, {earlier // rows_per_shard}).add(g // rows_per_shard)
                first[post_id] = min(earlier, g)
    for post_id, held in shards.items():
        g = first[post_id]
        for shard in sorted(held - {g // rows_per_shard}):
            yield shard, (post_id, g)


class _WriteShard(beam.DoFn):
    """A shard to write + the ids earlier shards own -> the committed shard (ingestion.py):
    its lines are read from the manifests here."""

    def __init__(self, out: Path, options: ingestion.IngestOptions):
        self._out = out
        self._options = options
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._options.num_threads)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown()

    def process(self, element, layout: _Layout):
        shard, grouped = element
        if not grouped['todo']:
            return  # committed before: only claims came for it
        lines = list(layout.shard_lines(shard, self._options.max_row_bytes))
        claims = {post_id: layout.location(g) for post_id, g in grouped['claims']}
        result = ingestion._validate_chunk(lines, claims, self._options,
                                           ingestion._image_root(self._options), self._pool)
        ingestion._commit_chunk(self._out, shard, result, self._options.reaction_types)
        beam.metrics.Metrics.counter('ingest', 'accepted').inc(len(result.accepted))
        beam.metrics.Metrics.counter('ingest', 'rejected').inc(len(result.rejected))


def _check_fail_policy(out: Path, options: ingestion.IngestOptions) -> None:
    """on_error='fail': the first rejected row in input order stops it, as in one process.

    The workers commit every shard; the first shard with a rejection names the row.
    """
    if options.on_error != ingestion.FAIL:
        return
    for shard in ingestion._committed_shards(out):
        if artifacts.read_json(ingestion._chunk_record(out, shard))['rejected']:
            with open(ingestion._chunk_rejected(out, shard), encoding='utf-8') as f:
                first = json.loads(f.readline())
            errors = tuple(validate.FieldError(**error) for error in first['errors'])
            ingestion._check_fail_policy(
                [validate.Rejection(first['location'], first['id'], errors)], options)
