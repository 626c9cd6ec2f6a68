"""Images/s of the Grain input pipeline against a plain single-process PIL loop, same JPEGs.

  /work/peer-venv/bin/python bench/input_bench.py [--num-images 768] [--workers 1,2]

Writes --num-images photo-like JPEGs (500x375, quality 90: smooth colour fields, edges and
sensor noise) once, ingests them into a posts store with a small label store, then times:

* plain: a hand-written loop in this process doing the same work on the same bytes held in
  memory: JPEG draft decode at the smallest scale that still covers the crop, torchvision's
  random-resized-crop parameters, crop + resize to --size with PIL, flip, into a uint8 batch;
* torchvision (when installed): RandomResizedCrop + RandomHorizontalFlip on a full decode, for
  context (no draft mode);
* vise_jax: `vise_jax.inputs.pretrain_data` (ArrayRecord reads, decode, crop, flip, targets,
  batching) with each --workers count of Grain worker processes, batches of --batch.

Contenders run in turn, round after round (--rounds); each pipeline run is paired with a plain
run just before it, and the ratio vise_jax / (workers x plain) is taken within the pair, so
that load from elsewhere, which drifts over seconds, falls on both sides. The ratio is 1.0 when
the pipeline scales perfectly over worker processes with no overhead (the goal is >= 0.9).
Printed: the best images/s of each contender, and the median and best paired ratios. Worker
start-up is excluded (the first --warmup batches), and every iterator is closed before the next
starts.

On a machine others are using, the wall-clock ratio for several workers drops with their load;
the CPU time per image (this process plus its workers, read from /proc over the timed window)
much less, so the paired ratio plain / pipeline of CPU per image is printed too: the pipeline's
efficiency per core.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num-images', type=int, default=768)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--workers', default='1,2', help='comma-separated worker counts')
    parser.add_argument('--batches', type=int, default=16, help='timed batches per round')
    parser.add_argument('--warmup', type=int, default=4, help='untimed batches first')
    parser.add_argument('--rounds', type=int, default=4)
    parser.add_argument('--prefetch', type=int, default=2, help='config.input.prefetch_batches')
    parser.add_argument('--read-threads', type=int, default=0, help='config.input.read_threads')
    parser.add_argument('--skip-torchvision', action='store_true')
    return parser.parse_args(argv)


# --- data ----------------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Smooth colour fields with a few hard edges and sensor noise: JPEG sizes like photos."""
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    for _ in range(3):  # objects: discs of another colour
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        y, x = np.ogrid[:height, :width]
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
        pixels[disc] = 0.5 * pixels[disc] + 0.5 * rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_workdir(root: Path, num_images: int) -> list[bytes]:
    """posts.jsonl + images -> ingest -> {root}/work/posts; random labels in work/labels."""
    from vise_jax import artifacts, posts
    from vise_jax.cluster import labels

    rng = np.random.default_rng(0)
    (root / 'images').mkdir(parents=True)
    encoded, rows = [], []
    for i in range(num_images):
        buffer = io.BytesIO()
        photo_like(rng).save(buffer, format='JPEG', quality=90)
        encoded.append(buffer.getvalue())
        (root / 'images' / f'{i}.jpg').write_bytes(encoded[-1])
        rows.append({'id': f'p{i}', 'image': f'images/{i}.jpg'})
    (root / 'posts.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    work = root / 'work'
    options = posts.IngestOptions(reaction_types=posts.REACTION_TYPES, num_threads=2)
    posts.ingest([root / 'posts.jsonl'], artifacts.StageDir(work / 'posts', 'ingest', {}),
                 options)
    comments_per_post = rng.integers(0, 30, num_images)
    comment_head = labels.comment_head(
        1000, num_images, np.repeat(np.arange(num_images), comments_per_post),
        rng.integers(0, 1000, comments_per_post.sum()))
    has_reactions = rng.random(num_images) < 0.8
    reaction_head = labels.reaction_head(50, has_reactions,
                                         rng.integers(0, 50, has_reactions.sum()))
    for head in (comment_head, reaction_head):
        labels.save_head(work / 'labels', head)
    labels.write_index(work / 'labels', num_images,
                       labels.post_ids_digest(r['id'] for r in rows),
                       {comment_head.name: {'kind': 'comments', 'k': 1000},
                        reaction_head.name: {'kind': 'reactions', 'k': 50}})
    artifacts.StageDir(work / 'labels', 'cluster', {}).finish({}, {})
    return encoded


# --- contenders ----------------------------------------------------------------------------


def rrc_params(width: int, height: int, rnd: random.Random) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, with Python's random."""
    area = width * height
    for _ in range(10):
        target = area * rnd.uniform(0.08, 1.0)
        aspect = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, width - w), rnd.randint(0, height - h), w, h
    return 0, 0, width, height


