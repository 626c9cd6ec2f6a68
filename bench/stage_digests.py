"""Which stage's output differs between two runs (two machines, two seeds, two versions)?

  python bench/stage_digests.py workdirs/demo --save here.json       # on machine A
  python bench/stage_digests.py workdirs/demo --compare here.json    # on machine B

Prints, stage by stage in pipeline order, a digest of the stage's data files (records, logs,
plots and timings left out) and, for training, the logged losses; with --compare, the first
stage whose digest differs from the saved run's is named. Every stage downstream of it is
expected to differ too. Reading a demo workdir takes a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# Data files per stage directory, as globs; records (stage.json), reports, plots, logs are not
# data and carry times and paths.
STAGE_FILES = {
    'world': ('posts.jsonl', 'latents.csv', 'images/**/*', 'downstream/**/*'),
    'posts': ('*.array_record', 'rejected.jsonl'),
    'embeddings': ('*.npy',),
    'labels': ('*/ids.npy', '*/offsets.npy', 'centroids/*'),   # <head>/ids.npy: the labels
    'baselines/supervised/labels': ('*/ids.npy',),
}
EXPORTS = ('vise', 'supervised', 'random')


def files_digest(root: Path, patterns: tuple[str, ...]) -> tuple[str, int] | None:
    """sha256 over (relative path, bytes) of the matching files, sorted; None without files."""
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b'\0')
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16], len(files)


def train_losses(metrics: Path) -> str | None:
    """The first and last logged training loss, every digit (a divergence shows in the first)."""
    if not metrics.is_file():
        return None
    records = map(json.loads, metrics.read_text().splitlines())
    losses = [(r['step'], r['loss']) for r in records if r.get('split') == 'train']
    if not losses:
        return None
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    return f'loss@{first_step}={first!r} loss@{last_step}={last!r}'


def digests(workdir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for stage, patterns in STAGE_FILES.items():
        result = files_digest(workdir / stage, patterns)
        if result:
            found[stage] = f'{result[0]} ({result[1]} files)'
    for run in ('train', 'baselines/supervised/train'):
        losses = train_losses(workdir / run / 'metrics.jsonl')
        if losses:
            found[run] = losses
    for name in EXPORTS:
        meta = workdir / 'export' / name / 'export.json'
        if meta.is_file():
            found[f'export/{name}'] = json.loads(meta.read_text())['variables_sha256'][:16]
    results = workdir / 'eval' / 'results.json'
    if results.is_file():
        results = json.loads(results.read_text())
        headline = {task: info['metrics'][0] for task, info in results['tasks'].items()}
        for name, by_task in results['results'].items():
            found[f'eval/{name}'] = ' '.join(
                f'{task}.{headline[task]}={r["metrics"][headline[task]]:.4f}'
                for task, r in by_task.items())
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('workdir', type=Path)
    parser.add_argument('--save', type=Path, help='write the digests to this JSON file')
    parser.add_argument('--compare', type=Path, help='digests saved by another run')
    args = parser.parse_args(argv)
    found = digests(args.workdir)
    other = json.loads(args.compare.read_text()) if args.compare else {}
    for stage, value in found.items():
        mark = '' if not other else ('  same' if other.get(stage) == value else '  DIFFERS')
        print(f'{stage:30s} {value}{mark}')
    if args.save:
        args.save.write_text(json.dumps(found, indent=1) + '\n')
    if other:
        differing = [stage for stage, value in found.items() if other.get(stage) != value]
        print('first differing stage:', differing[0] if differing else 'none')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
