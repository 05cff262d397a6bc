"""Two-pass MLorc steps: the dense moments are never materialised.

The reference step (:mod:`mlorc_optax._src.low_rank`) builds the dense
moments ``m`` and ``v`` of a matrix, sketches them, projects them and
computes the update from them: several passes over ``m x n`` float32
temporaries, plus a Householder QR and an SVD (small, but slow on GPUs).
This module computes the same step in two streaming passes over the
gradient, with every dense moment rebuilt on the fly from its factors, block
by block (:mod:`mlorc_optax._src.kernels`):

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
``l * eps * lambda_max`` are dropped instead of divided by ~0
(:func:`~mlorc_optax._src.kernels.gram.orthonormal_bases`).

**Pass 2 (project and update).** Block by block, ``m`` and ``v`` are rebuilt
from the *previous* factors and the gradient, the update
``m_hat / (sqrt(v_hat + eps_root) + eps)`` is written, and ``B_m = Q_m^T m``
and ``B_v = Q_v^T v`` are accumulated. With the first moment's complement
the step reads ``g`` once more for ``U_m^T g`` and ``Q_m^T g``, and since
``m`` is linear in ``g``, ``B_m = b1 (Q_m^T U_m) S_m V_m^T + (1 - b1)
Q_m^T g`` comes from those: pass 2 then accumulates ``B_v`` only.

**After the passes**, the SVD of each ``B`` (``l x n``) comes from its Gram
matrix: ``B B^T = E Lambda E^T``, ``W = E^T B`` (rows ordered by decreasing
``lambda``), ``s_i = ||W_i||``, ``v_i = W_i / s_i``, ``u = Q E``, keeping the
top ``r`` (:func:`~mlorc_optax._src.kernels.gram.svds_of_projections`). The
reconstruction ``u diag(s) v^T = Q E E^T B`` is the projection ``Q Q^T M``
whatever the accuracy of the small eigenvalues. This is the randomized SVD
of paper Algorithm 3 with the same sketch ``Omega``; only the small
``l x l`` factorizations differ (Gram-based instead of Householder QR and
SVD), which on an H100 are one batched ``eigh`` instead of the QR and SVD of
long matrices that dominated the reference step (``benchmarks/README.md``).

**MLorc-Lion** (paper Algorithm 2) has one compressed moment,
``m = b2 U S V^T + (1 - b2) g``, linear in ``g``: pass 1 streams
``g Omega``, pass 2 writes the update ``sign(b1 U S V^T + (1 - b1) g)`` and
accumulates ``Q^T g``; the factors' parts are small products.

**On several devices** (inside ``jax.shard_map``, :class:`MatrixAxes`) each
device holds a block of rows and of columns of every matrix: its block of
``g``, of ``U`` (rows), of ``V`` and ``Omega`` (columns), and streams only
that block. Every quantity the step needs whole is rank-sized and a sum over
the split axis, so it is completed with a ``psum`` across the devices that
split it: the sketches ``g Omega`` (and ``V^T Omega``) and pass 1's counts
over the columns, the ``l x l`` Gram matrices of ``Q`` and the projections
``Q^T m`` (and ``U^T g``, ``Q^T g``, ``Q^T U``) over the rows, the Gram
matrices of the projections and ``s`` over the columns. Each device then
writes its own block of the update and of the new ``u`` and ``v``; no
dense matrix crosses devices, and the result is the single-device step's
(the same sketches, sums in another order).

Every leaf says whether its passes run as the Pallas kernels
(``use_kernel=True``: Triton on an NVIDIA GPU, or Pallas' interpreter with
``interpret=True``), which read the gradient once per pass, or as their
``jax.numpy`` references (dense temporaries). Both take any shape: a
matrix whose sides no power-of-two tile divides goes to the kernels
zero-padded to whole tiles, which changes none of its results
(:meth:`AdamLeafInputs.padded`) and costs a copy of its gradient and of its
update. Which one a leaf
gets, and whether the two-pass step runs at all, is decided by the caller:
this module only orchestrates. Traffic: the reference step reads and writes
several float32 copies of every moment; the two-pass step reads the gradient
twice and writes the update. The leaves' passes run one leaf after the
other, each waiting for the previous leaf's reduced outputs
(:func:`_after`), so that one leaf's partial sums are live at a time.

References:
  Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
  Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
  Algorithms 1-3 and equation (2); Halko, Martinsson & Tropp, *Finding
  structure with randomness*, https://arxiv.org/abs/0909.4061; Fukaya et al.,
  *CholeskyQR2: a simple and communication-avoiding algorithm for computing a
  tall-skinny QR factorization on a large-scale parallel system*, 2014.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math
from mlorc_optax._src.kernels import adam
from mlorc_optax._src.kernels import gram
from mlorc_optax._src.kernels import lion
from mlorc_optax._src.kernels.launch import KernelConfig
from mlorc_optax._src.kernels.launch import dot_precisions
from mlorc_optax._src.kernels.launch import kernel_widths
from mlorc_optax._src.kernels.launch import pad_cols
from mlorc_optax._src.kernels.launch import sketch_operand
from mlorc_optax._src.kernels.launch import tiled_size

_F32 = jnp.float32
_HI = step_math.HIGHEST


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, _F32)


def _pass(
    use_kernel: bool,
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    config: KernelConfig,
    interpret: bool,
) -> Callable[..., Any]:
  """The kernel (with its static settings) or its ``jax.numpy`` reference."""
  if use_kernel:
    return functools.partial(kernel, config=config, interpret=interpret)
  return reference


def _sketch(leaf: Any, omega: jax.Array, config: KernelConfig,
            interpret: bool) -> jax.Array:
  """A leaf's sketch in float32, as its pass 1 multiplies by it (rounded
  for a compiled kernel's bfloat16 sketches, :func:`sketch_operand`)."""
  omega = _f32(omega)
  return sketch_operand(omega, config, interpret) if leaf.use_kernel else omega


