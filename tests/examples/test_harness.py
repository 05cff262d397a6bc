"""Tests of the fine-tuning harness (methods, training loop, study, report).

Everything runs on a tiny randomly initialised BERT (1 layer, hidden 32,
vocabulary 100) and synthetic token data: no downloads. Every test trains on
batches of one shape, so each method's train step compiles once for the
whole file (the harness caches it per method, as it does across seeds).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro
from flax import nnx

import mlorc_optax
from examples.finetune import config as config_lib
from examples.finetune import data as data_lib
from examples.finetune import methods
from examples.finetune import metrics
from examples.finetune import model as model_lib
from examples.finetune import report
from examples.finetune import study
from examples.finetune import train

pytestmark = pytest.mark.usefixtures('fast_compiles')

TINY = model_lib.BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=1,
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

RESULTS = Path(__file__).parents[2] / 'examples' / 'finetune' / 'results'


def tiny_model(seed: int = 0) -> model_lib.BertClassifier:
  return model_lib.BertClassifier(TINY, 3, rngs=nnx.Rngs(seed))


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


def tiny_config(**kw) -> config_lib.Config:
  """Settings for the tiny model: batch 8, no progress bars."""
  return config_lib.Config(**{'batch_size': 8, 'eval_batch_size': 16,
                              'progress': False, **kw})


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


def run_steps(model, optimizer, batch, lr, n):
  """``n`` steps of the harness's compiled step; returns the losses."""
  graphdef, state = nnx.split((model, optimizer))
  step = train.compiled_train_step(graphdef, state, batch, jnp.float32(lr))
  losses = []
  for _ in range(n):
    state, loss = step(state, batch, jnp.float32(lr))
    losses.append(float(loss))
  nnx.update((model, optimizer), state)
  return losses


# --------------------------------------------------------------------------
# Every method: one step changes what it should; a few steps lower the loss.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', methods.DEFAULT_METHODS)
def test_one_step_changes_the_trained_parameters(name):
  spec, model, optimizer = _setup(name)
  before = _flat(nnx.state(model, nnx.Param))
  (loss,) = run_steps(model, optimizer, synthetic(8), TEST_LR[name], 1)
  assert np.isfinite(loss)
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
  _, model, optimizer = _setup(name, seed=1)
  losses = run_steps(model, optimizer, synthetic(8, seed=1), TEST_LR[name], 8)
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
  wrapped, _ = methods.prepare('lora_r4', tiny_model(), seed=0)
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


def test_the_seed_reaches_the_sketches_as_building_with_it_would():
  _, _, optimizer = _setup('mlorc_adamw_r4', seed=7)
  params = nnx.as_pure(nnx.state(tiny_model(), nnx.Param))
  direct = mlorc_optax.mlorc_adamw(1e-3, seed=7).init(params)[0]
  core = optimizer.opt_state[0][0]  # (method, x lr) -> (MLorc, decay, lr)
  np.testing.assert_array_equal(core.sketch_key[...], direct.sketch_key)
  # The moments of the attention `key` projection are untouched factors.
  mu = core.inner_state.mu['bert']['layers'][0]['attention']['key']
  assert isinstance(mu['kernel'], mlorc_optax.LowRankFactors)
  assert mu['kernel'].u[...].shape == direct.inner_state.mu['bert'][
      'layers'][0]['attention']['key']['kernel'].u.shape
  # Same transformation object for every seed: one compiled step.
  assert _setup('mlorc_adamw_r4', seed=8)[2].tx is optimizer.tx


def test_the_step_keeps_the_state_structure():
  # Donation and the one-compilation cache need the same structure back.
  _, model, optimizer = _setup('mlorc_adamw_r4')
  graphdef, state = nnx.split((model, optimizer))
  batch, lr = synthetic(8), jnp.float32(3e-3)
  step = train.compiled_train_step(graphdef, state, batch, lr)
  structure = jax.tree.structure(state)
  state, _ = step(state, batch, lr)
  assert jax.tree.structure(state) == structure
  assert train.compiled_train_step(graphdef, state, batch, lr) is step


