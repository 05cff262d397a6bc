"""mlorc_adamw / mlorc_lion are drop-in replacements for optax.adamw / lion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax

from helpers import all_matrices, factors, loss_fn, make_params

FULL_RANK = 64  # >= min(m, n) of every matrix in make_params()


def train(tx, params, steps=20):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def assert_trees_close(a, b, atol, typical=None):
  """All entries within ``atol``; with ``typical``, 98% within ``typical``."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    where = jax.tree_util.keystr(path)
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=where)
    if typical is not None:
      assert np.mean(np.abs(x - y) <= typical) >= 0.98, where


def compressed_paths(tx, params):
  plan = mlorc_optax.compression_plan(tx, params)
  return {p.path for p in jax.tree.leaves(plan) if p.compressed}


@pytest.mark.parametrize('nesterov', [False, True])
def test_full_rank_mlorc_adamw_equals_optax_adamw(params, nesterov):
  # Every matrix, the stacked leaf included, really goes through the
  # low-rank path; bias and scalar take the masked base optimizer.
  kw = dict(learning_rate=1e-2, weight_decay=0.1, nesterov=nesterov)
  tx = mlorc_optax.mlorc_adamw(**kw, rank=FULL_RANK, low_rank_mask=all_matrices)
  assert compressed_paths(tx, params) == {'dense/kernel', 'wide', 'stack'}
  ours, _ = train(tx, params)
  theirs, _ = train(optax.adamw(**kw), params)
  # The factored second moment is exact only to float32 rounding relative to
  # its largest entry, and Adam divides by sqrt(v): an entry whose gradient
  # stays near 0 (v below ~1e-6 max v) gets a direction off by up to ~25%,
  # so it can drift ~2e-4 over 20 steps of size 1e-2 (0.1% of the path).
  # All other entries agree to 1e-5.
  assert_trees_close(ours, theirs, atol=5e-4, typical=1e-5)


def test_full_rank_mlorc_lion_equals_optax_lion(params):
  kw = dict(learning_rate=1e-3, weight_decay=0.1)
  tx = mlorc_optax.mlorc_lion(**kw, rank=FULL_RANK, low_rank_mask=all_matrices)
  assert compressed_paths(tx, params) == {'dense/kernel', 'wide', 'stack'}
  ours, _ = train(tx, params)
  theirs, _ = train(optax.lion(**kw), params)
  assert_trees_close(ours, theirs, atol=1e-6)


def test_defaults_match_optax():
  import inspect
  for ours, theirs in [(mlorc_optax.mlorc_adamw, optax.adamw),
                       (mlorc_optax.mlorc_lion, optax.lion)]:
    a = inspect.signature(ours).parameters
    b = inspect.signature(theirs).parameters
    positional = [n for n, p in b.items()
                  if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert list(a)[:len(positional)] == positional
    for name in b:
      assert a[name].default == b[name].default, name


def test_low_rank_training_decreases_the_loss(params):
  # Rank 2 on matrices whose gradients are not low-rank: slower than AdamW
  # (364 -> ~8 in 100 steps here) but steady.
  trained, _ = train(mlorc_optax.mlorc_adamw(3e-2, rank=2), params, 100)
  assert loss_fn(trained) < 0.3 * loss_fn(params)
  trained, _ = train(mlorc_optax.mlorc_lion(1e-2, rank=2), params, 100)
  assert loss_fn(trained) < 0.3 * loss_fn(params)


def test_learning_rate_schedule_and_weight_decay_mask(params):
  schedule = optax.linear_schedule(1e-2, 0.0, 20)
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
  kw = dict(learning_rate=schedule, weight_decay=0.3, mask=decay_mask)
  ours, _ = train(mlorc_optax.mlorc_adamw(
      **kw, rank=FULL_RANK, low_rank_mask=all_matrices), params)
  theirs, _ = train(optax.adamw(**kw), params)
  # The factored second moment is exact only to float32 rounding relative to
  # its largest entry, and Adam divides by sqrt(v): an entry whose gradient
  # stays near 0 (v below ~1e-6 max v) gets a direction off by up to ~25%,
  # so it can drift ~2e-4 over 20 steps of size 1e-2 (0.1% of the path).
  # All other entries agree to 1e-5.
  assert_trees_close(ours, theirs, atol=5e-4, typical=1e-5)


def test_weight_decay_is_decoupled_and_applies_to_compressed_leaves():
  params = {'w': jnp.ones((16, 8))}
  zeros = {'w': jnp.zeros((16, 8))}
  tx = mlorc_optax.mlorc_adamw(0.1, weight_decay=0.5, rank=2)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradient: the Adam direction is 0, the update is -lr * wd * w.
  np.testing.assert_allclose(updates['w'], -0.05 * np.ones((16, 8)))


def test_bfloat16_params_keep_their_dtype():
  params = make_params(jnp.bfloat16)
  trained, state = train(mlorc_optax.mlorc_adamw(1e-2, rank=2), params, 5)
  for x in jax.tree.leaves(trained):
    assert x.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  # Factors stay float32 by default.
  assert factors(state, 'wide').u.dtype == jnp.float32
  assert factors(state, 'wide', moment='nu').u.dtype == jnp.float32
  assert loss_fn(trained) < loss_fn(params)
