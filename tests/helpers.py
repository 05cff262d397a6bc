"""Test helpers: a parameter tree with every kind of leaf MLorc meets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import mlorc_optax


def make_params(dtype=jnp.float32, seed: int = 0):
  """Matrices (tall, wide), a stacked 3-D leaf, a bias and a scalar."""
  k = jax.random.split(jax.random.key(seed), 5)
  return {
      'dense': {
          'kernel': jax.random.normal(k[0], (24, 10), dtype),
          'bias': jax.random.normal(k[1], (10,), dtype),
      },
      'wide': jax.random.normal(k[2], (6, 20), dtype),
      'stack': jax.random.normal(k[3], (3, 12, 9), dtype),
      'scale': jnp.asarray(1.5, dtype),
  }


def loss_fn(params):
  """A smooth non-quadratic loss touching every leaf."""
  total = 0.0
  for leaf in jax.tree.leaves(params):
    x = leaf.astype(jnp.float32)
    total = total + jnp.sum(jnp.sin(x) ** 2) + 0.1 * jnp.sum(x**4) / x.size
  k = params['dense']['kernel'].astype(jnp.float32)
  return total + jnp.sum((k @ k.T) ** 2) / k.size


def all_matrices(params):
  """low_rank_mask compressing every leaf with >= 2 axes, whatever its size."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def factors(moment, *path):
  """The (u, s, v) of one leaf from a low-rank moment of the state."""
  def get(tree):
    for key in path:
      tree = tree[key]
    return tree
  return mlorc_optax.LowRankFactors(get(moment.u), get(moment.s), get(moment.v))


def run_steps(tx, grads, params=None):
  """Jitted ``tx.update`` over a list of gradient trees from zero params.

  Returns the list of updates and the final state; ``params`` (default:
  zeros like the gradients) are passed to every update (needed by
  ``mlorc_adamw``'s weight decay).
  """
  if params is None:
    params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
  return outs, state
