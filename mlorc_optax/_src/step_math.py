"""The elementwise step math and small matrix helpers, written once.

Everything here is plain ``jax.numpy`` on arrays (no pytrees, no optax), so
the same function serves the ``jax.numpy`` specifications of the two-pass
step and the bodies of its Pallas kernels (:mod:`mlorc_optax._src.kernels`),
the randomized SVD (:mod:`mlorc_optax._src.rsvd`) and the compressors.

The reference step does not use the Adam and Lion functions below: there
``optax.scale_by_adam`` / ``optax.scale_by_lion`` compute the update from the
reconstructed moments (:mod:`mlorc_optax._src.low_rank`). The two-pass step
cannot call optax inside a kernel, so it computes the same update from the
coefficients of :class:`AdamCoefficients`, derived from optax's own bias
correction (:mod:`mlorc_optax._src.fast_steps`).

References:
  Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
  Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
  Algorithms 1 and 2 and equation (2).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Full float32 products: XLA's default on NVIDIA GPUs rounds float32 matmul
#: inputs to TF32 (1e-3 relative error).
HIGHEST = jax.lax.Precision.HIGHEST


class Arithmetic(NamedTuple):
  """The elementwise operations the step's math is written with.

  The functions below compute with them, so that one formula serves a
  ``jax.numpy`` specification (:data:`PLAIN`, IEEE operations) and a
  compiled kernel, which can hand in fused or approximate instructions
  (:data:`mlorc_optax._src.kernels.launch.FAST`): the Triton lowering of a
  Pallas kernel neither contracts ``a * b + c`` into one instruction nor
  offers one.

  Each broadcasts its operands against each other, as ``jax.numpy`` does.

  Attributes:
    fma: ``(a, b, c) -> a * b + c``.
    div: ``(a, b) -> a / b``.
    sqrt: ``a -> sqrt(a)``.
  """

  fma: Any
  div: Any
  sqrt: Any


#: IEEE ``jax.numpy`` operations: ``a * b + c`` rounded twice.
PLAIN = Arithmetic(fma=lambda a, b, c: a * b + c, div=jnp.divide,
                   sqrt=jnp.sqrt)


def mT(x: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """The matrix transpose of a batch ``[..., m, n] -> [..., n, m]``."""
  return jnp.swapaxes(x, -1, -2)


def unsharded_matrix(x: jax.Array) -> jax.Array:
  """``x [..., m, n]`` with its last two axes unsharded, where that is typed.

  Under a mesh with ``Explicit`` axes (``jax.make_mesh``'s default in recent
  jax) an array's sharding is part of its type, and the decompositions (QR,
  SVD, ``eigh``) reject one sharded along a matrix axis; this reshards such
  an array so that only its batch axes stay sharded. Under ``Auto`` axes
  (and on one device) the type carries no sharding, and ``x`` is returned as
  it is: XLA's partitioner places the decomposition itself.
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if spec is None or len(spec) < 2 or (spec[-1] is None and spec[-2] is None):
    return x
  return jax.sharding.reshard(x, sharding.update(
      spec=jax.sharding.PartitionSpec(*spec[:-2], None, None)))


def max_abs(x: jax.Array) -> jax.Array:
  """Per-matrix largest magnitude ``[..., 1, 1]``; 1 where 0 or not finite.

  Dividing a matrix by it before a factorization keeps products and Gram
  matrices of matrices of any finite scale (1e-30 or 1e30) in range.
  """
  scale = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def overflow_bound(rows: int, cols: int) -> float:
  """The magnitude above which moment entries are clipped before compression.

  A float32 ``g**2`` overflows for ``|g| > 1.8e19``; an infinite moment would
  give NaN factors and poison every later step (``optax.adamw`` merely keeps
  an infinite moment and makes a ~0 update). Entries are clipped to
  ``float32_max / (8 max(m, n))`` before they are sketched, projected or
  decomposed, so that the sums of up to ``max(m, n)`` products with a
  Gaussian sketch (``|Omega| <~ 6``) or an orthonormal basis (``|Q| <= 1``)
  and the singular values (``<= sqrt(mn) max|x|``) stay finite. The update of
  the step itself still sees the unclipped moment, as in ``optax.adam``.
  """
  return float(np.finfo(np.float32).max / (8.0 * max(rows, cols)))


