"""Grain datasets of ready batches: the index chain, the batch loader, and the builders.

The chain is a Grain MapDataset of *plans* — which examples go into which batch — followed by
one map that turns a plan into the batch:

  train: range(N) -> seed -> shuffle (reshuffled each epoch) -> repeat -> (position, rank)
         -> shard [process_index::process_count] -> batch(local, drop_remainder) -> load
  eval:  range(num_batches * global) -> (position, rank or -1 past the end) -> shard
         -> batch(local) -> load                      (one pass; padding rows get weight 0)

then `to_iter_dataset` and `mp_prefetch` (worker processes; 0 = in-process). Sharding after the
repeat makes global step s hold the global positions [s*G, (s+1)*G) whatever the process count,
and every process sees the same number of batches.

Why batches, not examples, cross the Grain chain: per-element Python work in Grain (a dict per
example, tree stacking) costs as much as a small decode, so the plan is a small int array and
the loader does the rest per batch: the batch's ArrayRecord reads, each image decoded straight
into its row of a preallocated uint8 array, targets computed with array operations.

Determinism: the shuffle is Grain's (seeded, per epoch); augmentation numbers are a hash of
(seed, epoch, example) (transforms.example_uniforms); workers take whole batches round-robin.
So batches do not depend on the worker count, and Grain's iterator state (a position) restores
exactly, with or without workers.

Checkpointing the iterator with Orbax (Grain's own handler, which writes one
`process_<i>-of-<n>.json` per process):

  iterator = data.iterator()
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=iterator_save_args(iterator)))
  ...
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=iterator_restore_args(iterator)))

`iterator_save_args` / `iterator_restore_args` are `grain.checkpoint.CheckpointSave` /
`CheckpointRestore`; restoring moves the given iterator to the saved position in place. Close
iterators explicitly (`iterator.close()`): a worker pool left to the interpreter's exit prints
shutdown tracebacks and resource-tracker warnings. (Batches that came from workers live in
shared memory that Grain frees on a background thread; one still alive as a short script exits
can leave a resource-tracker warning even after close().)
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grain
import grain.python
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh

from vise_jax.cluster import labels as labels_lib
from vise_jax.errors import InputError
from vise_jax.inputs import sources, targets, transforms
from vise_jax.inputs.bad_images import MISSING_FILE, OK
from vise_jax.inputs.batching import local_batch_size
from vise_jax.posts.manifests import resolve_manifests

TRAIN = 'train'
EVAL = 'eval'
PADDING = -1                 # the index of a padding row (eval batches past the last example)
STORE_IMAGES = 'store'
MANIFEST_IMAGES = 'manifest'
SMALL_ARRAY_BYTES = 1 << 16


# --- the plan chain ------------------------------------------------------------------------


def _with_position(position: int, rank: int) -> tuple[int, int]:
    return position, rank


def _position_or_padding(num_examples: int, position: int) -> tuple[int, int]:
    return position, position if position < num_examples else PADDING


def _stack_plan(elements) -> np.ndarray:
    return np.asarray(elements, np.int64).reshape(-1, 2)


def train_plans(num_examples: int, *, seed: int, batch_size: int, process_index: int,
                process_count: int) -> grain.MapDataset:
    """Endless [batch_size, 2] (position, rank) plans of this process; reshuffled per epoch."""
    plans = grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()
    plans = plans.map_with_index(_with_position)
    plans = plans[process_index::process_count]
    return plans.batch(batch_size, drop_remainder=True, batch_fn=_stack_plan)


def eval_plans(num_examples: int, *, global_batch_size: int, process_index: int,
               process_count: int) -> grain.MapDataset:
    """One pass in order, padded to whole global batches; every process gets as many."""
    num_batches = math.ceil(num_examples / global_batch_size)
    plans = grain.MapDataset.range(num_batches * global_batch_size)
    plans = plans.map(functools.partial(_position_or_padding, num_examples))
    plans = plans[process_index::process_count]
    return plans.batch(global_batch_size // process_count, drop_remainder=True,
                       batch_fn=_stack_plan)


# --- the batch loader ----------------------------------------------------------------------


class ClassLabels:
    """Callable: example indices -> {'label': labels[index]} (zeros for padding rows)."""

    def __init__(self, labels: np.ndarray):
        self.labels = np.asarray(labels, np.int32)

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        valid = indices >= 0
        label = self.labels[np.maximum(indices, 0)]
        return {'label': np.where(valid.reshape(-1, *[1] * (label.ndim - 1)), label, 0)}


class BatchLoader(grain.transforms.Map):
    """A plan (position, rank) [B, 2] -> the batch dict the train and eval steps take.

    `examples[rank]` is the example's index in `images` (and in the labels): the split's members.
    """

    def __init__(self, images: sources.ImageReader, examples: np.ndarray,
                 transform: transforms.TrainTransform | transforms.EvalTransform,
                 labels: Callable[[np.ndarray], dict[str, Any]], seed: int):
        self.images = images
        self.examples = np.asarray(examples, np.int64)
        self.transform = transform
        self.labels = labels
        self.seed = seed

    def map(self, plan: np.ndarray) -> dict[str, Any]:
        positions, ranks = plan[:, 0], plan[:, 1]
        valid = ranks >= 0
        indices = np.where(valid, self.examples[np.maximum(ranks, 0)], PADDING)
        image, bad_image = self._images(positions, indices, valid)
        return {
            'image': image,
            'weight': (valid & (bad_image == OK)).astype(np.float32),
            'index': indices.astype(np.int32),
            'bad_image': bad_image,
            **self.labels(indices),
        }

    def _images(self, positions: np.ndarray, indices: np.ndarray,
                valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.transform.size
        image = np.empty((len(indices), size, size, 3), np.uint8)
        bad_image = np.zeros(len(indices), np.int32)
        rows = np.flatnonzero(valid)
        encoded = self.images.read(indices[rows])
        uniforms = self._uniforms(positions[rows], indices[rows])
        for row, data, numbers in zip(rows.tolist(), encoded, uniforms, strict=True):
            bad_image[row] = (MISSING_FILE if data is None
                              else self.transform(data, numbers, image[row]))
        # A decoded image fills its whole row; the rest (bad images, padding) are black.
        image[~valid | (bad_image != OK)] = 0
        return image, bad_image

    def _uniforms(self, positions: np.ndarray, indices: np.ndarray) -> list[list[float]]:
        count = self.transform.num_uniforms
        if not count:
            return [[]] * len(indices)
        epochs = positions // len(self.examples)
        return transforms.example_uniforms(self.seed, epochs, indices, count).tolist()


# --- what a training loop holds ------------------------------------------------------------


def ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside absl.app nobody has parsed them.

    Marking them parsed keeps every default and leaves a later absl.app.run free to parse the
    command line (it parses again).
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def release_shared_memory() -> None:
    """Frees what is left of the workers' shared-memory batches before the process exits.

    Grain unlinks a batch's segment when its array is deleted, on a background thread: at exit,
    unlinks still queued there (and arrays no one collected) are left to the resource tracker,
    which cleans them but prints a 'leaked shared_memory' warning. Collect, then let that thread
    finish; deletion is synchronous afterwards. (Grain has no public call for this.)
    """
    gc.collect()
    array_class = grain.python.SharedMemoryArray
    pool = getattr(array_class, '_del_thread_pool', None)
    if pool is None:
        return
    array_class._del_thread_pool = None   # later deletions run inline
    pool.close()
    pool.join()


@dataclasses.dataclass(frozen=True)
class InputData:
    """A ready dataset of process-local batches and the numbers a loop plans with."""

    dataset: grain.IterDataset
    split: str
    num_examples: int          # examples in this split, all processes together
    global_batch_size: int
    local_batch_size: int
    steps_per_epoch: int       # train: whole global batches per pass; eval: batches of the pass

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator (close it when done); Grain's get_state/set_state checkpoint it."""
        ensure_flags_parsed()
        return iter(self.dataset)


