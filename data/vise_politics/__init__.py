"""TFDS builder 'vise_politics' (importing this package registers it)."""

from vise_politics.vise_politics_dataset_builder import Builder

__all__ = ['Builder']
