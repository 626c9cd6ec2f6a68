"""The command line shared by the launch scripts: --config, --workdir, --help and clean errors.

Each launch script is one line that names the stages it runs; all of them take

  --config=configs/demo.py[:variant]   the experiment (ml_collections config file)
  --config.some.key=value              overrides, type-checked against the config
  --workdir=DIR                        where every stage writes its output

`--help` lists these flags and the config's sections. A mistake on the command line (a config
file that is missing or raises, an unknown override key, with the closest keys, a bad value) is
one line, `error: ...`, exit status 2, checked before anything is imported or created; so is
bad input found by a stage (vise_jax.errors.InputError, TrainingError), and a workdir another
run holds (vise_jax/workdir_lock.py).

Multi-process runs (TPU pods, multi-GPU clusters) start `jax.distributed` from the environment
(TPU pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) or from --coordinator_address,
--num_processes and --process_id; only process 0 logs at INFO level.
"""

import difflib
import importlib.util
import logging
import os
import re
import shlex
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Sequence

from absl import app, flags
from ml_collections import config_dict, config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/demo.py:size=tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for every stage output; one run at a time (a second run on it '
    'stops at once, naming the first).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0, for a multi-process run started by hand '
    '(clusters and TPU pods are detected from the environment).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
_TIMEOUT_S = flags.DEFINE_integer(
    'distributed_timeout_s', None, 'Multi-process runs: seconds a process waits for the others '
    'to join, to answer and at barriers (default: JAX\'s 300 s); raise it on slow starts.')
flags.mark_flags_as_required(['config', 'workdir'])

USAGE_ERROR = 2

# One line per top-level key of configlib.default_config() (tests/test_cli.py keeps them in step).
SECTIONS = {
    'seed': 'the seed of everything random: demo world, k-means, initial weights, data order, '
            'augmentation, probe splits',
    'demo': 'the synthetic social world, written to {workdir}/world as posts when enabled',
    'posts': 'where the posts come from: JSONL manifest(s), image root, reaction types',
    'ingest': 'validating the posts into {workdir}/posts: bad rows, shard size, threads',
    'embed': 'comment embeddings in {workdir}/embeddings: encoder, dtype, batch and chunk sizes',
    'cluster': 'k-means pseudo labels in {workdir}/labels: K per head, sample, init, report',
    'input': 'the training input: image size, global batch, workers, heads, crops, bad images',
    'model': 'the ResNet: depth (name), width, dtypes',
    'optim': 'SGD: learning rate per 256 images, momentum, weight decay, warm-up',
    'train': 'training in {workdir}/train: epochs, logging, eval, checkpoints, resume, init',
    'export': 'the backbone export for evaluation: source, step, output, torchvision files',
    'eval': 'linear probes: exports, downstream train/test sets, C grid, feature batches',
    'experiment': "the paper's baselines (supervised, random) and the supervised classes; "
                  'seeds and variants of a sweep (launch/sweep.py)',
    'mesh': 'the device mesh: data and fsdp axis sizes (-1 takes the remaining devices)',
}

# The sections each stage reads: a tie between suggested keys goes to these.
_READS = {
    'demo_world': ('demo', 'seed'), 'ingest': ('posts', 'ingest'), 'embed': ('embed', 'mesh'),
    'cluster': ('cluster', 'mesh', 'seed'),
    'train': ('input', 'model', 'optim', 'train', 'mesh', 'seed'), 'export': ('export',),
    'baselines': ('experiment', 'input', 'model', 'optim', 'train'),
    'linear_eval': ('eval', 'input', 'experiment'),
}

_HELP_FLAGS = ('--help', '-help', '-h', '--helpshort', '-helpshort', '-?')
_SCRIPTS = {'demo_world': 'generate_demo'}   # launch/<script>.py per stage, when not its name


def fail(message: str) -> None:
    """One line on stderr and exit status 2: a usage error, no traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _flag_args(argv: Sequence[str]) -> Iterator[str]:
    for arg in argv[1:]:
        if arg == '--':
            return
        yield arg


def help_text(stages: Sequence[str]) -> str:
    from vise_jax import configlib  # light: no JAX

    doc = (sys.modules['__main__'].__doc__ or '').strip()
    rows = [
        ('--config=FILE[:VARIANT]', flags.FLAGS['config'].help + ' Required.'),
        ('--config.SECTION.KEY=VALUE', 'Override one key of the config (type-checked against '
                                       'its default; repeatable).'),
        ('--workdir=DIR', flags.FLAGS['workdir'].help + ' Required.'),
        ('--coordinator_address=HOST:PORT', flags.FLAGS['coordinator_address'].help),
        ('--num_processes=N --process_id=I', flags.FLAGS['num_processes'].help),
        ('--distributed_timeout_s=S', flags.FLAGS['distributed_timeout_s'].help),
        ('--help, --helpfull', "This text; --helpfull adds every flag of absl and JAX."),
    ]
    lines = [doc, '', f'Stages run by this script: {", ".join(stages)}.', '', 'Flags:']
    for syntax, text in rows:
        lines += [f'  {syntax}', textwrap.fill(text, 96, initial_indent=' ' * 6,
                                               subsequent_indent=' ' * 6)]
    lines += ['', textwrap.fill('Config sections (override a key with '
                                '--config.SECTION.KEY=VALUE; every key, its default and a '
                                'comment: vise_jax/configlib.py):', 96)]
    keys = list(configlib.default_config())
    for key in [key for key in SECTIONS if key in keys] + sorted(set(keys) - set(SECTIONS)):
        lines.append(textwrap.fill(SECTIONS.get(key, ''), 96, initial_indent=f'  {key:<11} ',
                                   subsequent_indent=' ' * 14))
    return '\n'.join(lines)


def _one_line(error: BaseException, path: str) -> str:
    """An exception raised by a config file, with where it was raised, as one line."""
    message = ' '.join(str(error).split()) or type(error).__name__
    if isinstance(error, SyntaxError):
        return f'{message} ({type(error).__name__})'
    frames = traceback.extract_tb(error.__traceback__)
    inside = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
    frame = (inside or frames or [None])[-1]
    where = f' at {os.path.relpath(frame.filename)}:{frame.lineno}' if frame else ''
    return f'{message} ({type(error).__name__}{where})'


def load_config(spec: str) -> config_dict.ConfigDict:
    """Loads --config=FILE[:ARG] as config_flags does; any failure is one line and exit 2."""
    path, colon, arg = spec.partition(':')
    if not path:
        fail('--config= names no file (e.g. --config=configs/demo.py)')
    if not os.path.isfile(path):
        where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        fail(f'--config={spec}: no such config file: {path}{where}')
    module_spec = importlib.util.spec_from_file_location('_vise_config_check', path)
    if module_spec is None:
        fail(f'--config={spec}: {path} is not a Python file')
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, 'get_config', None)):
            fail(f'--config={spec}: {path} defines no get_config(arg)')
        config = module.get_config(arg) if colon else module.get_config()
    except Exception as e:
        fail(f'--config={spec}: {_one_line(e, path)}')
    if not isinstance(config, config_dict.ConfigDict):
        fail(f'--config={spec}: get_config returned {type(config).__name__}, not a ConfigDict')
    return config


def dotted_keys(config, prefix: str = '') -> Iterator[str]:
    """Every key of the config, sections included: 'train', 'train.epochs', ..."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, config_dict.ConfigDict | dict):
            yield from dotted_keys(value, f'{prefix}{key}.')


def closest_keys(name: str, keys: Sequence[str], reads: Sequence[str] = (),
                 limit: int = 3) -> list[str]:
    """The keys closest to a mistyped one, by the whole dotted path or by its last part.

    The last part also matches the tail of a key's last part ('batch_sise' finds
    'global_batch_size'); among equals, keys of the sections in `reads` come first.
    """
    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    last = name.rsplit('.', 1)[-1]

    def score(key: str) -> tuple[float, bool, float]:
        parts = key.rsplit('.', 1)[-1].split('_')
        tails = ('_'.join(parts[i:]) for i in range(len(parts)))
        whole = ratio(name, key)
        return max(whole, *(ratio(last, tail) for tail in tails)), key.split('.')[0] in reads, whole

    scored = sorted(((score(key), key) for key in keys), reverse=True)
    if not scored:
        return []
    best = scored[0][0][0]
    return [key for (value, _, _), key in scored if value >= max(0.6, best - 0.1)][:limit]


def check_overrides(config: config_dict.ConfigDict, argv: Sequence[str],
                    stages: Sequence[str]) -> None:
    """Every --config.a.b override must name a key of the config: else one line with the
    closest keys, exit 2 (ml_collections would raise a long AttributeError)."""
    keys = list(dotted_keys(config))
    known = set(keys)
    reads = {section for stage in stages for section in _READS.get(stage, ())}
    for arg in _flag_args(argv):
        match = re.match(r'^--?(?:no)?config\.([^=]*)', arg)
        if not match:
            continue
        path = match.group(1)
        if re.sub(r'\[[^\]]*\]', '', path) in known:
            continue
        near = [f'config.{key}' for key in closest_keys(path, keys, tuple(reads))]
        hint = ('; did you mean ' + ', '.join(near[:-1]) + (' or ' if len(near) > 1 else '')
                + near[-1] + '?') if near else ''
        fail(f'--config.{path}: the config has no key {path!r}{hint} (see --help)')


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of the last --config=... / --config ... on the command line, if any."""
    spec, args = None, list(_flag_args(argv))
    for i, arg in enumerate(args):
        match = re.match(r'^--?config(=(.*))?$', arg)
        if match:
            spec = match.group(2) if match.group(1) else (args[i + 1] if i + 1 < len(args)
                                                          else None)
    return spec


def parse_flags(argv: Sequence[str], stages: Sequence[str]) -> list[str]:
    """--help, then the config file and override keys, then absl's own parsing: every mistake
    is one line and exit 2."""
    args = list(_flag_args(argv))
    if any(arg in _HELP_FLAGS for arg in args):
        print(help_text(stages))
        sys.exit(0)
    if any(arg in ('--helpfull', '-helpfull') for arg in args):
        print(help_text(stages) + '\n\nEvery flag:\n' + flags.FLAGS.get_help())
        sys.exit(0)
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    spec = _config_spec(argv)
    if spec is not None:
        check_overrides(load_config(spec), argv, stages)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f'{" ".join(str(e).split())} (see --help)')


def launch_command(argv: Sequence[str]) -> Callable[[str], str]:
    """stage -> the command that runs it, with this command's flags (for error messages)."""
    launch_dir = os.path.dirname(argv[0])
    args = shlex.join(list(argv[1:]))

    def command(stage: str) -> str:
        script = os.path.join(launch_dir, f'{_SCRIPTS.get(stage, stage)}.py')
        pipeline = os.path.join(launch_dir, 'pipeline.py')
        return (f'the {stage} stage: python {script} {args} ({pipeline} runs every stage in '
                'order)')

    return command


def run_stages(stages: Sequence[str], sweep: bool = False) -> None:
    """Parses the command line and runs `stages` (with `sweep`, every stage once per seed and
    variant: vise_jax/sweep.py); bad input exits with its message, no trace."""
    argv = list(sys.argv)

    def main(rest: Sequence[str]) -> None:
        if len(rest) > 1:
            fail(f'unexpected arguments: {" ".join(rest[1:])} (see --help)')
        # The heavy imports come after the command line is known to be good.
        import jax

        from vise_jax import distributed
        from vise_jax import inputs as input_lib
        from vise_jax import stages as stages_lib
        from vise_jax.errors import InputError, TrainingError

        # Orbax and Grain log every save and worker event through absl at INFO: keep warnings.
        for noisy in ('absl', 'jax'):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               timeout_s=_TIMEOUT_S.value)
        logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
        try:
            if sweep:
                from vise_jax import sweep as sweep_lib
                sweep_lib.run_sweep(_CONFIG.value, _WORKDIR.value, command=launch_command(argv))
            else:
                stages_lib.run(_CONFIG.value, _WORKDIR.value, stages, command=launch_command(argv))
        except (InputError, TrainingError) as e:
            fail(str(e))
        finally:
            input_lib.release_shared_memory()

    app.run(main, argv=argv, flags_parser=lambda args: parse_flags(args, stages))
