"""Specification of the randomized SVD (paper Algorithm 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlorc_optax import randomized_svd, reconstruct
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
