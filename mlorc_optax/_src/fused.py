"""Two-pass MLorc-AdamW step: the dense moments are never materialised.

The reference step (:mod:`mlorc_optax._src.mlorc`) builds the dense moments
``m`` and ``v`` of a matrix, sketches them, projects them and computes the
update from them: several passes over ``m x n`` float32 temporaries, plus a
Householder QR and an SVD (small, but slow on GPUs). This module computes the
same step in two streaming passes over the gradient, with every dense moment
rebuilt on the fly from its factors, block by block:

**Pass 1 (sketch).** For the first moment the sketch is linear,

.. math::

  Y_m = m\\,\\Omega_m = \\beta_1 (U_m S_m)(V_m^\\top \\Omega_m)
  + (1 - \\beta_1)\\, g\\,\\Omega_m ,

so only ``g Omega_m`` streams. The second moment's fix (paper equation 2)
replaces each negative entry of ``r = b2 U_v S_v V_v^T`` by ``b2 zeta``, the
mean magnitude of the negative entries, which is known only after the pass;
but with ``r_- = max(-r, 0)`` the fixed reconstruction is
``r + r_- + b2 zeta 1{r < 0}``, linear in ``zeta``:

.. math::

  Y_v = v\\,\\Omega_v = (U_v S_v)(V_v^\\top \\Omega_v)\\,\\beta_2
  + \\big((1 - \\beta_2)\\, g^2 + r_-\\big)\\,\\Omega_v
  + \\beta_2 \\zeta\\, \\mathbf 1_{\\{r < 0\\}} \\Omega_v ,

so pass 1 accumulates three products, ``g Omega_m``,
``((1 - b2) g^2 + r_-) Omega_v`` and ``1{r < 0} Omega_v``, and the count and
sum of the negative entries.

**Between the passes**, ``Q_m`` and ``Q_v``, orthonormal bases of the ranges
of ``Y_m`` and ``Y_v`` (``l`` columns), come from the ``l x l`` Gram matrix
``Y^T Y = E Lambda E^T`` as ``Q = Y E Lambda^{-1/2}``, twice (the second time
on ``Q`` itself, which makes it orthonormal to float32 rounding, as
CholeskyQR2 does, Fukaya et al. 2014); directions with ``lambda`` below
``l * eps * lambda_max`` are dropped instead of divided by ~0.

**Pass 2 (project and update).** Block by block, ``m`` and ``v`` are rebuilt
from the *previous* factors and the gradient, the update
``m_hat / (sqrt(v_hat + eps_root) + eps)`` is written, and ``B_m = Q_m^T m``
and ``B_v = Q_v^T v`` are accumulated.

**After the passes**, the SVD of each ``B`` (``l x n``) comes from its Gram
matrix: ``B B^T = E Lambda E^T``, ``W = E^T B`` (rows ordered by decreasing
``lambda``), ``s_i = ||W_i||``, ``v_i = W_i / s_i``, ``u = Q E``, keeping the
top ``r``. The reconstruction ``u diag(s) v^T = Q E E^T B`` is the projection
``Q Q^T M`` whatever the accuracy of the small eigenvalues. This is the
randomized SVD of paper Algorithm 3 with the same sketch ``Omega``; only the
small ``l x l`` factorizations differ (Gram-based instead of Householder QR and
SVD), which on an H100 are one batched ``eigh`` instead of the QR and SVD of
long matrices that dominated the reference step (``benchmarks/README.md``).

Two implementations of the passes share this algorithm:

* :func:`sketch_pass` / :func:`project_pass` with ``interpret`` and the
  defaults: Pallas kernels (Triton lowering on NVIDIA GPUs; Pallas interpret
  mode elsewhere, used by the tests) that read the gradient once per pass.
  A grid program owns a block of rows (pass 1) or of columns (pass 2) and
  loops over the other axis inside the kernel, so the accumulations never
  race (grid programs run in parallel on a GPU).
* :func:`sketch_pass_reference` / :func:`project_pass_reference`: the same
  outputs from plain ``jax.numpy`` (dense temporaries), the specification the
  kernels are tested against.

Traffic: the reference step reads and writes several float32 copies of every
moment; the two-pass step reads the gradient twice and writes the update.

References:
  Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
  Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
  Algorithms 1 and 3 and equation (2); Halko, Martinsson & Tropp, *Finding
  structure with randomness*, https://arxiv.org/abs/0909.4061; Fukaya et al.,
  *CholeskyQR2: a simple and communication-avoiding algorithm for computing a
  tall-skinny QR factorization on a large-scale parallel system*, 2014.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mlorc_optax._src import rsvd

_F32 = jnp.float32
# Smallest tile side the Triton dot accepts; factor and sketch widths are
# padded up to a power of two at least this wide.
_MIN_TILE = 16

# Tuning of the GPU kernels, the best of the sweep of
# ``benchmarks/fused_passes.py --sweep`` on an H100 (tiles 32-128, 2-8 warps,
# 2-3 stages; ``benchmarks/README.md``). Module globals, read when a kernel
# is traced.
BLOCK_ROWS = 64
BLOCK_COLS = 64
NUM_WARPS = 4
NUM_STAGES = 3
# Precision of the kernels' dots on a GPU: of the reconstructions
# ``U S V^T`` (which the update uses) and of the accumulated sketch and
# projection products. ``'tf32x3'``: three TF32 tensor-core products per
# dot, float32-level accuracy; ``'tf32'``: one (10-bit mantissa inputs,
# within 3e-3 of the float32 products, and the two passes 19% faster than
# with ``'tf32x3'`` in the H100 sweep); ``'ieee'``: scalar float32 FMAs
# (slowest).
RECONSTRUCT_PRECISION = 'tf32x3'
ACCUMULATE_PRECISION = 'tf32'
_PRECISIONS = {
    'tf32x3': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    'tf32': jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    'ieee': jax.lax.DotAlgorithmPreset.F32_F32_F32,
}


class SketchPassOutputs(NamedTuple):
  """What pass 1 accumulates for a batch of matrices ``[B, m, n]``.

  With ``r = a_v v_v^T`` (``b2 v~``, the previous second moment's
  reconstruction scaled by ``b2``) and ``r_- = max(-r, 0)`` its negative
  part:

  Attributes:
    g_omega: ``g @ omega_m``, ``[B, m, L]``.
    x_omega: ``((1 - b2) g**2 + r_-) @ omega_v``, ``[B, m, L]``.
    neg_omega: ``1{r < 0} @ omega_v``, ``[B, m, L]``.
    neg_count: number of negative entries of ``r`` per row, ``[B, m]``.
    neg_sum: sum of ``r_-`` per row, ``[B, m]``.

  Then ``v @ omega_v = r @ omega_v + x_omega + zeta * neg_omega``, where
  ``r @ omega_v = a_v (v_v^T omega_v)`` is a small product and ``zeta =
  sum(neg_sum) / sum(neg_count)``: the fixed reconstruction is ``r + r_- +
  zeta 1{r < 0}``.
  """

  g_omega: jax.Array
  x_omega: jax.Array
  neg_omega: jax.Array
  neg_count: jax.Array
  neg_sum: jax.Array


class ProjectPassOutputs(NamedTuple):
  """What pass 2 returns for a batch of matrices ``[B, m, n]``.

  Attributes:
    direction: the Adam direction ``[B, m, n]`` in the gradient's dtype.
    b_m: ``Q_m^T m``, ``[B, L, n]``.
    b_v: ``Q_v^T v``, ``[B, L, n]``.
  """

  direction: jax.Array
  b_m: jax.Array
  b_v: jax.Array


def _pow2_at_least(x: int, lo: int) -> int:
  return max(lo, 1 << (max(x, 1) - 1).bit_length())


def _pad_cols(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def tile(dim: int, target: int) -> int | None:
  """Largest power of two ``<= target`` and ``>= 16`` dividing ``dim``.

  None when there is none: the kernels then cannot tile that axis.
  """
  t = target
  while t >= _MIN_TILE:
    if dim % t == 0:
      return t
    t //= 2
  return None


#: Grid programs a pass aims for (an H100 has 132 SMs, each running up to
#: 16 programs of 4 warps); a pass whose grid is smaller splits its inner
#: loop into this many more programs and sums their partial results.
TARGET_PROGRAMS = 2048


def splits(programs: int, loop: int) -> int:
  """How many parts the inner loop of ``loop`` blocks is split into.

  The largest power of two ``<= TARGET_PROGRAMS / programs`` that divides
  ``loop`` (at least 1), so that ``programs * splits`` programs keep the GPU
  busy; each part's partial sums are added afterwards.
  """
  want = max(1, TARGET_PROGRAMS // max(programs, 1))
  k = 1
  while 2 * k <= want and loop % (2 * k) == 0:
    k *= 2
  return k


def kernel_supports(rows: int, cols: int) -> bool:
  """Whether the Pallas passes can tile an ``rows x cols`` matrix."""
  return tile(rows, BLOCK_ROWS) is not None and tile(
      cols, BLOCK_COLS) is not None


def _saturation(rows: int, cols: int) -> float:
  # Entries above this are clipped before sketching and projecting, so that
  # the sums of up to max(m, n) products with |Omega| <~ 6 or |Q| <= 1 stay
  # finite in float32 (an overflowed g**2 would otherwise poison the factors;
  # the update itself still sees the unclipped moment, as in optax.adam).
  return float(np.finfo(np.float32).max / (8.0 * max(rows, cols)))


# ----------------------------------------------------------------------------
# Pass 1: sketch.


def sketch_pass_reference(
    g: jax.Array,
    a_v: jax.Array,
    v_v: jax.Array,
    omega_m: jax.Array,
    omega_v: jax.Array,
    coef: jax.Array,
) -> SketchPassOutputs:
  """Pass 1 in plain ``jax.numpy`` (the specification of the kernel).

  Args:
    g: gradients ``[B, m, n]`` (any float dtype, computed in float32).
    a_v: ``b2 U_v S_v``, ``[B, m, R]`` (the previous second-moment factors;
      the scaled left factor).
    v_v: ``V_v``, ``[B, n, R]``.
    omega_m: first-moment sketch ``[B, n, L]``.
    omega_v: second-moment sketch ``[B, n, L]``.
    coef: ``[B, 8]`` as for :func:`project_pass_reference`; pass 1 reads
      ``1 - b2`` (column 1).

  Returns:
    :class:`SketchPassOutputs`.
  """
  rows, cols = g.shape[-2:]
  bound = _saturation(rows, cols)
  g = jnp.clip(g.astype(_F32), -bound, bound)
  rec = jnp.einsum('bik,bjk->bij', a_v, v_v, precision=_HI)
  neg_part = jnp.maximum(-rec, 0.0)
  x = jnp.minimum(coef[:, 1, None, None] * (g * g), bound) + neg_part
  dot = functools.partial(jnp.einsum, 'bij,bjl->bil', precision=_HI)
  return SketchPassOutputs(
      g_omega=dot(g, omega_m),
      x_omega=dot(x, omega_v),
      neg_omega=dot((rec < 0).astype(_F32), omega_v),
      neg_count=jnp.sum(rec < 0, axis=-1, dtype=_F32),
      neg_sum=jnp.sum(neg_part, axis=-1),
  )


def _sketch_kernel(
    coef_ref, g_ref, av_ref, vv_ref, om_ref, ov_ref,
    go_ref, xo_ref, no_ref, cnt_ref, nsum_ref,
    *, bm, bn, loop_blocks, bound, precisions,
):
  b = pl.program_id(0)
  i = pl.program_id(1)
  part = pl.program_id(2)
  rows = _ds(i * bm, bm)
  a = av_ref[b, rows, :]
  one_b2 = coef_ref[b, 1]
  width = om_ref.shape[-1]
  rec_dot = functools.partial(jnp.dot, precision=precisions[0])
  acc_dot = functools.partial(jnp.dot, precision=precisions[1])

  def body(j, carry):
    acc_g, acc_x, acc_n, cnt, nsum = carry
    cols = _ds(j * bn, bn)
    g = jnp.clip(g_ref[b, rows, cols].astype(_F32), -bound, bound)
    ov = ov_ref[b, cols, :]
    rec = rec_dot(a, vv_ref[b, cols, :].T)
    neg_part = jnp.maximum(-rec, 0.0)
    negf = (rec < 0).astype(_F32)
    acc_g += acc_dot(g, om_ref[b, cols, :])
    acc_x += acc_dot(jnp.minimum(one_b2 * (g * g), bound) + neg_part, ov)
    acc_n += acc_dot(negf, ov)
    cnt += jnp.sum(negf, axis=1)
    nsum += jnp.sum(neg_part, axis=1)
    return acc_g, acc_x, acc_n, cnt, nsum

  zl = jnp.zeros((bm, width), _F32)
  zr = jnp.zeros((bm,), _F32)
  acc_g, acc_x, acc_n, cnt, nsum = jax.lax.fori_loop(
      part * loop_blocks, (part + 1) * loop_blocks, body, (zl, zl, zl, zr, zr)
  )
  go_ref[part, b, rows, :] = acc_g
  xo_ref[part, b, rows, :] = acc_x
  no_ref[part, b, rows, :] = acc_n
  cnt_ref[part, b, rows] = cnt
  nsum_ref[part, b, rows] = nsum


def sketch_pass(
    g: jax.Array,
    a_v: jax.Array,
    v_v: jax.Array,
    omega_m: jax.Array,
    omega_v: jax.Array,
    coef: jax.Array,
    *,
    interpret: bool | None = None,
) -> SketchPassOutputs:
  """Pass 1 as a Pallas kernel; same arguments as :func:`sketch_pass_reference`.

  ``R`` and ``L`` must be powers of two ``>= 16`` and ``m``, ``n`` divisible
  by a power-of-two tile ``>= 16`` (:func:`kernel_supports`). ``interpret``
  (default: not on a GPU) runs the kernel in Pallas' interpreter.
  """
  batch, rows, _ = g.shape
  width = omega_m.shape[-1]

  def out_shape(parts):
    sk = jax.ShapeDtypeStruct((parts, batch, rows, width), _F32)
    row = jax.ShapeDtypeStruct((parts, batch, rows), _F32)
    return (sk, sk, sk, row, row)

  out = _launch(_sketch_kernel, g, over='rows', out_shape=out_shape,
                args=(coef, g, a_v, v_v, omega_m, omega_v),
                interpret=interpret)
  return SketchPassOutputs(*(jnp.sum(x, axis=0) for x in out))


# ----------------------------------------------------------------------------
# Pass 2: project and update.


def project_pass_reference(
    g: jax.Array,
    a_m: jax.Array,
    v_m: jax.Array,
    a_v: jax.Array,
    v_v: jax.Array,
    q_m: jax.Array,
    q_v: jax.Array,
    coef: jax.Array,
) -> ProjectPassOutputs:
  """Pass 2 in plain ``jax.numpy`` (the specification of the kernel).

  Args:
    g: gradients ``[B, m, n]``.
    a_m: ``b1 U_m S_m`` ``[B, m, R]`` (the previous first-moment factors,
      scaled by ``b1``).
    v_m: ``V_m`` ``[B, n, R]``.
    a_v: ``b2 U_v S_v`` ``[B, m, R]``.
    v_v: ``V_v`` ``[B, n, R]``.
    q_m: ``[B, m, L]`` orthonormal basis for the new first moment.
    q_v: ``[B, m, L]`` orthonormal basis for the new second moment.
    coef: ``[B, 8]`` float32 per matrix: ``1 - b1``, ``1 - b2``,
      ``b2 * zeta``, ``k_m``, ``k_g``, ``c_v``, ``eps_root``, ``eps``, where
      the direction is ``(k_m m + k_g g) / (sqrt(c_v v + eps_root) + eps)``.

  Returns:
    :class:`ProjectPassOutputs`: with ``m = a_m v_m^T + (1 - b1) g`` and
    ``v = fix(a_v v_v^T) + (1 - b2) g**2`` (negative entries of the
    reconstruction replaced by ``b2 * zeta``).
  """
  hi = jax.lax.Precision.HIGHEST
  rows, cols = g.shape[-2:]
  bound = _saturation(rows, cols)
  c = [coef[:, k, None, None] for k in range(8)]
  one_b1, one_b2, zeta, k_m, k_g, c_v, eps_root, eps = c
  g = g.astype(_F32)
  rec_m = jnp.einsum('bik,bjk->bij', a_m, v_m, precision=hi)
  rec_v = jnp.einsum('bik,bjk->bij', a_v, v_v, precision=hi)
  m = rec_m + one_b1 * g
  v = jnp.where(rec_v < 0, zeta, rec_v) + one_b2 * (g * g)
  direction = (k_m * m + k_g * g) / (jnp.sqrt(c_v * v + eps_root) + eps)
  proj = functools.partial(jnp.einsum, 'bil,bij->blj', precision=hi)
  return ProjectPassOutputs(
      direction=direction,
      b_m=proj(q_m, jnp.clip(m, -bound, bound)),
      b_v=proj(q_v, jnp.minimum(v, bound)),
  )


def _project_kernel(
    coef_ref, g_ref, am_ref, vm_ref, av_ref, vv_ref, qm_ref, qv_ref,
    d_ref, bm_ref, bv_ref,
    *, bm, bn, loop_blocks, bound, precisions,
):
  b = pl.program_id(0)
  j = pl.program_id(1)
  part = pl.program_id(2)
  cols = _ds(j * bn, bn)
  one_b1, one_b2, zeta, k_m, k_g, c_v, eps_root, eps = (
      coef_ref[b, k] for k in range(8)
  )
  vm_t = vm_ref[b, cols, :].T
  vv_t = vv_ref[b, cols, :].T
  width = qm_ref.shape[-1]
  rec_dot = functools.partial(jnp.dot, precision=precisions[0])
  acc_dot = functools.partial(jnp.dot, precision=precisions[1])

  def body(i, carry):
    acc_m, acc_v = carry
    rows = _ds(i * bm, bm)
    g = g_ref[b, rows, cols].astype(_F32)
    rec_m = rec_dot(am_ref[b, rows, :], vm_t)
    rec_v = rec_dot(av_ref[b, rows, :], vv_t)
    m = rec_m + one_b1 * g
    v = jnp.where(rec_v < 0, zeta, rec_v) + one_b2 * (g * g)
    d = (k_m * m + k_g * g) / (jnp.sqrt(c_v * v + eps_root) + eps)
    d_ref[b, rows, cols] = d.astype(d_ref.dtype)
    acc_m += acc_dot(qm_ref[b, rows, :].T, jnp.clip(m, -bound, bound))
    acc_v += acc_dot(qv_ref[b, rows, :].T, jnp.minimum(v, bound))
    return acc_m, acc_v

  z = jnp.zeros((width, bn), _F32)
  acc_m, acc_v = jax.lax.fori_loop(
      part * loop_blocks, (part + 1) * loop_blocks, body, (z, z))
  bm_ref[part, b, :, cols] = acc_m
  bv_ref[part, b, :, cols] = acc_v


def project_pass(
    g: jax.Array,
    a_m: jax.Array,
    v_m: jax.Array,
    a_v: jax.Array,
    v_v: jax.Array,
    q_m: jax.Array,
    q_v: jax.Array,
    coef: jax.Array,
    *,
    interpret: bool | None = None,
) -> ProjectPassOutputs:
  """Pass 2 as a Pallas kernel; same arguments as :func:`project_pass_reference`.

  Constraints and ``interpret`` as for :func:`sketch_pass`.
  """
  batch, _, cols = g.shape
  width = q_m.shape[-1]

  def out_shape(parts):
    proj = jax.ShapeDtypeStruct((parts, batch, width, cols), _F32)
    return (jax.ShapeDtypeStruct(g.shape, g.dtype), proj, proj)

  direction, b_m, b_v = _launch(
      _project_kernel, g, over='cols', out_shape=out_shape,
      args=(coef, g, a_m, v_m, a_v, v_v, q_m, q_v), interpret=interpret)
  return ProjectPassOutputs(direction, jnp.sum(b_m, axis=0),
                            jnp.sum(b_v, axis=0))


# ----------------------------------------------------------------------------
# Small factorizations from Gram matrices, batched over every leaf.


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


_HI = jax.lax.Precision.HIGHEST


def _gram(x: jax.Array) -> jax.Array:
  """``x^T x``, ``[B, l, l]`` for ``x [B, m, l]``."""
  return jnp.einsum('bik,bil->bkl', x, x, precision=_HI)


def _max_abs(x: jax.Array) -> jax.Array:
  scale = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def _eigh_all(mats: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
  """``eigh`` of every ``[B_i, l, l]`` batch in one call per size ``l``.

  On a GPU each ``eigh`` is a solver call with a fixed cost of its own; one
  call for all the leaves of a step instead of one per leaf and moment.
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


