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


def adam_bound(b1, b2, t):
  """The largest ``|m_hat| / sqrt(v_hat)`` of dense Adam at step ``t``.

  Cauchy-Schwarz on the two EMAs' weights, summed term by term.
  """
  c2 = sum((1 - b1)**2 * b1**(2 * j) / ((1 - b2) * b2**j) for j in range(t))
  return np.sqrt(c2) * np.sqrt(1 - b2**t) / (1 - b1**t)


def complement(g, u):
  """``(I - U U^T) g`` per matrix."""
  return g - u @ (np.swapaxes(u, -1, -2) @ g)


def span_norm_ratio(d, g, u):
  """``||U^T d|| / ||U^T g||`` per matrix (0 where ``U^T g = 0``)."""
  ut = np.swapaxes(u, -1, -2)
  num = np.sqrt(np.sum((ut @ d)**2, axis=(-2, -1), keepdims=True))
  den = np.sqrt(np.sum((ut @ g)**2, axis=(-2, -1), keepdims=True))
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


class MLorcAdamW:
  """Algorithm 1 on a dict of matrices ``[..., m, n]`` (lr = 1, no decay).

  With ``bounded``, every entry of the update is clipped to
  :func:`adam_bound`; with ``lam > 0``, ``c = lam (1 - b1^(t-1)) (I - U U^T)
  g`` is added to the previous first moment for the update only (the
  library's ``update_bound='adam'`` and ``complement=lam``), or with
  ``mode='state'`` for the stored moment too, or with ``mode='norm'`` the
  update gets ``phi c``, ``phi = ||U^T d|| / ||U^T g||`` (the library's
  ``complement_mode``). With ``factored``, the
  second moment is kept as its row and column sums and read back as
  ``R C^T / sum(R)`` (``contrib.FactoredSecondMoment``).
  """

  def __init__(self, shapes, key, rank, b1, b2, eps, oversample=0,
               power_iters=0, bounded=True, lam=0.0, factored=False,
               mode='moment'):
    self.key, self.rank, self.b1, self.b2, self.eps = key, rank, b1, b2, eps
    self.oversample, self.power_iters = oversample, power_iters
    self.bounded, self.lam, self.factored = bounded, lam, factored
    self.mode = mode
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
      if self.factored:
        row, col = self.factors[name].get('rows_cols', (0.0, 0.0))
        total = np.sum(row, axis=-1, keepdims=True)[..., None]
        v_prev = (np.zeros(g.shape) if np.all(total == 0) else
                  row[..., :, None] * col[..., None, :] / total)
      else:
        v_prev = zeta_fix(reconstruct(*self.factors[name]['nu']))
      mom = b1 * m_prev + (1 - b1) * g
      var = b2 * v_prev + (1 - b2) * g**2
      t = self.t + 1
      u = self.factors[name]['mu'][0]
      credit = self.lam * (1 - b1**(t - 1)) * complement(g, u)
      credited = mom if self.mode == 'norm' else mom + b1 * credit
      m_hat, v_hat = credited / (1 - b1**t), var / (1 - b2**t)
      out[name] = m_hat / (np.sqrt(v_hat) + self.eps)
      if self.mode == 'norm':
        out[name] = out[name] + span_norm_ratio(out[name], g, u) * credit
      if self.mode == 'state':
        mom = credited
      if self.bounded:
        bound = adam_bound(b1, b2, t)
        out[name] = np.clip(out[name], -bound, bound)
      for j, (moment, x) in enumerate((('mu', mom), ('nu', var))):
        if moment == 'nu' and self.factored:
          self.factors[name]['rows_cols'] = (x.sum(-1), x.sum(-2))
          continue
        omega = sketch(self.key, self.t, i, j, batch, n, l)
        self.factors[name][moment] = rsvd(x, omega, k, self.power_iters)
    self.t += 1
    return out


class MLorcLion:
  """Algorithm 2 on a dict of matrices (lr = 1, no decay).

  With ``lam > 0``, ``lam (1 - b2^(t-1)) (I - U U^T) g`` is added to the
  previous momentum in ``c`` only (the library's ``complement=lam``), or
  with ``mode='state'`` to the stored momentum too, or with ``mode='norm'``
  the update gets ``phi`` times it (as :class:`MLorcAdamW`).
  """

  def __init__(self, shapes, key, rank, b1, b2, lam=0.0, mode='moment'):
    self.key, self.rank, self.b1, self.b2, self.lam = key, rank, b1, b2, lam
    self.mode = mode
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
      u = self.factors[name][0]
      credit = self.lam * (1 - self.b2**self.t) * complement(g, u)
      credited = m_prev if self.mode == 'norm' else m_prev + credit
      c = self.b1 * credited + (1 - self.b1) * g
      mom = self.b2 * (credited if self.mode == 'state' else m_prev) + (
          1 - self.b2) * g
      out[name] = np.sign(c)
      if self.mode == 'norm':
        out[name] = out[name] + span_norm_ratio(out[name], g, u) * credit
      omega = sketch(self.key, self.t, i, 0, batch, n, k)
      self.factors[name] = rsvd(mom, omega, k)
    self.t += 1
    return out
