"""The training stage on the tiny demo world: metrics, evaluation, resume, skip, NaN guard."""

import re
import shutil

import numpy as np
import pytest
from conftest import load_config, run_launch

from vise_jax import stages
from vise_jax.errors import InputError, TrainingError
from vise_jax.train import loop
from vise_jax.train.metrics import read_metrics

HEADS = ['comments_k4', 'comments_k8', 'reactions_k3']


@pytest.fixture
def workdir(labelled_world, tmp_path):
    """A copy of the session's tiny world up to its labels (conftest.labelled_world)."""
    target = tmp_path / 'run'
    shutil.copytree(labelled_world, target)
    return target


def tiny(**overrides):
    config = load_config('demo.py', 'size=tiny')
    for key, value in overrides.items():
        group, name = key.split('__')
        config[group][name] = value
    return config


def test_train_stage_logs_every_head_evaluates_and_checkpoints(workdir):
    record = stages.run(tiny(), workdir, ['train'])['train']
    assert record['summary']['final_step'] == record['summary']['total_steps'] == 4
    out = workdir / 'train'
    records = read_metrics(out / 'metrics.jsonl')
    train_steps = [r['step'] for r in records if r['split'] == 'train']
    assert train_steps == [1, 2, 3, 4]          # log_every_steps = 1
    eval_steps = [r['step'] for r in records if r['split'] == 'eval']
    assert eval_steps == [2, 4]                 # eval_every_steps = 2
    last = records[-2] if records[-1]['split'] == 'eval' else records[-1]
    for head in HEADS:
        for metric in ('loss', 'top1', 'top5'):
            assert np.isfinite(last[f'{head}/{metric}'])
        assert 0.0 <= last[f'{head}/top1'] <= last[f'{head}/top5'] <= 1.0
    for key in ('learning_rate', 'step_time', 'data_wait_time', 'images_per_second',
                'bad_images/truncated'):
        assert key in last
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['2', '4']
    assert (out / 'curves.png').stat().st_size > 0
    assert any((out / 'tensorboard').iterdir())


def test_rerun_skips_and_a_longer_schedule_continues_from_the_checkpoint(workdir):
    stages.run(tiny(), workdir, ['train'])
    record = stages.run(tiny(), workdir, ['train'])['train']   # skipped: same record
    assert record['summary']['final_step'] == 4
    longer = stages.run(tiny(train__epochs=3), workdir, ['train'])['train']
    assert longer['summary']['final_step'] == 6
    steps = [r['step'] for r in read_metrics(workdir / 'train' / 'metrics.jsonl')
             if r['split'] == 'train']
    assert steps == [1, 2, 3, 4, 5, 6]          # resumed at 4, not restarted


def test_checkpoint_of_another_model_is_refused(workdir):
    stages.run(tiny(), workdir, ['train'])
    with pytest.raises(InputError, match="checkpoint was made for model='resnet18'"):
        stages.run(tiny(model__name='resnet34', train__epochs=3), workdir, ['train'])


def test_resume_continues_exactly_where_the_run_stopped(workdir, tmp_path):
    """Two epochs in one go equal one epoch, a restart, then the second epoch."""
    straight = tmp_path / 'straight'
    shutil.copytree(workdir, straight)
    loop.train(tiny(), straight)
    loop.train(tiny(train__epochs=1), workdir)
    loop.train(tiny(), workdir)
    lines = {path: [r for r in read_metrics(path / 'train' / 'metrics.jsonl')
                    if r['split'] == 'train']
             for path in (straight, workdir)}
    for a, b in zip(lines[straight], lines[workdir], strict=True):
        assert a['step'] == b['step']
        np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)


def test_non_finite_loss_stops_the_run_naming_step_and_head(workdir):
    with pytest.raises(TrainingError, match=r'at step \d+ \(head\(s\) comments_k4'):
        loop.train(tiny(optim__base_lr=1e30, optim__warmup_epochs=0.0), workdir)


def test_launch_script_reports_a_missing_stage_cleanly(tmp_path):
    result = run_launch('train.py', '--config=configs/demo.py:size=tiny', f'--workdir={tmp_path}')
    assert result.returncode == 2
    # The message names what train needs and the first stage of the chain that is missing.
    assert re.search(r'error: train needs .*; start with the demo_world stage: python \S*'
                     r'launch/generate_demo.py', result.stderr)
    assert 'Traceback' not in result.stderr


def test_bad_head_weights_are_reported_before_training(workdir):
    with pytest.raises(InputError, match='unknown head'):
        loop.train(tiny(train__head_weights='comments_k5=2'), workdir)
