"""Specification of the two-pass MLorc-AdamW step (``implementation=``).

The Pallas kernels run in interpret mode on CPU (compiled through Triton when
the tests run on an NVIDIA GPU). Tolerances: the kernels and their
``jax.numpy`` references sum the same float32 products in different orders,
so their sums agree to a few ulps of the largest magnitude (1e-5 relative).
Updates of one step agree to 1e-4 of the largest update entry: where the
reconstructed second moment nearly cancels (``v~ ~ 0``), the float32 rounding
of either reconstruction is a large relative error of that entry, and
``m / sqrt(v)`` magnifies it; both are equally exact there. Over several
steps those differences feed the next factors and land on such entries, so
the multi-step comparisons use ``eps = 1e-2``, which bounds how much
``m / (sqrt(v) + eps)`` can magnify them, and agree to 5e-4, except at the
few entries where the fix of equation (2) is discontinuous
(:func:`assert_close_but_for_the_fix`). On a GPU the kernels' sketch and
projection products are TF32 (``fused.ACCUMULATE_PRECISION``), within 3e-3
of the float32 products (:func:`test_tf32_products_stay_within_tf32_rounding`),
so the
tests that compare factors or several steps run in float32 there
(``full_precision``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax._src import fused
from mlorc_optax._src import rsvd

import numpy_reference as ref
from helpers import run_steps

B1, B2, EPS = 0.9, 0.999, 1e-8


def assert_close(ours, theirs, rel, err_msg=''):
  """``|ours - theirs| <= rel * max|theirs|`` everywhere."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  scale = max(np.abs(theirs).max(), 1e-30)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=rel * scale,
                             err_msg=err_msg)


def assert_close_but_for_the_fix(ours, theirs, rel, err_msg='',
                                 max_fraction=1e-3):
  """:func:`assert_close`, except for ``max_fraction`` of entries (or one).

  The fix of paper equation (2) is discontinuous: an entry of the
  reconstructed second moment within rounding of zero counts as negative in
  one implementation and not in the other. That entry's second moment jumps
  between ~0 and ``zeta`` (its update by any factor), and ``zeta`` moves,
  and with it the update of every negative entry (by ~1/count of them).
  All other entries agree to ``rel``.
  """
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  diff = np.abs(ours - theirs)
  outliers = diff > rel * max(np.abs(theirs).max(), 1e-30)
  # At least one entry may flip, however small the matrix.
  assert outliers.sum() <= max(1, max_fraction * outliers.size), (
      err_msg, outliers.sum(), diff.max())


@pytest.fixture(autouse=True)
def full_precision(monkeypatch):
  """Float32-level kernel dots on a GPU (no effect in interpret mode)."""
  monkeypatch.setattr(fused, 'ACCUMULATE_PRECISION', 'tf32x3')


def random_factors(key, batch, m, n, rank, positive=False):
  a = jax.random.normal(key, (batch, m, n))
  if positive:  # a second moment: its rank-r reconstruction has negatives
    a = a * a
  return rsvd.randomized_svd(a, key, rank)