@dataclasses.dataclass(frozen=True)
class PretrainData(InputData):
    heads: dict[str, targets.HeadSpec]  # name -> (kind, k, max_targets)


@dataclasses.dataclass(frozen=True)
class DownstreamData(InputData):
    task: sources.Task


def iterator_save_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args saving a Grain iterator's position (put it in an ocp.args.Composite)."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args restoring a saved position into `iterator` (which is moved in place)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise InputError(f'process_index={process_index} is not in [0, {process_count})')
    return process_index, process_count


def _check_split(split: str) -> None:
    if split not in (TRAIN, EVAL):
        raise InputError(f"split must be '{TRAIN}' or '{EVAL}', got {split!r}")


def make_transform(inp: ml_collections.ConfigDict, training: bool):
    if training:
        return transforms.TrainTransform(inp.image_size, inp.max_image_pixels,
                                         scale=tuple(inp.crop_scale), ratio=tuple(inp.crop_ratio))
    return transforms.EvalTransform(inp.image_size, inp.max_image_pixels,
                                    crop_fraction=inp.eval_crop_fraction)


def batch_dataset(loader: BatchLoader, num_examples: int, *, training: bool, seed: int,
                  global_batch_size: int, process_index: int, process_count: int,
                  num_workers: int, prefetch_batches: int = 2,
                  read_threads: int = 0) -> tuple[grain.IterDataset, int]:
    """The loader over train or eval plans, prefetched; returns (dataset, steps_per_epoch)."""
    if num_workers < 0 or prefetch_batches < 1 or read_threads < 0:
        raise InputError('input.num_workers and input.read_threads must be >= 0 and '
                         f'input.prefetch_batches >= 1; got {num_workers}, {read_threads}, '
                         f'{prefetch_batches}')
    batch_size = local_batch_size(global_batch_size, process_count)
    if training:
        steps = num_examples // global_batch_size
        if steps == 0:
            raise InputError(f'the training split has {num_examples} examples, fewer than one '
                             f'global batch ({global_batch_size}); lower '
                             'input.global_batch_size')
        plans = train_plans(num_examples, seed=seed, batch_size=batch_size,
                            process_index=process_index, process_count=process_count)
    else:
        steps = math.ceil(num_examples / global_batch_size)
        plans = eval_plans(num_examples, global_batch_size=global_batch_size,
                           process_index=process_index, process_count=process_count)
    dataset = plans.map(loader).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    # Small arrays (weights, targets) travel pickled: a shared-memory segment each costs more.
    dataset = grain.experimental.WithOptionsIterDataset(
        dataset, grain.experimental.DatasetOptions(min_shm_size=SMALL_ARRAY_BYTES))
    if num_workers:
        ensure_flags_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=prefetch_batches))
    return dataset, steps


