"""The two passes of the MLorc-Lion step: Pallas kernels and references.

Lion's new momentum ``m = b2 U S V^T + (1 - b2) g`` is linear in ``g``, so
both products the randomized SVD needs are too: ``m Omega`` needs only
``g Omega`` from the gradient (pass 1, :func:`lion_sketch_pass`) and
``Q^T m`` only ``Q^T g`` (pass 2, :func:`lion_project_pass`, which also
writes the update ``sign(b1 U S V^T + (1 - b1) g)``, rebuilding the previous
momentum tile by tile); the factors' parts are small products, added in
:mod:`mlorc_optax._src.two_pass`.

As in :mod:`.adam`, each pass has a ``jax.numpy`` twin that is its
specification, both computing their elementwise terms with
:mod:`mlorc_optax._src.step_math`; the per-matrix scalars travel as a
:class:`LionCoefficients` of ``[B]`` float32 arrays.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src import step_math
from mlorc_optax._src.kernels import launch as launch_lib

_F32 = jnp.float32
_HI = step_math.HIGHEST


class LionCoefficients(NamedTuple):
  """The scalars of Lion's update ``sign(b1 m~ + (1 - b1) g)``.

  Each a scalar or one float32 value per matrix ``[B]``.

  Attributes:
    b1: weight of the previous momentum in the update.
    one_minus_b1: ``1 - b1``, computed before any cast to float32.
  """

  b1: Any
  one_minus_b1: Any


class LionProjectPassOutputs(NamedTuple):
  """What Lion's pass 2 returns for a batch of matrices ``[B, m, n]``.

  Attributes:
    direction: ``sign(b1 a v^T + (1 - b1) g)`` ``[B, m, n]`` in the
      gradient's dtype.
    q_g: ``Q^T clip(g)``, ``[B, L, n]`` float32.
  """

  direction: jax.Array
  q_g: jax.Array


# Shapes of the operands: the same rules for a kernel and its reference,
# plus the tile constraints for the kernel (config given).


def _check_sketch(where, g, omega, config=None):
  launch_lib.check_operands(
      where, {'g': (g, 'B m n'), 'omega': (omega, 'B n L')}, {}, config)


def _check_project(where, g, a, v, q, coefficients, config=None):
  arrays = {'g': (g, 'B m n'), 'a': (a, 'B m R'), 'v': (v, 'B n R'),
            'q': (q, 'B m L')}
  return launch_lib.check_operands(
      where, arrays, {'coefficients': coefficients}, config)[0]


# ----------------------------------------------------------------------------
# Pass 1: sketch.


def lion_sketch_pass_reference(g: jax.Array, omega: jax.Array) -> jax.Array:
  """Lion's pass 1 in ``jax.numpy``: ``clip(g) @ omega``, ``[B, m, L]``.

  Args:
    g: gradients ``[B, m, n]`` (any float dtype, computed in float32).
    omega: the sketch ``[B, n, L]``.

  Returns:
    ``clip(g) @ omega`` float32, ``g`` clipped at the overflow bound.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  _check_sketch('lion_sketch_pass_reference', g, omega)
  g = step_math.clip_magnitude(g.astype(_F32),
                               step_math.overflow_bound(*g.shape[-2:]))
  return jnp.einsum('bij,bjl->bil', g, omega, precision=_HI)


def _lion_sketch_kernel(g_ref, om_ref, go_ref, *, bm, bn, loop, bound,
                        products):
  b, i, part = launch_lib.program()
  rows = launch_lib.block(i, bm)

  def body(j, acc):
    cols = launch_lib.block(j, bn)
    g = step_math.clip_magnitude(g_ref[b, rows, cols].astype(_F32), bound)
    return acc + products.sketch(g, om_ref, b, cols)

  acc = jax.lax.fori_loop(*loop.blocks(part), body,
                          jnp.zeros((bm, om_ref.shape[-1]), _F32))
  go_ref[part, b, rows, :] = acc


