"""VisE ResNet-50 on a single accelerator (one GPU or one TPU chip), for debugging at real shape.

  python launch/pipeline.py --config=configs/debug_gpu.py --workdir=/tmp/vise_debug \
      --config.posts.manifest='/data/posts/sample.jsonl'

Same model, input size and heads as configs/vise_resnet50.py, with a batch that fits one device
and frequent logging and checkpoints. Variant `configs/debug_gpu.py:demo` trains on the demo
world instead of a manifest.
"""

from vise_jax import configlib


def get_config(arg=None):
    # Model, input size, heads and compute dtype are the defaults (configs/vise_resnet50.py's).
    arg = configlib.parse_arg(arg, demo=False)
    config = configlib.default_config()
    config.ingest.num_threads = 16
    if arg.demo:
        config.demo.enabled = True
        config.demo.world.image_size = 224
        config.posts.manifest = '{workdir}/world/posts.jsonl'
        # The demo world has ~12k comments: paper-scale K would leave a few per cluster.
        config.cluster.comment_ks = (16, 64)
        config.cluster.reaction_ks = (8,)
    config.input.global_batch_size = 256     # fits one 16 GB device
    config.input.num_workers = 8
    config.train.epochs = 1
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 200
    config.mesh.data = 1
    return config
