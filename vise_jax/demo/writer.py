"""Writes the demo world to disk in the documented posts format, resumably.

Layout of the world directory:
  posts.jsonl                 pretraining posts (docs/data_format.md), images under images/
  latents.csv                 id,object,mood of each pretraining post: ground truth for analysis
                              and for the supervised baseline, never read by VisE training
  downstream/train.csv        image,object,mood for the linear probes (images never seen in
  downstream/test.csv         pretraining), image paths relative to downstream/
  downstream/tasks.json       the probe tasks: mood (subjective) and object (objective)
  world.json                  the spec, the class names and the counts
  contact_sheet.png           the first posts, labelled, to look at
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tqdm
from PIL import Image

from vise_jax import artifacts
from vise_jax.demo import world
from vise_jax.errors import InputError

FORMAT_VERSION = 1
CONTACT_SHEET_POSTS = 32
DOWNSTREAM_DIRS = {'downstream_train': 'train', 'downstream_test': 'test'}


@dataclasses.dataclass(frozen=True)
class WorldSizes:
    pretrain: int
    downstream_train: int
    downstream_test: int

    def __post_init__(self):
        if self.pretrain < 1 or self.downstream_train < 0 or self.downstream_test < 0:
            raise InputError(f'demo world sizes must be positive, got {self}')

    def by_split(self) -> dict[str, int]:
        return {
            'pretrain': self.pretrain,
            'downstream_train': self.downstream_train,
            'downstream_test': self.downstream_test,
        }


def write_world(
    spec: world.WorldSpec,
    sizes: WorldSizes,
    stage: artifacts.StageDir,
    *,
    posts_per_chunk: int = 500,
    jpeg_quality: int = 90,
    config: Any = None,
) -> dict[str, Any]:
    """Generates every post chunk by chunk (skipping chunks already on disk), then the indexes."""
    if posts_per_chunk < 1:
        raise InputError(f'demo.posts_per_chunk must be positive, got {posts_per_chunk}')
    stage.prepare()
    out = stage.path
    with tqdm.tqdm(
        total=sum(sizes.by_split().values()), unit='post', desc='demo world', disable=None
    ) as progress:
        for split, count in sizes.by_split().items():
            for chunk, indices in enumerate(_chunk_ranges(count, posts_per_chunk)):
                part = _part_path(out, split, chunk)
                if not part.exists():
                    rows = [
                        _write_post(out, world.sample_post(spec, split, i), jpeg_quality)
                        for i in indices
                    ]
                    artifacts.atomic_write_text(part, ''.join(json.dumps(r) + '\n' for r in rows))
                progress.update(len(indices))
    summary = _write_indexes(out, spec, sizes)
    record = stage.finish(config, summary)
    shutil.rmtree(out / 'parts')  # merged into the indexes; only needed to resume
    return record['summary']


def _chunk_ranges(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(count, start + size))


def _part_path(out: Path, split: str, chunk: int) -> Path:
    return out / 'parts' / f'{split}-{chunk:05d}.jsonl'


def image_relpath(split: str, post_id: str) -> str:
    """Where a post's image lives, relative to the file that lists it."""
    return f'images/{DOWNSTREAM_DIRS.get(split, split)}/{post_id}.jpg'


def _split_root(out: Path, split: str) -> Path:
    return out if split == 'pretrain' else out / 'downstream'


def _write_post(out: Path, post: world.DemoPost, jpeg_quality: int) -> dict[str, Any]:
    """Writes the post's JPEG and returns its part row: the posts-format row plus latents."""
    relpath = image_relpath(post.split, post.id)
    artifacts.atomic_write_bytes(
        _split_root(out, post.split) / relpath, encode_jpeg(post.image, jpeg_quality)
    )
    # Only non-zero reaction types are written: the format reads missing types as zero.
    row = {
        'id': post.id,
        'image': relpath,
        'comments': list(post.comments),
        'reactions': {name: n for name, n in post.reactions.items() if n},
    }
    return {'post': row, 'object': world.OBJECTS[post.object], 'mood': world.MOODS[post.mood]}


def encode_jpeg(pixels, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def _read_parts(out: Path, split: str) -> Iterator[dict[str, Any]]:
    for part in sorted((out / 'parts').glob(f'{split}-*.jsonl')):
        with open(part, encoding='utf-8') as f:
            yield from (json.loads(line) for line in f)


def _write_indexes(out: Path, spec: world.WorldSpec, sizes: WorldSizes) -> dict[str, Any]:
    pretrain = list(_read_parts(out, 'pretrain'))
    artifacts.atomic_write_text(
        out / 'posts.jsonl',
        ''.join(json.dumps(r['post'], ensure_ascii=False) + '\n' for r in pretrain),
    )
    _write_csv(
        out / 'latents.csv',
        ['id', 'object', 'mood'],
        ([r['post']['id'], r['object'], r['mood']] for r in pretrain),
    )
    for split, name in DOWNSTREAM_DIRS.items():
        _write_csv(
            out / 'downstream' / f'{name}.csv',
            ['image', 'object', 'mood'],
            ([r['post']['image'], r['object'], r['mood']] for r in _read_parts(out, split)),
        )
    artifacts.atomic_write_json(
        out / 'downstream' / 'tasks.json',
        {
            'mood': {
                'type': 'single_label',
                'column': 'mood',
                'classes': list(world.MOODS),
                'kind': 'subjective',
            },
            'object': {
                'type': 'single_label',
                'column': 'object',
                'classes': list(world.OBJECTS),
                'kind': 'objective',
            },
        },
    )
    summary = {
        'spec': dataclasses.asdict(spec),
        'sizes': sizes.by_split(),
        'objects': list(world.OBJECTS),
        'moods': list(world.MOODS),
        'comments': sum(len(r['post']['comments']) for r in pretrain),
        'posts_without_comments': sum(not r['post']['comments'] for r in pretrain),
        'posts_without_reactions': sum(not r['post']['reactions'] for r in pretrain),
    }
    artifacts.atomic_write_json(out / 'world.json', summary)
    sheet_posts = [
        world.sample_post(spec, 'pretrain', i)
        for i in range(min(CONTACT_SHEET_POSTS, sizes.pretrain))
    ]
    with artifacts.atomic_path(out / 'contact_sheet.png') as tmp:
        world.contact_sheet(sheet_posts).save(tmp, format='PNG')
    return summary


def _write_csv(path: Path, header: list[str], rows) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