def test_compiled_step_matches_the_nnx_jit_step():
  """The harness's step computes what the textbook ``nnx.jit`` step does.

  They are different XLA programs, so they agree up to float32 rounding,
  which a float32 SVD of the moments amplifies by the conditioning of their
  singular vectors. The test is there to catch a different computation (a
  wrong learning rate, a missed or repeated step, another optimizer or
  state), which moves parameters by a whole step (about ``lr`` per entry
  with Adam) and the state by its own size; so parameters must agree within
  a thousandth of a step and each state leaf within a thousandth of its
  largest entry. Left out: the bias of the attention's key projection (and
  its moments), whose gradient is zero in exact arithmetic (adding the same
  vector to every key shifts all of a query's logits equally, which the
  softmax ignores): both programs compute rounding noise for it, which Adam
  scales up to steps of about ``lr * |g| / eps``.
  """
  name = 'mlorc_adamw_r4'
  batch, lr = synthetic(8, seed=2), jnp.float32(TEST_LR[name])
  _, model_a, opt_a = _setup(name, seed=5)
  _, model_b, opt_b = _setup(name, seed=5)
  textbook = nnx.jit(train.train_step)
  losses_a = [float(textbook(model_a, opt_a, batch, lr)) for _ in range(2)]
  losses_b = run_steps(model_b, opt_b, batch, lr, 2)
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-6)
  for kind in (nnx.Param, nnx.OptState):
    a = _flat(nnx.state((model_a, opt_a), kind))
    b = _flat(nnx.state((model_b, opt_b), kind))
    assert a.keys() == b.keys()
    noise = {k for k in a if 'attention/key/bias' in k}
    assert noise  # the model has the leaves left out
    for k in a.keys() - noise:
      if not np.issubdtype(a[k].dtype, np.floating):  # counts, keys
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        continue
      scale = float(lr) if kind is nnx.Param else np.abs(a[k]).max()
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-3 * scale,
                                 err_msg=k)


# --------------------------------------------------------------------------
# The run / study loop.
# --------------------------------------------------------------------------


def test_run_and_study_end_to_end(tmp_path):
  data = data_lib.Datasets(
      train=synthetic(48, seed=2),
      test=synthetic(20, seed=3),
      tune_train=synthetic(40, seed=4),
      tune_val=synthetic(10, seed=5),
  )
  config = tiny_config(methods=('adamw', 'lora_r4'), seeds=(0, 1),
                       epochs=1.0, tune_steps=3, lr_grid=('adamw=1e-3,3e-3',),
                       lr=('lora_r4=1e-2',))
  results = study.study(config, model_factory=tiny_model, datasets=data,
                        log=lambda _: None)
  assert results['chosen_lr']['adamw'] in (1e-3, 3e-3)
  assert results['chosen_lr']['lora_r4'] == 1e-2
  assert len(results['tuning']['adamw']['trials']) == 2
  runs = results['runs']
  assert [(r['method'], r['seed']) for r in runs] == [
      ('adamw', 0), ('adamw', 1), ('lora_r4', 0), ('lora_r4', 1)]
  for r in runs:
    assert r['steps'] == 48 // 8 and len(r['loss_curve']) == r['steps']
    assert r['num_eval'] == 20 and 0.0 <= r['accuracy'] <= 1.0
    assert 0.0 <= r['macro_f1'] <= 1.0 and r['cross_entropy'] > 0
    assert np.isfinite(r['final_train_loss']) and r['opt_state_bytes'] > 0
    assert r['wall_time_s'] >= r['train_time_s'] > 0
  adamw, lora = runs[0], runs[2]
  assert lora['trainable_params'] < adamw['trainable_params']
  assert lora['opt_state_bytes'] < adamw['opt_state_bytes']
  assert adamw['trainable_params'] == adamw['total_params']
  # Seeds change the run; the same seed is reproducible.
  assert runs[0]['loss_curve'] != runs[1]['loss_curve']
  again = train.run('adamw', adamw['lr'], 0, model_factory=tiny_model,
                    train=data.train, evaluation=data.test, epochs=1.0,
                    batch_size=8, eval_batch_size=16)
  np.testing.assert_allclose(again['loss_curve'], adamw['loss_curve'],
                             rtol=1e-6)
  paired = report.paired_differences(runs)
  assert set(paired) == {'lora_r4'}
  acc = paired['lora_r4']['accuracy']
  assert acc['n'] == 2 and acc['by_seed'][1] == pytest.approx(
      runs[3]['accuracy'] - runs[1]['accuracy'])
  full = {'config': {}, **results, 'summary': report.summarize(runs)}
  paths = report.write_outputs(full, tmp_path, figure=False)
  assert json.loads(paths[0].read_text())['chosen_lr'] == results['chosen_lr']


