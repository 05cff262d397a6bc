"""The two-pass step as an accelerated implementation of MLorc-Adam and -Lion.

:func:`mlorc_optax.low_rank_moments` hands the compressed leaves that its
plan gives to ``'pallas'`` or ``'xla'`` to a *fast step* instead of
reconstructing their moments and calling the inner optimizer: the two
streaming passes of :mod:`mlorc_optax._src.two_pass` compute the same update
and the same randomized SVD of the new moments (same sketches, drawn by the
compressor from the same keys) without ever storing a dense moment.

A fast step is the counterpart of one optax transform: :class:`AdamFastStep`
of ``optax.scale_by_adam`` and :class:`LionFastStep` of
``optax.scale_by_lion``, with the same hyperparameters. It only adapts
shapes (a leaf's matrix view with its batch axes flattened to one) and turns
the hyperparameters into the coefficients of the kernels; the bias
correction comes from ``optax.tree.bias_correction``, as in the reference
step, so it is written nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import compressors
from mlorc_optax._src import plan as plan_lib
from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math
from mlorc_optax._src import two_pass
from mlorc_optax._src.kernels import launch

# One compressed leaf: its plan, its gradient, the previous factors of each
# field of the fast step and the PRNG key of each field's sketch.
LeafInputs = tuple[plan_lib.LeafPlan, jax.Array, Sequence[Any],
                   Sequence[jax.Array]]


def _flat(x: jax.Array, batch: tuple[int, ...]) -> jax.Array:
  return jnp.reshape(x, (-1, *x.shape[len(batch):]))


def _unflat(x: jax.Array, batch: tuple[int, ...]) -> jax.Array:
  return jnp.reshape(x, (*batch, *x.shape[1:]))


def _inputs(leaf: LeafInputs, compressor: compressors.RSVDCompressor):
  """``(g [B, m, n], factors [B, ...], sketches [B, n, l])`` of a leaf."""
  p, g, factors, keys = leaf
  view = p.view
  batch = tuple(view.batch_shape)
  width = rsvd.sketch_width(view.rows, view.cols, p.rank,
                            compressor.oversample)
  omegas = [compressor.sketch(f, k, batch, view.cols, width)
            for f, k in zip(factors, keys)]
  return (_flat(view.to_matrix(g), batch),
          [rsvd.LowRankFactors(*(_flat(a, batch) for a in f))
           for f in factors],
          [_flat(o, batch) for o in omegas])


def _outputs(leaf: LeafInputs, direction: jax.Array, factors: Sequence[Any]):
  """Inverse of :func:`_inputs` for the update and the new factors."""
  p, g, _, _ = leaf
  batch = tuple(p.view.batch_shape)
  update = p.view.from_matrix(_unflat(direction, batch)).astype(g.dtype)
  return update, [rsvd.LowRankFactors(*(_unflat(a, batch) for a in f))
                  for f in factors]


@dataclasses.dataclass(frozen=True)
class AdamFastStep:
  """``optax.scale_by_adam``'s step for compressed ``mu`` and ``nu``.

  Attributes:
    b1, b2, eps, eps_root, nesterov: as ``optax.scale_by_adam``'s (may be
      traced values under ``optax.inject_hyperparams``).
  """

  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  nesterov: bool

  fields = ('mu', 'nu')

  def coefficients(self, count: jax.Array) -> step_math.AdamCoefficients:
    """The kernels' coefficients of the step that makes ``count + 1``."""
    one = jnp.ones([], jnp.float32)
    bias = lambda decay, t: optax.tree.bias_correction(one, decay, t)
    count_inc = optax.safe_increment(count)
    b1 = self.b1
    if self.nesterov:  # optax: b1 m_hat(t+1) + (1 - b1) g_hat(t)
      k_m = b1 * bias(b1, optax.safe_increment(count_inc))
      k_g = (1 - b1) * bias(b1, count_inc)
    else:
      k_m, k_g = bias(b1, count_inc), 0.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    # 1 - b before any cast (in float64 for Python floats), as optax
    # computes it: 1 - float32(0.999) is off by 5e-5 relative.
    return step_math.AdamCoefficients(
        one_minus_b1=f32(1 - self.b1), one_minus_b2=f32(1 - self.b2),
        k_m=f32(k_m), k_g=f32(k_g), c_v=f32(bias(self.b2, count_inc)),
        eps=f32(self.eps), eps_root=f32(self.eps_root))

  def __call__(self, leaves: Sequence[LeafInputs], *, count: jax.Array,
               compressor: compressors.RSVDCompressor,
               config: launch.KernelConfig, interpret: bool,
               complement: Mapping[str, Any] | None = None,
               bound: Any = None):
    """The update and new factors of each leaf.

    ``complement`` maps a field to the weight of its complement this step
    (``MomentSpec.complement``; only ``mu`` can have one), ``bound`` is the
    largest magnitude of an update entry (None: unbounded).
    """
    inputs = []
    for leaf in leaves:
      g, (mu, nu), (om, ov) = _inputs(leaf, compressor)
      inputs.append(two_pass.AdamLeafInputs(
          g, mu, nu, om, ov, use_kernel=leaf[0].step == 'pallas'))
    c = self.coefficients(count)
    if bound is not None:
      c = c._replace(bound=jnp.asarray(bound, jnp.float32))
    results = two_pass.adam_step(inputs, c, config=config,
                                 interpret=interpret,
                                 complement=(complement or {}).get('mu'))
    return [_outputs(leaf, d, (mu, nu))
            for leaf, (d, mu, nu) in zip(leaves, results)]


@dataclasses.dataclass(frozen=True)
class LionFastStep:
  """``optax.scale_by_lion``'s step for a compressed ``mu``.

  Attributes:
    b1, b2: as ``optax.scale_by_lion``'s.
  """

  b1: Any
  b2: Any

  fields = ('mu',)

  def __call__(self, leaves: Sequence[LeafInputs], *, count: jax.Array,
               compressor: compressors.RSVDCompressor,
               config: launch.KernelConfig, interpret: bool,
               complement: Mapping[str, Any] | None = None,
               bound: Any = None):
    """As :meth:`AdamFastStep.__call__`."""
    del count
    inputs = []
    for leaf in leaves:
      g, (mu,), (omega,) = _inputs(leaf, compressor)
      inputs.append(two_pass.LionLeafInputs(
          g, mu, omega, use_kernel=leaf[0].step == 'pallas'))
    results = two_pass.lion_step(inputs, self.b1, self.b2, config=config,
                                 interpret=interpret,
                                 complement=(complement or {}).get('mu'))
    if bound is not None:
      results = [(jnp.clip(d, -bound, bound), mu) for d, mu in results]
    return [_outputs(leaf, d, (mu,))
            for leaf, (d, mu) in zip(leaves, results)]
