"""Transforms of ``mlorc-optim`` to chain with any optimizer (contrib).

The unofficial PyTorch ``mlorc-optim`` builds these into each optimizer; in
Optax they are separate transforms that compose with any optimizer:

* :func:`orthograd` (before the optimizer): removes the gradient component
  parallel to the weights (Prieto et al. 2025).
* :func:`grams` (around the optimizer's scaling): keeps the magnitude of the
  optimizer's update and takes its sign from the gradient (Cao et al. 2024).
* :func:`scale_by_adam_atan2`: Adam with ``atan2`` in place of ``eps``
  (Everett et al. 2024); ``low_rank_moments(scale_by_adam_atan2())`` is
  MLorc-Adam-atan2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import checks

ATAN2_A = 1.27
"""Adam-atan2's output scale ``a`` (about ``4 / pi``, so that a step with
``m_hat = sqrt(v_hat)`` has size ``a * pi / 4 ~ 1``, Adam's size)."""

ATAN2_B = 1.0
"""Adam-atan2's denominator scale ``b``."""


def _is_float(x: Any) -> bool:
  return x is not None and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def orthograd(*, rescale: bool = True) -> optax.GradientTransformation:
  """Removes from each gradient its component parallel to the weights.

  For every floating leaf, flattened to vectors ``w`` (the parameter) and
  ``g`` (the gradient):

  .. math::

    g_\\perp = g - \\frac{\\langle w, g\\rangle}{\\langle w, w\\rangle} w,
    \\qquad
    g \\leftarrow g_\\perp \\frac{\\lVert g\\rVert}{\\lVert g_\\perp\\rVert}
    \\ (\\text{if } \\texttt{rescale}),

  computed in float32 with ``1e-30`` added to both denominators (a zero
  weight leaves the gradient unchanged; a gradient parallel to the weight
  becomes zero). Chain it *before* the optimizer, on the raw gradients:
  ``optax.chain(orthograd(), mlorc_adamw(...))``. It needs the params, so
  call ``update(grads, state, params)``. The stateless counterpart of the
  ``OrthoGrad`` option of ``mlorc-optim`` (which follows the paper's code,
  rescale included); integer and ``None`` leaves pass through.

  Args:
    rescale: give ``g_perp`` the norm of ``g`` (the paper's implementation),
      or keep the plain projection.

  Returns:
    An ``optax.GradientTransformation`` with an ``optax.EmptyState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.contrib.orthograd(rescale=False)
    >>> params = {'w': jnp.array([1.0, 0.0])}
    >>> grads = {'w': jnp.array([3.0, 4.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['w']  # the part along w = (1, 0) is gone
    Array([0., 4.], dtype=float32)

  References:
    Prieto, Barsbey, Mediano & Birdal, *Grokking at the Edge of Numerical
    Stability*, https://arxiv.org/abs/2501.04697 (the ``⊥Grad`` optimizer).
  """
  rescale = checks.check_bool('rescale', rescale)

  def project(g, w):
    if not _is_float(g):
      return g
    g32 = jnp.ravel(g).astype(jnp.float32)
    w32 = jnp.ravel(w).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    proj = jnp.dot(w32, g32, precision=hi) / (
        jnp.dot(w32, w32, precision=hi) + 1e-30)
    perp = g32 - proj * w32
    if rescale:
      perp = perp * (jnp.linalg.norm(g32) / (jnp.linalg.norm(perp) + 1e-30))
    return perp.reshape(jnp.shape(g)).astype(g.dtype)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'orthograd needs the params: call update(grads, state, params).'
      )
    return jax.tree.map(project, updates, params,
                        is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init_fn, update_fn)


class GramsState(NamedTuple):
  """State of :func:`grams`: the wrapped transformation's state.

  Attributes:
    inner_state: the state of the transformation that :func:`grams` wraps.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> tx = mlorc_optax.contrib.grams(optax.scale_by_adam())
    >>> state = tx.init(jnp.zeros(3))
    >>> type(state.inner_state).__name__
    'ScaleByAdamState'

  References:
    Cao, Li, Liu, Wang & Wang, *Grams: Gradient Descent with Adaptive
    Momentum Scaling*, https://arxiv.org/abs/2412.17107.
  """

  inner_state: optax.OptState


