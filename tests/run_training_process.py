"""A training process for the checkpointing tests: loop.train on a prepared workdir, with crashes.

  python tests/run_training_process.py --workdir=W [--set=train.epochs=4 ...]
      [--kill_at_step=K --after_checkpoint=S]      SIGKILL itself after step K, once S is saved
      [--kill_during_save=S --crash_point=write|commit]
                                                   SIGKILL itself while step S is being saved:
                                                   'write' as the meta item is written (the
                                                   state's files are being written), 'commit'
                                                   when every file is written but the step's
                                                   directory is not yet renamed into place
      [--sigterm_at_step=K --sigterm_process=P --hold=SECONDS]
                                                   process P sends itself SIGTERM after step K
                                                   and every process holds there, so the
                                                   preemption notice reaches all of them before
                                                   step K + 1: they must all stop after step K
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I
       --distributed_timeout=SECONDS]              how long processes wait for each other

Each crash happens once per workdir (a marker file records it), so rerunning the very same
command continues the run, as a restarted job would. Process 0 logs at INFO on stderr; the last
stdout line is `RESULT {json summary}`. Exit status 0 when the run finished, 3 when it stopped
early (preemption).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--config', default='demo.py:size=tiny')
    parser.add_argument('--set', action='append', default=[], metavar='GROUP.KEY=VALUE')
    parser.add_argument('--kill_at_step', type=int)
    parser.add_argument('--after_checkpoint', type=int)
    parser.add_argument('--kill_during_save', type=int)
    parser.add_argument('--crash_point', choices=('write', 'commit'), default='commit')
    parser.add_argument('--sigterm_at_step', type=int)
    parser.add_argument('--sigterm_process', type=int, default=0)
    parser.add_argument('--hold', type=float, default=4.0)
    parser.add_argument('--coordinator_address', default='')
    parser.add_argument('--num_processes', type=int)
    parser.add_argument('--process_id', type=int)
    # Generous: on a loaded machine one process may start, compile or restore minutes after the
    # other (distributed.initialize's timeout_s).
    parser.add_argument('--distributed_timeout', type=int, default=600)
    return parser.parse_args(argv)


def load_config(spec: str, overrides: list[str]):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import load_config as load  # noqa: PLC0415 (after sys.path)

    name, _, arg = spec.partition(':')
    config = load(name, arg or None)
    for item in overrides:
        key, _, text = item.partition('=')
        group, name = key.split('.')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config[group][name] = value
    return config


def once(marker: Path) -> bool:
    """True the first time for this marker (then records it)."""
    if marker.exists():
        return False
    marker.write_text(str(os.getpid()))
    return True


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_step_hooks(args, loop, workdir: Path, checkpoints: Path) -> None:
    """Wraps the jitted train step of every Run that loop.build_run makes."""
    import jax

    build_run = loop.build_run
    first = {}

    def hooked_build_run(*a, **k):
        run = build_run(*a, **k)
        step_fn = run.train_step

        def train_step(state, batch):
            done = int(jax.device_get(state.step)) + 1   # read before the state is donated
            first.setdefault('step', done - 1)
            out = step_fn(state, batch)
            if done == args.kill_at_step and once(workdir / f'.killed-at-{done}'):
                deadline = time.time() + 300
                while not (checkpoints / str(args.after_checkpoint)).is_dir():
                    if time.time() > deadline:
                        raise RuntimeError(f'checkpoint {args.after_checkpoint} never appeared')
                    time.sleep(0.05)
                jax.block_until_ready(out)
                print(f'killing myself after step {done}', file=sys.stderr)
                die()
            if done == args.sigterm_at_step and first['step'] == 0:   # the first run only
                if jax.process_index() == args.sigterm_process:
                    print(f'process {args.sigterm_process}: SIGTERM after step {done}',
                          file=sys.stderr)
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(args.hold)   # JAX's preemption listener polls once a second
            return out

        return dataclasses.replace(run, train_step=train_step)

    loop.build_run = hooked_build_run


def install_save_crash(args, workdir: Path) -> None:
    import orbax.checkpoint as ocp

    step = args.kill_during_save
    marker = workdir / f'.killed-saving-{step}'
    if args.crash_point == 'commit':
        cls = ocp.path.atomicity.AtomicRenameTemporaryPath
        finalize = cls.finalize

        async def crashing_finalize(self):
            if self.get_final().name == str(step) and once(marker):
                print(f'killing myself before step {step} is committed', file=sys.stderr)
                die()
            return await finalize(self)

        cls.finalize = crashing_finalize
    else:
        cls = ocp.handlers.JsonCheckpointHandler
        async_save = cls.async_save

        async def crashing_save(self, directory, *a, **k):
            if directory.parent.name.startswith(f'{step}.') and once(marker):
                print(f'killing myself while step {step} is written', file=sys.stderr)
                die()
            return await async_save(self, directory, *a, **k)

        cls.async_save = crashing_save


def main(argv=None) -> int:
    args = parse_args(argv)
    from vise_jax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           timeout_s=args.distributed_timeout)
    import jax

    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        stream=sys.stderr, force=True,
                        format=f'[p{jax.process_index()}] %(levelname)s %(name)s: %(message)s')
    for noisy in ('absl', 'jax', 'orbax'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from vise_jax import configlib, export
    from vise_jax.train import checkpointing, loop

    workdir = Path(args.workdir)
    # What the train stage does before loop.train: '{workdir}' expanded, config.train.init read
    # by vise_jax.export.
    config = configlib.with_workdir(load_config(args.config, args.set), workdir)
    init = (checkpointing.Init(config.train.init,
                               lambda: export.load_backbone(config.train.init))
            if config.train.init else None)
    checkpoints = Path(config.train.checkpoint_dir or workdir / 'train' / 'checkpoints')
    install_step_hooks(args, loop, workdir, checkpoints)
    if args.kill_during_save is not None:
        install_save_crash(args, workdir)
    summary = loop.train(config, workdir, init=init)
    print('RESULT ' + json.dumps({'process': jax.process_index(), **summary}), flush=True)
    return 0 if summary['finished'] else 3


if __name__ == '__main__':
    sys.exit(main())