def pass_inputs(batch, m, n, rank, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  r_pad = max(16, 1 << (rank - 1).bit_length())
  pad = lambda x, w: jnp.pad(x, [(0, 0), (0, 0), (0, w - x.shape[-1])])
  g = jax.random.normal(keys[0], (batch, m, n)).astype(dtype)
  mu = random_factors(keys[1], batch, m, n, rank)
  nu = random_factors(keys[2], batch, m, n, rank, positive=True)
  a_m = pad(B1 * mu.u * mu.s[:, None, :], r_pad)
  a_v = pad(B2 * nu.u * nu.s[:, None, :], r_pad)
  omegas = [pad(jax.random.normal(k, (batch, n, rank)), r_pad)
            for k in keys[3:5]]
  qs = [pad(jnp.linalg.qr(jax.random.normal(k, (batch, m, rank)))[0], r_pad)
        for k in jax.random.split(keys[5])]
  return g, a_m, pad(mu.v, r_pad), a_v, pad(nu.v, r_pad), omegas, qs


SHAPES = [(1, 64, 64, 4), (2, 128, 192, 4), (1, 48, 256, 32), (3, 96, 32, 8)]
# 1 - b1, 1 - b2, b2 * zeta, k_m, k_g, c_v, eps_root, eps (project_pass).
COEF = jnp.tile(jnp.array([[1 - B1, 1 - B2, 0.01, 10.0, 0.5, 1000.0, 0.0,
                            EPS]], jnp.float32), (3, 1))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank', SHAPES)
def test_sketch_kernel_equals_its_reference(batch, m, n, rank, dtype):
  g, _, _, a_v, v_v, (om, ov), _ = pass_inputs(batch, m, n, rank, dtype)
  ours = fused.sketch_pass(g, a_v, v_v, om, ov, COEF[:batch])
  theirs = fused.sketch_pass_reference(g, a_v, v_v, om, ov, COEF[:batch])
  for name, x, y in zip(theirs._fields, ours, theirs):
    assert x.shape == y.shape and x.dtype == jnp.float32, name
    assert_close(x, y, 1e-5, name)
  assert float(jnp.sum(theirs.neg_count)) > 0  # the fix is exercised


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank', SHAPES)
def test_project_kernel_equals_its_reference(batch, m, n, rank, dtype):
  g, a_m, v_m, a_v, v_v, _, (q_m, q_v) = pass_inputs(batch, m, n, rank, dtype)
  ours = fused.project_pass(g, a_m, v_m, a_v, v_v, q_m, q_v, COEF[:batch])
  theirs = fused.project_pass_reference(g, a_m, v_m, a_v, v_v, q_m, q_v,
                                        COEF[:batch])
  assert ours.direction.dtype == dtype
  assert_close_but_for_the_fix(ours.direction.astype(jnp.float32),
                               theirs.direction.astype(jnp.float32),
                               1e-4 if dtype == jnp.float32 else 1e-2,
                               'direction')
  assert_close(ours.b_m, theirs.b_m, 1e-5, 'b_m')
  assert_close(ours.b_v, theirs.b_v, 1e-5, 'b_v')


@pytest.mark.parametrize('batch,m,n,rank', SHAPES[1:3])
def test_tf32_products_stay_within_tf32_rounding(batch, m, n, rank,
                                                 monkeypatch):
  """The GPU default: TF32 sketch and projection products (10-bit inputs).

  In interpret mode every dot is float32, so this only binds on a GPU.
  """
  monkeypatch.setattr(fused, 'ACCUMULATE_PRECISION', 'tf32')
  g, a_m, v_m, a_v, v_v, (om, ov), (q_m, q_v) = pass_inputs(
      batch, m, n, rank, jnp.float32)
  coef = COEF[:batch]
  for ours, theirs in (
      (fused.sketch_pass(g, a_v, v_v, om, ov, coef),
       fused.sketch_pass_reference(g, a_v, v_v, om, ov, coef)),
      (fused.project_pass(g, a_m, v_m, a_v, v_v, q_m, q_v, coef)[1:],
       fused.project_pass_reference(g, a_m, v_m, a_v, v_v, q_m, q_v,
                                    coef)[1:])):
    for x, y in zip(ours, theirs):
      assert_close(x, y, 3e-3)


def test_splits_fill_the_gpu_and_divide_the_loop():
  assert fused.splits(8 * 64, 172) == 4  # 8 x 4096 rows: 512 programs
  assert fused.splits(8 * 172, 64) == 1  # 1376 programs are enough
  assert fused.splits(1, 172) == 4  # 172 = 4 * 43
  assert fused.splits(1, 3) == 1


def test_leaf_step_is_algorithm_1_with_the_same_sketch():
  """One step against a dense NumPy (float64) MLorc-AdamW step."""
  batch, m, n, rank, t = 2, 64, 128, 4, 3
  keys = jax.random.split(jax.random.key(3), 5)
  g = jax.random.normal(keys[0], (batch, m, n))
  mu = random_factors(keys[1], batch, m, n, rank)
  nu = random_factors(keys[2], batch, m, n, rank, positive=True)
  om, ov = (jax.random.normal(k, (batch, n, rank)) for k in keys[3:])
  coefficients = fused.AdamCoefficients(
      b1=B1, b2=B2, k_m=1 / (1 - B1**t), k_g=0.0, c_v=1 / (1 - B2**t),
      eps=EPS, eps_root=0.0)
  f64 = lambda x: np.asarray(x, np.float64)
  mom = B1 * ref.reconstruct(*map(f64, mu)) + (1 - B1) * f64(g)
  var = B2 * ref.zeta_fix(ref.reconstruct(*map(f64, nu))) + (1 - B2) * f64(
      g)**2
  direction = (mom / (1 - B1**t)) / (np.sqrt(var / (1 - B2**t)) + EPS)
  for use_kernel in (False, True):
    d, new_mu, new_nu = fused.adam_leaf_step(
        g, mu, nu, om, ov, coefficients, use_kernel=use_kernel)
    assert_close(d, direction, 1e-4, f'direction (kernel={use_kernel})')
    for ours, x, omega in ((new_mu, mom, om), (new_nu, var, ov)):
      theirs = ref.rsvd(x, f64(omega), rank)
      assert_close(rsvd.reconstruct(ours), ref.reconstruct(*theirs), 1e-5)
      np.testing.assert_allclose(ours.s, theirs[1], rtol=1e-4)
      # Orthonormal factors, as LowRankFactors promises.
      for f in (ours.u, ours.v):
        gram = np.einsum('bik,bil->bkl', f, f)
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(rank),
                                                         gram.shape), atol=1e-4)


