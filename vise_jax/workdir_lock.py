"""One run at a time in a workdir: an exclusive lock file, `{workdir}/.lock`.

Two runs writing into one workdir would replace each other's checkpoints and interleave their
logs, each believing it finished. `stages.run` therefore holds this lock while its stages run
(process 0 only, in a multi-process run: see `stages.run`).

The lock is `fcntl.flock` on the open lock file, which holds a JSON line naming the holder
(pid, host, start time, command) so that a refused run can say who has the workdir:

* held by a live process  -> `WorkdirBusy` at once, naming that process;
* a lock file whose holder died (a killed run) -> the kernel released the flock with the
  process, so the lock is free: it is taken over with a warning naming the dead holder;
* a lock file written on another host -> never taken over automatically, since this host cannot
  tell whether that run is alive: `WorkdirBusy` saying how to remove the file by hand.

A clean release removes the file (the inode is checked after locking, so a run that opened the
file just before it was removed tries again on the new one). On a local filesystem a dead
holder never blocks. NFS: Linux maps flock onto NFS byte-range locks, which work between
clients, but a crashed client's lock lasts until the server's lease runs out, and a mount with
`nolock` or `local_lock=flock|all` makes the lock local to each host (two hosts can then both
"hold" it; the host check above still refuses the second one when the first left its file).
Where flock is not supported at all (ENOLCK, EOPNOTSUPP), the lock file's pid and host alone
decide, with a warning. Object-store paths (gs://) cannot be locked; workdirs are local paths.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vise_jax.errors import InputError

log = logging.getLogger(__name__)

LOCK_FILE = '.lock'
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusy(InputError):
    """Another run holds the workdir (or may: a lock file left on another host)."""


def holder_info(command: str | None = None) -> dict[str, Any]:
    """What the lock file says about this process."""
    return {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': command or shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def describe(info: dict[str, Any] | None) -> str:
    """'pid 12 on host h since 2025-01-02T03:04:05+00:00 (5 min ago), command: ...'"""
    if not info:
        return 'a process that has not yet written its details'
    text = f'pid {info.get("pid")} on host {info.get("host")}'
    started = info.get('started')
    if started:
        text += f' since {started}'
        with contextlib.suppress(ValueError, TypeError):
            age = datetime.datetime.now().astimezone() - datetime.datetime.fromisoformat(started)
            text += f' ({_duration(age.total_seconds())} ago)'
    if info.get('command'):
        text += f', command: {info["command"]}'
    return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f'{max(seconds, 0):.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _read_info(fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class WorkdirLock:
    """A held lock; `release()` (or leaving the `with` block) frees it and removes the file."""

    def __init__(self, path: Path, fd: int, info: dict[str, Any]):
        self.path, self._fd, self.info = path, fd, info

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):   # remove it while still holding it
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(workdir: str | os.PathLike, command: str | None = None,
            wait_for_details_s: float = 1.0) -> WorkdirLock:
    """Takes `{workdir}/.lock` (creating the workdir) or raises WorkdirBusy naming the holder."""
    workdir = Path(workdir)
    path = workdir / LOCK_FILE
    while True:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:   # a read-only or someone else's workdir
            raise InputError(f'cannot lock the workdir: {path}: {e.strerror}') from e
        try:
            lock = _lock_open_file(fd, path, command, wait_for_details_s)
        except BaseException:
            os.close(fd)
            raise
        if lock is not None:
            return lock
        os.close(fd)   # the file was replaced or removed meanwhile: lock the current one


def _lock_open_file(fd: int, path: Path, command: str | None,
                    wait_for_details_s: float) -> WorkdirLock | None:
    flocked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Held by a live process. It writes its details just after locking: give it a moment.
        deadline = time.monotonic() + wait_for_details_s
        info = _read_info(fd)
        while info is None and time.monotonic() < deadline:
            time.sleep(0.05)
            info = _read_info(fd)
        raise WorkdirBusy(f'{path.parent} is in use by another run: {describe(info)}; wait for '
                          f'it to end or stop it (two runs in one workdir overwrite each '
                          f'other\'s outputs); lock file {path}') from None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        flocked = False
        log.warning('workdir lock: %s does not support flock (%s); relying on the pid and host '
                    'in the lock file only', path.parent, os.strerror(e.errno))
    if not _same_file(fd, path):
        return None
    me = holder_info(command)
    previous = _read_info(fd)
    if previous is not None:
        if previous.get('host') != me['host']:
            raise WorkdirBusy(
                f'{path.parent} was locked by {describe(previous)}; it is another host\'s lock, '
                f'which this host cannot check: if that run has ended, remove the lock file '
                f'(rm {shlex.quote(str(path))}) and start again')
        if not flocked and _pid_alive(previous.get('pid')):
            raise WorkdirBusy(f'{path.parent} is in use by another run: {describe(previous)}; '
                              f'wait for it to end or stop it; lock file {path}')
        if previous.get('pid') != me['pid']:
            log.warning('workdir lock: taking over the stale lock of %s: that process no longer '
                        'holds it (it ended without removing %s)', describe(previous), path)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    return WorkdirLock(path, fd, me)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, command: str | None = None) -> Iterator[WorkdirLock]:
    lock = acquire(workdir, command)
    try:
        yield lock
    finally:
        lock.release()