def pretrain_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  split: str = TRAIN, *, heads: tuple[str, ...] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  mesh: Mesh | None = None,
                  labels_dir: str | os.PathLike | None = None) -> PretrainData:
    """Batches of posts ({workdir}/posts or the manifest) with targets from {workdir}/labels.

    `labels_dir` replaces {workdir}/labels (e.g. object labels for a supervised baseline).

    split 'train': random-resized crops, shuffled, endless. split 'eval': the held-out posts
    (input.eval_fraction, by a hash of the post id), eval transform, one pass, padded.
    Heads: `heads`, else config.input.heads, else every head of the label store. With `mesh`,
    the global batch is also checked against the mesh's row shards.
    """
    _check_split(split)
    inp = config.input
    workdir = Path(workdir)
    process_index, process_count = _process(process_index, process_count)
    local_batch_size(inp.global_batch_size, process_count, mesh)
    images, post_ids = _pretrain_images(config, workdir)
    label_store = labels_lib.LabelStore(labels_dir or workdir / 'labels')
    # One pass over the ids, a stream from the store: never every id in memory.
    digest = labels_lib.PostIdsDigest()
    held_out = sources.eval_membership(digest.passing(post_ids), inp.eval_fraction)
    label_store.check_digest(digest.hexdigest())
    specs = targets.head_specs(label_store, tuple(heads or inp.heads), inp.max_targets_per_post)
    members = np.flatnonzero(held_out if split == EVAL else ~held_out)
    if not len(members):
        raise InputError(f'the {split} split of {len(held_out)} posts is empty '
                         f'(input.eval_fraction={inp.eval_fraction})')
    loader = BatchLoader(images, members, make_transform(inp, split == TRAIN),
                         targets.PostTargets(label_store.directory, specs), config.seed)
    dataset, steps = batch_dataset(
        loader, len(members), training=split == TRAIN, seed=config.seed,
        global_batch_size=inp.global_batch_size, process_index=process_index,
        process_count=process_count, num_workers=inp.num_workers,
        prefetch_batches=inp.prefetch_batches, read_threads=inp.read_threads)
    return PretrainData(dataset, split, len(members), inp.global_batch_size,
                        inp.global_batch_size // process_count, steps, specs)


def _pretrain_images(config: ml_collections.ConfigDict,
                     workdir: Path) -> tuple[sources.ImageReader, Iterable[str]]:
    kind = config.input.pretrain_images
    if kind == STORE_IMAGES:
        return (sources.StoreImages(workdir / 'posts'),
                sources.iter_store_post_ids(workdir / 'posts'))
    if kind == MANIFEST_IMAGES:
        # The store's ids keep exactly the rows ingest accepted, in its order, so the labels
        # (made from the store) line up even when ingest rejected rows for their images.
        manifests = resolve_manifests(config.posts.manifest)
        return sources.manifest_posts(manifests, config.posts.image_root,
                                      tuple(config.posts.reaction_types),
                                      accepted_ids=sources.store_post_ids(workdir / 'posts'))
    raise InputError(f"input.pretrain_images must be '{STORE_IMAGES}' or '{MANIFEST_IMAGES}', "
                     f'got {kind!r}')


def downstream_data(data: sources.LabelledImages, task: str, config: ml_collections.ConfigDict,
                    *, training: bool = False, process_index: int | None = None,
                    process_count: int | None = None,
                    global_batch_size: int | None = None) -> DownstreamData:
    """Batches of a downstream set with {'label'} for `task` instead of 'targets'.

    training=False (feature extraction, evaluation): eval transform, one pass in order, padded.
    training=True: random-resized crops, shuffled, endless. Image size, workers and transforms
    come from config.input; the batch size too unless given.
    """
    inp = config.input
    process_index, process_count = _process(process_index, process_count)
    spec = data.task(task)
    global_batch_size = global_batch_size or inp.global_batch_size
    loader = BatchLoader(data.images, np.arange(len(data)), make_transform(inp, training),
                         ClassLabels(data.labels[task]), config.seed)
    dataset, steps = batch_dataset(
        loader, len(data), training=training, seed=config.seed,
        global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count, num_workers=inp.num_workers,
        prefetch_batches=inp.prefetch_batches, read_threads=inp.read_threads)
    return DownstreamData(dataset, TRAIN if training else EVAL, len(data), global_batch_size,
                          global_batch_size // process_count, steps, spec)