def _gradient_products(leaf: Any, config: KernelConfig,
                       interpret: bool) -> Any:
  """The precision of the complement's products of the gradient with
  rank-sized bases (``U^T g``, ``Q^T g``), a read of ``g`` outside the
  passes: ``KernelConfig.project_precision`` for a leaf on the kernels (they
  are projections of ``g`` as pass 2's are; float32 ones run on the CUDA
  cores: with them the complement took 8.6 of the 37.6 ms of the rank-32
  float32 LLaMA-7B step on an H200, ``benchmarks/README.md``), ``HIGHEST``
  for one on the references."""
  if not leaf.use_kernel:
    return _HI
  return dot_precisions(config, interpret, 'mlorc_adam_project').projections


def _padded_factors(
    factors: rsvd.LowRankFactors, scale: Any, width: int
) -> tuple[jax.Array, jax.Array]:
  """``(scale U S, V)`` in float32, zero-padded to ``width`` columns."""
  u, s, v = map(_f32, factors)
  return (pad_cols(scale * u * s[..., None, :], width), pad_cols(v, width))


def _credited(factors: rsvd.LowRankFactors, p: jax.Array,
              alpha: Any) -> rsvd.LowRankFactors:
  """Factors of ``U S V^T - alpha U P`` for ``P = U^T g`` ``[B, k, n]``.

  The previous moment with its complement credited is
  ``m~ + alpha (I - U U^T) g = U (S V^T - alpha P) + alpha g``: these factors
  are its low-rank part, and the pass adds ``alpha g`` through the
  gradient's coefficient (``MomentSpec.complement``).
  """
  u, s, v = map(_f32, factors)
  return rsvd.LowRankFactors(
      u, jnp.ones_like(s), v * s[..., None, :] - alpha * step_math.mT(p))


