"""The plan: which leaves are compressed, how they are viewed, how masks
match, and which step computes each leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlorc_optax
from mlorc_optax import MatrixDimensionNumbers, compression_plan, path_mask
from mlorc_optax import contrib
from mlorc_optax._src import plan as plan_lib

from helpers import EPS32


def plan_of(params, rank=4, **kw):
  """The plan MLorc-Adam makes for ``params`` (``kw``: its arguments)."""
  return compression_plan(
      mlorc_optax.scale_by_mlorc_adam(rank=rank, **kw), params)


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
  plan = plan_of(params, rank=4)
  assert decisions(plan) == {
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
  assert plan['scan']['kernel'].view.batch_shape == (6,)
  assert plan['scan']['kernel'].view.rows == 64
  assert 'embedding' in plan['embed']['embedding'].reason
  # Lion and any optimizer under low_rank_moments follow the same rule.
  for tx in (mlorc_optax.scale_by_mlorc_lion(rank=4),
             mlorc_optax.low_rank_moments(optax.contrib.scale_by_adopt())):
    assert decisions(compression_plan(tx, params)) == decisions(plan)


def test_state_size_is_b_times_m_plus_n_times_r_plus_r_per_moment():
  plan = plan_of({'w': jnp.zeros((5, 30, 20)), 'b': jnp.zeros(20)}, rank=4)
  assert plan['w'].factor_sizes == (5 * ((30 + 20) * 4 + 4),) * 2
  assert plan['w'].moments == ('mu', 'nu') and plan['w'].dense_moments == 0
  assert plan['w'].state_size == plan['w'].factor_size == sum(
      plan['w'].factor_sizes)
  assert plan['w'].dense_state_size == 2 * 5 * 30 * 20
  assert plan['b'].state_size == plan['b'].dense_state_size == 2 * 20
  # The paper's ablation: one moment compressed, the other kept dense.
  plan = plan_of({'w': jnp.zeros((30, 20))}, compress=('mu',))
  assert plan['w'].moments == ('mu',) and plan['w'].dense_moments == 1
  assert plan['w'].state_size == (30 + 20) * 4 + 4 + 30 * 20
  plan = plan_of({'w': jnp.zeros((30, 20))}, rank=40, low_rank_mask=True)
  assert plan['w'].rank == 20  # capped at min(m, n)


def test_path_mask_selects_by_regex_and_never_selects_vectors():
  params = {'enc': {'q': {'kernel': jnp.zeros((8, 8)), 'bias': jnp.zeros(8)},
                    'mlp': {'kernel': jnp.zeros((8, 32))}},
            'embed': {'embedding': jnp.zeros((50, 8))}}
  got = decisions(plan_of(params, 2, low_rank_mask=path_mask(include='enc/')))
  assert got == {'enc/q/kernel': True, 'enc/q/bias': False,
                 'enc/mlp/kernel': True, 'embed/embedding': False}
  got = decisions(plan_of(params, 2, low_rank_mask=path_mask(exclude='mlp')))
  assert got['enc/mlp/kernel'] is False and got['embed/embedding'] is True


def test_prefix_mask_tree_is_broadcast_by_path():
  params = {'a': {'w': jnp.zeros((8, 8)), 'v': jnp.zeros((8, 4))},
            'b': {'w': jnp.zeros((8, 8))}}
  got = decisions(plan_of(params, 2, low_rank_mask={'a': True, 'b': False}))
  assert got == {'a/w': True, 'a/v': True, 'b/w': False}


def test_mask_that_does_not_match_the_params_names_the_path():
  params = {'a': jnp.zeros((8, 8)), 'b': jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match="no entry for the parameter 'b'"):
    plan_of(params, 2, low_rank_mask={'a': True})
  with pytest.raises(ValueError, match=r"match no parameter: \['c'\]"):
    plan_of(params, 2, low_rank_mask={'a': True, 'b': True, 'c': True})
  with pytest.raises(TypeError, match="for 'a'"):
    plan_of(params, 2, low_rank_mask={'a': 'yes', 'b': True})


def test_mask_selecting_a_vector_is_an_error_naming_it():
  params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
  with pytest.raises(ValueError, match="'b'.*no matrix view"):
    mlorc_optax.mlorc_adamw(1e-3, low_rank_mask=True).init(params)
  with pytest.raises(ValueError, match="'i'.*not a floating"):
    plan_of({'i': jnp.zeros((8, 8), jnp.int32)}, 2, low_rank_mask=True)
  with pytest.raises(ValueError, match="'e'.*empty"):
    plan_of({'e': jnp.zeros((0, 8))}, 2, low_rank_mask=True)


def test_dimension_numbers_per_leaf_and_views_round_trip():
  params = {'conv': jnp.arange(3 * 3 * 4 * 16.0).reshape(3, 3, 4, 16),
            'qkv': jnp.zeros((32, 4, 8)),            # (embed, heads, dim)
            'out': jnp.zeros((4, 8, 32))}            # (heads, dim, embed)
  dims = {'conv': MatrixDimensionNumbers((0, 1, 2), (3,)),
          'qkv': MatrixDimensionNumbers((0,), (1, 2)),
          'out': MatrixDimensionNumbers((0, 1), (2,))}
  plan = plan_of(params, 2, dimension_numbers=dims)
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
  # One (row_axes, col_axes) pair for every leaf, as jax.lax.dot_general's.
  plan = plan_of({'conv': params['conv']}, 2,
                 dimension_numbers=((0, 1, 2), (3,)))
  assert plan['conv'].view == view


def test_invalid_dimension_numbers():
  with pytest.raises(ValueError, match='row_axes'):
    MatrixDimensionNumbers((), (1,))
  with pytest.raises(ValueError, match='col_axes'):
    MatrixDimensionNumbers((0,), ('a',))
  # Overlapping or out-of-range axes give no view; a mask asking for one fails.
  assert MatrixDimensionNumbers(0, 0).view((4, 4)) is None
  assert MatrixDimensionNumbers(0, 5).view((4, 4)) is None
  with pytest.raises(ValueError, match='no matrix view'):
    plan_of({'w': jnp.zeros((4, 4))}, 2, low_rank_mask=True,
            dimension_numbers=MatrixDimensionNumbers(0, 0))


def test_dimension_numbers_none_means_no_matrix_view():
  params = {'w': jnp.zeros((8, 8)), 'stacked_scale': jnp.zeros((6, 64))}
  dims = {'w': MatrixDimensionNumbers(), 'stacked_scale': None}
  plan = plan_of(params, 2, dimension_numbers=dims)
  assert decisions(plan) == {'w': True, 'stacked_scale': False}
  assert plan['stacked_scale'].reason == (
      'dimension_numbers gives no matrix view')
  with pytest.raises(ValueError, match='no matrix view'):
    plan_of(params, 2, dimension_numbers=dims, low_rank_mask=True)
  with pytest.raises(TypeError, match="or None.*'w'"):
    plan_of(params, 2, dimension_numbers={'w': 'last two',
                                          'stacked_scale': None})


# --------------------------------------------------------------------------
# compression_plan reads the plan the transform made.
# --------------------------------------------------------------------------


def test_compression_plan_reads_the_transform_or_its_state():
  params = {'w': jnp.zeros((16, 8)), 'b': jnp.zeros(8)}
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=2)
  plan = compression_plan(tx, params)
  assert isinstance(plan['w'], mlorc_optax.plan.LeafPlan)
  # Abstract params: nothing is allocated.
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  assert compression_plan(tx, shapes) == plan
  # Wrapped in any way: chains, inject_hyperparams, a state.
  injected = optax.inject_hyperparams(
      mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
          learning_rate=1e-3, rank=2)
  wrapped = optax.chain(optax.clip_by_global_norm(1.0), injected)
  assert compression_plan(wrapped, params) == plan
  by_path = compression_plan(tx.init(params), None)
  assert by_path == {'w': plan['w'], 'b': plan['b']}
  with pytest.raises(ValueError, match='exactly one'):
    compression_plan(optax.adamw(1e-3), params)
  with pytest.raises(ValueError, match='exactly one'):
    compression_plan(optax.chain(tx, tx), params)


def test_format_plan_lists_every_leaf_its_step_and_the_total():
  params = {'w': jnp.zeros((4096, 4096)), 'b': jnp.zeros(4096)}
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=4, implementation='reference')
  table = mlorc_optax.format_plan(compression_plan(tx, params))
  lines = table.splitlines()
  assert len(lines) == 2 + 2 + 1
  assert lines[0].split('|')[1:-1] == [
      ' path ', ' shape ', ' dtype ', ' compressed ', ' matrix view ',
      ' rank ', ' state (numbers) ', ' dense state ', ' reason ', ' step ',
      ' why ']
  # Two moments: 2 (4096 + 4096) 4 + 2 * 4 numbers against 2 * 4096^2.
  assert ('| w | (4096, 4096) | float32 | yes | [4096x4096] | 4 | 65,544 | '
          "33,554,432 | default mask | reference | implementation='reference' "
          '|') in lines
  assert ('| b | (4096,) | float32 | no | - | - | 8,192 | 8,192 | ndim < 2 | '
          'dense | not compressed |') in lines
  assert lines[-1] == (
      '| total | | | | | | 73,736 | 33,562,624 | 0.22% of dense | | |')


# --------------------------------------------------------------------------
# Which step computes each leaf: decided once, in init.
# --------------------------------------------------------------------------


def steps_of(tx, params):
  return {p.path: (p.step, p.step_reason)
          for p in jax.tree.leaves(compression_plan(tx, params))}


def test_step_of_each_leaf():
  params = {'w': jnp.zeros((64, 128)),   # the kernels tile it
            'odd': jnp.zeros((24, 40)),  # they do not
            'thin': jnp.zeros((64, 6)),  # rank 4 + 2 >= 6 columns: exact
            'b': jnp.zeros(64)}

  def steps(implementation, make=mlorc_optax.scale_by_mlorc_adam, **kw):
    kw = {'oversample': 2} | kw
    return steps_of(make(rank=4, implementation=implementation, **kw),
                    params)

  not_compressed = ('dense', 'not compressed')
  exact = ('reference',
           'the RSVD is exact (no truncation, or the sketch is the identity)')
  assert steps('xla') == {
      'w': ('xla', "implementation='xla'"),
      'odd': ('xla', "implementation='xla'"),
      'thin': exact, 'b': not_compressed}
  assert steps('pallas') == {
      'w': ('pallas', "implementation='pallas'"),
      'odd': ('pallas',
              "implementation='pallas'; 24x40 padded to 32x64 tiles"),
      'thin': exact, 'b': not_compressed}
  assert steps('reference')['w'] == ('reference',
                                     "implementation='reference'")
  # Automatic: the Pallas step on one NVIDIA GPU only; Lion has the same rule.
  automatic = steps(None)
  assert automatic == steps(None, mlorc_optax.scale_by_mlorc_lion)
  if plan_lib.on_nvidia_gpu() and jax.device_count() == 1:
    assert automatic['w'] == ('pallas', 'automatic: one NVIDIA GPU')
  else:
    assert automatic['w'][0] == 'reference'
    assert automatic['w'][1].startswith('automatic: ')
  # Settings the two-pass step cannot compute: the reference step, and an
  # error if the two-pass step is asked for.
  blocked = {
      'not a randomized SVD': dict(compressor=contrib.LoRAPreCompressor(),
                                   oversample=None),
      'a dense moment is kept': dict(compress=('mu',)),
  }
  for why, kw in blocked.items():
    step, reason = steps(None, **kw)['w']
    assert step == 'reference' and reason.startswith('automatic: '), why
    assert why in reason, (why, reason)
    with pytest.raises(ValueError, match=why):
      steps('xla', **kw)
  with pytest.raises(ValueError, match='no two-pass step'):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), implementation='xla')
  with pytest.raises(ValueError, match='implementation'):
    steps('fast')


# --------------------------------------------------------------------------
# Flax NNX: masks by path, and nnx.Optimizer.
# --------------------------------------------------------------------------


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
    a = decisions(plan_of(wrapped, 4, low_rank_mask=mask))
    b = decisions(plan_of(pure, 4, low_rank_mask=mask))
    assert a == b == {'up/kernel': True, 'up/bias': False,
                      'norm/scale': False, 'norm/bias': False,
                      'down/kernel': True, 'down/bias': False}


X = jax.random.normal(jax.random.key(1), (8, 16))


def mean_square(model):
  return jnp.mean(model(X) ** 2)


def run_nnx(tx, loss_fn=mean_square, steps=30):
  """``steps`` jitted ``nnx.Optimizer`` steps on a fresh ``Mlp``.

  Returns the losses, the model, the optimizer, the smallest and largest
  gradient magnitude seen and how many times the step was traced.
  """
  model = Mlp(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, opt):
    traces.append(1)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    size = jnp.stack([f(jnp.abs(g)) for g in jax.tree.leaves(grads)
                      for f in (jnp.min, jnp.max)])
    return loss, size

  out = [step(model, opt) for _ in range(steps)]
  sizes = np.array([s for _, s in out])
  return ([float(l) for l, _ in out], model, opt,
          float(sizes[:, 0::2].min()), float(sizes[:, 1::2].max()), len(traces))


def slopes_like(tree):
  """Per entry, a random sign times a magnitude in [1, 2]."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return treedef.unflatten([
      jnp.sign(jax.random.normal(k, x.shape))
      * jax.random.uniform(k, x.shape, minval=1.0, maxval=2.0)
      for k, x in zip(keys, leaves)])


