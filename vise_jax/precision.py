"""The dtype the big matrix products take their inputs in: float32, or bfloat16 (float32 sums).

bfloat16 inputs with float32 accumulation is what TPUs and GPUs run fastest, and on x86 CPUs
with AMX (Intel Sapphire Rapids and later) XLA's CPU backend multiplies bfloat16 at about five
times its float32 rate (1.0-1.6 vs 0.26-0.29 TFLOP/s on two cores; bench/README.md). Other CPUs
have no bfloat16 matrix unit to gain from, so 'auto' keeps float32 there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vise_jax.errors import InputError

MATMUL_DTYPES = ('float32', 'bfloat16', 'auto')
_CPU_FLAGS_FILE = '/proc/cpuinfo'


def resolve_matmul_dtype(name: str, platform: str | None = None) -> jnp.dtype:
    """'float32' or 'bfloat16' as a dtype; 'auto' is bfloat16 where it runs natively.

    `platform` defaults to that of JAX's default backend ('cpu', 'gpu', 'tpu').
    """
    if name not in MATMUL_DTYPES:
        raise InputError(f'matmul_dtype must be one of {MATMUL_DTYPES}, got {name!r}')
    if name == 'auto':
        platform = platform or jax.default_backend()
        name = 'bfloat16' if native_bfloat16_products(platform) else 'float32'
    return jnp.dtype(name)


def native_bfloat16_products(platform: str) -> bool:
    """Whether this platform multiplies bfloat16 matrices in hardware."""
    return platform != 'cpu' or 'amx_bf16' in cpu_flags()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags (Linux /proc/cpuinfo); empty where that is not readable."""
    try:
        with open(_CPU_FLAGS_FILE, encoding='utf-8') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.partition(':')[2].split())
    except OSError:
        pass
    return frozenset()
