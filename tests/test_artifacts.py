"""The stage contract: atomic files, skip when done, resume when partial, rebuild when stale."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from vise_jax import artifacts, workdir_lock
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


def test_a_stale_linked_stage_is_rebuilt_in_its_target_and_keeps_the_link(tmp_path):
    target, link = tmp_path / 'shared' / 'labels-1', tmp_path / 'run' / 'labels'
    target.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    old = artifacts.StageDir(link, 'demo', {'k': 1})
    old.prepare()
    old.finish({}, {})
    changed = artifacts.StageDir(link, 'demo', {'k': 2})
    changed.prepare()
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not (target / artifacts.STAGE_RECORD).exists()
    assert (target / artifacts.PARTIAL_RECORD).exists()


def test_stage_refuses_to_delete_a_directory_it_did_not_make(tmp_path):
    (tmp_path / 's').mkdir()
    (tmp_path / 's' / 'precious.txt').write_text('user data')
    with pytest.raises(InputError, match='holds no stage record'):
        artifacts.StageDir(tmp_path / 's', 'demo', {}).prepare()
    assert (tmp_path / 's' / 'precious.txt').exists()


# The workdir lock: one run at a time (vise_jax/workdir_lock.py, taken by stages.run).

HOLDER = ('import sys; from vise_jax import workdir_lock; '
          "workdir_lock.acquire(sys.argv[1], command='holder --workdir=W'); "
          "print('held', flush=True); sys.stdin.read()")


def start_holder(workdir):
    """A process holding the workdir's lock until it is killed or its stdin closes."""
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


def test_second_run_on_a_workdir_fails_at_once_naming_the_first(tmp_path, caplog):
    from conftest import load_config

    from vise_jax import stages

    workdir = tmp_path / 'w'
    holder = start_holder(workdir)
    try:
        start = time.monotonic()
        with pytest.raises(workdir_lock.WorkdirBusy,
                           match=rf'in use by another run: pid {holder.pid} on host '
                                 rf'{re.escape(socket.gethostname())} since .* ago\), '
                                 r'command: holder --workdir=W'):
            stages.run(load_config('demo.py', 'size=tiny'), workdir, ['demo_world'])
        assert time.monotonic() - start < 10
        assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is left, and does not block.
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())['pid'] == holder.pid
    with caplog.at_level(logging.WARNING), workdir_lock.hold(workdir) as lock:
        assert lock.info['pid'] == os.getpid()
    assert f'taking over the stale lock of pid {holder.pid}' in caplog.text
    assert not (workdir / workdir_lock.LOCK_FILE).exists()   # a clean release removes it


def test_released_lock_is_free_and_leftover_file_of_a_dead_process_does_not_block(tmp_path):
    with workdir_lock.hold(tmp_path) as lock:
        assert lock.held
        with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {os.getpid()}'):
            workdir_lock.acquire(tmp_path)   # a second open file, even in one process
    assert not lock.held
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True)
    info = {**workdir_lock.holder_info('old run'), 'pid': int(dead.stdout)}
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(info))
    workdir_lock.acquire(tmp_path).release()


def test_lock_file_from_another_host_is_never_taken_over(tmp_path):
    info = {**workdir_lock.holder_info('train on w7'), 'host': 'w7.cluster', 'pid': 4321}
    path = tmp_path / workdir_lock.LOCK_FILE
    path.write_text(json.dumps(info))
    with pytest.raises(workdir_lock.WorkdirBusy,
                       match=rf"pid 4321 on host w7.cluster .* another host's lock.*rm {path}"):
        workdir_lock.acquire(tmp_path)
    assert json.loads(path.read_text()) == info


def test_only_process_zero_locks_and_every_process_stops_when_it_cannot(tmp_path, monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    from vise_jax import stages

    shared = []
    monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all',
                        lambda value: shared.append(int(value)) or shared[0])
    holder = start_holder(tmp_path)
    try:
        # Process 0 cannot take the lock: it says why, after telling the others.
        monkeypatch.setattr(jax, 'process_index', lambda: 0)
        with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {holder.pid}'):
            stages.lock_workdir(tmp_path)
        assert shared == [0]
        # Process 1 never touches the lock file and stops on process 0's word.
        monkeypatch.setattr(jax, 'process_index', lambda: 1)
        with pytest.raises(workdir_lock.WorkdirBusy, match='locking it: process 0 failed'):
            stages.lock_workdir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    shared[:] = [1]
    assert stages.lock_workdir(tmp_path) is None   # process 1 of a run that got the lock
    monkeypatch.setattr(jax, 'process_index', lambda: 0)
    stages.lock_workdir(tmp_path).release()
