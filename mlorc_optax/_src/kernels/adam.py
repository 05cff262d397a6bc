"""The two passes of the MLorc-AdamW step: Pallas kernels and references.

For a batch of matrices ``[B, m, n]``, pass 1 (:func:`sketch_pass`) streams
the gradient once and accumulates the sketches of the new moments, and pass 2
(:func:`project_pass`) streams it again, writes the Adam direction and
accumulates the projections of the new moments on their bases; the algebra
is derived in :mod:`mlorc_optax._src.two_pass`. The dense moments are rebuilt
tile by tile from the previous factors and never stored.

Each pass has a ``jax.numpy`` twin (``*_reference``, dense temporaries), the
specification the kernel is tested against. Both compute their elementwise
terms with the same functions of :mod:`mlorc_optax._src.step_math`; pass 1
turns them into its outputs with one helper (:func:`_sketch_products`), a
batched ``einsum`` in the reference and a tile's products in the kernel. The
kernels' rank-sized products of each tile (reconstruction, sketch,
projection) are the :class:`~.launch.Products` their launch hands them:
tensor-core dots, with float32 multiply-add reconstructions in pass 2 for
factors up to ``KernelConfig.fma_max_rank`` wide. Pass 2's kernel writes
each tile of the direction before it accumulates the projections, which
keeps fewer tiles live (computing all three before writing any made the
pass 1.6x slower on an H200,
``benchmarks/fused_passes.py``). Given no ``q_m`` it never forms ``m``: the
direction's numerator ``k_m m + k_g g`` is one multiply-add from ``a_m``
scaled by ``k_m`` (:func:`~mlorc_optax._src.step_math.adam_folded_numerator`),
which took the LLaMA-7B step on an H200 from 1.27x to 1.22x ``optax.adamw``'s
in float32 and from 1.67x to 1.62x in bfloat16 at rank 4
(``benchmarks/README.md``). A grid program owns a block of rows (pass 1)
or of columns (pass 2) and loops over the other axis inside the kernel, so
its accumulations never race (:func:`.launch.launch`).

The per-matrix scalars travel as NamedTuples of ``[B]`` float32 arrays
(:class:`~mlorc_optax._src.step_math.AdamCoefficients`, scalars are
broadcast), never as columns of one array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src import step_math
from mlorc_optax._src.kernels import launch as launch_lib

_F32 = jnp.float32
_HI = step_math.HIGHEST


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
  zeta 1{r < 0}``. (The gradient is clipped at
  :func:`~mlorc_optax._src.step_math.overflow_bound` first.)
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
    b_m: ``Q_m^T m``, ``[B, L, n]``; None when the pass was given no
      ``q_m`` (the caller has ``Q_m^T m`` from elsewhere).
    b_v: ``Q_v^T v``, ``[B, L, n]``.
  """

  direction: jax.Array
  b_m: jax.Array | None
  b_v: jax.Array


def _sketch_products(
    terms: step_math.AdamSketchTerms,
    sketch_m: Callable[[jax.Array], jax.Array],
    sketch_v: Callable[[jax.Array], jax.Array],
) -> SketchPassOutputs:
  """Pass 1's outputs from its elementwise terms (a whole batch or a tile),
  with ``sketch_m`` / ``sketch_v`` the products with ``omega_m`` /
  ``omega_v`` (a batched ``einsum``, or a tile's :class:`~.launch.Products`)."""
  return SketchPassOutputs(
      g_omega=sketch_m(terms.g),
      x_omega=sketch_v(terms.x),
      neg_omega=sketch_v(terms.negative),
      neg_count=jnp.sum(terms.negative, axis=-1),
      neg_sum=-jnp.sum(terms.nonpositive, axis=-1),
  )


# Shapes of the operands: the same rules for a kernel and its reference,
# plus the tile constraints for the kernel (config given).


def _check_sketch(where, g, a_v, v_v, omega_m, omega_v, one_minus_b2,
                  config=None):
  arrays = {'g': (g, 'B m n'), 'a_v': (a_v, 'B m R'), 'v_v': (v_v, 'B n R'),
            'omega_m': (omega_m, 'B n L'), 'omega_v': (omega_v, 'B n L')}
  return launch_lib.check_operands(
      where, arrays, {'one_minus_b2': one_minus_b2}, config)[0]