def grads_for(shapes, steps, dtype=jnp.float32, seed=0):
  """Gradients with a fixed decaying spectrum (0.6**i) plus fresh noise.

  Gaps between the singular values keep the rank-r truncation of the
  oversampled RSVD well conditioned, so two float32 implementations pick the
  same subspace.
  """
  key = jax.random.key(seed)
  decay = 0.6 ** jnp.arange(8.0)
  signal = {}
  for i, (name, s) in enumerate(sorted(shapes.items())):
    if len(s) < 2:
      signal[name] = jnp.ones(s)
      continue
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1000 + i))
    left = jax.random.normal(k1, (*s[:-1], 8)) * decay
    signal[name] = left @ jax.random.normal(k2, (*s[:-2], 8, s[-1]))
  return [{
      name: (signal[name] + 0.1 * jax.random.normal(
          jax.random.fold_in(key, 7 * t + i), s)).astype(dtype)
      for i, (name, s) in enumerate(sorted(shapes.items()))
  } for t in range(steps)]


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_two_pass_matches_dense_numpy_algorithm_1(implementation):
  shapes = {'a': (32, 48), 'b': (2, 16, 64), 'c': (48, 96)}
  rank, seed = 3, 42
  grads = grads_for(shapes, 6)
  tx = mlorc_optax.scale_by_mlorc_adam(
      B1, B2, 1e-2, rank=rank, seed=seed, low_rank_mask=True,
      implementation=implementation)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, B1, B2,
                             1e-2)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs = reference.step(g)
    for k in shapes:
      assert_close_but_for_the_fix(ours[k], theirs[k], 5e-4,
                                   f'step {t}, leaf {k}')
  for k in shapes:
    f = state[0].mu
    ours = rsvd.LowRankFactors(f.u[k], f.s[k], f.v[k])
    assert_close(rsvd.reconstruct(ours),
                 ref.reconstruct(*reference.factors[k]['mu']), 1e-4)


