"""Does the input pipeline keep the train step fed? Steps/s with real batches vs one cached batch.

  python bench/train_feed_bench.py --workdir=workdirs/demo [--config=configs/demo.py] [--steps=30]

Runs the demo pipeline's stages up to `cluster` in --workdir if they are not done, builds the
training run exactly as launch/train.py does, then alternates two timed segments of --steps
steps, round after round: (a) the real Grain pipeline (decode, augment, batch, global assembly
every step) and (b) one batch taken from it once and kept on device. Prints steps/s of both and
the ratio real / synthetic (goal >= 0.95: the loop never waits on data). Each segment blocks on
its last step, so queued work is counted where it was spent.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
from config_loader import load_config

from vise_jax import inputs as input_lib
from vise_jax import stages
from vise_jax.train import loop


def timed_steps(step_fn, state, batches, count: int):
    start = time.perf_counter()
    for _ in range(count):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready(metrics)
    return state, count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='workdirs/demo')
    parser.add_argument('--config', default='configs/demo.py')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()

    config = load_config(args.config)
    stages.run(config, args.workdir, ['demo_world', 'ingest', 'embed', 'cluster'])
    run = loop.build_run(config, Path(args.workdir))
    iterator = run.train_data.iterator()

    def real_batches():
        while True:
            yield input_lib.global_batch(next(iterator), run.mesh)

    cached = input_lib.global_batch(next(iterator), run.mesh)

    def cached_batches():
        while True:
            yield cached

    real, synthetic = real_batches(), cached_batches()
    state, _ = timed_steps(run.train_step, run.state, synthetic, 3)   # compile and warm up
    state, _ = timed_steps(run.train_step, state, real, 3)
    rates = {'real': [], 'synthetic': []}
    for _ in range(args.rounds):
        state, rate = timed_steps(run.train_step, state, real, args.steps)
        rates['real'].append(rate)
        state, rate = timed_steps(run.train_step, state, synthetic, args.steps)
        rates['synthetic'].append(rate)
    iterator.close()

    batch = config.input.global_batch_size
    print(f'{config.model.name} at {config.input.image_size} px, global batch {batch}, '
          f'{config.input.num_workers} Grain workers, {jax.device_count()} devices, '
          f'{args.rounds} rounds x {args.steps} steps')
    for name, values in rates.items():
        print(f'  {name:9s}: best {max(values):.3f} steps/s ({max(values) * batch:.0f} images/s), '
              f'all {", ".join(f"{v:.3f}" for v in values)}')
    ratio = max(rates['real']) / max(rates['synthetic'])
    print(f'ratio real / synthetic (best rounds): {ratio:.3f}   (goal >= 0.95)')


if __name__ == '__main__':
    sys.exit(main())
