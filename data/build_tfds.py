"""Build a downstream dataset of data/ from its manual_dir, without TensorFlow.

  python data/build_tfds.py vise_fi --manual_dir=/path/to/FI [--data_dir=~/tensorflow_datasets]

(`tfds build data/vise_fi --manual_dir=...` does the same where TensorFlow is installed: the
`tfds` command line imports it.) The result is read with 'tfds:vise_fi:train[:DATA_DIR]' in
config.eval.train / config.eval.test, or `vise_jax.inputs.tfds_images`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASETS = ('vise_fi', 'vise_emotion6', 'vise_unbiasedemo', 'vise_politics', 'vise_intentonomy')


def register(names=DATASETS) -> None:
    """Import the builder packages (data/ goes on sys.path), which registers them with TFDS."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for name in names:
        importlib.import_module(name)


def build(name: str, manual_dir: str, data_dir: str | None = None, overwrite: bool = False):
    """Prepares dataset `name` (ArrayRecord) from manual_dir; returns its builder."""
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise SystemExit(f'unknown dataset {name!r}; one of {list(DATASETS)}')
    register([name])
    builder = tfds.builder(name, data_dir=data_dir)
    if overwrite and builder.is_prepared():
        builder.data_path.rmtree()
        builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir)))
    return builder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('name', choices=DATASETS)
    parser.add_argument('--manual_dir', required=True, help='the unpacked release (see README)')
    parser.add_argument('--data_dir', default=None,
                        help='where TFDS datasets live (default: $TFDS_DATA_DIR or '
                             '~/tensorflow_datasets)')
    parser.add_argument('--overwrite', action='store_true', help='rebuild if already built')
    args = parser.parse_args(argv)
    from vise_jax.errors import InputError

    try:
        builder = build(args.name, args.manual_dir, args.data_dir, args.overwrite)
    except InputError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    splits = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(f'{args.name} {builder.info.version} at {builder.data_dir}: {splits}')
    if builder.info.metadata:
        print(f'metadata: {dict(builder.info.metadata)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
