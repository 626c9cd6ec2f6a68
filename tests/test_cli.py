"""The launch scripts' command line (launch/cli.py): --help, one-line errors with exit status 2,
and a stage started without its inputs naming the first missing stage, creating nothing."""

import re

import pytest
from conftest import load_config, run_launch

from vise_jax import artifacts, configlib
from vise_jax.errors import InputError

TINY = '--config=configs/demo.py:size=tiny'


def test_help_lists_the_flags_and_every_config_section():
    result = run_launch('train.py', '--help')
    assert result.returncode == 0, result.stderr
    for flag in ('--config=', '--config.SECTION.KEY=VALUE', '--workdir=',
                 '--coordinator_address=', '--num_processes=', '--process_id=',
                 '--distributed_timeout_s='):
        assert flag in result.stdout
    assert result.stdout.startswith('Trains the multi-head ResNet')   # the script's docstring
    for section in configlib.default_config():
        assert re.search(rf'^  {section} +\w', result.stdout, re.MULTILINE), section


@pytest.mark.parametrize('args, message', [
    ([TINY, '--config.train.batch_sise=8'],
     "error: --config.train.batch_sise: the config has no key 'train.batch_sise'; did you mean "
     'config.input.global_batch_size, '),
    (['--config=configs/nope.py'], 'error: --config=configs/nope.py: no such config file: '),
    (['--config=configs/demo.py:size=huge'],
     "error: --config=configs/demo.py:size=huge: configs/demo.py: unknown size 'huge'; known: "
     "['default', 'tiny'] (ValueError at configs/demo.py:"),
], ids=['unknown_key', 'missing_file', 'config_raises'])
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    result = run_launch('train.py', *args, f'--workdir={tmp_path / "w"}')
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count('\n') == 1, result.stderr
    assert not (tmp_path / 'w').exists()


def test_a_stage_without_inputs_names_the_first_missing_stage_and_creates_nothing(tmp_path):
    workdir = tmp_path / 'w'
    result = run_launch('train.py', TINY, f'--workdir={workdir}')
    assert result.returncode == 2, result.stderr
    assert result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(f'error: train needs {workdir}/labels and {workdir}/posts, '
                                    'which need embeddings and world: none of them is finished; '
                                    'start with the demo_world stage: python '), result.stderr
    assert f'launch/generate_demo.py {TINY} --workdir={workdir} (' in result.stderr
    assert not workdir.exists()


def finish(path):
    path.mkdir(parents=True)
    artifacts.atomic_write_json(path / artifacts.STAGE_RECORD, {'fingerprint': 'x'})


def test_the_first_unfinished_stage_of_the_chain_is_named(tmp_path):
    from vise_jax import stages

    config = load_config('vise_resnet50.py')   # real posts: no demo world before ingest
    with pytest.raises(InputError, match=r'cluster needs \S+/embeddings and \S+/posts: neither is '
                                         r'finished; start with the ingest stage$'):
        stages.run(config, tmp_path / 'w', ['cluster'])
    assert not (tmp_path / 'w').exists()
    # Stages that run earlier in the same command count as ready.
    stages.check_inputs(config, tmp_path / 'w', ['ingest', 'embed', 'cluster', 'train'])

    finish(tmp_path / 'w' / 'posts')
    command = lambda stage: f'launch/{stage}.py'   # noqa: E731
    with pytest.raises(InputError, match=r'export needs \S+/w/train, which needs labels, which '
                                         r'needs embeddings: none of them is finished; start with '
                                         r'launch/embed.py$'):
        stages.run(config, tmp_path / 'w', ['export', 'linear_eval'], command=command)
    assert sorted(p.name for p in (tmp_path / 'w').iterdir()) == ['posts']
    # A stage that reads nothing of the workdir's is not held up.
    with config.unlocked():
        config.export.source = str(tmp_path / 'weights.safetensors')
    stages.check_inputs(config, tmp_path / 'w', ['export'])
