"""The demo pipeline's time budget, stage by stage, from a fresh workdir.

  python bench/pipeline_bench.py --workdir=/tmp/pipeline_bench [--config=configs/demo.py]

Runs every stage of launch/pipeline.py in a new --workdir (removed first unless --keep), times
each, and prints a table of seconds per stage, its share of the total, and the total against the
budget (--budget_minutes, default 15: what the demo must take on 2 CPU cores). There is no peer
to run in the same process here: the figure is a budget, so the script also prints the machine's
cores and load so that a noisy run can be told from a slow one.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

from config_loader import load_config

from vise_jax import inputs as input_lib
from vise_jax import stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='/tmp/pipeline_bench')
    parser.add_argument('--config', default='configs/demo.py')
    parser.add_argument('--budget_minutes', type=float, default=15.0)
    parser.add_argument('--keep', action='store_true', help='reuse finished stages in --workdir')
    args = parser.parse_args()

    workdir = Path(args.workdir)
    if workdir.exists() and not args.keep:
        shutil.rmtree(workdir)
    config = load_config(args.config)
    print(f'{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}')
    times = {}
    try:
        for stage in stages.STAGES:
            start = time.perf_counter()
            stages.run(config, workdir, [stage])
            times[stage] = time.perf_counter() - start
            print(f'  {stage}: {times[stage]:.1f} s', flush=True)
    finally:
        input_lib.release_shared_memory()   # as launch/cli.py does: no leaked-segment warning
    total = sum(times.values())
    print('\n| stage | seconds | share |\n|---|---:|---:|')
    for stage, seconds in times.items():
        print(f'| {stage} | {seconds:.1f} | {seconds / total:.0%} |')
    budget = args.budget_minutes * 60
    print(f'| total | {total:.1f} | |\n\ntotal / budget ({args.budget_minutes:g} min): '
          f'{total / budget:.2f}; load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
