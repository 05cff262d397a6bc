"""Specification of the two-pass step's kernels, passes and factorizations.

Every Pallas pass against its ``jax.numpy`` reference, per shape, dtype and
rank; the Gram-based factorizations; whole two-pass steps of one leaf against
the dense NumPy (float64) Algorithms 1 and 2 with the same sketch; the static
:class:`~mlorc_optax.kernels.KernelConfig`; the shape checks; the names of
the ``pallas_call``\\ s. (The two-pass step as the transforms take it is
specified in ``test_two_pass_step.py``.)

The Pallas kernels run in interpret mode on CPU (compiled through Triton when
the tests run on an NVIDIA GPU). Tolerances: the kernels and their
``jax.numpy`` references sum the same float32 products in different orders,
so their sums agree to a few ulps of the largest magnitude (1e-5 relative).
Updates of one step agree to 1e-4 of the largest update entry: where the
reconstructed second moment nearly cancels (``v~ ~ 0``), the float32 rounding
of either reconstruction is a large relative error of that entry, and
``m / sqrt(v)`` magnifies it; both are equally exact there. The fix of
equation (2) is discontinuous, so a few entries may differ by more
(:func:`closeness.assert_close_but_for_the_fix`). On a GPU the kernels'
sketches and projections default to bfloat16 operands
(``KernelConfig.sketch_precision``, ``project_precision``), each product
within ``2**-7`` of its magnitude (both operands rounded to 8 significant
bits, ``2**-8`` each), and pass 1's reconstruction to TF32
inputs (``sketch_reconstruct_precision``), each entry within ``2**-9`` of
its products' magnitudes
(:func:`test_gpu_default_products_stay_within_their_rounding`), so the other
tests pass ``FULL``, a config with float32-level (``'tf32x3'``) products; in
interpret mode every dot is float32 whatever the config.
"""

import dataclasses
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from mlorc_optax import kernels
from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math
from mlorc_optax._src import two_pass
from mlorc_optax._src.kernels import gram
from mlorc_optax._src.kernels import launch

import numpy_reference as ref
from closeness import assert_close, assert_close_but_for_the_fix
from helpers import EPS32
from helpers import FULL  # float32-level dots; rank <= 8 by multiply-adds

B1, B2, EPS = 0.9, 0.999, 1e-8
#: The test's own choice (the library never looks at the devices): compile
#: through Triton on a GPU, interpret elsewhere.
INTERPRET = jax.default_backend() != 'gpu'
#: :data:`helpers.FULL` with every product a tensor-core dot (factors padded
#: to 16).
FULL_DOTS = dataclasses.replace(FULL, fma_max_rank=0)
#: The relative error of a product of two values each rounded to bfloat16
#: (8 significant bits, round to nearest: ``u = 2**-8``): ``(1 + u)**2 - 1``.
BF16_PRODUCT = 2.0**-7 + 2.0**-16


def random_factors(key, batch, m, n, rank, positive=False):
  a = jax.random.normal(key, (batch, m, n))
  if positive:  # a second moment: its rank-r reconstruction has negatives
    a = a * a
  return rsvd.randomized_svd(a, key, rank)


def pass_inputs(batch, m, n, rank, dtype, seed=0, config=FULL):
  """Pass operands of ``rank`` columns, padded as ``config``'s kernels take
  them (:func:`kernels.kernel_widths`)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  r_pad, l_pad = kernels.kernel_widths(rank, rank, config)
  pad = lambda x, w: jnp.pad(x, [(0, 0), (0, 0), (0, w - x.shape[-1])])
  g = jax.random.normal(keys[0], (batch, m, n)).astype(dtype)
  mu = random_factors(keys[1], batch, m, n, rank)
  nu = random_factors(keys[2], batch, m, n, rank, positive=True)
  a_m = pad(B1 * mu.u * mu.s[:, None, :], r_pad)
  a_v = pad(B2 * nu.u * nu.s[:, None, :], r_pad)
  omegas = [pad(jax.random.normal(k, (batch, n, rank)), l_pad)
            for k in keys[3:5]]
  qs = [pad(jnp.linalg.qr(jax.random.normal(k, (batch, m, rank)))[0], l_pad)
        for k in jax.random.split(keys[5])]
  return g, a_m, pad(mu.v, r_pad), a_v, pad(nu.v, r_pad), omegas, qs


SHAPES = [(1, 64, 64, 4), (2, 128, 192, 4), (1, 48, 256, 32), (3, 96, 32, 8)]
#: Every shape with the default products (multiply-adds up to rank 8, dots
#: for 32), and a rank-4 shape on the dots too.
PASS_CASES = [(*shape, FULL) for shape in SHAPES] + [(*SHAPES[1], FULL_DOTS)]


def coefficients(batch):
  """Pass 2's per-matrix scalars, different for every matrix (so that a
  kernel reading another matrix's values fails)."""
  k = jnp.arange(batch, dtype=jnp.float32)
  return kernels.AdamCoefficients(
      one_minus_b1=jnp.full((batch,), 1 - B1), one_minus_b2=1 - B2,
      k_m=10.0 + k, k_g=0.5 - 0.1 * k, c_v=1000.0, eps=EPS, eps_root=0.0)


