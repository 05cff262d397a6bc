"""Tests of the fine-tuning harness (methods, training loop, metrics, report).

Everything runs on a tiny randomly initialised BERT (2 layers, hidden 32,
vocabulary 100) and synthetic token data: no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlorc_optax
from examples.finetune import bert
from examples.finetune import methods
from examples.finetune import report
from examples.finetune import train

TINY = bert.BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# Learning rates at which a few steps on one batch must lower the loss.
TEST_LR = {
    'adamw': 3e-3,
    'mlorc_adamw_r4': 3e-3,
    'mlorc_adamw_r8': 3e-3,
    'lion': 1e-3,
    'mlorc_lion_r4': 1e-3,
    'galore_r4': 1e-2,
    'lora_r4': 1e-2,
}


def tiny_model(seed: int = 0) -> bert.BertClassifier:
  return bert.BertClassifier(TINY, 3, rngs=nnx.Rngs(seed))


def synthetic(n: int, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
  """Token sequences whose class is the id of the second token mod 3."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, TINY.vocab_size, (n, length)).astype(np.int32)
  return {
      'input_ids': ids,
      'attention_mask': np.ones_like(ids),
      'token_type_ids': np.zeros_like(ids),
      'labels': (ids[:, 1] % 3).astype(np.int32),
  }


def _flat(state) -> dict[str, np.ndarray]:
  return {
      '/'.join(str(getattr(k, 'key', k)) for k in path): np.array(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          nnx.to_pure_dict(state)
      )[0]
  }


def _setup(name: str, seed: int = 0):
  spec = methods.parse(name)
  model, optimizer = train.make_optimizer(spec, tiny_model(seed), seed)
  return spec, model, optimizer


# --------------------------------------------------------------------------
# Every method: one step changes what it should; a few steps lower the loss.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', methods.DEFAULT_METHODS)
def test_one_step_changes_the_trained_parameters(name):
  spec, model, optimizer = _setup(name)
  before = _flat(nnx.state(model, nnx.Param))
  batch = synthetic(8)
  step = train.FastTrainStep(model, optimizer)  # The step run() uses.
  loss = step(batch, jnp.float32(TEST_LR[name]))
  step.finish()
  assert np.isfinite(float(loss))
  after = _flat(nnx.state(model, nnx.Param))
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}

  head = {k for k in before if k.startswith('classifier/')}
  assert head and head <= changed  # Every method trains the head.
  encoder = {k for k in before if '/layers/' in f'/{k}'}
  if spec.kind == 'lora':
    lora = {k for k in encoder if '/lora_' in k}
    base = encoder - lora
    assert len(lora) == 2 * len(methods.LORA_TARGETS) * TINY.num_hidden_layers
    # B starts at zero, so the first gradient reaches every B (A's gradient
    # is zero, only weight decay moves it).
    assert {k for k in lora if k.endswith('lora_b')} <= changed
    assert not changed & base, sorted(changed & base)
    frozen = set(before) - lora - head
    assert not changed & frozen
  else:
    kernels = {k for k in encoder if k.endswith('kernel')}
    biases = {k for k in encoder if k.endswith('bias')}
    assert len(kernels) == 6 * TINY.num_hidden_layers
    assert kernels <= changed, sorted(kernels - changed)
    assert biases <= changed, sorted(biases - changed)


@pytest.mark.parametrize('name', methods.DEFAULT_METHODS)
def test_a_few_steps_lower_the_loss(name):
  _, model, optimizer = _setup(name)
  batch = synthetic(8, seed=1)  # The shape of the one-step test: cached.
  lr = jnp.float32(TEST_LR[name])
  step = train.FastTrainStep(model, optimizer)
  losses = [float(step(batch, lr)) for _ in range(8)]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.05, losses


def test_lora_adapts_the_same_matrices_mlorc_and_galore_compress():
  params = nnx.as_pure(nnx.state(tiny_model(), nnx.Param))
  plan = mlorc_optax.compression_plan(
      methods.transform(methods.parse('mlorc_adamw_r4')), params)
  compressed = {
      p.path
      for p in jax.tree.leaves(
          plan, is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan)
      )
      if p.compressed
  }
  galore = methods.galore_dimension_numbers(4)(params)
  projected = {
      '/'.join(str(getattr(k, 'key', k)) for k in path)
      for path, dims in jax.tree_util.tree_flatten_with_path(
          galore,
          is_leaf=lambda x: isinstance(x, optax.contrib.GaLoreDimensionNumbers),
      )[0]
      if isinstance(dims, optax.contrib.GaLoreDimensionNumbers)
  }
  wrapped = methods.add_lora(tiny_model(), 4, rngs=nnx.Rngs(0))
  adapted = {
      k.replace('/base_module/kernel', '/kernel')
      for k in _flat(nnx.state(wrapped, nnx.Param))
      if k.endswith('base_module/kernel')
  }
  assert len(compressed) == 6 * TINY.num_hidden_layers
  assert compressed == projected == adapted


