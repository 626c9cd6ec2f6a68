"""Memory and time of each stage against the number of posts N.

  python bench/scale_bench.py --sizes 50000,200000,1000000 [--out /tmp/scale_bench]
  python bench/scale_bench.py --sizes 10000,40000 --stages ingest,embed --keep

For each N, writes (once, cached in --out) a synthetic manifest of N text-heavy posts: a
negative-binomial number of comments per post (mean --comments-per-post) of realistic length
(log-normal word counts, Zipf words, a topic per post), reactions on most posts, and one of 64
small JPEGs shared round-robin, so the disk stays small. Then runs each stage in its own fresh
process, as a user would, with configs/scale_bench.py (sentencepiece TF-IDF encoder, K = 16, 64
and 8, fit sample 20k, ResNet-18 of width 8 at 32 px):

  ingest       python launch/ingest.py    (config.ingest.runner='local' where that key exists)
  ingest_beam  python launch/ingest.py --config.ingest.runner=beam (Beam's FnApiRunner in the
               stage's process unless --beam-options names other runner options, e.g. local
               worker processes; PrismRunner downloads a binary, so it is not the default). Only
               where apache_beam imports in --beam-python and the config has the key.
  embed        python launch/embed.py
  cluster      python launch/cluster.py
  train        the first --train-steps steps of the training run (this script in --child mode:
               train_loop.build_run, i.e. label store loading, the Grain chain with its worker
               processes, model and jitted step; then next(iterator) + train_step)

and measures each one's wall time (start of the process to its exit: imports and JAX compiles
included), the stage's own time (its 'done in X s' log line), the CPU time of the process and
the descendants it reaped (os.wait4), and peak RSS: `rss` is the peak of the largest single
process (the stage's process, from os.wait4's ru_maxrss, or any descendant seen while polling),
`tree` the peak of the summed RSS of the process and all its descendants (Grain workers, Beam
workers), polled every --poll seconds with psutil (/proc if psutil is missing). Shared pages of
forked workers are counted once per process in `tree`.

Goals printed (the peer here is N itself; ingest is also compared with ingest_beam):
  * peak RSS flat in N: largest N / smallest N <= 1.3 for every stage (k-means' O(K D) state is
    tiny at these K); with the bytes of peak RSS per extra post between the two largest sizes,
    since a process's fixed 0.4-0.6 GB (Python, JAX) hides growth at small N;
  * time linear in N: CPU seconds per post at the largest N / at the smallest <= 1.3, and with
    3+ sizes the marginal CPU cost per post, last pair of sizes against the first pair, <= 1.3
    (wall time is printed too; on a shared machine it follows the load). The train stage does a
    fixed number of steps, so its time should be flat, not linear.

--code DIR runs another tree's launch/ scripts and vise_jax (DIR first on PYTHONPATH), e.g. the
committed tree from `git archive HEAD`, to measure the code before a change beside it.

Output in --out: manifests/ (cached by N), work/n<N>/ (stage outputs: kept with --keep, else
each stage's output is removed before it runs), logs/, results.json (every measurement, merged
across runs: a stage not rerun keeps its earlier figures; each with its date, load and code
state), scale_bench.png (peak RSS, wall and CPU time against N per stage, log x) and table.md
(the printed table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = 'configs/scale_bench.py'
NUM_IMAGES = 64
BLOCK = 10_000                # posts per generator block; block b has its own seed, so the
                              # first N posts are the same whatever the largest N
STAGES = ('ingest', 'ingest_beam', 'embed', 'cluster', 'train')
OUTPUT_DIR = {'ingest': 'posts', 'ingest_beam': 'posts', 'embed': 'embeddings',
              'cluster': 'labels', 'train': 'train'}
NEEDS = {'embed': ('ingest',), 'cluster': ('ingest', 'embed'),
         'train': ('ingest', 'embed', 'cluster')}
GENERATOR_VERSION = 1
RSS_GOAL = 1.3
TIME_GOAL = 1.3
MB = 1 << 20


# --- the synthetic manifest -------------------------------------------------------------------

_SYLLABLES = ['ka', 'ri', 'to', 'mu', 'na', 'shi', 'lo', 've', 'pa', 'de', 'so', 'mi', 'ru',
              'ba', 'ne', 'ko', 'ta', 'lu', 'gi', 'fe', 'wo', 'ya', 'ze', 'po', 'hi', 'ju', 'sa',
              'me', 'ni', 'do']
_EXTRAS = ['!!', '?', 'lol', 'omg', 'haha', '😍', '😂', '❤️', '👍', '🔥', '😢', '...', 'wow', 'so',
           'the', 'a', 'is', 'this', 'I', 'you', 'it', 'and', 'love', 'cute', 'sad', 'great']


def _vocabulary(size: int = 4000) -> np.ndarray:
    rng = np.random.default_rng(1234)
    words = list(_EXTRAS)
    seen = set(words)
    while len(words) < size:
        word = ''.join(rng.choice(_SYLLABLES, rng.integers(1, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return np.array(words, dtype=object)


def _block_rows(block: int, count: int, vocab: np.ndarray, mean_comments: float,
                seed: int) -> tuple[list[str], int]:
    """`count` JSON lines of posts block * BLOCK ... and their number of comments; the same
    bytes for the same block."""
    rng = np.random.default_rng([seed, block])
    num_topics, topic_words = 32, 120
    zipf = 1.0 / (np.arange(len(vocab)) + 3.0) ** 1.05
    zipf /= zipf.sum()
    topic_sets = np.random.default_rng([seed, 999_999]).integers(
        len(_EXTRAS), len(vocab), (num_topics, topic_words))
    topics = rng.integers(0, num_topics, count)
    # Comments per post: negative binomial (about 1 post in 8 has none, a long tail).
    shape = 1.2
    comments = np.minimum(rng.negative_binomial(shape, shape / (shape + mean_comments), count), 60)
    total = int(comments.sum())
    # Words per comment: log-normal, median ~9, mean ~12 (~60-80 characters), 1 to 80.
    lengths = np.clip(np.round(rng.lognormal(2.2, 0.75, total)).astype(int), 1, 80)
    word_topic = np.repeat(np.repeat(topics, comments), lengths)
    background = rng.choice(len(vocab), size=int(lengths.sum()), p=zipf)
    on_topic = rng.random(len(background)) < 0.35
    topical = topic_sets[word_topic, rng.integers(0, topic_words, len(background))]
    words = vocab[np.where(on_topic, topical, background)]
    # Reactions: 85 % of posts; totals log-normal; a mix leaning on the topic's mood.
    reacted = rng.random(count) < 0.85
    totals = np.where(reacted, np.ceil(rng.lognormal(2.5, 1.3, count)), 0).astype(int)
    mood = np.random.default_rng([seed, 888_888]).dirichlet(np.full(7, 0.6), num_topics)
    mixes = np.stack([rng.dirichlet(20 * mood[t] + 0.05) for t in topics])
    counts = np.stack([rng.multinomial(t, m) for t, m in zip(totals, mixes, strict=True)])
    types = ('like', 'love', 'haha', 'wow', 'sad', 'angry', 'care')

    rows, w, c = [], 0, 0
    for i in range(count):
        index = block * BLOCK + i
        texts = []
        for length in lengths[c:c + comments[i]]:
            texts.append(' '.join(words[w:w + length]))
            w += length
        c += comments[i]
        reactions = {t: int(n) for t, n in zip(types, counts[i], strict=True) if n}
        rows.append(json.dumps({'id': f'p{index:08d}',
                                'image': f'images/img{index % NUM_IMAGES:02d}.jpg',
                                'comments': texts, 'reactions': reactions}, ensure_ascii=False))
    return rows, total


def _write_images(folder: Path) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(NUM_IMAGES):
        path = folder / f'img{i:02d}.jpg'
        if path.exists():
            continue
        y, x = np.mgrid[0:72, 0:96] / 96.0
        base = rng.random((3, 3)) * 255
        pixels = (base[:, 0, None, None] + base[:, 1, None, None] * x + base[:, 2, None, None] * y)
        pixels = pixels.transpose(1, 2, 0) / 2 + rng.normal(0, 12, (72, 96, 3))
        tmp = path.with_suffix('.tmp')
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, 'JPEG', quality=85)
        tmp.rename(path)


def write_manifest(out: Path, n: int, mean_comments: float, seed: int) -> Path:
    """out/manifests/posts-<n>.jsonl (+ its description), written once per (n, settings)."""
    folder = out / 'manifests'
    _write_images(folder / 'images')
    path = folder / f'posts-{n}.jsonl'
    describe = {'version': GENERATOR_VERSION, 'posts': n, 'mean_comments': mean_comments,
                'seed': seed, 'images': NUM_IMAGES}
    info = path.with_suffix('.json')
    if path.exists() and info.exists() and json.loads(info.read_text())['settings'] == describe:
        return path
    start = time.perf_counter()
    vocab = _vocabulary()
    tmp = path.with_suffix('.tmp')
    num_comments = 0
    with open(tmp, 'w', encoding='utf-8') as f:
        for block in range(0, (n + BLOCK - 1) // BLOCK):
            rows, comments = _block_rows(block, min(BLOCK, n - block * BLOCK), vocab,
                                         mean_comments, seed)
            num_comments += comments
            f.write('\n'.join(rows) + '\n')
    tmp.rename(path)
    info.write_text(json.dumps({'settings': describe, 'bytes': path.stat().st_size,
                                'comments': num_comments}, indent=1))
    print(f'  wrote {path} ({path.stat().st_size / MB:.0f} MB, {num_comments} comments) in '
          f'{time.perf_counter() - start:.0f} s', flush=True)
    return path


# --- measuring one process tree ---------------------------------------------------------------

def _tree_rss(pid: int) -> tuple[int, int]:
    """(summed RSS, largest single RSS) in bytes of pid and its descendants, now."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0, 0
        sizes = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                sizes.append(p.memory_info().rss)
        return sum(sizes), max(sizes, default=0)
    # /proc fallback: walk children through /proc/<pid>/task/*/children.
    sizes, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f'/proc/{p}/status').read_text()
            rss = next(int(line.split()[1]) * 1024 for line in status.splitlines()
                       if line.startswith('VmRSS:'))
            sizes.append(rss)
            for task in Path(f'/proc/{p}/task').iterdir():
                todo += [int(c) for c in (task / 'children').read_text().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return sum(sizes), max(sizes, default=0)


def measure(command: list[str], log_path: Path, poll: float, env: dict,
            cwd: Path = REPO) -> dict:
    """Runs `command` as a fresh process; wall time, exit status, peak RSS (single, tree)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with open(log_path, 'w') as log:
        log.write(' '.join(command) + '\n\n')
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        tree_peak = single_peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree, single = _tree_rss(proc.pid)
            tree_peak, single_peak = max(tree_peak, tree), max(single_peak, single)
            time.sleep(poll)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss (KiB on Linux): the child's own peak, or a reaped descendant's if larger.
    rss = max(usage.ru_maxrss * 1024, single_peak)
    return {'seconds': seconds, 'returncode': proc.returncode, 'rss_mb': rss / MB,
            'tree_mb': max(tree_peak, rss) / MB, 'cpu_s': usage.ru_utime + usage.ru_stime,
            'load_before': load_before, 'load_after': os.getloadavg()[0]}


def _du_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / MB


# --- the train child: the first steps of the training run --------------------------------------

def _apply_overrides(config, overrides: dict) -> None:
    for key, value in overrides.items():
        *groups, leaf = key.split('.')
        node = config
        for group in groups:
            node = node[group]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], tuple) else value


def child_train(args) -> None:
    sys.path.insert(0, str(REPO / 'bench'))
    import jax
    from config_loader import load_config

    from vise_jax import configlib
    from vise_jax.train import loop as train_loop
    try:
        from vise_jax import inputs as input_lib
    except ImportError:   # the package's name before 2026-12 (for --code of an older tree)
        from vise_jax import input as input_lib

    overrides = json.loads(args.overrides)
    config = load_config(CONFIG)   # vise_jax from --code's tree (PYTHONPATH), this file's config
    _apply_overrides(config, overrides)
    workdir = Path(args.workdir)
    if hasattr(configlib, 'with_workdir'):   # older trees expand '{workdir}' where it is read
        config = configlib.with_workdir(config, workdir)
    times = {}
    start = time.perf_counter()
    run = train_loop.build_run(config, workdir)
    times['build_s'] = time.perf_counter() - start
    iterator = run.train_data.iterator()
    state = run.state
    try:
        start = time.perf_counter()
        for step in range(args.steps):
            local = next(iterator)
            state, metrics = run.train_step(state, input_lib.global_batch(local, run.mesh))
            if step == 0:
                jax.block_until_ready(metrics)
                times['first_step_s'] = time.perf_counter() - start
                start = time.perf_counter()
        loss = float(jax.device_get(metrics['loss']))
        times['later_steps_s'] = time.perf_counter() - start
    finally:
        iterator.close()
        input_lib.release_shared_memory()
    print('CHILD_RESULT ' + json.dumps({**times, 'steps': args.steps, 'loss': loss,
                                        'posts': run.train_data.num_examples}), flush=True)


# --- the driver -------------------------------------------------------------------------------

def _imports(python: str, module: str) -> bool:
    return subprocess.run([python, '-c', f'import {module}'], capture_output=True,
                          cwd=REPO).returncode == 0


def _beam_python(requested: str) -> str | None:
    for candidate in filter(None, [requested, sys.executable, '/work/beam-venv/bin/python']):
        if Path(candidate).exists() and _imports(candidate, 'apache_beam'):
            return candidate
    return None


def stage_command(stage: str, python: str, workdir: Path, overrides: dict,
                  train_steps: int, code: Path = REPO) -> list[str]:
    if stage == 'train':
        return [python, str(REPO / 'bench' / 'scale_bench.py'), '--child', 'train',
                '--workdir', str(workdir), '--steps', str(train_steps),
                '--overrides', json.dumps(overrides)]
    script = 'ingest' if stage.startswith('ingest') else stage
    return ([python, str(code / 'launch' / f'{script}.py'), f'--config={REPO / CONFIG}',
             f'--workdir={workdir}']
            + [f'--config.{k}={v}' for k, v in overrides.items()])


def code_state(code: Path = REPO) -> str:
    """HEAD and a digest of the uncommitted changes to the library, launch scripts and configs:
    others edit the code while benchmarks run, so each figure records what it ran."""
    if not (code / '.git').exists():
        return f'tree {code}'
    def git(*argv):
        return subprocess.run(['git', *argv], cwd=code, capture_output=True).stdout
    head = git('rev-parse', '--short=10', 'HEAD').decode().strip()
    diff = git('diff', 'HEAD', '--', 'vise_jax', 'launch', 'configs')
    return f'{head}+{hashlib.sha1(diff).hexdigest()[:8]}' if diff else head


def run_size(n: int, args, results: dict, beam_python: str | None, has_runner: bool) -> None:
    manifest = write_manifest(args.out, n, args.comments_per_post, args.seed)
    workdir = args.out / 'work' / f'n{n}'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu'}
    if args.code != REPO:   # its vise_jax before the installed (editable) one
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(args.code),
                                                          env.get('PYTHONPATH')]))
    wanted = [s for s in STAGES if s in args.stages]
    todo = []
    for stage in wanted:
        for need in NEEDS.get(stage, ()):
            if need not in todo and not (workdir / OUTPUT_DIR[need] / 'stage.json').exists():
                todo.append(need)
        if stage not in todo:
            todo.append(stage)
    todo.sort(key=STAGES.index)
    for stage in todo:
        key = f'{stage}/{n}'
        where = workdir if stage != 'ingest_beam' else args.out / 'work' / f'n{n}-beam'
        output = where / OUTPUT_DIR[stage]
        if stage == 'ingest_beam' and beam_python is None:
            print(f'  {stage} N={n}: skipped (apache_beam does not import)', flush=True)
            continue
        if stage == 'ingest_beam' and not has_runner:
            print(f'  {stage} N={n}: skipped (the config has no ingest.runner key yet)', flush=True)
            continue
        if args.keep and (output / 'stage.json').exists() and stage != 'train':
            print(f'  {stage} N={n}: kept from an earlier run '
                  f'({"figures kept" if key in results else "no figures"})', flush=True)
            continue
        if output.exists():
            shutil.rmtree(output)
        overrides = {'posts.manifest': str(manifest)}
        if has_runner:
            overrides['ingest.runner'] = 'beam' if stage == 'ingest_beam' else 'local'
        if stage == 'ingest_beam' and args.beam_options:
            overrides['ingest.beam_options'] = args.beam_options
        python = beam_python if stage == 'ingest_beam' else args.python
        command = stage_command(stage, python, where, overrides, args.train_steps, args.code)
        log_path = args.out / 'logs' / f'n{n}-{stage}.log'
        print(f'  {stage} N={n} ...', end=' ', flush=True)
        code = code_state(args.code)
        result = measure(command, log_path, args.poll, env, cwd=args.code)
        result.update(stage=stage, n=n, output_mb=_du_mb(output),
                      date=datetime.datetime.now().isoformat(timespec='seconds'))
        result['code'] = code
        log_text = log_path.read_text(errors='replace')
        done = re.search(r'\] ingest: done in ([0-9.]+) s' if stage.startswith('ingest')
                         else rf'\] {stage}: done in ([0-9.]+) s', log_text)
        if done:   # the stage's own time, without the process start and imports
            result['stage_s'] = float(done.group(1))
        for line in log_text.splitlines():
            if line.startswith('CHILD_RESULT '):
                result['train'] = json.loads(line[len('CHILD_RESULT '):])
                result['stage_s'] = sum(result['train'][k] for k in
                                        ('build_s', 'first_step_s', 'later_steps_s'))
        if stage == 'ingest_beam' and not args.keep:
            shutil.rmtree(where, ignore_errors=True)
        print(f'{result["seconds"]:.1f} s, peak RSS {result["rss_mb"]:.0f} MB '
              f'(tree {result["tree_mb"]:.0f} MB), exit {result["returncode"]}', flush=True)
        if result['returncode'] != 0:
            tail = log_path.read_text(errors='replace').splitlines()[-15:]
            print('    failed; log tail:\n      ' + '\n      '.join(tail), flush=True)
        results[key] = result
        _save_results(args.out, results)
        if result['returncode'] != 0 and stage in ('ingest', 'embed', 'cluster'):
            print(f'  N={n}: later stages need {stage}; stopping this N', flush=True)
            return


def _save_results(out: Path, results: dict) -> None:
    tmp = out / 'results.json.tmp'
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.rename(out / 'results.json')


def _time_verdict(rows: list, key: str, flat_time: bool) -> tuple[str, bool]:
    """'x<ratio>, per post x<ratio>[, marginal per post x<ratio>]' of `key`, and whether it
    meets the goal (flat for the train stage, linear in N for the others)."""
    (n0, r0), (n1, r1) = rows[0], rows[-1]
    ratio = r1[key] / r0[key]
    per_post = (r1[key] / n1) / (r0[key] / n0)
    text = f'x{ratio:.2f}, per post x{per_post:.2f}'
    if flat_time:
        return text, ratio <= TIME_GOAL
    ok = per_post <= TIME_GOAL
    if len(rows) >= 3:
        # Fixed costs (start-up, imports, compiles) flatter the per-post ratio; the cost of each
        # further post, last pair of sizes against the first pair, does not hide a superlinear
        # part.
        (na, ra), (nb, rb), (nc, rc), (nd, rd) = rows[0], rows[1], rows[-2], rows[-1]
        first = (rb[key] - ra[key]) / (nb - na)
        last = (rd[key] - rc[key]) / (nd - nc)
        if first > 0:
            text += f', marginal per post x{last / first:.2f}'
            ok = ok and last / first <= TIME_GOAL
    return text, ok


def report(results: dict, sizes: list[int], stages: list[str]) -> str:
    """The markdown table and the goal lines."""
    lines = ['| stage | N | wall s | in-stage s | CPU s | wall us/post | CPU us/post '
             '| marginal CPU us/post | peak RSS MB | tree RSS MB | RSS / smallest N '
             '| wall / smallest N | CPU / smallest N | output MB |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    verdicts = []
    for stage in stages:
        rows = [(n, results[f'{stage}/{n}']) for n in sizes
                if f'{stage}/{n}' in results and results[f'{stage}/{n}']['returncode'] == 0]
        failed = [n for n in sizes if f'{stage}/{n}' in results
                  and results[f'{stage}/{n}']['returncode'] != 0]
        for n in failed:
            code = results[f'{stage}/{n}']['returncode']
            lines.append(f'| {stage} | {n:,} | failed (exit {code}) |' + ' |' * 11)
        if not rows:
            continue
        n0, r0 = rows[0]
        previous = None
        for n, r in rows:
            in_stage = f'{r["stage_s"]:.1f}' if 'stage_s' in r else ''
            marginal = (f'{(r["cpu_s"] - previous[1]["cpu_s"]) / (n - previous[0]) * 1e6:.0f}'
                        if previous else '')
            lines.append(
                f'| {stage} | {n:,} | {r["seconds"]:.1f} | {in_stage} | {r["cpu_s"]:.1f} | '
                f'{r["seconds"] / n * 1e6:.0f} | {r["cpu_s"] / n * 1e6:.0f} | {marginal} | '
                f'{r["rss_mb"]:.0f} | {r["tree_mb"]:.0f} | {r["rss_mb"] / r0["rss_mb"]:.2f} | '
                f'{r["seconds"] / r0["seconds"]:.2f} | {r["cpu_s"] / r0["cpu_s"]:.2f} | '
                f'{r["output_mb"]:.0f} |')
            previous = (n, r)
        if len(rows) < 2:
            continue
        n1, r1 = rows[-1]
        rss_ratio = r1['rss_mb'] / r0['rss_mb']
        tree_ratio = r1['tree_mb'] / r0['tree_mb']
        flat_time = stage == 'train'
        wall, _ = _time_verdict(rows, 'seconds', flat_time)
        cpu, cpu_ok = _time_verdict(rows, 'cpu_s', flat_time)
        flat = max(rss_ratio, tree_ratio) <= RSS_GOAL
        goal = (f'flat (fixed number of steps), <= {TIME_GOAL}' if flat_time
                else f'linear: per-post (and marginal) ratio <= {TIME_GOAL}')
        # At small N the fixed ~0.4-0.6 GB of an interpreter with JAX hides growth: the bytes
        # of peak RSS per extra post between the two largest sizes say what more posts cost.
        nc, rc = rows[-2]
        per_post_bytes = (r1['rss_mb'] - rc['rss_mb']) * MB / (n1 - nc)
        verdicts.append(
            f'* {stage}, N {n0:,} -> {n1:,} (x{n1 / n0:g}): peak RSS x{rss_ratio:.2f} '
            f'(tree x{tree_ratio:.2f}) [{"flat" if flat else "GROWS"}, goal <= {RSS_GOAL}], '
            f'{per_post_bytes:+.0f} B per post from N={nc:,} '
            f'({per_post_bytes * 250e6 / 2 ** 30:+.0f} GiB at 250M posts); '
            f'CPU time {cpu} [{"ok" if cpu_ok else "NOT MET"}, goal {goal}]; wall time {wall}')
    for n in sizes if {'ingest', 'ingest_beam'} <= set(stages) else ():
        local, beam = results.get(f'ingest/{n}'), results.get(f'ingest_beam/{n}')
        if local and beam and local['returncode'] == 0 and beam['returncode'] == 0:
            verdicts.append(f'* ingest on Beam / single-process ingest at N={n:,}: wall time '
                            f'x{beam["seconds"] / local["seconds"]:.2f}, CPU time '
                            f'x{beam["cpu_s"] / local["cpu_s"]:.2f}, peak RSS '
                            f'x{beam["rss_mb"] / local["rss_mb"]:.2f}, tree RSS '
                            f'x{beam["tree_mb"] / local["tree_mb"]:.2f}')
    for n in sizes if 'train' in stages else ():
        train = results.get(f'train/{n}', {}).get('train')
        if train:
            verdicts.append(
                f'* train N={n:,}: build (labels, Grain chain, model, jit) {train["build_s"]:.1f} s'
                f', first step {train["first_step_s"]:.1f} s, next {train["steps"] - 1} steps '
                f'{train["later_steps_s"]:.1f} s')
    return '\n'.join(lines + [''] + verdicts)


def plot(results: dict, sizes: list[int], stages: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_rss, ax_wall, ax_cpu) = plt.subplots(1, 3, figsize=(17, 4.8))
    for stage in stages:
        rows = [(n, results[f'{stage}/{n}']) for n in sizes
                if results.get(f'{stage}/{n}', {}).get('returncode') == 0]
        if not rows:
            continue
        ns = [n for n, _ in rows]
        line, = ax_rss.plot(ns, [r['rss_mb'] for _, r in rows], 'o-', label=stage)
        color = line.get_color()
        ax_rss.plot(ns, [r['tree_mb'] for _, r in rows], 'o:', color=color, alpha=0.6)
        for ax, key in ((ax_wall, 'seconds'), (ax_cpu, 'cpu_s')):
            ax.plot(ns, [r[key] for _, r in rows], 'o-', color=color, label=stage)
            if len(rows) > 1 and stage != 'train':   # what linear in N would give
                ax.plot(ns, [rows[0][1][key] * n / ns[0] for n in ns], '--', color=color,
                        alpha=0.35)
    ax_rss.set(xscale='log', xlabel='posts N', ylabel='peak RSS (MB)',
               title='peak RSS (solid: largest process; dotted: process tree)')
    ax_wall.set(xscale='log', yscale='log', xlabel='posts N', ylabel='seconds',
                title='wall time (dashed: linear in N from the smallest N)')
    ax_cpu.set(xscale='log', yscale='log', xlabel='posts N', ylabel='seconds',
               title='CPU time of the process tree (dashed: linear)')
    for ax in (ax_rss, ax_wall, ax_cpu):
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='50000,200000,1000000')
    parser.add_argument('--out', type=Path, default=Path('/tmp/scale_bench'))
    parser.add_argument('--stages', default=','.join(STAGES))
    parser.add_argument('--keep', action='store_true',
                        help="reuse finished stage outputs in --out (and their earlier figures)")
    parser.add_argument('--comments-per-post', type=float, default=5.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--train-steps', type=int, default=20)
    parser.add_argument('--poll', type=float, default=0.1, help='seconds between RSS polls')
    parser.add_argument('--python', default=sys.executable, help='runs every stage but Beam')
    parser.add_argument('--beam-python', default='',
                        help='runs ingest_beam (default: this python if apache_beam imports, '
                        'else /work/beam-venv/bin/python)')
    parser.add_argument('--beam-options', default='',
                        help="config.ingest.beam_options for ingest_beam ('' = the stage's "
                        "default, Beam's FnApiRunner in the stage's process); e.g. "
                        "'--direct_running_mode=multi_processing --direct_num_workers=2'")
    parser.add_argument('--code', type=Path, default=REPO,
                        help='the tree whose launch/ scripts and vise_jax run the stages (its '
                        'vise_jax first on PYTHONPATH), e.g. `git archive HEAD` unpacked, to '
                        'measure the code before a change; default: this repository')
    parser.add_argument('--report-only', action='store_true',
                        help='print the table and plot from results.json, run nothing')
    parser.add_argument('--child', choices=['train'], help=argparse.SUPPRESS)
    parser.add_argument('--workdir', help=argparse.SUPPRESS)
    parser.add_argument('--steps', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--overrides', default='{}', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_train(args)
        return

    sizes = sorted(int(s) for s in args.sizes.split(','))
    args.stages = [s.strip() for s in args.stages.split(',') if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f'unknown stages {sorted(unknown)}; known: {list(STAGES)}')
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / 'results.json'
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    args.code = args.code.resolve()
    # Whether the tree under test knows config.ingest.runner (its configlib, not necessarily
    # the one this script would import).
    probe = subprocess.run(
        [args.python, '-c', f'import sys; sys.path.insert(0, "{REPO / "bench"}"); '
         'from config_loader import load_config; '
         f'print("runner" in load_config("{CONFIG}").ingest)'],
        cwd=args.code, capture_output=True, text=True,
        env={**os.environ, 'PYTHONPATH': str(args.code) if args.code != REPO else ''})
    has_runner = probe.stdout.strip() == 'True'
    beam_python = _beam_python(args.beam_python) if 'ingest_beam' in args.stages else None
    print(f'{os.cpu_count()} cores, load average {os.getloadavg()}, sizes {sizes}, '
          f'stages {args.stages}; config.ingest.runner '
          f'{"exists" if has_runner else "does not exist yet"}; Beam python: {beam_python}',
          flush=True)
    if not args.report_only:
        for n in sizes:
            run_size(n, args, results, beam_python, has_runner)
    stages = [s for s in STAGES if s in args.stages]
    table = report(results, sizes, stages)
    print('\n' + table)
    uptime = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    (args.out / 'table.md').write_text(
        f'{" ".join(sys.argv)}\n{uptime}\n\n{table}\n')
    plot(results, sizes, stages, args.out / 'scale_bench.png')
    print(f'\nload: {uptime}\ntable: {args.out / "table.md"}; plot: {args.out / "scale_bench.png"}')


if __name__ == '__main__':
    main()