def zetas(batch):
  return 0.01 * (1.0 + jnp.arange(batch, dtype=jnp.float32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank,config', PASS_CASES)
def test_sketch_kernel_equals_its_reference(batch, m, n, rank, config, dtype):
  g, _, _, a_v, v_v, (om, ov), _ = pass_inputs(batch, m, n, rank, dtype,
                                               config=config)
  one_b2 = 1 - B2 * (1 - 0.01 * jnp.arange(batch, dtype=jnp.float32))
  ours = kernels.sketch_pass(g, a_v, v_v, om, ov, one_b2, config=config,
                             interpret=INTERPRET)
  theirs = kernels.sketch_pass_reference(g, a_v, v_v, om, ov, one_b2)
  for name, x, y in zip(theirs._fields, ours, theirs):
    assert x.shape == y.shape and x.dtype == jnp.float32, name
    assert_close(x, y, 1e-5, name)
  assert float(jnp.sum(theirs.neg_count)) > 0  # the fix is exercised


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank,config', PASS_CASES)
def test_project_kernel_equals_its_reference(batch, m, n, rank, config,
                                             dtype):
  g, a_m, v_m, a_v, v_v, _, (q_m, q_v) = pass_inputs(batch, m, n, rank, dtype,
                                                     config=config)
  args = (g, a_m, v_m, a_v, v_v, q_m, q_v, coefficients(batch), zetas(batch))
  ours = kernels.project_pass(*args, config=config, interpret=INTERPRET)
  theirs = kernels.project_pass_reference(*args)
  assert ours.direction.dtype == theirs.direction.dtype == dtype
  assert_close_but_for_the_fix(ours.direction.astype(jnp.float32),
                               theirs.direction.astype(jnp.float32),
                               1e-4 if dtype == jnp.float32 else 1e-2,
                               'direction')
  assert_close(ours.b_m, theirs.b_m, 1e-5, 'b_m')
  assert_close(ours.b_v, theirs.b_v, 1e-5, 'b_v')


def test_project_pass_without_q_m_projects_only_v():
  """Given no ``q_m`` (the two-pass step with the complement, which has
  ``Q_m^T m`` from its own product of ``g``), pass 2 and its reference
  return no ``b_m`` and the same direction and ``b_v``."""
  batch, m, n, rank, config = PASS_CASES[0]
  g, a_m, v_m, a_v, v_v, _, (q_m, q_v) = pass_inputs(
      batch, m, n, rank, jnp.float32, config=config)
  c, zeta = coefficients(batch), zetas(batch)
  for project in (functools.partial(kernels.project_pass, config=config,
                                    interpret=INTERPRET),
                  kernels.project_pass_reference):
    both = project(g, a_m, v_m, a_v, v_v, q_m, q_v, c, zeta)
    only_v = project(g, a_m, v_m, a_v, v_v, None, q_v, c, zeta)
    assert only_v.b_m is None
    # The same computation in another program: float32 summation order.
    assert_close(only_v.direction, both.direction, 1e-5, 'direction')
    assert_close(only_v.b_v, both.b_v, 1e-5, 'b_v')


def test_folded_numerator_is_adams_numerator():
  """``k_m m + k_g g`` with ``m = rec + (1 - b1) g`` is ``k_g' g + k_m
  rec`` with :func:`step_math.adam_folded_numerator`'s ``(k_m, k_g')``
  (per matrix, as pass 2 without ``q_m`` computes it), to float32
  rounding of the three terms."""
  batch = 3
  c = kernels.AdamCoefficients(*[
      launch.expand_per_matrix(jnp.broadcast_to(jnp.float32(x), (batch,)))
      for x in coefficients(batch)])
  rec, g = jax.random.normal(jax.random.key(5), (2, batch, 16, 32))
  m, _ = step_math.adam_new_moments(rec, rec, g, 0.0, c)
  scale, k_g = step_math.adam_folded_numerator(c)
  ours = k_g * g + scale * rec
  theirs = c.k_m * m + c.k_g * g
  magnitude = jnp.abs(c.k_m * rec) + jnp.abs((c.k_m * c.one_minus_b1
                                              + jnp.abs(c.k_g)) * g)
  assert jnp.all(jnp.abs(ours - theirs) <= 8 * EPS32 * magnitude)


def projected_moments(g, a_m, v_m, a_v, v_v, c, zeta):
  """``(m, v)``, the new moments pass 2 projects (clipped), as its reference
  computes them."""
  batch, m, n = g.shape
  reconstruct = lambda a, v: jnp.einsum('bik,bjk->bij', a, v,
                                        precision=step_math.HIGHEST)
  per_matrix = lambda x: launch.expand_per_matrix(jax.tree.map(
      lambda y: jnp.broadcast_to(jnp.asarray(y, jnp.float32), (batch,)), x))
  return step_math.adam_projection_terms(
      *step_math.adam_new_moments(
          reconstruct(a_m, v_m), reconstruct(a_v, v_v),
          g.astype(jnp.float32), per_matrix(zeta), per_matrix(c)),
      step_math.overflow_bound(m, n))


@pytest.mark.parametrize('batch,m,n,rank,dtype', [
    (*SHAPES[1], jnp.float32), (*SHAPES[2], jnp.float32),
    # Sketches 64 wide: the defaults' other tilings (KernelConfig.tiling).
    (1, 256, 128, 64, jnp.bfloat16)])
def test_gpu_default_products_stay_within_their_rounding(batch, m, n, rank,
                                                         dtype):
  """The GPU defaults: pass 1 reconstructs from TF32 inputs and sketches
  from bfloat16 operands; pass 2 reconstructs at float32 level and projects
  from bfloat16 operands.

  TF32 inputs keep 10 mantissa bits (relative error ``2**-11`` rounded,
  ``2**-10`` truncated, as tensor cores may take float32 registers), so they
  move a reconstructed entry ``r = sum_k a_k v_k`` by at most ``2**-9 sum_k
  |a_k v_k|`` (its *band*): only entries within their band of zero can
  change sign. A product ``sum_j x_j y_j`` from operands rounded to bfloat16
  (8 significant bits, round to nearest: ``2**-8`` each) is off by at most
  :data:`BF16_PRODUCT` ``sum_j |x_j y_j|`` (for the
  sketches, the reference pass of ``|g|`` and ``|omega|``, whose terms are
  the magnitudes of the pass's terms). So, with float32 sums on top:

  * ``g omega`` within its bfloat16 bound;
  * ``x omega`` (``x = (1 - b2) g**2 + r_-``) within its bound plus the
    bands times ``|omega|``;
  * ``1{r < 0} omega`` within its bound plus ``|omega|`` of the entries in
    their band (those that can change sign);
  * each row's count of negative entries within the number of entries in
    their band, and its sum of ``r_-`` within the sum of the bands;
  * the projections ``Q^T m``, ``Q^T v`` within their bfloat16 bound.

  In interpret mode every dot is float32, so this only binds on a GPU.
  """
  config = kernels.KernelConfig()
  assert (config.reconstruct_precision, config.sketch_reconstruct_precision,
          config.sketch_precision, config.project_precision) == (
              'tf32x3', 'tf32', 'bf16', 'bf16')
  g, a_m, v_m, a_v, v_v, (om, ov), (q_m, q_v) = pass_inputs(
      batch, m, n, rank, dtype)
  ours = kernels.sketch_pass(g, a_v, v_v, om, ov, 1 - B2, config=config,
                             interpret=INTERPRET)
  theirs = kernels.sketch_pass_reference(g, a_v, v_v, om, ov, 1 - B2)
  bounds = kernels.sketch_pass_reference(jnp.abs(g), a_v, v_v, jnp.abs(om),
                                         jnp.abs(ov), 1 - B2)
  f64 = lambda x: np.asarray(x, np.float64)
  rec = np.einsum('bik,bjk->bij', f64(a_v), f64(v_v))
  band = 2.0**-9 * np.einsum('bik,bjk->bij', np.abs(f64(a_v)),
                              np.abs(f64(v_v)))
  near_zero = (np.abs(rec) <= band).astype(np.float64)
  band_omega = np.einsum('bij,bjl->bil', band, np.abs(f64(ov)))
  flips_omega = np.einsum('bij,bjl->bil', near_zero, np.abs(f64(ov)))
  slack = lambda y: 1e-5 * np.abs(f64(y)).max()
  extra = {'g_omega': 0.0, 'x_omega': band_omega, 'neg_omega': flips_omega}
  for name, x, y, bound in zip(theirs._fields, ours, theirs, bounds):
    if name in extra:
      assert np.all(np.abs(f64(x) - f64(y))
                    <= BF16_PRODUCT * f64(bound) + extra[name] + slack(y)
                    ), name
  assert np.all(np.abs(f64(ours.neg_count) - f64(theirs.neg_count))
                <= near_zero.sum(-1))
  assert np.all(np.abs(f64(ours.neg_sum) - f64(theirs.neg_sum))
                <= band.sum(-1) + slack(theirs.neg_sum))
  lion, lion_ref = (kernels.lion_sketch_pass(g, om, config=config,
                                             interpret=INTERPRET),
                    kernels.lion_sketch_pass_reference(g, om))
  assert np.all(np.abs(f64(lion) - f64(lion_ref))
                <= BF16_PRODUCT * f64(bounds.g_omega) + slack(lion_ref))
  # Pass 2: the moments it projects, as its reference computes them.
  c, zeta = coefficients(batch), zetas(batch)
  ours = kernels.project_pass(g, a_m, v_m, a_v, v_v, q_m, q_v, c, zeta,
                              config=config, interpret=INTERPRET)
  theirs = kernels.project_pass_reference(g, a_m, v_m, a_v, v_v, q_m, q_v, c,
                                          zeta)
  moments = projected_moments(g, a_m, v_m, a_v, v_v, c, zeta)
  for x, y, q, moment in zip(ours[1:], theirs[1:], (q_m, q_v), moments):
    bound = np.einsum('bil,bij->blj', np.abs(f64(q)), np.abs(f64(moment)))
    assert np.all(np.abs(f64(x) - f64(y)) <= BF16_PRODUCT * bound + slack(y))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('batch,m,n,rank,config', PASS_CASES[1:3]
                         + PASS_CASES[-1:])
def test_lion_kernels_equal_their_references(batch, m, n, rank, config,
                                             dtype):
  g, a, v, _, _, (om, _), (q, _) = pass_inputs(batch, m, n, rank, dtype,
                                               config=config)
  b1 = 0.9 - 0.05 * jnp.arange(batch, dtype=jnp.float32)
  coef = kernels.LionCoefficients(b1=b1, one_minus_b1=1 - b1)
  assert_close(kernels.lion_sketch_pass(g, om, config=config,
                                        interpret=INTERPRET),
               kernels.lion_sketch_pass_reference(g, om), 1e-5)
  d, qg = kernels.lion_project_pass(g, a, v, q, coef, config=config,
                                    interpret=INTERPRET)
  d_ref, qg_ref = kernels.lion_project_pass_reference(g, a, v, q, coef)
  assert d.dtype == d_ref.dtype == dtype
  assert np.mean(np.asarray(d, np.float32) != np.asarray(d_ref, np.float32)
                 ) <= 1e-3
  assert_close(qg, qg_ref, 1e-5)


# Whole steps of one leaf against the dense NumPy algorithms.


@pytest.mark.parametrize('batch,m,n', [(2, 64, 128), (1, 50, 70)])
def test_leaf_step_is_algorithm_1_with_the_same_sketch(batch, m, n):
  """One step against a dense NumPy (float64) MLorc-AdamW step; 50 x 70
  matrices are zero-padded to the kernels' tiles and cropped back."""
  rank, t = 4, 3
  keys = jax.random.split(jax.random.key(3), 5)
  g = jax.random.normal(keys[0], (batch, m, n))
  mu = random_factors(keys[1], batch, m, n, rank)
  nu = random_factors(keys[2], batch, m, n, rank, positive=True)
  om, ov = (jax.random.normal(k, (batch, n, rank)) for k in keys[3:])
  coef = kernels.AdamCoefficients(
      one_minus_b1=1 - B1, one_minus_b2=1 - B2, k_m=1 / (1 - B1**t), k_g=0.0,
      c_v=1 / (1 - B2**t), eps=EPS, eps_root=0.0)
  f64 = lambda x: np.asarray(x, np.float64)
  mom = B1 * ref.reconstruct(*map(f64, mu)) + (1 - B1) * f64(g)
  var = B2 * ref.zeta_fix(ref.reconstruct(*map(f64, nu))) + (1 - B2) * f64(
      g)**2
  direction = (mom / (1 - B1**t)) / (np.sqrt(var / (1 - B2**t)) + EPS)
  for use_kernel in (False, True):
    d, new_mu, new_nu = two_pass.adam_leaf_step(
        g, mu, nu, om, ov, coef, use_kernel=use_kernel, config=FULL,
        interpret=INTERPRET)
    assert_close(d, direction, 1e-4, f'direction (kernel={use_kernel})')
    for ours, x, omega in ((new_mu, mom, om), (new_nu, var, ov)):
      assert_factors_are_rsvd(ours, x, omega, rank)


def assert_factors_are_rsvd(ours, x, omega, rank):
  """``ours`` is Algorithm 3 of ``x`` with sketch ``omega``, orthonormal."""
  theirs = ref.rsvd(x, np.asarray(omega, np.float64), rank)
  assert_close(rsvd.reconstruct(ours), ref.reconstruct(*theirs), 1e-5)
  np.testing.assert_allclose(ours.s, theirs[1], rtol=1e-4)
  # Orthonormal factors, as LowRankFactors promises.
  for f in (ours.u, ours.v):
    gram_ = np.einsum('bik,bil->bkl', f, f)
    np.testing.assert_allclose(gram_, np.broadcast_to(np.eye(rank),
                                                      gram_.shape), atol=1e-4)


def test_lion_step_is_algorithm_2_with_the_same_sketch():
  """Leaves against dense NumPy MLorc-Lion: a tileable one, and one the
  kernels take padded to tiles, next to the same shape's reference."""
  b1, b2, rank = 0.9, 0.99, 4
  keys = jax.random.split(jax.random.key(5), 9)
  leaves, expected = [], []
  for i, (batch, m, n, use_kernel) in enumerate(
      ((2, 64, 128, True), (1, 20, 30, False), (2, 20, 30, True))):
    g = jax.random.normal(keys[3 * i], (batch, m, n))
    mu = random_factors(keys[3 * i + 1], batch, m, n, rank)
    omega = jax.random.normal(keys[3 * i + 2], (batch, n, rank))
    leaves.append(kernels.LionLeafInputs(g, mu, omega, use_kernel))
    prev = ref.reconstruct(*(np.asarray(x, np.float64) for x in mu))
    g64 = np.asarray(g, np.float64)
    expected.append((np.sign(b1 * prev + (1 - b1) * g64),
                     b2 * prev + (1 - b2) * g64, omega))
  out = kernels.lion_step(leaves, b1, b2, config=FULL, interpret=INTERPRET)
  for (d, factors), (sign, mom, omega) in zip(out, expected):
    assert np.mean(np.asarray(d) != sign) <= 1e-3  # an entry with c ~ 0
    assert_factors_are_rsvd(factors, mom, omega, rank)


def test_adam_step_batches_leaves_and_keeps_their_dtypes():
  """Several leaves, kernel and reference passes, bfloat16 gradients."""
  rank, t = 3, 1
  coef = kernels.AdamCoefficients(
      one_minus_b1=1 - B1, one_minus_b2=1 - B2, k_m=1 / (1 - B1**t), k_g=0.0,
      c_v=1 / (1 - B2**t), eps=EPS, eps_root=0.0)
  leaves = []
  # Two 40 x 24 leaves for the kernels: padded to 64 x 32, one launch.
  for i, (shape, use_kernel) in enumerate(
      (((2, 64, 128), True), ((1, 48, 32), False), ((3, 32, 64), True),
       ((2, 40, 24), True), ((1, 40, 24), True))):
    key = jax.random.key(i)
    g = jax.random.normal(key, shape, jnp.bfloat16)
    zero = rsvd.LowRankFactors(jnp.zeros((*shape[:2], rank)),
                               jnp.zeros((shape[0], rank)),
                               jnp.zeros((shape[0], shape[2], rank)))
    omega = jax.random.normal(key, (shape[0], shape[2], rank + 2))
    leaves.append(kernels.AdamLeafInputs(g, zero, zero, omega, omega,
                                         use_kernel))
  out = kernels.adam_step(leaves, coef, config=FULL, interpret=INTERPRET)
  for leaf, (d, mu, nu) in zip(leaves, out):
    assert d.dtype == jnp.bfloat16 and d.shape == leaf.g.shape
    # The first step from zero factors is Adam's first step, sign(g).
    g = np.asarray(leaf.g, np.float32)
    assert_close(np.asarray(d, np.float32), g / (np.abs(g) + EPS), 1e-2)
    for f, x in ((mu, (1 - B1) * g), (nu, (1 - B2) * g * g)):
      assert f.u.shape[-1] == rank and f.u.dtype == jnp.float32
      assert np.all(np.isfinite(rsvd.reconstruct(f)))
      assert np.all(np.asarray(f.s)[..., :-1] >= np.asarray(f.s)[..., 1:])


@pytest.mark.parametrize('use_kernel', [False, True])
@pytest.mark.parametrize('scale', [0.0, 1e19])
def test_leaf_step_of_zero_and_overflowing_gradients_stays_finite(
    scale, use_kernel):
  """g = 0 gives zero factors; |g| > 1.8e19 overflows g**2 to inf, which
  the overflow bound keeps out of the factors."""
  batch, m, n, rank = 1, 64, 128, 4
  g = scale * jnp.ones((batch, m, n)).at[:, 0, 0].set(1.0)
  zero = rsvd.LowRankFactors(jnp.zeros((batch, m, rank)),
                             jnp.zeros((batch, rank)),
                             jnp.zeros((batch, n, rank)))
  omega = jax.random.normal(jax.random.key(0), (batch, n, rank))
  coef = kernels.AdamCoefficients(1 - B1, 1 - B2, 10.0, 0.0, 1000.0, EPS, 0.0)
  mu = nu = zero
  for _ in range(2):
    d, mu, nu = two_pass.adam_leaf_step(g, mu, nu, omega, omega, coef,
                                        use_kernel=use_kernel, config=FULL,
                                        interpret=INTERPRET)
    assert np.all(np.isfinite(d))
    for f in jax.tree.leaves((mu, nu)):
      assert np.all(np.isfinite(f))


# The small factorizations.


@pytest.mark.parametrize('a,b,reduction', [(4, 8, True), (8, 8, True),
                                           (36, 36, False), (32, 36, False)])
def test_inner_is_x_transpose_y_as_a_reduction_or_a_dot(a, b, reduction):
  """``step_math.inner`` on both sides of its switch (a reduction for small
  outputs, a dot for large): ``x^T y`` within float32 summation error in
  any order, ``gamma_(m+1)`` of the sum of the products' magnitudes."""
  assert (a * b <= step_math.INNER_REDUCTION_MAX) == reduction
  m = 300
  x, y = (jax.random.normal(k, (2, m, w)) for k, w in zip(
      jax.random.split(jax.random.key(5)), (a, b)))
  f64 = lambda z: np.asarray(z, np.float64)
  exact = np.einsum('zma,zmc->zac', f64(x), f64(y))
  u = (m + 1) * 2.0**-24  # each product rounded, then m - 1 sums
  bound = u / (1 - u) * np.einsum('zma,zmc->zac', np.abs(f64(x)),
                                  np.abs(f64(y)))
  ours = step_math.inner(x, y)
  assert ours.shape == (2, a, b)
  assert np.all(np.abs(f64(ours) - exact) <= bound)
  np.testing.assert_array_equal(step_math.gram(x), step_math.inner(x, x))


def test_orthonormal_basis_of_rank_deficient_and_zero_sketches():
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  y = jax.random.normal(k1, (2, 50, 2)) @ jax.random.normal(k2, (2, 2, 5))
  q = gram.orthonormal_basis(y)
  assert np.all(np.isfinite(q))
  gram_ = np.einsum('bik,bil->bkl', q, q)
  np.testing.assert_allclose(np.trace(gram_, axis1=1, axis2=2), [2, 2],
                             atol=1e-4)  # two unit columns, three zero ones
  p = np.einsum('bik,bjk->bij', q, q)
  np.testing.assert_allclose(p @ np.asarray(y), y, atol=1e-4)  # spans y
  assert np.all(gram.orthonormal_basis(jnp.zeros((50, 4))) == 0)


def test_svds_of_projections_are_the_svds_of_q_b():
  keys = jax.random.split(jax.random.key(1), 4)
  ys = [jax.random.normal(keys[0], (2, 40, 6)),
        jax.random.normal(keys[1], (1, 30, 8))]
  qs = kernels.orthonormal_bases(ys)
  bs = [jax.random.normal(keys[2], (2, 6, 50)) * 1e-20,  # tiny, rescaled
        jax.random.normal(keys[3], (1, 8, 20))]
  for q, b, factors in zip(qs, bs, kernels.svds_of_projections(
      qs, bs, [4, 5])):
    # In NumPy float64: a float32 matmul on a GPU would round to TF32.
    u, s, v = (np.asarray(x, np.float64) for x in factors)
    dense = np.asarray(q, np.float64) @ np.asarray(b, np.float64)
    s_ref = np.linalg.svd(dense, compute_uv=False)[..., :s.shape[-1]]
    np.testing.assert_allclose(s, s_ref, rtol=1e-4)
    top = np.linalg.svd(dense)
    best = (top[0][..., :s.shape[-1]] * top[1][..., None, :s.shape[-1]]
            ) @ top[2][..., :s.shape[-1], :]
    assert_close((u * s[..., None, :]) @ np.swapaxes(v, -1, -2), best, 1e-4)


def _primitive_counts(fn, *args):
  """How often each primitive occurs in ``fn``'s jaxpr (joins and slices,
  which grouping adds, left out)."""
  counts = {}
  for eqn in jax.make_jaxpr(fn)(*args).eqns:
    name = eqn.primitive.name
    if name not in ('concatenate', 'slice'):
      counts[name] = counts.get(name, 0) + 1
  return counts


def test_equal_shaped_matrices_share_each_small_operation():
  # Three leaves with equal matrices (batches of 2, 1, 3), one other shape.
  shapes = [(2, 40, 50), (1, 40, 50), (1, 30, 20), (3, 40, 50)]
  widths, ranks = [6, 6, 8, 6], (4, 4, 5, 4)
  keys = jax.random.split(jax.random.key(3), 2 * len(shapes))
  ms = [jax.random.normal(k, s) for k, s in zip(keys[::2], shapes)]
  ys = [m @ jax.random.normal(k, (m.shape[-1], l))
        for k, m, l in zip(keys[1::2], ms, widths)]

  def factorizations(ys, bs, ranks=ranks):
    return kernels.svds_of_projections(kernels.orthonormal_bases(ys), bs,
                                       ranks)

  # As many operations as for one leaf of each shape...
  bs = [jnp.ones((y.shape[0], y.shape[-1], m.shape[-1]))
        for y, m in zip(ys, ms)]
  assert _primitive_counts(factorizations, ys, bs) == _primitive_counts(
      functools.partial(factorizations, ranks=ranks[2:]), ys[2:], bs[2:])

  @functools.partial(jax.jit, static_argnums=2)
  def step(ys, ms, ranks):  # with b = Q^T M, as in the two-pass step
    qs = kernels.orthonormal_bases(ys)
    bs = [jnp.einsum('bml,bmn->bln', q, m,
                     precision=jax.lax.Precision.HIGHEST)
          for q, m in zip(qs, ms)]
    return qs, kernels.svds_of_projections(qs, bs, ranks)

  # ... and each leaf's basis and SVD those it gets alone, up to float32
  # rounding (and the choice of basis: compared as projections).
  qs, factors = step(ys, ms, ranks)
  projector = lambda q: np.einsum('bik,bjk->bij', q, q)
  for i in (0, 3):  # the first and last of the three joined leaves
    (q,), (alone,) = step(ys[i:i + 1], ms[i:i + 1], ranks[i:i + 1])
    assert_close(projector(qs[i]), projector(q), 1e-5)
    assert_close(factors[i].s, alone.s, 1e-5)
    assert_close(rsvd.reconstruct(factors[i]), rsvd.reconstruct(alone), 1e-5)


def _depends_on(jaxpr, later, earlier):
  """Whether equation ``later`` of ``jaxpr`` reads, through any chain of
  equations, an output of equation ``earlier``."""
  reached = set(jaxpr.eqns[earlier].outvars)
  for eqn in jaxpr.eqns[earlier + 1:later + 1]:
    if any(not isinstance(v, jax.extend.core.Literal) and v in reached
           for v in eqn.invars):
      reached.update(eqn.outvars)
  return any(not isinstance(v, jax.extend.core.Literal) and v in reached
             for v in jaxpr.eqns[later].invars)


@pytest.mark.parametrize('optimizer', ['adam', 'lion'])
def test_each_leafs_pass_waits_for_the_previous_leafs_outputs(optimizer):
  # So that one leaf's partial sums are live at a time, whatever order
  # XLA would choose (two_pass._after).
  gs = [jax.random.normal(jax.random.key(i), (1, 32, 64)) for i in range(2)]
  f = rsvd.LowRankFactors(jnp.zeros((1, 32, 2)), jnp.zeros((1, 2)),
                          jnp.zeros((1, 64, 2)))
  omega = jnp.ones((1, 64, 4))
  config = launch.KernelConfig(group_max_elements=0)  # a launch per leaf
  if optimizer == 'adam':
    coefficients = step_math.AdamCoefficients(0.1, 0.001, 1.0, 0.0, 1.0,
                                              1e-8, 0.0)
    step = lambda gs: two_pass.adam_step(
        [two_pass.AdamLeafInputs(g, f, f, omega, omega, use_kernel=True)
         for g in gs], coefficients, config=config, interpret=True)
  else:
    step = lambda gs: two_pass.lion_step(
        [two_pass.LionLeafInputs(g, f, omega, use_kernel=True) for g in gs],
        0.9, 0.99, config=config, interpret=True)
  jaxpr = jax.make_jaxpr(step)(gs).jaxpr
  passes = [i for i, eqn in enumerate(jaxpr.eqns)
            if eqn.primitive.name == 'pallas_call']
  assert len(passes) == 4  # pass 1 of each leaf, then pass 2 of each
  sketch_0, sketch_1, project_0, project_1 = passes
  assert _depends_on(jaxpr, sketch_1, sketch_0)
  assert _depends_on(jaxpr, project_1, project_0)
  # Pass 1's padded inputs too (gradient, factors, sketches): each is made
  # only after the previous leaf's pass 1, not all before the first pass.
  made_by = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  inputs = [v for v in jaxpr.eqns[sketch_1].invars
            if not isinstance(v, jax.extend.core.Literal)
            and len(v.aval.shape) == 3]
  assert len(inputs) == (5 if optimizer == 'adam' else 2)
  for v in inputs:
    assert _depends_on(jaxpr, made_by[v], sketch_0)


# Tiles, grids and the static config.


def test_splits_fill_the_gpu_however_the_loop_factors():
  split = launch.splits(8 * 64, 172, 2048)  # 8 x 4096 rows: 512 programs
  assert (split.parts, split.size) == (4, 43)
  assert launch.splits(8 * 172, 64, 2048).parts == 1  # 1376 are enough
  # BERT's vocabulary, 477 row blocks of 64 (477 = 9 * 53), in 6 column
  # programs: 239 parts of 2 blocks, the last of 1.
  split = launch.splits(6, 477, 2048)
  assert (split.parts, split.size) == (239, 2)
  assert [tuple(map(int, split.blocks(p))) for p in (0, 1, 238)] == [
      (0, 2), (2, 4), (476, 477)]
  assert launch.splits(1, 3, 2048).parts == 3  # never more parts than blocks
  assert launch.splits(1, 172, 1).parts == 1


@pytest.mark.parametrize('target_programs,sizes', [
    (5, (5,)), (10, (3, 2)), (15, (2, 2, 1)), (25, (1,) * 5)])
def test_uneven_splits_sum_every_block_once(target_programs, sizes):
  """80 x 80 matrices in 16 x 16 tiles: 5 programs, each looping over 5
  blocks, in parts of these sizes; every split gives the reference sketch
  and projection."""
  split = launch.splits(5, 5, target_programs)
  assert [int(e) - int(b) for b, e in map(split.blocks, range(split.parts))
          ] == list(sizes)
  config = dataclasses.replace(FULL, block_rows=16, block_cols=16,
                               target_programs=target_programs)
  g, a_m, v_m, a_v, v_v, omegas, qs = pass_inputs(1, 80, 80, 4, jnp.float32,
                                                  config=config)
  ours = kernels.lion_sketch_pass(g, omegas[0], config=config,
                                  interpret=INTERPRET)
  assert_close(ours, kernels.lion_sketch_pass_reference(g, omegas[0]), 1e-5)
  coef = kernels.LionCoefficients(0.9, 0.1)
  ours = kernels.lion_project_pass(g, a_m, v_m, qs[0], coef, config=config,
                                   interpret=INTERPRET)
  theirs = kernels.lion_project_pass_reference(g, a_m, v_m, qs[0], coef)
  assert_close(ours.q_g, theirs.q_g, 1e-5)


def test_a_pass_tiling_can_set_its_own_program_target():
  """A :class:`PassTiling` entry's ``target_programs`` splits its pass's
  loop as the config's field would (here the Lion pass 2 of 80 x 80
  matrices into 3 + 2 row blocks), and only that pass's; its results are
  the reference's."""
  entry = kernels.PassTiling('mlorc_lion_project', 4, 16, 16, 2, 3,
                             target_programs=10)
  config = dataclasses.replace(FULL, block_rows=16, block_cols=16,
                               target_programs=5, pass_tilings=(entry,))
  assert config.tiling('mlorc_lion_project', jnp.float32, 16) == entry
  assert config.tiling('mlorc_lion_sketch', jnp.float32,
                       16).target_programs == 5
  # An entry without one takes the config's.
  plain = dataclasses.replace(config, pass_tilings=(
      entry._replace(target_programs=None),))
  assert plain.tiling('mlorc_lion_project', jnp.float32,
                      16).target_programs == 5
  g, a_m, v_m, _, _, _, qs = pass_inputs(1, 80, 80, 4, jnp.float32,
                                         config=config)
  coef = kernels.LionCoefficients(0.9, 0.1)
  jaxpr = jax.make_jaxpr(functools.partial(
      kernels.lion_project_pass, config=config, interpret=INTERPRET))(
          g, a_m, v_m, qs[0], coef)
  [call] = [e for e in jaxpr.eqns if e.primitive.name == 'pallas_call']
  # 5 column blocks, each loop of 5 row blocks split in 2 parts.
  assert call.params['grid_mapping'].grid == (1, 5, 2)
  ours = kernels.lion_project_pass(g, a_m, v_m, qs[0], coef, config=config,
                                   interpret=INTERPRET)
  theirs = kernels.lion_project_pass_reference(g, a_m, v_m, qs[0], coef)
  assert_close(ours.q_g, theirs.q_g, 1e-5)
  np.testing.assert_array_equal(ours.direction, theirs.direction)


def test_tiles_and_what_the_kernels_support():
  config = kernels.KernelConfig()
  assert launch.tile(4096, 64) == 64 and launch.tile(48, 64) == 16
  assert launch.tile(20, 64) is None
  assert kernels.supports(4096, 11008, config)
  assert not kernels.supports(20, 64, config)
  assert not kernels.supports(64, 30, config)
  assert launch.pow2_at_least(3) == 16 and launch.pow2_at_least(33) == 64
  # What the steps pad an axis the kernels cannot tile to: whole tiles of up
  # to the target, less than one tile of padding.
  assert launch.tiled_size(4096, 64) == 4096 and launch.tiled_size(48, 64) == 48
  assert launch.tiled_size(30522, 64) == 30528  # BERT's vocabulary
  assert launch.tiled_size(20, 64) == 32 and launch.tiled_size(3, 64) == 16
  assert launch.tiled_size(100, 32) == 128
  assert launch.pad_cols(jnp.ones((2, 3, 5)), 16).shape == (2, 3, 16)
  # Factors up to fma_max_rank (8) wide keep their rank; sketches and wider
  # factors are padded to a power of two >= 16 for the dots.
  assert kernels.kernel_widths(4, 4, config) == (4, 16)
  assert kernels.kernel_widths(8, 40, config) == (8, 64)
  assert kernels.kernel_widths(9, 9, config) == (16, 16)
  assert kernels.kernel_widths(4, 4, FULL_DOTS) == (16, 16)


def test_kernel_config_is_static_and_hashable():
  config = kernels.KernelConfig(block_rows=32, num_warps=8)
  assert config == kernels.KernelConfig(block_rows=32, num_warps=8)
  assert hash(config) == hash(kernels.KernelConfig(block_rows=32,
                                                   num_warps=8))
  with pytest.raises(AttributeError):
    config.block_rows = 64  # frozen
  hi = step_math.HIGHEST
  for kernel in kernels.PASSES:
    assert launch.dot_precisions(config, True, kernel) == (hi, hi, hi)
  preset = jax.lax.DotAlgorithmPreset
  # Pass 1 reconstructs in TF32 (it only finds the negative part), pass 2
  # at float32 level (the update comes from it).
  for kernel in launch.FIRST_PASSES:
    assert launch.dot_precisions(config, False, kernel) == (
        preset.TF32_TF32_F32, preset.BF16_BF16_F32, preset.BF16_BF16_F32)
  for kernel in set(kernels.PASSES) - set(launch.FIRST_PASSES):
    assert launch.dot_precisions(config, False, kernel) == (
        preset.TF32_TF32_F32_X3, preset.BF16_BF16_F32, preset.BF16_BF16_F32)


def test_compiled_kernels_compute_with_fast_arithmetic_by_default():
  """Fused multiply-adds and approximate division and square root in the
  compiled kernels (``KernelConfig.fast_math``); plain ``jax.numpy`` in
  interpret mode, or when turned off. The formulas are the same: with
  :data:`step_math.PLAIN` they are the references' own."""
  assert launch.arithmetic(kernels.KernelConfig(), False) is launch.FAST
  for config, interpret in ((kernels.KernelConfig(), True),
                            (kernels.KernelConfig(fast_math=False), False)):
    assert launch.arithmetic(config, interpret) is step_math.PLAIN
  x = jnp.array([1.5, -2.0, 3.0])
  np.testing.assert_array_equal(step_math.PLAIN.fma(x, x, 1.0), x * x + 1.0)


@pytest.mark.skipif(INTERPRET, reason='PTX runs on an NVIDIA GPU only')
def test_gpu_fast_arithmetic_is_within_its_documented_error():
  """:data:`launch.FAST` inside a compiled kernel against float64: the
  fused multiply-add rounds once (within half an ulp of the exact
  ``a * b + c``, where two roundings may be off by more), the division is
  within 2 ulp and the square root within ``2**-23`` relative (PTX ISA),
  for normal float32 operands."""
  keys = jax.random.split(jax.random.key(0), 6)
  a, b, c = (jnp.exp(jax.random.uniform(k, (64, 64), minval=-20, maxval=20))
             * jax.random.rademacher(s, (64, 64), jnp.float32)
             for k, s in zip(keys[:3], keys[3:]))

  def kernel(a_ref, b_ref, c_ref, fma_ref, div_ref, sqrt_ref):
    x, y, z = a_ref[...], b_ref[...], c_ref[...]
    fma_ref[...] = launch.FAST.fma(x, y, z)
    div_ref[...] = launch.FAST.div(x, y)
    sqrt_ref[...] = launch.FAST.sqrt(jnp.abs(z))

  out = jax.ShapeDtypeStruct(a.shape, jnp.float32)
  fma, div, sqrt = pl.pallas_call(
      kernel, out_shape=(out, out, out), interpret=False)(a, b, c)
  f64 = lambda x: np.asarray(x, np.float64)
  ulp = lambda x: np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)
  exact = f64(a) * f64(b) + f64(c)
  assert np.all(np.abs(f64(fma) - exact) <= 0.5 * ulp(exact))
  exact = f64(a) / f64(b)
  assert np.all(np.abs(f64(div) - exact) <= 2 * ulp(exact))
  exact = np.sqrt(np.abs(f64(c)))
  assert np.all(np.abs(f64(sqrt) - exact) <= 2.0**-23 * exact + ulp(exact))


def test_compiled_bf16_sketches_round_omega_once_for_both_products():
  """With bfloat16 sketches a compiled pass multiplies by ``omega`` rounded
  to bfloat16, and so must the small products ``V^T omega`` outside it:
  the step hands both the rounded values. Interpret mode, and sketches at
  another precision, keep ``omega`` as drawn."""
  omega = jax.random.normal(jax.random.key(0), (2, 64, 16))
  rounded = launch.sketch_operand(omega, kernels.KernelConfig(), False)
  np.testing.assert_array_equal(
      rounded, omega.astype(jnp.bfloat16).astype(jnp.float32))
  assert rounded.dtype == jnp.float32
  assert not np.array_equal(rounded, omega)
  for config, interpret in ((kernels.KernelConfig(), True), (FULL, False)):
    assert launch.sketch_operand(omega, config, interpret) is omega


def test_compiled_bf16_dots_get_their_operands_in_bfloat16():
  """:func:`launch.dot_input` hands a bfloat16 dot its operand already in
  bfloat16 (the rounding the dot's preset applies anyway: the kernel loads
  half the bytes and converts nothing); float32 presets and interpret mode
  keep it as it is."""
  x = jax.random.normal(jax.random.key(0), (2, 64, 16))
  default = kernels.KernelConfig()
  for field in ('sketch_precision', 'project_precision'):
    cast = launch.dot_input(x, field, default, False)
    assert cast.dtype == jnp.bfloat16
    np.testing.assert_array_equal(cast, x.astype(jnp.bfloat16))
    assert launch.dot_input(x, field, default, True) is x
    assert launch.dot_input(x, field, FULL, False) is x
    assert launch.dot_input(cast, field, default, False) is cast
  with pytest.raises(ValueError, match='precision must be one of'):
    launch.dot_input(x, 'block_rows', default, False)


@pytest.mark.parametrize('config, bfloat16', [
    (kernels.KernelConfig(), True),  # 'bf16' sketches and projections
    (FULL, False)])
def test_which_compiled_passes_take_bfloat16_operands(config, bfloat16):
  """Compiled, MLorc-AdamW's passes take ``omega`` and ``Q`` and
  MLorc-Lion's pass 1 takes ``omega`` in their dot's input dtype
  (:func:`launch.dot_input`); MLorc-Lion's pass 2 keeps a float32 ``Q``
  (cast, it raised the step's temporaries: ``dot_input``'s docstring).
  Checked on what each ``pallas_call`` receives; tracing compiles nothing,
  so this runs on a CPU."""
  batch, m, n, rank = 1, 64, 128, 4
  g, a_m, v_m, a_v, v_v, (om, ov), (q_m, q_v) = pass_inputs(
      batch, m, n, rank, jnp.float32, config=config)
  c, zeta = coefficients(batch), zetas(batch)
  coef = kernels.LionCoefficients(B1, 1 - B1)
  compiled = dict(config=config, interpret=False)
  narrow = jnp.bfloat16 if bfloat16 else jnp.float32
  # Each pass, and the dtypes its kernel must get om / ov / q_m / q_v in.
  passes = {
      'mlorc_adam_sketch': (lambda: kernels.sketch_pass(
          g, a_v, v_v, om, ov, 1 - B2, **compiled), [narrow, narrow]),
      'mlorc_adam_project': (lambda: kernels.project_pass(
          g, a_m, v_m, a_v, v_v, q_m, q_v, c, zeta, **compiled),
                             [narrow, narrow]),
      'mlorc_lion_sketch': (lambda: kernels.lion_sketch_pass(
          g, om, **compiled), [narrow]),
      'mlorc_lion_project': (lambda: kernels.lion_project_pass(
          g, a_m, v_m, q_m, coef, **compiled), [jnp.float32])}
  for name, (run, expected) in passes.items():
    [call] = [eqn for eqn in _equations(jax.make_jaxpr(run)().jaxpr)
              if eqn.primitive.name == 'pallas_call']
    assert call.params['name'] == name
    # Each pass's sketches [B, n, L] or bases [B, m, L] are its last
    # arguments.
    operands = [v.aval for v in call.invars[-len(expected):]]
    rows = n if name.endswith('sketch') else m
    assert [x.shape for x in operands] == [(batch, rows, om.shape[-1])] * len(
        expected), name
    assert [x.dtype for x in operands] == expected, name


def test_passes_given_bfloat16_operands_round_only_the_tile():
  """Handed ``omega`` and ``Q`` in bfloat16, as compiled MLorc-AdamW passes
  and MLorc-Lion's pass 1 get them (:func:`launch.dot_input`), every
  pass rounds each streamed tile to bfloat16 (relative error at most
  ``2**-8``: round to nearest with 8 significant bits) and sums the products
  in float32: within ``2**-8`` of ``|tile| |operand|``, plus float32
  summation, of its reference with the same operands in float32. Tiles that
  bfloat16 holds exactly (a bfloat16 gradient, the 0/1 indicator of negative
  entries) are not rounded at all, so their products must match to float32
  summation. Interpret mode runs the same kernel bodies, so this checks them
  on a CPU; but XLA on a CPU may keep a bfloat16 result in float32 (excess
  precision), so that every dot in the kernels returns float32 is checked on
  their jaxprs."""
  batch, m, n, rank = 2, 128, 192, 4
  g, a_m, v_m, a_v, v_v, (om, ov), (q_m, q_v) = pass_inputs(
      batch, m, n, rank, jnp.bfloat16, config=FULL)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  f64 = lambda x: np.asarray(x, np.float64)
  c, zeta = coefficients(batch), zetas(batch)
  b1 = jnp.full((batch,), B1)
  coef = kernels.LionCoefficients(b1=b1, one_minus_b1=1 - b1)
  interpreted = dict(config=FULL, interpret=True)
  passes = {
      'sketch': lambda: kernels.sketch_pass(g, a_v, v_v, bf16(om), bf16(ov),
                                            1 - B2, **interpreted),
      'project': lambda: kernels.project_pass(
          g, a_m, v_m, a_v, v_v, bf16(q_m), bf16(q_v), c, zeta,
          **interpreted),
      'lion_sketch': lambda: kernels.lion_sketch_pass(g, bf16(om),
                                                      **interpreted),
      'lion_project': lambda: kernels.lion_project_pass(
          g, a_m, v_m, bf16(q_m), coef, **interpreted)}
  for run in passes.values():
    dots = [eqn for eqn in _equations(jax.make_jaxpr(run)().jaxpr)
            if eqn.primitive.name == 'dot_general']
    assert dots and all(eqn.outvars[0].aval.dtype == jnp.float32
                        for eqn in dots)
  ours = {name: run() for name, run in passes.items()}

  def within(ours, theirs, name, bound=0.0):
    slack = 1e-5 * np.abs(f64(theirs)).max()
    assert ours.dtype == jnp.float32, name
    assert np.all(np.abs(f64(ours) - f64(theirs))
                  <= 2.0**-8 * f64(bound) + slack), name

  sketch = ours['sketch']
  theirs = kernels.sketch_pass_reference(g, a_v, v_v, f32(bf16(om)),
                                         f32(bf16(ov)), 1 - B2)
  within(sketch.g_omega, theirs.g_omega, 'g_omega')
  within(sketch.neg_omega, theirs.neg_omega, 'neg_omega')
  # x >= 0: its products with |omega| bound the rounding.
  within(sketch.x_omega, theirs.x_omega, 'x_omega',
         kernels.sketch_pass_reference(g, a_v, v_v, jnp.abs(f32(bf16(om))),
                                       jnp.abs(f32(bf16(ov))), 1 - B2).x_omega)
  assert_close(sketch.neg_count, theirs.neg_count, 1e-5, 'neg_count')

  project = ours['project']
  theirs = kernels.project_pass_reference(g, a_m, v_m, a_v, v_v,
                                          f32(bf16(q_m)), f32(bf16(q_v)), c,
                                          zeta)
  moments = projected_moments(g, a_m, v_m, a_v, v_v, c, zeta)
  for name, q, moment in (('b_m', q_m, moments[0]), ('b_v', q_v, moments[1])):
    within(getattr(project, name), getattr(theirs, name), name,
           jnp.einsum('bil,bij->blj', jnp.abs(q), jnp.abs(moment)))
  # The direction does not involve Q.
  np.testing.assert_array_equal(project.direction, kernels.project_pass(
      g, a_m, v_m, a_v, v_v, q_m, q_v, c, zeta, **interpreted).direction)

  within(ours['lion_sketch'],
         kernels.lion_sketch_pass_reference(g, f32(bf16(om))), 'lion sketch')
  within(ours['lion_project'].q_g, kernels.lion_project_pass_reference(
      g, a_m, v_m, f32(bf16(q_m)), coef).q_g, 'lion q_g')


def _launched_tiles(config, name, dtype, shape=(1, 128, 256), width=16):
  """``(bm, bn, num_warps, num_stages)`` that :func:`launch.launch` gives the
  pass ``name`` for a gradient of ``dtype`` and sketches ``width`` wide (a
  probe kernel, traced only)."""
  seen = {}

  def probe(g_ref, o_ref, *, bm, bn, **_):
    seen.update(bm=bm, bn=bn)
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

  g = jax.ShapeDtypeStruct(shape, dtype)
  jax.eval_shape(lambda g: launch.launch(
      probe, g, over='rows', args=(g,), config=config, interpret=True,
      name=name, width=width,
      out_shape=lambda parts: jax.ShapeDtypeStruct((1,), jnp.float32)), g)
  tiling = config.tiling(name, dtype, width)
  return seen['bm'], seen['bn'], tiling.num_warps, tiling.num_stages


def test_each_pass_takes_its_tiling_for_the_gradient_and_sketch_widths():
  """By default MLorc-AdamW's pass 1 with 16-bit gradients gets its own
  tiles and warps (others again for sketches 64 or more columns wide), and
  its pass 2 with such sketches two pipeline stages; MLorc-Lion's pass 2
  with 16-bit gradients and narrower sketches wider tiles; every other
  pass, dtype and width takes the config's fields."""
  config = kernels.KernelConfig()
  assert config.pass_tilings == (
      kernels.PassTiling('mlorc_adam_sketch', 2, 64, 32, 2, 3),
      kernels.PassTiling('mlorc_adam_sketch', 2, 128, 32, 4, 3, 64),
      kernels.PassTiling('mlorc_adam_project', 2, 64, 64, 4, 2, 64),
      kernels.PassTiling('mlorc_adam_project', 4, 64, 64, 4, 2, 64),
      kernels.PassTiling('mlorc_lion_project', 2, 64, 128, 4, 3),
      kernels.PassTiling('mlorc_lion_project', 2, 64, 64, 4, 3, 64))
  for dtype in (jnp.bfloat16, jnp.float16):
    for width, tiling in ((16, (64, 32, 2, 3)), (32, (64, 32, 2, 3)),
                          (64, (128, 32, 4, 3)), (128, (128, 32, 4, 3))):
      assert _launched_tiles(config, 'mlorc_adam_sketch', dtype,
                             width=width) == tiling, width
  for width in (16, 64):
    assert _launched_tiles(config, 'mlorc_adam_sketch', jnp.float32,
                           width=width) == (64, 64, 4, 3)
  for dtype in (jnp.bfloat16, jnp.float32):
    for width, stages in ((16, 3), (32, 3), (64, 2), (128, 2)):
      assert _launched_tiles(config, 'mlorc_adam_project', dtype,
                             width=width) == (64, 64, 4, stages), width
    for width in (16, 64):
      assert _launched_tiles(config, 'mlorc_lion_sketch', dtype,
                             width=width) == (64, 64, 4, 3)
  for width, bn in ((16, 128), (32, 128), (64, 64), (128, 64)):
    assert _launched_tiles(config, 'mlorc_lion_project', jnp.bfloat16,
                           width=width) == (64, bn, 4, 3), width
    assert _launched_tiles(config, 'mlorc_lion_project', jnp.float32,
                           width=width) == (64, 64, 4, 3), width
  # Entries replace the fields of one pass and width; none: the fields.
  mine = kernels.KernelConfig(block_rows=32, num_warps=8, pass_tilings=(
      kernels.PassTiling('mlorc_lion_project', 4, 16, 128, 2, 1),))
  assert _launched_tiles(mine, 'mlorc_lion_project', jnp.float32) == (
      16, 128, 2, 1)
  assert _launched_tiles(mine, 'mlorc_lion_project', jnp.bfloat16) == (
      32, 64, 8, 3)
  assert _launched_tiles(mine, 'mlorc_adam_sketch', jnp.bfloat16) == (
      32, 64, 8, 3)
  # Of the entries that apply, the one with the largest min_width.
  wide = kernels.KernelConfig(pass_tilings=tuple(
      kernels.PassTiling('mlorc_lion_sketch', 4, 16, 16 << i, 2, 1, w)
      for i, w in enumerate((32, 0, 128))))
  for width, bn in ((16, 32), (32, 16), (64, 16), (128, 64), (256, 64)):
    assert _launched_tiles(wide, 'mlorc_lion_sketch', jnp.float32,
                           width=width)[1] == bn, width
  # A tile wider than the matrix allows falls back as the fields' do.
  assert _launched_tiles(mine, 'mlorc_lion_project', jnp.float32,
                         (1, 48, 96))[:2] == (16, 32)


@pytest.mark.parametrize('entry,match', [
    (kernels.PassTiling('mlorc_adam_sketchy', 2, 64, 32, 2, 3),
     r'pass_tilings\[0\]\.kernel must be one of'),
    (kernels.PassTiling('mlorc_adam_sketch', 8, 64, 32, 2, 3),
     r'pass_tilings\[0\]\.itemsize must be 2 or 4'),
    (kernels.PassTiling('mlorc_adam_sketch', 2, 48, 32, 2, 3),
     r'pass_tilings\[0\]\.block_rows must be a power of two'),
    (kernels.PassTiling('mlorc_adam_sketch', 2, 64, 32, 3, 3),
     r'pass_tilings\[0\]\.num_warps must be a power of two'),
    (kernels.PassTiling('mlorc_adam_sketch', 2, 64, 32, 2, 0),
     r'pass_tilings\[0\]\.num_stages must be an int'),
    (kernels.PassTiling('mlorc_adam_sketch', 2, 64, 32, 2, 3, -16),
     r'pass_tilings\[0\]\.min_width must be an int >= 0'),
    (kernels.PassTiling('mlorc_adam_sketch', 2, 64, 32, 2, 3, 0, 0),
     r'pass_tilings\[0\]\.target_programs must be an int >= 1'),
    (('mlorc_adam_sketch', 2, 64, 32, 2, 3),
     r'pass_tilings\[0\] must be a PassTiling'),
])
def test_pass_tilings_reject_bad_entries_naming_them(entry, match):
  with pytest.raises(ValueError, match=match):
    kernels.KernelConfig(pass_tilings=(entry,))


def test_pass_tilings_reject_a_repeated_entry_and_a_list():
  entry = kernels.PassTiling('mlorc_lion_sketch', 4, 64, 32, 2, 3)
  with pytest.raises(ValueError, match=r'pass_tilings\[1\] repeats'):
    kernels.KernelConfig(pass_tilings=(entry, entry._replace(num_warps=4)))
  # Another min_width is another entry.
  kernels.KernelConfig(pass_tilings=(entry, entry._replace(min_width=64)))
  with pytest.raises(ValueError, match='pass_tilings must be a tuple'):
    kernels.KernelConfig(pass_tilings=[entry])


@pytest.mark.parametrize('field,value', [
    ('block_rows', 48), ('block_rows', 8), ('block_cols', 0),
    ('block_cols', 64.0), ('num_warps', 3), ('num_warps', True),
    ('num_stages', 0), ('target_programs', -1), ('group_max_elements', -1),
    ('group_max_elements', 2.0), ('fma_max_rank', -1), ('fma_max_rank', 4.0),
    ('reconstruct_precision', 'highest'), ('sketch_precision', 'bfloat16'),
    ('sketch_reconstruct_precision', 'fp8'), ('project_precision', 'tf16'),
    ('fast_math', 1), ('fast_math', None),
])
def test_kernel_config_rejects_bad_values_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f'KernelConfig.{field} must be'):
    kernels.KernelConfig(**{field: value})


