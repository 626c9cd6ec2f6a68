"""The command line shared by the launch scripts: --config, --workdir, and clean errors.

Each launch script is one line that names the stages it runs; all of them take

  --config=configs/demo.py[:variant]   the experiment (ml_collections config file)
  --config.some.key=value              overrides, type-checked against the config
  --workdir=DIR                        where every stage writes its output
"""

import logging
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from vise_jax import pipeline
from vise_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/demo.py:size=tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every stage output.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_stages(stages: Sequence[str]) -> None:
    """Parses the command line and runs `stages`; bad input exits with its message, no trace."""

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f'unexpected arguments: {argv[1:]}')
        logging.getLogger().setLevel(logging.INFO)
        try:
            pipeline.run(_CONFIG.value, _WORKDIR.value, stages)
        except InputError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)

    app.run(main)