def _zero_padded(x: jax.Array, rows: int, cols: int | None) -> jax.Array:
  """``x [..., a, b]`` with zero rows up to ``rows`` (and zero columns up to
  ``cols``, unless None)."""
  a, b = x.shape[-2:]
  widths = [(0, rows - a), (0, 0 if cols is None else cols - b)]
  return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + widths)


def _padded_rows(factors: rsvd.LowRankFactors, rows: int,
                 cols: int) -> rsvd.LowRankFactors:
  """Factors of ``[..., rows, cols]`` matrices: zero rows of ``u`` and ``v``
  (the factorization of the zero-padded matrix)."""
  return factors._replace(u=_zero_padded(factors.u, rows, None),
                          v=_zero_padded(factors.v, cols, None))


def _cropped(result: tuple[Any, ...], rows: int, cols: int) -> tuple[Any, ...]:
  """A padded step's ``(direction, factors, ...)`` cut back to ``rows x
  cols`` matrices."""
  direction, *factors = result
  return (direction[..., :rows, :cols],
          *(f._replace(u=f.u[..., :rows, :], v=f.v[..., :cols, :])
            for f in factors))


def _after(x: Any, done: Any) -> Any:
  """``x`` (a pytree), to be used only once ``done`` (a pytree, or None) is
  computed.

  The passes of the leaves run one after the other on a GPU anyway, but
  XLA may schedule every leaf's pass before any of the small reductions of
  their outputs (the kernels' per-part partial sums, ``[parts, B, m, l]``),
  and every leaf's pass-1 inputs (its factors and sketches padded to the
  kernels' widths) before any pass, which keeps all of them live at once:
  at rank 32 that took the compiled temporaries of the bfloat16 LLaMA-7B
  step to 0.34-0.36x the parameter bytes (0.30x with this;
  ``benchmarks/README.md``). Each leaf's gradient (and in pass 1 the
  factors and sketches its inputs are made from) goes through an
  optimization barrier with the previous leaf's pass outputs, reduced over
  the parts and cut to the sketch width, so only one leaf's partial sums
  are live at a time. In pass 2 only the gradient goes through: with the
  bases and factors too, XLA kept a second leaf's update live beside the
  largest (MLorc-Lion, 0.32x instead of 0.23x). It waits for this device's
  sums only, not for their ``psum`` across devices, which may still overlap
  the next pass. The barrier computes nothing.
  """
  if done is None:
    return x
  return jax.lax.optimization_barrier((done, x))[1]


def _sketch_of(a: jax.Array, v_omega: jax.Array) -> jax.Array:
  """``a (v^T omega)`` ``[B, m, l]``: a factored matrix's sketch, cheaply."""
  return jnp.einsum('bmk,bkl->bml', a, v_omega, precision=_HI)


def _projection_of(q_a: jax.Array, v: jax.Array, decay: Any,
                   one_minus_decay: Any, q_g: jax.Array) -> jax.Array:
  """``Q^T m`` ``[B, l, n]`` of the moment ``m = decay a v^T + (1 - decay)
  g``, linear in ``g``, from ``q_a = Q^T a`` ``[B, l, k]`` and ``q_g = Q^T
  g``: a small product instead of a projection of ``m`` in pass 2."""
  return (decay * jnp.einsum('blk,bnk->bln', q_a, v, precision=_HI)
          + one_minus_decay * q_g)


def _small(v: jax.Array, omega: jax.Array) -> jax.Array:
  """``v^T omega`` ``[B, k, l]`` (a sum over this device's columns)."""
  return step_math.inner(v, omega)


