"""The stage contract: atomic files, skip when done, resume when partial, rebuild when stale."""

import pytest

from vise_jax import artifacts
from vise_jax.errors import InputError


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'out.txt'
    artifacts.atomic_write_text(path, 'old')
    with pytest.raises(RuntimeError), artifacts.atomic_path(path) as tmp:
        tmp.write_text('half of the new')
        raise RuntimeError('killed mid-write')
    assert path.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['out.txt']  # no temporary left behind


def test_fingerprint_ignores_key_order_and_sees_values():
    assert artifacts.fingerprint({'a': 1, 'b': [2]}) == artifacts.fingerprint({'b': [2], 'a': 1})
    assert artifacts.fingerprint({'a': 1}) != artifacts.fingerprint({'a': 2})


def test_stage_lifecycle(tmp_path):
    stage = artifacts.StageDir(tmp_path / 's', 'demo', {'k': 1})
    assert not stage.is_complete()
    stage.prepare()
    (stage.path / 'chunk-0').write_text('kept')
    # Interrupted: a new run with the same fingerprint resumes and keeps the chunk.
    again = artifacts.StageDir(tmp_path / 's', 'demo', {'k': 1})
    again.prepare()
    assert (again.path / 'chunk-0').read_text() == 'kept'
    record = again.finish({'k': 1}, {'rows': 3})
    assert again.is_complete() and record['summary'] == {'rows': 3}
    assert not (again.path / artifacts.PARTIAL_RECORD).exists()
    # Another config: the old output is stale and removed before rebuilding.
    changed = artifacts.StageDir(tmp_path / 's', 'demo', {'k': 2})
    assert not changed.is_complete()
    changed.prepare()
    assert not (changed.path / 'chunk-0').exists()


def test_stage_refuses_to_delete_a_directory_it_did_not_make(tmp_path):
    (tmp_path / 's').mkdir()
    (tmp_path / 's' / 'precious.txt').write_text('user data')
    with pytest.raises(InputError, match='holds no stage record'):
        artifacts.StageDir(tmp_path / 's', 'demo', {}).prepare()
    assert (tmp_path / 's' / 'precious.txt').exists()
