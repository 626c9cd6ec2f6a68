"""Checkpoints: exact resume after SIGKILL, kills during a save, damaged checkpoints, refusals and
where a run starts (its own checkpoint, config.train.resume, config.train.init, scratch).

The end-to-end tests train the tiny world in child processes (tests/run_training_process.py, two
fake CPU devices each) and compare every array of the final train state with an uninterrupted
run's, bit for bit. The others exercise vise_jax.train.checkpointing on a toy train state.
"""

import logging
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from jax.sharding import NamedSharding, PartitionSpec
from training_processes import assert_bitwise_equal, copy_world, leaves, read_state, run_one, steps

from vise_jax import export, models, sharding
from vise_jax.errors import InputError
from vise_jax.train import checkpointing, optim
from vise_jax.train import state as state_lib
from vise_jax.train.metrics import read_metrics

# 2 steps per epoch on the tiny world: 8 steps, checkpoints at 3, 6 and 8.
RUN = ['--set=train.epochs=4', '--set=train.checkpoint_every_steps=3',
       '--set=train.eval_every_steps=0']


@pytest.fixture(scope='module')
def straight(labelled_world, compile_cache, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    workdir = copy_world(labelled_world, tmp_path_factory.mktemp('straight') / 'run')
    run_one(workdir, RUN, cache_dir=compile_cache)
    assert steps(workdir / 'train' / 'checkpoints') == ['3', '6', '8']
    return workdir


def final_state(workdir, checkpoints=None):
    return read_state((checkpoints or workdir / 'train' / 'checkpoints') / '8')


def train_steps_logged(workdir):
    return [r['step'] for r in read_metrics(workdir / 'train' / 'metrics.jsonl')
            if r['split'] == 'train']


# --- crashes of a real run ----------------------------------------------------------------------


def test_sigkill_mid_run_then_the_same_command_ends_bitwise_equal(
        straight, labelled_world, compile_cache, tmp_path):
    workdir = copy_world(labelled_world, tmp_path / 'run')
    checkpoints = workdir / 'train' / 'checkpoints'
    command = [*RUN, '--kill_at_step=5', '--after_checkpoint=3']

    killed = run_one(workdir, command, cache_dir=compile_cache, expect=None)
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    assert steps(checkpoints) == ['3']

    resumed = run_one(workdir, command, cache_dir=compile_cache)
    assert "resuming at step 3 from the run's checkpoint" in resumed.stderr, resumed.describe()
    assert_bitwise_equal(final_state(workdir), final_state(straight))
    assert train_steps_logged(workdir) == list(range(1, 9))   # steps 4, 5 logged once


@pytest.mark.parametrize('crash_point', ['write', 'commit'])
def test_kill_during_a_save_keeps_the_previous_checkpoint(
        crash_point, straight, labelled_world, compile_cache, tmp_path):
    """'write': killed while the step's files are being written; 'commit': every file written,
    the step directory not yet renamed into place."""
    workdir = copy_world(labelled_world, tmp_path / 'run')
    checkpoints = workdir / 'train' / 'checkpoints'
    command = [*RUN, '--kill_during_save=6', f'--crash_point={crash_point}']

    killed = run_one(workdir, command, cache_dir=compile_cache, expect=None)
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    left = steps(checkpoints)
    assert '3' in left and '6' not in left
    assert any(name.startswith('6.orbax-checkpoint-tmp') for name in left), left

    resumed = run_one(workdir, command, cache_dir=compile_cache)
    assert "resuming at step 3 from the run's checkpoint" in resumed.stderr, resumed.describe()
    assert steps(checkpoints) == ['3', '6', '8']     # the unfinished save is gone
    assert_bitwise_equal(final_state(workdir), final_state(straight))


def test_damaged_newest_checkpoint_is_reported_moved_aside_and_the_previous_one_used(
        straight, compile_cache, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(straight, workdir)
    checkpoints = workdir / 'train' / 'checkpoints'
    truncated = truncate_files(checkpoints / '8' / 'state')
    assert truncated

    result = run_one(workdir, RUN, cache_dir=compile_cache)
    assert f"{checkpoints / '8'}: cannot read its 'state' item" in result.stderr, result.describe()
    assert "resuming at step 6 from the run's checkpoint" in result.stderr, result.describe()
    moved = list((checkpoints / checkpointing.CORRUPT_DIR).iterdir())
    assert [p.name.split('-')[0] for p in moved] == ['8']
    assert steps(checkpoints) == ['3', '6', '8', checkpointing.CORRUPT_DIR]
    assert_bitwise_equal(final_state(workdir), final_state(straight))


def test_resume_from_another_run_wins_over_init_and_continues_exactly(
        straight, labelled_world, compile_cache, tmp_path):
    """An empty run with config.train.resume (one step of another run) and config.train.init:
    resume wins, restores state, step, optimizer and data position, and the run ends where the
    other one did; config.train.checkpoint_dir takes the checkpoints."""
    workdir = copy_world(labelled_world, tmp_path / 'run')
    elsewhere = workdir / 'elsewhere'
    other = straight / 'train' / 'checkpoints'
    result = run_one(workdir, [*RUN, f'--set=train.resume={other / "6"}',
                               f'--set=train.init={other}',
                               '--set=train.checkpoint_dir={workdir}/elsewhere'],
                     cache_dir=compile_cache)
    assert f'resuming at step 6 from config.train.resume: {other / "6"}' in result.stderr, \
        result.describe()
    assert not (workdir / 'train' / 'checkpoints').exists()
    assert steps(elsewhere) == ['8']
    assert_bitwise_equal(final_state(workdir, elsewhere), final_state(straight))


def test_init_takes_the_backbone_of_a_real_checkpoint(straight):
    """config.train.init through vise_jax.export.load_backbone: the backbone's params and batch
    statistics are the checkpoint's, heads, optimizer state and step stay fresh."""
    config = load_config('demo.py', 'size=tiny')
    heads = {'comments_k4': 4, 'comments_k8': 8, 'reactions_k3': 3}
    model = models.create_model(config.model, heads)
    schedule = optim.make_schedule(config.optim, steps_per_epoch=2, global_batch_size=16,
                                   epochs=4)
    init = state_lib.init_fn(model, optim.make_optimizer(config.optim, schedule), 32)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = state_lib.state_shardings(abstract, sharding.make_mesh())
    fresh = jax.tree.map(lambda a, s: jax.device_put(np.full(a.shape, 7, a.dtype), s),
                         abstract, shardings)
    meta = {'model': 'resnet18', 'width': config.model.width}

    variables, source = export.load_backbone(straight / 'train' / 'checkpoints')
    started = checkpointing.init_backbone(variables, source, fresh, shardings, meta)
    saved = final_state(straight)
    for collection in ('params', 'batch_stats'):
        want = leaves(saved[collection]['backbone'])
        got = leaves(jax.device_get(getattr(started, collection)['backbone']))
        assert want.keys() == got.keys()
        assert all(np.array_equal(want[k], got[k]) for k in want)
    untouched = [started.params['heads'], started.opt_state, started.step]
    assert all(np.all(np.asarray(leaf) == 7) for leaf in jax.tree.leaves(untouched))

    with pytest.raises(InputError, match='holds a resnet18 of width 8, but config.model is '
                                         'resnet18 of width 16'):
        checkpointing.init_backbone(variables, source, fresh, shardings,
                                    {'model': 'resnet18', 'width': 16})


def truncate_files(directory):
    truncated = []
    for path in sorted(directory.rglob('*')):
        if path.is_file() and path.name != 'commit_success.txt' and path.stat().st_size > 1:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            truncated.append(path)
    return truncated


# --- the checkpointing functions on a toy train state -------------------------------------------

META = {'model': 'resnet18', 'width': 8, 'image_size': 32, 'heads': {'h': 2}, 'seed': 0,
        'config': {'train': {'epochs': 2}}}


@pytest.fixture(scope='module')
def replicated():
    return NamedSharding(sharding.make_mesh(), PartitionSpec())


def toy_state(value, replicated, extra_opt=False, noise=False):
    """A TrainState whose arrays hold `value`; `noise` adds a (64, 64) array of random numbers,
    large enough that Orbax stores it apart from its (checksummed) index."""
    def full(shape):
        return jnp.full(shape, value, jnp.float32)

    opt_state = ({'trace': {'w': full((4, 2))}},) + (
        ({'nu': jnp.zeros(3)},) if extra_opt else ()) + (
        ({'noise': jnp.asarray(np.random.default_rng(int(value)).normal(size=(64, 64)),
                               jnp.float32)},) if noise else ())
    state = state_lib.TrainState(
        step=jnp.asarray(int(value), jnp.int32),
        params={'backbone': {'conv1': {'kernel': full((3, 3, 3, 4))}},
                'heads': {'h': {'kernel': full((4, 2))}}},
        batch_stats={'backbone': {'bn1': {'mean': full((4,))}}},
        opt_state=opt_state)
    shardings = jax.tree.map(lambda _: replicated, state)
    return jax.device_put(state, shardings), shardings


def toy_iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def save_steps(directory, replicated, step_numbers, meta=META, noise=False):
    """Saves toy states of value = step, with the iterator advanced 10 items per step."""
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    iterator = toy_iterator()
    positions = {}
    for step in step_numbers:
        while iterator.get_state()['next_index'] < 10 * step:
            next(iterator)
        state, _ = toy_state(step, replicated, noise=noise)
        checkpointing.save(manager, step, state, iterator, meta, force=True)
        positions[step] = iterator.get_state()
    manager.wait_until_finished()
    manager.close()
    return positions


def value_of(state):
    return float(np.asarray(state.params['backbone']['conv1']['kernel']).ravel()[0])


def damage(step_dir, how):
    if how == 'truncated state files':
        assert truncate_files(step_dir / 'state')
    elif how == 'missing state metadata':
        (step_dir / 'state' / '_METADATA').unlink()
    elif how == 'unreadable meta':
        (step_dir / 'meta' / 'metadata').write_text('{"model": "res')
    elif how == 'missing data file':
        (step_dir / 'data' / 'process_0-of-1.json').unlink()
    elif how == 'emptied step directory':
        for child in step_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize('how', ['truncated state files', 'missing state metadata',
                                 'unreadable meta', 'missing data file',
                                 'emptied step directory'])
def test_unreadable_step_is_moved_aside_and_the_previous_one_restored(
        how, replicated, tmp_path, caplog):
    directory = tmp_path / 'checkpoints'
    positions = save_steps(directory, replicated, [1, 2, 3])
    damage(directory / '3', how)
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    iterator = toy_iterator()
    template, shardings = toy_state(0, replicated)
    with caplog.at_level(logging.WARNING, logger='vise_jax.train.checkpointing'):
        state, where = checkpointing.restore_latest(manager, template, shardings, iterator, META)
    assert where == str(directory / '2')
    assert value_of(state) == 2.0 and int(state.step) == 2
    assert iterator.get_state() == positions[2]
    assert f'{directory / "3"}: cannot read its' in caplog.text
    moved = list((directory / checkpointing.CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith('3-')
    assert f'moved it to {moved[0]}' in caplog.text
    # A later save of the same step works, and is what the next restore finds.
    checkpointing.save(manager, 3, toy_state(3, replicated)[0], iterator, META, force=True)
    manager.wait_until_finished()
    assert manager.latest_step() == 3
    manager.close()


def test_every_step_unreadable_means_scratch_with_the_iterator_untouched(replicated, tmp_path):
    directory = tmp_path / 'checkpoints'
    save_steps(directory, replicated, [1, 2])
    for step in ('1', '2'):
        damage(directory / step, 'missing state metadata')
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    iterator = toy_iterator()
    template, shardings = toy_state(0, replicated)
    assert checkpointing.restore_latest(manager, template, shardings, iterator, META) is None
    assert iterator.get_state() == {'next_index': 0}
    assert len(list((directory / checkpointing.CORRUPT_DIR).iterdir())) == 2
    manager.close()


ZSTD_FRAME = bytes.fromhex('28b52ffd')


def flip_a_byte_silently(step_dir):
    """Flips one byte of an array stored apart from Orbax's index (a bare zstd frame: no
    checksum) such that Orbax still reads it, wrongly and without an error (finite values,
    other numbers): the damage only a checksum finds. Returns the damaged file."""
    saved = leaves(read_state(step_dir))
    files = sorted(path for path in (step_dir / 'state').rglob('*')
                   if path.is_file() and path.read_bytes()[:4] == ZSTD_FRAME)
    assert files, 'no array stored apart from the index'
    for path in files:
        original = path.read_bytes()
        for offset in range(len(original) // 2, len(original)):
            damaged = bytearray(original)
            damaged[offset] ^= 0x10
            path.write_bytes(bytes(damaged))
            try:
                now = leaves(read_state(step_dir))
            except Exception:   # noqa: BLE001 (a flip Orbax notices: not the one wanted here)
                continue
            if (all(np.all(np.isfinite(a)) for a in now.values())
                    and any(not np.array_equal(now[k], saved[k]) for k in saved)):
                return path
        path.write_bytes(original)
    raise AssertionError(f'no byte of {files} can be flipped without Orbax noticing')


def test_a_silently_flipped_byte_is_caught_by_the_checksums(replicated, tmp_path, caplog):
    """A flip that Orbax reads without an error (array data stored apart from Orbax's index has
    no checksum of its own): the checksums saved in the meta item find it, and it is damage
    like a truncated file."""
    directory = tmp_path / 'checkpoints'
    positions = save_steps(directory, replicated, [1, 2, 3], noise=True)
    flip_a_byte_silently(directory / '3')
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    iterator = toy_iterator()
    template, shardings = toy_state(0, replicated, noise=True)
    with caplog.at_level(logging.WARNING, logger='vise_jax.train.checkpointing'):
        state, where = checkpointing.restore_latest(manager, template, shardings, iterator, META)
    manager.close()
    assert where == str(directory / '2') and value_of(state) == 2.0
    assert iterator.get_state() == positions[2]
    assert f"{directory / '3'}: cannot read its 'state' item: DamagedState: 1 of 6 arrays " \
           'differ from the checksums saved with them' in caplog.text
    moved = list((directory / checkpointing.CORRUPT_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith('3-')
    assert f'moved it to {moved[0]}' in caplog.text


def test_a_checkpoint_holding_nan_is_damage_too(replicated, tmp_path, caplog):
    """Saved with NaN (so its checksums match): refused all the same, the previous step used."""
    directory = tmp_path / 'checkpoints'
    positions = save_steps(directory, replicated, [1, 2])
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    iterator = toy_iterator()
    while iterator.get_state()['next_index'] < 30:
        next(iterator)
    state, _ = toy_state(3, replicated)
    momentum = state.opt_state[0]['trace']['w']
    state = state.replace(opt_state=({'trace': {'w': momentum.at[1, 0].set(jnp.nan)}},))
    checkpointing.save(manager, 3, state, iterator, META, force=True)
    manager.wait_until_finished()

    template, shardings = toy_state(0, replicated)
    iterator = toy_iterator()
    with caplog.at_level(logging.WARNING, logger='vise_jax.train.checkpointing'):
        state, where = checkpointing.restore_latest(manager, template, shardings, iterator, META)
    manager.close()
    assert where == str(directory / '2') and value_of(state) == 2.0
    assert iterator.get_state() == positions[2]
    assert "cannot read its 'state' item: DamagedState: non-finite values (NaN or inf) in " \
           'opt_state/0/trace/w' in caplog.text
    assert [p.name.split('-')[0] for p in (directory / checkpointing.CORRUPT_DIR).iterdir()] \
        == ['3']


def test_state_checksums_do_not_depend_on_the_layout():
    """The same digest for any sharding (on the devices) and for numpy arrays (on the host)."""
    mesh = sharding.make_mesh(2, 4)
    rng = np.random.default_rng(0)
    arrays = {'w': rng.normal(size=(8, 12)).astype(np.float32),
              'b': rng.normal(size=(16,)).astype(jnp.bfloat16),
              'step': np.int32(7)}
    on_host = checkpointing.numpy_checks(arrays)
    for spec in (PartitionSpec(), PartitionSpec('fsdp'), PartitionSpec('data')):
        placed = {name: jax.device_put(a, NamedSharding(mesh, spec if np.ndim(a) else
                                                        PartitionSpec()))
                  for name, a in arrays.items()}
        assert checkpointing.array_checks(placed) == on_host
    changed = dict(arrays, w=arrays['w'].copy())
    changed['w'].view(np.uint32)[3, 5] ^= 1      # the lowest bit of one number
    assert checkpointing.numpy_checks(changed)['w'] != on_host['w']
    assert checkpointing.find_damage(on_host, {'algorithm': checkpointing.DIGEST_ALGORITHM,
                                               'arrays': {'w': on_host['w'][0]}}) is None


@pytest.mark.parametrize('key, value', [('model', 'resnet34'), ('width', 16),
                                        ('heads', {'h': 3}), ('heads', {'g': 2}),
                                        ('image_size', 64), ('seed', 1)])
def test_checkpoint_made_for_another_config_is_refused_not_moved(key, value, replicated,
                                                                 tmp_path):
    directory = tmp_path / 'checkpoints'
    save_steps(directory, replicated, [1, 2])
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    template, shardings = toy_state(0, replicated)
    expected = {**META, key: value}
    with pytest.raises(InputError, match=f'{directory / "2"}: checkpoint was made for '
                                         f'{key}={META[key]!r}, but the config asks for'):
        checkpointing.restore_latest(manager, template, shardings, toy_iterator(), expected)
    assert steps(directory) == ['1', '2']
    manager.close()


def test_state_of_another_layout_is_refused_not_moved(replicated, tmp_path):
    directory = tmp_path / 'checkpoints'
    save_steps(directory, replicated, [1])
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    template, shardings = toy_state(0, replicated, extra_opt=True)
    with pytest.raises(InputError, match='does not have the layout the config builds'):
        checkpointing.restore_latest(manager, template, shardings, toy_iterator(), META)
    assert steps(directory) == ['1']
    manager.close()


def test_unfinished_save_is_ignored_and_cleaned_up(replicated, tmp_path):
    directory = tmp_path / 'checkpoints'
    save_steps(directory, replicated, [1])
    unfinished = directory / '2.orbax-checkpoint-tmp'
    (unfinished / 'state').mkdir(parents=True)
    (unfinished / 'state' / 'manifest.ocdbt').write_bytes(b'half')
    manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
    template, shardings = toy_state(0, replicated)
    state, where = checkpointing.restore_latest(manager, template, shardings, toy_iterator(),
                                                META)
    assert where == str(directory / '1') and value_of(state) == 1.0
    checkpointing.save(manager, 2, toy_state(2, replicated)[0], toy_iterator(), META, force=True)
    manager.wait_until_finished()
    manager.close()
    assert steps(directory) == ['1', '2']


@pytest.fixture
def fake_backbone(monkeypatch):
    """vise_jax.export.load_backbone returning a toy backbone of value 9."""
    calls = []

    def load_backbone(path):
        calls.append(str(path))
        arch = 'resnet50' if 'resnet50' in str(path) else 'resnet18'
        return ({'params': {'conv1': {'kernel': np.full((3, 3, 3, 4), 9.0, np.float32)}},
                 'batch_stats': {'bn1': {'mean': np.full((4,), 9.0, np.float32)}}},
                {'architecture': arch, 'width': 8})

    monkeypatch.setattr(export, 'load_backbone', load_backbone)
    return calls


def init_from(path):
    """config.train.init as the train stage passes it."""
    return checkpointing.Init(path, lambda: export.load_backbone(path))


def test_start_order_own_checkpoint_then_resume_then_init_then_scratch(
        replicated, tmp_path, fake_backbone):
    own = tmp_path / 'own' / 'checkpoints'
    save_steps(own, replicated, [2])
    other_run = tmp_path / 'other' / 'train'
    other_positions = save_steps(other_run / 'checkpoints', replicated, [4, 5])
    template, shardings = toy_state(0, replicated)

    def start(directory, **sources):
        manager = checkpointing.make_manager(directory, every_steps=1, keep=10)
        iterator = toy_iterator()
        try:
            started = checkpointing.starting_state(manager, template, shardings, iterator, META,
                                                   **sources)
        finally:
            manager.close()
        return started, iterator.get_state()

    both = {'resume': str(other_run), 'init': init_from('weights.safetensors')}
    started, _ = start(own, **both)
    assert (started.source, value_of(started.state)) == ('checkpoint', 2.0)
    assert 'resuming at step 2' in started.describe()

    # Resume accepts a run directory, its checkpoint directory (latest step) or one step.
    for resume, step in [(other_run, 5), (other_run / 'checkpoints', 5),
                         (other_run / 'checkpoints' / '4', 4)]:
        started, position = start(tmp_path / f'empty-{step}-{len(str(resume))}',
                                  resume=str(resume), init=init_from('weights.safetensors'))
        assert (started.source, value_of(started.state), int(started.state.step)) == (
            'resume', float(step), step)
        assert position == other_positions[step]
        assert started.where == str(other_run / 'checkpoints' / str(step))
    assert fake_backbone == []   # init was never needed

    started, position = start(tmp_path / 'empty-init', init=init_from('weights.safetensors'))
    assert started.source == 'init' and fake_backbone == ['weights.safetensors']
    assert value_of(started.state) == 9.0
    assert float(started.state.batch_stats['backbone']['bn1']['mean'][0]) == 9.0
    assert float(started.state.params['heads']['h']['kernel'][0, 0]) == 0.0
    assert int(started.state.step) == 0 and position == {'next_index': 0}

    started, _ = start(tmp_path / 'empty-scratch')
    assert started.source == 'scratch' and started.state is template


def test_resume_and_init_that_do_not_fit_are_refused(replicated, tmp_path, fake_backbone):
    other = tmp_path / 'other' / 'checkpoints'
    save_steps(other, replicated, [1], meta={**META, 'heads': {'h': 5}})
    template, shardings = toy_state(0, replicated)
    manager = checkpointing.make_manager(tmp_path / 'own', every_steps=1, keep=10)
    try:
        with pytest.raises(InputError, match='checkpoint was made for heads='):
            checkpointing.starting_state(manager, template, shardings, toy_iterator(), META,
                                         resume=str(other))
        with pytest.raises(InputError, match='config.train.resume=.*no such checkpoint'):
            checkpointing.starting_state(manager, template, shardings, toy_iterator(), META,
                                         resume=str(tmp_path / 'missing'))
        with pytest.raises(InputError, match='holds a resnet50 of width 8, but config.model is '
                                             'resnet18 of width 8'):
            checkpointing.starting_state(manager, template, shardings, toy_iterator(), META,
                                         init=init_from('resnet50.pth'))
    finally:
        manager.close()


def test_bucket_paths_are_left_alone_and_local_ones_made_absolute(tmp_path, monkeypatch):
    assert str(checkpointing.checkpoint_path('gs://bucket/run/checkpoints')) == \
        'gs://bucket/run/checkpoints'
    monkeypatch.chdir(tmp_path)
    assert str(checkpointing.checkpoint_path('run/checkpoints')) == \
        str(tmp_path / 'run' / 'checkpoints')
