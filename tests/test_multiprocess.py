"""Two JAX processes on localhost (two fake CPU devices each, gloo collectives) train the tiny world
together like one process with four devices, stop together when one of them gets SIGTERM, and
restore their checkpoints in two processes.

Each process is tests/run_training_process.py started with --coordinator_address, --num_processes
and --process_id, the flags of launch/train.py.
"""

import re

import numpy as np
import pytest
from training_processes import (
    copy_world,
    leaves,
    max_difference,
    read_state,
    run_one,
    run_processes,
    steps,
)

# 2 steps per epoch on the tiny world: 8 steps, a checkpoint every 2, all of them kept.
RUN = ['--set=train.epochs=4', '--set=train.checkpoint_every_steps=2',
       '--set=train.eval_every_steps=0', '--set=train.keep_checkpoints=10']
# Process 1 gets SIGTERM after step 3 (both processes hold there until the notice has spread).
PREEMPTED = [*RUN, '--sigterm_at_step=3', '--sigterm_process=1']
# Summation order differs between gloo's cross-process all-reduce and one process's, so the
# runs agree to float32 rounding, not bit for bit.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def one_process(labelled_world, compile_cache, tmp_path_factory):
    """One process with four devices, the same global batch."""
    workdir = copy_world(labelled_world, tmp_path_factory.mktemp('one') / 'run')
    run_one(workdir, RUN, cache_dir=compile_cache, devices=4)
    assert steps(workdir / 'train' / 'checkpoints') == ['2', '4', '6', '8']
    return workdir / 'train' / 'checkpoints'


@pytest.fixture(scope='module')
def two_processes(labelled_world, compile_cache, tmp_path_factory):
    """Two processes, preempted after step 3: (workdir, the step both stopped at)."""
    workdir = copy_world(labelled_world, tmp_path_factory.mktemp('two') / 'run')
    results = run_processes(workdir, PREEMPTED, devices=2, cache_dir=compile_cache,
                            num_processes=2)
    stopped = []
    for index, result in enumerate(results):
        assert result.returncode == 3, f'process {index}: {result.describe()}'
        found = re.search(r'stopped at step (\d+) of 8 \(preemption\)', result.stderr)
        assert found, f'process {index}: {result.describe()}'
        stopped.append(int(found.group(1)))
    # Step 3 unless the notice took longer than the hold to spread (a loaded machine): then a
    # later step, but the same one in both processes.
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 8, stopped
    return workdir, stopped[0]


def assert_close(a, b, what):
    left, right = leaves(a), leaves(b)
    far = [name for name in left if not np.allclose(left[name], right[name], **TOLERANCE)]
    difference = max_difference(a, b)
    print(f'{what}: max |difference| {difference:.3g} over {len(left)} arrays')
    assert not far, f'{what}: {len(far)} arrays differ beyond {TOLERANCE}, e.g. {far[:5]}; ' \
                    f'max difference {difference}'


def test_two_processes_train_like_one_and_stop_together_on_sigterm(two_processes, one_process):
    workdir, stopped = two_processes
    checkpoints = workdir / 'train' / 'checkpoints'
    # The interval saves and the preemption save, nothing after it.
    assert steps(checkpoints) == sorted({*map(str, range(2, stopped + 1, 2)), str(stopped)})
    assert_close(read_state(checkpoints / '2'), read_state(one_process / '2'),
                 'step 2, two processes vs one')


def test_checkpoints_of_two_processes_restore_in_two_processes(two_processes, one_process,
                                                               compile_cache):
    workdir, stopped = two_processes
    results = run_processes(workdir, PREEMPTED, devices=2, cache_dir=compile_cache,
                            num_processes=2)
    for index, result in enumerate(results):
        assert result.returncode == 0, f'process {index}: {result.describe()}'
    assert f"resuming at step {stopped} from the run's checkpoint" in results[0].stderr, \
        results[0].describe()
    checkpoints = workdir / 'train' / 'checkpoints'
    assert steps(checkpoints) == sorted({'2', '4', '6', '8', str(stopped)})
    assert_close(read_state(checkpoints / '8'), read_state(one_process / '8'),
                 f'step 8, two processes (preempted at {stopped}, restarted) vs one')
