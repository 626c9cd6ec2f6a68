"""Training runs in child processes (tests/run_training_process.py) and reading their checkpoints.

Children get their own fake CPU device count and share a persistent compilation cache, so only
the first run of a device layout compiles. Every child is killed if the test fails or times out,
and a failing child's stderr is part of the assertion message.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / 'tests' / 'run_training_process.py'
# A run's whole deadline: a tiny run takes under a minute alone, several on a loaded 2-core
# machine (compiles included); a sibling's failure ends the wait sooner (_wait).
TIMEOUT_S = 900


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f'exit status {self.returncode}\n--- stdout (end) ---\n{self.stdout[-2000:]}'
                f'\n--- stderr (end) ---\n{self.stderr[-6000:]}')


def child_env(devices: int, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
        'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5',
        'PYTHONUNBUFFERED': '1',
        'TQDM_DISABLE': '1',
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_processes(workdir: Path, args: list[str], *, devices: int, cache_dir: Path,
                  num_processes: int = 1, timeout: float = TIMEOUT_S,
                  script: Path = DRIVER) -> list[Result]:
    """Runs `script` (the training driver, or a launch script: they take the same
    --workdir and process flags) in `num_processes` processes (one jax.distributed job when
    more than one) and waits for all; returns their results in process order."""
    logs = workdir.parent / f'{workdir.name}-logs-{time.monotonic_ns()}'
    logs.mkdir()
    commands = []
    port = free_port() if num_processes > 1 else None
    for index in range(num_processes):
        command = [sys.executable, str(script), f'--workdir={workdir}', *args]
        if port is not None:
            command += [f'--coordinator_address=127.0.0.1:{port}',
                        f'--num_processes={num_processes}', f'--process_id={index}']
        commands.append(command)
    children, files = [], []
    try:
        for index, command in enumerate(commands):
            out = open(logs / f'{index}.out', 'w+', encoding='utf-8')  # noqa: SIM115
            err = open(logs / f'{index}.err', 'w+', encoding='utf-8')  # noqa: SIM115
            files += [out, err]
            children.append(subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err,
                                              env=child_env(devices, cache_dir)))
        timed_out = not _wait(children, timeout)
    finally:
        for child in children:  # a failed or timed-out test leaves no process behind
            if child.poll() is None:
                child.kill()
                child.wait()
        for f in files:
            f.close()
    results = [Result(child.returncode, (logs / f'{i}.out').read_text(encoding='utf-8'),
                      (logs / f'{i}.err').read_text(encoding='utf-8'))
               for i, child in enumerate(children)]
    assert not timed_out, (f'training processes killed: still running after {timeout} s, or '
                           'after a sibling failed:\n' + '\n'.join(
                               f'=== process {i}: {r.describe()}'
                               for i, r in enumerate(results)))
    return results


def _wait(children: list[subprocess.Popen], timeout: float, grace: float = 30.0) -> bool:
    """Waits for every child; False when the time ran out. Once one has failed, the others
    (likely stuck waiting for it in a collective) get `grace` seconds more."""
    deadline = time.monotonic() + timeout
    while any(child.poll() is None for child in children):
        if time.monotonic() > deadline:
            return False
        if any(child.returncode not in (None, 0, 3) for child in children):
            deadline = min(deadline, time.monotonic() + grace)
        time.sleep(0.2)
    return True


def run_one(workdir: Path, args: list[str], *, cache_dir: Path, devices: int = 2,
            expect: int | None = 0) -> Result:
    (result,) = run_processes(workdir, args, devices=devices, cache_dir=cache_dir)
    if expect is not None:
        assert result.returncode == expect, result.describe()
    return result


def copy_world(world: Path, target: Path) -> Path:
    shutil.copytree(world, target)
    return target


def steps(checkpoints: Path) -> list[str]:
    return sorted((p.name for p in checkpoints.iterdir()), key=lambda n: (not n.isdigit(), n))


def read_state(step_dir: Path) -> dict:
    """A saved train state ({step_dir}/state) as numpy arrays, on any device layout."""
    path = epath.Path(step_dir) / 'state'
    metadata = ocp.StandardCheckpointHandler().metadata(path)
    tree = getattr(metadata, 'tree', metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        checkpointer.close()


def leaves(state: dict) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree.leaves_with_path(state)}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    left, right = leaves(a), leaves(b)
    assert left.keys() == right.keys()
    for group in ('params', 'batch_stats', 'opt_state', 'step'):
        assert any(name.startswith(f"['{group}']") for name in left), group
    different = [name for name in left if not np.array_equal(left[name], right[name])]
    assert not different, f'{len(different)} of {len(left)} arrays differ, e.g. {different[:5]}'


def max_difference(a: dict, b: dict) -> float:
    left, right = leaves(a), leaves(b)
    assert left.keys() == right.keys()
    return max(float(np.max(np.abs(left[n].astype(np.float64) - right[n].astype(np.float64))))
               for n in left)
