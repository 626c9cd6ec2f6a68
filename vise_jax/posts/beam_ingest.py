"""Ingest on Apache Beam: the single-process ingest's rows, checks and store, run by workers.

`ingest(manifests, stage, options, beam_options=...)` writes the same posts store as
`ingestion.ingest` (the same shards holding the same posts in the same order, byte for byte, the
same report.json and rejected.jsonl), with the work spread over a Beam runner's workers: local
processes (FnApiRunner/DirectRunner/PrismRunner) or Dataflow, Flink, Spark. Rows are parsed,
checked and written by ingestion.py's own functions; this module only moves lines and ids.

The pipeline (g = a line's number over all manifests in order, from 0; shard = g // rows_per_shard,
the single-process path's chunk, so shard k holds the same rows on either runner):

  manifests -> CountLines                  lines per file (one worker per file)
            -> ReadRows(first g per file)  lines:  (shard, (g, Line))
                                           ids:    (id, (g, 'file:line')) for rows whose id parsed
  ids   -> CombinePerKey(_FirstRowAndShards)  per id: its first row and the shards holding it
        -> (shard, (id, first location))  for each later shard holding the id
  lines + those claims -> CoGroupByKey(shard) -> WriteShard: ingestion._validate_chunk with the
        claims as its id -> first-location map (so later rows are duplicates exactly as in one
        process, the first row in (file, line) order keeping the id), then
        ingestion._commit_chunk (the shard's ArrayRecord files, rejected rows, chunk record)
  driver: ingestion.finish merges the chunk records into store.json, report.json, rejected.jsonl
        and writes stage.json.

Memory: the driver holds the list of manifest files and of shards already committed, never
anything per post; a worker holds one shard's rows (as the single-process path does) and the
duplicate check is a keyed combine, not an in-memory set. Images are read and decoded by the
workers. Resumption: a shard whose chunk record exists is not redone, whichever runner wrote it.
Workers write into the stage directory, so on a distributed runner the workdir, the manifests and
the images must be at the same paths on every worker (a shared filesystem).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shlex
from collections.abc import Iterable, Sequence
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
    first_lines = (files
                   | 'CountLines' >> beam.Map(_count_lines, options.max_row_bytes)
                   | 'AllCounts' >> beam.combiners.ToList()
                   | 'FirstLines' >> beam.Map(_first_lines))
    read = files | 'ReadRows' >> beam.ParDo(
        _ReadRows(options, committed), beam.pvalue.AsSingleton(first_lines)
    ).with_outputs(IDS, main='lines')
    claims = (read[IDS]
              | 'FirstRowOfEachId' >> beam.CombinePerKey(
                  _FirstRowAndShards(options.rows_per_shard))
              | 'ClaimsByShard' >> beam.FlatMap(_claims_by_shard))
    _ = ({'lines': read.lines, 'claims': claims}
         | 'ByShard' >> beam.CoGroupByKey()
         | 'WriteShard' >> beam.ParDo(_WriteShard(out, options)))


def _count_lines(element: tuple[int, str], max_row_bytes: int) -> tuple[int, int]:
    index, path = element
    return index, sum(1 for _ in validate.iter_manifest_lines([path], max_row_bytes))


def _first_lines(counts: list[tuple[int, int]]) -> list[int]:
    """Lines per file -> the global number of each file's first line."""
    first, total = [], 0
    for _, count in sorted(counts):
        first.append(total)
        total += count
    return first


class _ReadRows(beam.DoFn):
    """One manifest file -> its lines keyed by shard, and the ids of its rows."""

    def __init__(self, options: ingestion.IngestOptions, committed: frozenset[int]):
        self._options = options
        self._committed = committed

    def process(self, element: tuple[int, str], first_lines: list[int]):
        index, path = element
        lines = validate.iter_manifest_lines([path], self._options.max_row_bytes)
        for g, line in enumerate(lines, start=first_lines[index]):
            shard = g // self._options.rows_per_shard
            if shard not in self._committed:
                yield shard, (g, line)
            # Every row's id, committed shards' too: a later shard may hold its duplicates.
            for draft in ingestion._parse_rows([line], self._options):
                if draft.post_id is not None:
                    yield beam.pvalue.TaggedOutput(IDS, (draft.post_id, (g, line.location)))


class _FirstRowAndShards(beam.CombineFn):
    """Per id: the first row holding it, (g, location), and the set of shards holding it."""

    def __init__(self, rows_per_shard: int):
        self._rows_per_shard = rows_per_shard

    def create_accumulator(self):
        return None, set()

    def add_input(self, accumulator, row):
        first, shards = accumulator
        shards.add(row[0] // self._rows_per_shard)
        return (row if first is None or row[0] < first[0] else first), shards

    def merge_accumulators(self, accumulators):
        first, shards = None, set()
        for other_first, other_shards in accumulators:
            shards |= other_shards
            if other_first is not None and (first is None or other_first[0] < first[0]):
                first = other_first
        return first, shards

    def extract_output(self, accumulator):
        (g, location), shards = accumulator
        return location, sorted(shards - {g // self._rows_per_shard})


def _claims_by_shard(element):
    """(id, (first location, later shards)) -> (shard, (id, first location)) for each of them.

    The shard of the first row needs no claim: there the first row claims the id itself.
    """
    post_id, (location, shards) = element
    for shard in shards:
        yield shard, (post_id, location)


class _WriteShard(beam.DoFn):
    """One shard's lines + the ids earlier shards own -> the committed shard (ingestion.py)."""

    def __init__(self, out: Path, options: ingestion.IngestOptions):
        self._out = out
        self._options = options
        self._pool = None

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._options.num_threads)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown()

    def process(self, element):
        shard, grouped = element
        lines = [line for _, line in sorted(grouped['lines'], key=lambda item: item[0])]
        if not lines:
            return  # committed before: only claims came for it
        claims = dict(grouped['claims'])
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
