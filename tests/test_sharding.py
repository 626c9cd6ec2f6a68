"""Meshes and global row arrays on 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from vise_jax import sharding
from vise_jax.errors import InputError


def test_mesh_shapes():
    assert jax.device_count() == 8
    assert dict(sharding.make_mesh().shape) == {'data': 8, 'fsdp': 1}
    assert dict(sharding.make_mesh(fsdp=2).shape) == {'data': 4, 'fsdp': 2}
    assert dict(sharding.make_mesh(devices=jax.devices()[:1]).shape) == {'data': 1, 'fsdp': 1}
    with pytest.raises(InputError, match='fsdp=3 must divide the 8 devices'):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(InputError, match='data=3 x fsdp=2'):
        sharding.make_mesh(data=3, fsdp=2)


@pytest.mark.parametrize('num_rows', [1, 8, 13])
def test_put_rows_pads_to_the_device_count_and_weights_padding_zero(num_rows):
    mesh = sharding.make_mesh(fsdp=2)
    rows = np.arange(num_rows * 3, dtype=np.float32).reshape(num_rows, 3)
    global_rows, weights = sharding.put_rows(rows, mesh)
    assert global_rows.shape[0] % 8 == 0 and global_rows.shape[0] >= num_rows
    assert global_rows.sharding == sharding.row_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(global_rows)[:num_rows], rows)
    assert float(weights.sum()) == num_rows
    # A weighted reduction on the sharded array equals the plain one.
    total = jax.jit(lambda x, w: (x * w[:, None]).sum(0))(global_rows, weights)
    np.testing.assert_allclose(np.asarray(total), rows.sum(0))