@pytest.mark.parametrize('settings', [
    dict(),
    dict(compressor='warm'),
    dict(nesterov=True, eps_root=1e-12),
    dict(oversample=3),
    dict(factor_dtype=jnp.bfloat16),
    dict(b1=0.8, b2=0.95, rank=8),
])
def test_pallas_step_equals_reference_step(settings):
  shapes = {'w': (3, 64, 128)}
  if not settings:  # the fallbacks once: untileable, exact, not compressed
    shapes.update({'x': (128, 32), 'bias': (32,), 'odd': (20, 30),
                   'full': (64, 4)})
  grads = grads_for(shapes, 4, seed=1)
  results = {}
  for impl in ('reference', 'pallas'):
    tx = mlorc_optax.scale_by_mlorc_adam(
        eps=1e-2, implementation=impl, low_rank_mask=lambda p: {
            k: v.ndim >= 2 for k, v in p.items()}, **settings)
    results[impl] = run_steps(tx, grads)
  for t, (ours, theirs) in enumerate(zip(results['pallas'][0],
                                         results['reference'][0])):
    for k in shapes:
      if 'factor_dtype' in settings:
        # bfloat16 factors round the two runs' float32 factors apart by up to
        # one bfloat16 ulp (4e-3), which moves many more entries of the
        # reconstructed second moment across zero; the median entry still
        # agrees to 1e-6 (measured).
        assert_close_but_for_the_fix(ours[k], theirs[k], 2e-2,
                                     f'step {t}, leaf {k}')
      else:
        # With oversampling the RSVD truncates at the r-th singular value;
        # where the gap to the next is small, two float32 computations keep
        # slightly different subspaces of the second moment, which moves
        # more entries across zero (0.55% after 4 steps on an H100).
        assert_close_but_for_the_fix(
            ours[k], theirs[k], 5e-4, f'step {t}, leaf {k}',
            1e-2 if 'oversample' in settings else 1e-3)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), results['pallas'][1]) == (
      jax.tree.map(lambda x: (x.shape, x.dtype), results['reference'][1]))


def test_bfloat16_params_keep_their_dtype_and_match():
  shapes = {'w': (2, 64, 128)}
  grads = grads_for(shapes, 4, dtype=jnp.bfloat16, seed=2)
  outs = {}
  for impl in ('reference', 'pallas'):
    outs[impl], _ = run_steps(mlorc_optax.mlorc_adamw(
        1.0, eps=1e-2, weight_decay=0.0, implementation=impl), grads)
  for ours, theirs in zip(outs['pallas'], outs['reference']):
    assert ours['w'].dtype == jnp.bfloat16
    # One bfloat16 rounding of the update apart at most.
    assert_close(ours['w'].astype(jnp.float32),
                 theirs['w'].astype(jnp.float32), 1e-2)


def test_first_step_is_adams_first_step():
  params = {'w': jnp.zeros((64, 64))}
  g = {'w': jax.random.normal(jax.random.key(0), (64, 64))}
  ours, _ = mlorc_optax.scale_by_mlorc_adam(implementation='pallas').update(
      g, mlorc_optax.scale_by_mlorc_adam().init(params))
  theirs, _ = optax.scale_by_adam().update(
      g, optax.scale_by_adam().init(params))
  np.testing.assert_allclose(ours['w'], theirs['w'], rtol=1e-6)


@pytest.mark.parametrize('scale', [0.0, 1e19])
def test_zero_and_overflowing_gradients_stay_finite(scale):
  """g = 0 gives zero factors; |g| > 1.8e19 overflows g**2 to inf."""
  params = {'w': jnp.zeros((64, 128))}
  tx = mlorc_optax.scale_by_mlorc_adam(implementation='pallas')
  state = tx.init(params)
  g = {'w': scale * jnp.ones((64, 128)).at[0, 0].set(1.0)}
  for _ in range(3):
    u, state = jax.jit(tx.update)(g, state)
    assert np.all(np.isfinite(u['w']))
    for f in jax.tree.leaves((state[0].mu, state[0].nu)):
      assert np.all(np.isfinite(f))


