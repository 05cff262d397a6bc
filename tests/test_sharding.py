"""Sharded jit, pmap and shard_map on 8 simulated CPU devices.

The root conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8
before JAX starts; these tests fail (not skip) without 8 devices, so CI can't
pass them silently.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mlorc_optax
from examples.llama.parallel import collectives  # the HLO reader

from helpers import factors

L, D, F = 2, 32, 64


def transformer_params(key):
  """A small transformer-shaped tree: stacked layers, biases, norms, head."""
  k = jax.random.split(key, 6)
  return {
      'layers': {
          'qkv': {'kernel': jax.random.normal(k[0], (L, D, 3 * D)) / D**0.5,
                  'bias': jnp.zeros((L, 3 * D))},
          'out': {'kernel': jax.random.normal(k[1], (L, D, D)) / D**0.5},
          'mlp_in': {'kernel': jax.random.normal(k[2], (L, D, F)) / D**0.5},
          'mlp_out': {'kernel': jax.random.normal(k[3], (L, F, D)) / F**0.5},
          'norm': {'scale': jnp.ones((L, D))},
      },
      'head': {'kernel': jax.random.normal(k[4], (D, 16)) / D**0.5},
  }


# FSDP on one matrix axis ('data'), tensor parallel on the other ('model').
SPECS = {
    'layers': {
        'qkv': {'kernel': P(None, 'data', 'model'), 'bias': P(None, 'model')},
        'out': {'kernel': P(None, 'model', 'data')},
        'mlp_in': {'kernel': P(None, 'data', 'model')},
        'mlp_out': {'kernel': P(None, 'model', 'data')},
        'norm': {'scale': P()},
    },
    'head': {'kernel': P('data', None)},
}

PARAMS = transformer_params(jax.random.key(0))
TARGETS = jax.tree.map(lambda p: p + 0.5, transformer_params(jax.random.key(1)))
X = jax.random.normal(jax.random.key(2), (64, 64))
# Linear terms with entries of magnitude 1..2 keep every gradient entry away
# from 0. MLorc's factored second moment is exact only to float32 rounding of
# its largest entry, so entries of v far below that (gradients ~0) carry
# rounding noise that Adam's division amplifies: any two float32 summation
# orders (sharded or not) then drift apart within a few steps. See
# docs/sharding (and tests/test_alias.py) for the same effect at full rank.
SLOPES = jax.tree.map(
    lambda p, k: jnp.sign(jax.random.normal(k, p.shape))
    * jax.random.uniform(k, p.shape, minval=1.0, maxval=2.0),
    PARAMS,
    jax.tree.unflatten(jax.tree.structure(PARAMS),
                       list(jax.random.split(jax.random.key(3), 7))))


def loss_fn(params, x):
  """Linear + quadratic per leaf, plus a regression through the batch."""
  total = 0.0
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(TARGETS),
                     jax.tree.leaves(SLOPES)):
    if a.ndim == 3:
      z = jnp.einsum('bi,lij->lbj', x[:, :a.shape[1]], a - b)
    elif a.shape[0] > L:
      z = x[:, :a.shape[0]] @ (a - b)
    else:
      z = a - b
    total = total + jnp.sum(a * c) + 0.05 * jnp.sum(a**2) + jnp.mean(z**2)
  return total


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() >= 8, (
      'needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the '
      'root conftest.py before JAX starts)'
  )
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))


def shardings(mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS,
                      is_leaf=lambda x: isinstance(x, P))


def make_step(tx):
  def step(params, state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run_both(tx, mesh, steps):
  """(single-device params, sharded params, sharded state) after ``steps``."""
  step = make_step(tx)
  single, single_state = PARAMS, tx.init(PARAMS)
  shard = shardings(mesh)
  sharded = jax.device_put(PARAMS, shard)
  state = tx.init(sharded)
  state_shard = mlorc_optax.state_shardings(state)
  sharded_step = jax.jit(step, in_shardings=(shard, state_shard,
                                              NamedSharding(mesh, P('data'))),
                         out_shardings=(shard, state_shard))
  for _ in range(steps):
    single, single_state = jax.jit(step)(single, single_state, X)
    sharded, state = sharded_step(sharded, state, X)
  return single, single_state, sharded, state


def test_factor_shardings_follow_the_params(mesh):
  state = mlorc_optax.mlorc_adamw(1e-3, rank=4).init(
      jax.device_put(PARAMS, shardings(mesh)))
  # (L, D, 3D) kernel sharded (None, data, model): rows on data, cols on model.
  for moment in ('mu', 'nu'):
    qkv = factors(state, 'layers', 'qkv', 'kernel', moment=moment)
    assert qkv.u.sharding.spec == P(None, 'data', None)
    assert qkv.s.sharding.spec == P(None, None)
    assert qkv.v.sharding.spec == P(None, 'model', None)
    out = factors(state, 'layers', 'out', 'kernel', moment=moment)
    assert out.u.sharding.spec == P(None, 'model', None)
    # Moments that are not compressed (Adam's own) are sharded like their
    # params.
    bias = factors(state, 'layers', 'qkv', 'bias', moment=moment)
    assert bias.sharding.spec == P(None, 'model')
  shard = mlorc_optax.state_shardings(state)
  assert shard[0].inner_state.count.spec == P()
  assert shard[0].step.spec == shard[0].sketch_key.spec == P()
  assert (shard[0].inner_state.mu['layers']['qkv']['kernel'].u.spec
          == P(None, 'data', None))


def test_factor_partition_specs_flatten_multi_axis_rows():
  tx = mlorc_optax.mlorc_adamw(
      1e-3, rank=2,
      dimension_numbers=mlorc_optax.MatrixDimensionNumbers((1, 2), (3,)))
  plan = mlorc_optax.compression_plan(tx, {'w': jnp.zeros((8, 4, 6, 16))})
  u, s, v, dense = mlorc_optax.factor_partition_specs(
      plan['w'], P('pipe', 'data', 'fsdp', 'model'))
  assert u == P('pipe', ('data', 'fsdp'), None)
  assert s == P('pipe', None)
  assert v == P('pipe', 'model', None)
  assert dense == P('pipe', ('data', 'fsdp'), 'model')


def test_sharded_full_rank_run_equals_single_device(mesh):
  tx = mlorc_optax.mlorc_adamw(
      1e-2, rank=128, low_rank_mask=mlorc_optax.path_mask(include='kernel'))
  single, _, sharded, _ = run_both(tx, mesh, 20)
  assert loss_fn(single, X) < 0.9 * loss_fn(PARAMS, X)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('make_tx', [
    lambda: mlorc_optax.mlorc_adamw(1e-2, rank=4),
    lambda: mlorc_optax.mlorc_lion(1e-3, rank=4),
])
def test_sharded_low_rank_run_equals_single_device(mesh, make_tx):
  single, _, sharded, _ = run_both(make_tx(), mesh, 20)
  assert loss_fn(single, X) < 0.9 * loss_fn(PARAMS, X)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_meshes_with_explicit_axes_give_the_single_device_update():
  """``jax.make_mesh``'s default axes are ``Explicit`` in recent jax: the
  sharding is part of each array's type, and the decompositions (the
  reference step's RSVD, shared by every optimizer) and the complement's
  ``U^T g`` must see unsharded matrix axes (``step_math.unsharded_matrix``).
  """
  explicit = jax.sharding.AxisType.Explicit
  mesh = jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(explicit, explicit),
                       devices=jax.devices()[:8])
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=4, complement=1.0)
  sharded = jax.device_put(PARAMS, shardings(mesh))
  state, single_state = tx.init(sharded), tx.init(PARAMS)
  update = jax.jit(tx.update)
  for t in range(4):
    grads = jax.tree.map(
        lambda p, k: jax.random.normal(jax.random.fold_in(k, t), p.shape),
        PARAMS, jax.tree.unflatten(jax.tree.structure(PARAMS), list(
            jax.random.split(jax.random.key(5), len(jax.tree.leaves(PARAMS))))))
    ours, state = update(jax.device_put(grads, shardings(mesh)), state,
                         sharded)
    theirs, single_state = update(grads, single_state, PARAMS)
  for a, b, spec in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs),
                        jax.tree.leaves(SPECS, is_leaf=lambda x: isinstance(
                            x, P))):
    # Updates come back sharded like their params.
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sharded_update_never_gathers_a_dense_moment(mesh):
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=4)
  shard = shardings(mesh)
  params = jax.device_put(PARAMS, shard)
  state = tx.init(params)
  state_shard = mlorc_optax.state_shardings(state)
  update = jax.jit(tx.update, in_shardings=(shard, state_shard, shard),
                   out_shardings=(shard, state_shard))
  hlo = update.lower(params, state, params).compile().as_text()
  found = collectives(hlo)
  assert found, 'expected the sketches to be reduced across shards'
  # Only [rows, l] / [l, cols] sketch-sized data ever crosses devices (with
  # l = rank + oversample): a dense moment's slice has no axis that short.
  width = 4 + state[0].plan.compressor.oversample
  assert all(len(shape) < 2 or min(shape[-2:]) <= width
             for _, shape in found), found


def test_pmap_replicas_stay_bit_identical_for_50_steps():
  n = 8
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=4)
  params = jax.tree.map(lambda x: jnp.stack([x] * n), PARAMS)
  state = jax.pmap(tx.init)(params)
  xs = X.reshape(n, 8, 64)

  def step(params, state, x):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x), 'batch')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  pstep = jax.pmap(step, axis_name='batch')
  for _ in range(50):
    params, state = pstep(params, state, xs)
  for leaf in jax.tree.leaves((params, state)):
    leaf = np.asarray(leaf)
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])
  assert loss_fn(jax.tree.map(lambda x: x[0], params), X) < loss_fn(PARAMS, X)


def test_shard_map_data_parallel_equals_jit(mesh):
  """Inside shard_map with replicated params (data parallel) MLorc is exact.

  With params *sharded* inside shard_map each device would compress its own
  block, a different (block-wise) approximation: use jit + NamedSharding for
  sharded params instead.
  """
  tx = mlorc_optax.mlorc_adamw(1e-2, rank=4)
  flat_mesh = Mesh(np.array(jax.devices()[:8]), ('batch',))
  step = make_step(tx)

  def dp_step(params, state, x):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x), 'batch')
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  sm_step = jax.jit(jax.shard_map(dp_step, mesh=flat_mesh,
                                  in_specs=(P(), P(), P('batch')),
                                  out_specs=(P(), P()), check_vma=False))
  a, sa = PARAMS, tx.init(PARAMS)
  b, sb = PARAMS, tx.init(PARAMS)
  for _ in range(3):
    a, sa = jax.jit(step)(a, sa, X)
    b, sb = sm_step(b, sb, X)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5)