def orthonormal_bases(ys: Sequence[jax.Array]) -> list[jax.Array]:
  """Orthonormal bases ``[B, m, l]`` of the ranges of each ``y [B, m, l]``.

  Gram-based, twice (see the module docstring): with ``y^T y = E Lambda
  E^T``, ``q = y E Lambda^{-1/2}``, then the same on ``q``. Directions whose
  eigenvalue is below ``l * eps * lambda_max`` (numerically outside the
  range) give zero columns, so a zero or rank-deficient ``y`` gives no NaN.
  All ``eigh`` calls of one round are batched (:func:`_eigh_all`).
  """
  qs = [y / _max_abs(y) for y in ys]
  for _ in range(2):
    eig = _eigh_all([_gram(q) for q in qs])
    new = []
    for q, (lam, e) in zip(qs, eig):
      floor = q.shape[-1] * np.finfo(np.float32).eps * lam[..., -1:]
      keep = lam > jnp.maximum(floor, np.finfo(np.float32).tiny)
      inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
      new.append(jnp.einsum('bml,blk->bmk', q, e * inv[:, None, :],
                            precision=_HI))
    qs = new
  return qs


def orthonormal_basis(y: jax.Array) -> jax.Array:
  """:func:`orthonormal_bases` of one ``[..., m, l]`` array."""
  *batch, m, l = y.shape
  q = orthonormal_bases([jnp.reshape(y, (-1, m, l))])[0]
  return jnp.reshape(q, y.shape)


