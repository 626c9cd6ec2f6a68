"""Evaluation exports: a trained backbone's weights and batch statistics, without the training.

An export is a directory

  export.json   what the weights are (FORMAT, VERSION; see `export_meta` for every field)
  variables/    an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'} of the
                ResNet trunk, float32 numpy arrays: plain Orbax restores it without vise_jax,
                `orbax.checkpoint.StandardCheckpointer().restore(path / 'variables')`
  torchvision.safetensors, torchvision.pth   (optional) the same weights in torchvision's
                state_dict layout, for `torchvision.models.resnetXX().load_state_dict(...,
                strict=False)` (only fc is missing)

It is made from a training checkpoint (`export_checkpoint`), from torchvision or published VisE
weights (`export_weights_file`), or freshly initialised (`random_export`, the random baseline),
and read back with `load_export` (or `load_backbone`, which also takes weight files and training
checkpoints). Writes are atomic.

  format.py    the format: Export, export.json (`export_meta`, `read_export_meta`), writing
               (`write_export`, atomic) and loading, `variables_sha256`, torchvision files
  sources.py   where the weights come from: checkpoints (read through
               vise_jax.train.checkpointing), weight files, the random initialisation

The package takes values (paths, sizes, seeds); the export stage (vise_jax.stages) reads the
config. Images go in as uint8 RGB; the model expects x = (pixel / 255 - mean) / std with
export.json's mean and std (`models.normalize_images` does exactly that).
"""

from vise_jax.export import format, sources
from vise_jax.export.format import (
    COLLECTIONS,
    DEFAULT_IMAGE_SIZE,
    FORMAT,
    META_FILE,
    NORMALIZATION,
    SOURCE_KINDS,
    TORCHVISION_PREFIX,
    VARIABLES_DIR,
    VERSION,
    VOLATILE_FIELDS,
    Export,
    Variables,
    complete_meta,
    export_meta,
    load_export,
    numpy_variables,
    read_export_meta,
    save_variables,
    variables_sha256,
    write_export,
    write_meta_file,
    write_torchvision,
    write_torchvision_layout,
)
from vise_jax.export.sources import (
    CheckpointBackbone,
    export_checkpoint,
    export_weights_file,
    import_state_dict,
    initial_variables,
    load_backbone,
    random_export,
    read_checkpoint,
)

__all__ = [
    'COLLECTIONS', 'DEFAULT_IMAGE_SIZE', 'FORMAT', 'META_FILE', 'NORMALIZATION', 'SOURCE_KINDS',
    'TORCHVISION_PREFIX', 'VARIABLES_DIR', 'VERSION', 'VOLATILE_FIELDS', 'CheckpointBackbone',
    'Export', 'Variables', 'complete_meta', 'export_checkpoint', 'export_meta',
    'export_weights_file', 'format', 'import_state_dict', 'initial_variables', 'load_backbone',
    'load_export', 'numpy_variables', 'random_export', 'read_checkpoint', 'read_export_meta',
    'save_variables', 'sources', 'variables_sha256', 'write_export', 'write_meta_file',
    'write_torchvision', 'write_torchvision_layout',
]