def test_mlorc_run_says_where_its_state_goes():
  data = synthetic(16, seed=6)
  r = train.run('mlorc_adamw_r4', 3e-3, 0, model_factory=tiny_model,
                train=data, evaluation=data, steps=1, batch_size=8,
                eval_batch_size=16)
  split = r['state_split']
  assert split['compressed_leaves'] == 6 * TINY.num_hidden_layers
  assert split['factor_bytes'] < split['replaced_bytes']
  # Factors, dense moments, the key and the counters: the whole state.
  assert r['opt_state_bytes'] - 64 <= (split['factor_bytes']
                                       + split['dense_bytes']) <= r[
                                           'opt_state_bytes']
  path, largest = split['largest_dense']
  assert path == 'bert/embeddings/word_embeddings/embedding'
  assert largest == 2 * TINY.vocab_size * TINY.hidden_size * 4


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
      {'lr': 1e-4, 'accuracy': 0.8, 'macro_f1': 0.5, 'cross_entropy': 0.7},
      {'lr': 5e-5, 'accuracy': 0.8, 'macro_f1': 0.6, 'cross_entropy': 0.6},
      {'lr': 2e-5, 'accuracy': 0.7, 'macro_f1': 0.9, 'cross_entropy': 0.6},
  ]
  assert study.choose_lr(trials) == 5e-5
  assert study.choose_lr(trials, 'macro_f1') == 2e-5
  # Lowest cross-entropy; its tie goes to the higher accuracy.
  assert study.choose_lr(trials, 'cross_entropy') == 5e-5
  trials[0]['macro_f1'] = 0.6
  assert study.choose_lr(trials) == 5e-5  # Full tie: the smaller rate.
  with pytest.raises(ValueError):
    study.choose_lr(trials, 'loss')


# --------------------------------------------------------------------------
# Configuration and command line.
# --------------------------------------------------------------------------


def test_presets_and_per_method_rates():
  quick = config_lib.quickstart()
  assert quick.fixed_lrs() == {'adamw': 1e-4, 'mlorc_adamw_r4': 1e-4}
  assert not quick.tune and quick.run_length() == (2.0, None)
  # --lr appends to the preset's rates; a later rate of a method wins.
  cli = tyro.cli(config_lib.Config, default=quick, args=[
      '--methods', 'adamw', 'mlorc_adamw_r4', 'lora_r4',
      '--lr', 'lora_r4=1e-3', '--lr', 'adamw=2e-4'])
  assert cli.fixed_lrs() == {'adamw': 2e-4, 'mlorc_adamw_r4': 1e-4,
                             'lora_r4': 1e-3}
  full = config_lib.full()
  assert full.tune and full.methods == methods.DEFAULT_METHODS
  assert full.tune_length() == full.run_length() == (5.0, None)
  grid = tiny_config(lr_grid=('adamw=1e-4,2e-4',), tune_steps=3, steps=9)
  assert grid.lr_grids() == {'adamw': (1e-4, 2e-4)}
  assert grid.run_length() == (None, 9) and grid.tune_length() == (None, 3)
  with pytest.raises(ValueError, match='give --lr'):
    config_lib.Config(methods=('adamw', 'lion'), tune=False,
                      lr=('adamw=1e-4',))
  for bad in (dict(methods=('sgd',)), dict(lr=('adamw',)),
              dict(lr=('sgd=1e-4',)), dict(lr_grid=('adamw=',))):
    with pytest.raises(ValueError):
      config_lib.Config(**bad)


def _readme_commands():
  """The harness command lines quoted in the committed results' READMEs."""
  for readme in sorted(RESULTS.glob('*/README.md')):
    text = readme.read_text().replace('\\\n', ' ')
    for line in text.splitlines():
      match = re.search(r'python -m (examples\.finetune\.\w+)(.*)', line)
      if match and match[1] != 'examples.finetune.pack_assets':
        yield readme.parent.name, match[1], match[2]