# Shape checks.


def _adam_inputs(batch=2, m=64, n=128, width=16):
  g = jnp.ones((batch, m, n))
  a, v = jnp.ones((batch, m, width)), jnp.ones((batch, n, width))
  return g, a, v, jnp.ones((batch, n, width)), a


def _sketch(**bad):
  g, a, v, omega, _ = _adam_inputs()
  args = dict(g=g, a_v=a, v_v=v, omega_m=omega, omega_v=omega,
              one_minus_b2=0.001)
  return dict(args, **bad)


def _project(**bad):
  g, a, v, _, q = _adam_inputs()
  args = dict(g=g, a_m=a, v_m=v, a_v=a, v_v=v, q_m=q, q_v=q,
              coefficients=coefficients(2), zeta=0.0)
  return dict(args, **bad)


@pytest.mark.parametrize('fn,kwargs,match', [
    ('sketch_pass', _sketch(g=jnp.ones((64, 128))), r'g must have shape \[B'),
    ('sketch_pass', _sketch(a_v=jnp.ones((2, 32, 16))), 'a_v has m = 32'),
    ('sketch_pass', _sketch(v_v=jnp.ones((3, 128, 16))), 'v_v has B = 3'),
    ('sketch_pass', _sketch(omega_v=jnp.ones((2, 128, 32))),
     'omega_v has L = 32'),
    ('sketch_pass', _sketch(a_v=jnp.ones((2, 64, 24)),
                            v_v=jnp.ones((2, 128, 24))),
     'a_v has R = 24: the kernels take factors up to '
     'KernelConfig.fma_max_rank = 8 wide'),
    ('sketch_pass', _sketch(omega_m=jnp.ones((2, 128, 8)),
                            omega_v=jnp.ones((2, 128, 8))),
     'omega_m has L = 8: the kernels take factors up to '
     'KernelConfig.fma_max_rank = 8 wide or widths that are powers of two'),
    ('sketch_pass', _sketch(one_minus_b2=jnp.ones(3)), 'one_minus_b2 must'),
    ('project_pass', _project(q_v=jnp.ones((2, 64, 24))), 'q_v has L = 24'),
    ('project_pass', _project(coefficients=coefficients(3)),
     r'coefficients\.one_minus_b1 must be a scalar or \[B\]'),
    ('project_pass', _project(zeta=jnp.ones((2, 1))), 'zeta must'),
])
def test_passes_reject_bad_shapes_naming_the_argument(fn, kwargs, match):
  with pytest.raises(ValueError, match=f'{fn}: {match}'):
    getattr(kernels, fn)(**kwargs, interpret=True)
  if 'fma_max_rank' not in match:  # the reference checks the same shapes
    with pytest.raises(ValueError, match=f'{fn}_reference: {match}'):
      getattr(kernels, f'{fn}_reference')(**kwargs)


