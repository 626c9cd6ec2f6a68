"""Multi-process start-up: `jax.distributed.initialize()` when the launch environment asks for it.

One process per host (TPU VM worker, GPU node) or per GPU (SLURM tasks). Explicit flags win;
otherwise the environment of a multi-process launch is recognised (TPU pod slice, SLURM with more
than one task, Open MPI, or JAX's own JAX_COORDINATOR_ADDRESS), and JAX's cluster detection
fills in the coordinator, process count and id. A plain single-process run does nothing here.

`jax.distributed.initialize` also starts JAX's preemption service, whose SIGTERM handler makes
`multihost_utils.reached_preemption_sync_point` (Orbax: `manager.reached_preemption`) agree on
one step in every process; the training loop stops there, and installs no SIGTERM handler of
its own in a multi-process run (it would replace JAX's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)


def multi_process_launcher(environ: Mapping[str, str]) -> str | None:
    """The name of the multi-process launch this environment shows, or None."""
    if environ.get('JAX_COORDINATOR_ADDRESS'):
        return 'JAX_COORDINATOR_ADDRESS'
    if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
        return 'TPU pod slice'
    if int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
        return 'SLURM'
    if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
        return 'Open MPI'
    return None


def initialize(coordinator_address: str = '', num_processes: int | None = None,
               process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    """Joins the processes of a multi-process run; returns whether it did."""
    environ = os.environ if environ is None else environ
    launcher = 'flags' if coordinator_address else multi_process_launcher(environ)
    if launcher is None:
        return False
    # CPU processes need a collectives backend to talk to each other (gloo is JAX 0.10's default
    # already; set for older releases); accelerators ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info('distributed (%s): process %d of %d, %d local / %d global devices', launcher,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True
