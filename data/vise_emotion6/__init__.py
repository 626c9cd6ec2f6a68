"""TFDS builder 'vise_emotion6' (importing this package registers it)."""

from vise_emotion6.vise_emotion6_dataset_builder import Builder

__all__ = ['Builder']
