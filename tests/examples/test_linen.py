"""The Flax Linen T5-style example (``examples/linen``) on CPU, tiny size."""

from __future__ import annotations

import jax
import pytest

from examples.linen import model as model_lib
from examples.linen import train

TINY = model_lib.get_config('tiny')

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
  rows = [r.split('|')[1:-1] for r in table.splitlines()[2:-1]]
  return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_every_leaf_is_viewed_as_documented():
  rows = table_rows(train.plan_table(TINY, rank=4))
  got = {
      path: row[2] if row[2] != '-' else row[6]  # the view, or why not
      for path, row in rows.items()
  }
  assert got == VIEWS
  assert rows['layers/self_attention/query/kernel'][:2] == [
      '(layers, embed, heads, kv)', '(2, 32, 4, 8)']


def test_presets_and_parameter_count():
  params = model_lib.abstract_params(TINY)
  assert sum(x.size for x in jax.tree.leaves(params)) == TINY.num_params()
  large = model_lib.PRESETS['large']  # T5 v1.1-large widths, 24 layers
  assert (large.embed_dim, large.num_heads, large.head_dim, large.mlp_dim,
          large.num_layers) == (1024, 16, 64, 2816, 24)
  assert 300e6 < large.num_params() < 400e6


def test_tiny_model_trains_and_its_state_is_a_third_of_adamws():
  kw = dict(batch=8, seq_len=32, lr=3e-3, warmup=1, log_every=0,
            verbose=False)
  mlorc = train.run(TINY, 'mlorc_adamw', steps=20, **kw)
  adamw = train.run(TINY, 'adamw', steps=0, **kw)  # state only
  assert mlorc['final_loss'] < 0.85 * mlorc['first_loss'], mlorc['losses']
  assert mlorc['tokens_per_s'] > 0
  # Factors of rank 4 for every kernel; embeddings and scales stay dense.
  table = train.plan_table(TINY, rank=4)
  total = int(table.splitlines()[-1].split('|')[6].replace(',', ''))
  counters = 4 + 8 + 4  # MLorc count and key, the masked Adam's count
  assert mlorc['opt_state_bytes'] == total + counters
  assert mlorc['opt_state_bytes'] < 0.35 * adamw['opt_state_bytes']
  assert '| mlorc_adamw (r=4) |' in train.format_table([mlorc, adamw])


def test_every_flag_has_help(capsys):
  with pytest.raises(SystemExit):
    train.main(['--help'])
  text = capsys.readouterr().out
  for flag in ('--preset', '--steps', '--batch', '--seq-len', '--rank',
               '--mesh', '--json', '--print-plan', '--remat', '--dtype'):
    assert flag in text


def test_bad_mesh_is_a_clear_error():
  with pytest.raises(ValueError, match="mesh must look like '2x4'"):
    train.parse_mesh('2by4')
  with pytest.raises(ValueError, match='needs 64 devices'):
    train.parse_mesh('8x8')
