"""Multi-process start-up detection, the TPU pod launcher, and the loop's small guards."""

import shlex

import pytest
from conftest import run_launch

from vise_jax import distributed
from vise_jax.errors import InputError, TrainingError
from vise_jax.train import loop


@pytest.mark.parametrize('environ, launcher', [
    ({}, None),
    ({'SLURM_NTASKS': '1'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),               # a single-host TPU VM
    ({'SLURM_NTASKS': '16'}, 'SLURM'),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'TPU pod slice'),
    ({'OMPI_COMM_WORLD_SIZE': '8'}, 'Open MPI'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'JAX_COORDINATOR_ADDRESS'),
])
def test_multi_process_launch_is_recognised_from_the_environment(environ, launcher):
    assert distributed.multi_process_launcher(environ) == launcher


def test_single_process_run_does_not_start_distributed():
    assert distributed.initialize(environ={}) is False


def test_pod_launcher_runs_the_same_command_on_every_worker():
    result = run_launch('pod.py', '--tpu=v5e-64', '--zone=us-west4-a', '--dry_run',
                        '--env=XLA_FLAGS=--a --b', '--',
                        'python', 'launch/train.py', '--config=configs/vise_resnet50.py',
                        '--workdir=gs://bucket/run 1')
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5e-64',
                        '--zone=us-west4-a']
    assert '--worker=all' in argv
    script = next(a for a in argv if a.startswith('--command=')).removeprefix('--command=')
    assert script.startswith('cd ~/vise_jax && ')
    assert shlex.split(script.split(' && ', 2)[2]) == [
        'python', 'launch/train.py', '--config=configs/vise_resnet50.py',
        '--workdir=gs://bucket/run 1']
    assert shlex.split(script.split(' && ')[1]) == ['export', 'XLA_FLAGS=--a --b']


def test_pod_launcher_wants_a_command():
    result = run_launch('pod.py', '--tpu=t', '--zone=z', '--dry_run')
    assert result.returncode != 0 and 'give the command' in result.stderr


def test_head_weights_default_to_one_and_check_names():
    heads = {'comments_k16': None, 'reactions_k8': None}
    assert loop.head_weights('', heads) == {'comments_k16': 1.0, 'reactions_k8': 1.0}
    assert loop.head_weights('reactions_k8=0.5', heads)['reactions_k8'] == 0.5
    with pytest.raises(InputError, match="unknown head 'comments_k99'"):
        loop.head_weights('comments_k99=1', heads)
    with pytest.raises(InputError, match="'x' is not a number"):
        loop.head_weights('reactions_k8=x', heads)


def test_non_finite_loss_names_the_step_and_head():
    metrics = {'loss': float('nan'), 'comments_k16/loss': float('nan'),
               'reactions_k8/loss': 1.0}
    with pytest.raises(TrainingError, match=r'at step 7 \(head\(s\) comments_k16\)'):
        loop.check_finite(7, metrics, ['comments_k16', 'reactions_k8'])
    loop.check_finite(8, {**metrics, 'loss': 2.0}, ['comments_k16'])   # finite: no error
    finite_loss = {'loss': 2.0, 'comments_k16/loss': 2.0, 'grad_norm': float('inf')}
    with pytest.raises(TrainingError, match='gradient norm is inf at step 9'):
        loop.check_finite(9, finite_loss, ['comments_k16'])
