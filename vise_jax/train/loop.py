"""The training loop: data, model, optimizer and checkpoints wired for one run.

`train(config, workdir)` is what launch/train.py runs. Every process runs the same loop over its
own shard of the posts; the global batch is assembled on the mesh, so one code path serves a
laptop CPU, one GPU and a TPU pod. Per step the host only fetches the next local batch and
dispatches the jitted step; metrics are read one step late, so the device is never waited on
except at logging, evaluation and checkpoint steps.

Output in {workdir}/train: checkpoints/ (Orbax; config.train.checkpoint_dir may put them
elsewhere, e.g. a bucket); on process 0 metrics.jsonl, tensorboard/ and curves.png; stage.json
when the last step is done. A run starts from its own latest checkpoint, else
config.train.resume, else config.train.init (weights the caller reads: `init`), else from
scratch (checkpointing.starting_state); a SIGTERM or the multi-host preemption sync point saves
and stops every process at one step.

The steps run under `jax.transfer_guard('disallow')`: a host<->device copy nobody asked for is
an error, not a silent stall. The deliberate ones are explicit: the global batch
(`_global_batch`: jax.make_array_from_process_local_data), metrics and checksums
(jax.device_get), and a save (checkpointing.save allows Orbax's copy of the state to the
host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from vise_jax import artifacts, distributed, models, sharding, specs
from vise_jax import inputs as input_lib
from vise_jax.errors import TrainingError
from vise_jax.train import checkpointing, optim, plots
from vise_jax.train import state as state_lib
from vise_jax.train import step as step_lib
from vise_jax.train.metrics import MeanAccumulator, MetricWriter

log = logging.getLogger(__name__)


def head_weights(configured: str, heads: Mapping[str, Any]) -> dict[str, float]:
    """Loss weight per head from 'name=weight,...' (config.train.head_weights); 1.0 otherwise."""
    key = 'config.train.head_weights'
    weights = specs.parse_mapping(configured, key, convert=float, what='NUMBER')
    for name in weights:
        if name not in heads:
            raise specs.spec_error(key, configured, f'unknown head {name!r}; the labels have '
                                   f'{sorted(heads)}', 'NAME=NUMBER,...')
    return {**dict.fromkeys(heads, 1.0), **weights}


def run_meta(config: ml_collections.ConfigDict, heads: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint of this run is made for (checked on restore), and how it was made.

    The train step draws no random numbers: `seed` (with the initial key derived from it) fixes
    the initial weights, the shuffle and the augmentation; the data position is saved with the
    iterator. So the seed is all the randomness a resume needs, and it is checked.
    """
    plain = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    key = jax.random.key(config.seed)
    return {'model': config.model.name, 'width': int(config.model.width),
            'image_size': config.input.image_size,
            'heads': {name: int(info.k) for name, info in heads.items()},
            'seed': int(config.seed),
            'rng': {'seed': int(config.seed), 'impl': str(jax.random.key_impl(key)),
                    'init_key': np.asarray(jax.random.key_data(key)).tolist()},
            'config': plain, 'config_hash': artifacts.fingerprint(plain)}


def check_finite(step: int, metrics: Mapping[str, Any], heads) -> None:
    """Stops the run at the first non-finite loss (or gradient), naming the step and the head.

    The gradient is checked too: it is what the update of this step applied, so a finite loss
    with an infinite gradient would otherwise let a broken state reach a checkpoint.
    """
    loss = float(metrics['loss'])
    grad_norm = float(metrics.get('grad_norm', 0.0))
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    bad = [h for h in heads if not math.isfinite(float(metrics[f'{h}/loss']))]
    if bad:
        where = f'head(s) {", ".join(bad)}'
    elif not math.isfinite(loss):
        where = 'the weighted sum of the heads'
    else:
        where = "every head's loss was finite"
    what = f'loss is {loss}' if not math.isfinite(loss) else f'gradient norm is {grad_norm}'
    raise TrainingError(
        f'{what} at step {step} ({where}); the parameters are no longer usable. '
        'The last checkpoint before this step is intact: lower config.optim.base_lr or raise '
        'config.optim.warmup_epochs, then rerun')


class StopRequest:
    """Set when the process receives SIGTERM (a scheduler's preemption notice).

    Only in a single-process run: with several processes JAX's own SIGTERM handler (installed
    by jax.distributed) feeds the preemption sync point, which stops every process at the same
    step (`stop_now`); a handler of ours would replace it and stop one process alone, leaving
    the others waiting in a collective.
    """

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        if jax.process_count() > 1:
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def stop_now(self, manager: Any, step: int) -> bool:
        """Whether to save and stop after `step`; every process gets the same answer."""
        return self.requested or manager.reached_preemption(step)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        log.warning('SIGTERM received: saving a checkpoint and stopping')
        self.requested = True


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    train_data: Any
    eval_data: Any | None
    model: Any
    schedule: optim.Schedule
    weights: dict[str, float]
    state: state_lib.TrainState
    shardings: Any
    train_step: Any
    eval_step: Any | None
    meta: dict[str, Any]


