"""Shared test helpers: tiny posts manifests with real image files; 8 fake CPU devices."""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

# Sharded code is tested on 8 fake CPU devices; this must happen before JAX is first imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


class ManifestMaker:
    """Writes a posts.jsonl and its images under one directory."""

    def __init__(self, root: Path):
        self.root = root
        (root / 'images').mkdir(parents=True, exist_ok=True)

    def image(self, name: str, seed: int = 0) -> str:
        relpath = f'images/{name}'
        (self.root / relpath).write_bytes(jpeg_bytes(seed))
        return relpath

    def post(self, post_id: str, seed: int = 0, **fields) -> dict:
        row = {'id': post_id, 'image': self.image(f'{post_id}.jpg', seed),
               'comments': [f'comment on {post_id}'], 'reactions': {'like': seed + 1}}
        row.update(fields)
        return row

    def write(self, rows: list, name: str = 'posts.jsonl') -> Path:
        """Rows may be dicts (written as JSON) or raw bytes/str lines written as they are."""
        path = self.root / name
        with open(path, 'wb') as f:
            for row in rows:
                if isinstance(row, dict):
                    row = json.dumps(row)
                if isinstance(row, str):
                    row = row.encode('utf-8', errors='surrogatepass')
                f.write(row + b'\n')
        return path


@pytest.fixture
def manifest_maker(tmp_path):
    return ManifestMaker(tmp_path / 'data')


def load_config(name: str, arg: str | None = None):
    """Loads configs/<name> the way the command line does (by path, not as a package)."""
    path = REPO / 'configs' / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_launch(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs a launch/ script as a user would, returning its exit code and output."""
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, str(REPO / 'launch' / script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='session')
def labelled_world(tmp_path_factory):
    """The tiny demo world up to its labels (demo_world, ingest, embed, cluster), built once per
    session; tests copy it before writing into it."""
    from vise_jax import stages

    workdir = tmp_path_factory.mktemp('world')
    stages.run(load_config('demo.py', 'size=tiny'), workdir,
                 ['demo_world', 'ingest', 'embed', 'cluster'])
    return workdir


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache for the training processes tests start."""
    return tmp_path_factory.mktemp('jax_compile_cache')
