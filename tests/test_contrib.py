"""Specification of mlorc_optax.contrib's transforms: OrthoGrad, Grams and
Adam-atan2 (the compressors of contrib: tests/test_compressors.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax import contrib

from helpers import EPS32

A = 1.27  # Adam-atan2's output scale.


# --------------------------------------------------------------------------
# OrthoGrad.
# --------------------------------------------------------------------------


def test_orthograd_removes_the_part_along_the_weights_by_hand():
  w = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # <w, g> = 1, <w, w> = 2: g - w / 2.
  perp = np.array([[0.5, -0.5], [0.0, 1.0]])
  tx = contrib.orthograd(rescale=False)
  u, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  np.testing.assert_allclose(u['w'], perp, rtol=1e-6)
  assert abs(float(jnp.sum(u['w'] * w))) < 1e-6
  # rescale: the same direction with the norm of g (sqrt 2, not sqrt 1.5).
  tx = contrib.orthograd()
  u, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  np.testing.assert_allclose(u['w'], perp * math.sqrt(2 / 1.5), rtol=1e-6)


def test_orthograd_edge_cases():
  tx = contrib.orthograd()
  params = {'zero': jnp.zeros(3), 'par': jnp.array([1.0, 2.0]),
            'int': jnp.array([1, 2]), 'none': None}
  grads = {'zero': jnp.array([1.0, -2.0, 3.0]), 'par': jnp.array([3.0, 6.0]),
           'int': jnp.array([5, 6]), 'none': None}
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u['zero'], grads['zero'])  # nothing to remove
  np.testing.assert_allclose(u['par'], 0.0, atol=1e-6)  # all along w
  np.testing.assert_array_equal(u['int'], grads['int'])
  assert u['none'] is None
  bf16 = jnp.array([1.0, 2.0], jnp.bfloat16)
  assert tx.update(bf16, tx.init(bf16), bf16)[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='params'):
    tx.update(grads, tx.init(params))
  with pytest.raises(TypeError, match='rescale'):
    contrib.orthograd(rescale='yes')


def test_orthograd_chains_before_mlorc_adamw():
  params = {'w': jax.random.normal(jax.random.key(0), (12, 8))}
  grads = {'w': params['w'] + jax.random.normal(jax.random.key(1), (12, 8))}
  tx = optax.chain(contrib.orthograd(), mlorc_optax.mlorc_adamw(1.0, rank=2))
  plain = mlorc_optax.mlorc_adamw(1.0, rank=2, weight_decay=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  # The first Adam step of the projected gradient is its sign.
  ortho, _ = contrib.orthograd().update(grads, optax.EmptyState(), params)
  expected, _ = plain.update(ortho, plain.init(params), params)
  wd = 1e-4 * params['w']  # mlorc_adamw's default decoupled weight decay
  np.testing.assert_allclose(u['w'], expected['w'] - wd, rtol=1e-5)


# --------------------------------------------------------------------------
# Grams.
# --------------------------------------------------------------------------


def test_grams_keeps_adams_magnitude_with_the_gradients_sign_by_hand():
  # Adam with b1 = b2 = 0.5, eps = 0 after g1 = (4, -1), g2 = (-1, 1):
  # m_hat = (0.25 g1 + 0.5 g2) / 0.75 = (2/3, 1/3),
  # v_hat = (0.25 g1^2 + 0.5 g2^2) / 0.75 = (6, 1),
  # Adam: (2/3 / sqrt 6, 1/3) = (0.2722, 0.3333), Grams: sign(g2) = (-, +).
  adam = optax.scale_by_adam(0.5, 0.5, eps=0.0)
  tx = contrib.grams(adam)
  g1, g2 = jnp.array([4.0, -1.0]), jnp.array([-1.0, 1.0])
  state = tx.init(g1)
  assert isinstance(state, contrib.GramsState)
  _, state = tx.update(g1, state)
  u, state = tx.update(g2, state)
  np.testing.assert_allclose(u, [-2 / 3 / math.sqrt(6), 1 / 3], rtol=1e-6)
  # The wrapped state is Adam's own.
  np.testing.assert_allclose(state.inner_state.mu, [0.5, 0.25])


def test_grams_zero_gradient_entries_none_leaves_and_extra_args():
  tx = contrib.grams(optax.scale_by_adam())
  grads = {'a': jnp.array([0.0, 2.0]), 'n': None}
  u, _ = tx.update(grads, tx.init(grads), extra_arg_for_someone_else=1)
  np.testing.assert_array_equal(u['a'][0], 0.0)  # sign(0) = 0
  assert u['n'] is None
  with pytest.raises(TypeError, match='inner'):
    contrib.grams(lambda g: g)


def test_grams_wraps_scale_by_mlorc_adam():
  params = {'w': jnp.zeros((12, 8))}
  k1, k2 = jax.random.split(jax.random.key(0))
  # Rank 1, so the rank-2 moments are exact and m keeps the sign of g.
  g = jnp.outer(jax.random.normal(k1, (12,)), jax.random.normal(k2, (8,)))
  # No entry near 0, where rounding of the factors could flip m's sign.
  assert jnp.abs(g).min() > 1e-3 * jnp.abs(g).max()
  inner = mlorc_optax.scale_by_mlorc_adam(rank=2)
  tx = contrib.grams(inner)
  s, si = tx.init(params), inner.init(params)
  for t in range(3):
    grads = {'w': g if t < 2 else -g}  # the last step flips every sign
    u, s = tx.update(grads, s)
    ui, si = inner.update(grads, si)
  np.testing.assert_allclose(u['w'], -jnp.sign(g) * jnp.abs(ui['w']),
                             rtol=1e-6)
  assert np.all(np.sign(u['w']) != np.sign(ui['w']))  # Adam kept the old sign


# --------------------------------------------------------------------------
# Adam-atan2.
# --------------------------------------------------------------------------


def test_adam_atan2_by_hand():
  # The same two steps as the Grams case: a * atan2(m_hat, sqrt(v_hat)).
  tx = contrib.scale_by_adam_atan2(0.5, 0.5)
  g1, g2 = jnp.array([4.0, -1.0]), jnp.array([-1.0, 1.0])
  _, state = tx.update(g1, tx.init(g1))
  u, _ = tx.update(g2, state)
  np.testing.assert_allclose(
      u, [A * math.atan2(2 / 3, math.sqrt(6)), A * math.atan2(1 / 3, 1.0)],
      rtol=1e-6)
  with pytest.raises(ValueError, match='b1'):
    contrib.scale_by_adam_atan2(b1=1.0)


def test_adam_atan2_is_scale_invariant_where_adam_is_not():
  g = jax.random.normal(jax.random.key(0), (20,))
  tx = contrib.scale_by_adam_atan2()
  adam = optax.scale_by_adam()
  big, _ = tx.update(g, tx.init(g))
  small, _ = tx.update(1e-9 * g, tx.init(g))
  np.testing.assert_allclose(small, big, rtol=1e-5)
  adam_small, _ = adam.update(1e-9 * g, adam.init(g))
  assert np.max(np.abs(adam_small)) < 0.2  # eps = 1e-8 swamps 1e-9 grads


def away_from_zero(key, shape):
  """Entries of magnitude in [1, 2] with random signs."""
  k1, k2 = jax.random.split(key)
  return jax.random.uniform(k1, shape, minval=1.0, maxval=2.0) * jnp.sign(
      jax.random.normal(k2, shape))


@pytest.mark.parametrize('nesterov', [False, True])
def test_mlorc_atan2_at_full_rank_equals_dense_adam_atan2(nesterov):
  """MLorc-Adam-atan2 is low_rank_moments around contrib's Adam-atan2."""
  params = {'w': jnp.zeros((10, 6)), 'b': jnp.zeros(6)}
  key = jax.random.key(3)
  tx = mlorc_optax.low_rank_moments(
      contrib.scale_by_adam_atan2(nesterov=nesterov), rank=6,
      low_rank_mask={'w': True, 'b': False})
  dense = contrib.scale_by_adam_atan2(nesterov=nesterov)
  s, sd = tx.init(params), dense.init(params)
  step, dense_step = jax.jit(tx.update), jax.jit(dense.update)
  for _ in range(4):
    key, k1, k2 = jax.random.split(key, 3)
    grads = {'w': away_from_zero(k1, (10, 6)), 'b': away_from_zero(k2, (6,))}
    u, s = step(grads, s)
    ud, sd = dense_step(grads, sd)
    # A full-rank factored moment is exact to float32 rounding of its
    # largest entry (a QR and an SVD of 10 x 6: ~64 units of 2^-24). With
    # |g| in [1, 2], v_hat is in [1, 4] and |m_hat| <= 2, where
    # a * atan2(m_hat, sqrt(v_hat)) changes by at most a = 1.27 per unit of
    # m_hat or v_hat: so |u - u_dense| <= 1.27 * 64 * 2^-24 * (2 + 4).
    atol = 1.27 * 64 * EPS32 / 2 * 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
                 u, ud)


def test_mlorc_atan2_first_step_with_rsvd_and_lorapre():
  params = {'w': jnp.zeros((12, 8))}
  g = {'w': jax.random.normal(jax.random.key(0), (12, 8))}
  spec = mlorc_optax.low_rank.MomentSpec
  # LoRA-Pre models each moment as an EMA: it needs their decays.
  decays = {'mu': spec(decay=0.9), 'nu': spec(nonnegative=True, decay=0.999)}
  for kw in ({}, dict(compressor=contrib.LoRAPreCompressor(), moments=decays)):
    tx = optax.chain(
        mlorc_optax.low_rank_moments(contrib.scale_by_adam_atan2(), rank=2,
                                     **kw),
        optax.scale_by_learning_rate(1.0))
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u['w'], -A * math.pi / 4 * jnp.sign(g['w']),
                               rtol=1e-5)
  # atan2= is no argument of the MLorc optimizers any more.
  with pytest.raises(TypeError, match='atan2'):
    mlorc_optax.mlorc_adamw(1e-3, atan2=True)