def build_run(config: ml_collections.ConfigDict, workdir: Path,
              labels_dir: Path | None = None) -> Run:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    train_data = input_lib.pretrain_data(config, workdir, split='train', labels_dir=labels_dir)
    eval_data = (input_lib.pretrain_data(config, workdir, split='eval', labels_dir=labels_dir)
                 if config.train.eval_every_steps else None)
    heads = train_data.heads
    weights = head_weights(config.train.head_weights, heads)
    model = models.create_model(config.model, {name: info.k for name, info in heads.items()})
    schedule = optim.make_schedule(config.optim, steps_per_epoch=train_data.steps_per_epoch,
                                   global_batch_size=config.input.global_batch_size,
                                   epochs=config.train.epochs)
    optimizer = optim.make_optimizer(config.optim, schedule)
    state, shardings = state_lib.create_train_state(
        model, optimizer, config.input.image_size, jax.random.key(config.seed), mesh)
    options = step_lib.StepOptions(weights, config.optim.label_smoothing,
                                   config.train.grad_accum_steps)
    train_step = step_lib.jit_train_step(model, optimizer, optim.learning_rate_fn(schedule),
                                         options, mesh, shardings)
    eval_step = (step_lib.jit_eval_step(model, heads, mesh, shardings)
                 if eval_data is not None else None)
    return Run(config, mesh, train_data, eval_data, model, schedule, weights, state, shardings,
               train_step, eval_step, run_meta(config, heads))


def evaluate(run: Run, state: state_lib.TrainState) -> dict[str, float]:
    """One pass over the held-out posts (padded so every process runs as many batches).

    The per-head sums are added up on the devices and read once, at the end.
    """
    totals = None
    iterator = run.eval_data.iterator()
    try:
        for local in itertools.islice(iterator, run.eval_data.steps_per_epoch):
            sums = run.eval_step(state, _global_batch(local, run.mesh))
            totals = sums if totals is None else _add(totals, sums)
    finally:
        _close(iterator)   # its worker processes, now rather than at garbage collection
    summary = jax.device_get(_summarize(totals, tuple(run.weights.items())))
    return {k: float(v) for k, v in summary.items()}


def _global_batch(local: Any, mesh: jax.sharding.Mesh) -> Any:
    """The global batch from this process's rows: the step loop's deliberate host-to-device
    copy (with several processes jax.make_array_from_process_local_data goes through a path
    the transfer guard counts as implicit, so it is allowed here by name)."""
    with jax.transfer_guard_host_to_device('allow'):
        return input_lib.global_batch(local, mesh)


@jax.jit
def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: x + y, a, b)


@functools.partial(jax.jit, static_argnums=1)
def _summarize(totals: Any, weights: tuple[tuple[str, float], ...]) -> dict[str, jax.Array]:
    """step.summarize compiled: its constants stay on the device (no transfers)."""
    return step_lib.summarize(totals, dict(weights))


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          labels_dir: str | Path | None = None, out_dir: str | Path | None = None,
          init: checkpointing.Init | None = None) -> dict[str, Any]:
    """Trains to config.train.epochs, resuming from the latest checkpoint in the output.

    Posts come from the workdir, labels from `labels_dir` (default {workdir}/labels), and the
    output goes to `out_dir` (default {workdir}/train). Paths in the config are used as they
    are ('{workdir}' is the stage's to expand). `init` is config.train.init's backbone with the
    function that reads it (the train stage builds it with vise_jax.export.load_backbone); it
    is read only when the run has no checkpoint of its own and no config.train.resume.
    """
    if config.train.init and init is None:
        raise ValueError(f'config.train.init={config.train.init!r}, but no `init` to read it '
                         'was passed (vise_jax.stages builds one)')
    workdir = Path(workdir)
    out = Path(out_dir) if out_dir else workdir / 'train'
    run = build_run(config, workdir, Path(labels_dir) if labels_dir else None)
    primary = jax.process_index() == 0
    with contextlib.ExitStack() as cleanup:
        # Closed however the run ends (a NaN included): Grain workers left to the interpreter's
        # exit print tracebacks, and an async save must finish before the process goes.
        iterator = run.train_data.iterator()
        cleanup.callback(_close, iterator)
        # The processes meet before their first collective (the manager's): building the run
        # may take one of them far longer than the gloo rendezvous waits (distributed.py).
        distributed.barrier(f'vise_jax.train: run built ({out})')
        manager = checkpointing.make_manager(
            config.train.checkpoint_dir or out / 'checkpoints',
            every_steps=config.train.checkpoint_every_steps,
            keep=config.train.keep_checkpoints, keep_every_steps=config.train.keep_every_steps)
        cleanup.callback(manager.close)
        state, tally = _train_steps(run, out, iterator, manager, resume=config.train.resume,
                                    init=init)
    if primary:
        log.info('train: curves in %s', plots.plot_curves(out / 'metrics.jsonl',
                                                          out / 'curves.png', list(run.weights)))
    final_step = int(jax.device_get(state.step))
    total = run.schedule.total_steps
    return {'final_step': final_step, 'total_steps': total, 'finished': final_step == total,
            'bad_images': tally.counts()}


