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

Leaves whose plan has a :class:`~mlorc_optax._src.plan.Placement` (a
parameter on a mesh of several devices, seen by ``init``) are computed
inside one ``jax.shard_map`` per mesh: each device gets its shard of the
gradient (the parameter's ``PartitionSpec``), of the factors (placed by
:func:`mlorc_optax.factor_partition_specs`) and of the sketches (drawn whole,
from the same keys, and split like ``v``), and the two passes complete their
rank-sized sums across the mesh axes that split the rows or the columns
(:class:`~mlorc_optax._src.two_pass.MatrixAxes`). Each device writes its own
shard of the update and of the new factors, placed as they came in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from mlorc_optax._src import compressors
from mlorc_optax._src import plan as plan_lib
from mlorc_optax._src import rsvd
from mlorc_optax._src import sharding
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


class _Local(NamedTuple):
  """One leaf as the passes take it: ``(g [B, m, n], factors [B, ...] per
  field, sketches [B, n, l] per field)``, on one device's shard inside
  ``shard_map``, and the mesh axes that split its matrices."""

  g: jax.Array
  factors: list[rsvd.LowRankFactors]
  omegas: list[jax.Array]
  axes: two_pass.MatrixAxes


def _sketches(leaves: Sequence[LeafInputs],
              compressor: compressors.RSVDCompressor) -> list[list[Any]]:
  """Per leaf and field, its sketch: ``compressor.sketch`` of its factors
  and key, drawn whole.

  Draws of equal shapes for unplaced leaves (equal-shaped leaves of an
  unstacked model on one device) are made in one vectorized call, which
  gives the values of one call each without a launch per leaf and field.
  A placed leaf's sketch is drawn alone, so that XLA draws it as
  ``shard_map`` splits it instead of moving a stacked draw's shards.
  """
  draws: dict[Any, list[tuple[int, int]]] = {}
  for i, (p, _, factors, _) in enumerate(leaves):
    view = p.view
    width = rsvd.sketch_width(view.rows, view.cols, p.rank,
                              compressor.oversample)
    for j, f in enumerate(factors):
      shapes = tuple((jnp.shape(x), jnp.result_type(x))
                     for x in jax.tree.leaves(f))
      alone = (i, j) if p.placement is not None else None
      draws.setdefault((view.batch_shape, view.cols, width, type(f), shapes,
                        alone), []).append((i, j))
  out = [[None] * len(factors) for _, _, factors, _ in leaves]
  for (batch, cols, width, *_), members in draws.items():
    if len(members) == 1:
      (i, j), = members
      out[i][j] = compressor.sketch(leaves[i][2][j], leaves[i][3][j], batch,
                                    cols, width)
      continue
    stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])
    factors = jax.tree.map(stack, *[leaves[i][2][j] for i, j in members])
    keys = stack(*[leaves[i][3][j] for i, j in members])
    drawn = jax.vmap(
        lambda f, k: compressor.sketch(f, k, batch, cols, width))(factors,
                                                                  keys)
    for n, (i, j) in enumerate(members):
      out[i][j] = drawn[n]
  return out


def _matrix_axes(p: plan_lib.LeafPlan) -> two_pass.MatrixAxes:
  """The mesh axes (of more than one device) that split the rows and the
  columns of a leaf's matrices; none without a placement."""
  where = p.placement
  if where is None:
    return two_pass.MatrixAxes()
  names = lambda axes: tuple(name for a in axes for name in where.mesh_axes(a)
                             if where.mesh.shape[name] > 1)
  return two_pass.MatrixAxes(names(p.view.row_axes), names(p.view.col_axes))


def _specs(p: plan_lib.LeafPlan, fields: int) -> tuple[Any, Any, Any]:
  """``shard_map`` specs of a leaf's ``(gradient, factors, sketches)``."""
  u, s, v, _ = sharding.factor_partition_specs(p, p.placement.spec)
  return (p.placement.spec, [rsvd.LowRankFactors(u, s, v)] * fields,
          [v] * fields)


