"""VisE at paper scale: ResNet-50 at 224 px from comment and reaction clusters, on a TPU pod.

  python launch/pipeline.py --config=configs/vise_resnet50.py --workdir=/mnt/vise_r50 \
      --config.posts.manifest='/data/posts/*.jsonl'

The paper trained on 250M posts for 10 epochs. Defaults target a TPU v4-128 slice (64 chips):
global batch 4096 (64 per chip), SGD with Nesterov momentum, lr 0.1 per 256 images.
Variants: `configs/vise_resnet50.py:batch=8192`.
"""

from vise_jax import configlib


def get_config(arg=None):
    # The defaults (configlib.default_config) are this experiment: ResNet-50 at 224 px, heads
    # comments K=1000 and 5000 + reactions K=50, 10 epochs, batch 4096, bf16 compute, bad rows
    # skipped and reported. Stated here is only what a pod host changes.
    arg = configlib.parse_arg(arg, batch=4096)
    config = configlib.default_config()
    config.ingest.rows_per_shard = 50_000    # fewer, larger shards for 250M posts
    config.ingest.num_threads = 32           # a TPU VM host has 240 vCPUs
    config.input.global_batch_size = arg.batch
    config.input.num_workers = 32
    config.train.checkpoint_every_steps = 2000   # ~40 s of a v4-128; preemption saves the rest
    return config
