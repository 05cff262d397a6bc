"""The Flax Linen T5-style example (``examples/linen``) on CPU, tiny size."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tyro
from jax.sharding import PartitionSpec as P

from examples.linen import config as config_lib
from examples.linen import main
from examples.linen import model as model_lib
from examples.linen import train

TINY = model_lib.get_config('tiny')

#: The example's ``cpu`` preset, quiet, short sequences.
CPU = config_lib.PRESETS['cpu'][1].replace(
    seq_len=16, lr=3e-3, warmup=1, log_every=0, print_plan=False, quiet=True)

#: The documented view of every leaf (docs/linen.md): ``None`` for leaves
#: that are not compressed, with the reason.
VIEWS = {
    'token_embedder/embedding': "default mask excludes 'embedding'",
    'relpos_bias/embedding': "default mask excludes 'embedding'",
    'layers/pre_self_attention_layer_norm/scale':
        'dimension_numbers gives no matrix view',
    'layers/self_attention/query/kernel': 'layers=2 x [embed=32 x heads*kv=32]',
    'layers/self_attention/key/kernel': 'layers=2 x [embed=32 x heads*kv=32]',
    'layers/self_attention/value/kernel': 'layers=2 x [embed=32 x heads*kv=32]',
    'layers/self_attention/out/kernel': 'layers=2 x [heads*kv=32 x embed=32]',
    'layers/pre_mlp_layer_norm/scale': 'dimension_numbers gives no matrix view',
    'layers/mlp/wi_0/kernel': 'layers=2 x [embed=32 x mlp=64]',
    'layers/mlp/wi_1/kernel': 'layers=2 x [embed=32 x mlp=64]',
    'layers/mlp/wo/kernel': 'layers=2 x [mlp=64 x embed=32]',
    'decoder_norm/scale': 'ndim < 2',
    'logits_dense/kernel': '[embed=32 x vocab=128]',
}


def table_rows(table: str) -> dict[str, list[str]]:
  rows = [r.split('|')[1:-1] for r in table.splitlines()[2:]]
  return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_every_leaf_is_viewed_as_documented():
  rows = table_rows(train.plan_table(TINY, rank=4))
  total = rows.pop('total')
  got = {
      path: row[2] if row[2] != '-' else row[6]  # the view, or why not
      for path, row in rows.items()
  }
  assert got == VIEWS
  # Compressed leaves take an MLorc step, the others Adam's own.
  for path, row in rows.items():
    assert (row[7] == 'dense') == (row[2] == '-'), (path, row[7])
  assert rows['layers/self_attention/query/kernel'][:2] == [
      '(layers, embed, heads, kv)', '(2, 32, 4, 8)']
  assert int(total[4].replace(',', '')) > 0


def test_presets_and_parameter_count():
  params = model_lib.abstract_params(TINY)
  assert sum(x.size for x in jax.tree.leaves(params)) == TINY.num_params()
  large = model_lib.PRESETS['large']  # T5 v1.1-large widths, 24 layers
  assert (large.embed_dim, large.num_heads, large.head_dim, large.mlp_dim,
          large.num_layers) == (1024, 16, 64, 2816, 24)
  assert 300e6 < large.num_params() < 400e6
  assert CPU.model_config() == TINY
  gpu = config_lib.PRESETS['gpu'][1]
  assert gpu.model_config() == model_lib.get_config(
      'large', dtype='bfloat16', remat=True)


@pytest.fixture(scope='module')
def runs():
  """mlorc_adamw 20 steps on one device and 4 on a 2x4 mesh; adamw's state."""
  return {
      'single': train.run(CPU.replace(steps=20), 'mlorc_adamw'),
      'sharded': train.run(CPU.replace(steps=4, mesh='2x4'), 'mlorc_adamw'),
      'adamw': train.run(CPU.replace(steps=0), 'adamw'),  # state only
  }


def test_tiny_model_trains_and_its_state_is_a_third_of_adamws(runs):
  mlorc, adamw = runs['single'], runs['adamw']
  assert mlorc['final_loss'] < 0.85 * mlorc['first_loss'], mlorc['losses']
  assert mlorc['tokens_per_s'] > 0 and 'losses' not in adamw
  # Factors of rank 4 for every kernel; embeddings and scales stay dense.
  total = table_rows(train.plan_table(TINY, rank=4))['total']
  counters = 4 + 8 + 4  # low_rank_moments' step and key, Adam's count
  assert mlorc['opt_state_bytes'] == int(total[4].replace(',', '')) + counters
  assert mlorc['opt_state_bytes'] < 0.35 * adamw['opt_state_bytes']
  rows = table_rows(train.format_table([mlorc, adamw]))
  assert rows['adamw'][4] == '100.00%'  # adamw ran no step: no tokens/s
  assert rows['mlorc_adamw (r=4)'][4] == (
      f'{mlorc["opt_state_bytes"] / adamw["opt_state_bytes"]:.2%}')


def test_sharded_run_places_the_state_by_the_rules_and_equals_one_device(runs):
  """``--mesh 2x4`` on the 8 CPU devices of the root conftest.py."""
  mesh = train.parse_mesh('2x4')
  tx = train.make_optimizer('mlorc_adamw', CPU, model_lib.logical_axes(TINY))
  shardings = train.state_shardings(
      jax.eval_shape(train.init_fn(TINY, tx)), mesh)
  query = shardings.opt_state[0].inner_state.mu['layers']['self_attention'][
      'query']['kernel']
  # u: (layers, embed -> data, rank); v: (layers, heads*kv -> model, rank).
  assert (query.u.spec, query.v.spec) == (P(None, 'data', None),
                                          P(None, 'model', None))
  # The same batches; float32 sums in another order (rounding only).
  np.testing.assert_allclose(runs['sharded']['losses'],
                             runs['single']['losses'][:4], rtol=1e-5)


def test_every_setting_has_help_and_presets_parse(capsys):
  with pytest.raises(SystemExit):
    main.main(['cpu', '--help'])
  text = capsys.readouterr().out
  for flag in ('--model', '--steps', '--batch', '--seq-len', '--rank',
               '--mesh', '--result-json', '--print-plan', '--remat',
               '--dtype'):
    assert flag in text
  parsed = tyro.extras.overridable_config_cli(
      config_lib.PRESETS, args=['gpu', '--steps', '3', '--no-remat'])
  assert parsed == config_lib.PRESETS['gpu'][1].replace(steps=3, remat=False)


def test_plan_preset_prints_the_table_without_training(capsys):
  assert main.main(['plan']) == []
  rows = table_rows(capsys.readouterr().out.strip())
  assert rows['layers/mlp/wi_0/kernel'][2] == (
      'layers=24 x [embed=1024 x mlp=2816]')


def test_bad_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match="mesh must look like '2x4'"):
    train.parse_mesh('2by4')
  with pytest.raises(ValueError, match='needs 64 devices'):
    train.parse_mesh('8x8')
