"""Configs: every file loads with its variants; overrides are type-checked."""

import pytest
from conftest import REPO, load_config, run_launch

from vise_jax import configlib

CONFIGS = sorted((REPO / 'configs').glob('*.py'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_documents_its_command(path):
    config = load_config(path.name)
    assert set(config) == set(configlib.default_config())  # no stray or missing groups
    assert f'--config=configs/{path.name}' in path.read_text()  # docstring gives the command


def test_variants():
    assert load_config('demo.py', 'size=tiny').demo.num_pretrain == 48
    assert load_config('vise_resnet50.py', 'batch=8192').input.global_batch_size \
        == 8192
    debug = load_config('debug_gpu.py', 'demo')
    assert debug.demo.enabled and debug.demo.world.image_size == 224
    with pytest.raises(ValueError, match='unknown size'):
        load_config('demo.py', 'size=huge')
    with pytest.raises(ValueError, match="unknown config variant 'sise'"):
        load_config('demo.py', 'sise=tiny')


def test_parse_arg_types():
    parsed = configlib.parse_arg('n=3,flag,lr=0.5,name=x,off=false', n=1, flag=False, lr=0.1,
                                 name='', off=True)
    assert (parsed.n, parsed.flag, parsed.lr, parsed.name, parsed.off) == (3, True, 0.5, 'x', False)
    with pytest.raises(ValueError, match='needs a value'):
        configlib.parse_arg('n', n=1)


def test_demo_world_knobs_follow_the_generator():
    config = configlib.default_config()
    assert 'seed' not in config.demo.world  # the world's seed is config.seed
    assert config.demo.world.image_size == 64


def test_unknown_override_is_refused_on_the_command_line(tmp_path):
    result = run_launch('ingest.py', '--config=configs/demo.py:size=tiny',
                        f'--workdir={tmp_path}', '--config.ingest.on_eror=skip')
    assert result.returncode != 0
    assert 'on_eror' in result.stderr


def test_missing_manifest_is_one_clear_line(tmp_path):
    result = run_launch('ingest.py', '--config=configs/vise_resnet50.py', f'--workdir={tmp_path}')
    assert result.returncode == 2
    assert 'error: config.posts.manifest is empty' in result.stderr
    assert 'Traceback' not in result.stderr
