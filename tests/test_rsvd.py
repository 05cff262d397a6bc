"""Specification of the randomized SVD (paper Algorithm 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlorc_optax import randomized_svd
from mlorc_optax._src.rsvd import reconstruct
from mlorc_optax._src import rsvd as rsvd_lib


def decaying_matrix(key, m, n, decay=0.5):
  """A random m x n matrix with singular values decay**i."""
  k1, k2 = jax.random.split(key)
  q1, _ = jnp.linalg.qr(jax.random.normal(k1, (m, m)))
  q2, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
  k = min(m, n)
  s = decay ** jnp.arange(k, dtype=jnp.float32)
  return (q1[:, :k] * s) @ q2[:, :k].T, np.asarray(s)


@pytest.mark.parametrize('shape', [(30, 8), (8, 30), (12, 12), (2, 3, 9, 5)])
def test_exact_at_full_rank(shape):
  a = jax.random.normal(jax.random.key(0), shape)
  f = randomized_svd(a, jax.random.key(1), rank=max(shape[-2:]) + 3)
  k = min(shape[-2:])
  assert f.u.shape == (*shape[:-1], k)
  assert f.s.shape == (*shape[:-2], k)
  assert f.v.shape == (*shape[:-2], shape[-1], k)
  np.testing.assert_allclose(reconstruct(f), a, atol=2e-5)


@pytest.mark.parametrize('m,n', [(60, 40), (40, 60)])
@pytest.mark.parametrize('oversample,power_iters,slack', [
    (0, 0, 15.0),  # plain Algorithm 3 (p=0): within a modest factor
    (5, 1, 1.01),  # oversampling + one power iteration: optimal
])
def test_error_close_to_eckart_young(m, n, oversample, power_iters, slack):
  a, s = decaying_matrix(jax.random.key(2), m, n)
  rank = 4
  f = randomized_svd(a, jax.random.key(3), rank, oversample=oversample,
                     power_iters=power_iters)
  err = np.linalg.norm(np.asarray(reconstruct(f) - a), 2)
  optimal = s[rank]  # spectral error of the best rank-4 approximation
  assert optimal <= err * (1 + 1e-3) + 1e-6
  assert err <= slack * optimal


def test_singular_values_sorted_and_orthonormal_factors():
  a, s = decaying_matrix(jax.random.key(4), 50, 30)
  f = randomized_svd(a, jax.random.key(5), 5, oversample=5, power_iters=2)
  np.testing.assert_allclose(f.s, s[:5], rtol=1e-4)
  np.testing.assert_allclose(f.u.T @ f.u, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(f.v.T @ f.v, np.eye(5), atol=1e-5)


@pytest.mark.parametrize('shape', [(16, 9), (9, 16), (4, 7, 7)])
def test_zero_matrix_gives_zero_factors_without_nan(shape):
  f = randomized_svd(jnp.zeros(shape), jax.random.key(0), rank=3,
                     oversample=2, power_iters=2)
  for x in f:
    assert np.all(np.isfinite(x))
  np.testing.assert_array_equal(f.s, 0.0)
  np.testing.assert_array_equal(reconstruct(f), 0.0)


def test_bfloat16_input_is_computed_in_float32():
  a, _ = decaying_matrix(jax.random.key(6), 32, 16)
  f16 = randomized_svd(a.astype(jnp.bfloat16), jax.random.key(7), 16)
  assert all(x.dtype == jnp.float32 for x in f16)
  # Exact up to the bfloat16 rounding of the input itself.
  np.testing.assert_allclose(
      reconstruct(f16), a.astype(jnp.bfloat16).astype(jnp.float32), atol=1e-5)


def test_batched_equals_per_matrix_with_the_same_sketch():
  a = jax.random.normal(jax.random.key(8), (3, 20, 10))
  omega = jax.random.normal(jax.random.key(9), (3, 10, 4))
  batched = rsvd_lib.randomized_svd_from_sketch(a, omega, 3)
  for i in range(3):
    single = rsvd_lib.randomized_svd_from_sketch(a[i], omega[i], 3)
    np.testing.assert_allclose(reconstruct(batched)[i], reconstruct(single),
                               atol=1e-5)


def test_jit_and_key_determinism():
  a = jax.random.normal(jax.random.key(10), (20, 15))
  fn = jax.jit(randomized_svd, static_argnames=('rank', 'oversample',
                                                 'power_iters'))
  f1 = fn(a, jax.random.key(11), rank=3)
  f2 = randomized_svd(a, jax.random.key(11), rank=3)
  f3 = randomized_svd(a, jax.random.key(12), rank=3)
  np.testing.assert_allclose(reconstruct(f1), reconstruct(f2), atol=1e-5)
  assert not np.allclose(reconstruct(f2), reconstruct(f3), atol=1e-3)


def test_raw_and_typed_keys_draw_the_same_sketch():
  a = jax.random.normal(jax.random.key(13), (20, 15))
  typed = randomized_svd(a, jax.random.key(3), rank=2)
  raw = randomized_svd(a, jax.random.PRNGKey(3), rank=2)
  np.testing.assert_array_equal(reconstruct(typed), reconstruct(raw))


@pytest.mark.parametrize('kwargs,error', [
    (dict(rank=0), ValueError),
    (dict(rank=2.5), TypeError),
    (dict(rank=2, oversample=-1), ValueError),
    (dict(rank=2, power_iters=-1), ValueError),
])
def test_invalid_arguments_raise(kwargs, error):
  with pytest.raises(error, match=next(iter(
      k for k in ('power_iters', 'oversample', 'rank') if k in kwargs))):
    randomized_svd(jnp.ones((4, 4)), jax.random.key(0), **kwargs)


def test_rejects_vectors_and_integers():
  with pytest.raises(ValueError, match='shape'):
    randomized_svd(jnp.ones(4), jax.random.key(0), 1)
  with pytest.raises(TypeError, match='floating'):
    randomized_svd(jnp.ones((4, 4), jnp.int32), jax.random.key(0), 1)


# Derivatives (the constant-rank derivative of R = P A; see
# randomized_svd_from_sketch). The finite differences are those of a float64
# NumPy reference of the same map (the same sketch), exact to ~1e-9, so the
# tolerances measure the float32 rule itself: its products and
# factorizations of matrices with condition numbers < 100 here are accurate
# to ~1e-6 relative (measured 2e-7 to 7e-6); 1e-4 leaves a wide margin and
# is far below the errors of differentiating through QR and SVD (3.6 to 150
# on the rank-deficient cases below, NaN for a zero matrix).

JVP_RTOL = 1e-4


def _recon(a, omega, rank, power_iters=0):
  return reconstruct(rsvd_lib.randomized_svd_from_sketch(
      a, omega, rank, power_iters=power_iters))


def _recon_jvp(a, da, omega, rank, power_iters=0):
  fn = jax.jit(lambda x, dx, om: jax.jvp(
      lambda y: _recon(y, om, rank, power_iters), (x,), (dx,))[1])
  return np.asarray(fn(jnp.asarray(a, jnp.float32),
                       jnp.asarray(da, jnp.float32), omega), np.float64)


def _reference_recon(a, omega, power_iters=0):
  """float64 ``P A``, ``P`` the projector onto the numerical range of the
  sketch (power iterations one range at a time, as the forward pass)."""

  def basis(y):
    u, s, _ = np.linalg.svd(y, full_matrices=False)
    return u[:, s > 1e-10 * s[0]]

  a = np.asarray(a, np.float64)
  b = basis(a if omega is None else a @ np.asarray(omega, np.float64))
  for _ in range(power_iters):
    b = basis(a @ basis(a.T @ b))
  return b @ (b.T @ a)


def _central_difference(fn, a, da, eps=1e-6):
  return (fn(a + eps * da) - fn(a - eps * da)) / (2 * eps)


def _rel_err(x, ref):
  return np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref)


def _inputs(seed, m, n, width):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((m, n)).astype(np.float32)
  da = rng.standard_normal((m, n)).astype(np.float32)
  omega = None if width is None else rng.standard_normal(
      (n, width)).astype(np.float32)
  return a, da, omega


@pytest.mark.parametrize('m,n,width', [
    (20, 12, None),  # identity sketch (l = n)
    (12, 20, 12),  # square Gaussian sketch of a wide matrix (l = m)
])
def test_jvp_is_exact_at_full_rank(m, n, width):
  """l = min(m, n): R(A) = A, so dR = dA, and ds_i = u_i^T dA v_i."""
  a, da, omega = _inputs(0, m, n, width)
  k = min(m, n)
  assert _rel_err(_recon_jvp(a, da, omega, k), da) < JVP_RTOL
  f, (du, ds, dv) = jax.jit(lambda x, dx: jax.jvp(
      lambda y: rsvd_lib.randomized_svd_from_sketch(y, omega, k), (x,), (dx,)
  ))(a, da)
  s_fd = _central_difference(lambda x: np.linalg.svd(x, compute_uv=False),
                             a.astype(np.float64), da.astype(np.float64))
  assert _rel_err(ds, s_fd) < JVP_RTOL
  # The factors' tangent reconstructs dA.
  d_recon = ((du * f.s) @ f.v.T + (f.u * ds) @ f.v.T + (f.u * f.s) @ dv.T)
  assert _rel_err(d_recon, da) < JVP_RTOL


@pytest.mark.parametrize('width,power_iters', [(4, 0), (4, 1), (None, 0)])
def test_jvp_of_a_rank_deficient_matrix_keeps_its_rank(width, power_iters):
  """A = B C^T of rank 2 < 4 is recovered exactly, so along A(e) = (B + e dB)
  (C + e dC)^T, R(A(e)) = A(e) and the derivative is dB C^T + B dC^T."""
  rng = np.random.default_rng(1)
  m, n = 20, 12
  b, c, db, dc = (rng.standard_normal(s).astype(np.float32)
                  for s in [(m, 2), (n, 2), (m, 2), (n, 2)])
  omega = None if width is None else rng.standard_normal(
      (n, width)).astype(np.float32)
  rank = 4 if width is not None else n
  da = db @ c.T + b @ dc.T
  jvp = _recon_jvp(b @ c.T, da, omega, rank, power_iters)
  assert np.all(np.isfinite(jvp))
  assert _rel_err(jvp, da) < JVP_RTOL
  # The float32 function itself along the curve: its central difference is
  # exact for a quadratic, up to the float32 rounding of R (~1e-6 |A|) / e.
  e = 1e-2
  curve = lambda t: jnp.asarray((b + t * db) @ (c + t * dc).T)
  recon = jax.jit(lambda x: _recon(x, omega, rank, power_iters))
  fd = (recon(curve(e)) - recon(curve(-e))) / (2 * e)
  assert _rel_err(jvp, np.asarray(fd, np.float64)) < 1e-3


@pytest.mark.parametrize('power_iters', [0, 1])
@pytest.mark.parametrize('m,n', [(20, 12), (12, 20)])
def test_jvp_with_truncation_matches_finite_differences(m, n, power_iters):
  """p = 0, generic full-rank A: R = P A (rank 4) is smooth; dR exact."""
  a, da, omega = _inputs(2, m, n, 4)
  jvp = _recon_jvp(a, da, omega, 4, power_iters)
  fd = _central_difference(
      lambda x: _reference_recon(x, omega, power_iters), a.astype(np.float64),
      da.astype(np.float64))
  assert _rel_err(jvp, fd) < JVP_RTOL


def test_jvp_with_oversampling_projects_onto_the_rank_r_tangent_space():
  """l > rank: d(P A) projected onto the tangent space at U S V^T (the
  derivative of the truncation itself is omitted, as documented)."""
  a, da, omega = _inputs(3, 20, 12, 7)
  rank = 4
  jvp = _recon_jvp(a, da, omega, rank)
  d_pa = _central_difference(
      lambda x: _reference_recon(x, omega), a.astype(np.float64),
      da.astype(np.float64))
  f = rsvd_lib.randomized_svd_from_sketch(a, omega, rank)
  pu = np.asarray(f.u, np.float64) @ np.asarray(f.u, np.float64).T
  pv = np.asarray(f.v, np.float64) @ np.asarray(f.v, np.float64).T
  projected = pu @ d_pa + d_pa @ pv - pu @ d_pa @ pv
  assert _rel_err(jvp, projected) < JVP_RTOL


@pytest.mark.parametrize('magnitude', [1e-30, 1.0, 1e30])
def test_jvp_is_unaffected_by_the_scale_normalisation(magnitude):
  """The division by max|A| is inside the rule: dR(cA)[c dA] = c dR(A)[dA]."""
  a, da, omega = _inputs(4, 16, 10, 4)
  ref = _central_difference(lambda x: _reference_recon(x, omega),
                            a.astype(np.float64), da.astype(np.float64))
  jvp = _recon_jvp(a * magnitude, da * magnitude, omega, 4)
  assert np.all(np.isfinite(jvp))
  assert _rel_err(jvp / magnitude, ref) < JVP_RTOL


@pytest.mark.parametrize('omega', [None, 'gaussian'])
def test_zero_matrix_has_finite_derivatives(omega):
  """At A = 0 (rank 0) the constant-rank derivative is 0, not NaN."""
  omega = None if omega is None else jnp.ones((9, 3))
  rank = 9 if omega is None else 3
  da = jax.random.normal(jax.random.key(0), (16, 9))
  _, tangent = jax.jit(lambda x, dx: jax.jvp(
      lambda y: rsvd_lib.randomized_svd_from_sketch(y, omega, rank), (x,),
      (dx,)))(jnp.zeros((16, 9)), da)
  for t in tangent:
    np.testing.assert_array_equal(t, 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(_recon(x, omega, rank) ** 2)))(
      jnp.zeros((16, 9)))
  np.testing.assert_array_equal(grad, 0.0)


def test_reverse_mode_is_the_transpose_and_omega_is_constant():
  """<w, J dA> = <J^T w, dA> on a batch, and the sketch gets no gradient."""
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.standard_normal((2, 20, 12)), jnp.float32)
  da = jnp.asarray(rng.standard_normal((2, 20, 12)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 20, 12)), jnp.float32)
  omega = jnp.asarray(rng.standard_normal((2, 12, 5)), jnp.float32)
  fn = lambda x, om: _recon(x, om, 3, power_iters=1)
  _, jvp = jax.jit(lambda x, dx: jax.jvp(lambda y: fn(y, omega), (x,), (dx,)))(
      a, da)
  ga, gom = jax.jit(jax.grad(lambda x, om: jnp.sum(w * fn(x, om)), (0, 1)))(
      a, omega)
  np.testing.assert_allclose(jnp.sum(ga * da), jnp.sum(w * jvp), rtol=1e-5)
  np.testing.assert_array_equal(gom, 0.0)


def test_differentiation_leaves_the_values_unchanged():
  a = jax.random.normal(jax.random.key(6), (3, 30, 17))
  kwargs = dict(rank=5, oversample=3, power_iters=2)
  plain = randomized_svd(a, jax.random.key(7), **kwargs)
  primal, _ = jax.jvp(lambda x: randomized_svd(x, jax.random.key(7), **kwargs),
                      (a,), (a,))
  for x, y in zip(plain, primal):
    np.testing.assert_array_equal(x, y)
