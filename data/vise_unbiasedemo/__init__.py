"""TFDS builder 'vise_unbiasedemo' (importing this package registers it)."""

from vise_unbiasedemo.vise_unbiasedemo_dataset_builder import Builder

__all__ = ['Builder']
