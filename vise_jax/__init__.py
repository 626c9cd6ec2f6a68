"""vise_jax: visual representations learned from social-media engagement (VisE) in JAX."""

__version__ = '0.1.0'