def grams(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Takes the sign of ``inner``'s update from the gradient (Grams).

  Grams (Gradient Descent with Adaptive Momentum Scaling) keeps the
  magnitude of an adaptive update and replaces its direction by the current
  gradient's sign, elementwise:

  .. math::

    u = \\mathrm{sign}(g) \\odot |\\,\\mathrm{inner}(g)\\,|.

  It wraps the optimizer's scaling because it needs both the gradient and
  the scaled update: ``optax.chain(grams(scale_by_mlorc_adam(...)),
  optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr))`` is
  Grams-MLorc-AdamW with decoupled weight decay, as in the paper's
  Algorithm 1 (``sign(0) = 0``: a zero gradient entry gives a zero update).
  Wrap only the scaling, not the weight decay or the learning rate, whose
  signs must not change.

  Args:
    inner: the transformation whose update magnitude is kept, usually
      ``scale_by_mlorc_adam`` or ``optax.scale_by_adam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`GramsState`; extra arguments are passed on to ``inner``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> tx = mlorc_optax.contrib.grams(optax.scale(-2.0))  # magnitude 2|g|
    >>> grads = jnp.array([1.0, -3.0, 0.0])
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates  # sign of g, not of -2 g
    Array([ 2., -6.,  0.], dtype=float32)

  References:
    Cao, Li, Liu, Wang & Wang, *Grams: Gradient Descent with Adaptive
    Momentum Scaling*, https://arxiv.org/abs/2412.17107.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f'inner must be an optax.GradientTransformation, got {inner!r}.'
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return GramsState(inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    scaled, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args
    )
    out = jax.tree.map(
        lambda u, g: None if u is None else
        (jnp.sign(g) * jnp.abs(u)).astype(u.dtype),
        scaled,
        updates,
        is_leaf=lambda x: x is None,
    )
    return out, GramsState(inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def atan2_direction(
    m_hat: jax.Array, v_hat: jax.Array, a: float = ATAN2_A, b: float = ATAN2_B
) -> jax.Array:
  """Adam-atan2's step ``a * atan2(m_hat, b * sqrt(v_hat))``, elementwise."""
  return a * jnp.arctan2(m_hat, b * jnp.sqrt(v_hat))


def scale_by_adam_atan2(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    a: jax.typing.ArrayLike = ATAN2_A,
    b: jax.typing.ArrayLike = ATAN2_B,
) -> optax.GradientTransformation:
  """Rescales updates by Adam-atan2: Adam without ``eps``.

  ``optax.scale_by_adam`` with its last line replaced:

  .. math::

    u = a \\cdot \\mathrm{atan2}\\big(\\hat m,\\ b \\sqrt{\\hat v}\\big),

  which is ``a / b * m_hat / sqrt(v_hat)`` for small ratios, bounded by
  ``a * pi / 2``, zero where ``m_hat = 0`` and invariant to the scale of the
  gradients: no ``eps`` to tune or to swamp tiny gradients. The defaults
  ``a = 1.27``, ``b = 1`` are those of the reference PyTorch
  implementation (``adam-atan2-pytorch``; ``a ~ 4 / pi`` makes a step with
  ``m_hat = sqrt(v_hat)`` about Adam's size 1). Its state is
  ``optax.ScaleByAdamState``, so ``mlorc_optax.low_rank_moments`` compresses
  its moments like Adam's: MLorc-Adam-atan2.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    mu_dtype: dtype of the first moment (as in ``optax.scale_by_adam``).
    nesterov: Nadam-style first moment, as ``optax.scale_by_adam``.
    a: output scale.
    b: scale of ``sqrt(v_hat)`` inside ``atan2``.

  Returns:
    An ``optax.GradientTransformation`` with an ``optax.ScaleByAdamState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.contrib.scale_by_adam_atan2()
    >>> g = jnp.array([1e-3, -5.0, 0.0])
    >>> updates, _ = tx.update(g, tx.init(g))  # a * atan2(g, |g|) at step 1
    >>> updates  # about 1.27 * pi / 4 whatever the gradient's scale
    Array([ 0.99745136, -0.9974514 ,  0.        ], dtype=float32)

  References:
    Everett et al., *Scaling Exponents Across Parameterizations and
    Optimizers*, https://arxiv.org/abs/2407.05872 (Adam-atan2).
  """
  checks.check_beta('b1', b1)
  checks.check_beta('b2', b2)
  checks.check_nonnegative('a', a)
  checks.check_nonnegative('b', b)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(
          lambda m, g: b1 * m + (1 - b1) * g,
          optax.tree.bias_correction(
              mu, b1, optax.safe_increment(count_inc)
          ),
          optax.tree.bias_correction(updates, b1, count_inc),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree.map(
        lambda m, v: None if m is None else atan2_direction(m, v, a, b),
        mu_hat,
        nu_hat,
        is_leaf=lambda x: x is None,
    )
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