def svds_of_projections(
    qs: Sequence[jax.Array], bs: Sequence[jax.Array], ranks: Sequence[int]
) -> list[rsvd.LowRankFactors]:
  """Top-``rank`` SVDs of ``q @ b`` for orthonormal ``q [B, m, l]``, ``b
  [B, l, n]``, from the Gram matrices ``b b^T`` (module docstring), with one
  batched ``eigh`` for all of them."""
  scales = [_max_abs(b) for b in bs]
  bs = [b / sc for b, sc in zip(bs, scales)]
  eig = _eigh_all([_gram(_mT(b)) for b in bs])
  out = []
  for q, b, sc, (_, e), rank in zip(qs, bs, scales, eig, ranks):
    e = e[..., ::-1][..., :rank]  # descending eigenvalues, top rank
    w = jnp.einsum('blk,bln->bkn', e, b, precision=_HI)  # [B, k, n]
    s = jnp.sqrt(jnp.sum(w * w, axis=-1))
    v = _mT(w) / jnp.where(s > 0, s, 1.0)[..., None, :]
    u = jnp.einsum('bml,blk->bmk', q, e, precision=_HI)
    out.append(rsvd.LowRankFactors(u=u, s=s * sc[..., 0], v=v))
  return out


# ----------------------------------------------------------------------------
# The step of all two-pass leaves.