class MatrixAxes(NamedTuple):
  """The mesh axes a leaf's matrices are split over, inside ``shard_map``.

  Each device holds the block of rows and of columns of every matrix that
  its place on these mesh axes selects (the batch may be split too: no sum
  runs over it). Sums over the rows (columns) are this device's partial
  sums, completed by a ``psum`` over ``rows`` (``cols``) (module
  docstring). Empty (the default): not split, no collective.

  Attributes:
    rows: mesh axes that split the rows.
    cols: mesh axes that split the columns.
  """

  rows: tuple[str, ...] = ()
  cols: tuple[str, ...] = ()


# ----------------------------------------------------------------------------
# MLorc-AdamW (paper Algorithm 1).


class AdamLeafInputs(NamedTuple):
  """One batch of matrices for :func:`adam_step`.

  Attributes:
    g: gradients ``[B, m, n]`` (the update comes back in this dtype).
    mu: previous first-moment factors ``(u [B, m, k], s [B, k], v [B, n,
      k])``, any float dtype.
    nu: previous second-moment factors.
    omega_m: this step's first-moment sketch ``[B, n, l]`` (``k <= l``).
    omega_v: this step's second-moment sketch ``[B, n, l]``.
    use_kernel: the Pallas passes (else the ``jax.numpy`` references). A
      matrix they cannot tile is zero-padded to tiles first
      (:func:`~mlorc_optax._src.kernels.launch.tiled_size`), its results
      cropped (:meth:`padded`).
    axes: inside ``shard_map``, the mesh axes the matrices are split over
      (:class:`MatrixAxes`; every array above is then this device's block:
      ``g`` and ``mu.u`` of rows, ``g``, ``mu.v`` and ``omega_m`` of
      columns).
  """

  g: jax.Array
  mu: rsvd.LowRankFactors
  nu: rsvd.LowRankFactors
  omega_m: jax.Array
  omega_v: jax.Array
  use_kernel: bool
  axes: MatrixAxes = MatrixAxes()

  def padded(self, rows: int, cols: int) -> AdamLeafInputs:
    """These inputs with zero rows and columns up to ``rows x cols``.

    The step of the padded matrices is the step of the originals, padded:
    zero rows of ``g`` and ``U`` (zero columns of ``g``, zero rows of ``V``
    and ``Omega``) add nothing to any sketch, projection, Gram matrix or
    count of negative entries (a reconstructed zero is not negative), so
    ``Q``, the factors' ``s`` and the original block of every output are
    unchanged, and the padding's own direction and factor rows are zero
    (:func:`_cropped` removes them). Only the clip bound of
    :func:`~mlorc_optax._src.step_math.overflow_bound`, a function of the
    padded size, is lower by less than one tile in ``max(m, n)``.
    """
    return self._replace(
        g=_zero_padded(self.g, rows, cols),
        mu=_padded_rows(self.mu, rows, cols),
        nu=_padded_rows(self.nu, rows, cols),
        omega_m=_zero_padded(self.omega_m, cols, None),
        omega_v=_zero_padded(self.omega_v, cols, None))


