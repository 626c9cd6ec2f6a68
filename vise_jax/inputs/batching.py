"""Process-local numpy batches -> one global batch of jax.Arrays sharded by rows.

Every process's pipeline yields its own rows (global_batch_size / process_count of them);
`global_batch` stitches them into arrays of the global batch size, rows split over every device
of the mesh (both the 'data' and 'fsdp' axes, sharding.row_sharding), so the train step sees one
global batch whatever the number of hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vise_jax import sharding
from vise_jax.errors import InputError


def local_batch_size(global_batch_size: int, process_count: int,
                     mesh: Mesh | None = None) -> int:
    """global / process_count, after checking the global batch splits evenly everywhere."""
    if global_batch_size < 1:
        raise InputError(f'input.global_batch_size must be positive, got {global_batch_size}')
    if global_batch_size % process_count:
        raise InputError(f'input.global_batch_size={global_batch_size} does not divide by the '
                         f'{process_count} processes; use a multiple of {process_count}')
    if mesh is not None:
        shards = sharding.num_row_shards(mesh)
        if global_batch_size % shards:
            raise InputError(f'input.global_batch_size={global_batch_size} does not divide by the '
                             f'{shards} row shards of the mesh {dict(mesh.shape)}; use a '
                             f'multiple of {shards}')
    return global_batch_size // process_count


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """The same tree as `local_batch` (numpy leaves, rows first), of global row-sharded arrays."""
    leaves = jax.tree.leaves(local_batch)
    rows = {np.shape(leaf)[0] for leaf in leaves}
    if len(rows) != 1:
        raise InputError(f'batch leaves disagree on the number of rows: {sorted(rows)}')
    global_rows = rows.pop() * jax.process_count()
    local_batch_size(global_rows, jax.process_count(), mesh)
    row_sharding = sharding.row_sharding(mesh)

    def to_global(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_process_local_data(row_sharding, leaf,
                                                      (global_rows, *leaf.shape[1:]))

    return jax.tree.map(to_global, local_batch)