def test_lora_model_is_unchanged_at_initialisation():
  ids = synthetic(4)
  plain = tiny_model(3)
  wrapped = methods.add_lora(tiny_model(3), 4, rngs=nnx.Rngs(1))
  kw = dict(deterministic=True)
  np.testing.assert_allclose(
      wrapped(ids['input_ids'], ids['attention_mask'], **kw),
      plain(ids['input_ids'], ids['attention_mask'], **kw),
      atol=1e-6,
  )


def test_reseed_matches_building_with_the_seed():
  _, _, optimizer = _setup('mlorc_adamw_r4')
  assert train.reseed_low_rank_sketches(optimizer, 7) == 1
  is_mlorc = lambda x: isinstance(x, mlorc_optax.LowRankMomentsState)
  keys = [
      s.key[...]
      for s in jax.tree.leaves(optimizer.opt_state, is_leaf=is_mlorc)
      if is_mlorc(s)
  ]
  params = nnx.as_pure(nnx.state(tiny_model(), nnx.Param))
  direct = mlorc_optax.mlorc_adamw(1e-3, seed=7).init(params)[0].key
  np.testing.assert_array_equal(keys[0], direct)
  _, _, adam = _setup('adamw')
  assert train.reseed_low_rank_sketches(adam, 7) == 0


def test_opt_state_structure_is_stable_across_steps():
  # One compilation per method: the state's pytree type must not change.
  _, model, optimizer = _setup('mlorc_adamw_r4')
  structure = jax.tree.structure(optimizer.opt_state)
  train.train_step(model, optimizer, synthetic(8), jnp.float32(3e-3))
  assert jax.tree.structure(optimizer.opt_state) == structure


# --------------------------------------------------------------------------
# The run / study loop.
# --------------------------------------------------------------------------


def test_run_and_study_end_to_end(tmp_path):
  data = train.Datasets(
      train=synthetic(48, seed=2),
      test=synthetic(20, seed=3),
      tune_train=synthetic(40, seed=4),
      tune_val=synthetic(10, seed=5),
  )
  results = train.study(
      ['adamw', 'lora_r4'],
      [0, 1],
      model_factory=tiny_model,
      datasets=data,
      lr_grids={'adamw': (1e-3, 3e-3)},
      fixed_lrs={'lora_r4': 1e-2},
      tune=True,
      epochs=1.0,
      steps=None,
      tune_epochs=None,
      tune_steps=3,
      progress=False,
      log=lambda _: None,
      batch_size=8,
      eval_batch_size=16,
  )
  assert results['chosen_lr']['adamw'] in (1e-3, 3e-3)
  assert results['chosen_lr']['lora_r4'] == 1e-2
  assert len(results['tuning']['adamw']['trials']) == 2
  runs = results['runs']
  assert [(r['method'], r['seed']) for r in runs] == [
      ('adamw', 0),
      ('adamw', 1),
      ('lora_r4', 0),
      ('lora_r4', 1),
  ]
  for r in runs:
    assert r['steps'] == 48 // 8 and len(r['loss_curve']) == r['steps']
    assert r['num_eval'] == 20 and 0.0 <= r['accuracy'] <= 1.0
    assert np.isfinite(r['final_train_loss']) and r['opt_state_bytes'] > 0
    assert r['wall_time_s'] >= r['train_time_s'] > 0
  adamw, lora = runs[0], runs[2]
  assert lora['trainable_params'] < adamw['trainable_params']
  assert lora['opt_state_bytes'] < adamw['opt_state_bytes']
  assert adamw['trainable_params'] == adamw['total_params']
  # Seeds change the run; the same seed is reproducible.
  assert runs[0]['loss_curve'] != runs[1]['loss_curve']
  again = train.run(
      'adamw',
      adamw['lr'],
      0,
      model_factory=tiny_model,
      train=data.train,
      evaluation=data.test,
      epochs=1.0,
      batch_size=8,
      eval_batch_size=16,
      progress=False,
  )
  np.testing.assert_allclose(
      again['loss_curve'], adamw['loss_curve'], rtol=1e-6
  )
  full = {'config': {}, 'versions': train.versions(), **results}
  full['summary'] = report.summarize(runs)
  paths = report.write_outputs(full, tmp_path, figure=False)
  assert json.loads(paths[0].read_text())['chosen_lr'] == results['chosen_lr']