class AdamCoefficients(NamedTuple):
  """Scalars of one Adam step (float32 scalars or traced values).

  ``direction = (k_m m + k_g g) / (sqrt(c_v v + eps_root) + eps)``: Adam's
  bias corrections (``k_m = 1 / (1 - b1^t)``, ``k_g = 0``,
  ``c_v = 1 / (1 - b2^t)``), or Nadam's (``k_m = b1 / (1 - b1^(t+1))``,
  ``k_g = (1 - b1) / (1 - b1^t)``).
  """

  b1: Any
  b2: Any
  k_m: Any
  k_g: Any
  c_v: Any
  eps: Any
  eps_root: Any


class LeafInputs(NamedTuple):
  """One batch of matrices for :func:`adam_step`.

  Attributes:
    g: gradients ``[B, m, n]`` (the update comes back in this dtype).
    mu: previous first-moment factors ``(u [B, m, k], s [B, k], v [B, n,
      k])``, any float dtype.
    nu: previous second-moment factors.
    omega_m: this step's first-moment sketch ``[B, n, l]`` (``k <= l``).
    omega_v: this step's second-moment sketch ``[B, n, l]``.
    use_kernel: the Pallas passes (else the ``jax.numpy`` references).
  """

  g: jax.Array
  mu: rsvd.LowRankFactors
  nu: rsvd.LowRankFactors
  omega_m: jax.Array
  omega_v: jax.Array
  use_kernel: bool