def _run(
    leaves: Sequence[LeafInputs],
    compressor: compressors.RSVDCompressor,
    step: Callable[..., list[tuple[jax.Array, Sequence[Any]]]],
    scalars: Any,
) -> list[tuple[jax.Array, list[rsvd.LowRankFactors]]]:
  """``step`` over the leaves, on each device's shards where placed.

  Args:
    leaves: the compressed leaves.
    compressor: draws the sketches (whole, from each field's key).
    step: ``(list of _Local, *scalars) -> per leaf (direction [B, m, n],
      new factors per field)``; the leaves' matrices are whole or, inside
      ``shard_map``, one device's shard.
    scalars: a tuple of the step's coefficients (replicated): arrays
      (possibly traced) are passed into ``shard_map``, anything else (Python
      floats, None) is closed over, so that ``1 - b`` of a Python float is
      still computed before any cast.

  Returns:
    Per leaf ``(update, new factors per field)``, shaped like the parameter
    and its factors.
  """
  whole = [(g, [rsvd.LowRankFactors(*map(jnp.asarray, f)) for f in factors],
            omegas)
           for (_, g, factors, _), omegas in zip(
               leaves, _sketches(leaves, compressor))]

  def local(plans, arrays, values):
    inputs, views = [], []
    for p, (g, factors, omegas) in zip(plans, arrays):
      # This device's shard (or the whole leaf) as a batch of matrices.
      view = dataclasses.replace(p.view, shape=tuple(g.shape))
      batch = view.batch_shape
      inputs.append(_Local(
          _flat(view.to_matrix(g), batch),
          [rsvd.LowRankFactors(*(_flat(a, batch) for a in f))
           for f in factors],
          [_flat(o, batch) for o in omegas], _matrix_axes(p)))
      views.append(view)
    out = []
    for view, (g, _, _), (direction, factors) in zip(
        views, arrays, step(inputs, *with_values(values))):
      batch = view.batch_shape
      out.append((view.from_matrix(_unflat(direction, batch)).astype(g.dtype),
                  [rsvd.LowRankFactors(*(_unflat(a, batch) for a in f))
                   for f in factors]))
    return out

  flat, tree = jax.tree.flatten(scalars)
  dynamic = [isinstance(x, jax.Array) for x in flat]

  def with_values(values):
    values = iter(values)
    return tree.unflatten([next(values) if d else x
                           for x, d in zip(flat, dynamic)])

  values = [x for x, d in zip(flat, dynamic) if d]
  # One shard_map per mesh (in practice, one); unplaced leaves run whole.
  meshes: dict[Any, list[int]] = {}
  for i, (p, *_) in enumerate(leaves):
    meshes.setdefault(p.placement and p.placement.mesh, []).append(i)
  results: list[Any] = [None] * len(leaves)
  for mesh, idx in meshes.items():
    plans = [leaves[i][0] for i in idx]
    arrays = [whole[i] for i in idx]
    if mesh is None:
      out = local(plans, arrays, values)
    else:
      specs = [_specs(p, len(a[1])) for p, a in zip(plans, arrays)]
      if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
        # Typed shardings must equal the specs shard_map is given.
        arrays = jax.tree.map(
            lambda x, spec, m=mesh: jax.sharding.reshard(
                x, NamedSharding(m, spec)), arrays, specs)
      out = jax.shard_map(
          functools.partial(local, plans), mesh=mesh,
          in_specs=(specs, PartitionSpec()),
          out_specs=[(g, f) for g, f, _ in specs],
          check_vma=False)(arrays, values)
    for i, result in zip(idx, out):
      results[i] = result
  return results


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
    kernel = [leaf[0].step == 'pallas' for leaf in leaves]

    def step(inputs, c, alpha):
      results = two_pass.adam_step(
          [two_pass.AdamLeafInputs(x.g, *x.factors, *x.omegas, use_kernel=k,
                                   axes=x.axes)
           for x, k in zip(inputs, kernel)],
          c, config=config, interpret=interpret, complement=alpha)
      return [(d, (mu, nu)) for d, mu, nu in results]

    c = self.coefficients(count)
    if bound is not None:
      c = c._replace(bound=jnp.asarray(bound, jnp.float32))
    return _run(leaves, compressor, step, (c, (complement or {}).get('mu')))


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
    kernel = [leaf[0].step == 'pallas' for leaf in leaves]

    def step(inputs, b1, b2, alpha, bound):
      results = two_pass.lion_step(
          [two_pass.LionLeafInputs(x.g, *x.factors, *x.omegas, use_kernel=k,
                                   axes=x.axes)
           for x, k in zip(inputs, kernel)],
          b1, b2, config=config, interpret=interpret, complement=alpha)
      if bound is not None:
        results = [(jnp.clip(d, -bound, bound), mu) for d, mu in results]
      return [(d, (mu,)) for d, mu in results]

    return _run(leaves, compressor, step,
                (self.b1, self.b2, (complement or {}).get('mu'), bound))
