"""MLorc inside the usual optax / JAX machinery."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax

from helpers import loss_fn, make_params

STATIC = ('rank', 'oversample', 'power_iters', 'low_rank_mask',
          'dimension_numbers', 'compress', 'factor_dtype', 'seed')


def run(tx, params, steps=5, jit=True):
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_jit_equals_eager(params):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  a, _ = run(tx, params, jit=True)
  b, _ = run(tx, params, jit=False)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


def test_inject_hyperparams_equals_plain(params):
  plain = mlorc_optax.mlorc_adamw(1e-2, b1=0.8, rank=2)
  injected = optax.inject_hyperparams(mlorc_optax.mlorc_adamw,
                                      static_args=STATIC)(
                                          learning_rate=1e-2, b1=0.8, rank=2)
  a, _ = run(plain, params)
  b, state = run(injected, params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  # The learning rate can now be changed between steps without recompiling.
  state.hyperparams['learning_rate'] = jnp.asarray(0.0)
  grads = jax.grad(loss_fn)(b)
  updates, _ = injected.update(grads, state, b)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)


def test_inject_hyperparams_with_a_traced_seed(params):
  static = ('rank', 'oversample', 'power_iters', 'low_rank_mask',
            'dimension_numbers', 'factor_dtype')  # seed may be traced
  tx = optax.inject_hyperparams(mlorc_optax.mlorc_lion, static_args=static)(
      learning_rate=1e-3, rank=2, seed=3)
  plain = mlorc_optax.mlorc_lion(1e-3, rank=2, seed=3)
  a, _ = run(tx, params)
  b, _ = run(plain, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_inject_hyperparams_without_static_rank_says_what_to_do():
  tx = optax.inject_hyperparams(mlorc_optax.mlorc_adamw)(1e-2, rank=2)
  with pytest.raises(TypeError, match="list 'rank' in static_args"):
    tx.init(make_params())


def test_multi_steps_accumulates_then_applies(params):
  tx = optax.MultiSteps(mlorc_optax.mlorc_adamw(1e-2, rank=2),
                        every_k_schedule=2)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  updates, state = jax.jit(tx.update)(grads, state, params)
  # Mean of two identical gradients = one MLorc step = Adam's first step.
  single, _ = mlorc_optax.mlorc_adamw(1e-2, rank=2).update(
      grads, mlorc_optax.mlorc_adamw(1e-2, rank=2).init(params), params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5),
               updates, single)


def test_apply_if_finite_skips_a_nan_step_and_keeps_state(params):
  tx = optax.apply_if_finite(mlorc_optax.mlorc_adamw(1e-2, rank=2),
                             max_consecutive_errors=3)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  _, state = tx.update(grads, state, params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, new_state = jax.jit(tx.update)(bad, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  jax.tree.map(np.testing.assert_array_equal, new_state.inner_state,
               state.inner_state)
  assert int(new_state.notfinite_count) == 1


def test_state_shapes_and_dtypes_are_stable_under_lax_cond(params):
  tx = mlorc_optax.mlorc_lion(1e-3, rank=2)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)

  @jax.jit
  def maybe_step(flag, state):
    return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1],
                        lambda s: s, state)

  new = maybe_step(True, state)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_chains_with_other_transforms(params):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   mlorc_optax.scale_by_mlorc_adam(rank=2),
                   optax.add_decayed_weights(1e-2),
                   optax.scale_by_learning_rate(1e-2))
  trained, _ = run(tx, params, steps=20)
  assert loss_fn(trained) < loss_fn(params)


def test_state_is_plain_arrays_and_round_trips_through_numpy(params):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  _, state = run(tx, params, steps=2)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  a, _ = tx.update(jax.grad(loss_fn)(params), state, params)
  b, _ = tx.update(jax.grad(loss_fn)(params), restored, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_state_from_other_params_is_a_clear_error(params):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  other = {'x': jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match='structure of the updates'):
    tx.update(jax.grad(loss_fn)(params), tx.init(other), params)
  smaller = jax.tree.map(lambda x: x[..., :-1, :] if x.ndim >= 2 else x,
                         params)
  with pytest.raises(ValueError, match="'dense/kernel'.*shapes"):
    tx.update(jax.grad(loss_fn)(params), tx.init(smaller), params)


def test_states_survive_donation_of_another_state(params):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  first, second = tx.init(params), tx.init(params)
  grads = jax.grad(loss_fn)(params)
  step = jax.jit(lambda s: tx.update(grads, s, params)[1], donate_argnums=0)
  step(first)
  step(second)  # its key is its own buffer, not the donated one
  step(tx.init(params))


def test_state_shardings_needs_a_mesh_when_nothing_is_sharded(params):
  state = mlorc_optax.mlorc_adamw(1e-2, rank=2).init(params)
  with pytest.raises(ValueError, match='mesh='):
    mlorc_optax.state_shardings(state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  out = mlorc_optax.state_shardings(state, mesh)
  for s in jax.tree.leaves(out):
    assert s.spec == jax.sharding.PartitionSpec()