def _check_project(where, g, a_m, v_m, a_v, v_v, q_m, q_v, coefficients,
                   zeta, config=None):
  arrays = {'g': (g, 'B m n'), 'a_m': (a_m, 'B m R'), 'v_m': (v_m, 'B n R'),
            'a_v': (a_v, 'B m R'), 'v_v': (v_v, 'B n R'),
            'q_m': (q_m, 'B m L'), 'q_v': (q_v, 'B m L')}
  if q_m is None:
    del arrays['q_m']
  return launch_lib.check_operands(
      where, arrays, {'coefficients': coefficients, 'zeta': zeta}, config)


# ----------------------------------------------------------------------------
# Pass 1: sketch.


def sketch_pass_reference(
    g: jax.Array,
    a_v: jax.Array,
    v_v: jax.Array,
    omega_m: jax.Array,
    omega_v: jax.Array,
    one_minus_b2: Any,
) -> SketchPassOutputs:
  """Pass 1 in plain ``jax.numpy`` (the specification of the kernel).

  Args:
    g: gradients ``[B, m, n]`` (any float dtype, computed in float32).
    a_v: ``b2 U_v S_v``, ``[B, m, R]`` (the previous second-moment factors;
      the scaled left factor).
    v_v: ``V_v``, ``[B, n, R]``.
    omega_m: first-moment sketch ``[B, n, L]``.
    omega_v: second-moment sketch ``[B, n, L]``.
    one_minus_b2: ``1 - b2``, a scalar or one per matrix ``[B]``.

  Returns:
    :class:`SketchPassOutputs`, float32.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  one_minus_b2 = _check_sketch('sketch_pass_reference', g, a_v, v_v, omega_m,
                               omega_v, one_minus_b2)
  rec = jnp.einsum('bik,bjk->bij', a_v, v_v, precision=_HI)
  terms = step_math.adam_sketch_terms(
      g.astype(_F32), rec, launch_lib.expand_per_matrix(one_minus_b2),
      step_math.overflow_bound(*g.shape[-2:]))
  dot = functools.partial(jnp.einsum, 'bij,bjl->bil', precision=_HI)
  return _sketch_products(terms, lambda x: dot(x, omega_m),
                          lambda x: dot(x, omega_v))


def _sketch_kernel(
    one_b2_ref, g_ref, av_ref, vv_ref, om_ref, ov_ref, *out_refs,
    bm, bn, loop, bound, products,
):
  b, i, part = launch_lib.program()
  rows = launch_lib.block(i, bm)
  a = products.rows(av_ref, b, rows)
  one_b2 = one_b2_ref[b]

  def body(j, acc):
    cols = launch_lib.block(j, bn)
    rec = products.outer(a, products.cols(vv_ref, b, cols))
    terms = step_math.adam_sketch_terms(
        g_ref[b, rows, cols].astype(_F32), rec, one_b2, bound)
    tile = _sketch_products(
        terms, lambda x: products.sketch(x, om_ref, b, cols),
        lambda x: products.sketch(x, ov_ref, b, cols))
    return jax.tree.map(jnp.add, acc, tile)

  zl = jnp.zeros((bm, om_ref.shape[-1]), _F32)
  zr = jnp.zeros((bm,), _F32)
  acc = jax.lax.fori_loop(*loop.blocks(part), body,
                          SketchPassOutputs(zl, zl, zl, zr, zr))
  for ref, x in zip(out_refs, acc):
    ref[part, b, rows] = x


def sketch_pass(
    g: jax.Array, a_v: jax.Array, v_v: jax.Array, omega_m: jax.Array,
    omega_v: jax.Array, one_minus_b2: Any,
    *,
    config: launch_lib.KernelConfig = launch_lib.KernelConfig(),
    interpret: bool,
) -> SketchPassOutputs:
  """Pass 1 as a Pallas kernel; arguments as :func:`sketch_pass_reference`.

  Args:
    g, a_v, v_v, omega_m, omega_v, one_minus_b2: as for
      :func:`sketch_pass_reference`; ``R`` and ``L`` must be powers of two
      ``>= 16`` and ``m``, ``n`` divisible by a power-of-two tile ``>= 16``
      (:func:`~.launch.supports`).
    config: the static :class:`~.launch.KernelConfig`.
    interpret: run in Pallas' interpreter (float32 dots) instead of
      compiling through Triton.

  Returns:
    :class:`SketchPassOutputs`, float32.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  one_minus_b2 = _check_sketch('sketch_pass', g, a_v, v_v, omega_m, omega_v,
                               one_minus_b2, config)
  batch, rows, _ = g.shape
  width = omega_m.shape[-1]

  def out_shape(parts):
    sk = jax.ShapeDtypeStruct((parts, batch, rows, width), _F32)
    row = jax.ShapeDtypeStruct((parts, batch, rows), _F32)
    return SketchPassOutputs(sk, sk, sk, row, row)

  # Pass 1 reconstructs with dots (launch.Products): factors 16 wide.
  a_v, v_v = launch_lib.dot_operand(a_v), launch_lib.dot_operand(v_v)
  omega_m, omega_v = (
      launch_lib.dot_input(o, 'sketch_precision', config, interpret)
      for o in (omega_m, omega_v))
  out = launch_lib.launch(
      _sketch_kernel, g, over='rows', out_shape=out_shape,
      args=(one_minus_b2, g, a_v, v_v, omega_m, omega_v), config=config,
      interpret=interpret, name='mlorc_adam_sketch', width=width)
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
    coefficients: step_math.AdamCoefficients,
    zeta: Any,
) -> ProjectPassOutputs:
  """Pass 2 in plain ``jax.numpy`` (the specification of the kernel).

  Args:
    g: gradients ``[B, m, n]``.
    a_m: ``b1 U_m S_m`` ``[B, m, R]`` (the previous first-moment factors,
      scaled by ``b1``).
    v_m: ``V_m`` ``[B, n, R]``.
    a_v: ``b2 U_v S_v`` ``[B, m, R]``.
    v_v: ``V_v`` ``[B, n, R]``.
    q_m: ``[B, m, L]`` orthonormal basis for the new first moment, or None:
      ``Q_m^T m`` is not accumulated (``b_m`` is None). The two-pass step
      with the first moment's complement gets it from small products and
      ``Q_m^T g``, which it computes anyway.
    q_v: ``[B, m, L]`` orthonormal basis for the new second moment.
    coefficients: :class:`~mlorc_optax._src.step_math.AdamCoefficients`,
      each field a scalar or one value per matrix ``[B]``.
    zeta: ``b2 * zeta``, what the negative entries of ``a_v v_v^T`` become
      (from pass 1), a scalar or ``[B]``.

  Returns:
    :class:`ProjectPassOutputs`: with ``m = a_m v_m^T + (1 - b1) g`` and
    ``v = fix(a_v v_v^T) + (1 - b2) g**2``
    (:func:`~mlorc_optax._src.step_math.adam_new_moments`), the direction
    ``(k_m m + k_g g) / (sqrt(c_v v + eps_root) + eps)`` and the projections
    of ``m`` (unless ``q_m`` is None) and ``v`` clipped at the overflow
    bound.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  coefficients, zeta = _check_project('project_pass_reference', g, a_m, v_m,
                                      a_v, v_v, q_m, q_v, coefficients, zeta)
  reconstruct = functools.partial(jnp.einsum, 'bik,bjk->bij', precision=_HI)
  project = functools.partial(jnp.einsum, 'bil,bij->blj', precision=_HI)
  g32 = g.astype(_F32)
  c = launch_lib.expand_per_matrix(coefficients)
  m, v = step_math.adam_new_moments(reconstruct(a_m, v_m),
                                    reconstruct(a_v, v_v), g32,
                                    launch_lib.expand_per_matrix(zeta), c)
  direction = step_math.adam_direction(m, v, g32, c).astype(g.dtype)
  m, v = step_math.adam_projection_terms(
      m, v, step_math.overflow_bound(*g.shape[-2:]))
  return ProjectPassOutputs(direction,
                            None if q_m is None else project(q_m, m),
                            project(q_v, v))


def _project_kernel(
    coef_ref, zeta_ref, g_ref, am_ref, vm_ref, av_ref, vv_ref, qm_ref, qv_ref,
    d_ref, bm_ref, bv_ref,
    *, bm, bn, loop, bound, products,
):
  b, j, part = launch_lib.program()
  cols = launch_lib.block(j, bn)
  c = jax.tree.map(lambda ref: ref[b], coef_ref)
  zeta = zeta_ref[b]
  vm = products.cols(vm_ref, b, cols)
  vv = products.cols(vv_ref, b, cols)

  def body(i, acc):
    rows = launch_lib.block(i, bm)
    g = g_ref[b, rows, cols].astype(_F32)
    ops = products.arithmetic
    rec_m = products.outer(products.rows(am_ref, b, rows), vm)
    rec_v = products.outer(products.rows(av_ref, b, rows), vv)
    acc_m, acc_v = acc
    if qm_ref is None:
      # a_m carries k_m and c.k_g is the folded k_g (project_pass): the
      # numerator k_m m + k_g g is one multiply-add, m is never formed.
      v = step_math.adam_new_second_moment(rec_v, g, zeta, c, ops)
      d = step_math.adam_ratio(ops.fma(c.k_g, g, rec_m), v, c, ops)
    else:
      m, v = step_math.adam_new_moments(rec_m, rec_v, g, zeta, c, ops)
      d = step_math.adam_direction(m, v, g, c, ops)
    # The direction is written before the projections: fewer live tiles.
    d_ref[b, rows, cols] = d.astype(d_ref.dtype)
    if qm_ref is not None:
      acc_m = acc_m + products.project(
          qm_ref, b, rows, step_math.clip_magnitude(m, bound))
    return acc_m, acc_v + products.project(
        qv_ref, b, rows, step_math.second_moment_projection_term(v, bound))

  z = jnp.zeros((qv_ref.shape[-1], bn), _F32)
  acc_m, acc_v = jax.lax.fori_loop(
      *loop.blocks(part), body, (None if qm_ref is None else z, z))
  if bm_ref is not None:
    bm_ref[part, b, :, cols] = acc_m
  bv_ref[part, b, :, cols] = acc_v


def project_pass(
    g: jax.Array, a_m: jax.Array, v_m: jax.Array, a_v: jax.Array,
    v_v: jax.Array, q_m: jax.Array, q_v: jax.Array,
    coefficients: step_math.AdamCoefficients, zeta: Any,
    *,
    config: launch_lib.KernelConfig = launch_lib.KernelConfig(),
    interpret: bool,
) -> ProjectPassOutputs:
  """Pass 2 as a Pallas kernel; arguments as :func:`project_pass_reference`.

  Shape constraints, ``config`` and ``interpret`` as for :func:`sketch_pass`.
  """
  coefficients, zeta = _check_project('project_pass', g, a_m, v_m, a_v, v_v,
                                      q_m, q_v, coefficients, zeta, config)
  batch, _, cols = g.shape
  width = q_v.shape[-1]
  q_m, q_v = (None if q is None else launch_lib.dot_input(
      q, 'project_precision', config, interpret) for q in (q_m, q_v))

  if q_m is None:
    # Without Q_m^T m the kernel needs m only in the direction's numerator:
    # a_m carries k_m, and k_g becomes k_m (1 - b1) + k_g.
    k_m, k_g = step_math.adam_folded_numerator(coefficients)
    a_m = a_m * k_m[:, None, None]
    coefficients = coefficients._replace(k_g=k_g)

  def out_shape(parts):
    proj = jax.ShapeDtypeStruct((parts, batch, width, cols), _F32)
    return (jax.ShapeDtypeStruct(g.shape, g.dtype),
            None if q_m is None else proj, proj)

  direction, b_m, b_v = launch_lib.launch(
      _project_kernel, g, over='cols', out_shape=out_shape,
      args=(coefficients, zeta, g, a_m, v_m, a_v, v_v, q_m, q_v),
      config=config, interpret=interpret, name='mlorc_adam_project',
      width=width, rank=a_m.shape[-1])
  return ProjectPassOutputs(direction,
                            None if b_m is None else jnp.sum(b_m, axis=0),
                            jnp.sum(b_v, axis=0))
