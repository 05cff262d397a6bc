"""Dense NumPy (float64) implementations of MLorc Algorithms 1, 2 and 3.

Written straight from the paper (https://arxiv.org/abs/2506.01897) to check
the library against: every moment is materialised densely, factors are plain
NumPy arrays, and nothing is shared with ``mlorc_optax`` except the sketch
matrices, which the tests draw from the documented key derivation so both
sides use the same Omega.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sketch(key, count: int, leaf_index: int, moment: int, batch, n, l):
  """Omega as documented in mlorc_optax._src.low_rank (identity when l == n)."""
  if l == n:
    return np.broadcast_to(np.eye(n), (*batch, n, n))
  k = jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(key, count), leaf_index), moment
  )
  return np.asarray(jax.random.normal(k, (*batch, n, l), jnp.float32), np.float64)


def rsvd(a, omega, rank, power_iters=0):
  """Algorithm 3 (+ power iterations): top-``rank`` factors of ``Q Q^T a``."""
  q = np.linalg.qr(a @ omega)[0]
  for _ in range(power_iters):
    q = np.linalg.qr(a @ np.linalg.qr(np.swapaxes(a, -1, -2) @ q)[0])[0]
  ub, s, vt = np.linalg.svd(np.swapaxes(q, -1, -2) @ a, full_matrices=False)
  return q @ ub[..., :rank], s[..., :rank], np.swapaxes(vt[..., :rank, :], -1, -2)


def reconstruct(u, s, v):
  return (u * s[..., None, :]) @ np.swapaxes(v, -1, -2)


def zeta_fix(v):
  """Equation (2), per matrix: negatives -> mean |negative entries|."""
  v = v.copy()
  for idx in np.ndindex(v.shape[:-2]):
    mat = v[idx]
    neg = mat < 0
    if neg.any():
      mat[neg] = np.abs(mat[neg]).mean()
  return v


class MLorcAdamW:
  """Algorithm 1 on a dict of matrices ``[..., m, n]`` (lr = 1, no decay)."""

  def __init__(self, shapes, key, rank, b1, b2, eps, oversample=0,
               power_iters=0):
    self.key, self.rank, self.b1, self.b2, self.eps = key, rank, b1, b2, eps
    self.oversample, self.power_iters = oversample, power_iters
    self.t = 0
    self.factors = {}
    for name, shape in shapes.items():
      *batch, m, n = shape
      k = min(rank, m, n)
      zero = (np.zeros((*batch, m, k)), np.zeros((*batch, k)),
              np.zeros((*batch, n, k)))
      self.factors[name] = {'mu': zero, 'nu': zero}

  def step(self, grads):
    """Returns the update direction per leaf; leaves in sorted-name order."""
    b1, b2 = self.b1, self.b2
    out = {}
    for i, name in enumerate(sorted(grads)):
      g = np.asarray(grads[name], np.float64)
      *batch, m, n = g.shape
      k, l = min(self.rank, m, n), min(self.rank + self.oversample, m, n)
      m_prev = reconstruct(*self.factors[name]['mu'])
      v_prev = zeta_fix(reconstruct(*self.factors[name]['nu']))
      mom = b1 * m_prev + (1 - b1) * g
      var = b2 * v_prev + (1 - b2) * g**2
      t = self.t + 1
      m_hat, v_hat = mom / (1 - b1**t), var / (1 - b2**t)
      out[name] = m_hat / (np.sqrt(v_hat) + self.eps)
      for j, (moment, x) in enumerate((('mu', mom), ('nu', var))):
        omega = sketch(self.key, self.t, i, j, batch, n, l)
        self.factors[name][moment] = rsvd(x, omega, k, self.power_iters)
    self.t += 1
    return out


class MLorcLion:
  """Algorithm 2 on a dict of matrices (lr = 1, no decay)."""

  def __init__(self, shapes, key, rank, b1, b2):
    self.key, self.rank, self.b1, self.b2 = key, rank, b1, b2
    self.t = 0
    self.factors = {}
    for name, shape in shapes.items():
      *batch, m, n = shape
      k = min(rank, m, n)
      self.factors[name] = (np.zeros((*batch, m, k)), np.zeros((*batch, k)),
                            np.zeros((*batch, n, k)))

  def step(self, grads):
    out = {}
    for i, name in enumerate(sorted(grads)):
      g = np.asarray(grads[name], np.float64)
      *batch, m, n = g.shape
      k = min(self.rank, m, n)
      m_prev = reconstruct(*self.factors[name])
      c = self.b1 * m_prev + (1 - self.b1) * g
      mom = self.b2 * m_prev + (1 - self.b2) * g
      out[name] = np.sign(c)
      omega = sketch(self.key, self.t, i, 0, batch, n, k)
      self.factors[name] = rsvd(mom, omega, k)
    self.t += 1
    return out
