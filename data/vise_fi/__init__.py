"""TFDS builder 'vise_fi' (importing this package registers it)."""

from vise_fi.vise_fi_dataset_builder import Builder

__all__ = ['Builder']
