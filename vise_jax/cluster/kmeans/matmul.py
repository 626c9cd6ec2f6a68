"""How the rows x centroids products are computed: float32, or 'bfloat16_3x' (each side split
into a bfloat16 high part and a bfloat16 remainder, three bfloat16 products summed in float32)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vise_jax import precision, sharding
from vise_jax.cluster.kmeans.options import BFLOAT16_3X, FLOAT32, check_matmul_precision

HIGHEST = jax.lax.Precision.HIGHEST


def resolve_matmul_precision(matmul_precision: str, mesh: Mesh | None = None) -> str:
    """'float32' or 'bfloat16_3x': what `matmul_precision` means on this mesh's devices
    (default: JAX's default backend)."""
    check_matmul_precision(matmul_precision, 'k-means')
    if matmul_precision != 'auto':
        return matmul_precision
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return BFLOAT16_3X if precision.native_bfloat16_products(platform) else FLOAT32


def splits_products(matmul_precision: str, mesh: Mesh) -> bool:
    return resolve_matmul_precision(matmul_precision, mesh) == BFLOAT16_3X


def split_bfloat16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x as high + low, both bfloat16: x - (high + low) is ~2^-16 |x|."""
    high = x.astype(jnp.bfloat16)
    return high, (x - high.astype(jnp.float32)).astype(jnp.bfloat16)


@functools.cache
def split_rows_fn(mesh: Mesh):
    """(n, d) float32 rows -> (n, 3d) uint16: the bits of each row's bfloat16 [high, low, high]."""

    def split_rows(x):
        high, low = split_bfloat16(x)
        # Stacked then reshaped, which XLA:CPU writes 2.5x faster than a concatenation; held
        # as bits, because a bfloat16 array carried through the chunk loop is widened to
        # float32 by XLA:CPU and narrowed again chunk by chunk (a sixth of the pass).
        bits = jax.lax.bitcast_convert_type(jnp.stack([high, low, high], axis=1), jnp.uint16)
        return bits.reshape(x.shape[0], 3 * x.shape[1])

    rows = sharding.row_sharding(mesh)
    return jax.jit(split_rows, in_shardings=rows, out_shardings=rows)


def matmul_lhs(centroids: jax.Array, split: bool) -> jax.Array:
    """The centroids as the products' left side: (k, d) float32, or for bfloat16_3x
    (k, 3d) [high, high, low] against the rows' [high, low, high]: one bfloat16 product with a
    contraction three times as long sums c_hi.x_hi + c_hi.x_lo + c_lo.x_hi in float32
    (c_lo.x_lo, ~2^-16 relative, is left out)."""
    if not split:
        return centroids
    high, low = split_bfloat16(centroids)
    return jnp.concatenate([high, high, low], axis=1)
