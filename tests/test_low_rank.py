"""Specification of low_rank_moments: MLorc around any optax optimizer.

The MLorc paper's claim is that momentum low-rank compression applies to any
momentum-based optimizer: reconstruct the moments, let the optimizer update
them, recompress. At full rank (``rank >= min(m, n)``, every matrix forced
into ``low_rank_mask``) the compression is exact, so ``low_rank_moments(inner)``
must compute what ``inner`` computes, step after step, up to float32 rounding
of the decomposition.

Tolerances. The gradients below keep one sign per entry and magnitudes in
``[0.5, 1.5]``, so no moment entry comes near 0 (nor Lion's ``c``, nor a
second moment under a square root: every ``v`` is within a factor 9 of its
largest entry, README "Precision and bad input"). Float32 Householder QR and
SVD of an ``m x n`` matrix reproduce it to a small multiple of
``sqrt(mn) eps max|A|`` (Higham, *Accuracy and Stability of Numerical
Algorithms*, Thm. 19.4 and Sec. 20.5); for these ``<= 16 x 12`` matrices that
is tens of ulps of the largest entry (up to ~30 observed, moments and updates
alike). Every comparison is therefore relative to the largest magnitude of
the leaf compared, with ``TOL = 2**8`` ulps: an 8x margin, and still four
orders of magnitude below any algorithmic difference (a wrong decay, bias
correction or moment changes the updates by 1e-3 or more).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax.compressors import reconstruct
from mlorc_optax.low_rank import MomentSpec

import numpy_reference as ref
from helpers import EPS32, all_matrices, factors, low_rank_state

TOL = 2**8 * EPS32
SHAPES = {'w': (16, 12), 'stack': (2, 6, 10), 'b': (12,)}
MATRICES = ('stack', 'w')  # compressed, in flatten order (sketch index i)
FULL_RANK = 16  # >= min(m, n) of every matrix: the compression is exact

# name -> (inner optimizer, its moment fields that are compressed).
INNER = {
    'scale_by_adam': (lambda: optax.scale_by_adam(), ('mu', 'nu')),
    'scale_by_adam(nesterov)': (
        lambda: optax.scale_by_adam(nesterov=True), ('mu', 'nu')),
    'scale_by_lion': (lambda: optax.scale_by_lion(), ('mu',)),
    'trace': (lambda: optax.trace(0.9, nesterov=True), ('trace',)),
    'scale_by_adopt': (lambda: optax.contrib.scale_by_adopt(), ('mu', 'nu')),
    'scale_by_ademamix': (
        lambda: optax.contrib.scale_by_ademamix(0.9, 0.999, 0.999, 5.0),
        ('m1', 'm2', 'nu')),
    'dadapt_adamw': (lambda: optax.contrib.dadapt_adamw(),
                     ('exp_avg', 'exp_avg_sq', 'grad_sum')),
    'prodigy': (lambda: optax.contrib.prodigy(),
                ('exp_avg', 'exp_avg_sq', 'grad_sum')),
    'scale_by_adam_atan2': (
        lambda: mlorc_optax.contrib.scale_by_adam_atan2(), ('mu', 'nu')),
    'scale_by_adam_atan2(nesterov)': (
        lambda: mlorc_optax.contrib.scale_by_adam_atan2(nesterov=True),
        ('mu', 'nu')),
}


def make_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {name: jax.random.normal(k, shape)
          for k, (name, shape) in zip(keys, sorted(SHAPES.items()))}


def make_grads(steps, seed=1):
  """Gradients of one sign per entry and magnitudes in [0.5, 1.5]."""
  key = jax.random.key(seed)
  signs, grads = {}, []
  for name, shape in sorted(SHAPES.items()):
    key, k = jax.random.split(key)
    signs[name] = jnp.where(jax.random.bernoulli(k, 0.5, shape), 1.0, -1.0)
  for _ in range(steps):
    g = {}
    for name, shape in sorted(SHAPES.items()):
      key, k = jax.random.split(key)
      g[name] = signs[name] * (0.5 + jax.random.uniform(k, shape))
    grads.append(g)
  return grads


def trajectory(tx, grads, params=None, **extra_args):
  """Updates of ``tx`` along ``grads``, with params moved by the updates.

  The gradients do not depend on the params (so rounding differences do not
  feed back through them), but the params move, for the optimizers that read
  them (D-Adaptation, Prodigy, weight decay).
  """
  params = make_params() if params is None else params
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = step(g, state, params, **extra_args)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, state


def _is_factors(x):
  return isinstance(x, mlorc_optax.LowRankFactors)


def dense_inner_state(state):
  """The inner state of a low_rank_moments state, factors reconstructed."""
  return jax.tree.map(
      lambda x: reconstruct(x) if _is_factors(x) else x,
      low_rank_state(state).inner_state, is_leaf=_is_factors)


def assert_close_to_largest(ours, theirs, tol=TOL, what=''):
  """Every leaf within ``tol`` times the largest magnitude of ``theirs``."""
  assert jax.tree.structure(ours) == jax.tree.structure(theirs), what
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours),
                          jax.tree.leaves(theirs)):
    x, y = np.asarray(x), np.asarray(y)
    where = f'{what}{jax.tree_util.keystr(path)}'
    assert x.shape == y.shape and x.dtype == y.dtype, where
    if not np.issubdtype(y.dtype, np.floating):
      np.testing.assert_array_equal(x, y, err_msg=where)
      continue
    scale = np.max(np.abs(y)) if y.size else 0.0
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale, err_msg=where)


def assert_equals_inner(inner, grads, moments=None, **kwargs):
  """Full-rank low_rank_moments(inner) follows inner: updates and state."""
  tx = mlorc_optax.low_rank_moments(
      inner, rank=FULL_RANK, low_rank_mask=all_matrices, moments=moments)
  ours, state = trajectory(tx, grads, **kwargs)
  theirs, expected = trajectory(inner, grads, **kwargs)
  # The factors start at zero (every optax moment starts at zero), so the
  # first step is exactly the inner one's, at any rank: the same float32
  # operations, which XLA may fuse differently (4 ulps).
  assert_close_to_largest(ours[0], theirs[0], tol=4 * EPS32, what='step 0: ')
  for t, (a, b) in enumerate(zip(ours, theirs)):
    assert_close_to_largest(a, b, what=f'step {t}: update')
  # The moments read back from the factors are the inner optimizer's, and
  # every other field (counters, learning-rate estimates) is its own.
  assert_close_to_largest(dense_inner_state(state), expected, what='state')
  return tx, state


# ----------------------------------------------------------------------------
# Full rank: any optimizer, exactly.


@pytest.mark.parametrize('name', INNER)
def test_full_rank_equals_the_inner_optimizer(name):
  make_inner, fields = INNER[name]
  tx, state = assert_equals_inner(make_inner(), make_grads(6))
  plan = mlorc_optax.compression_plan(tx, make_params())
  for leaf in MATRICES:
    assert plan[leaf].moments == fields, leaf
    for field in fields:
      assert _is_factors(factors(state, leaf, moment=field)), (leaf, field)
  assert not plan['b'].compressed
  for field in fields:
    assert factors(state, 'b', moment=field).shape == SHAPES['b']


@pytest.mark.parametrize('name', INNER)
def test_low_rank_state_holds_factors_of_the_right_shapes(name):
  make_inner, fields = INNER[name]
  tx = mlorc_optax.low_rank_moments(make_inner(), rank=2)
  params, (g,) = make_params(), make_grads(1)
  state = tx.init(params)
  for field in fields:
    f = factors(state, 'w', moment=field)
    assert (f.u.shape, f.s.shape, f.v.shape) == ((16, 2), (2,), (12, 2))
    f = factors(state, 'stack', moment=field)
    assert (f.u.shape, f.s.shape, f.v.shape) == ((2, 6, 2), (2, 2), (2, 10, 2))
    assert factors(state, 'b', moment=field).shape == (12,)  # dense
  # The state keeps its structure, shapes and dtypes through the update
  # (traced only: values are checked at full rank above, and at low rank by
  # the sketch-key test below and tests/test_mlorc.py).
  updates, new_state = jax.eval_shape(tx.update, g, state, params)
  assert jax.tree.map(lambda u: (u.shape, u.dtype), updates) == jax.tree.map(
      lambda x: (x.shape, x.dtype), g)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_sketch_key_of_each_field_is_its_index_among_the_moment_fields():
  # AdEMAMix's m1, m2, nu are fields 0, 1, 2: after the first step (factors
  # from zero, so the new moments are known exactly) the factors of field j
  # of the i-th compressed leaf are the randomized SVD of paper Algorithm 3
  # with the sketch drawn from fold_in(fold_in(fold_in(key, 0), i), j).
  b1, b2, b3, rank, seed = 0.9, 0.999, 0.99, 2, 7
  inner = optax.contrib.scale_by_ademamix(b1, b2, b3, 5.0)
  tx = mlorc_optax.low_rank_moments(inner, rank=rank, seed=seed)
  params, (g,) = make_params(), make_grads(1)
  _, state = jax.jit(tx.update)(g, tx.init(params), params)
  new = {'m1': lambda x: (1 - b1) * x, 'm2': lambda x: (1 - b3) * x,
         'nu': lambda x: (1 - b2) * x**2}
  for i, leaf in enumerate(MATRICES):
    x = np.asarray(g[leaf], np.float64)
    *batch, m, n = x.shape
    for j, field in enumerate(('m1', 'm2', 'nu')):
      omega = ref.sketch(jax.random.PRNGKey(seed), 0, i, j, batch, n,
                         min(rank, m, n))
      moment = new[field](x)
      expected = ref.reconstruct(*ref.rsvd(moment, omega, rank))
      # Rank-2 RSVD in float32 vs float64: float32 rounding of the sketch
      # products, amplified by the sketch's conditioning; the old Algorithm
      # 1 comparison's 1e-5 of the largest entry.
      ours = reconstruct(factors(state, leaf, moment=field))
      np.testing.assert_allclose(ours, expected, rtol=0,
                                 atol=1e-5 * np.max(np.abs(moment)),
                                 err_msg=f'{leaf} {field}')


def test_prodigy_keeps_its_copy_of_the_params_dense():
  tx = mlorc_optax.low_rank_moments(optax.contrib.prodigy(), rank=2)
  params = make_params()
  state = tx.init(params)
  inner = low_rank_state(state).inner_state
  assert isinstance(inner, optax.contrib.ProdigyState)
  # params0 is params-shaped but no moment: kept as Prodigy keeps it.
  jax.tree.map(np.testing.assert_array_equal, inner.params0, params)
  plan = mlorc_optax.compression_plan(tx, params)['w']
  assert plan.moments == ('exp_avg', 'exp_avg_sq', 'grad_sum')
  _, state = jax.jit(tx.update)(make_grads(1)[0], state, params)
  jax.tree.map(np.testing.assert_array_equal,
               low_rank_state(state).inner_state.params0, params)


# ----------------------------------------------------------------------------
# moments=: which fields are compressed.


def test_fields_not_selected_stay_dense_and_exact():
  # The paper's ablation (Table 7) for any optimizer: AdEMAMix with its slow
  # EMA m2 left dense; m2 is then AdEMAMix's own, to rounding of the same
  # float32 operations (8 ulps).
  inner = optax.contrib.scale_by_ademamix(0.9, 0.999, 0.999, 5.0)
  grads = make_grads(4)
  tx, state = assert_equals_inner(inner, grads, moments=('m1', 'nu'))
  assert mlorc_optax.compression_plan(tx, make_params())['w'].moments == (
      'm1', 'nu')
  assert _is_factors(factors(state, 'w', moment='m1'))
  assert _is_factors(factors(state, 'w', moment='nu'))
  _, expected = trajectory(inner, grads)
  for leaf in SHAPES:
    np.testing.assert_allclose(factors(state, leaf, moment='m2'),
                               expected.m2[leaf], rtol=8 * EPS32, atol=0)


@pytest.mark.parametrize('moments,compressed,nonnegative', [
    (('mu',), ('mu',), {'mu': False, 'nu': True}),
    ('nu', ('nu',), {'mu': False, 'nu': True}),
    ({'mu': MomentSpec()}, ('mu',), {'mu': False, 'nu': True}),
    ({'mu': True, 'nu': False}, ('mu', 'nu'), {'mu': True, 'nu': False}),
    ({'nu': MomentSpec(nonnegative=True, decay=0.999)}, ('nu',),
     {'mu': False, 'nu': True}),
])
def test_moments_as_names_or_a_mapping(moments, compressed, nonnegative):
  tx = mlorc_optax.low_rank_moments(optax.scale_by_adam(), rank=2,
                                    moments=moments)
  state = tx.init(make_params())
  for field in ('mu', 'nu'):
    held = factors(state, 'w', moment=field)
    assert _is_factors(held) == (field in compressed), field
    if field not in compressed:
      assert held.shape == SHAPES['w']
  fields = {f.name: f for f in low_rank_state(state).plan.fields}
  assert {n for n, f in fields.items() if f.compressed} == set(compressed)
  assert {n: f.nonnegative for n, f in fields.items()} == nonnegative
  assert [fields['mu'].index, fields['nu'].index] == [0, 1]


class HeavyBallState(NamedTuple):
  velocity: optax.Updates


def heavy_ball(decay):
  """SGD momentum whose state field has a name optax does not use."""

  def init_fn(params):
    return HeavyBallState(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    velocity = jax.tree.map(lambda v, g: decay * v + g, state.velocity,
                            updates)
    return velocity, HeavyBallState(velocity)

  return optax.GradientTransformation(init_fn, update_fn)


def test_moments_mapping_names_a_field_of_a_custom_optimizer():
  _, state = assert_equals_inner(heavy_ball(0.8), make_grads(4),
                                 moments={'velocity': MomentSpec()})
  assert _is_factors(factors(state, 'w', moment='velocity'))
  # Without it the wrapper finds no moment, and says what to pass.
  tx = mlorc_optax.low_rank_moments(heavy_ball(0.8))
  with pytest.raises(ValueError, match='found none.*moments='):
    tx.init(make_params())


@pytest.mark.parametrize('moments,error,match', [
    (('velocity',), ValueError, "moments names \\['velocity'\\]"),
    (('mu', 'sigma'), ValueError, "moments names \\['sigma'\\]"),
    ((), ValueError, 'moments must name at least one'),
    ({}, ValueError, 'moments must name at least one'),
    ({'mu': 'yes'}, TypeError, 'moments must map field names to MomentSpec'),
    ({0: MomentSpec()}, TypeError, 'moments must map field names'),
])
def test_invalid_moments_raise_naming_the_argument(moments, error, match):
  with pytest.raises(error, match=match):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), moments=moments)


@pytest.mark.parametrize('inner,moments', [
    (optax.scale(0.5), None),                # no state at all
    (optax.scale_by_adam(), ('trace',)),     # Adam has no 'trace'
    (optax.trace(0.9), {'mu': MomentSpec()}),
])
def test_no_moment_field_found_is_an_error_at_init(inner, moments):
  tx = mlorc_optax.low_rank_moments(inner, moments=moments)
  with pytest.raises(ValueError, match='found none of the moment fields'):
    tx.init(make_params())


# ----------------------------------------------------------------------------
# Inner transforms that are combinations.


def test_chained_inner_optimizer_has_its_moments_found_in_each_link():
  # Adam's mu, nu (link 0) and a trace of its directions (link 1): fields
  # 0, 1 and 2, all compressed; weight decay reads the params.
  inner = optax.chain(optax.scale_by_adam(), optax.trace(0.5),
                      optax.add_decayed_weights(0.1), optax.scale(-0.1))
  _, state = assert_equals_inner(inner, make_grads(5))
  fields = low_rank_state(state).plan.fields
  assert [(f.location, f.name, f.index) for f in fields] == [
      ((0,), 'mu', 0), ((0,), 'nu', 1), ((1,), 'trace', 2)]
  assert all(f.compressed for f in fields)
  for field in ('mu', 'nu', 'trace'):
    assert _is_factors(factors(state, 'w', moment=field))


@pytest.mark.parametrize('mask', [
    {'w': True, 'stack': True, 'b': False},
    {'w': False, 'stack': True, 'b': True},  # a compressed leaf masked out
])
def test_masked_inner_optimizer(mask):
  # optax.masked keeps moments only for the leaves it updates; MaskedNode
  # stands for the others in its state.
  inner = optax.masked(optax.scale_by_adam(), mask)
  _, state = assert_equals_inner(inner, make_grads(4))
  moments = low_rank_state(state).inner_state.inner_state.mu
  for leaf in MATRICES:
    assert _is_factors(moments[leaf]) == mask[leaf], leaf


def scale_by_extra_arg():
  """Multiplies the updates by the extra argument ``factor`` of update."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, factor=1.0, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: factor * u, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def test_extra_args_are_passed_to_the_inner_optimizer():
  inner = optax.chain(optax.scale_by_adam(), scale_by_extra_arg())
  grads = make_grads(3)
  tx, _ = assert_equals_inner(inner, grads, factor=-0.5)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  with_arg, _ = trajectory(tx, grads, factor=-0.5)
  without, _ = trajectory(tx, grads[:1])
  # The first step is Adam's (factors start at zero), times the factor.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -0.5 * b,
                                                       rtol=4 * EPS32),
               with_arg[0], without[0])


