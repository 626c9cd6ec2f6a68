"""The command line shared by the launch scripts: --config, --workdir, and clean errors.

Each launch script is one line that names the stages it runs; all of them take

  --config=configs/demo.py[:variant]   the experiment (ml_collections config file)
  --config.some.key=value              overrides, type-checked against the config
  --workdir=DIR                        where every stage writes its output

Multi-process runs (TPU pods, multi-GPU clusters) start `jax.distributed` from the environment
(TPU pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or from --coordinator_address,
--num_processes and --process_id; only process 0 logs at INFO level.
"""

import logging
import sys
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from vise_jax import distributed, pipeline
from vise_jax import input as input_lib
from vise_jax.errors import InputError, TrainingError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/demo.py:size=tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every stage output.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for a multi-process run started by hand '
    '(clusters and TPU pods are detected from the environment).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_stages(stages: Sequence[str]) -> None:
    """Parses the command line and runs `stages`; bad input exits with its message, no trace."""

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f'unexpected arguments: {argv[1:]}')
        # Orbax and Grain log every save and worker event through absl at INFO: keep warnings.
        for noisy in ('absl', 'jax'):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
        try:
            pipeline.run(_CONFIG.value, _WORKDIR.value, stages)
        except (InputError, TrainingError) as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        finally:
            input_lib.release_shared_memory()

    app.run(main)
