"""The input pipeline: Grain datasets of ready, process-local batches, and the global batch.

What a training loop does with it:

  data = inputs.pretrain_data(config, workdir, split='train')    # or 'eval'
  model heads: data.heads  ({name: HeadSpec(kind, k, max_targets)})
  iterator = data.iterator()
  tally = inputs.BadImageTally.from_config(config)
  for step in ...:
      local = next(iterator)
      tally.update(local['bad_image'], local['weight'], local['index'])
      state = train_step(state, inputs.global_batch(local, mesh))
  iterator.close()

Batch contract (process-local numpy; B = global_batch_size / process_count):

  'image':     uint8   [B, H, W, 3]  not normalised (the model normalises on device)
  'weight':    float32 [B]           1.0 real example; 0.0 bad image or padding
  'index':     int32   [B]           post index in the store / row of a downstream set; -1 pad
  'bad_image': int32   [B]           0 fine, else an index into BAD_IMAGE_REASONS
  'targets':   {head: {'ids': int32 [B, M], 'probs': float32 [B, M]}}   pretraining
  'label':     int32 [B] (multi-label: [B, C] multi-hot)                 downstream sets

Checkpointing the iterator with Orbax: `iterator_save_args(iterator)` and
`iterator_restore_args(iterator)` inside an `ocp.args.Composite` (see chain.py).

Modules: sources (image readers, downstream sets, the eval split), transforms (decode, crops),
targets (soft targets from the label store), chain (the Grain chain and the builders),
batching (global arrays), bad_images (reason codes and the tally).
"""

from vise_jax.inputs.bad_images import BAD_IMAGE_REASONS, BadImageTally
from vise_jax.inputs.batching import global_batch, local_batch_size
from vise_jax.inputs.chain import (
    DownstreamData,
    InputData,
    PretrainData,
    downstream_data,
    ensure_flags_parsed,
    iterator_restore_args,
    iterator_save_args,
    pretrain_data,
    release_shared_memory,
)
from vise_jax.inputs.sources import (
    LabelledImages,
    Task,
    csv_manifest,
    eval_membership,
    image_folder,
    tfds_images,
)
from vise_jax.inputs.targets import HeadSpec

__all__ = [
    'BAD_IMAGE_REASONS', 'BadImageTally', 'DownstreamData', 'HeadSpec', 'InputData',
    'LabelledImages', 'PretrainData', 'Task', 'csv_manifest', 'downstream_data',
    'ensure_flags_parsed', 'eval_membership', 'global_batch', 'image_folder',
    'iterator_restore_args', 'iterator_save_args', 'local_batch_size', 'pretrain_data',
    'release_shared_memory', 'tfds_images',
]