def adam_step(
    leaves: Sequence[LeafInputs],
    coefficients: AdamCoefficients,
    *,
    interpret: bool | None = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors, rsvd.LowRankFactors]]:
  """One MLorc-AdamW step of several batches of matrices in two passes.

  Pass 1 for every leaf, then all the ``Q`` factorizations together, then
  pass 2 for every leaf, then all the small SVDs together (module
  docstring).

  Args:
    leaves: :class:`LeafInputs`, one per compressed leaf.
    coefficients: :class:`AdamCoefficients` shared by all leaves.
    interpret: Pallas interpret mode (default: when not on a GPU).

  Returns:
    Per leaf ``(direction [B, m, n], new mu factors, new nu factors)``,
    factors in float32 with ``k`` columns: the randomized SVD (with sketches
    ``omega_m``, ``omega_v``) of the uncompressed new moments.
  """
  c = coefficients
  f32 = lambda x: jnp.asarray(x, _F32)
  # 1 - b computed before any cast (in float64 for Python floats), as the
  # reference step does: 1 - float32(0.999) is off by 5e-5 relative.
  b1, b2, one_b1, one_b2 = f32(c.b1), f32(c.b2), f32(1 - c.b1), f32(1 - c.b2)
  firsts, ys = [], []
  for leaf in leaves:
    rank = leaf.mu.s.shape[-1]
    l_pad = _pow2_at_least(leaf.omega_m.shape[-1], _MIN_TILE)
    r_pad = _pow2_at_least(rank, _MIN_TILE)
    um, sm, vm = map(f32, leaf.mu)
    uv, sv, vv = map(f32, leaf.nu)
    om = _pad_cols(f32(leaf.omega_m), l_pad)
    ov = _pad_cols(f32(leaf.omega_v), l_pad)
    a_m = _pad_cols(b1 * um * sm[:, None, :], r_pad)
    a_v = _pad_cols(b2 * uv * sv[:, None, :], r_pad)
    vm, vv = _pad_cols(vm, r_pad), _pad_cols(vv, r_pad)
    batch = leaf.g.shape[0]
    coef = jnp.stack([jnp.broadcast_to(f32(x), (batch,)) for x in (
        one_b1, one_b2, 0.0, c.k_m, c.k_g, c.c_v, c.eps_root, c.eps)], -1)
    if leaf.use_kernel:
      p1 = sketch_pass(leaf.g, a_v, vv, om, ov, coef, interpret=interpret)
    else:
      p1 = sketch_pass_reference(leaf.g, a_v, vv, om, ov, coef)
    # a_v carries b2, so pass 1 saw b2 * v~ and this is b2 * zeta.
    count = jnp.sum(p1.neg_count, axis=-1)
    zeta = jnp.sum(p1.neg_sum, axis=-1) / jnp.maximum(count, 1.0)
    prev_m = jnp.einsum('bmk,bnk,bnl->bml', a_m, vm, om, precision=_HI)
    prev_v = jnp.einsum('bmk,bnk,bnl->bml', a_v, vv, ov, precision=_HI)
    l = leaf.omega_m.shape[-1]
    ys.append((prev_m + one_b1 * p1.g_omega)[..., :l])
    ys.append((prev_v + p1.x_omega
               + zeta[:, None, None] * p1.neg_omega)[..., :l])
    firsts.append((a_m, vm, a_v, vv, coef.at[:, 2].set(zeta), l_pad))
  qs = orthonormal_bases(ys)

  outs, bs = [], []
  for i, (leaf, (a_m, vm, a_v, vv, coef, l_pad)) in enumerate(
      zip(leaves, firsts)):
    q_m, q_v = (_pad_cols(q, l_pad) for q in qs[2 * i:2 * i + 2])
    if leaf.use_kernel:
      p2 = project_pass(leaf.g, a_m, vm, a_v, vv, q_m, q_v, coef,
                        interpret=interpret)
    else:
      p2 = project_pass_reference(leaf.g, a_m, vm, a_v, vv, q_m, q_v, coef)
    l = leaf.omega_m.shape[-1]
    bs += [p2.b_m[:, :l], p2.b_v[:, :l]]
    outs.append(p2.direction.astype(leaf.g.dtype))
  ranks = [leaf.mu.s.shape[-1] for leaf in leaves for _ in range(2)]
  factors = svds_of_projections(qs, bs, ranks)
  return [(d, factors[2 * i], factors[2 * i + 1])
          for i, d in enumerate(outs)]


