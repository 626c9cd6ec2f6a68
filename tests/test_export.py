"""Exports and PyTorch interop: plain-Orbax restore, exact layout round trips, torchvision parity,
atomic writes, clear errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, load_config
from test_models import REFERENCE_SCRIPT, TORCHVISION, assert_close, random_variables

from vise_jax import artifacts, configlib, export, stages
from vise_jax.errors import InputError
from vise_jax.interop import files as weight_files
from vise_jax.interop import torchvision as tv
from vise_jax.models import create_resnet

HEADS = {'comments_k4': 4, 'reactions_k3': 3}
WIDTH = 4
IMAGE_SIZE = 32
HAS_TORCH = weight_files.torch_available()

# Saves two steps (5 and 7) of a tiny MultiHeadResNet's TrainState with the training code's own
# checkpointing, on 2 devices with the arrays split over 'fsdp': the test process has 8, so the
# export must read a checkpoint of another topology, as when a pod's run is exported on a
# laptop. Also writes the expected backbone arrays (expected.npz) and the run config.
MAKE_CHECKPOINT = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import grain, jax, jax.numpy as jnp, numpy as np, optax
    from vise_jax import models, sharding
    from vise_jax.train import checkpointing, state as state_lib

    out, heads = sys.argv[1], json.loads(sys.argv[2])
    width, size = int(sys.argv[3]), int(sys.argv[4])
    model = models.MultiHeadResNet('resnet18', heads, width=width)
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    mesh = sharding.make_mesh(1, 2)
    config = {'model': {'name': 'resnet18', 'width': width}, 'input': {'image_size': size}}
    expected = {}
    with checkpointing.make_manager(out, every_steps=1, keep=5, async_save=False) as manager:
        for step in (5, 7):
            rng = np.random.default_rng(step)
            variables = jax.tree.map(
                lambda s: rng.normal(1.0, 0.5, s.shape).astype(s.dtype), shapes)
            optimizer = optax.sgd(0.1, momentum=0.9)
            state = state_lib.TrainState(step=np.int32(step), params=variables['params'],
                                         batch_stats=variables['batch_stats'],
                                         opt_state=optimizer.init(variables['params']))
            shardings = state_lib.state_shardings(jax.eval_shape(lambda: state), mesh, min_size=1)
            state = jax.tree.map(jax.device_put, state, shardings)
            iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
            next(iterator)
            meta = {'model': 'resnet18', 'image_size': size, 'heads': heads, 'config': config}
            checkpointing.save(manager, step, state, iterator, meta, force=True)
            for collection in ('params', 'batch_stats'):
                for path, leaf in jax.tree_util.tree_flatten_with_path(
                        variables[collection])[0]:
                    expected[f'{step}/{collection}' + jax.tree_util.keystr(path)] = leaf
        manager.wait_until_finished()
    np.savez(os.path.join(os.path.dirname(out), 'expected.npz'), **expected)
    with open(os.path.join(os.path.dirname(out), 'config.json'), 'w') as f:
        json.dump(config, f)
''')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A run directory with checkpoints/ (steps 5 and 7), expected.npz and config.json."""
    root = tmp_path_factory.mktemp('run') / 'train'
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    result = subprocess.run(
        [sys.executable, '-c', MAKE_CHECKPOINT, str(root / 'checkpoints'), json.dumps(HEADS),
         str(WIDTH), str(IMAGE_SIZE)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def expected_backbone(run_dir: Path, step: int) -> dict:
    """The backbone arrays of `step` the checkpoint was made from, as {'params', 'batch_stats'}."""
    arrays = np.load(run_dir / 'expected.npz')
    out = {}
    for collection in ('params', 'batch_stats'):
        prefix = f"{step}/{collection}['backbone']"
        tree = {}
        for key in arrays.files:
            if key.startswith(prefix):
                path = [part.strip("'") for part in key[len(prefix):].strip('[]').split('][')]
                node = tree
                for name in path[:-1]:
                    node = node.setdefault(name, {})
                node[path[-1]] = arrays[key]
        out[collection] = tree
    return out


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert np.asarray(a).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def tiny_variables(name: str, seed: int = 3) -> dict:
    return random_variables(create_resnet(name, width=WIDTH), jnp.zeros((1, 32, 32, 3)),
                            seed=seed)


def reference_state_dict(name: str) -> dict:
    """The parity fixture's full-width torchvision weights (fc included), made with numpy."""
    return REFERENCE_SCRIPT.reference_state_dict(TORCHVISION['state_dict_shapes'][name])


def reference_images(name: str) -> jax.Array:
    images = REFERENCE_SCRIPT.reference_images(**REFERENCE_SCRIPT.INPUTS[name])
    return jnp.asarray(images.transpose(0, 2, 3, 1))   # NCHW -> NHWC


# ------------------------------------------------------------------ from training checkpoints


def test_checkpoint_export_restores_with_plain_orbax_and_equals_the_backbone(run_dir, tmp_path):
    out = tmp_path / 'export'
    meta = export.export_checkpoint(run_dir / 'checkpoints', out)

    # Plain Orbax, no vise_jax and no target: exactly the checkpoint's latest backbone.
    restored = ocp.StandardCheckpointer().restore((out / 'variables').absolute())
    assert sorted(restored) == ['batch_stats', 'params']
    assert_trees_equal(restored, expected_backbone(run_dir, 7))
    assert 'heads' not in restored['params']

    assert meta == json.loads((out / 'export.json').read_text())
    assert meta['format'] == 'vise_jax.export' and meta['version'] == 1
    assert (meta['architecture'], meta['width'], meta['feature_dim']) == ('resnet18', WIDTH,
                                                                         8 * WIDTH)
    assert meta['image_size'] == IMAGE_SIZE and meta['heads'] == HEADS and meta['step'] == 7
    assert meta['mean'] == [0.485, 0.456, 0.406] and meta['std'] == [0.229, 0.224, 0.225]
    config = json.loads((run_dir / 'config.json').read_text())
    assert meta['source'] == {'kind': 'checkpoint', 'path': str(run_dir / 'checkpoints'),
                              'config_hash': artifacts.fingerprint(config)}
    loaded = export.load_export(out)
    assert loaded.meta == meta
    features = jax.jit(loaded.model().apply)(loaded.variables, jnp.zeros((1, 32, 32, 3)))
    assert features.shape == (1, meta['feature_dim'])


def test_an_earlier_step_and_run_or_step_directories_export_too(run_dir, tmp_path):
    meta = export.export_checkpoint(run_dir, tmp_path / 'a', step=5)   # the run directory
    assert meta['step'] == 5
    assert_trees_equal(export.load_export(tmp_path / 'a').variables,
                       expected_backbone(run_dir, 5))
    meta = export.export_checkpoint(run_dir / 'checkpoints' / '5', tmp_path / 'b')  # one step
    assert meta['step'] == 5
    with pytest.raises(InputError, match=r'no checkpoint of step 6; it has steps \[5, 7\]'):
        export.export_checkpoint(run_dir / 'checkpoints', tmp_path / 'c', step=6)
    assert not (tmp_path / 'c').exists()


# ------------------------------------------------------------------ torchvision layout


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_torchvision_layout_round_trip_is_exact(name, tmp_path):
    variables = tiny_variables(name)
    meta = export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random')
    export.write_export(tmp_path / 'export', variables, meta)
    written = export.write_torchvision(tmp_path / 'export', tmp_path / 'tv')
    assert written[0] == tmp_path / 'tv.safetensors'

    state_dict = weight_files.read_state_dict(tmp_path / 'tv.safetensors')
    shapes = tv.torchvision_shapes(name, WIDTH)
    # torchvision's keys and shapes, no fc (safetensors stores keys sorted; .pth keeps order)
    assert {k: v.shape for k, v in state_dict.items()} == shapes
    assert tv.infer_architecture(state_dict) == (name, WIDTH)
    assert_trees_equal(tv.torchvision_to_flax(state_dict, name, width=WIDTH),
                       export.numpy_variables(variables))

    # The published VisE trunk layout (nn.Sequential keys), read back through load_backbone.
    vise = tv.to_vise_sequential(state_dict)
    assert {'0.weight', '1.running_var', '4.0.conv1.weight', '7.1.bn1.bias'} <= set(vise)
    weight_files.write_safetensors(vise, tmp_path / 'vise.safetensors')
    imported, imported_meta = export.load_backbone(tmp_path / 'vise.safetensors')
    assert_trees_equal(imported, export.numpy_variables(variables))
    assert imported_meta['source']['kind'] == 'vise_sequential'
    assert (imported_meta['architecture'], imported_meta['width']) == (name, WIDTH)


@pytest.mark.parametrize('depth', sorted(tv.RESNET_DEPTHS))
def test_architecture_is_inferred_from_keys_and_shapes(depth):
    shapes = tv.torchvision_shapes(depth, 8)
    state_dict = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    assert tv.infer_architecture(state_dict) == (f'resnet{depth}', 8)
    vise = {f'module.{k}': v for k, v in tv.to_vise_sequential(state_dict).items()}
    assert tv.infer_architecture(vise) == (f'resnet{depth}', 8)
    assert tv.state_dict_layout(vise) == 'vise_sequential'


def test_unknown_state_dicts_are_refused_naming_what_is_wrong():
    with pytest.raises(InputError, match='no conv1.weight'):
        tv.infer_architecture({'encoder.weight': np.zeros(3)})
    shapes = tv.torchvision_shapes('resnet18', 8)
    state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()
                  if not k.startswith('layer4.1.')}
    with pytest.raises(InputError, match=r'\[2, 2, 2, 1\] basic blocks'):
        tv.infer_architecture(state_dict)


@pytest.mark.parametrize('name, layout', [('resnet18', 'torchvision'),
                                          ('resnet50', 'vise_sequential')])
def test_export_imported_from_torchvision_weights_matches_torchvision(name, layout, tmp_path):
    state_dict = reference_state_dict(name)
    if layout == 'vise_sequential':     # as published: no fc, nn.Sequential keys
        state_dict = tv.to_vise_sequential(state_dict)
    weight_files.write_safetensors(state_dict, tmp_path / f'{name}.safetensors')
    meta = export.export_weights_file(tmp_path / f'{name}.safetensors', tmp_path / 'export')
    assert meta['source']['kind'] == layout
    assert (meta['architecture'], meta['width'], meta['image_size']) == (name, 64, 224)
    assert meta['feature_dim'] == tv.BACKBONES[name].feature_dim
    assert meta['step'] is None and meta['heads'] == {}

    loaded = export.load_export(tmp_path / 'export')
    features = jax.jit(loaded.model().apply)(loaded.variables, reference_images(name))
    reference = dict(np.load(Path(__file__).parent / 'fixtures' / 'resnet_reference.npz'))
    assert_close(features, reference[f'{name}/eval_features'], f'{name} export features')


# ------------------------------------------------------------------ atomicity and overwrites


def test_a_failure_mid_write_leaves_no_export(tmp_path, monkeypatch):
    variables = tiny_variables('resnet18')
    meta = export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random')

    def fail(directory, meta):
        assert (directory / 'variables').is_dir()    # the weights were already written
        raise RuntimeError('disk full')

    monkeypatch.setattr(export.format, 'write_meta_file', fail)
    with pytest.raises(RuntimeError, match='disk full'):
        export.write_export(tmp_path / 'export', variables, meta)
    assert list(tmp_path.iterdir()) == []            # neither the export nor its temporary
    with pytest.raises(InputError, match=f'{tmp_path / "export"}: no such export directory'):
        export.load_export(tmp_path / 'export')

    # Replacing an existing export: the old one stays whole when the new write fails.
    monkeypatch.undo()
    export.write_export(tmp_path / 'export', variables, meta)
    monkeypatch.setattr(export.format, 'write_meta_file', fail)
    other = tiny_variables('resnet18', seed=4)
    with pytest.raises(RuntimeError, match='disk full'):
        export.write_export(tmp_path / 'export', other, meta, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ['export']
    assert_trees_equal(export.load_export(tmp_path / 'export').variables,
                       export.numpy_variables(variables))


def test_existing_exports_are_kept_refused_or_replaced(tmp_path):
    variables = tiny_variables('resnet18')
    meta = export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random')
    out = export.write_export(tmp_path / 'export', variables, meta)
    first = export.read_export_meta(out)
    export.write_export(out, variables, meta)            # the same export: left as it is
    assert export.read_export_meta(out) == first
    export.write_export(out, variables, meta, torchvision=True)   # ... or completed
    completed = export.read_export_meta(out)
    assert completed['created'] == first['created'] and 'torchvision.safetensors' in completed[
        'torchvision']
    umask = os.umask(0)
    os.umask(umask)                  # files get the umask's mode, not mkstemp's private 0600
    assert (out / 'torchvision.safetensors').stat().st_mode & 0o777 == 0o666 & ~umask

    other = tiny_variables('resnet18', seed=4)
    with pytest.raises(InputError, match='already holds a different export'):
        export.write_export(out, other, meta)
    export.write_export(out, other, meta, overwrite=True)
    assert_trees_equal(export.load_export(out).variables, export.numpy_variables(other))
    assert export.read_export_meta(out)['variables_sha256'] != first['variables_sha256']
    assert [p.name for p in tmp_path.iterdir()] == ['export']   # no old copy left behind

    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    with pytest.raises(InputError, match='is not a vise_jax export.*left alone'):
        export.write_export(mine, variables, meta, overwrite=True)
    assert (mine / 'notes.txt').read_text() == 'keep me'


def test_bad_paths_give_clear_errors(run_dir, tmp_path):
    missing = tmp_path / 'missing'
    with pytest.raises(InputError, match=f'{missing}: no such export directory'):
        export.load_export(missing)
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(InputError, match='is a file, not an export directory'):
        export.load_export(tmp_path / 'file.txt')
    with pytest.raises(InputError, match='not a vise_jax export: it has no export.json.*'
                                         'training checkpoint directory'):
        export.load_export(run_dir / 'checkpoints')
    with pytest.raises(InputError, match=f'{missing}: no such checkpoint directory'):
        export.export_checkpoint(missing, tmp_path / 'out')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(InputError, match='no finished checkpoint'):
        export.export_checkpoint(tmp_path / 'empty', tmp_path / 'out')
    with pytest.raises(InputError, match=f'{missing / "w.safetensors"}: no such weights file'):
        export.load_backbone(missing / 'w.safetensors')
    (tmp_path / 'broken.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(InputError, match='broken.safetensors: not a readable safetensors'):
        export.load_backbone(tmp_path / 'broken.safetensors')
    with pytest.raises(InputError, match='not an export directory, a training checkpoint'):
        export.load_backbone(tmp_path / 'empty')
    with pytest.raises(InputError, match='no checkpoints to export; run the train stage'):
        stages.export_stage(load_config('demo.py', 'size=tiny'), tmp_path / 'work')

    variables = tiny_variables('resnet18')
    meta = export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random')
    out = export.write_export(tmp_path / 'export', variables, meta)
    written = json.loads((out / 'export.json').read_text())
    (out / 'export.json').write_text(json.dumps({**written, 'version': 2}))
    with pytest.raises(InputError, match='version 2.*upgrade vise_jax'):
        export.load_export(out)
    (out / 'export.json').write_text(json.dumps({**written, 'format': 'other'}))
    with pytest.raises(InputError, match="format is 'other'"):
        export.load_export(out)
    (out / 'export.json').write_text(json.dumps(written))
    shutil.rmtree(out / 'variables')
    with pytest.raises(InputError, match='no variables/ directory'):
        export.load_export(out)


# ------------------------------------------------------------------ .pth (torch where installed)


@pytest.mark.skipif(not HAS_TORCH, reason='torch is not installed (CI); '
                    'test_pth_without_torch_asks_to_install_it covers that case')
def test_pth_loads_into_torchvision_and_back(tmp_path):
    import torch
    import torchvision

    state_dict = reference_state_dict('resnet18')
    weight_files.write_safetensors(state_dict, tmp_path / 'r18.safetensors')
    export.export_weights_file(tmp_path / 'r18.safetensors', tmp_path / 'export',
                               torchvision=True)
    assert sorted(p.name for p in (tmp_path / 'export').glob('torchvision.*')) == [
        'torchvision.pth', 'torchvision.safetensors']
    model = torchvision.models.resnet18(weights=None)
    result = model.load_state_dict(torch.load(tmp_path / 'export' / 'torchvision.pth',
                                              weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight']
    assert result.unexpected_keys == []
    model.fc = torch.nn.Identity()
    images = REFERENCE_SCRIPT.reference_images(**REFERENCE_SCRIPT.INPUTS['resnet18'])
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(images)).numpy()
    loaded = export.load_export(tmp_path / 'export')
    ours = jax.jit(loaded.model().apply)(loaded.variables, reference_images('resnet18'))
    assert_close(ours, theirs, 'features of the .pth in torchvision')

    # A VisE-style .pth (nn.Sequential trunk state_dict) imports as the same weights.
    trunk = torch.nn.Sequential(*list(model.children())[:-2])
    torch.save(trunk.state_dict(), tmp_path / 'vise.pth')
    variables, meta = export.load_backbone(tmp_path / 'vise.pth')
    assert meta['source']['kind'] == 'vise_sequential'
    assert_trees_equal(variables, loaded.variables)


def test_pth_without_torch_asks_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(weight_files, 'torch_available', lambda: False)
    (tmp_path / 'vise_r50.pth').write_bytes(b'\x80\x02}q\x00.')
    with pytest.raises(InputError, match=r"vise_r50.pth: reading a .pth file needs PyTorch.*"
                                         r"pip install -e '\.\[torch\]'"):
        export.load_backbone(tmp_path / 'vise_r50.pth')
    variables = tiny_variables('resnet18')
    meta = export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random')
    out = export.write_export(tmp_path / 'export', variables, meta, torchvision=True)
    assert export.read_export_meta(out)['torchvision'] == ['torchvision.safetensors']
    assert not (out / 'torchvision.pth').exists()


# ------------------------------------------------------------------ random baseline, the stage


def test_random_export_is_a_fresh_seeded_backbone(tmp_path):
    meta = export.random_export('resnet18', WIDTH, IMAGE_SIZE, 0, tmp_path / 'a')
    assert meta['source']['kind'] == 'random' and meta['seed'] == 0 and meta['step'] is None
    assert meta['heads'] == {} and meta['image_size'] == IMAGE_SIZE
    again = export.random_export('resnet18', WIDTH, IMAGE_SIZE, 0, tmp_path / 'b')
    other = export.random_export('resnet18', WIDTH, IMAGE_SIZE, 1, tmp_path / 'c')
    assert again['variables_sha256'] == meta['variables_sha256'] != other['variables_sha256']
    # The pipeline's variant keeps an identical export and replaces a stale one.
    assert export.random_export('resnet18', WIDTH, IMAGE_SIZE, 0, tmp_path / 'a',
                                overwrite=True) == meta
    assert export.random_export('resnet18', WIDTH, IMAGE_SIZE, 1, tmp_path / 'a',
                                overwrite=True)['variables_sha256'] == other['variables_sha256']
    variables = export.load_export(tmp_path / 'b').variables
    # torchvision's initialisation: no block starts as the identity; He (fan_out) kernels.
    assert np.all(variables['params']['layer1_0']['bn2']['scale'] == 1.0)
    kernel = variables['params']['layer4_1']['conv2']['kernel']     # (3, 3, 32, 32)
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 32)), rtol=0.05)


def test_writing_an_export_leaves_orbaxs_operation_counter_alone(tmp_path):
    """Process 0 writes exports alone. A Checkpointer save there advanced Orbax's process-wide
    operation counter on process 0 only, and the next training save of a 2-process run then
    had process 1 write into a step directory process 0 had not created yet (seen in CI)."""
    from orbax.checkpoint._src.futures.synchronization import OperationIdGenerator

    variables = tiny_variables('resnet18')
    before = OperationIdGenerator.get_current_operation_id()
    export.write_export(tmp_path / 'e', variables,
                        export.export_meta(variables, image_size=IMAGE_SIZE, source_kind='random'))
    assert OperationIdGenerator.get_current_operation_id() == before
    # Still a plain StandardCheckpointer checkpoint.
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore((tmp_path / 'e' / export.VARIABLES_DIR).absolute())
    assert_trees_equal(restored, export.numpy_variables(variables))


def export_stage(config, workdir):
    return stages.export_stage(configlib.with_workdir(config, workdir), workdir)


def test_export_stage_uses_the_runs_checkpoints_and_reruns_cleanly(run_dir, tmp_path):
    workdir = tmp_path / 'work'
    shutil.copytree(run_dir / 'checkpoints', workdir / 'train' / 'checkpoints')
    artifacts.StageDir(workdir / 'train', 'train', None).finish({}, {})   # a finished run
    config = load_config('demo.py', 'size=tiny')
    meta = export_stage(config, workdir)
    out = workdir / 'export' / 'vise'
    assert meta['step'] == 7 and meta['source']['path'] == str(workdir / 'train' / 'checkpoints')
    assert meta['torchvision'] == (['torchvision.pth', 'torchvision.safetensors'] if HAS_TORCH
                                   else ['torchvision.safetensors'])
    assert export_stage(config, workdir) == meta        # unchanged on a rerun

    config.export.step = 5                                          # a stale export is replaced
    assert export_stage(config, workdir)['step'] == 5
    assert export.export_checkpoint(workdir / 'train', tmp_path / 'once', step=5)['step'] == 5
    assert_trees_equal(export.load_export(out).variables, expected_backbone(run_dir, 5))

    weights = tmp_path / 'w.safetensors'
    export.write_torchvision(out, tmp_path / 'w')
    config.export.step = -1
    config.export.source = str(weights)
    config.export.out = '{workdir}/export/imported'
    config.export.torch = False
    meta = export_stage(config, workdir)
    assert meta['source'] == {'kind': 'torchvision', 'path': str(weights), 'config_hash': None}
    assert meta['image_size'] == config.input.image_size and meta['torchvision'] == []
    assert_trees_equal(export.load_export(workdir / 'export' / 'imported').variables,
                       expected_backbone(run_dir, 5))
