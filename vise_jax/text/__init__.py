"""Text encoders and the comment-embedding writer.

* `minilm.BertSentenceEncoder` / `load_minilm()`: a Flax port of BERT sentence-transformers
  (all-MiniLM-L6-v2 by default), weights read from model.safetensors without torch.
* `SentencePieceTfidfEncoder`: sentencepiece pieces, TF-IDF, a projection; trained on the corpus.
* `embed_comments` writes float16 embedding shards, resumably; `EmbeddingShards` reads them.

Every encoder follows `TextEncoder` (vise_jax/text/base.py).
"""

from vise_jax.text.base import TextEncoder
from vise_jax.text.embed import EmbeddingShards, embed_comments, iter_comments
from vise_jax.text.minilm import BertSentenceEncoder, load_minilm, pretrained_model_dir
from vise_jax.text.sentencepiece_tfidf import SentencePieceTfidfEncoder

__all__ = [
    'BertSentenceEncoder',
    'EmbeddingShards',
    'SentencePieceTfidfEncoder',
    'TextEncoder',
    'embed_comments',
    'iter_comments',
    'load_minilm',
    'pretrained_model_dir',
]