def adam_leaf_step(
    g: jax.Array,
    mu: rsvd.LowRankFactors,
    nu: rsvd.LowRankFactors,
    omega_m: jax.Array,
    omega_v: jax.Array,
    coefficients: AdamCoefficients,
    *,
    use_kernel: bool,
    interpret: bool | None = None,
) -> tuple[jax.Array, rsvd.LowRankFactors, rsvd.LowRankFactors]:
  """:func:`adam_step` of one leaf (arguments as :class:`LeafInputs`)."""
  leaf = LeafInputs(g, mu, nu, omega_m, omega_v, use_kernel)
  return adam_step([leaf], coefficients, interpret=interpret)[0]


# ----------------------------------------------------------------------------
# MLorc-Lion: one compressed moment, the same two passes.


def lion_sketch_pass_reference(g: jax.Array, omega: jax.Array) -> jax.Array:
  """Lion's pass 1 in ``jax.numpy``: ``clip(g) @ omega``, ``[B, m, L]``.

  Lion's new momentum ``m = b2 U S V^T + (1 - b2) g`` is linear in ``g``, so
  its sketch needs only ``g @ omega`` (the factors' part is a small product).
  """
  rows, cols = g.shape[-2:]
  bound = _saturation(rows, cols)
  g = jnp.clip(g.astype(_F32), -bound, bound)
  return jnp.einsum('bij,bjl->bil', g, omega, precision=_HI)


def _lion_sketch_kernel(g_ref, om_ref, go_ref, *, bm, bn, loop_blocks, bound,
                        precisions):
  b, i, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = _ds(i * bm, bm)
  acc_dot = functools.partial(jnp.dot, precision=precisions[1])

  def body(j, acc):
    cols = _ds(j * bn, bn)
    g = jnp.clip(g_ref[b, rows, cols].astype(_F32), -bound, bound)
    return acc + acc_dot(g, om_ref[b, cols, :])

  acc = jax.lax.fori_loop(part * loop_blocks, (part + 1) * loop_blocks, body,
                          jnp.zeros((bm, om_ref.shape[-1]), _F32))
  go_ref[part, b, rows, :] = acc


def lion_sketch_pass(
    g: jax.Array, omega: jax.Array, *, interpret: bool | None = None
) -> jax.Array:
  """:func:`lion_sketch_pass_reference` as a Pallas kernel (as
  :func:`sketch_pass`)."""
  batch, rows, _ = g.shape
  out = _launch(
      _lion_sketch_kernel, g, over='rows',
      out_shape=lambda parts: jax.ShapeDtypeStruct(
          (parts, batch, rows, omega.shape[-1]), _F32),
      args=(g, omega), interpret=interpret)
  return jnp.sum(out, axis=0)