def test_schedule_and_step_counts():
  schedule = train.lr_schedule(50, 0.06)
  values = np.asarray(schedule(np.arange(50)))
  assert values[0] == 0.0 and values.max() == pytest.approx(1.0)
  assert int(np.argmax(values)) == 3  # round(0.06 * 50) warmup steps.
  assert np.all(np.diff(values[3:]) < 0) and values[-1] > 0
  assert float(schedule(50)) == pytest.approx(0.0)
  assert train.count_steps(100, 32, epochs=2) == 6
  assert train.count_steps(100, 32, steps=7) == 7
  with pytest.raises(ValueError):
    train.count_steps(10, 32, epochs=1)


def test_step_lr_scales_updates_exactly():
  params = {'w': jnp.arange(6.0).reshape(2, 3)}
  grads = {'w': jnp.ones((2, 3))}
  sched = train.lr_schedule(10, 0.2)
  ref = optax.adamw(lambda c: 3e-4 * sched(c), weight_decay=0.01)
  ours = optax.chain(
      optax.adamw(1.0, weight_decay=0.01), train.scale_by_step_lr()
  )
  s_ref, s_ours = ref.init(params), ours.init(params)
  for t in range(4):
    u_ref, s_ref = ref.update(grads, s_ref, params)
    lr = jnp.float32(3e-4 * sched(t))
    u_ours, s_ours = ours.update(grads, s_ours, params, lr=lr)
    np.testing.assert_allclose(u_ours['w'], u_ref['w'], rtol=1e-6, atol=1e-12)


def test_choose_lr_tie_breaks():
  trials = [
      {'lr': 1e-4, 'accuracy': 0.8, 'macro_f1': 0.5},
      {'lr': 5e-5, 'accuracy': 0.8, 'macro_f1': 0.6},
      {'lr': 2e-5, 'accuracy': 0.7, 'macro_f1': 0.9},
  ]
  assert train.choose_lr(trials) == 5e-5
  assert train.choose_lr(trials, 'macro_f1') == 2e-5
  trials[0]['macro_f1'] = 0.6
  assert train.choose_lr(trials) == 5e-5  # Full tie: the smaller rate.
  with pytest.raises(ValueError):
    train.choose_lr(trials, 'loss')


# --------------------------------------------------------------------------
# Method registry.
# --------------------------------------------------------------------------


def test_parse_method_names():
  spec = methods.parse('mlorc_adamw_r8')
  assert (spec.kind, spec.family, spec.rank) == ('mlorc', 'adamw', 8)
  assert spec.label == 'MLorc-AdamW (r=8)'
  assert methods.parse('galore_r16').rank == 16
  assert methods.parse('lion').rank is None
  assert methods.parse('lora_r4').trains_all_params is False
  for bad in ('adamw_r4', 'mlorc_adamw', 'sgd', 'lora_r0', 'galore_rx'):
    with pytest.raises(ValueError):
      methods.parse(bad)
  assert (
      methods.parse('lion').weight_decay
      == 3 * methods.parse('adamw').weight_decay
  )


def test_transforms_use_the_documented_hyperparameters():
  params = {'w': jnp.ones((8, 6)), 'b': jnp.zeros(6)}
  assert methods.decay_mask(params) == {'w': True, 'b': False}
  tx = methods.transform(methods.parse('mlorc_adamw_r4'))
  assert tx is methods.transform(methods.parse('mlorc_adamw_r4'))  # Cached.
  g = {'w': jnp.full((8, 6), 2.0), 'b': jnp.ones(6)}
  state = tx.init(params)
  updates, state = tx.update(g, state, params)
  updates, _ = tx.update(g, state, params)
  # b1 = 0.8: after two equal gradients m_hat = g, v_hat = g^2 -> update
  # -(1 + ...) for both leaves; weight decay only on w.
  np.testing.assert_allclose(updates['b'], -1.0, rtol=1e-5)
  np.testing.assert_allclose(updates['w'], -(1.0 + 0.01), rtol=1e-4)


# --------------------------------------------------------------------------
# Metrics and report.
# --------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0])
  assert train.accuracy(preds, labels) == pytest.approx(4 / 6)
  # F1 per class: 0 -> 2*1/(2+1+1) = 0.5; 1 -> 4/5; 2 -> 2/3.
  expected = (0.5 + 0.8 + 2 / 3) / 3
  assert train.macro_f1(preds, labels, 3) == pytest.approx(expected)
  # All-majority predictions: F1 only for the predicted class.
  maj = np.array([2, 2, 2, 2])
  assert train.macro_f1(maj, np.array([2, 2, 2, 0]), 3) == pytest.approx(
      (0 + 2 * 3 / (6 + 1)) / 2
  )
  assert train.macro_f1(labels, labels, 4) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    train.accuracy(np.array([1]), np.array([1, 2]))


