"""The harness runs MLorc with every moment compressor (issue #9).

CPU smoke runs on the tiny BERT and synthetic data of ``test_harness``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mlorc_optax
from examples.finetune import data as data_lib
from examples.finetune import methods
from examples.finetune import study
from examples.finetune import train

from test_harness import TINY, run_steps, synthetic, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures('fast_compiles')

NEW = ('mlorc_adamw_r4_warm', 'mlorc_adamw_r4_lorapre')


def _mlorc_states(optimizer):
  """The :class:`mlorc_optax.LowRankMomentsState` s in an optimizer's state."""
  is_mlorc = lambda x: isinstance(x, mlorc_optax.LowRankMomentsState)
  return [s for s in jax.tree.leaves(optimizer.opt_state, is_leaf=is_mlorc)
          if is_mlorc(s)]


def test_compressor_suffixes_parse():
  spec = methods.parse('mlorc_adamw_r4_lorapre')
  assert (spec.kind, spec.family, spec.rank, spec.compressor) == (
      'mlorc', 'adamw', 4, 'lorapre')
  assert spec.label == 'MLorc-AdamW (r=4, lorapre)'
  assert methods.parse('mlorc_lion_r8_warm').compressor == 'warm'
  assert methods.parse('mlorc_adamw_r4').compressor == 'rsvd'
  assert spec.default_lr_grid == methods.parse('mlorc_adamw_r4').default_lr_grid
  for bad in ('adamw_warm', 'lora_r4_warm', 'mlorc_adamw_r4_svd',
              'mlorc_adamw_r4_rsvd', 'mlorc_adamw_warm'):
    with pytest.raises(ValueError):
      methods.parse(bad)
  assert set(methods.COMPRESSOR_METHODS) >= {*NEW, 'adamw', 'mlorc_adamw_r4'}
  for name in methods.COMPRESSOR_METHODS:
    methods.parse(name)


@pytest.mark.parametrize('name', NEW)
def test_a_few_steps_lower_the_loss_with_the_compressors_state(name):
  spec = methods.parse(name)
  model, optimizer = train.make_optimizer(spec, tiny_model(0), 0)
  factors = {'warm': mlorc_optax.LowRankFactors,
             'lorapre': mlorc_optax.contrib.LoRAPreFactors}[spec.compressor]
  core = _mlorc_states(optimizer)
  assert len(core) == 1
  mu = core[0].inner_state.mu
  kernels = [x for x in jax.tree.leaves(
      mu, is_leaf=lambda x: isinstance(x, factors)) if isinstance(x, factors)]
  assert len(kernels) == 6 * TINY.num_hidden_layers  # encoder kernels
  losses = run_steps(model, optimizer, synthetic(8, seed=1), 3e-3, 8)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.05, losses


def test_study_runs_the_new_methods_end_to_end():
  data = data_lib.Datasets(
      train=synthetic(32, seed=2),
      test=synthetic(16, seed=3),
      tune_train=synthetic(16, seed=4),
      tune_val=synthetic(8, seed=5),
  )
  config = tiny_config(methods=NEW, seeds=(0, 1), epochs=1.0, tune=False,
                       lr=tuple(f'{name}=3e-3' for name in NEW))
  results = study.study(config, model_factory=tiny_model, datasets=data,
                        log=lambda _: None)
  runs = results['runs']
  assert [(r['method'], r['seed']) for r in runs] == [
      (n, s) for n in NEW for s in (0, 1)]
  for r in runs:
    assert np.isfinite(r['final_train_loss']) and 0 <= r['accuracy'] <= 1
  by = {(r['method'], r['seed']): r for r in runs}
  # LoRA-Pre's state is (m + n) r per moment, the RSVD's (m + n) r + r.
  assert (by['mlorc_adamw_r4_lorapre', 0]['opt_state_bytes']
          < by['mlorc_adamw_r4_warm', 0]['opt_state_bytes'])


def test_the_run_seed_reaches_lorapres_initial_a():
  # Same model and batch; only the optimizer's seed differs.
  batch, lr = synthetic(8, seed=1), 3e-3
  factors = []
  for seed in (0, 1):
    model, optimizer = train.make_optimizer(
        methods.parse('mlorc_adamw_r4_lorapre'), tiny_model(0), seed)
    run_steps(model, optimizer, batch, lr, 1)
    mu = _mlorc_states(optimizer)[0].inner_state.mu
    # The A factor of every compressed kernel (LoRAPreFactors(b, a)).
    a = [x for path, x in jax.tree_util.tree_leaves_with_path(mu)
         if any(getattr(k, 'name', getattr(k, 'key', None)) == 'a'
                for k in path)]
    assert len(a) == 6 * TINY.num_hidden_layers
    factors.append(np.concatenate([np.ravel(x) for x in a]))
  assert not np.allclose(factors[0], factors[1])