def lion_project_pass_reference(
    g: jax.Array, a: jax.Array, v: jax.Array, q: jax.Array, coef: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Lion's pass 2 in ``jax.numpy``.

  Args:
    g: gradients ``[B, m, n]``.
    a: ``U S`` ``[B, m, R]`` (previous factors, unscaled).
    v: ``V`` ``[B, n, R]``.
    q: ``[B, m, L]`` orthonormal basis for the new momentum.
    coef: ``[B, 2]``: ``b1``, ``1 - b1``.

  Returns:
    ``(sign(b1 a v^T + (1 - b1) g)`` in ``g``'s dtype, ``q^T clip(g)``
    ``[B, L, n])``.
  """
  rows, cols = g.shape[-2:]
  bound = _saturation(rows, cols)
  g = g.astype(_F32) if g.dtype != _F32 else g
  rec = jnp.einsum('bik,bjk->bij', a, v, precision=_HI)
  c = coef[:, 0, None, None] * rec + coef[:, 1, None, None] * g
  qg = jnp.einsum('bil,bij->blj', q, jnp.clip(g, -bound, bound),
                  precision=_HI)
  return jnp.sign(c), qg


def _lion_project_kernel(coef_ref, g_ref, a_ref, v_ref, q_ref, d_ref, qg_ref,
                         *, bm, bn, loop_blocks, bound, precisions):
  b, j, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = _ds(j * bn, bn)
  b1, one_b1 = coef_ref[b, 0], coef_ref[b, 1]
  v_t = v_ref[b, cols, :].T
  rec_dot = functools.partial(jnp.dot, precision=precisions[0])
  acc_dot = functools.partial(jnp.dot, precision=precisions[1])

  def body(i, acc):
    rows = _ds(i * bm, bm)
    g = g_ref[b, rows, cols].astype(_F32)
    c = b1 * rec_dot(a_ref[b, rows, :], v_t) + one_b1 * g
    d_ref[b, rows, cols] = jnp.sign(c).astype(d_ref.dtype)
    return acc + acc_dot(q_ref[b, rows, :].T, jnp.clip(g, -bound, bound))

  acc = jax.lax.fori_loop(part * loop_blocks, (part + 1) * loop_blocks, body,
                          jnp.zeros((q_ref.shape[-1], bn), _F32))
  qg_ref[part, b, :, cols] = acc


def lion_project_pass(
    g: jax.Array, a: jax.Array, v: jax.Array, q: jax.Array, coef: jax.Array,
    *, interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`lion_project_pass_reference` as a Pallas kernel (as
  :func:`project_pass`)."""
  batch, _, cols = g.shape

  def out_shape(parts):
    return (jax.ShapeDtypeStruct(g.shape, g.dtype),
            jax.ShapeDtypeStruct((parts, batch, q.shape[-1], cols), _F32))

  direction, qg = _launch(_lion_project_kernel, g, over='cols',
                          out_shape=out_shape, args=(coef, g, a, v, q),
                          interpret=interpret)
  return direction, jnp.sum(qg, axis=0)


class LionLeafInputs(NamedTuple):
  """One batch of matrices for :func:`lion_step`.

  Attributes:
    g: gradients ``[B, m, n]`` (the update comes back in this dtype).
    mu: previous momentum factors ``(u [B, m, k], s [B, k], v [B, n, k])``.
    omega: this step's sketch ``[B, n, l]`` (``k <= l``).
    use_kernel: the Pallas passes (else the ``jax.numpy`` references).
  """

  g: jax.Array
  mu: rsvd.LowRankFactors
  omega: jax.Array
  use_kernel: bool


def lion_step(
    leaves: Sequence[LionLeafInputs],
    b1: Any,
    b2: Any,
    *,
    interpret: bool | None = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors]]:
  """One MLorc-Lion step (paper Algorithm 2) of several leaves in two passes.

  With ``m~ = U S V^T`` the previous momentum: the update is
  ``sign(b1 m~ + (1 - b1) g)`` and the new momentum ``m = b2 m~ + (1 - b2) g``
  is compressed by the randomized SVD with sketch ``omega``. Both ``m Omega``
  and ``Q^T m`` are linear in ``g``: pass 1 streams ``g Omega``, pass 2
  writes the update (rebuilding ``m~`` tile by tile) and accumulates
  ``Q^T g``; the factors' parts are small products. ``Q`` and the small SVDs
  as in :func:`adam_step`.

  Returns:
    Per leaf ``(update [B, m, n], new factors)``.
  """
  f32 = lambda x: jnp.asarray(x, _F32)
  b1_, b2_, one_b1, one_b2 = f32(b1), f32(b2), f32(1 - b1), f32(1 - b2)
  firsts, ys = [], []
  for leaf in leaves:
    l = leaf.omega.shape[-1]
    l_pad = _pow2_at_least(l, _MIN_TILE)
    r_pad = _pow2_at_least(leaf.mu.s.shape[-1], _MIN_TILE)
    u, s_, v = map(f32, leaf.mu)
    a = _pad_cols(u * s_[:, None, :], r_pad)
    v = _pad_cols(v, r_pad)
    om = _pad_cols(f32(leaf.omega), l_pad)
    if leaf.use_kernel:
      g_omega = lion_sketch_pass(leaf.g, om, interpret=interpret)
    else:
      g_omega = lion_sketch_pass_reference(leaf.g, om)
    prev = jnp.einsum('bmk,bnk,bnl->bml', a, v, om, precision=_HI)
    ys.append((b2_ * prev + one_b2 * g_omega)[..., :l])
    firsts.append((a, v, l_pad))
  qs = orthonormal_bases(ys)
  outs, bs = [], []
  for leaf, q, (a, v, l_pad) in zip(leaves, qs, firsts):
    batch = leaf.g.shape[0]
    coef = jnp.stack([jnp.broadcast_to(x, (batch,)) for x in (b1_, one_b1)],
                     -1)
    q_pad = _pad_cols(q, l_pad)
    if leaf.use_kernel:
      d, qg = lion_project_pass(leaf.g, a, v, q_pad, coef,
                                interpret=interpret)
    else:
      d, qg = lion_project_pass_reference(leaf.g, a, v, q_pad, coef)
    l = leaf.omega.shape[-1]
    qa = jnp.einsum('bml,bmk->blk', q, a, precision=_HI)
    bs.append(b2_ * jnp.einsum('blk,bnk->bln', qa, v, precision=_HI)
              + one_b2 * qg[:, :l])
    outs.append(d.astype(leaf.g.dtype))
  factors = svds_of_projections(qs, bs, [leaf.mu.s.shape[-1]
                                         for leaf in leaves])
  return list(zip(outs, factors))


