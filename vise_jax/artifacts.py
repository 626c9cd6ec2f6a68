"""Atomic artefacts and the stage contract.

Every stage writes into its own directory under the workdir. Files appear whole or not at all
(written to a temporary name, then renamed), and the directory counts as done only once its
`stage.json` record exists. The record holds a fingerprint of everything the output depends on
(the relevant config, the inputs' fingerprints, the format version). On a rerun:

* record present, fingerprint matches  -> the stage is skipped;
* partial work with the same fingerprint -> the stage resumes, keeping the chunks already written;
* anything with another fingerprint      -> it is stale: logged, removed and rebuilt.

Consumers only read directories whose record exists, so a killed stage never leaks half an output.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vise_jax.errors import InputError

log = logging.getLogger(__name__)

STAGE_RECORD = 'stage.json'
PARTIAL_RECORD = '.partial.json'


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (key order does not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(',', ':'), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What make would look at: a changed size or modification time means a changed input."""
    stat = os.stat(path)
    return {'path': str(Path(path).resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _new_file_mode() -> int:
    """What open() gives a new file under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renames it into place if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())   # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + '\n')


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


class StageDir:
    """The output directory of one stage, and its completion record."""

    def __init__(self, path: str | os.PathLike, name: str, fingerprint_payload: Any):
        self.path = Path(path)
        self.name = name
        self.fingerprint = fingerprint(fingerprint_payload)

    def record(self) -> dict[str, Any] | None:
        """The completion record, or None while the stage has not finished."""
        try:
            return read_json(self.path / STAGE_RECORD)
        except FileNotFoundError:
            return None

    def is_complete(self) -> bool:
        record = self.record()
        return record is not None and record.get('fingerprint') == self.fingerprint

    def prepare(self) -> None:
        """Makes the directory ready to (re)start work; keeps matching partial work to resume."""
        self._remove_if_stale()
        self.path.resolve().mkdir(parents=True, exist_ok=True)   # a link's target, for a sweep
        partial = self.path / PARTIAL_RECORD
        if partial.exists():
            log.info('%s: resuming partial work in %s', self.name, self.path)
        else:
            atomic_write_json(partial, {'stage': self.name, 'fingerprint': self.fingerprint})

    def finish(self, config: Any, summary: dict[str, Any]) -> dict[str, Any]:
        """Marks the stage done; call only once every output file is in place."""
        record = {
            'stage': self.name,
            'fingerprint': self.fingerprint,
            'finished': datetime.datetime.now(datetime.UTC).isoformat(),
            'summary': summary,
            'config': config,
        }
        atomic_write_json(self.path / STAGE_RECORD, record)
        (self.path / PARTIAL_RECORD).unlink(missing_ok=True)
        return record

    def _remove_if_stale(self) -> None:
        if not self.path.exists():
            return
        found = self.record() or _read_json_or_none(self.path / PARTIAL_RECORD)
        if found is not None and found.get('fingerprint') == self.fingerprint:
            return
        if found is None and not any(self.path.iterdir()):
            return
        if found is None:
            # Refuse to delete a directory this code did not create: it may be the user's data.
            raise InputError(
                f'{self.name}: {self.path} exists but holds no stage record; '
                'move it away or choose another --workdir')
        log.warning('%s: %s was made with another config or input (fingerprint %s, now %s); '
                    'rebuilding it', self.name, self.path, found.get('fingerprint'),
                    self.fingerprint)
        # A sweep links outputs runs share (vise_jax/sweep.py): empty the target, keep the link.
        shutil.rmtree(self.path.resolve())


def _read_json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
