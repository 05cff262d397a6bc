"""Comparisons of two float32 implementations of the same step, and gradients
that keep them well conditioned.

Tolerances are relative to the largest magnitude of the reference: the
reconstruction of a factored moment is exact only to float32 rounding of its
largest entry (README, "Precision and bad input"), so entries near 0 carry an
absolute, not a relative, error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def assert_close(ours, theirs, rel, err_msg=''):
  """``|ours - theirs| <= rel * max|theirs|`` everywhere."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  scale = max(np.abs(theirs).max(), 1e-30)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=rel * scale,
                             err_msg=err_msg)


def assert_close_but_for_the_fix(ours, theirs, rel, err_msg='',
                                 max_fraction=1e-3):
  """:func:`assert_close`, except for ``max_fraction`` of entries (or one).

  The fix of paper equation (2) is discontinuous: an entry of the
  reconstructed second moment within rounding of zero counts as negative in
  one implementation and not in the other. That entry's second moment jumps
  between ~0 and ``zeta`` (its update by any factor), and ``zeta`` moves,
  and with it the update of every negative entry (by ~1/count of them).
  All other entries agree to ``rel``.
  """
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs, np.float64)
  diff = np.abs(ours - theirs)
  outliers = diff > rel * max(np.abs(theirs).max(), 1e-30)
  # At least one entry may flip, however small the matrix.
  assert outliers.sum() <= max(1, max_fraction * outliers.size), (
      err_msg, outliers.sum(), diff.max())


def grads_for(shapes, steps, dtype=jnp.float32, seed=0):
  """Gradients with a fixed decaying spectrum (0.6**i) plus fresh noise.

  Gaps between the singular values keep the rank-r truncation of the
  oversampled RSVD well conditioned, so two float32 implementations pick the
  same subspace.

  The same gradients on every backend (up to float32 rounding): the signal's
  product is a float32 one, where a GPU's default would round its operands
  to TF32 and make another problem. On the one an H200 made (2026-12-02),
  the warm-started step's third step was not well conditioned: perturbing
  the gradients by 1e-6 (relative) moved 141 of 24,576 entries of the
  reference step's own update by up to 0.29 (``benchmarks/README.md``).
  """
  key = jax.random.key(seed)
  decay = 0.6 ** jnp.arange(8.0)
  signal = {}
  for i, (name, s) in enumerate(sorted(shapes.items())):
    if len(s) < 2:
      signal[name] = jnp.ones(s)
      continue
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1000 + i))
    left = jax.random.normal(k1, (*s[:-1], 8)) * decay
    signal[name] = jnp.matmul(left,
                              jax.random.normal(k2, (*s[:-2], 8, s[-1])),
                              precision=jax.lax.Precision.HIGHEST)
  return [{
      name: (signal[name] + 0.1 * jax.random.normal(
          jax.random.fold_in(key, 7 * t + i), s)).astype(dtype)
      for i, (name, s) in enumerate(sorted(shapes.items()))
  } for t in range(steps)]