def _train_steps(run: Run, out: Path, iterator: Any, manager: Any, *, resume: str = '',
                 init: checkpointing.Init | None = None) -> tuple[Any, Any]:
    """Steps from where the run starts (checkpointing.starting_state) to the end or a stop."""
    config = run.config
    primary = jax.process_index() == 0
    start = checkpointing.starting_state(manager, run.state, run.shardings, iterator, run.meta,
                                         resume=resume, init=init)
    state = start.state
    first_step = int(jax.device_get(state.step))
    total = run.schedule.total_steps
    log_every = config.train.log_every_steps
    batch_images = config.input.global_batch_size
    _log_plan(run, start)
    if primary:
        _forget_metrics_after(out / 'metrics.jsonl', first_step)

    tally = input_lib.BadImageTally.from_config(config)
    interval = MeanAccumulator()
    data_wait = 0.0
    last_time = time.perf_counter()
    pending = None  # (step, device metrics) of the step dispatched last
    stop = StopRequest()
    with (MetricWriter(out, enabled=primary) as writer, stop.installed(),
          tqdm.tqdm(total=total, initial=first_step, disable=not primary, unit='step',
                    dynamic_ncols=True, desc='train') as progress,
          jax.transfer_guard('disallow')):   # only explicit transfers (module docstring)
        for step in range(first_step, total):
            wait_start = time.perf_counter()
            local = next(iterator)
            data_wait += time.perf_counter() - wait_start
            tally.update(local['bad_image'], local['weight'], local['index'])
            state, metrics = run.train_step(state, _global_batch(local, run.mesh))
            if pending is not None:
                interval.add(_checked(*pending, run.weights))
            pending = (step + 1, metrics)
            progress.update(1)

            done = step + 1
            if done % log_every == 0 or done == total:
                interval.add(_checked(*pending, run.weights))
                pending = None
                now = time.perf_counter()
                scalars = interval.result()
                scalars['images_per_second'] = len(interval) * batch_images / (now - last_time)
                scalars['step_time'] = (now - last_time) / len(interval)
                scalars['data_wait_time'] = data_wait / len(interval)
                scalars.update({f'bad_images/{k}': v for k, v in tally.counts().items()})
                writer.write(done, 'train', scalars)
                progress.set_postfix(loss=f'{scalars["loss"]:.3f}',
                                     img_s=f'{scalars["images_per_second"]:.0f}')
                interval.reset()
                data_wait = 0.0
                last_time = time.perf_counter()
            if run.eval_step is not None and (done % config.train.eval_every_steps == 0
                                              or done == total):
                writer.write(done, 'eval', evaluate(run, state))
            stopping = stop.stop_now(manager, done)
            if stopping or done == total or manager.should_save(done):
                if pending is not None:  # never save parameters a NaN has reached
                    interval.add(_checked(*pending, run.weights))
                    pending = None
                checkpointing.save(manager, done, state, iterator, run.meta,
                                   force=stopping or done == total)
            if stopping:
                log.warning('train: stopped at step %d of %d (preemption); rerun the same '
                            'command to continue', done, total)
                break
    return state, tally


def _checked(step: int, metrics: Any, weights: Mapping[str, float]) -> dict[str, float]:
    host = jax.device_get(metrics)
    check_finite(step, host, weights)
    return host


def _close(iterator: Any) -> None:
    close = getattr(iterator, 'close', None)
    if close is not None:
        close()


def _forget_metrics_after(path: Path, step: int) -> None:
    """Drops metric records past the step a run resumes at (a killed run logged steps its
    checkpoint does not have; they are logged again), and a last line cut off by the kill."""
    if not path.exists():
        return
    original = path.read_text(encoding='utf-8')
    kept = []
    for line in original.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get('step', 0) <= step and line.endswith('\n'):
            kept.append(line)
    text = ''.join(kept)
    if text != original:
        artifacts.atomic_write_text(path, text)


def _log_plan(run: Run, start: checkpointing.Start) -> None:
    schedule = run.schedule
    log.info('train: %d posts, %d steps per epoch, %d steps in all, peak lr %.4g, '
             'mesh %s, %d parameters, heads %s',
             run.train_data.num_examples, schedule.steps_per_epoch, schedule.total_steps,
             schedule.peak_learning_rate, dict(run.mesh.shape),
             state_lib.param_count(run.state.params), run.meta['heads'])
    log.info('train: %s', start.describe())