def _fake_runs():
  runs = []
  for method, label, acc, state in (
      ('adamw', 'AdamW (full)', (0.80, 0.82), 4 * 2**20),
      ('mlorc_adamw_r4', 'MLorc-AdamW (r=4)', (0.81, 0.83), 2**21),
  ):
    for seed, a in enumerate(acc):
      runs.append(
          {
              'method': method,
              'label': label,
              'lr': 5e-5,
              'seed': seed,
              'steps': 4,
              'accuracy': a,
              'macro_f1': a - 0.2,
              'final_train_loss': 0.5,
              'loss_curve': [1.0, 0.8, 0.6, 0.5],
              'opt_state_bytes': state,
              'trainable_params': 1000,
              'total_params': 1000,
              'xla_step_memory': {'total': 3 * 2**20},
              'device_peak_bytes': None,
              'steps_per_s': 10.0,
              'wall_time_s': 2.0,
          }
      )
  return runs


def test_report_renders_a_table(tmp_path):
  results = {'runs': _fake_runs(), 'tuning': {'adamw': {'fixed': 5e-5}}}
  table = report.markdown_table(results)
  lines = table.splitlines()
  assert lines[0].startswith('| method | lr | test acc. (%)')
  assert len(lines) == 4 and all(l.count('|') == 13 for l in lines)
  assert '| AdamW (full) | 5.0e-05 | 81.00 ± 1.41 | 61.00 ± 1.41 |' in table
  assert '| 4.0 MiB | 100.0% |' in table and '| 2.0 MiB | 50.0% |' in table
  path = tmp_path / 'results.json'
  path.write_text(json.dumps(results))
  report.main([str(path), '--no-figure'])
  md = (tmp_path / 'results.md').read_text()
  assert table in md and 'adamw: 5.0e-05 (fixed' in md
  assert not (tmp_path / 'results.png').exists()
  summary = report.summarize(results['runs'])
  assert summary['mlorc_adamw_r4']['accuracy_mean'] == pytest.approx(0.82)
  assert (
      summary['adamw']['n'] == 2 and summary['adamw']['loss_curve'][-1] == 0.5
  )


def test_fast_train_step_matches_train_step():
  name = 'mlorc_adamw_r4'
  batch = synthetic(8, seed=2)
  lr = jnp.float32(TEST_LR[name])
  _, model_a, opt_a = _setup(name, seed=5)
  _, model_b, opt_b = _setup(name, seed=5)
  fast = train.FastTrainStep(model_b, opt_b)
  for _ in range(2):
    loss_a = train.train_step(model_a, opt_a, batch, lr)
    loss_b = fast(batch, lr)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  fast.finish()
  a = _flat(nnx.state(model_a, nnx.Param))
  b = _flat(nnx.state(model_b, nnx.Param))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
  sa, sb = jax.tree.leaves(opt_a.opt_state), jax.tree.leaves(opt_b.opt_state)
  assert len(sa) == len(sb)
  for x, y in zip(sa, sb):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7
    )


def test_report_figure(tmp_path):
  pytest.importorskip('matplotlib')  # In the examples extra, not in test.
  path = report.plot({'runs': _fake_runs()}, tmp_path / 'fig.png')
  assert path.stat().st_size > 10_000


def test_report_merges_runs_of_separate_processes(tmp_path):
  """The committed H100 compressor parts merge back into one results file."""
  parts_dir = (Path(__file__).parents[2] / 'examples' / 'finetune' /
               'results' / 'h100_compressors' / 'parts')
  parts = [parts_dir / 'adamw.json', parts_dir / 'mlorc_adamw_r4.json']
  merged = report.merge(parts, parts_dir.parent)
  assert merged['config']['methods'] == ['adamw', 'mlorc_adamw_r4']
  assert set(merged['summary']) == {'adamw', 'mlorc_adamw_r4'}
  assert len(merged['runs']) == 6  # 2 methods x 3 seeds
  assert merged['config']['assembled_from'] == {
      'parts/adamw.json': 'adamw', 'parts/mlorc_adamw_r4.json':
      'mlorc_adamw_r4'}
  # The committed file is exactly what --merge writes from all seven parts.
  committed = json.loads((parts_dir.parent / 'results.json').read_text())
  again = report.merge(sorted(parts_dir.glob('*.json')), parts_dir.parent)
  assert json.loads(json.dumps(again)) == committed
  with pytest.raises(ValueError, match='appear twice'):
    report.merge(parts + parts[:1], parts_dir.parent)
  other = json.loads(parts[1].read_text())
  other['config']['batch_size'] = 8
  (tmp_path / 'other.json').write_text(json.dumps(other))
  with pytest.raises(ValueError, match='settings differ'):
    report.merge([parts[0], tmp_path / 'other.json'], tmp_path)