def test_the_results_readmes_commands_parse():
  commands = list(_readme_commands())
  assert len(commands) >= 6
  for folder, module, args in commands:
    argv = [a.replace('METHOD', 'adamw').replace('DIR', 'out')
            for a in shlex.split(args)]
    if module == 'examples.finetune.report':
      tyro.cli(report.Args, args=argv)
      continue
    assert module in ('examples.finetune.main',
                      'examples.finetune.quickstart'), (folder, module)
    default = (config_lib.quickstart() if module.endswith('quickstart')
               else config_lib.full())
    config = tyro.cli(config_lib.Config, default=default, args=argv)
    assert config.methods, folder


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
  update = jax.jit(tx.update)
  updates, state = update(g, state, params)
  updates, _ = update(g, state, params)
  # b1 = 0.8: after two equal gradients m_hat = g, v_hat = g^2 -> update
  # -(1 + ...) for both leaves; weight decay only on w.
  np.testing.assert_allclose(updates['b'], -1.0, rtol=1e-5)
  np.testing.assert_allclose(updates['w'], -(1.0 + 0.01), rtol=1e-4)


# --------------------------------------------------------------------------
# Metrics and report.
# --------------------------------------------------------------------------


def test_accuracy_macro_f1_and_cross_entropy_by_hand():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0])
  assert metrics.accuracy(preds, labels) == pytest.approx(4 / 6)
  # F1 per class: 0 -> 2*1/(2+1+1) = 0.5; 1 -> 4/5; 2 -> 2/3.
  expected = (0.5 + 0.8 + 2 / 3) / 3
  assert metrics.macro_f1(preds, labels, 3) == pytest.approx(expected)
  # All-majority predictions: F1 only for the predicted class.
  maj = np.array([2, 2, 2, 2])
  assert metrics.macro_f1(maj, np.array([2, 2, 2, 0]), 3) == pytest.approx(
      (0 + 2 * 3 / (6 + 1)) / 2
  )
  assert metrics.macro_f1(labels, labels, 4) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    metrics.accuracy(np.array([1]), np.array([1, 2]))
  # Uniform logits: log 3 nats whatever the label; a sure right answer: ~0.
  assert metrics.cross_entropy(np.zeros((2, 3)), np.array([0, 2])) == (
      pytest.approx(np.log(3)))
  logits = np.array([[0.0, np.log(3.0), 0.0]])  # p = (0.2, 0.6, 0.2)
  assert metrics.cross_entropy(logits, np.array([1])) == pytest.approx(
      -np.log(0.6))
  assert metrics.cross_entropy(np.array([[50.0, 0, 0]]), np.array([0])) < 1e-20


def _fake_runs():
  runs = []
  for method, label, acc, ce, state in (
      ('adamw', 'AdamW (full)', (0.80, 0.82), (0.60, 0.50), 4 * 2**20),
      ('mlorc_adamw_r4', 'MLorc-AdamW (r=4)', (0.81, 0.84), (0.62, 0.49),
       2**21),
  ):
    for seed, (a, c) in enumerate(zip(acc, ce)):
      runs.append({
          'method': method,
          'label': label,
          'lr': 5e-5,
          'seed': seed,
          'steps': 4,
          'accuracy': a,
          'macro_f1': a - 0.2,
          'cross_entropy': c,
          'final_train_loss': 0.5,
          'loss_curve': [1.0, 0.8, 0.6, 0.5],
          'opt_state_bytes': state,
          'trainable_params': 1000,
          'total_params': 1000,
          'xla_step_memory': {'estimated_peak_bytes': 3 * 2**20},
          'device_peak_bytes': None,
          'steps_per_s': 10.0,
          'wall_time_s': 2.0,
      })
  return runs


def _cells(table: str, label: str) -> list[str]:
  row = next(l for l in table.splitlines() if l.startswith(f'| {label} '))
  return [c.strip() for c in row.strip('|').split('|')]


