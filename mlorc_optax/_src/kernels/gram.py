"""The small factorizations of the two-pass step, from Gram matrices.

Between the passes, ``Q``, an orthonormal basis of the range of each sketch
``Y [B, m, l]``, comes from the ``l x l`` Gram matrix ``Y^T Y = E Lambda
E^T`` as ``Q = Y E Lambda^{-1/2}``, twice (the second time on ``Q`` itself,
which makes it orthonormal to float32 rounding, as CholeskyQR2 does, Fukaya
et al. 2014); directions with ``lambda`` below ``l * eps * lambda_max`` are
dropped instead of divided by ~0 (:func:`orthonormal_bases`).

After the passes, the SVD of each projection ``B = Q^T M`` (``l x n``) comes
from its Gram matrix: ``B B^T = E Lambda E^T``, ``W = E^T B`` (rows ordered
by decreasing ``lambda``), ``s_i = ||W_i||``, ``v_i = W_i / s_i``,
``u = Q E``, keeping the top ``r`` (:func:`svds_of_projections`). The
reconstruction ``u diag(s) v^T = Q E E^T B`` is the projection ``Q Q^T M``
whatever the accuracy of the small eigenvalues.

Plain ``jax.numpy``; every ``eigh`` of a step is batched into one call per
size (:func:`eigh_all`): on a GPU these replace the Householder QR and SVD
of long matrices that dominated the reference step (``benchmarks/README.md``).

Inside ``jax.shard_map`` a matrix may be split over devices: ``Y`` and ``Q``
by rows, ``B`` by columns. Everything above is then computed on each
device's block, and the only sums over the split axis, the Gram matrices
(``l x l``), the norms ``s_i`` and the largest magnitudes that scale them,
are completed across devices (``psum`` / ``pmax`` over the mesh axes named
by ``row_axes`` / ``col_axes``): every device gets the same ``l x l``
factorization, and its own block of ``Q``, ``u`` and ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math

_HI = step_math.HIGHEST
_EPS = float(np.finfo(np.float32).eps)
_TINY = float(np.finfo(np.float32).tiny)


def psum(x: Any, axes: Sequence[str]) -> Any:
  """``jax.lax.psum`` of ``x`` (a pytree) over mesh ``axes``; ``x`` if none.

  Outside ``shard_map`` (or for a matrix that is not split) ``axes`` is
  empty and nothing is reduced.
  """
  return jax.lax.psum(x, tuple(axes)) if axes else x


def _max_abs(x: jax.Array, axes: Sequence[str]) -> jax.Array:
  """:func:`step_math.max_abs` of a matrix split over mesh ``axes``."""
  if not axes:
    return step_math.max_abs(x)
  scale = jax.lax.pmax(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True),
                       tuple(axes))
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def eigh_all(mats: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """``eigh`` of every ``[B_i, l, l]`` batch in one call per size ``l``.

  On a GPU each ``eigh`` is a solver call with a fixed cost of its own; one
  call for all the leaves of a step instead of one per leaf and moment.

  Returns:
    Per input, ``(eigenvalues [B_i, l] ascending, eigenvectors [B_i, l, l])``.
  """
  out: list[Any] = [None] * len(mats)
  for l in sorted({x.shape[-1] for x in mats}):
    idx = [i for i, x in enumerate(mats) if x.shape[-1] == l]
    lam, e = jnp.linalg.eigh(jnp.concatenate([mats[i] for i in idx]))
    start = 0
    for i in idx:
      stop = start + mats[i].shape[0]
      out[i] = (lam[start:stop], e[start:stop])
      start = stop
  return out


def orthonormal_bases(
    ys: Sequence[jax.Array],
    row_axes: Sequence[Sequence[str]] | None = None,
) -> list[jax.Array]:
  """Orthonormal bases ``[B, m, l]`` of the ranges of each ``y [B, m, l]``.

  Gram-based, twice (module docstring): with ``y^T y = E Lambda E^T``,
  ``q = y E Lambda^{-1/2}``, then the same on ``q``. Directions whose
  eigenvalue is below ``l * eps * lambda_max`` (numerically outside the
  range) give zero columns, so a zero or rank-deficient ``y`` gives no NaN.
  All ``eigh`` calls of one round are batched (:func:`eigh_all`).

  Args:
    ys: the sketches.
    row_axes: inside ``shard_map``, per ``y`` the mesh axes its rows are
      split over (``y`` is this device's block of rows; so is its ``q``).
      None: no ``y`` is split.
  """
  row_axes = [()] * len(ys) if row_axes is None else list(row_axes)
  qs = [y / _max_abs(y, axes) for y, axes in zip(ys, row_axes)]
  for _ in range(2):
    eig = eigh_all([psum(step_math.gram(q), axes)
                    for q, axes in zip(qs, row_axes)])
    new = []
    for q, (lam, e) in zip(qs, eig):
      floor = q.shape[-1] * _EPS * lam[..., -1:]
      keep = lam > jnp.maximum(floor, _TINY)
      inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
      new.append(jnp.einsum('bml,blk->bmk', q, e * inv[:, None, :],
                            precision=_HI))
    qs = new
  return qs


def orthonormal_basis(y: jax.Array) -> jax.Array:
  """:func:`orthonormal_bases` of one ``[..., m, l]`` array."""
  *_, m, l = y.shape
  q = orthonormal_bases([jnp.reshape(y, (-1, m, l))])[0]
  return jnp.reshape(q, y.shape)


def svds_of_projections(
    qs: Sequence[jax.Array],
    bs: Sequence[jax.Array],
    ranks: Sequence[int],
    col_axes: Sequence[Sequence[str]] | None = None,
) -> list[rsvd.LowRankFactors]:
  """Top-``rank`` SVDs of ``q @ b`` from the Gram matrices ``b b^T``.

  Args:
    qs: orthonormal bases ``[B, m, l]``.
    bs: projections ``[B, l, n]`` (``q^T`` of the matrix).
    ranks: how many singular triplets to keep of each.
    col_axes: inside ``shard_map``, per ``b`` the mesh axes its columns are
      split over (``b`` is this device's block of columns; so is its
      ``v``). None: no ``b`` is split.

  Returns:
    Per input, float32 :class:`~mlorc_optax._src.rsvd.LowRankFactors`
    ``(u [B, m, rank], s [B, rank], v [B, n, rank])``, singular values
    descending; one batched ``eigh`` for all of them (module docstring).
  """
  col_axes = [()] * len(bs) if col_axes is None else list(col_axes)
  scales = [_max_abs(b, axes) for b, axes in zip(bs, col_axes)]
  bs = [b / sc for b, sc in zip(bs, scales)]
  eig = eigh_all([psum(step_math.gram(step_math.mT(b)), axes)
                  for b, axes in zip(bs, col_axes)])
  out = []
  for q, b, sc, (_, e), rank, axes in zip(qs, bs, scales, eig, ranks,
                                          col_axes):
    e = e[..., ::-1][..., :rank]  # descending eigenvalues, top rank
    w = jnp.einsum('blk,bln->bkn', e, b, precision=_HI)  # [B, k, n]
    s = jnp.sqrt(psum(jnp.sum(w * w, axis=-1), axes))
    v = step_math.mT(w) / jnp.where(s > 0, s, 1.0)[..., None, :]
    u = jnp.einsum('bml,blk->bmk', q, e, precision=_HI)
    out.append(rsvd.LowRankFactors(u=u, s=s * sc[..., 0], v=v))
  return out