def test_selection_rules():
  kw = dict(blocker=None, rows=64, cols=128, sketched=True)
  assert fused.leaf_implementation('pallas', **kw) == 'pallas'
  assert fused.leaf_implementation('xla', **kw) == 'xla'
  assert fused.leaf_implementation('reference', **kw) == 'reference'
  # Rows or columns the kernels cannot tile: the same passes in jax.numpy.
  assert fused.leaf_implementation(
      'pallas', **{**kw, 'rows': 20, 'cols': 30}) == 'xla'
  # Identity sketch (the RSVD is exact there): the reference step.
  assert fused.leaf_implementation(
      'pallas', **{**kw, 'sketched': False}) == 'reference'
  # Automatic: the kernels only on one NVIDIA GPU.
  auto = fused.leaf_implementation(None, **kw)
  on_one_gpu = jax.default_backend() == 'gpu' and jax.device_count() == 1
  assert auto == ('pallas' if on_one_gpu else 'reference')
  assert fused.leaf_implementation(
      None, **{**kw, 'blocker': 'power_iters > 0'}) == 'reference'


@pytest.mark.parametrize('settings,reason', [
    (dict(compressor='lorapre'), 'not a randomized SVD'),
    (dict(power_iters=1), 'power_iters'),
    (dict(compress=('mu',)), 'compress'),
    (dict(atan2=True), 'atan2'),
])
def test_two_pass_refuses_settings_it_cannot_compute(settings, reason):
  with pytest.raises(ValueError, match=f'implementation.*{reason}'):
    mlorc_optax.scale_by_mlorc_adam(implementation='pallas', **settings)
  # Automatic selection quietly uses the reference step for them.
  mlorc_optax.scale_by_mlorc_adam(**settings)


def test_unknown_implementation_is_an_error_naming_it():
  with pytest.raises(ValueError, match='implementation must be'):
    mlorc_optax.mlorc_adamw(1e-3, implementation='triton')


def test_orthonormal_basis_of_rank_deficient_and_zero_sketches():
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  y = jax.random.normal(k1, (2, 50, 2)) @ jax.random.normal(k2, (2, 2, 5))
  q = fused.orthonormal_basis(y)
  assert np.all(np.isfinite(q))
  gram = np.einsum('bik,bil->bkl', q, q)
  np.testing.assert_allclose(np.trace(gram, axis1=1, axis2=2), [2, 2],
                             atol=1e-4)  # two unit columns, three zero ones
  p = np.einsum('bik,bjk->bij', q, q)
  np.testing.assert_allclose(p @ np.asarray(y), y, atol=1e-4)  # spans y
  assert np.all(fused.orthonormal_basis(jnp.zeros((50, 4))) == 0)