def lion_sketch_pass(
    g: jax.Array,
    omega: jax.Array,
    *,
    config: launch_lib.KernelConfig = launch_lib.KernelConfig(),
    interpret: bool,
) -> jax.Array:
  """:func:`lion_sketch_pass_reference` as a Pallas kernel.

  ``L`` must be a power of two ``>= 16`` and ``m``, ``n`` tileable
  (:func:`~.launch.supports`); ``config`` and ``interpret`` as for
  :func:`.adam.sketch_pass`.
  """
  _check_sketch('lion_sketch_pass', g, omega, config)
  batch, rows, _ = g.shape
  omega = launch_lib.dot_input(omega, 'sketch_precision', config, interpret)
  out = launch_lib.launch(
      _lion_sketch_kernel, g, over='rows',
      out_shape=lambda parts: jax.ShapeDtypeStruct(
          (parts, batch, rows, omega.shape[-1]), _F32),
      args=(g, omega), config=config, interpret=interpret,
      name='mlorc_lion_sketch', width=omega.shape[-1])
  return jnp.sum(out, axis=0)


# ----------------------------------------------------------------------------
# Pass 2: project and update.


def lion_project_pass_reference(
    g: jax.Array,
    a: jax.Array,
    v: jax.Array,
    q: jax.Array,
    coefficients: LionCoefficients,
) -> LionProjectPassOutputs:
  """Lion's pass 2 in ``jax.numpy``.

  Args:
    g: gradients ``[B, m, n]``.
    a: ``U S`` ``[B, m, R]`` (previous factors, unscaled).
    v: ``V`` ``[B, n, R]``.
    q: ``[B, m, L]`` orthonormal basis for the new momentum.
    coefficients: :class:`LionCoefficients`, scalars or ``[B]`` each.

  Returns:
    :class:`LionProjectPassOutputs`.

  Raises:
    ValueError: naming the argument whose shape does not fit.
  """
  coefficients = _check_project('lion_project_pass_reference', g, a, v, q,
                                coefficients)
  c = launch_lib.expand_per_matrix(coefficients)
  g32 = g.astype(_F32)
  rec = jnp.einsum('bik,bjk->bij', a, v, precision=_HI)
  direction = step_math.lion_direction(rec, g32, c.b1, c.one_minus_b1)
  q_g = jnp.einsum('bil,bij->blj', q, step_math.clip_magnitude(
      g32, step_math.overflow_bound(*g.shape[-2:])), precision=_HI)
  return LionProjectPassOutputs(direction.astype(g.dtype), q_g)


def _lion_project_kernel(coef_ref, g_ref, a_ref, v_ref, q_ref, d_ref, qg_ref,
                         *, bm, bn, loop, bound, products):
  b, j, part = launch_lib.program()
  cols = launch_lib.block(j, bn)
  c = jax.tree.map(lambda ref: ref[b], coef_ref)
  v = products.cols(v_ref, b, cols)

  def body(i, acc):
    rows = launch_lib.block(i, bm)
    g = g_ref[b, rows, cols].astype(_F32)
    rec = products.outer(products.rows(a_ref, b, rows), v)
    d_ref[b, rows, cols] = step_math.lion_direction(
        rec, g, c.b1, c.one_minus_b1, products.arithmetic).astype(d_ref.dtype)
    return acc + products.project(q_ref, b, rows,
                                  step_math.clip_magnitude(g, bound))

  acc = jax.lax.fori_loop(*loop.blocks(part), body,
                          jnp.zeros((q_ref.shape[-1], bn), _F32))
  qg_ref[part, b, :, cols] = acc


def lion_project_pass(
    g: jax.Array, a: jax.Array, v: jax.Array, q: jax.Array,
    coefficients: LionCoefficients,
    *,
    config: launch_lib.KernelConfig = launch_lib.KernelConfig(),
    interpret: bool,
) -> LionProjectPassOutputs:
  """:func:`lion_project_pass_reference` as a Pallas kernel.

  Shape constraints, ``config`` and ``interpret`` as for
  :func:`lion_sketch_pass`.
  """
  coefficients = _check_project('lion_project_pass', g, a, v, q, coefficients,
                                config)
  batch, _, cols = g.shape

  def out_shape(parts):
    return (jax.ShapeDtypeStruct(g.shape, g.dtype),
            jax.ShapeDtypeStruct((parts, batch, q.shape[-1], cols), _F32))

  direction, q_g = launch_lib.launch(
      _lion_project_kernel, g, over='cols', out_shape=out_shape,
      args=(coefficients, g, a, v, q), config=config, interpret=interpret,
      name='mlorc_lion_project', width=q.shape[-1], rank=a.shape[-1])
  return LionProjectPassOutputs(direction, jnp.sum(q_g, axis=0))
