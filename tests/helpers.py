"""Test helpers: a parameter tree with every kind of leaf MLorc meets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlorc_optax
from mlorc_optax import kernels
from mlorc_optax._src.kernels import launch

#: float32 machine epsilon (2^-23): the unit of every tolerance below.
EPS32 = float(np.finfo(np.float32).eps)

#: The default kernel config with float32-level dots on a GPU: every
#: precision field ``'tf32x3'`` (no effect in interpret mode, whose dots are
#: float32). Tests that compare the kernels with references at float32
#: tolerances take it; the GPU defaults' own bounds are tested on their own.
FULL = kernels.KernelConfig(**dict.fromkeys(launch.PRECISION_FIELDS, 'tf32x3'))


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


def _is_low_rank_state(x) -> bool:
  return isinstance(x, mlorc_optax.LowRankMomentsState)


def low_rank_state(state) -> mlorc_optax.LowRankMomentsState:
  """The one ``LowRankMomentsState`` inside ``state`` (chains, wrappers)."""
  found = [x for x in jax.tree.leaves(state, is_leaf=_is_low_rank_state)
           if _is_low_rank_state(x)]
  assert len(found) == 1, f'{len(found)} LowRankMomentsState in the state'
  return found[0]


def factors(state, *path, moment: str = 'mu'):
  """What the state stores for one leaf of one moment field.

  ``state`` is any optimizer state holding one ``low_rank_moments`` (for
  example ``mlorc_adamw``'s chain state); ``moment`` names the inner state's
  field (``'mu'``, ``'nu'``, ``'m1'``, ...), found with
  ``optax.tree_utils.tree_get`` in ``inner_state``; ``path`` indexes the
  params tree. For a compressed leaf this is its factors
  (``LowRankFactors(u, s, v)`` for the randomized SVD), for any other leaf
  the inner optimizer's dense moment.
  """
  tree = optax.tree_utils.tree_get(low_rank_state(state).inner_state, moment)
  for key in path:
    tree = tree[key]
  return tree


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