def _adam_step(
    leaves: Sequence[AdamLeafInputs],
    coefficients: step_math.AdamCoefficients,
    *,
    config: KernelConfig,
    interpret: bool,
    complement: Any = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors, rsvd.LowRankFactors]]:
  """:func:`adam_step` with every leaf launched on its own."""
  c = step_math.AdamCoefficients(*map(_f32, coefficients))
  b1, b2 = 1 - c.one_minus_b1, 1 - c.one_minus_b2
  widths = [kernel_widths(leaf.mu.s.shape[-1], leaf.omega_m.shape[-1], config)
            for leaf in leaves]
  zetas, ys, done = [], [], None
  for leaf, (r_pad, l_pad) in zip(leaves, widths):
    axes = leaf.axes
    l = leaf.omega_m.shape[-1]
    g, mu, nu, omega_m, omega_v = _after(
        (leaf.g, leaf.mu, leaf.nu, leaf.omega_m, leaf.omega_v), done)
    a_m, v_m = _padded_factors(mu, b1, r_pad)
    a_v, v_v = _padded_factors(nu, b2, r_pad)
    om, ov = (pad_cols(_sketch(leaf, o, config, interpret), l_pad)
              for o in (omega_m, omega_v))
    sketch = _pass(leaf.use_kernel, adam.sketch_pass,
                   adam.sketch_pass_reference, config, interpret)
    p1 = sketch(g, a_v, v_v, om, ov, c.one_minus_b2)
    # This device's sums: the l sketch columns (not the kernels' padding),
    # the counts over its rows.
    done = (p1.g_omega[..., :l], p1.x_omega[..., :l], p1.neg_omega[..., :l],
            jnp.sum(p1.neg_count, axis=-1), jnp.sum(p1.neg_sum, axis=-1))
    # Products over the columns, summed over the devices that split them.
    g_om, x_om, neg_om, vo_m, vo_v = gram.psum(
        (*done[:3], _small(v_m, om[..., :l]), _small(v_v, ov[..., :l])),
        axes.cols)
    # a_v carries b2, so pass 1 saw b2 * v~ and this is b2 * zeta.
    count, total = gram.psum(done[3:], axes.rows + axes.cols)
    zeta = total / jnp.maximum(count, 1.0)
    ys.append(_sketch_of(a_m, vo_m) + c.one_minus_b1 * g_om)
    ys.append(_sketch_of(a_v, vo_v) + x_om + zeta[:, None, None] * neg_om)
    zetas.append(zeta)
  qs = gram.orthonormal_bases(
      ys, [leaf.axes.rows for leaf in leaves for _ in range(2)])

  outs, bs, done = [], [], None
  for i, (leaf, zeta, (r_pad, l_pad)) in enumerate(
      zip(leaves, zetas, widths)):
    g, (q_m, q_v) = _after(leaf.g, done), qs[2 * i:2 * i + 2]
    project = _pass(leaf.use_kernel, adam.project_pass,
                    adam.project_pass_reference, config, interpret)
    l = leaf.omega_m.shape[-1]
    rows = leaf.axes.rows
    a_v, v_v = _padded_factors(leaf.nu, b2, r_pad)
    if complement is None:
      a_m, v_m = _padded_factors(leaf.mu, b1, r_pad)
      p2 = project(g, a_m, v_m, a_v, v_v, pad_cols(q_m, l_pad),
                   pad_cols(q_v, l_pad), c, zeta)
      done = (p2.b_m[:, :l], p2.b_v[:, :l])
      b_m, b_v = gram.psum(done, rows)
    else:
      # Pass 2 rebuilds m' = m + b1 alpha (I - U U^T) g, from which the
      # direction comes, with P = U^T g from one more read of g. That read
      # gives Q^T g too, and with it the projection of the new moment
      # m = b1 U S V^T + (1 - b1) g: Q^T m = b1 (Q^T U) S V^T + (1 - b1)
      # Q^T g, so pass 2 projects only v.
      u, s, v = map(_f32, leaf.mu)
      k = u.shape[-1]
      both = jnp.einsum('bmj,bmn->bjn', jnp.concatenate([u, q_m], -1),
                        g.astype(_F32),
                        precision=_gradient_products(leaf, config, interpret))
      both, q_u = gram.psum((both, step_math.inner(q_m, u)), rows)
      p, q_g = both[:, :k], both[:, k:]
      a_c, v_c = _padded_factors(_credited(leaf.mu, p, complement), b1, r_pad)
      p2 = project(g, a_c, v_c, a_v, v_v, None, pad_cols(q_v, l_pad),
                   c._replace(one_minus_b1=c.one_minus_b1 + b1 * complement),
                   zeta)
      done = p2.b_v[:, :l]
      b_v = gram.psum(done, rows)
      b_m = _projection_of(q_u * s[:, None, :], v, b1, c.one_minus_b1, q_g)
    bs += [b_m, b_v]
    outs.append(p2.direction.astype(leaf.g.dtype))
  ranks = [leaf.mu.s.shape[-1] for leaf in leaves for _ in range(2)]
  factors = gram.svds_of_projections(
      qs, bs, ranks, [leaf.axes.cols for leaf in leaves for _ in range(2)])
  return [(d, factors[2 * i], factors[2 * i + 1])
          for i, d in enumerate(outs)]