def test_kernels_reject_what_they_cannot_tile_but_references_take_it():
  g, a, v, omega, q = _adam_inputs(m=20, n=30, width=3)
  assert kernels.sketch_pass_reference(g, a, v, omega, omega, 0.001
                                       ).g_omega.shape == (2, 20, 3)
  assert kernels.lion_project_pass_reference(
      g, a, v, q, kernels.LionCoefficients(0.9, 0.1)).q_g.shape == (2, 3, 30)
  g, a, v, omega, q = _adam_inputs(m=20)
  with pytest.raises(ValueError, match='lion_sketch_pass: g has m = 20'):
    kernels.lion_sketch_pass(g, omega, interpret=True)
  g, a, v, omega, q = _adam_inputs()
  with pytest.raises(ValueError,
                     match=r'lion_project_pass: coefficients\.b1 must'):
    kernels.lion_project_pass(g, a, v, q,
                              kernels.LionCoefficients(jnp.ones(3), 0.1),
                              interpret=True)


# The pallas_calls are named (profiles and HLO show these names).


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its parameters (a
  ``pallas_call``'s kernel, a loop's body), depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _equations(sub)


def _pallas_call_names(jaxpr):
  return [eqn.params['name'] for eqn in _equations(jaxpr)
          if eqn.primitive.name == 'pallas_call']


def test_every_pallas_call_is_named():
  batch, m, n, rank = 1, 64, 128, 4
  g = jnp.ones((batch, m, n))
  factors = random_factors(jax.random.key(0), batch, m, n, rank)
  omega = jnp.ones((batch, n, rank))
  coef = kernels.AdamCoefficients(1 - B1, 1 - B2, 10.0, 0.0, 1000.0, EPS, 0.0)

  def steps(g):
    adam = kernels.adam_step(
        [kernels.AdamLeafInputs(g, factors, factors, omega, omega, True)],
        coef, config=FULL, interpret=True)
    lion = kernels.lion_step([kernels.LionLeafInputs(g, factors, omega, True)],
                             0.9, 0.99, config=FULL, interpret=True)
    return adam, lion

  names = _pallas_call_names(jax.make_jaxpr(steps)(g).jaxpr)
  assert sorted(names) == ['mlorc_adam_project', 'mlorc_adam_sketch',
                           'mlorc_lion_project', 'mlorc_lion_sketch']
  # The names are the keys of KernelConfig.pass_tilings.
  assert sorted(names) == sorted(kernels.PASSES)
