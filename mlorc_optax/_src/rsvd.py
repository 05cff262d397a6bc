"""Randomized SVD (MLorc paper, Algorithm 3; Halko, Martinsson & Tropp 2011).

Everything here works on batches of matrices ``[..., m, n]`` in one batched
computation (no Python loop over matrices) and always computes in float32,
whatever the input dtype: QR and SVD in bfloat16 lose the small singular
directions the optimizer relies on.

The decomposition has its own derivative rule (a ``jax.custom_jvp``, reverse
mode by transposition): differentiating through the QR and SVD of a
rank-deficient sketch (a moment of rank below the sketch width, as after a
few steps at batch 1) divides by zero singular values and gave silently wrong
meta-gradients. See :func:`randomized_svd_from_sketch`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src.checks import check_int
from mlorc_optax._src.step_math import max_abs
from mlorc_optax._src.step_math import mT
from mlorc_optax._src.step_math import unsharded_matrix


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
    >>> from mlorc_optax import LowRankFactors
    >>> from mlorc_optax.compressors import reconstruct
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
  q, _ = jnp.linalg.qr(unsharded_matrix(y), mode='reduced')
  return q


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
  b = unsharded_matrix(b)
  if l >= n:
    return jnp.linalg.svd(b, full_matrices=False)
  q_b, r_b = jnp.linalg.qr(mT(b), mode='reduced')
  u, s, wt = jnp.linalg.svd(mT(r_b), full_matrices=False)
  return u, s, matmul(wt, mT(q_b))


def randomized_svd_from_sketch(
    a: jax.Array, omega: jax.Array | None, rank: int, *, power_iters: int = 0
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

  Differentiation (``jax.jvp`` and ``jax.grad``, first order): ``omega`` is
  a constant (its cotangent is zero), and the derivative is that of
  ``R(A) = P A``, ``P`` the orthogonal projector onto the range of ``Y``
  (of ``(A A^T)^q A Omega`` with power iterations), along perturbations that
  keep the numerical rank of ``Y`` (singular values below
  ``10 max(m, n) eps_float32`` times the largest count as zero):

  .. math::

    dR = dP\\,A + P\\,dA,\\qquad
    dP = (I - P)\\, dY\\, Y^{+} + (Y^{+})^\\top dY^\\top (I - P).

  ``R`` is the result when ``l = rank`` (no oversampling), so the derivative
  is then exact; so it is wherever the result itself is exact (``rank >=
  min(m, n)``, or ``A`` of rank ``<= rank``), along perturbations that keep
  ``A``'s rank (one that raises the rank of a rank-deficient matrix has no
  derivative in the factors). With ``l > rank`` the derivative of the
  truncation to the top ``rank`` triplets is omitted: ``dR`` is projected
  onto the tangent space of the rank-``rank`` matrices at the result. The
  factors' tangent reconstructs that: ``ds_i = u_i^T dR v_i``, and ``du``,
  ``dv`` are chosen without the ``1 / (s_i^2 - s_j^2)`` terms of the
  singular vectors' own derivatives (undefined at repeated or zero singular
  values), so differentiate the reconstruction or ``s``, not ``u`` or ``v``
  alone.

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
  if omega is not None:
    omega = jax.lax.stop_gradient(jnp.asarray(omega, jnp.float32))
  return _rsvd(a, omega, rank, power_iters)


def _factorize(
    a: jax.Array, omega: jax.Array | None, rank: int, power_iters: int
) -> LowRankFactors:
  """The randomized SVD of an ``a`` already divided by its largest entry."""
  y = a if omega is None else matmul(a, omega)
  q = _orthonormal_basis(y)
  for _ in range(power_iters):
    z = _orthonormal_basis(matmul(mT(a), q))
    q = _orthonormal_basis(matmul(a, z))
  b = matmul(mT(q), a)  # [..., l, n]
  u_b, s, vt = _short_wide_svd(b)
  u = matmul(q, u_b[..., :rank])
  return LowRankFactors(u=u, s=s[..., :rank], v=mT(vt[..., :rank, :]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _rsvd(
    a: jax.Array, omega: jax.Array | None, rank: int, power_iters: int
) -> LowRankFactors:
  """:func:`randomized_svd_from_sketch` on float32 ``a`` and ``omega``."""
  scale = max_abs(a)
  u, s, v = _factorize(a / scale, omega, rank, power_iters)
  return LowRankFactors(u=u, s=s * scale[..., 0], v=v)


def _rank_rtol(rows: int, cols: int) -> float:
  """Singular values below this times the largest count as zero.

  The cutoff of ``jnp.linalg.pinv``: a float32 product or factorization of an
  ``m x n`` matrix of rank ``t`` leaves its other singular values at rounding
  level, below ``max(m, n) eps`` of the largest.
  """
  return 10.0 * max(rows, cols) * float(jnp.finfo(jnp.float32).eps)


def _pinv_diag(s: jax.Array, rtol: float) -> tuple[jax.Array, jax.Array]:
  """``(live, 1 / s on live and 0 elsewhere)`` for descending ``s [..., k]``."""
  live = s > rtol * s[..., :1]
  return live, jnp.where(live, 1.0 / jnp.where(live, s, 1.0), 0.0)


def _range_tangent(
    y: jax.Array, dy: jax.Array, rtol: float
) -> tuple[jax.Array, jax.Array]:
  """An orthonormal basis ``b`` of range(``y``) and its tangent along ``dy``.

  ``y = b S X^T`` (thin SVD; the columns of ``b`` whose singular value is
  below the cutoff are zeroed, so ``P = b b^T`` projects onto the numerical
  range) and ``db = (I - P) dy X S^+``: the horizontal tangent, for which
  ``dP = db b^T + b db^T`` is the derivative of ``P`` at constant rank.
  """
  x, s, bt = _short_wide_svd(mT(y))  # y^T = X S b^T
  live, inv = _pinv_diag(s, rtol)
  b = mT(bt) * live[..., None, :]
  db = matmul(dy, x * inv[..., None, :])
  return b, db - matmul(b, matmul(mT(b), db))


def _reconstruction_tangent(
    a: jax.Array,
    da: jax.Array,
    omega: jax.Array | None,
    power_iters: int,
    rtol: float,
) -> jax.Array:
  """``dR = dP A + P dA`` of ``R = P A``, ``P`` the projector of the sketch.

  The power iterations are followed as in the forward pass, one range at a
  time (``range(A^T Q)``, then ``range(A Z)``), each through
  :func:`_range_tangent`, so no power of ``A`` is ever formed.
  """
  if omega is None:
    b, db = _range_tangent(a, da, rtol)
  else:
    b, db = _range_tangent(matmul(a, omega), matmul(da, omega), rtol)
  for _ in range(power_iters):
    b, db = _range_tangent(
        matmul(mT(a), b), matmul(mT(da), b) + matmul(mT(a), db), rtol)
    b, db = _range_tangent(matmul(a, b), matmul(da, b) + matmul(a, db), rtol)
  return (matmul(db, matmul(mT(b), a)) + matmul(b, matmul(mT(db), a))
          + matmul(b, matmul(mT(b), da)))


def _factor_tangent(
    dr: jax.Array, factors: LowRankFactors, rtol: float
) -> LowRankFactors:
  """A tangent ``(du, ds, dv)`` of ``factors`` that reconstructs ``dr``.

  With ``D`` the live columns (``s_i`` above the cutoff) and ``S^+`` the
  inverse of ``S`` on them (0 elsewhere): ``ds = diag(U^T dR V)`` on ``D``,
  ``du = (dR V - U diag(ds)) S^+`` and
  ``dv = (I - V_D V_D^T) dR^T U S^+``, so that
  ``du S V^T + U dS V^T + U S dv^T
  = dR V_D V_D^T + U_D U_D^T dR (I - V_D V_D^T)``: the projection of ``dR``
  onto the tangent space of the rank-``|D|`` matrices at ``U S V^T``, which
  is ``dR`` itself when ``dR`` is the derivative of a map into them.
  """
  u, s, v = factors
  live, inv = _pinv_diag(s, rtol)
  drv = matmul(dr, v)  # [..., m, k]
  ds = jnp.where(live, jnp.sum(u * drv, axis=-2), 0.0)
  du = (drv - u * ds[..., None, :]) * inv[..., None, :]
  v_live = v * live[..., None, :]
  dru = matmul(mT(dr), u)  # [..., n, k]
  dv = (dru - matmul(v_live, matmul(mT(v_live), dru))) * inv[..., None, :]
  return LowRankFactors(u=du, s=ds, v=dv)


@_rsvd.defjvp
def _rsvd_jvp(rank, power_iters, primals, tangents):
  """The constant-rank derivative of ``R = P A`` (see the public docstring).

  Computed on the matrix divided by its largest entry, like the forward
  pass: ``(u, v)`` and ``R / scale`` are invariant under that scaling, so
  the scale is a constant of the rule. The tangent of ``omega`` is ignored.
  """
  a, omega = primals
  da, _ = tangents
  scale = max_abs(a)
  a_s = a / scale
  factors = _factorize(a_s, omega, rank, power_iters)
  rtol = _rank_rtol(*a.shape[-2:])
  dr = _reconstruction_tangent(a_s, da / scale, omega, power_iters, rtol)
  du, ds, dv = _factor_tangent(dr, factors, rtol)
  out = LowRankFactors(u=factors.u, s=factors.s * scale[..., 0], v=factors.v)
  return out, LowRankFactors(u=du, s=ds * scale[..., 0], v=dv)


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
  the function is jit-compatible and batched over leading axes. It is
  differentiable to first order with the sketch held constant: the
  constant-rank derivative of the reconstruction described in
  :func:`randomized_svd_from_sketch`.

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
    >>> from mlorc_optax import randomized_svd
    >>> from mlorc_optax.compressors import reconstruct
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
    >>> from mlorc_optax import randomized_svd
    >>> from mlorc_optax.compressors import reconstruct
    >>> a = jax.random.normal(jax.random.key(0), (2, 5, 3))  # a batch of 2
    >>> f = randomized_svd(a, jax.random.key(1), rank=3)     # full rank
    >>> bool(jnp.allclose(reconstruct(f), a, atol=1e-5))
    True
  """
  u = jnp.asarray(factors.u, jnp.float32)
  s = jnp.asarray(factors.s, jnp.float32)
  v = jnp.asarray(factors.v, jnp.float32)
  return matmul(u * s[..., None, :], mT(v))