#: Largest output ``a * b`` per matrix that :func:`inner` computes as a
#: reduction instead of a dot.
INNER_REDUCTION_MAX = 512


def inner(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x^T y`` per matrix, ``[..., a, b]`` for ``x [..., m, a]`` and
  ``y [..., m, b]`` with few columns: full-precision products and sums.

  With a small output (``a * b <=`` :data:`INNER_REDUCTION_MAX`) a
  multiply-and-sum over ``m`` rather than a dot: XLA runs it as a reduction
  spread over the long axis, with the products formed inside it, never
  stored, where a dot with so small an output runs on a few thread blocks
  whatever its size. On an H200 an ``[8, 11008, 8]`` Gram matrix took 31 us
  as a dot, and the reductions took the LLaMA-7B rank-4 step from 11.97 to
  10.66 ms; at rank 32 (``a * b = 1296``) they made it slower, the
  reduction's work growing with ``a * b`` where the dot's time does not
  (``benchmarks/README.md``).
  """
  if x.shape[-1] * y.shape[-1] <= INNER_REDUCTION_MAX:
    return jnp.sum(x[..., :, :, None] * y[..., :, None, :], axis=-3)
  return jnp.einsum('...ma,...mb->...ab', x, y, precision=HIGHEST)


def gram(x: jax.Array) -> jax.Array:
  """``x^T x`` per matrix, ``[..., l, l]`` for ``x [..., m, l]``
  (:func:`inner`)."""
  return inner(x, x)


def clip_magnitude(x: jax.Array, bound: float) -> jax.Array:
  """``x`` with every entry clipped to ``[-bound, bound]``.

  With ``bound = overflow_bound(m, n)`` this is what a moment (or a
  gradient) looks like to the compression: products of it with a sketch or
  an orthonormal basis stay finite.
  """
  return jnp.clip(x, -bound, bound)


# ----------------------------------------------------------------------------
# Adam (paper Algorithm 1).


class AdamCoefficients(NamedTuple):
  """The scalars of one Adam step.

  The update direction from the new moments ``m`` and ``v`` is

  .. math::

    d = \\operatorname{clip}\\Big(\\frac{k_m\\, m + k_g\\, g}{\\sqrt{c_v\\, v
    + \\epsilon_{root}} + \\epsilon},\\ -b,\\ b\\Big) ,

  with Adam's bias corrections ``k_m = 1 / (1 - b1^t)``, ``k_g = 0``,
  ``c_v = 1 / (1 - b2^t)``, or Nadam's ``k_m = b1 / (1 - b1^(t+1))``,
  ``k_g = (1 - b1) / (1 - b1^t)`` (same ``c_v``). The caller computes them
  (from optax's own bias correction); nothing here does.

  Each field is a float32 scalar or an array broadcastable against a tile
  (the Pallas passes take one value per matrix, ``[B]``).

  Attributes:
    one_minus_b1: ``1 - b1``, computed before any cast to float32
      (``1 - float32(0.999)`` is off by 5e-5 relative).
    one_minus_b2: ``1 - b2``, likewise.
    k_m: weight of the first moment.
    k_g: weight of the gradient (Nadam's look-ahead; 0 for Adam).
    c_v: bias correction of the second moment.
    eps: added to ``sqrt(c_v v + eps_root)``.
    eps_root: added to ``c_v v`` under the square root.
    bound: the largest magnitude of an entry of ``d`` (``inf``: no bound;
      see :func:`adam_update_bound`).
  """

  one_minus_b1: Any
  one_minus_b2: Any
  k_m: Any
  k_g: Any
  c_v: Any
  eps: Any
  eps_root: Any
  bound: Any = float('inf')


def adam_new_moments(
    rec_m: jax.Array,
    rec_v: jax.Array,
    g: jax.Array,
    zeta: Any,
    c: AdamCoefficients,
    ops: Arithmetic = PLAIN,
) -> tuple[jax.Array, jax.Array]:
  """The new moments from the scaled reconstructions of the old ones.

  .. math::

    m = \\beta_1 \\tilde m + (1 - \\beta_1)\\, g, \\qquad
    v = \\operatorname{fix}(\\beta_2 \\tilde v) + (1 - \\beta_2)\\, g^2 ,

  where the fix of paper equation (2) replaces each negative entry of the
  reconstruction by ``b2 zeta``, the mean magnitude of its negative entries.

  Args:
    rec_m: ``b1 U_m S_m V_m^T`` (the previous first moment's reconstruction,
      already scaled by ``b1``), float32.
    rec_v: ``b2 U_v S_v V_v^T``, float32.
    g: the gradient, float32.
    zeta: ``b2 * zeta`` (scalar or broadcastable).
    c: the step's :class:`AdamCoefficients` (reads ``one_minus_b1`` and
      ``one_minus_b2``).
    ops: the :class:`Arithmetic` to compute with.

  Returns:
    ``(m, v)``, float32, shaped like ``g``.
  """
  return (ops.fma(c.one_minus_b1, g, rec_m),
          adam_new_second_moment(rec_v, g, zeta, c, ops))


def adam_new_second_moment(
    rec_v: jax.Array, g: jax.Array, zeta: Any, c: AdamCoefficients,
    ops: Arithmetic = PLAIN,
) -> jax.Array:
  """``v = fix(b2 v~) + (1 - b2) g**2``, the second moment of
  :func:`adam_new_moments` (same arguments)."""
  return ops.fma(c.one_minus_b2, g * g, jnp.where(rec_v < 0, zeta, rec_v))


def adam_direction(
    m: jax.Array, v: jax.Array, g: jax.Array, c: AdamCoefficients,
    ops: Arithmetic = PLAIN,
) -> jax.Array:
  """``(k_m m + k_g g) / (sqrt(c_v v + eps_root) + eps)``, clipped to
  ``[-bound, bound]`` (float32), computed with ``ops``."""
  return adam_ratio(ops.fma(c.k_g, g, c.k_m * m), v, c, ops)


def adam_ratio(
    num: jax.Array, v: jax.Array, c: AdamCoefficients,
    ops: Arithmetic = PLAIN,
) -> jax.Array:
  """``num / (sqrt(c_v v + eps_root) + eps)``, clipped to ``[-bound,
  bound]`` (float32): :func:`adam_direction` given its numerator ``num =
  k_m m + k_g g``."""
  den = ops.sqrt(ops.fma(c.c_v, v, c.eps_root)) + c.eps
  return jnp.clip(ops.div(num, den), -c.bound, c.bound)


def adam_folded_numerator(c: AdamCoefficients) -> tuple[Any, Any]:
  """``(k_m, k_g')`` such that Adam's numerator is one multiply-add.

  With ``m = rec_m + (1 - b1) g`` (:func:`adam_new_moments`),

  .. math::

    k_m\\, m + k_g\\, g = (k_m\\, \\mathrm{rec}_m)
    + \\big(k_m (1 - \\beta_1) + k_g\\big)\\, g ,

  so a caller that needs ``m`` only through the numerator scales the
  reconstruction's factor by ``k_m`` (the first value) and computes
  ``fma(k_g', g, k_m rec_m)`` with ``k_g'`` the second: one multiply-add per
  entry where ``m`` and the numerator took three. Each is computed as the
  fields are given (scalars or per-matrix arrays).
  """
  return c.k_m, c.k_m * c.one_minus_b1 + c.k_g


def adam_update_bound(b1: Any, b2: Any, count: Any, nesterov: bool) -> Any:
  """The largest entry that dense Adam's update can have at step ``count``.

  With ``m_t = sum_i (1 - b1) b1^(t-i) g_i`` and ``v_t = sum_i (1 - b2)
  b2^(t-i) g_i^2`` (both started at zero), Cauchy-Schwarz gives, for every
  gradient sequence and every entry,

  .. math::

    m_t^2 \\le C_t^2\\, v_t,\\qquad C_t^2 = \\frac{(1 - b_1)^2}{1 - b_2}
    \\sum_{j < t} \\Big(\\frac{b_1^2}{b_2}\\Big)^j ,

  so Adam's ``|m_hat| / sqrt(v_hat)`` is at most ``C_t sqrt(1 - b2^t) /
  (1 - b1^t)`` (1 at ``t = 1``; about 7.27 for ``b1 = 0.9``, ``b2 = 0.999``
  and 10.5 for ``b1 = 0.8`` once ``t`` is large), and ``eps``,
  ``eps_root`` only make it smaller. For Nadam's ``b1 m_t / (1 - b1^(t+1)) +
  (1 - b1) g_t / (1 - b1^t)``, ``|g_t| <= sqrt(v_t / (1 - b2))`` bounds the
  second term. MLorc's reconstructed second moment can be far smaller than
  ``m^2`` where the compression errs, which gives steps dense Adam can never
  take; clipping to this bound removes exactly those.

  Args:
    b1, b2: Adam's decays (scalars, possibly traced).
    count: the step number ``t >= 1`` (after the increment).
    nesterov: the bound of Nadam's update instead.

  Returns:
    A float32 scalar.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  t = f32(count)
  b1, b2 = f32(b1), f32(b2)
  rho = b1 * b1 / b2
  # sum_{j<t} rho^j, also where rho = 1 (b1^2 = b2).
  series = jnp.where(jnp.abs(1 - rho) > 1e-6,
                     (1 - rho**t) / jnp.where(rho == 1, 1.0, 1 - rho), t)
  c_t = (1 - b1) * jnp.sqrt(series / (1 - b2))
  root = jnp.sqrt(1 - b2**t)
  if not nesterov:
    return c_t * root / (1 - b1**t)
  return root * (b1 * c_t / (1 - b1**(t + 1))
                 + (1 - b1) / ((1 - b1**t) * jnp.sqrt(1 - b2)))


def complement_weight(scale: Any, decay: Any, count: Any) -> Any:
  """Weight of the first moment's complement at step ``count`` (float32).

  ``scale (1 - decay^(t-1))``: the share of the gradient that an EMA with
  this decay, started at zero, holds after ``t - 1`` steps of a gradient
  present in every one of them (0 at ``t = 1``). See :func:`out_of_span`.
  """
  t = jnp.asarray(count, jnp.float32)
  return jnp.asarray(scale, jnp.float32) * (
      1 - jnp.asarray(decay, jnp.float32)**(t - 1))


def out_of_span(g: jax.Array, u: jax.Array) -> jax.Array:
  """``(I - U U^T) g``: the part of ``g [..., m, n]`` outside ``span(U)``.

  ``U [..., m, k]`` has orthonormal columns (or zero columns, which span
  nothing). This is what MLorc's compressed first moment cannot hold: its
  history lives in ``span(U)`` (paper Algorithm 1), so a direction outside
  it gets only ``(1 - b1) g`` per step, where a dense EMA would build up to
  ``g`` for a gradient that persists.
  """
  u = unsharded_matrix(u)  # small; so that U^T g is a well-typed product
  p = jnp.einsum('...mk,...mn->...kn', u, g, precision=HIGHEST)
  return g - jnp.einsum('...mk,...kn->...mn', u, p, precision=HIGHEST)


def span_norm_ratio(d: jax.Array, g: jax.Array, u: jax.Array) -> jax.Array:
  """``||U^T d|| / ||U^T g||`` per matrix, ``[..., 1, 1]`` (0 where
  ``U^T g = 0``).

  With ``U [..., m, k]`` orthonormal, the factor by which an optimizer that
  turned ``g`` into ``d`` scaled the gradient inside ``span(U)``: Fira's
  norm-based scaling of the gradient outside a low-rank subspace (Chen et
  al. 2024, https://arxiv.org/abs/2410.01623), with MLorc's first-moment
  span as the subspace.
  """
  u = unsharded_matrix(u)
  norm = lambda x: jnp.sqrt(jnp.sum(
      jnp.einsum('...mk,...mn->...kn', u, x, precision=HIGHEST)**2,
      axis=(-2, -1), keepdims=True))
  den = norm(g)
  return jnp.where(den > 0, norm(d) / jnp.where(den > 0, den, 1.0), 0.0)


class AdamSketchTerms(NamedTuple):
  """The elementwise terms pass 1 of the two-pass Adam step sketches.

  With ``r = b2 U_v S_v V_v^T`` (the previous second moment's reconstruction,
  scaled) and ``r_- = max(-r, 0)``, the fixed new second moment is
  ``r + x + b2 zeta 1{r < 0}`` (up to the clipping of ``x``), linear in
  ``zeta`` (see :mod:`mlorc_optax._src.two_pass`).

  Attributes:
    g: the gradient clipped at the overflow bound.
    x: ``min((1 - b2) g**2, bound) + r_-``.
    nonpositive: ``min(r, 0) = -r_-`` (kept negated: ``x`` subtracts it,
      which costs a kernel no separate negation).
    negative: ``1{r < 0}`` as float32.
  """

  g: jax.Array
  x: jax.Array
  nonpositive: jax.Array
  negative: jax.Array


def adam_sketch_terms(
    g: jax.Array, rec_v: jax.Array, one_minus_b2: Any, bound: float
) -> AdamSketchTerms:
  """The :class:`AdamSketchTerms` of a float32 gradient ``g`` (or tile).

  Args:
    g: the gradient, float32.
    rec_v: ``b2 U_v S_v V_v^T``, float32, shaped like ``g``.
    one_minus_b2: ``1 - b2`` (scalar or broadcastable).
    bound: :func:`overflow_bound` of the matrix.
  """
  g = clip_magnitude(g, bound)
  nonpositive = jnp.minimum(rec_v, 0.0)
  x = jnp.minimum(one_minus_b2 * (g * g), bound) - nonpositive
  negative = (rec_v < 0).astype(jnp.float32)
  return AdamSketchTerms(g, x, nonpositive, negative)


def adam_projection_terms(
    m: jax.Array, v: jax.Array, bound: float
) -> tuple[jax.Array, jax.Array]:
  """The new moments as pass 2 projects them: clipped at ``bound``.

  ``v >= 0`` (the fix removed the negative entries), so it is clipped from
  above only (:func:`second_moment_projection_term`).
  """
  return clip_magnitude(m, bound), second_moment_projection_term(v, bound)


def second_moment_projection_term(v: jax.Array, bound: float) -> jax.Array:
  """The new second moment as pass 2 projects it (the second value of
  :func:`adam_projection_terms`): ``v >= 0``, clipped from above only."""
  return jnp.minimum(v, bound)


# ----------------------------------------------------------------------------
# Lion (paper Algorithm 2).


def lion_direction(
    rec: jax.Array, g: jax.Array, b1: Any, one_minus_b1: Any,
    ops: Arithmetic = PLAIN,
) -> jax.Array:
  """Lion's update ``sign(b1 U S V^T + (1 - b1) g)`` (float32).

  Args:
    rec: ``U S V^T``, the previous momentum's reconstruction (unscaled).
    g: the gradient, float32.
    b1: Lion's interpolation coefficient of the update.
    one_minus_b1: ``1 - b1``, computed before any cast.
    ops: the :class:`Arithmetic` to compute with.
  """
  return jnp.sign(ops.fma(b1, rec, one_minus_b1 * g))