SLOPES = slopes_like(nnx.as_pure(nnx.state(Mlp(nnx.Rngs(0)), nnx.Param)))


def mean_square_plus_linear(model):
  """:func:`mean_square` plus ``sum(slope * param)``: every gradient entry
  stays away from 0."""
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  linear = sum(jnp.sum(p * s) for p, s in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(SLOPES)))
  return mean_square(model) + linear


def test_nnx_optimizer_trains_and_keeps_factors():
  losses, _, opt, _, _, traces = run_nnx(mlorc_optax.mlorc_adamw(1e-2, rank=4))
  assert losses[-1] < 0.2 * losses[0]
  assert traces == 1  # the state keeps its structure: no retracing
  state = nnx.as_pure(opt.opt_state)
  mu = state[0].inner_state.mu
  assert mu['up']['kernel'].u.shape == (16, 4)
  assert mu['up']['bias'].shape == (32,)  # Adam's own moment


def test_nnx_optimizer_at_full_rank_follows_optax_adamw():
  lr, steps = 1e-2, 30
  full = dict(rank=32, low_rank_mask=path_mask(include='kernel'))
  _, m1, _, low, high, _ = run_nnx(mlorc_optax.mlorc_adamw(lr, **full),
                                   mean_square_plus_linear, steps)
  _, m2, *_ = run_nnx(optax.adamw(lr), mean_square_plus_linear, steps)
  # A factored moment is exact only to float32 rounding of its largest entry
  # (README, "Precision and bad input"): ~64 units of 2^-24 for a QR and an
  # SVD of 16 x 32. Adam divides by sqrt(v), so where v is tiny (gradients
  # near 0) that rounding is amplified without bound; the linear term keeps
  # every gradient entry in [low, high], low > 0 (checked). Then v >= low^2
  # and m <= high, and the relative error of m_hat / sqrt(v_hat) is at most
  # 64 u (high / low + (high / low)^2 / 2) per step, so after ``steps``
  # steps of size ``lr`` each parameter is within the atol below of
  # optax.adamw's (to first order: the loss is dominated by its linear part).
  assert low > 0.25, (low, high)
  ratio = high / low
  atol = steps * lr * 64 * EPS32 / 2 * (ratio + ratio**2 / 2)
  for a, b in zip(jax.tree.leaves(nnx.state(m1)),
                  jax.tree.leaves(nnx.state(m2))):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
