"""Specification of scale_by_mlorc_adam / scale_by_mlorc_lion (Algorithms 1-2)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax.compressors import nonnegative_second_moment
from mlorc_optax.compressors import reconstruct

import numpy_reference as ref
from helpers import all_matrices, factors, loss_fn, make_params, run_steps

B1, B2, EPS = 0.9, 0.999, 1e-8


def random_grads(shapes, steps, seed=0, low_rank=None):
  """A fixed gradient sequence (noisy, optionally near low-rank)."""
  out = []
  key = jax.random.key(seed)
  for _ in range(steps):
    g = {}
    for name, shape in sorted(shapes.items()):
      key, k1, k2, k3 = jax.random.split(key, 4)
      x = jax.random.normal(k1, shape)
      if low_rank:
        *batch, m, n = shape
        a = jax.random.normal(k2, (*batch, m, low_rank))
        b = jax.random.normal(k3, (*batch, low_rank, n))
        x = a @ b + 0.1 * x
      g[name] = x
    out.append(g)
  return out


def adam_core(tx_kwargs):
  return mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, **tx_kwargs)


def test_first_step_equals_adam_exactly(params):
  grads = jax.grad(loss_fn)(params)
  tx = adam_core(dict(rank=2))
  ours, _ = tx.update(grads, tx.init(params))
  adam = optax.scale_by_adam(B1, B2, EPS)
  theirs, _ = adam.update(grads, adam.init(params))
  # Same formula, same float32 operations; only XLA's fusion of optax's
  # jitted bias correction can change the last bit (optax itself differs by
  # one ulp between a one-leaf tree and this tree).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2.5e-7,
                                                       atol=0), ours, theirs)


def test_state_holds_only_factors_of_the_documented_size(params):
  rank = 3
  tx = adam_core(dict(rank=rank, low_rank_mask=all_matrices))
  state = tx.init(params)
  assert isinstance(state, mlorc_optax.LowRankMomentsState)
  assert isinstance(state.inner_state, optax.ScaleByAdamState)
  plan = mlorc_optax.compression_plan(tx, params)
  compressed = {'wide': (6, 20), 'stack': (3, 12, 9), 'dense/kernel': (24, 10)}
  for moment in ('mu', 'nu'):
    for path, shape in compressed.items():
      f = factors(state, *path.split('/'), moment=moment)
      assert isinstance(f, mlorc_optax.LowRankFactors)
      *batch, m, n = shape
      size = sum(x.size for x in f)
      b = int(np.prod(batch))
      assert size == b * ((m + n) * rank + rank)  # B((m+n)r + r)
      # No array in the state is as large as the matrix.
      assert all(x.size < b * m * n for x in f)
  # The plan counts exactly what the state holds, leaf by leaf.
  for p in jax.tree.leaves(plan):
    assert p.compressed == (p.path in compressed)
    held = [factors(state, *p.path.split('/'), moment=m) for m in ('mu', 'nu')]
    assert sum(x.size for x in jax.tree.leaves(held)) == p.state_size
    assert p.dense_state_size == 2 * p.size
    if p.compressed:
      assert p.moments == ('mu', 'nu') and p.dense_moments == 0
      assert p.state_size == p.factor_size == 2 * p.factor_sizes[0]


def test_uncompressed_leaves_are_updated_by_the_exact_base_adam(params):
  grads = jax.grad(loss_fn)(params)
  tx = adam_core(dict(rank=2))
  adam = optax.scale_by_adam(B1, B2, EPS)
  s, sa = tx.init(params), adam.init(params)
  for _ in range(3):
    u, s = tx.update(grads, s)
    ua, sa = adam.update(grads, sa)
  for path in (('dense', 'bias'), ('scale',)):
    ours, theirs = u, ua
    for p in path:
      ours, theirs = ours[p], theirs[p]
    np.testing.assert_array_equal(ours, theirs)
    assert np.all(np.asarray(ours) != 0)  # never skipped or frozen


@pytest.mark.parametrize('oversample,power_iters', [(0, 0), (2, 1)])
def test_adam_matches_dense_numpy_algorithm_1(oversample, power_iters):
  shapes = {'a': (20, 12), 'b': (2, 10, 16), 'c': (7, 30)}
  rank, seed = 3, 42
  grads = random_grads(shapes, 10, low_rank=2)
  tx = adam_core(dict(rank=rank, seed=seed, oversample=oversample,
                      power_iters=power_iters, complement=0.0))
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  reference = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, B1, B2,
                             EPS, oversample, power_iters)
  for t, g in enumerate(grads):
    ours, state = step(g, state)
    theirs = reference.step(g)
    for k in shapes:
      np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-3, atol=2e-4,
                                 err_msg=f'step {t}, leaf {k}')
    # The low-rank moments themselves agree too.
    for k in shapes:
      np.testing.assert_allclose(
          reconstruct(factors(state, k)),
          ref.reconstruct(*reference.factors[k]['mu']), atol=1e-5)


def test_lion_matches_dense_numpy_algorithm_2():
  shapes = {'a': (20, 12), 'b': (2, 10, 16)}
  rank, seed = 3, 7
  grads = random_grads(shapes, 10, seed=1, low_rank=2)
  tx = mlorc_optax.scale_by_mlorc_lion(0.9, 0.99, rank=rank, seed=seed,
                                       **mlorc_optax.PAPER_LION)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = tx.init(params)
  reference = ref.MLorcLion(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.99)
  agree = total = 0
  for g in grads:
    ours, state = jax.jit(tx.update)(g, state)
    theirs = reference.step(g)
    for k in shapes:
      agree += np.sum(np.asarray(ours[k]) == theirs[k])
      total += theirs[k].size
    for k in shapes:
      np.testing.assert_allclose(reconstruct(factors(state, k)),
                                 ref.reconstruct(*reference.factors[k]),
                                 atol=1e-4)
  # sign() may flip only where c is ~0 within float32 rounding.
  assert agree / total > 0.999


def test_zeta_fix_replaces_negatives_by_their_mean_magnitude_per_matrix():
  v = jnp.array([[[1.0, -0.2], [-0.4, 2.0]],
                 [[0.5, 0.0], [3.0, -1.0]]])
  fixed = nonnegative_second_moment(v)
  np.testing.assert_allclose(fixed, [[[1.0, 0.3], [0.3, 2.0]],
                                     [[0.5, 0.0], [3.0, 1.0]]])
  np.testing.assert_array_equal(nonnegative_second_moment(jnp.zeros((3, 3))),
                                0.0)


def test_zeta_fix_never_leaves_a_negative_second_moment():
  key = jax.random.key(0)
  v = jax.random.normal(key, (4, 16, 16))
  fixed = nonnegative_second_moment(v)
  assert np.all(np.asarray(fixed) >= 0)
  assert np.all(np.asarray(fixed)[np.asarray(v) < 0] > 0)


def test_reconstructed_second_moment_is_positive_in_training():
  """At low rank the reconstruction goes negative; the update stays finite."""
  shapes = {'a': (32, 24)}
  grads = random_grads(shapes, 30, seed=3)
  tx = adam_core(dict(rank=2))
  state = tx.init({'a': jnp.zeros((32, 24))})
  saw_negative = False
  for g in grads:
    v = reconstruct(factors(state, 'a', moment='nu'))
    saw_negative |= bool(jnp.any(v < 0))
    assert np.all(np.asarray(nonnegative_second_moment(v)) >= 0)
    u, state = tx.update(g, state)
    assert np.all(np.isfinite(u['a']))
  assert saw_negative  # the fix was actually exercised


@pytest.mark.parametrize('make_tx', [
    lambda: mlorc_optax.mlorc_adamw(1e-3, rank=2),
    lambda: mlorc_optax.mlorc_lion(1e-4, rank=2),
])
def test_zero_gradients_for_100_steps_stay_finite(params, make_tx):
  tx = make_tx()
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(zeros, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.lax.scan(body, (params, state), None, length=100)
  for x in jax.tree.leaves((p, s)):
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize('compress', [('mu',), ('nu',)])
def test_ablation_keeps_the_other_moment_dense(compress):
  shapes = {'a': (20, 12)}
  params = {'a': jnp.zeros((20, 12))}
  tx = adam_core(dict(rank=2, compress=compress))
  state = tx.init(params)
  other = 'nu' if compress == ('mu',) else 'mu'
  low = factors(state, 'a', moment=compress[0])
  dense = factors(state, 'a', moment=other)
  assert isinstance(low, mlorc_optax.LowRankFactors)
  assert low.u.shape == (20, 2)
  assert dense.shape == (20, 12)
  plan = mlorc_optax.compression_plan(tx, params)['a']
  assert plan.moments == compress and plan.dense_moments == 1
  # The dense moment is exact: it equals Adam's after a few steps.
  grads = random_grads(shapes, 3)
  adam = optax.scale_by_adam(B1, B2, EPS)
  s, sa = tx.init(params), adam.init(params)
  for g in grads:
    _, s = tx.update(g, s)
    _, sa = adam.update(g, sa)
  kept = factors(s, 'a', moment=other)
  exact = getattr(sa, other)['a']
  np.testing.assert_allclose(kept, exact, rtol=1e-6)


def test_stacked_layers_are_compressed_per_slice():
  """A [L, m, n] leaf behaves as L independent matrices."""
  grads = random_grads({'s': (3, 10, 8)}, 4, low_rank=1)
  tx = adam_core(dict(rank=2))
  state = tx.init({'s': jnp.zeros((3, 10, 8))})
  for g in grads:
    _, state = tx.update(g, state)
  f = factors(state, 's')
  assert f.u.shape == (3, 10, 2) and f.v.shape == (3, 8, 2)
  # Each slice's factors are orthonormal on their own.
  for i in range(3):
    np.testing.assert_allclose(f.u[i].T @ f.u[i], np.eye(2), atol=1e-5)


def test_custom_dimension_numbers_view_conv_kernels_as_hwi_by_o():
  kernel = jnp.zeros((3, 3, 4, 16))  # HWIO
  dims = mlorc_optax.MatrixDimensionNumbers(row_axes=(0, 1, 2), col_axes=(3,))
  tx = adam_core(dict(rank=2, dimension_numbers=dims))
  state = tx.init({'conv': kernel})
  assert factors(state, 'conv').u.shape == (36, 2)
  assert factors(state, 'conv').v.shape == (16, 2)
  g = {'conv': jax.random.normal(jax.random.key(0), kernel.shape)}
  u, _ = tx.update(g, tx.init({'conv': kernel}))
  assert u['conv'].shape == kernel.shape
  # Step 1 is Adam's, whatever the view.
  np.testing.assert_allclose(u['conv'], jnp.sign(g['conv']), rtol=1e-4)


def test_dimension_numbers_as_a_plain_pair_of_axes():
  # ((0, 1, 2), (3,)) reads as MatrixDimensionNumbers((0, 1, 2), (3,)), the
  # way jax.lax.dot_general takes its dimension numbers: same view, same
  # factors, same updates.
  params = {'conv': jnp.zeros((3, 3, 4, 16)), 'bias': jnp.zeros(16)}
  dims = mlorc_optax.MatrixDimensionNumbers((0, 1, 2), (3,))
  grads = random_grads({k: x.shape for k, x in params.items()}, 3, seed=5)
  results = []
  for spec in (((0, 1, 2), (3,)), dims):
    tx = adam_core(dict(rank=2, dimension_numbers=spec))
    results.append(run_steps(tx, grads))
    plan = mlorc_optax.compression_plan(tx, params)
    assert plan['conv'].view == dims.view((3, 3, 4, 16))
    assert not plan['bias'].compressed
  (ours, state), (theirs, expected) = results
  assert factors(state, 'conv').u.shape == (36, 2)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  jax.tree.map(np.testing.assert_array_equal, state, expected)


def test_same_seed_same_trajectory_other_seed_other_factors(params):
  grads = jax.grad(loss_fn)(params)

  def run(seed):
    tx = adam_core(dict(rank=2, seed=seed))
    s = tx.init(params)
    for _ in range(2):
      _, s = tx.update(grads, s)
    return factors(s, 'dense', 'kernel')

  a, b, c = run(0), run(0), run(jax.random.key(1))
  np.testing.assert_array_equal(a.u, b.u)
  assert not np.allclose(a.u, c.u)


def test_reseeding_with_optax_tree_set_is_building_with_the_seed():
  """The documented recipe: ``sketch_key`` is the one field of that name,
  even where the params have a ``key`` (an attention projection)."""
  params = {'attention': {'key': {'kernel': jnp.ones((12, 8))},
                          'query': {'kernel': jnp.ones((12, 8))}}}
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape),
                       params)
  built = mlorc_optax.mlorc_adamw(1e-3, rank=2, seed=7)
  reseeded_tx = mlorc_optax.mlorc_adamw(1e-3, rank=2, seed=0)
  a = built.init(params)
  b = optax.tree.set(reseeded_tx.init(params),
                     sketch_key=jax.random.key_data(jax.random.key(7)))
  for _ in range(2):
    _, a = built.update(grads, a, params)
    _, b = reseeded_tx.update(grads, b, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_factor_dtype_and_update_dtype():
  params = make_params(jnp.bfloat16)
  tx = adam_core(dict(rank=2, factor_dtype=jnp.bfloat16))
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  updates, state = tx.update(grads, state)
  assert factors(state, 'wide').u.dtype == jnp.bfloat16
  assert factors(state, 'wide', moment='nu').v.dtype == jnp.bfloat16
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype == jnp.bfloat16