# ----------------------------------------------------------------------------
# compressor=: any compressor under any optimizer.


@pytest.mark.parametrize('compressor', [
    mlorc_optax.compressors.RSVDCompressor(),
    mlorc_optax.contrib.WarmStartCompressor(),
    mlorc_optax.contrib.LoRAPreCompressor(),
], ids=lambda c: type(c).__name__)
def test_adam_atan2_first_step_with_any_compressor(compressor):
  # MLorc-Adam-atan2 (was mlorc_adamw(atan2=True)): every compressor's
  # factors start as an all-zero moment, so the first step is Adam-atan2's
  # (to 4 ulps, as above), a * atan2(g, |g|) = a * pi / 4 * sign(g) with
  # a = 1.27, whatever |g| is: up to optax's float32 bias correction
  # 1 - b2**t, whose relative rounding error is eps / (1 - b2) = 1.2e-4.
  # LoRA-Pre models each moment as an EMA: moments= gives it the decays.
  inner = mlorc_optax.contrib.scale_by_adam_atan2(0.9, 0.999)
  moments = {'mu': MomentSpec(decay=0.9),
             'nu': MomentSpec(nonnegative=True, decay=0.999)}
  tx = mlorc_optax.low_rank_moments(inner, rank=2, compressor=compressor,
                                    moments=moments)
  params, (g,) = make_params(), make_grads(1)
  state = tx.init(params)
  assert isinstance(factors(state, 'w'), compressor.factor_type)
  updates, _ = jax.jit(tx.update)(g, state, params)
  theirs, _ = jax.jit(inner.update)(g, inner.init(params))
  assert_close_to_largest(updates, theirs, tol=4 * EPS32)
  jax.tree.map(
      lambda u, x: np.testing.assert_allclose(
          u, 1.27 * np.pi / 4 * np.sign(x), rtol=EPS32 / (1 - 0.999), atol=0),
      updates, g)
