"""The scale benchmark's config: memory and time of each stage against the number of posts.

  python bench/scale_bench.py --sizes 50000,200000,1000000 --out /tmp/scale_bench

Not an experiment: bench/scale_bench.py writes a synthetic manifest of N posts and runs each
stage on it in its own process, with this config and `--config.posts.manifest=...` (and, for the
ingest on Beam, `--config.ingest.runner=beam`), e.g.

  python launch/ingest.py --config=configs/scale_bench.py --config.posts.manifest=M --workdir=W
 Everything that does not grow with N is kept
small so that the 2-core machine can run N = 1M: the TF-IDF sentencepiece encoder (no
pretrained weights, fast on a CPU), K = 16 and 64 for comments and 8 for reactions, a bounded
fit sample, and the demo's tiny ResNet-18 (width 8, 32 px). The training stage is not run to
the end: the bench times the first batches only (label store loading, the Grain chain, steps).
"""

from vise_jax import configlib


def get_config(arg=None):
    del arg
    config = configlib.default_config()
    config.posts.manifest = ''               # set by the bench: --config.posts.manifest=...
    config.ingest.on_error = 'fail'          # the synthetic posts are clean
    config.ingest.rows_per_shard = 10_000

    config.embed.encoder = 'sentencepiece'
    config.embed.sp_dim = 64
    config.embed.sp_vocab_size = 2000
    config.embed.chunk_size = 65_536

    config.cluster.comment_ks = (16, 64)
    config.cluster.reaction_ks = (8,)
    config.cluster.fit_sample = 20_000
    config.cluster.max_iters = 20
    config.cluster.nearest_per_cluster = 3

    config.input.image_size = 32
    config.input.global_batch_size = 64
    config.input.num_workers = 1
    config.input.eval_fraction = 0.01
    config.model.name = 'resnet18'
    config.model.width = 8
    config.model.compute_dtype = 'float32'
    config.train.epochs = 1
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 0
    config.train.checkpoint_every_steps = 100_000
    return config