def adam_leaf_step(
    g: jax.Array,
    mu: rsvd.LowRankFactors,
    nu: rsvd.LowRankFactors,
    omega_m: jax.Array,
    omega_v: jax.Array,
    coefficients: step_math.AdamCoefficients,
    *,
    use_kernel: bool,
    config: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, rsvd.LowRankFactors, rsvd.LowRankFactors]:
  """:func:`adam_step` of one leaf (arguments as :class:`AdamLeafInputs`)."""
  leaf = AdamLeafInputs(g, mu, nu, omega_m, omega_v, use_kernel)
  return adam_step([leaf], coefficients, config=config,
                   interpret=interpret)[0]


# ----------------------------------------------------------------------------
# MLorc-Lion (paper Algorithm 2): one compressed moment, the same two passes.


class LionLeafInputs(NamedTuple):
  """One batch of matrices for :func:`lion_step`.

  Attributes:
    g: gradients ``[B, m, n]`` (the update comes back in this dtype).
    mu: previous momentum factors ``(u [B, m, k], s [B, k], v [B, n, k])``.
    omega: this step's sketch ``[B, n, l]`` (``k <= l``).
    use_kernel: the Pallas passes (else the ``jax.numpy`` references).
    axes: inside ``shard_map``, the mesh axes the matrices are split over
      (:class:`MatrixAxes`, as for :class:`AdamLeafInputs`).
  """

  g: jax.Array
  mu: rsvd.LowRankFactors
  omega: jax.Array
  use_kernel: bool
  axes: MatrixAxes = MatrixAxes()

  def padded(self, rows: int, cols: int) -> LionLeafInputs:
    """These inputs with zero rows and columns up to ``rows x cols`` (as
    :meth:`AdamLeafInputs.padded`; ``sign(0) = 0`` in the padding)."""
    return self._replace(g=_zero_padded(self.g, rows, cols),
                         mu=_padded_rows(self.mu, rows, cols),
                         omega=_zero_padded(self.omega, cols, None))


