"""Which leaves are compressed, how they are viewed, and how masks match."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlorc_optax
from mlorc_optax import MatrixDimensionNumbers, compression_plan, path_mask


def decisions(plan):
  return {p.path: p.compressed for p in jax.tree.leaves(plan)}


def test_default_rule_is_as_documented():
  params = {
      'attn': {'kernel': jnp.zeros((64, 64)), 'bias': jnp.zeros(64)},
      'scan': {'kernel': jnp.zeros((6, 64, 128)),   # stacked layers
               'bias': jnp.zeros((6, 128)),          # stacked biases
               'scale': jnp.zeros((6, 64))},         # stacked norm scales
      'embed': {'embedding': jnp.zeros((1000, 64))},
      'small': jnp.zeros((3, 64)),                   # min(3, 64) <= rank
      'ids': jnp.zeros((8, 8), jnp.int32),
      'scalar': jnp.zeros(()),
  }
  assert decisions(compression_plan(params, rank=4)) == {
      'attn/kernel': True,
      'attn/bias': False,
      'scan/kernel': True,
      'scan/bias': False,
      'scan/scale': False,
      'embed/embedding': False,
      'small': False,
      'ids': False,
      'scalar': False,
  }
  plan = compression_plan(params, rank=4)
  assert plan['scan']['kernel'].view.batch_shape == (6,)
  assert plan['scan']['kernel'].view.rows == 64
  assert 'embedding' in plan['embed']['embedding'].reason


def test_moment_size_is_b_times_m_plus_n_times_r_plus_r():
  plan = compression_plan({'w': jnp.zeros((5, 30, 20))}, rank=4)
  assert plan['w'].moment_size() == 5 * ((30 + 20) * 4 + 4)
  plan = compression_plan({'w': jnp.zeros((30, 20))}, rank=40,
                          low_rank_mask=True)
  assert plan['w'].rank == 20  # capped at min(m, n)


def test_path_mask_selects_by_regex_and_never_selects_vectors():
  params = {'enc': {'q': {'kernel': jnp.zeros((8, 8)), 'bias': jnp.zeros(8)},
                    'mlp': {'kernel': jnp.zeros((8, 32))}},
            'embed': {'embedding': jnp.zeros((50, 8))}}
  got = decisions(compression_plan(params, 2,
                                   low_rank_mask=path_mask(include='enc/')))
  assert got == {'enc/q/kernel': True, 'enc/q/bias': False,
                 'enc/mlp/kernel': True, 'embed/embedding': False}
  got = decisions(compression_plan(
      params, 2, low_rank_mask=path_mask(exclude='mlp')))
  assert got['enc/mlp/kernel'] is False and got['embed/embedding'] is True


def test_prefix_mask_tree_is_broadcast_by_path():
  params = {'a': {'w': jnp.zeros((8, 8)), 'v': jnp.zeros((8, 4))},
            'b': {'w': jnp.zeros((8, 8))}}
  got = decisions(compression_plan(params, 2,
                                   low_rank_mask={'a': True, 'b': False}))
  assert got == {'a/w': True, 'a/v': True, 'b/w': False}


def test_mask_that_does_not_match_the_params_names_the_path():
  params = {'a': jnp.zeros((8, 8)), 'b': jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match="no entry for the parameter 'b'"):
    compression_plan(params, 2, low_rank_mask={'a': True})
  with pytest.raises(ValueError, match=r"match no parameter: \['c'\]"):
    compression_plan(params, 2, low_rank_mask={'a': True, 'b': True,
                                               'c': True})
  with pytest.raises(TypeError, match="for 'a'"):
    compression_plan(params, 2, low_rank_mask={'a': 'yes', 'b': True})


def test_mask_selecting_a_vector_is_an_error_naming_it():
  params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
  with pytest.raises(ValueError, match="'b'.*no matrix view"):
    mlorc_optax.mlorc_adamw(1e-3, low_rank_mask=True).init(params)
  with pytest.raises(ValueError, match="'i'.*not a floating"):
    compression_plan({'i': jnp.zeros((8, 8), jnp.int32)}, 2,
                     low_rank_mask=True)


def test_dimension_numbers_per_leaf_and_views_round_trip():
  params = {'conv': jnp.arange(3 * 3 * 4 * 16.0).reshape(3, 3, 4, 16),
            'qkv': jnp.zeros((32, 4, 8)),            # (embed, heads, dim)
            'out': jnp.zeros((4, 8, 32))}            # (heads, dim, embed)
  dims = {'conv': MatrixDimensionNumbers((0, 1, 2), (3,)),
          'qkv': MatrixDimensionNumbers((0,), (1, 2)),
          'out': MatrixDimensionNumbers((0, 1), (2,))}
  plan = compression_plan(params, 2, dimension_numbers=dims)
  assert [(p.view.rows, p.view.cols) for p in jax.tree.leaves(plan)] == [
      (36, 16), (32, 32), (32, 32)]
  view = plan['conv'].view
  x = params['conv']
  np.testing.assert_array_equal(view.from_matrix(view.to_matrix(x)), x)
  np.testing.assert_array_equal(view.to_matrix(x), x.reshape(36, 16))
  # Non-adjacent axes: rows = axis 2, cols = axes (0, 1), batch = axis 3.
  odd = MatrixDimensionNumbers(2, (0, 1)).view((3, 5, 7, 2))
  y = jnp.arange(3 * 5 * 7 * 2.0).reshape(3, 5, 7, 2)
  assert odd.batch_shape == (2,) and (odd.rows, odd.cols) == (7, 15)
  np.testing.assert_array_equal(odd.from_matrix(odd.to_matrix(y)), y)


def test_invalid_dimension_numbers():
  with pytest.raises(ValueError, match='row_axes'):
    MatrixDimensionNumbers((), (1,))
  with pytest.raises(ValueError, match='col_axes'):
    MatrixDimensionNumbers((0,), ('a',))
  # Overlapping or out-of-range axes give no view; a mask asking for one fails.
  assert MatrixDimensionNumbers(0, 0).view((4, 4)) is None
  assert MatrixDimensionNumbers(0, 5).view((4, 4)) is None
  with pytest.raises(ValueError, match='no matrix view'):
    compression_plan({'w': jnp.zeros((4, 4))}, 2, low_rank_mask=True,
                     dimension_numbers=MatrixDimensionNumbers(0, 0))


def test_dimension_numbers_none_means_no_matrix_view():
  params = {'w': jnp.zeros((8, 8)), 'stacked_scale': jnp.zeros((6, 64))}
  dims = {'w': MatrixDimensionNumbers(), 'stacked_scale': None}
  plan = compression_plan(params, 2, dimension_numbers=dims)
  assert decisions(plan) == {'w': True, 'stacked_scale': False}
  assert plan['stacked_scale'].reason == (
      'dimension_numbers gives no matrix view')
  with pytest.raises(ValueError, match='no matrix view'):
    compression_plan(params, 2, dimension_numbers=dims, low_rank_mask=True)
  with pytest.raises(TypeError, match="or None.*'w'"):
    compression_plan(params, 2, dimension_numbers={'w': 'last two',
                                                    'stacked_scale': None})


def test_format_plan_lists_every_leaf_and_the_total():
  params = {'w': jnp.zeros((4096, 4096)), 'b': jnp.zeros(4096)}
  table = mlorc_optax.format_plan(compression_plan(params, rank=4))
  lines = table.splitlines()
  assert len(lines) == 2 + 2 + 1
  assert '| w | (4096, 4096) | float32 | yes | [4096x4096] | 4 | 65,544 |' in table
  assert lines[-1].startswith('| total |')


class Mlp(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.norm(self.up(x))))


def test_masks_match_nnx_variables_and_plain_arrays_alike():
  model = Mlp(nnx.Rngs(0))
  wrapped = nnx.state(model, nnx.Param)
  pure = nnx.as_pure(wrapped)
  pytree_mask = {'up': {'kernel': True, 'bias': False}, 'norm': False,
                 'down': {'kernel': True, 'bias': False}}
  for mask in (None, path_mask(include='kernel'), pytree_mask):
    a = decisions(compression_plan(wrapped, 4, low_rank_mask=mask))
    b = decisions(compression_plan(pure, 4, low_rank_mask=mask))
    assert a == b == {'up/kernel': True, 'up/bias': False,
                      'norm/scale': False, 'norm/bias': False,
                      'down/kernel': True, 'down/bias': False}


def test_nnx_optimizer_trains_and_keeps_factors():
  x = jax.random.normal(jax.random.key(1), (8, 16))

  def run(tx):
    model = Mlp(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    traces = []

    @nnx.jit
    def step(model, opt):
      traces.append(1)
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      opt.update(model, grads)
      return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert len(traces) == 1  # the state keeps its structure: no retracing
    return losses, model, opt

  losses, _, opt = run(mlorc_optax.mlorc_adamw(1e-2, rank=4))
  assert losses[-1] < 0.2 * losses[0]
  core = nnx.as_pure(opt.opt_state)[0][0]
  assert core.mu.u['up']['kernel'].shape == (16, 4)
  # At full rank the NNX run equals optax.adamw's.
  full = dict(rank=32, low_rank_mask=path_mask(include='kernel'))
  ours, m1, _ = run(mlorc_optax.mlorc_adamw(1e-2, **full))
  theirs, m2, _ = run(optax.adamw(1e-2))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2))):
    np.testing.assert_allclose(a, b, atol=1e-4)
