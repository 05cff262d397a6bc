"""Randomized SVD (MLorc paper, Algorithm 3; Halko, Martinsson & Tropp 2011).

Everything here works on batches of matrices ``[..., m, n]`` in one batched
computation (no Python loop over matrices) and always computes in float32,
whatever the input dtype: QR and SVD in bfloat16 lose the small singular
directions the optimizer relies on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src.checks import check_int


class LowRankFactors(NamedTuple):
  """A batch of rank-``k`` matrices ``a ≈ u @ diag(s) @ v.T``.

  What :func:`randomized_svd` returns and what the MLorc states store for
  each compressed moment (there, each field is a tree shaped like the
  params). ``k (m + n + 1)`` numbers per matrix instead of ``mn``:

  .. math::

    A \\approx U \\operatorname{diag}(s) V^\\top
    = \\sum_{i=1}^{k} s_i\\, u_i v_i^\\top .

  Attributes:
    u: left singular vectors, shape ``[..., m, k]``.
    s: singular values, shape ``[..., k]`` (non-negative, descending).
    v: right singular vectors, shape ``[..., n, k]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import LowRankFactors, reconstruct
    >>> f = LowRankFactors(u=jnp.array([[1.0], [0.0]]), s=jnp.array([3.0]),
    ...                    v=jnp.array([[0.0], [1.0], [0.0]]))
    >>> reconstruct(f)
    Array([[0., 3., 0.],
           [0., 0., 0.]], dtype=float32)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    Algorithms 1-3.
  """

  u: jax.Array
  s: jax.Array
  v: jax.Array


def sketch_width(rows: int, cols: int, rank: int, oversample: int) -> int:
  """Number of sketch columns ``l = min(rank + oversample, rows, cols)``.

  More than ``min(rows, cols)`` columns cannot add information, and capping
  there makes the decomposition exact once ``rank >= min(rows, cols)``.
  """
  return min(rank + oversample, rows, cols)


def factor_rank(rows: int, cols: int, rank: int) -> int:
  """Rank ``k = min(rank, rows, cols)`` of the factors kept for a matrix."""
  return min(rank, rows, cols)


def gaussian_sketch(
    key: jax.Array, batch_shape: tuple[int, ...], cols: int, width: int
) -> jax.Array | None:
  """The test matrix ``Omega`` of shape ``[*batch_shape, cols, width]``.

  ``Omega ~ N(0, 1)`` drawn from ``key``: the only randomness of the
  randomized SVD, a pure function of ``key``, so every replica that holds the
  same key draws the same sketch. When ``width == cols`` the sketch would
  sample the whole column space, and None (standing for the identity) is
  returned instead: the range is then exact, and a square Gaussian sketch
  (often ill-conditioned) would only lose float32 accuracy.
  """
  if width == cols:
    return None
  return jax.random.normal(key, (*batch_shape, cols, width), jnp.float32)


def _orthonormal_basis(y: jax.Array) -> jax.Array:
  # Householder QR: a zero or rank-deficient ``y`` still yields orthonormal
  # columns (no division by a zero norm), so a zero moment never makes NaNs.
  q, _ = jnp.linalg.qr(y, mode='reduced')
  return q


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` with full float32 products.

  XLA's default precision on NVIDIA GPUs rounds float32 matmul inputs to
  TF32 (10-bit mantissa, 1e-3 relative error), which would make the
  moments' reconstructions and sketches far less exact than float32.
  """
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _short_wide_svd(
    b: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD ``(u, s, vt)`` of ``b [..., l, n]``, through a QR when l < n.

  ``b^T = Q_b R_b`` (Householder, ``[n, l]`` and ``[l, l]``), then the SVD of
  the small ``R_b^T = U S W^T`` gives ``b = U S (Q_b W)^T``. Both
  steps are backward stable, like a direct SVD, but the only decomposition
  of a long matrix is a QR: on an H100 the direct SVD of ``[8, 4, 4096]``
  took 3.9 ms and the QR of its ``[8, 4096, 4]`` transpose 1.1 ms
  (``benchmarks/decompositions.py``).
  """
  l, n = b.shape[-2:]
  if l >= n:
    return jnp.linalg.svd(b, full_matrices=False)
  q_b, r_b = jnp.linalg.qr(_mT(b), mode='reduced')
  u, s, wt = jnp.linalg.svd(_mT(r_b), full_matrices=False)
  return u, s, matmul(wt, _mT(q_b))


def randomized_svd_from_sketch(
    a: jax.Array, omega: jax.Array, rank: int, *, power_iters: int = 0
) -> LowRankFactors:
  """Randomized SVD of ``a`` with a given sketch matrix ``omega``.

  Algorithm 3 of the MLorc paper with optional subspace (power) iterations:

  .. math::

    Y = A \\Omega,\\quad Q = \\mathrm{qr}(Y),\\quad
    [Q \\leftarrow \\mathrm{qr}(A\\,\\mathrm{qr}(A^\\top Q))]^{q},\\quad
    B = Q^\\top A = \\hat U \\Sigma V^\\top,\\quad U = Q \\hat U,

  keeping the top ``rank`` singular triplets. Each power iteration
  re-orthonormalises both half steps, which keeps float32 accurate. Each
  matrix is divided by its largest absolute entry first (and ``S`` multiplied
  back), so matrices of any finite magnitude, 1e-30 or 1e30, neither underflow
  in the Householder norms nor overflow in ``A Omega``.

  Args:
    a: matrices ``[..., m, n]``; computed in float32.
    omega: sketch ``[..., n, l]`` with ``l >= rank`` (broadcastable batch),
      or None for the identity (``Y = A``).
    rank: number of singular triplets kept (``<= l``).
    power_iters: number of power iterations ``q``.

  Returns:
    :class:`LowRankFactors` in float32 with ``k = rank`` columns.
  """
  a = jnp.asarray(a, jnp.float32)
  scale = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  a = a / scale
  y = a if omega is None else matmul(a, jnp.asarray(omega, jnp.float32))
  q = _orthonormal_basis(y)
  for _ in range(power_iters):
    z = _orthonormal_basis(matmul(_mT(a), q))
    q = _orthonormal_basis(matmul(a, z))
  b = matmul(_mT(q), a)  # [..., l, n]
  u_b, s, vt = _short_wide_svd(b)
  u = matmul(q, u_b[..., :rank])
  s = s[..., :rank] * scale[..., 0]
  return LowRankFactors(u=u, s=s, v=_mT(vt[..., :rank, :]))


def randomized_svd(
    a: jax.Array,
    key: jax.Array,
    rank: int,
    *,
    oversample: int = 0,
    power_iters: int = 0,
) -> LowRankFactors:
  """Rank-``rank`` randomized SVD of a batch of matrices (paper Algorithm 3).

  With ``k = min(rank, m, n)`` and ``l = min(rank + oversample, m, n)``, draws
  ``Omega = N(0, 1)^{n x l}`` from ``key``, finds an orthonormal basis ``Q``
  of the range of ``A Omega`` (refined by ``power_iters`` power iterations)
  and returns the top ``k`` singular triplets of ``Q Q^T A``:

  .. math::

    Y = A \\Omega,\\quad Q = \\mathrm{qr}(Y),\\quad
    B = Q^\\top A = \\hat U \\Sigma V^\\top,\\quad U = Q \\hat U,

  each power iteration replacing ``Q`` by
  ``qr(A qr(A^T Q))``. When ``l == n`` the sketch is the identity
  (``Y = A``), which samples the whole range exactly.

  Guarantees: the result is exact (up to float32 rounding) when
  ``rank >= min(m, n)``; an all-zero matrix gives zero singular values and a
  zero reconstruction (no NaN); ``m < n`` and ``m > n`` are both supported;
  the function is jit-compatible and batched over leading axes.

  Args:
    a: array of shape ``[..., m, n]``, any floating dtype (computed in
      float32).
    key: a ``jax.random`` key (raw ``uint32[2]`` or typed). One key serves the
      whole batch.
    rank: target rank ``r >= 1``.
    oversample: extra sketch columns ``p >= 0`` (paper default 0).
    power_iters: power iterations ``q >= 0``. Algorithm 3 of the paper has
      none (0, the default); the official PyTorch code calls
      ``torch.pca_lowrank(niter=1)``, i.e. one.

  Returns:
    :class:`LowRankFactors` ``(u [..., m, k], s [..., k], v [..., n, k])`` in
    float32 with ``a ≈ (u * s[..., None, :]) @ v.T``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mlorc_optax import randomized_svd, reconstruct
    >>> a = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 4.0))  # rank 1
    >>> f = randomized_svd(a, jax.random.key(0), rank=1)
    >>> f.u.shape, f.s.shape, f.v.shape
    ((4, 1), (1,), (3, 1))
    >>> bool(jnp.allclose(reconstruct(f), a, atol=1e-4))
    True

  References:
    Halko, Martinsson & Tropp, *Finding structure with randomness*, SIAM
    Review 53(2), 2011. Shen et al., *MLorc: Momentum Low-rank Compression
    for Memory Efficient Large Language Model Adaptation*,
    https://arxiv.org/abs/2506.01897, Algorithm 3.
  """
  rank = check_int('rank', rank, 1)
  oversample = check_int('oversample', oversample, 0)
  power_iters = check_int('power_iters', power_iters, 0)
  a = jnp.asarray(a)
  if a.ndim < 2:
    raise ValueError(
        f'randomized_svd needs an array of shape [..., m, n], got shape '
        f'{a.shape}.'
    )
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f'randomized_svd needs a floating array, got {a.dtype}.')
  m, n = a.shape[-2:]
  if m == 0 or n == 0:
    raise ValueError(f'randomized_svd got an empty matrix of shape {a.shape}.')
  width = sketch_width(m, n, rank, oversample)
  omega = gaussian_sketch(key, a.shape[:-2], n, width)
  return randomized_svd_from_sketch(
      a, omega, factor_rank(m, n, rank), power_iters=power_iters
  )


def reconstruct(factors: LowRankFactors) -> jax.Array:
  """Dense matrices ``u @ diag(s) @ v.T`` in float32, shape ``[..., m, n]``.

  .. math::

    A = U \\operatorname{diag}(s) V^\\top,

  batched over the leading axes; the factors may be stored in any floating
  dtype (``factor_dtype``), the product is computed in float32.

  Args:
    factors: :class:`LowRankFactors` with ``u [..., m, k]``, ``s [..., k]``
      and ``v [..., n, k]``.

  Returns:
    A float32 array of shape ``[..., m, n]``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mlorc_optax import randomized_svd, reconstruct
    >>> a = jax.random.normal(jax.random.key(0), (2, 5, 3))  # a batch of 2
    >>> f = randomized_svd(a, jax.random.key(1), rank=3)     # full rank
    >>> bool(jnp.allclose(reconstruct(f), a, atol=1e-5))
    True
  """
  u = jnp.asarray(factors.u, jnp.float32)
  s = jnp.asarray(factors.s, jnp.float32)
  v = jnp.asarray(factors.v, jnp.float32)
  return matmul(u * s[..., None, :], _mT(v))