def plain_loop(encoded: list[bytes], count: int, size: int, batch: int) -> float:
    """Images/s of a single-process PIL loop doing the pipeline's image work."""
    rnd = random.Random(0)
    out = np.zeros((batch, size, size, 3), np.uint8)
    start = time.perf_counter()
    for n in range(count):
        with Image.open(io.BytesIO(encoded[n % len(encoded)])) as image:
            width, height = image.size
            left, top, w, h = rrc_params(width, height, rnd)
            scale = next(s for s in (8, 4, 2, 1) if s * size <= min(w, h) or s == 1)
            if scale > 1:
                image.draft('RGB', (width // scale, height // scale))
            box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
            if image.mode != 'RGB':
                image = image.convert('RGB')
            resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if rnd.random() < 0.5:
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[n % batch] = np.asarray(resized)
    return count / (time.perf_counter() - start)


def torchvision_loop(encoded: list[bytes], count: int, size: int) -> float | None:
    try:
        from torchvision import transforms
    except ImportError:
        return None
    transform = transforms.Compose([transforms.RandomResizedCrop(size),
                                    transforms.RandomHorizontalFlip()])
    start = time.perf_counter()
    for n in range(count):
        with Image.open(io.BytesIO(encoded[n % len(encoded)])) as image:
            np.asarray(transform(image.convert('RGB')))
    return count / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (Grain's workers), from /proc."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            fields = Path(f'/proc/{child.pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return total


def pipeline_rate(work: Path, args, workers: int) -> tuple[float, float]:
    """(images/s, CPU ms per image over all processes) of the pipeline with `workers`."""
    from vise_jax import configlib
    from vise_jax import inputs as input_lib

    config = configlib.default_config()
    config.input.update(dict(image_size=args.size, global_batch_size=args.batch,
                             num_workers=workers, eval_fraction=0.0,
                             prefetch_batches=args.prefetch, read_threads=args.read_threads))
    data = input_lib.pretrain_data(config, work, process_index=0, process_count=1)
    iterator = data.iterator()
    try:
        for _ in range(args.warmup):
            next(iterator)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        for _ in range(args.batches):
            batch = next(iterator)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
        assert batch['image'].shape == (args.batch, args.size, args.size, 3)
    finally:
        iterator.close()
    images = args.batches * args.batch
    return images / elapsed, 1e3 * cpu / images


def timed_plain(encoded: list[bytes], args) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the plain loop."""
    count = args.batches * args.batch
    start_cpu = time.process_time()
    rate = plain_loop(encoded, count, args.size, args.batch)
    return rate, 1e3 * (time.process_time() - start_cpu) / count


def main(argv):
    args = parse_args(argv)
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    workers = [int(w) for w in args.workers.split(',')]
    print(f'python {sys.version.split()[0]}, {os.cpu_count()} cores, Pillow '
          f'{Image.__version__}; {args.num_images} JPEGs 500x375 q90 -> {args.size} px, '
          f'batch {args.batch}, {args.batches} timed batches x {args.rounds} rounds')
    best: dict[str, float] = {}
    # Per round, each pipeline run is paired with a plain run just before it, so that load
    # from elsewhere, which drifts over seconds, falls on both sides of each ratio.
    wall_ratios: dict[int, list[float]] = {w: [] for w in workers}
    cpu_ratios: dict[int, list[float]] = {w: [] for w in workers}
    with tempfile.TemporaryDirectory(prefix='input_bench_') as tmp:
        start = time.perf_counter()
        encoded = write_workdir(Path(tmp), args.num_images)
        mean_kb = np.mean([len(e) for e in encoded]) / 1024
        print(f'data: {time.perf_counter() - start:.1f} s to write and ingest; '
              f'mean JPEG {mean_kb:.0f} KiB')
        for round_index in range(args.rounds):
            rates = {}
            if not args.skip_torchvision:
                rates['torchvision'] = torchvision_loop(encoded, args.batches * args.batch,
                                                        args.size)
            for w in workers:
                plain, plain_cpu = timed_plain(encoded, args)
                rate, cpu = pipeline_rate(Path(tmp) / 'work', args, w)
                # 0 workers: the main process, with --read-threads threads decoding batches.
                width = w or max(1, args.read_threads)
                wall_ratios[w].append(rate / (width * plain))
                cpu_ratios[w].append(plain_cpu / cpu)
                rates[f'plain (before {w}w)'] = plain
                rates[f'vise_jax {w}w'] = rate
            print(f'round {round_index + 1}: ' + ', '.join(
                f'{name} {rate:.0f}' for name, rate in rates.items() if rate is not None))
            for name, rate in rates.items():
                if rate is not None:
                    best[name.split(' (')[0]] = max(best.get(name.split(' (')[0], 0.0), rate)
    plain = best['plain']
    print(f'\nbest of {args.rounds} rounds, images/s:')
    print(f'  plain PIL loop, 1 process (draft decode):  {plain:7.0f}')
    if best.get('torchvision'):
        print(f"  torchvision RRC + flip, full decode:        {best['torchvision']:7.0f}  "
              f"({best['torchvision'] / plain:.2f} x plain)")
    for w in workers:
        print(f"  vise_jax pipeline, {w} worker(s):           {best[f'vise_jax {w}w']:7.0f}")
    print('paired ratios per round (median, best): pipeline / (workers x plain) | '
          'CPU per image plain / pipeline')
    for w in workers:
        print(f'  {w} worker(s): {np.median(wall_ratios[w]):.3f}, {max(wall_ratios[w]):.3f} | '
              f'{np.median(cpu_ratios[w]):.3f}, {max(cpu_ratios[w]):.3f}')
    if len(workers) > 1 and workers[0]:
        low, high = workers[0], workers[-1]
        scaling = best[f'vise_jax {high}w'] / best[f'vise_jax {low}w']
        print(f'  scaling {low} -> {high} workers (best rates): {scaling:.2f} x '
              f'(ideal {high / low:.0f} x)')


if __name__ == '__main__':
    main(sys.argv[1:])
