"""Specification of the composable extras: OrthoGrad, Grams, Adam-atan2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax

A = 1.27  # Adam-atan2's output scale.


# --------------------------------------------------------------------------
# OrthoGrad.
# --------------------------------------------------------------------------


def test_orthograd_removes_the_part_along_the_weights_by_hand():
  w = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # <w, g> = 1, <w, w> = 2: g - w / 2.
  perp = np.array([[0.5, -0.5], [0.0, 1.0]])
  tx = mlorc_optax.orthograd(rescale=False)
  u, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  np.testing.assert_allclose(u['w'], perp, rtol=1e-6)
  assert abs(float(jnp.sum(u['w'] * w))) < 1e-6
  # rescale: the same direction with the norm of g (sqrt 2, not sqrt 1.5).
  tx = mlorc_optax.orthograd()
  u, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  np.testing.assert_allclose(u['w'], perp * math.sqrt(2 / 1.5), rtol=1e-6)


def test_orthograd_edge_cases():
  tx = mlorc_optax.orthograd()
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
    mlorc_optax.orthograd(rescale='yes')


def test_orthograd_chains_before_mlorc_adamw():
  params = {'w': jax.random.normal(jax.random.key(0), (12, 8))}
  grads = {'w': params['w'] + jax.random.normal(jax.random.key(1), (12, 8))}
  tx = optax.chain(mlorc_optax.orthograd(), mlorc_optax.mlorc_adamw(1.0,
                                                                    rank=2))
  plain = mlorc_optax.mlorc_adamw(1.0, rank=2, weight_decay=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  # The first Adam step of the projected gradient is its sign.
  ortho, _ = mlorc_optax.orthograd().update(grads, optax.EmptyState(), params)
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
  tx = mlorc_optax.grams(adam)
  g1, g2 = jnp.array([4.0, -1.0]), jnp.array([-1.0, 1.0])
  state = tx.init(g1)
  assert isinstance(state, mlorc_optax.GramsState)
  _, state = tx.update(g1, state)
  u, state = tx.update(g2, state)
  np.testing.assert_allclose(u, [-2 / 3 / math.sqrt(6), 1 / 3], rtol=1e-6)
  # The wrapped state is Adam's own.
  np.testing.assert_allclose(state.inner_state.mu, [0.5, 0.25])


def test_grams_zero_gradient_entries_none_leaves_and_extra_args():
  tx = mlorc_optax.grams(optax.scale_by_adam())
  grads = {'a': jnp.array([0.0, 2.0]), 'n': None}
  u, _ = tx.update(grads, tx.init(grads), extra_arg_for_someone_else=1)
  np.testing.assert_array_equal(u['a'][0], 0.0)  # sign(0) = 0
  assert u['n'] is None
  with pytest.raises(TypeError, match='inner'):
    mlorc_optax.grams(lambda g: g)


def test_grams_wraps_scale_by_mlorc_adam():
  params = {'w': jnp.zeros((12, 8))}
  k1, k2 = jax.random.split(jax.random.key(0))
  # Rank 1, so the rank-2 moments are exact and m keeps the sign of g.
  g = jnp.outer(jax.random.normal(k1, (12,)), jax.random.normal(k2, (8,)))
  inner = mlorc_optax.scale_by_mlorc_adam(rank=2)
  tx = mlorc_optax.grams(inner)
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
  tx = mlorc_optax.scale_by_adam_atan2(0.5, 0.5)
  g1, g2 = jnp.array([4.0, -1.0]), jnp.array([-1.0, 1.0])
  _, state = tx.update(g1, tx.init(g1))
  u, _ = tx.update(g2, state)
  np.testing.assert_allclose(
      u, [A * math.atan2(2 / 3, math.sqrt(6)), A * math.atan2(1 / 3, 1.0)],
      rtol=1e-6)
  with pytest.raises(ValueError, match='b1'):
    mlorc_optax.scale_by_adam_atan2(b1=1.0)


def test_adam_atan2_is_scale_invariant_where_adam_is_not():
  g = jax.random.normal(jax.random.key(0), (20,))
  tx = mlorc_optax.scale_by_adam_atan2()
  adam = optax.scale_by_adam()
  big, _ = tx.update(g, tx.init(g))
  small, _ = tx.update(1e-9 * g, tx.init(g))
  np.testing.assert_allclose(small, big, rtol=1e-5)
  adam_small, _ = adam.update(1e-9 * g, adam.init(g))
  assert np.max(np.abs(adam_small)) < 0.2  # eps = 1e-8 swamps 1e-9 grads


@pytest.mark.parametrize('nesterov', [False, True])
def test_mlorc_atan2_at_full_rank_equals_dense_adam_atan2(nesterov):
  params = {'w': jnp.zeros((10, 6)), 'b': jnp.zeros(6)}
  key = jax.random.key(3)
  tx = mlorc_optax.scale_by_mlorc_adam(
      rank=6, low_rank_mask={'w': True, 'b': False}, atan2=True, eps=1.0,
      nesterov=nesterov)
  dense = mlorc_optax.scale_by_adam_atan2(nesterov=nesterov)
  s, sd = tx.init(params), dense.init(params)
  step, dense_step = jax.jit(tx.update), jax.jit(dense.update)
  for _ in range(4):
    key, k1, k2 = jax.random.split(key, 3)
    grads = {'w': jax.random.normal(k1, (10, 6)),
             'b': jax.random.normal(k2, (6,))}
    u, s = step(grads, s)
    ud, sd = dense_step(grads, sd)
    # eps = 1.0 would shrink a plain Adam step a lot: it is not used.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 u, ud)


def test_mlorc_adamw_atan2_first_step_and_validation():
  params = {'w': jnp.zeros((12, 8))}
  g = {'w': jax.random.normal(jax.random.key(0), (12, 8))}
  for compressor in ('rsvd', 'lorapre'):
    tx = mlorc_optax.mlorc_adamw(1.0, weight_decay=0.0, rank=2, atan2=True,
                                 compressor=compressor)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u['w'], -A * math.pi / 4 * jnp.sign(g['w']),
                               rtol=1e-5)
  with pytest.raises(TypeError, match='atan2'):
    mlorc_optax.mlorc_adamw(1e-3, atan2='on')
