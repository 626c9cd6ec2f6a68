"""vise_jax: VisE (visual engagement signals for representation learning) in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

REQUIRED = [
    'absl-py',
    'array-record>=0.8',
    'etils',
    'flax>=0.12',
    'grain>=0.2.18',
    'jax>=0.10',
    'matplotlib',
    'ml-collections>=1.0',
    'numpy>=2.0',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12',
    'pillow>=11',
    'safetensors',          # pretrained text-encoder weights, read without torch
    'scikit-learn>=1.6',
    'sentencepiece',
    'tensorboardx',         # TensorBoard summaries without TensorFlow
    'tensorflow-datasets>=4.9',
    'tokenizers',           # the text encoder's WordPiece tokenizer
    'tqdm',
]

# Ingest as an Apache Beam pipeline (config.ingest.runner='beam'; docs/scaling.md). Tested with
# 2.77, which caps numpy < 2.5, protobuf < 7 and pyarrow < 26. Dataflow wants 'apache-beam[gcp]'.
BEAM = ['apache-beam>=2.77,<3']

EXTRAS = {
    'dev': ['pytest>=8', 'pytest-xdist', 'ruff', *BEAM],  # with Beam, so CI runs its tests
    'beam': BEAM,
    # PyTorch weight interop. Kept out of the core install: a plain `pip install torch` can pull
    # a multi-GB CUDA build. Install a CPU build yourself if you only need the conversion.
    'torch': ['torch>=2.9', 'torchvision>=0.24'],
    # Peers the benchmarks in bench/ compare against.
    'bench': ['torch>=2.9', 'torchvision>=0.24', 'sentence-transformers', 'faiss-cpu'],
}

setup(
    name='vise_jax',
    version='0.1.0',
    description=__doc__,
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['vise_jax', 'vise_jax.*']),
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
