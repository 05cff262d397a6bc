"""MLorc around any optax optimizer: moments stored as low-rank factors.

The MLorc paper's claim is that momentum low-rank compression applies to any
momentum-based optimizer: reconstruct the moments, let the base optimizer
update them from the full-size moments, recompress. :func:`low_rank_moments`
is that claim as an optax transform. For an ``inner`` transform whose state
holds params-shaped moment trees (``optax.scale_by_adam``'s ``mu`` and ``nu``,
``optax.scale_by_lion``'s ``mu``, ADOPT's, AdEMAMix's ``m1``, ``m2``, ``nu``,
D-Adaptation's ``exp_avg``, ``exp_avg_sq``, ``grad_sum``, ...), each step

1. reads every compressed moment back from its factors in float32
   (:meth:`~mlorc_optax.compressors.MomentCompressor.read`; non-negative
   moments get the fix of paper equation 2),
2. calls ``inner.update`` with those dense moments, so the inner optimizer
   computes its update from the *uncompressed* new moments exactly as it
   always does (bias correction, nesterov, ``eps_root``, ...),
3. recompresses the new moments it returns
   (:meth:`~mlorc_optax.compressors.MomentCompressor.update`; the paper's
   randomized SVD by default).

Leaves that are not compressed keep the inner optimizer's dense moments, and
the wrapper never touches fields that are not moments (counters, learning
rate estimates). Between steps the state holds, in place of each compressed
leaf of a moment tree, the compressor's factors
(``state.inner_state.mu['w']`` is a :class:`~mlorc_optax.LowRankFactors`).

Everything decided about a leaf (compressed or not, its matrix view, which
step computes it) is decided once in ``init`` and kept in the state as a
:class:`~mlorc_optax.plan.LowRankPlan`. Leaves whose plan says
``'pallas'`` or ``'xla'`` are computed by an accelerated implementation of
the same step (``fast_step``, for Adam and Lion:
:class:`~mlorc_optax.low_rank.AdamFastStep`,
:class:`~mlorc_optax.low_rank.LionFastStep`) instead
of steps 1-3, which never materialises their dense moments.

Randomness: the state holds a raw ``uint32[2]`` PRNG key, ``sketch_key``, that
never changes.
At step ``t`` (the state's ``step`` before the update), the sketch of the
moment field with index ``j`` (its position among the inner state's moment
fields: 0 for ``mu``, 1 for ``nu``) of the ``i``-th compressed leaf in
tree-flatten order is drawn from

``fold_in(fold_in(fold_in(key, t), i), j)``

as ``jax.random.normal(k, (*batch_shape, n, l), float32)`` with
``l = min(rank + oversample, m, n)``. It depends on nothing else (never on
the device), so replicas that share the state draw identical sketches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlorc_optax._src import checks
from mlorc_optax._src import compressors as compressors_lib
from mlorc_optax._src import moment_fields
from mlorc_optax._src import plan as plan_lib
from mlorc_optax._src import sharding
from mlorc_optax._src import step_math
from mlorc_optax._src import views
from mlorc_optax._src.kernels import launch


class MomentSpec(NamedTuple):
  """How :func:`low_rank_moments` treats one moment field of a state.

  Attributes:
    nonnegative: the moment is non-negative (an EMA of ``g**2``): its
      reconstruction gets the fix of paper equation 2.
    decay: the moment's EMA decay, where known. Compressors that model the
      EMA itself (LoRA-Pre, :mod:`mlorc_optax.contrib`) and ``complement``
      need it.
    complement: weight ``lambda >= 0`` of the moment's *complement* (0: the
      paper's step). The compressed moment keeps its history only in the
      span of its left factor ``U``; a gradient direction outside it gets
      ``(1 - decay) g`` per step however long it persists, where a dense
      EMA would build up to ``g``. With ``lambda > 0``, the gradient's part
      outside the span, ``(I - U U^T) g``, is credited with the history a
      gradient present in every earlier step would have built:
      ``lambda (1 - decay^(t-1)) (I - U U^T) g`` is added to the
      reconstructed moment handed to the inner optimizer (which computes its
      update from it), and ``decay`` times it is removed from the new moment
      before recompression, so the stored moment is the paper's. With
      ``lambda = 1`` such a direction gets the update of a persistent
      gradient (for Adam, ``m_hat = g`` outside the span: every direction a
      momentum-free full step, as FRUGAL and Fira do for GaLore); the first
      step is unchanged, and so is every leaf whose factors do not truncate
      (rank ``>= min(m, n)``, :attr:`~mlorc_optax.plan.LeafPlan.truncates`),
      whose moment is exact. Needs ``decay``, a moment that may be negative and
      a compressor with an orthonormal
      :meth:`~mlorc_optax.compressors.MomentCompressor.left_basis`.
    complement_mode: how the complement ``c = lambda (1 - decay^(t-1)) (I -
      U U^T) g`` enters the step (:data:`COMPLEMENT_MODES`):

      * ``'moment'`` (default): as above, added to the moment the inner
        optimizer reads, never stored; the only mode the two-pass step
        computes.
      * ``'state'``: added, and kept in the stored moment too (the new
        moment recompressed is ``decay (tilde m + c) + (1 - decay) g``), so
        the compressed subspace also follows a gradient that persists
        outside it.
      * ``'norm'``: Fira's norm-based scaling (Chen et al. 2024) instead:
        the moment is left alone and the update ``d`` of the inner optimizer
        gets ``phi c`` added, with ``phi = ||U^T d|| / ||U^T g||`` per
        matrix, the factor by which the optimizer scaled the gradient inside
        the span (Frobenius norms; 0 where ``U^T g = 0``).

  Examples:
    >>> import mlorc_optax
    >>> mlorc_optax.low_rank.DEFAULT_MOMENTS['nu']
    MomentSpec(nonnegative=True, decay=None, complement=0.0, complement_mode='moment')

  References:
    Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint?*, https://arxiv.org/abs/2410.01623 (the norm-based
    scaling of the out-of-subspace gradient).
  """

  nonnegative: bool = False
  decay: Any = None
  complement: Any = 0.0
  complement_mode: str = 'moment'


#: The values of ``MomentSpec.complement_mode``.
COMPLEMENT_MODES: tuple[str, ...] = ('moment', 'state', 'norm')


#: The moment fields of optax's own states that :func:`low_rank_moments`
#: compresses by default: ``mu`` and ``nu`` (``scale_by_adam``, ``adamw``,
#: ``scale_by_lion``, ``contrib.scale_by_adopt``, ``scale_by_amsgrad``, ...),
#: ``m1``, ``m2`` (``contrib.scale_by_ademamix``), ``exp_avg``,
#: ``exp_avg_sq``, ``grad_sum`` (``contrib.dadapt_adamw``, ``contrib.prodigy``)
#: and ``trace`` (``optax.trace``: SGD with momentum).
DEFAULT_MOMENTS: Mapping[str, MomentSpec] = {
    'mu': MomentSpec(),
    'nu': MomentSpec(nonnegative=True),
    'm1': MomentSpec(),
    'm2': MomentSpec(),
    'exp_avg': MomentSpec(),
    'exp_avg_sq': MomentSpec(nonnegative=True),
    'grad_sum': MomentSpec(),
    'trace': MomentSpec(),
}


class LowRankMomentsState(NamedTuple):
  """State of :func:`low_rank_moments`.

  Attributes:
    step: int32 number of updates applied (the ``t`` of the sketch keys).
    sketch_key: raw ``uint32[2]`` PRNG key from which every sketch is
      derived (the transform's ``seed``). Reseed a state without building a
      new transform (and so without recompiling a step that closes over
      it) with ``optax.tree.set(state, sketch_key=jax.random.key_data(
      jax.random.key(seed)))``: the field's name is unique in the state.
    inner_state: the inner optimizer's state, in which every compressed leaf
      of a moment tree holds the compressor's factors instead of the dense
      moment (:class:`~mlorc_optax.LowRankFactors` ``(u, s, v)`` for the
      randomized SVD).
    plan: the :class:`~mlorc_optax.plan.LowRankPlan` made by ``init``, as
      a :class:`~mlorc_optax.plan.PlanNode` (``state.plan.leaves``, ...):
      static data of the state's tree structure, no arrays.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> state = mlorc_optax.scale_by_mlorc_adam(rank=4).init(params)
    >>> state.inner_state.mu['w'].u.shape, state.inner_state.mu['w'].v.shape
    ((64, 4), (32, 4))
    >>> state.inner_state.nu['b'].shape  # not compressed: Adam's own moment
    (32,)
  """

  step: jax.Array
  sketch_key: jax.Array
  inner_state: optax.OptState
  plan: plan_lib.PlanNode


# A fast step: computes the update and the new factors of its fields for the
# leaves the plan gives it (see fast_steps.py). Anything with these members.
FastStep = Any


def _moment_specs(moments: Any) -> dict[str, MomentSpec]:
  """``moments=`` as a dict name -> MomentSpec; raises naming it."""
  if moments is None:
    return dict(DEFAULT_MOMENTS)
  if isinstance(moments, str):
    moments = (moments,)
  if isinstance(moments, Mapping):
    out = {}
    for name, spec in moments.items():
      if isinstance(spec, (bool, np.bool_)):
        spec = MomentSpec(nonnegative=bool(spec))
      if not isinstance(name, str) or not isinstance(spec, MomentSpec):
        raise TypeError(
            'moments must map field names to MomentSpec (or a bool: '
            f'non-negative), got {name!r}: {spec!r}.'
        )
      out[name] = spec
  else:
    names = tuple(moments)
    unknown = [n for n in names if n not in DEFAULT_MOMENTS]
    if unknown:
      raise ValueError(
          f'moments names {unknown} that DEFAULT_MOMENTS does not know; give '
          'a mapping name -> MomentSpec for them.'
      )
    out = {n: DEFAULT_MOMENTS[n] for n in names}
  if not out:
    raise ValueError('moments must name at least one moment field.')
  return out


def _check_complements(specs: Mapping[str, MomentSpec],
                       compressor: compressors_lib.MomentCompressor) -> None:
  """Raises, naming ``moments``, where a complement cannot be computed."""
  for name, spec in specs.items():
    if spec.complement_mode not in COMPLEMENT_MODES:
      raise ValueError(
          f'moments[{name!r}].complement_mode must be one of '
          f'{COMPLEMENT_MODES}, got {spec.complement_mode!r}.')
    if not checks.is_nonzero_weight(spec.complement):
      continue
    checks.check_nonnegative(f'moments[{name!r}].complement',
                             spec.complement)
    why = None
    if spec.nonnegative:
      why = 'it is a non-negative moment (an EMA of g**2)'
    elif spec.decay is None:
      why = 'it has no decay (set MomentSpec(decay=...))'
    elif not compressors_lib.has_left_basis(compressor):
      why = (f'the compressor {type(compressor).__name__} has no orthonormal '
             'left_basis')
    if why:
      hint = ('' if not isinstance(spec.complement, jax.core.Tracer) else
              ' (it is traced: under optax.inject_hyperparams pass '
              'static_args=mlorc_optax.STATIC_ARGS, which lists complement)')
      raise ValueError(
          f'moments[{name!r}].complement is {spec.complement!r}{hint}, but '
          f'{why}.')


# ----------------------------------------------------------------------------
# The transform.


def _sketch_key(key: jax.Array, step: jax.Array, leaf: Any,
                field: Any) -> jax.Array:
  """The key of the sketch of moment field ``field`` of compressed leaf
  ``leaf`` at step ``step``: ``fold_in(fold_in(fold_in(key, step), leaf),
  field)`` (module docstring)."""
  fold_in = jax.random.fold_in
  return fold_in(fold_in(fold_in(key, step), leaf), field)


def _sketch_keys(key: jax.Array, step: jax.Array, leaves: Sequence[int],
                 fields: Sequence[int]) -> jax.Array:
  """``[len(leaves), len(fields), ...]``: :func:`_sketch_key` of each leaf
  and field, hashed in one vectorized call: the same keys as one call each,
  without a launch per leaf and field, and one expansion of the hash in the
  compiled program instead of three per key (on a 2-core CPU the update of a
  tiny LLaMA with 8 compressed leaves, reference step, compiled in 3.2 s
  instead of 3.7 s with a call per key)."""
  leaf = jnp.asarray(leaves, jnp.uint32)[:, None]
  field = jnp.asarray(fields, jnp.uint32)[None, :]
  shape = (len(leaves), len(fields))
  one = lambda i, j: _sketch_key(key, step, i, j)
  return jax.vmap(jax.vmap(one))(jnp.broadcast_to(leaf, shape),
                                 jnp.broadcast_to(field, shape))


def _zero_factors(p: plan_lib.LeafPlan, leaf: Any, compressor, dtype,
                  nonnegative: bool) -> Any:
  """Zero factors of a compressed leaf, placed like a sharded parameter."""
  placed = None
  if not isinstance(leaf, jax.core.Tracer):
    placed = sharding.factor_shardings(p, getattr(leaf, 'sharding', None))
  u_sh, s_sh, v_sh, _ = placed or (None,) * 4
  where = {'rows': u_sh, 'batch': s_sh, 'cols': v_sh}
  view = p.view
  specs = compressor.specs(view.batch_shape, view.rows, view.cols, p.rank,
                           nonnegative=nonnegative)
  return type(specs)(*(
      jnp.zeros(spec.shape, dtype, device=where[spec.placement])
      for spec in specs
  ))


def low_rank_moments(
    inner: optax.GradientTransformation,
    *,
    rank: int = 4,
    compressor: compressors_lib.MomentCompressor | None = None,
    moments: Mapping[str, MomentSpec] | Sequence[str] | None = None,
    seed: int | jax.Array = 0,
    factor_dtype: jax.typing.DTypeLike = jnp.float32,
    low_rank_mask: plan_lib.MaskSpec = None,
    dimension_numbers: plan_lib.DimensionSpec = None,
    implementation: str | None = None,
    fast_step: FastStep | None = None,
    kernel_config: launch.KernelConfig | None = None,
    update_bound: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Stores ``inner``'s moments as low-rank factors between steps (MLorc).

  For every compressed leaf, viewed as a batch of ``m x n`` matrices, and
  every moment field ``M`` of ``inner``'s state, with factors ``F`` kept from
  the previous step:

  .. math::

    \\tilde M = \\mathrm{read}(F),\\qquad
    (u, M') = \\mathrm{inner}(g, \\tilde M),\\qquad
    F' = \\mathrm{update}(F, M', g),

  where ``read`` reconstructs the moment (for the randomized SVD,
  ``U S V^T``, with negative entries of a non-negative moment replaced as in
  paper equation 2) and ``update`` recompresses it (the randomized SVD of
  paper Algorithm 3). The update ``u`` is computed by ``inner`` from the
  *uncompressed* moments. The factors start at zero (every optax moment
  starts at zero), so the first step is exactly ``inner``'s. At
  ``rank >= min(m, n)`` for every compressed leaf it computes what
  ``inner`` computes, up to float32 rounding of the decomposition.

  ``inner`` receives the reconstructed moments and the gradients of
  compressed leaves in float32, and their updates are returned in the
  gradient's dtype. ``init``
  calls ``inner.init(params)`` and replaces the dense moments of compressed
  leaves by zero factors (under ``jit`` XLA never materialises them).

  .. warning::
    Only leaves chosen by ``low_rank_mask`` are compressed (default:
    floating matrices whose last path name is not ``bias``, ``scale`` or
    ``embedding`` and with ``min(rows, cols) > rank``), and only fields
    named in ``moments`` whose tree has the structure of the params; every
    other array of ``inner``'s state stays as ``inner`` keeps it (for
    example ``contrib.prodigy``'s ``params0``, a copy of the parameters).
    Inspect the decisions with :func:`mlorc_optax.compression_plan`.

  Args:
    inner: any ``optax.GradientTransformation`` whose state holds
      params-shaped moment trees.
    rank: rank ``r`` of the factors (static; >= 1).
    compressor: how the moments are stored, read and refreshed (static); the
      paper's :class:`~mlorc_optax.compressors.RSVDCompressor` by default.
    moments: which state fields are moments to compress: a mapping from
      field name to :class:`MomentSpec`, or a sequence of names known to
      :data:`DEFAULT_MOMENTS` (the default, which knows optax's own
      states). Moment fields of :data:`DEFAULT_MOMENTS` left out stay
      dense (the paper's ablation, Table 7).
    seed: int seed or ``jax.random`` key for the sketches.
    factor_dtype: dtype in which the factors are stored (computation is
      float32).
    low_rank_mask: which leaves are compressed: None (the default rule), a
      bool, a pytree of bools (matched to the params by path; prefix trees
      allowed) or a callable ``params -> pytree of bools``.
    dimension_numbers: how leaves are viewed as matrices: None (the last
      two axes are rows and columns, leading axes batch), a
      :class:`~mlorc_optax.MatrixDimensionNumbers` or a ``(row_axes,
      col_axes)`` pair for all leaves, or a pytree / callable giving one (or
      None: no matrix view) per leaf.
    implementation: which step computes compressed leaves (static): None
      (automatic), ``'reference'`` (steps above, as written), or
      ``fast_step``'s two passes in Pallas kernels (``'pallas'``) or
      ``jax.numpy`` (``'xla'``). See :func:`mlorc_optax.scale_by_mlorc_adam`.
    fast_step: an accelerated implementation of ``inner``'s step for
      compressed leaves, or None: ``low_rank.AdamFastStep(b1, b2, eps,
      eps_root, nesterov)`` for ``optax.scale_by_adam`` with the same
      hyperparameters, ``low_rank.LionFastStep(b1, b2)`` for
      ``optax.scale_by_lion`` (the MLorc-Adam and -Lion transforms pass
      theirs).
    kernel_config: tiles, warps, stages and precisions of the Pallas
      kernels (:class:`mlorc_optax.kernels.KernelConfig`; static).
    update_bound: None, or a function of the step number ``t`` (``1`` at
      the first update; a traced int32) giving the largest magnitude an
      entry of a compressed leaf's update may have: ``inner``'s update of
      those leaves is clipped to it (``scale_by_mlorc_adam`` passes the
      bound that dense Adam's own update never exceeds,
      ``step_math.adam_update_bound``). Leaves that are not compressed are
      never clipped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LowRankMomentsState`; extra arguments are passed on to
    ``inner``.

  Examples:
    MLorc-ADOPT, with the factors of ADOPT's two moments:

    >>> import jax, jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> tx = mlorc_optax.low_rank_moments(optax.contrib.scale_by_adopt(),
    ...                                   rank=2)
    >>> params = {'w': jnp.ones((16, 8))}
    >>> state = tx.init(params)
    >>> type(state.inner_state).__name__, state.inner_state.nu['w'].u.shape
    ('ScaleByAdamState', (16, 2))
    >>> updates, state = tx.update(params, state)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    Algorithms 1-3.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f'inner must be an optax.GradientTransformation, got {inner!r}.')
  rank = checks.check_int('rank', rank, 1)
  if compressor is None:
    compressor = compressors_lib.RSVDCompressor()
  if not isinstance(compressor, compressors_lib.MomentCompressor):
    raise TypeError(
        f'compressor must be a MomentCompressor, got {compressor!r}.')
  specs = _moment_specs(moments)
  _check_complements(specs, compressor)
  if update_bound is not None and not callable(update_bound):
    raise TypeError(
        f'update_bound must be None or a function of the step number, got '
        f'{update_bound!r}.')
  factor_dtype = checks.check_float_dtype('factor_dtype', factor_dtype)
  if isinstance(low_rank_mask, (bool, np.bool_)):
    low_rank_mask = bool(low_rank_mask)
  kernel_config = kernel_config or launch.KernelConfig()
  fast_fields = None if fast_step is None else tuple(fast_step.fields)
  modes = tuple(sorted({spec.complement_mode for spec in specs.values()
                        if checks.is_nonzero_weight(spec.complement)}))
  blocker = plan_lib.two_pass_blocker(
      fast_fields=fast_fields,
      compressed_fields=tuple(n for n in (fast_fields or ()) if n in specs),
      compressor=compressor, complement_modes=modes)
  implementation = plan_lib.check_implementation(
      implementation, blocker=blocker)
  key = checks.key_data(seed)
  known = set(specs) | set(DEFAULT_MOMENTS)
  inner = optax.with_extra_args_support(inner)

  def make_plan(params, inner_state) -> plan_lib.PlanNode:
    paths, leaves, treedef = views.flatten_with_paths(params)
    shapes = [tuple(np.shape(x)) for x in leaves]
    fields = tuple(
        plan_lib.MomentField(location, name, index, specs.get(
            name, DEFAULT_MOMENTS.get(name, MomentSpec())).nonnegative,
                             name in specs)
        for index, (location, name) in enumerate(
            moment_fields.find(inner_state, known, treedef, shapes)))
    compressed = tuple(f.name for f in fields if f.compressed)
    if not compressed:
      raise ValueError(
          f'low_rank_moments found none of the moment fields {sorted(specs)} '
          'with the structure of the params in the inner state '
          f'{type(inner_state).__name__}: pass moments= with its field names.'
      )
    blocker_now = plan_lib.two_pass_blocker(
        fast_fields=fast_fields, compressed_fields=compressed,
        compressor=compressor, complement_modes=modes)
    leaf_plans, _ = plan_lib.plan_leaves(
        params, rank=rank, low_rank_mask=low_rank_mask,
        dimension_numbers=dimension_numbers)
    # Which fields hold a moment of each leaf (an inner optax.masked holds
    # MaskedNode() for the leaves it leaves out).
    held = {f.name: [not isinstance(x, optax.MaskedNode) for x in
                     treedef.flatten_up_to(moment_fields.get(inner_state, f))]
            for f in fields}
    out = []
    for k, p in enumerate(leaf_plans):
      mine = tuple(n for n in compressed if held[n][k]) if p.compressed else ()
      dense = sum(held[f.name][k] for f in fields) - len(mine)
      if p.compressed and not mine:
        p = dataclasses.replace(
            p, view=None, rank=0,
            reason=f'the inner state keeps no {"/".join(compressed)} for it')
      if not p.compressed:
        out.append(dataclasses.replace(p, dense_moments=dense))
        continue
      v = p.view
      sketched = plan_lib.sketches(compressor, p)
      where = plan_lib.placement(leaves[k])
      step, why = plan_lib.choose_step(
          p, implementation=implementation,
          blocker=blocker_now or (None if mine == compressed else
                                  'the inner optimizer masks a moment out'),
          sketched=sketched, kernel_config=kernel_config, where=where,
          one_device=plan_lib.on_one_device(leaves[k]))
      # The two-pass step runs on the shards where the placement is known.
      where = where if step in ('xla', 'pallas') else None
      nonnegative = {f.name: f.nonnegative for f in fields}
      factor_sizes = tuple(
          sum(int(np.prod(s.shape)) for s in compressor.specs(
              v.batch_shape, v.rows, v.cols, p.rank,
              nonnegative=nonnegative[name]))
          for name in mine)
      out.append(dataclasses.replace(
          p, moments=mine, dense_moments=dense, factor_sizes=factor_sizes,
          step=step, step_reason=why, placement=where))
    return plan_lib.plan_node(plan_lib.LowRankPlan(
        leaves=tuple(out), fields=fields, compressor=compressor,
        interpret=not plan_lib.on_nvidia_gpu()))

  def init_fn(params):
    inner_state = inner.init(params)
    plan = make_plan(params, inner_state)
    param_leaves = jax.tree_util.tree_leaves(params)
    # Each leaf with the single-child nodes around it (an nnx.Variable, a
    # Flax box): each factor array is wrapped like the leaf it stands for.
    units = jax.tree_util.tree_structure(
        params, is_leaf=moment_fields.is_wrapped_leaf)
    for field in plan.fields:
      if not field.compressed:
        continue
      dense = units.flatten_up_to(moment_fields.get(inner_state, field))
      stored = [
          moment_fields.wrapped_like(
              x, _zero_factors(p, leaf, compressor, factor_dtype,
                               field.nonnegative))
          if field.name in p.moments else x
          for p, leaf, x in zip(plan.leaves, param_leaves, dense)
      ]
      inner_state = moment_fields.replace(
          inner_state, field, units.unflatten(stored))
    return LowRankMomentsState(
        step=jnp.zeros([], jnp.int32),
        sketch_key=jnp.array(key),  # a fresh buffer: states may be donated
        inner_state=inner_state,
        plan=plan,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, LowRankMomentsState):
      raise TypeError(
          'low_rank_moments got a state that is not a LowRankMomentsState: '
          f'{type(state).__name__}.')
    plan = state.plan
    paths, grads, treedef = views.flatten_with_paths(updates)
    plan_lib.check_matches(plan, paths, grads)
    plan_lib.check_made_by(plan, compressor=compressor, rank=rank,
                           compressed=set(specs))
    fast = [p.step in ('xla', 'pallas') for p in plan.leaves]
    masked = lambda xs: treedef.unflatten(
        [optax.MaskedNode() if f else x for f, x in zip(fast, xs)])
    leaf_index, i = [], 0
    for p in plan.leaves:
      leaf_index.append(i if p.compressed else -1)
      i += p.compressed
    fields = [f for f in plan.fields if f.compressed]
    stored = {
        f.name: treedef.flatten_up_to(moment_fields.get(state.inner_state, f))
        for f in fields}
    t = optax.safe_increment(state.step)
    # Every compressed leaf's sketch keys, by leaf_index and field position.
    sketch_keys = _sketch_keys(state.sketch_key, state.step, list(range(i)),
                               [f.index for f in fields])
    # Per field, the weight of its complement this step (MomentSpec).
    weights = {f.name: step_math.complement_weight(
        specs[f.name].complement, specs[f.name].decay, t)
               for f in fields
               if checks.is_nonzero_weight(specs[f.name].complement)}
    # The complement of each reference leaf, as a matrix: what is added to
    # the moment read back, and removed (times the decay) from the new one.
    credit = {name: {} for name in weights}
    dense_state = state.inner_state
    for f in fields:
      dense = []
      for k, (p, x) in enumerate(zip(plan.leaves, stored[f.name])):
        if p.step != 'reference' or f.name not in p.moments:
          dense.append(x)
          continue
        moment = plan.compressor.read(
            x, nonnegative=f.nonnegative, decay=specs[f.name].decay,
            count=state.step)
        if f.name in weights and p.truncates:
          credit[f.name][k] = weights[f.name] * step_math.out_of_span(
              p.view.to_matrix(grads[k]).astype(jnp.float32),
              plan.compressor.left_basis(x))
          if specs[f.name].complement_mode != 'norm':
            moment = moment + credit[f.name][k]
        dense.append(p.view.from_matrix(moment))
      dense_state = moment_fields.replace(dense_state, f, masked(dense))
    inner_params = None if params is None else masked(
        treedef.flatten_up_to(params))
    # Compressed leaves are computed in float32, whatever the gradient's
    # dtype, as their moments are (their updates are cast back below).
    inner_grads = [g.astype(jnp.float32) if p.step == 'reference' else g
                   for p, g in zip(plan.leaves, grads)]
    out, new_inner = inner.update(
        masked(inner_grads), dense_state, inner_params, **extra_args)
    out = treedef.flatten_up_to(out)

    bound = None if update_bound is None else jnp.asarray(
        update_bound(t), jnp.float32)
    new = {f.name: treedef.flatten_up_to(moment_fields.get(new_inner, f))
           for f in fields}
    for k, p in enumerate(plan.leaves):
      if p.step != 'reference':
        continue
      g32 = p.view.to_matrix(grads[k]).astype(jnp.float32)
      for f in fields:  # Fira's norm-based scaling (MomentSpec)
        if (k in credit.get(f.name, {})
            and specs[f.name].complement_mode == 'norm'):
          d = p.view.to_matrix(out[k]).astype(jnp.float32)
          phi = step_math.span_norm_ratio(
              d, g32, plan.compressor.left_basis(stored[f.name][k]))
          out[k] = p.view.from_matrix(d + phi * credit[f.name][k])
      if update_bound is not None:
        out[k] = jnp.clip(out[k], -bound, bound)
      out[k] = out[k].astype(grads[k].dtype)
      for f in fields:
        if f.name not in p.moments:
          continue
        moment = p.view.to_matrix(new[f.name][k]).astype(jnp.float32)
        if (k in credit.get(f.name, {})
            and specs[f.name].complement_mode == 'moment'):
          # The stored moment is the paper's ('state' keeps the credit).
          moment = moment - specs[f.name].decay * credit[f.name][k]
        factors = plan.compressor.update(
            stored[f.name][k],
            moment=moment,
            grad=g32, key=sketch_keys[leaf_index[k], fields.index(f)],
            decay=specs[f.name].decay, nonnegative=f.nonnegative)
        new[f.name][k] = type(factors)(
            *(a.astype(factor_dtype) for a in factors))
    if any(fast):
      idx = [k for k, f in enumerate(fast) if f]

      @jax.custom_jvp
      def two_pass(gs, factors, leaf_keys, count, weights, bound):
        return fast_step(
            [(plan.leaves[k], g, f, kk)
             for k, g, f, kk in zip(idx, gs, factors, leaf_keys)],
            count=count, compressor=plan.compressor,
            config=kernel_config, interpret=plan.interpret,
            complement=weights, bound=bound)

      @two_pass.defjvp
      def _(primals, tangents):
        raise TypeError(
            'The two-pass step (implementation=\'pallas\' or \'xla\') '
            'has no derivative: differentiate through the update with '
            "implementation='reference' (docs/mlorc.md, \"Differentiating "
            'through the update").')

      results = two_pass(
          [grads[k] for k in idx],
          [[stored[f.name][k] for f in fields] for k in idx],
          [[sketch_keys[leaf_index[k], j] for j in range(len(fields))]
           for k in idx],
          state.step, weights, bound)
      for k, (direction, factors) in zip(idx, results):
        out[k] = direction
        for f, x in zip(fields, factors):
          new[f.name][k] = type(x)(*(a.astype(factor_dtype) for a in x))
    for f in fields:
      new_inner = moment_fields.replace(
          new_inner, f, treedef.unflatten(new[f.name]))
    new_state = LowRankMomentsState(
        step=optax.safe_increment(state.step), sketch_key=state.sketch_key,
        inner_state=new_inner, plan=plan)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
