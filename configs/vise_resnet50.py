"""VisE at paper scale: ResNet-50 at 224 px from comment and reaction clusters, on a TPU pod.

  python launch/pipeline.py --config=configs/vise_resnet50.py --workdir=/mnt/vise_r50 \
      --config.posts.manifest='/data/posts/*.jsonl'

The paper trained on 250M posts for 10 epochs. Defaults target a TPU v4-128 slice (64 chips):
global batch 4096 (64 per chip), SGD with Nesterov momentum, lr 0.1 per 256 images.
Variants: `configs/vise_resnet50.py:batch=8192`.
"""

from vise_jax import configlib


def get_config(arg=None):
    arg = configlib.parse_arg(arg, batch=4096)
    config = configlib.default_config()
    config.ingest.on_error = 'skip'          # real data has bad rows; they are reported
    config.ingest.max_rejected_fraction = 0.05
    config.ingest.rows_per_shard = 50_000
    config.ingest.num_threads = 32
    config.cluster.comment_ks = (1000, 5000)
    config.cluster.reaction_ks = (50,)
    config.input.image_size = 224
    config.input.global_batch_size = arg.batch
    config.input.num_workers = 32
    config.model.name = 'resnet50'
    config.model.compute_dtype = 'bfloat16'
    config.train.epochs = 10
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 2000
    config.mesh.data = -1
    return config
