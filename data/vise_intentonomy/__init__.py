"""TFDS builder 'vise_intentonomy' (importing this package registers it)."""

from vise_intentonomy.vise_intentonomy_dataset_builder import Builder

__all__ = ['Builder']