# ----------------------------------------------------------------------------
# Which implementation runs.

IMPLEMENTATIONS = ('reference', 'xla', 'pallas')


def two_pass_blocker(
    *, compressor: Any, compress: tuple[str, ...], atan2: bool
) -> str | None:
  """Why the two-pass step cannot compute these settings, or None if it can.

  It computes the paper's RSVD compressor (and subclasses that change only
  the sketch, such as ``'warm'``) without power iterations, both moments
  compressed, and Adam's (or Nadam's) update.
  """
  from mlorc_optax._src import compressors  # pylint: disable=g-import-not-at-top
  rsvd_type = compressors.RSVDCompressor
  if not isinstance(compressor, rsvd_type) or any(
      getattr(type(compressor), f) is not getattr(rsvd_type, f)
      for f in ('read', 'update', 'specs')
  ):
    return f'compressor {compressor.name!r} is not a randomized SVD'
  if compressor.power_iters:
    return 'power_iters > 0'
  if set(compress) != {'mu', 'nu'}:
    return f'compress={compress!r} keeps a dense moment'
  if atan2:
    return 'atan2=True'
  return None


def check_implementation(
    implementation: str | None, *, blocker: str | None
) -> str | None:
  """Validates ``implementation=`` (None: automatic); raises naming it."""
  if implementation is None:
    return None
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'implementation must be None or one of {IMPLEMENTATIONS}, got '
        f'{implementation!r}.'
    )
  if implementation != 'reference' and blocker is not None:
    raise ValueError(
        f'implementation={implementation!r} (the two-pass step) cannot run '
        f'with {blocker}; use implementation=None or \'reference\'.'
    )
  return implementation


def leaf_implementation(
    implementation: str | None,
    *,
    blocker: str | None,
    rows: int,
    cols: int,
    sketched: bool,
) -> str:
  """The implementation one compressed leaf gets.

  ``implementation=None`` (automatic) picks ``'pallas'`` on a single NVIDIA
  GPU when the settings allow the two-pass step, and ``'reference'``
  otherwise (CPU, TPU, several devices: a Pallas call has no sharding rule,
  so under ``NamedSharding`` XLA would gather its operands). ``'pallas'``
  falls back to ``'xla'`` (the same two passes in ``jax.numpy``) for a matrix
  the kernels cannot tile (:func:`kernel_supports`), and every two-pass
  choice falls back to ``'reference'`` where the sketch is the identity
  (``rank + oversample >= cols``, where the RSVD is exact).
  """
  if implementation is None:
    automatic = blocker is None and on_gpu() and jax.device_count() == 1
    implementation = 'pallas' if automatic else 'reference'
  if implementation == 'reference' or not sketched:
    return 'reference'
  if implementation == 'pallas' and not kernel_supports(rows, cols):
    return 'xla'
  return implementation


# ----------------------------------------------------------------------------
# Pallas plumbing.


def on_gpu() -> bool:
  """Whether the default backend is an NVIDIA GPU (where the kernels ran).

  The kernels were written and measured for NVIDIA GPUs (Triton, TF32
  tensor cores); other GPUs get the reference step automatically.
  """
  if jax.default_backend() != 'gpu':
    return False
  return 'nvidia' in jax.devices()[0].device_kind.lower()


def _mode(interpret: bool | None) -> tuple[bool, tuple[Any, Any]]:
  if interpret is None:
    interpret = not on_gpu()
  if interpret:
    hi = jax.lax.Precision.HIGHEST
    return True, (hi, hi)
  return False, (_PRECISIONS[RECONSTRUCT_PRECISION],
                 _PRECISIONS[ACCUMULATE_PRECISION])


def _launch(kernel, g, *, over, out_shape, args, interpret):
  """Runs a pass's ``kernel`` over ``g [B, m, n]`` and returns its outputs.

  One program per batch entry and block of rows (``over='rows'``, looping
  over the column blocks) or of columns (``over='cols'``, looping over the
  row blocks), the loop split into ``parts`` programs (:func:`splits`), each
  writing its partial sums at index ``part`` of a leading axis of size
  ``parts`` (``out_shape(parts)`` gives the output shapes). The kernel gets
  ``bm``, ``bn``, ``loop_blocks`` (per part), ``bound`` and ``precisions``.
  """
  batch, rows, cols = g.shape
  bm, bn = tile(rows, BLOCK_ROWS), tile(cols, BLOCK_COLS)
  interpret, precisions = _mode(interpret)
  blocks, loop = ((rows // bm, cols // bn) if over == 'rows'
                  else (cols // bn, rows // bm))
  parts = splits(batch * blocks, loop)
  kernel = functools.partial(
      kernel, bm=bm, bn=bn, loop_blocks=loop // parts,
      bound=_saturation(rows, cols), precisions=precisions)
  return _pallas_call(kernel, out_shape=out_shape(parts),
                      grid=(batch, blocks, parts), interpret=interpret)(*args)


def _ds(start, size):
  return pl.ds(pl.multiple_of(start, size), size)


def _pallas_call(kernel, *, out_shape, grid, interpret):
  # Triton's compiler parameters select the Triton lowering (not Mosaic GPU).
  params = None if interpret else plt.CompilerParams(
      num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret,
      compiler_params=params,
  )
