"""MLorc inside the usual optax / JAX machinery.

(flax.nnx.Optimizer: tests/test_plan.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax

from helpers import EPS32, all_matrices, loss_fn, make_params

FACTORIES = [mlorc_optax.mlorc_adamw, mlorc_optax.mlorc_lion]


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
  a, _ = run(tx, params, steps=3, jit=True)
  b, _ = run(tx, params, steps=3, jit=False)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


# ----------------------------------------------------------------------------
# optax.inject_hyperparams


def test_inject_hyperparams_equals_plain(params):
  plain = mlorc_optax.mlorc_adamw(1e-2, b1=0.8, rank=2)
  injected = optax.inject_hyperparams(
      mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
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


def kernel_dims(params):
  """dimension_numbers as a callable: the default view for every leaf."""
  return jax.tree.map(lambda _: mlorc_optax.MatrixDimensionNumbers(), params)


def decay_matrices(params):
  """A callable weight-decay ``mask`` (as ``optax.adamw`` accepts)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


@pytest.mark.parametrize('factory', FACTORIES)
@pytest.mark.parametrize('kwargs', [
    # Callables that are not schedules (masks, dimension numbers), arguments
    # that set shapes, and dtypes: callable classes, which
    # inject_hyperparams would call as schedules unless they are static.
    dict(low_rank_mask=all_matrices, dimension_numbers=kernel_dims,
         mask=decay_matrices, oversample=1, power_iters=1,
         factor_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16),
    # A (row_axes, col_axes) pair and a pytree mask of Python bools.
    dict(dimension_numbers=((0, 1), (2,)),
         low_rank_mask={'dense': False, 'wide': False, 'scale': False,
                        'stack': True}),
], ids=['callables-and-dtypes', 'dimension-pair'])
def test_static_args_constant_is_all_a_user_lists(params, factory, kwargs):
  # b1, b2 exact in binary: 1 - b1 is the same whether Python computes it
  # in float64 (plain) or XLA in float32 (injected), so that both runs
  # compute the same float32 values (a bfloat16 moment would otherwise
  # round them to different neighbours).
  kwargs = dict(rank=2, seed=3, b1=0.5, b2=0.75, **kwargs)
  injected = optax.inject_hyperparams(
      factory, static_args=mlorc_optax.STATIC_ARGS)(learning_rate=1e-2,
                                                    **kwargs)
  plain = factory(1e-2, **kwargs)
  a, _ = run(plain, params, steps=3)
  b, state = run(injected, params, steps=3)
  assert set(state.hyperparams) >= {'learning_rate', 'b1', 'b2', 'seed'}
  # The same operations on the same values, whether hyperparameters are
  # Python floats or arrays: equal to a few float32 ulps (XLA may order
  # them differently) over 3 steps.
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=64 * EPS32),
      a, b)


def test_inject_hyperparams_with_a_traced_seed(params):
  # STATIC_ARGS leaves the seed out: it may be injected (traced).
  tx = optax.inject_hyperparams(
      mlorc_optax.mlorc_lion, static_args=mlorc_optax.STATIC_ARGS)(
          learning_rate=1e-3, rank=2, seed=3)
  assert 'seed' in tx.init(params).hyperparams
  plain = mlorc_optax.mlorc_lion(1e-3, rank=2, seed=3)
  a, _ = run(tx, params)
  b, _ = run(plain, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_inject_hyperparams_without_static_args_says_what_to_do():
  tx = optax.inject_hyperparams(mlorc_optax.mlorc_adamw)(1e-2, rank=2)
  with pytest.raises(TypeError,
                     match=r'static_args=mlorc_optax\.STATIC_ARGS'):
    tx.init(make_params())


# ----------------------------------------------------------------------------
# Other optax wrappers and the state.


@pytest.mark.parametrize('factory', FACTORIES)
def test_tree_get_finds_the_one_count(params, factory):
  # One counter: the inner optimizer's (LowRankMomentsState counts in
  # 'step', the key of its sketches).
  state = factory(1e-3, rank=2).init(params)
  count = optax.tree_utils.tree_get(state, 'count')
  assert count.dtype == jnp.int32 and int(count) == 0


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


@pytest.mark.parametrize('factory', FACTORIES)
def test_state_shapes_and_dtypes_are_stable_under_lax_cond(params, factory):
  tx = factory(1e-3, rank=2)
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
  with pytest.raises(ValueError, match='different parameter tree'):
    tx.update(jax.grad(loss_fn)(params), tx.init(other), params)
  smaller = jax.tree.map(lambda x: x[..., :-1, :] if x.ndim >= 2 else x,
                         params)
  with pytest.raises(ValueError, match="'dense/kernel' has shape"):
    tx.update(jax.grad(loss_fn)(params), tx.init(smaller), params)


def test_states_survive_donation_of_another_state(params):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  first, second = tx.init(params), tx.init(params)
  grads = jax.grad(loss_fn)(params)
  step = jax.jit(lambda s: tx.update(grads, s, params)[1], donate_argnums=0)
  step(first)
  step(second)  # its key is its own buffer, not the donated one
  step(tx.init(params))


@pytest.mark.parametrize('factory,theirs', [
    (mlorc_optax.mlorc_adamw, optax.adamw),
    (mlorc_optax.mlorc_lion, optax.lion),
])
def test_zero_size_leaves_pass_through_like_optax(factory, theirs):
  # Under the default rule an empty leaf is never an error: a (0, n) matrix
  # is not compressed (min(rows, cols) = 0 <= rank) and a stack of 0
  # matrices has no matrix to compress; the updates are optax's.
  key = jax.random.key(0)
  params = {'empty': jnp.zeros((0, 16)), 'no_layers': jnp.zeros((0, 12, 9)),
            'w': jax.random.normal(key, (12, 8))}
  grads = jax.tree.map(lambda x: jnp.cos(x) + 2.0, params)
  ours_tx, theirs_tx = factory(1e-2, rank=2), theirs(1e-2)
  ours, _ = jax.jit(ours_tx.update)(grads, ours_tx.init(params), params)
  ref, _ = theirs_tx.update(grads, theirs_tx.init(params), params)
  for name in ('empty', 'no_layers'):
    assert ours[name].shape == params[name].shape
    assert ours[name].dtype == params[name].dtype
  # First step: Adam's (and Lion's) own update on the compressed leaf too.
  np.testing.assert_allclose(ours['w'], ref['w'], rtol=4 * EPS32, atol=0)


def test_state_shardings_needs_a_mesh_when_nothing_is_sharded(params):
  state = mlorc_optax.mlorc_adamw(1e-2, rank=2).init(params)
  with pytest.raises(ValueError, match='mesh='):
    mlorc_optax.state_shardings(state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
  out = mlorc_optax.state_shardings(state, mesh)
  for s in jax.tree.leaves(out):
    assert s.spec == jax.sharding.PartitionSpec()