def test_report_renders_the_tables(tmp_path):
  results = {'runs': _fake_runs(), 'tuning': {'adamw': {'fixed': 5e-5}}}
  table = report.markdown_table(results)
  lines = table.splitlines()
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  assert header[:6] == ['method', 'lr', 'test acc. (%)', 'macro-F1 (%)',
                        'test CE (nats)', 'final train loss']
  assert len(lines) == 4 and len({l.count('|') for l in lines}) == 1
  adamw = _cells(table, 'AdamW (full)')
  assert adamw[1:5] == ['5.0e-05', '81.00 ± 1.41', '61.00 ± 1.41',
                        '0.550 ± 0.071']
  # The state column and what it saves against AdamW's.
  assert adamw[6:8] == ['4.0 MiB', '100.0% (0 B)']
  assert _cells(table, 'MLorc-AdamW (r=4)')[6:8] == ['2.0 MiB',
                                                     '50.0% (-2.0 MiB)']
  # Paired by seed: accuracy +1 and +2 points, CE +0.02 and -0.01.
  paired = report.paired_table(results)
  assert _cells(paired, 'MLorc-AdamW (r=4)')[1:] == [
      '+1.50 ± 0.71 (n=2)', '+1.50 ± 0.71 (n=2)', '+0.005 ± 0.021 (n=2)']
  path = tmp_path / 'results.json'
  path.write_text(json.dumps(results))
  report.main([str(path), '--no-figure'])
  md = (tmp_path / 'results.md').read_text()
  assert table in md and paired in md and 'adamw: 5.0e-05 (fixed' in md
  assert not (tmp_path / 'results.png').exists()
  summary = report.summarize(results['runs'])
  assert summary['mlorc_adamw_r4']['accuracy_mean'] == pytest.approx(0.825)
  assert summary['adamw']['cross_entropy_mean'] == pytest.approx(0.55)
  assert (
      summary['adamw']['n'] == 2 and summary['adamw']['loss_curve'][-1] == 0.5
  )


def test_report_figure(tmp_path):
  pytest.importorskip('matplotlib')  # In the examples extra, not in test.
  path = report.plot({'runs': _fake_runs()}, tmp_path / 'fig.png')
  assert path.stat().st_size > 10_000


def test_report_merges_runs_of_separate_processes(tmp_path):
  """The committed H100 compressor parts merge back into one results file."""
  parts_dir = RESULTS / 'h100_compressors' / 'parts'
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


def test_method_options_pass_through_to_the_factory():
  """``NAME:KEY=VALUE,...`` as the Shakespeare benchmark reads it: options
  override the harness's defaults, named values resolve, and bad options
  name themselves."""
  spec = methods.parse('mlorc_adamw_r4:complement=1.0,b1=0.9')
  assert spec.name == 'mlorc_adamw_r4:complement=1.0,b1=0.9'
  assert (spec.kind, spec.rank, spec.options) == (
      'mlorc', 4, (('complement', 1.0), ('b1', 0.9)))
  assert spec.label == 'MLorc-AdamW (r=4, complement=1.0, b1=0.9)'
  assert spec.default_lr_grid == methods.parse('mlorc_adamw_r4').default_lr_grid
  params = {'embeddings': {'word': {'embedding': jnp.ones((40, 16))}},
            'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}}
  grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                       params)

  def two_updates(tx):
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    return tx.update(jax.tree.map(lambda g: -g, grads), state, params)[0]

  ours = two_updates(methods.transform(spec))
  # b1=0.9 replaces the harness's 0.8 (it matters from step 2 on).
  for b1, same in ((0.9, True), (0.8, False)):
    theirs = two_updates(mlorc_optax.mlorc_adamw(
        1.0, weight_decay=spec.weight_decay, mask=methods.decay_mask, rank=4,
        b1=b1, complement=1.0))
    assert same == all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), ours, theirs)))
  compressed = lambda s: {
      '/'.join(str(getattr(k, 'key', k)) for k in path): p.compressed
      for path, p in jax.tree_util.tree_leaves_with_path(
          mlorc_optax.compression_plan(methods.transform(methods.parse(s)),
                                       params),
          is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan))}
  assert compressed('mlorc_adamw_r4')['embeddings/word/embedding'] is False
  assert compressed('mlorc_adamw_r4:low_rank_mask=with_embeddings') == {
      'dense/bias': False, 'dense/kernel': True,
      'embeddings/word/embedding': True}
  for bad, message in (
      ('mlorc_adamw_r4:rank=8', "option 'rank' .* is set by the harness"),
      ('adamw:bogus=1', "option 'bogus' .* is not a parameter of adamw"),
      ('mlorc_adamw_r4_warm:compressor=warm', 'names its compressor twice')):
    with pytest.raises(ValueError, match=message):
      methods.parse(bad)
  # --lr / --lr-grid split at the last '=': a method's own options stay.
  cfg = config_lib.Config(methods=('adamw', spec.name), tune=False,
                          lr=('adamw=1e-4', f'{spec.name}=2e-4'))
  assert cfg.fixed_lrs() == {'adamw': 1e-4, spec.name: 2e-4}
