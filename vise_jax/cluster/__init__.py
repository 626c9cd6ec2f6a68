"""Clustering of engagement signals: k-means in JAX (kmeans/), sharded over a device mesh."""

from vise_jax.cluster.kmeans import KMeansOptions, KMeansResult, assign, fit, fit_minibatch

__all__ = ['KMeansOptions', 'KMeansResult', 'assign', 'fit', 'fit_minibatch']