def _lion_step(
    leaves: Sequence[LionLeafInputs],
    b1: Any,
    b2: Any,
    *,
    config: KernelConfig,
    interpret: bool,
    complement: Any = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors]]:
  """:func:`lion_step` with every leaf launched on its own."""
  # 1 - b computed before any cast (in float64 for Python floats), as the
  # reference step does: 1 - float32(0.999) is off by 5e-5 relative.
  coefficients = lion.LionCoefficients(_f32(b1), _f32(1 - b1))
  b2, one_minus_b2 = _f32(b2), _f32(1 - b2)
  widths = [kernel_widths(leaf.mu.s.shape[-1], leaf.omega.shape[-1], config)
            for leaf in leaves]
  ys, done = [], None
  for leaf, (r_pad, l_pad) in zip(leaves, widths):
    l = leaf.omega.shape[-1]
    g, mu, omega = _after((leaf.g, leaf.mu, leaf.omega), done)
    a, v = _padded_factors(mu, 1.0, r_pad)
    om = pad_cols(_sketch(leaf, omega, config, interpret), l_pad)
    sketch = _pass(leaf.use_kernel, lion.lion_sketch_pass,
                   lion.lion_sketch_pass_reference, config, interpret)
    done = sketch(g, om)[..., :l]
    g_omega, v_omega = gram.psum((done, _small(v, om[..., :l])),
                                 leaf.axes.cols)
    ys.append(b2 * _sketch_of(a, v_omega) + one_minus_b2 * g_omega)
  qs = gram.orthonormal_bases(ys, [leaf.axes.rows for leaf in leaves])

  outs, bs, done = [], [], None
  for leaf, q, (r_pad, l_pad) in zip(leaves, qs, widths):
    g = _after(leaf.g, done)
    project = _pass(leaf.use_kernel, lion.lion_project_pass,
                    lion.lion_project_pass_reference, config, interpret)
    rows = leaf.axes.rows
    a, v = _padded_factors(leaf.mu, 1.0, r_pad)
    if complement is None:
      p2 = project(g, a, v, pad_cols(q, l_pad), coefficients)
    else:
      # The direction from m~ + alpha (I - U U^T) g (MomentSpec.complement);
      # Q^T g, and so the new factors, do not depend on it.
      p = gram.psum(jnp.einsum(
          'bmk,bmn->bkn', _f32(leaf.mu.u), g.astype(_F32),
          precision=_gradient_products(leaf, config, interpret)), rows)
      a_c, v_c = _padded_factors(_credited(leaf.mu, p, complement), 1.0, r_pad)
      p2 = project(g, a_c, v_c, pad_cols(q, l_pad), coefficients._replace(
          one_minus_b1=coefficients.one_minus_b1
          + coefficients.b1 * complement))
    done = p2.q_g[:, :leaf.omega.shape[-1]]
    qa, q_g = gram.psum((step_math.inner(q, a), done), rows)
    bs.append(_projection_of(qa, v, b2, one_minus_b2, q_g))
    outs.append(p2.direction.astype(leaf.g.dtype))
  factors = gram.svds_of_projections(
      qs, bs, [leaf.mu.s.shape[-1] for leaf in leaves],
      [leaf.axes.cols for leaf in leaves])
  return list(zip(outs, factors))


# ----------------------------------------------------------------------------
# Leaves of equal shape share one launch.


def _arrays(leaf: Any) -> Any:
  """A leaf's inputs with the static fields (not arrays) set to None."""
  return leaf._replace(use_kernel=None, axes=None)


def _groups(leaves: Sequence[Any], config: KernelConfig) -> list[list[int]]:
  """Indices of the leaves that share a launch (equal shapes, dtypes and
  mesh axes; a leaf over ``config.group_max_elements`` alone)."""
  return gram.groups_by_key([
      i if leaf.g.size > config.group_max_elements else (
          leaf.use_kernel, leaf.axes,
          tuple((tuple(x.shape[1:]), x.dtype)
                for x in jax.tree_util.tree_leaves(_arrays(leaf))))
      for i, leaf in enumerate(leaves)])


def _grouped(step: Callable[..., list[Any]], leaves: Sequence[Any],
             config: KernelConfig, **kwargs: Any) -> list[Any]:
  """``step`` over ``leaves``, equal-shaped small leaves in one batch.

  A leaf for the kernels that they cannot tile is zero-padded to tiles
  first and its results cropped (``padded``, exact). Every computation of a
  step is per matrix, so concatenating leaves along the batch axis changes
  no result; it only makes one launch of each pass (and one of each small
  factorization) serve the whole group.
  """
  shapes = [leaf.g.shape[-2:] for leaf in leaves]
  tiled = [(tiled_size(m, config.block_rows), tiled_size(n, config.block_cols))
           if leaf.use_kernel else (m, n)
           for leaf, (m, n) in zip(leaves, shapes)]
  leaves = [leaf if t == s else leaf.padded(*t)
            for leaf, s, t in zip(leaves, shapes, tiled)]
  groups = _groups(leaves, config)
  merged = [joined._replace(use_kernel=leaves[g[0]].use_kernel,
                            axes=leaves[g[0]].axes)
            for g, joined in zip(groups, gram.join_batches(
                [_arrays(leaf) for leaf in leaves], groups))]
  out = gram.split_batches(step(merged, config=config, **kwargs), groups,
                           [leaf.g.shape[0] for leaf in leaves])
  return [o if t == s else _cropped(o, *s)
          for o, s, t in zip(out, shapes, tiled)]


