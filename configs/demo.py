"""The demo: VisE on the synthetic social world, on a laptop CPU.

  python launch/pipeline.py --config=configs/demo.py --workdir=workdirs/demo

Variants after a colon: `configs/demo.py:size=tiny` is a seconds-long world for tests and smoke
runs. The world is generated into {workdir}/world as ordinary posts and ingested like real data.

`configs/demo.py:sweep` is the seeds-and-ablations sweep (launch/sweep.py): three seeds, one
world, half the pretraining posts, this config and the variants in ABLATIONS (partial configs):

  python launch/sweep.py --config=configs/demo.py:sweep --workdir=workdirs/sweep
"""

from vise_jax import configlib

SIZES = {
    'default': dict(num_pretrain=4000, num_downstream_train=1000, num_downstream_test=1000),
    # Enough downstream images for a stratified validation split of ten object classes.
    'tiny': dict(num_pretrain=48, num_downstream_train=80, num_downstream_test=40,
                 posts_per_chunk=16),
}

# The ablations the method invites: which engagement signal, how many clusters, which text
# encoder, and soft (every comment cluster of a post) or single-label (its most frequent one)
# comment targets. The sweep runs the demo's own setting too (row 'vise': comments at K = 16 and
# 64, reactions at K = 8, soft targets, MiniLM).
ABLATIONS = {
    'comments_only': {'cluster': {'reaction_ks': ()}},
    'reactions_only': {'cluster': {'comment_ks': ()}},
    'k16': {'cluster': {'comment_ks': (16,)}},
    'k64': {'cluster': {'comment_ks': (64,)}},
    'k256': {'cluster': {'comment_ks': (256,)}},
    'sentencepiece': {'embed': {'encoder': 'sentencepiece'}},
    'single_label': {'input': {'max_targets_per_post': 1}},
}


def get_config(arg=None):
    arg = configlib.parse_arg(arg, size='default', sweep=False)
    if arg.size not in SIZES:
        raise ValueError(f'configs/demo.py: unknown size {arg.size!r}; known: {sorted(SIZES)}')
    config = configlib.default_config()
    config.demo.enabled = True
    config.demo.update(SIZES[arg.size])
    config.posts.manifest = '{workdir}/world/posts.jsonl'
    # The world is generated clean: a rejected row would be a bug in the generator.
    config.ingest.on_error = 'fail'
    config.ingest.rows_per_shard = 1000

    # Comments name the pictured object often enough for their clusters to carry it (NMI with
    # the object 0.40 at this rate, 0.15 at the world's default 0.3), as real comments do.
    config.demo.world.object_mention_rate = 0.6
    # Six moods and ten objects: a few clusters per mood, and a finer granularity.
    config.cluster.comment_ks = (16, 64)
    config.cluster.reaction_ks = (8,)
    config.cluster.latents = '{workdir}/world/latents.csv'
    config.embed.chunk_size = 4096
    if arg.size == 'tiny':  # ~130 comments, ~45 posts with reactions
        config.cluster.comment_ks = (4, 8)
        config.cluster.reaction_ks = (3,)

    # A ResNet-18 of a quarter of torchvision's width at 64 px: ~0.3 s a step on 2 CPU cores
    # (full width is ~8 s: XLA:CPU's convolutions, see bench/README.md).
    config.input.image_size = 64
    config.input.global_batch_size = 128
    config.input.num_workers = 2
    config.input.eval_fraction = 0.1
    config.model.name = 'resnet18'
    config.model.width = 16
    config.model.compute_dtype = 'float32'   # bf16 matmuls are slow on most CPUs
    config.optim.base_lr = 0.2
    config.train.epochs = 10
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100

    # The paper's comparison: VisE vs the same ResNet supervised on the posts' objects vs random
    # weights, each probed on the subjective task (mood) and the objective one (object).
    config.experiment.baselines = ('supervised', 'random')
    config.experiment.supervised_labels = '{workdir}/world/latents.csv:object'
    config.eval.train = 'csv:{workdir}/world/downstream/train.csv'
    config.eval.test = 'csv:{workdir}/world/downstream/test.csv'
    config.eval.batch_size = 250
    if arg.size == 'tiny':  # a handful of steps of a narrow ResNet-18, for tests
        config.input.image_size = 32
        config.input.global_batch_size = 16
        config.input.num_workers = 0
        config.input.eval_fraction = 0.2
        config.model.width = 8
        config.train.epochs = 2
        config.train.log_every_steps = 1
        config.train.eval_every_steps = 2
        config.train.checkpoint_every_steps = 2
    if arg.sweep:
        config.experiment.seeds = (0, 1, 2)
        config.experiment.variants = ABLATIONS
        if arg.size == 'default':   # 27 trainings: half the posts keeps it near half an hour
            config.demo.num_pretrain = 2000
        else:                       # tests: two seeds, two variants
            config.experiment.seeds = (0, 1)
            config.experiment.variants = {'comments_only': ABLATIONS['comments_only']}
    return config
