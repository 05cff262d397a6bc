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
The other small operations run once per group of equal-shaped matrices
(the leaves of a model with the same rows, or the same columns), not once
per leaf and moment (:func:`_batched`).

Inside ``jax.shard_map`` a matrix may be split over devices: ``Y`` and ``Q``
by rows, ``B`` by columns. Everything above is then computed on each
device's block, and the only sums over the split axis, the Gram matrices
(``l x l``), the norms ``s_i`` and the largest magnitudes that scale them,
are completed across devices (``psum`` / ``pmax`` over the mesh axes named
by ``row_axes`` / ``col_axes``): every device gets the same ``l x l``
factorization, and its own block of ``Q``, ``u`` and ``v``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
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


def groups_by_key(keys: Sequence[Hashable]) -> list[list[int]]:
  """Indices of equal ``keys``, grouped in order of first appearance."""
  where: dict[Hashable, list[int]] = {}
  for i, key in enumerate(keys):
    where.setdefault(key, []).append(i)
  return list(where.values())


def join_batches(xs: Sequence[Any], groups: Sequence[Sequence[int]]) -> list[Any]:
  """Per group, its members' arrays (pytrees) joined along the batch axis."""
  return [xs[g[0]] if len(g) == 1 else jax.tree.map(
      lambda *parts: jnp.concatenate(parts), *[xs[i] for i in g])
          for g in groups]


def split_batches(ys: Sequence[Any], groups: Sequence[Sequence[int]],
            sizes: Sequence[int]) -> list[Any]:
  """:func:`join_batches` undone: per input, its batch of its group's
  result (``sizes``: the inputs' batch lengths)."""
  out: list[Any] = [None] * len(sizes)
  for g, y in zip(groups, ys):
    start = 0
    for i in g:
      out[i] = y if len(g) == 1 else jax.tree.map(
          lambda x, a=start, b=start + sizes[i]: x[a:b], y)
      start += sizes[i]
  return out


def _batched(fn: Callable[..., list[Any]], keys: Sequence[Hashable],
             sizes: Sequence[int], *args: Sequence[Any]) -> list[Any]:
  """``fn`` over every input, inputs of equal ``keys`` in one batch.

  Each of ``args`` holds one pytree per input (batch axis first, ``sizes``
  its lengths); ``fn`` takes the list of the groups' keys and one list per
  argument, and returns one result per group. Every computation here is
  per matrix, so joining matrices along the batch axis changes no result;
  it turns one launch per leaf and moment of each small operation into one
  per group: on an H200 each of them is a few microseconds, mostly launch
  latency.
  """
  groups = groups_by_key(keys)
  out = fn([keys[g[0]] for g in groups],
           *(join_batches(a, groups) for a in args))
  return split_batches(out, groups, sizes)


def eigh_all(mats: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """``eigh`` of every ``[B_i, l, l]`` batch in one call per size ``l``.

  On a GPU each ``eigh`` is a solver call with a fixed cost of its own; one
  call for all the leaves of a step instead of one per leaf and moment.

  Returns:
    Per input, ``(eigenvalues [B_i, l] ascending, eigenvectors [B_i, l, l])``.
  """
  return _batched(lambda _, xs: [jnp.linalg.eigh(x) for x in xs],
                  [(x.shape[1:], x.dtype) for x in mats],
                  [x.shape[0] for x in mats], mats)


def orthonormal_bases(
    ys: Sequence[jax.Array],
    row_axes: Sequence[Sequence[str]] | None = None,
) -> list[jax.Array]:
  """Orthonormal bases ``[B, m, l]`` of the ranges of each ``y [B, m, l]``.

  Gram-based, twice (module docstring): with ``y^T y = E Lambda E^T``,
  ``q = y E Lambda^{-1/2}``, then the same on ``q``. Directions whose
  eigenvalue is below ``l * eps * lambda_max`` (numerically outside the
  range) give zero columns, so a zero or rank-deficient ``y`` gives no NaN.
  Sketches of equal shapes (but for the batch) are computed as one batch,
  and all ``eigh`` calls of one round together (:func:`eigh_all`).

  Args:
    ys: the sketches.
    row_axes: inside ``shard_map``, per ``y`` the mesh axes its rows are
      split over (``y`` is this device's block of rows; so is its ``q``).
      None: no ``y`` is split.
  """
  row_axes = [()] * len(ys) if row_axes is None else list(map(tuple,
                                                              row_axes))

  def bases(keys, ys):
    axes = [key[-1] for key in keys]
    qs = [y / _max_abs(y, a) for y, a in zip(ys, axes)]
    for _ in range(2):
      eig = eigh_all([psum(step_math.gram(q), a) for q, a in zip(qs, axes)])
      new = []
      for q, (lam, e) in zip(qs, eig):
        floor = q.shape[-1] * _EPS * lam[..., -1:]
        keep = lam > jnp.maximum(floor, _TINY)
        inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
        new.append(jnp.einsum('bml,blk->bmk', q, e * inv[:, None, :],
                              precision=_HI))
      qs = new
    return qs

  return _batched(bases, [(y.shape[1:], y.dtype, a)
                          for y, a in zip(ys, row_axes)],
                  [y.shape[0] for y in ys], ys)


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
  col_axes = [()] * len(bs) if col_axes is None else list(map(tuple,
                                                               col_axes))

  def right(keys, bs):
    """Per group of projections ``b``: ``(e, s, v)``, ``e [B, l, k]`` the
    eigenvectors of ``b b^T`` of the ``k = rank`` largest eigenvalues."""
    axes = [key[-1] for key in keys]
    scales = [_max_abs(b, a) for b, a in zip(bs, axes)]
    bs = [b / sc for b, sc in zip(bs, scales)]
    eig = eigh_all([psum(step_math.gram(step_math.mT(b)), a)
                    for b, a in zip(bs, axes)])
    out = []
    for b, sc, (_, e), (_, _, rank, a) in zip(bs, scales, eig, keys):
      e = e[..., ::-1][..., :rank]  # descending eigenvalues, top rank
      w = jnp.einsum('blk,bln->bkn', e, b, precision=_HI)  # [B, k, n]
      s = jnp.sqrt(psum(jnp.sum(w * w, axis=-1), a))
      v = step_math.mT(w) / jnp.where(s > 0, s, 1.0)[..., None, :]
      out.append((e, s * sc[..., 0], v))
    return out

  sizes = [b.shape[0] for b in bs]
  rights = _batched(right, [(b.shape[1:], b.dtype, rank, a)
                            for b, rank, a in zip(bs, ranks, col_axes)],
                    sizes, bs)
  us = _batched(
      lambda _, qs, es: [jnp.einsum('bml,blk->bmk', q, e, precision=_HI)
                         for q, e in zip(qs, es)],
      [(q.shape[1:], q.dtype, e.shape[-1]) for q, (e, _, _) in zip(qs,
                                                                   rights)],
      sizes, qs, [e for e, _, _ in rights])
  return [rsvd.LowRankFactors(u=u, s=s, v=v)
          for u, (_, s, v) in zip(us, rights)]