def adam_step(
    leaves: Sequence[AdamLeafInputs],
    coefficients: step_math.AdamCoefficients,
    *,
    config: KernelConfig,
    interpret: bool,
    complement: Any = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors, rsvd.LowRankFactors]]:
  """One MLorc-AdamW step of several batches of matrices in two passes.

  Pass 1 for every leaf, then all the ``Q`` factorizations together, then
  pass 2 for every leaf, then all the small SVDs together (module
  docstring). Small leaves of equal shapes and dtypes share one launch of
  each pass (``config.group_max_elements``); a matrix the kernels cannot
  tile is padded to tiles (:meth:`AdamLeafInputs.padded`).

  Args:
    leaves: :class:`AdamLeafInputs`, one per compressed leaf.
    coefficients: :class:`~mlorc_optax._src.step_math.AdamCoefficients`
      shared by all leaves (scalars, possibly traced). ``one_minus_b1`` and
      ``one_minus_b2`` are used as given: compute them before any cast to
      float32 (``1 - float32(0.999)`` is off by 5e-5 relative); ``b1`` and
      ``b2`` are ``1 -`` them.
    config: the Pallas passes' static settings.
    interpret: run the Pallas passes in Pallas' interpreter.
    complement: None, or the weight ``alpha`` (scalar) of the first
      moment's complement: the direction is computed from ``m + b1 alpha
      (I - U_m U_m^T) g`` (``MomentSpec.complement``; one more read of
      ``g`` for ``U_m^T g`` and ``Q_m^T g``, which also give ``Q_m^T m``),
      the new factors from ``m``.

  Returns:
    Per leaf ``(direction [B, m, n], new mu factors, new nu factors)``,
    factors in float32 with ``k`` columns: the randomized SVD (with sketches
    ``omega_m``, ``omega_v``) of the uncompressed new moments.
  """
  return _grouped(_adam_step, leaves, config, coefficients=coefficients,
                  interpret=interpret, complement=complement)


def lion_step(
    leaves: Sequence[LionLeafInputs],
    b1: Any,
    b2: Any,
    *,
    config: KernelConfig,
    interpret: bool,
    complement: Any = None,
) -> list[tuple[jax.Array, rsvd.LowRankFactors]]:
  """One MLorc-Lion step (paper Algorithm 2) of several leaves in two passes.

  With ``m~ = U S V^T`` the previous momentum: the update is
  ``sign(b1 m~ + (1 - b1) g)`` and the new momentum ``m = b2 m~ + (1 - b2) g``
  is compressed by the randomized SVD with sketch ``omega``. Both ``m Omega``
  and ``Q^T m`` are linear in ``g``: pass 1 streams ``g Omega``, pass 2
  writes the update (rebuilding ``m~`` tile by tile) and accumulates
  ``Q^T g``; the factors' parts are small products. ``Q`` and the small SVDs
  as in :func:`adam_step`. Small leaves of equal shapes and dtypes share
  one launch of each pass
  (``config.group_max_elements``).

  Args:
    leaves: :class:`LionLeafInputs`, one per compressed leaf.
    b1: Lion's update interpolation (scalar, possibly traced).
    b2: Lion's momentum decay.
    config: the Pallas passes' static settings.
    interpret: run the Pallas passes in Pallas' interpreter.
    complement: None, or the weight ``alpha`` of the momentum's complement:
      the update is ``sign(b1 (m~ + alpha (I - U U^T) g) + (1 - b1) g)``
      (``MomentSpec.complement``; one more read of ``g`` for ``U^T g``).

  Returns:
    Per leaf ``(update [B, m, n], new factors)``.
  """
  return _grouped(_lion_step, leaves, config, b1=b1, b2=b2,
                  interpret=interpret, complement=complement)