def test_a_compressor_whose_sketch_is_the_identity_takes_the_reference():
  """A subclass that only overrides ``sketch`` may return None (identity)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from typing import ClassVar  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class TruncatedSVD(mlorc_optax.RSVDCompressor):
    name: ClassVar[str] = 'truncated_svd'

    def sketch(self, factors, key, batch_shape, cols, width):
      return None

  grads = grads_for({'w': (64, 128)}, 2)
  outs = {}
  for impl in ('reference', 'pallas'):
    outs[impl], _ = run_steps(mlorc_optax.scale_by_mlorc_adam(
        compressor=TruncatedSVD(), implementation=impl), grads)
  for ours, theirs in zip(outs['pallas'], outs['reference']):
    np.testing.assert_array_equal(ours['w'], theirs['w'])


def test_injected_hyperparameters_reach_the_kernels():
  """b1 and b2 traced by optax.inject_hyperparams, as in test_compat."""
  static = ('rank', 'oversample', 'power_iters', 'low_rank_mask',
            'dimension_numbers', 'compress', 'factor_dtype', 'seed',
            'implementation')
  grads = grads_for({'w': (64, 128)}, 3, seed=4)
  outs = {}
  for impl in ('reference', 'pallas'):
    tx = optax.inject_hyperparams(mlorc_optax.mlorc_adamw,
                                  static_args=static)(
        learning_rate=1.0, b1=0.85, b2=0.99, eps=1e-2, weight_decay=0.0,
        implementation=impl)
    outs[impl], _ = run_steps(tx, grads)
  for t, (ours, theirs) in enumerate(zip(outs['pallas'], outs['reference'])):
    assert_close_but_for_the_fix(ours['w'], theirs['w'], 5e-4, f'step {t}')


# MLorc-Lion's two passes.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank', SHAPES[1:3])
def test_lion_kernels_equal_their_references(batch, m, n, rank, dtype):
  g, a, v, _, _, (om, _), (q, _) = pass_inputs(batch, m, n, rank, dtype)
  coef = jnp.tile(jnp.array([[0.9, 0.1]], jnp.float32), (batch, 1))
  assert_close(fused.lion_sketch_pass(g, om),
               fused.lion_sketch_pass_reference(g, om), 1e-5)
  d, qg = fused.lion_project_pass(g, a, v, q, coef)
  d_ref, qg_ref = fused.lion_project_pass_reference(g, a, v, q, coef)
  assert d.dtype == dtype
  assert np.mean(np.asarray(d, np.float32) != np.asarray(d_ref)) <= 1e-3
  assert_close(qg, qg_ref, 1e-5)


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_lion_two_pass_matches_dense_numpy_algorithm_2(implementation):
  shapes = {'a': (32, 48), 'b': (2, 16, 64)}
  rank, seed = 3, 7
  grads = grads_for(shapes, 6, seed=1)
  tx = mlorc_optax.scale_by_mlorc_lion(0.9, 0.99, rank=rank, seed=seed,
                                       low_rank_mask=True,
                                       implementation=implementation)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcLion(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.99)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs = reference.step(g)
    for k in shapes:  # signs; an entry with c ~ 0 may flip
      assert np.mean(np.asarray(ours[k]) != theirs[k]) <= 1e-2, (t, k)
  for k in shapes:
    f = state[0].mu
    assert_close(rsvd.reconstruct(rsvd.LowRankFactors(f.u[k], f.s[k],
                                                      f.v[k])),
                 ref.reconstruct(*reference.factors[k]), 1e-4)


@pytest.mark.parametrize('compressor', ['rsvd', 'warm'])
def test_lion_pallas_step_equals_reference_step(compressor):
  shapes = {'w': (3, 64, 128), 'odd': (20, 30), 'bias': (30,)}
  grads = grads_for(shapes, 4, seed=2)
  results = {}
  for impl in ('reference', 'pallas'):
    tx = mlorc_optax.mlorc_lion(1.0, weight_decay=0.0, compressor=compressor,
                                implementation=impl)
    results[impl] = run_steps(tx, grads)
  for ours, theirs in zip(results['pallas'][0], results['reference'][0]):
    for k in shapes:
      assert np.mean(np.asarray(ours[k]) != np.asarray(theirs[k])) <= 1e-3
  for ours, theirs in zip(jax.tree.leaves(results['pallas'][1]),
                          jax.tree.leaves(results['reference'][1])):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


def test_lion_default_is_the_reference_step_everywhere():
  """Lion's two passes are opt-in until they are timed on a GPU."""
  params = {'w': jnp.zeros((64, 128))}
  jaxprs = {}
  for impl in (None, 'pallas'):
    tx = mlorc_optax.scale_by_mlorc_lion(implementation=impl)
    jaxprs[impl] = str(jax.make_jaxpr(tx.update)(params, tx.init(params)))
  assert 'pallas_call' not in jaxprs[None]
  assert 'pallas_call' in jaxprs['pallas']
  with pytest.raises(ValueError, match='implementation.*randomized SVD'):
    mlorc_optax.mlorc_lion(1e-4, compressor='lorapre',
                           implementation='pallas')
