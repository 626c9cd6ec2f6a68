"""Multi-process start-up: `jax.distributed.initialize()` when the launch environment asks for it.

One process per host (TPU VM worker, GPU node) or per GPU (SLURM tasks). Explicit flags win;
otherwise the environment of a multi-process launch is recognised (TPU pod slice, SLURM with more
than one task, Open MPI, or JAX's own JAX_COORDINATOR_ADDRESS), and JAX's cluster detection
fills in the coordinator, process count and id. A plain single-process run does nothing here.

`jax.distributed.initialize` also starts JAX's preemption service, whose SIGTERM handler makes
`multihost_utils.reached_preemption_sync_point` (Orbax: `manager.reached_preemption`) agree on
one step in every process; the training loop stops there, and installs no SIGTERM handler of
its own in a multi-process run (it would replace JAX's).

Waiting for each other: `initialize(timeout_s=...)` sets how long a process waits for the others
to join, how long one may stay silent before it counts as dead, and how long `barrier` waits.
`barrier` is the coordination service's barrier, not a collective. Use it to line the processes
up before a first collective: on CPU, the gloo rendezvous that a collective on a new set of
devices starts gives up after a fixed time (30 to 60 s, not configurable), which a process that
is still compiling or loading data on a loaded machine can miss.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300   # JAX's own default for joining; also `barrier`'s default
_timeout_s = DEFAULT_TIMEOUT_S
_barriers = itertools.count()


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
               environ: Mapping[str, str] | None = None, *,
               timeout_s: int | None = None) -> bool:
    """Joins the processes of a multi-process run; returns whether it did.

    `timeout_s` (default: JAX's, 300 s to join and 100 s of silence; 300 s at `barrier`) is how
    long a process waits for the others to join, how long one may stay silent (no heartbeat)
    before the run fails, and how long `barrier` waits.
    """
    global _timeout_s
    environ = os.environ if environ is None else environ
    launcher = 'flags' if coordinator_address else multi_process_launcher(environ)
    if launcher is None:
        return False
    # CPU processes need a collectives backend to talk to each other (gloo is JAX 0.10's default
    # already; set for older releases); accelerators ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    timeouts = {}
    if timeout_s is not None:
        timeouts = {'initialization_timeout': int(timeout_s),
                    'heartbeat_timeout_seconds': max(int(timeout_s), 100)}
        _timeout_s = int(timeout_s)
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)
    log.info('distributed (%s): process %d of %d, %d local / %d global devices', launcher,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process has called `barrier(name)`, at most `timeout_s` (default:
    initialize's timeout_s); a no-op in a single-process run. Every process must call the same
    barriers in the same order. The coordination service's barrier: no collective, no device,
    so no gloo rendezvous."""
    if jax.process_count() == 1:
        return
    timeout = _timeout_s if timeout_s is None else timeout_s
    key = f'{name} #{next(_barriers)}'   # a barrier id is used once
    ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout * 1000))
