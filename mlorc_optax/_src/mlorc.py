"""MLorc gradient transformations: Adam and Lion with low-rank moments.

Paper: Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897
(Algorithm 1: MLorc-AdamW, Algorithm 2: MLorc-Lion, Algorithm 3: RSVD).

For every compressed leaf (see :mod:`mlorc_optax._src.masking`) the state keeps
only :class:`~mlorc_optax.LowRankFactors` of its moments: ``B((m + n)r + r)``
numbers per moment for a batch of ``B`` matrices ``m x n`` instead of ``Bmn``.
Each step reconstructs the dense moments in float32, mixes in the gradient,
computes the update from the *uncompressed* new moments and recompresses them
with a randomized SVD. Every other leaf gets the exact base optimizer
(``optax.scale_by_adam`` / ``optax.scale_by_lion``) through ``optax.masked``.
``compressor=`` swaps the RSVD for another way of storing and refreshing the
factors (:mod:`mlorc_optax._src.compressors`).

Randomness: the state holds a raw ``uint32[2]`` PRNG key that never changes.
At step ``t`` (the state's ``count`` before the update), the sketch of moment
``j`` (0: first moment, 1: second) of the ``i``-th compressed leaf in
tree-flatten order is drawn from

``fold_in(fold_in(fold_in(key, t), i), j)``

as ``jax.random.normal(k, (*batch_shape, n, l), float32)`` with
``l = min(rank + oversample, m, n)``. It depends on nothing else (never on the
device), so replicas that share the state draw identical sketches. Other
compressors draw their randomness from the same key (``'lorapre'``: its
initial ``A``, ``jax.random.normal(k, (*batch_shape, n, r))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlorc_optax._src import checks
from mlorc_optax._src import compressors
from mlorc_optax._src import extras
from mlorc_optax._src import fused
from mlorc_optax._src import logical
from mlorc_optax._src import masking
from mlorc_optax._src import rsvd
from mlorc_optax._src import sharding

_MOMENTS = ('mu', 'nu')

# Re-exported here, where it was first defined.
nonnegative_second_moment = compressors.nonnegative_second_moment


class MLorcAdamState(NamedTuple):
  """State of :func:`scale_by_mlorc_adam` for the compressed leaves.

  Attributes:
    count: int32 step counter (number of updates applied).
    key: raw ``uint32[2]`` PRNG key from which every sketch is derived.
    mu: first moment: :class:`LowRankFactors` ``(u, s, v)`` of three pytrees
      with the structure of the params (``state.mu.u['layer']['kernel']``;
      with ``compressor='lorapre'``, :class:`LoRAPreFactors` ``(b, a)`` of two
      such pytrees), or, if ``compress`` keeps it dense, one such pytree of
      dense matrices. Leaves handled by the base Adam hold
      ``optax.MaskedNode()``.
    nu: second moment, same layout.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> state = mlorc_optax.scale_by_mlorc_adam(rank=4).init(params)
    >>> core = state[0]  # MLorcAdamState; state[1] is the base Adam's state
    >>> core.mu.u['w'].shape, core.mu.s['w'].shape, core.mu.v['w'].shape
    ((64, 4), (4,), (32, 4))
    >>> core.nu.u['b']  # not compressed: the base Adam updates it
    MaskedNode()

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    Algorithm 1.
  """

  count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates


class MLorcLionState(NamedTuple):
  """State of :func:`scale_by_mlorc_lion` for the compressed leaves.

  Attributes:
    count: int32 step counter.
    key: raw ``uint32[2]`` PRNG key from which every sketch is derived.
    mu: momentum: :class:`LowRankFactors` ``(u, s, v)`` of three pytrees
      with the structure of the params (:class:`LoRAPreFactors` ``(b, a)``
      with ``compressor='lorapre'``; ``optax.MaskedNode()`` for leaves
      handled by the base Lion).

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> state = mlorc_optax.scale_by_mlorc_lion(rank=4).init(params)
    >>> core = state[0]  # MLorcLionState; state[1] is the base Lion's state
    >>> core.count, core.key.dtype
    (Array(0, dtype=int32), dtype('uint32'))
    >>> core.mu.v['w'].shape  # the (32, 4) right factor, not a 64 x 32 moment
    (32, 4)

  References:
    Shen et al., https://arxiv.org/abs/2506.01897, Algorithm 2.
  """

  count: jax.Array
  key: jax.Array
  mu: optax.Updates


def _key_data(seed: Any) -> jax.Array:
  """A raw ``uint32[2]`` key from an int seed, a typed key or raw key data."""
  if isinstance(seed, (jax.Array, np.ndarray)) and jnp.issubdtype(
      seed.dtype, jax.dtypes.prng_key
  ):
    return jax.random.key_data(seed)
  if isinstance(seed, jax.Array) and seed.shape == () and jnp.issubdtype(
      seed.dtype, jnp.integer
  ):  # possibly traced, e.g. a seed injected by optax.inject_hyperparams
    return jax.random.PRNGKey(seed)
  array = np.asarray(seed)
  if array.dtype == np.uint32 and array.shape == (2,):
    return jnp.asarray(array)
  if array.shape == () and np.issubdtype(array.dtype, np.integer):
    return jax.random.PRNGKey(seed)
  raise TypeError(
      f'seed must be an int, a jax.random key or raw uint32[2] key data, got '
      f'{seed!r}.'
  )


class _LowRankMoments:
  """Planning, storage and compression shared by the Adam and Lion cores."""

  def __init__(
      self,
      *,
      rank: int,
      oversample: int,
      power_iters: int,
      compressor: str | compressors.MomentCompressor,
      factor_dtype: Any,
      low_rank_mask: masking.MaskSpec,
      dimension_numbers: masking.DimensionSpec,
  ):
    self.rank = checks.check_int('rank', rank, 1)
    self.compressor = compressors.resolve_compressor(
        compressor, oversample=oversample, power_iters=power_iters
    )
    self.fields = self.compressor.factor_type._fields
    self.factor_dtype = checks.check_float_dtype('factor_dtype', factor_dtype)
    if isinstance(low_rank_mask, (bool, np.bool_)):
      low_rank_mask = bool(low_rank_mask)
    self.low_rank_mask = low_rank_mask
    self.dimension_numbers = dimension_numbers

  def plan(self, tree: Any) -> tuple[list[masking.LeafPlan], Any]:
    return masking.plan_leaves(
        tree,
        rank=self.rank,
        low_rank_mask=self.low_rank_mask,
        dimension_numbers=self.dimension_numbers,
    )

  def dense_mask(self, tree: Any) -> Any:
    """Pytree of bools: True where the leaf is *not* compressed."""
    plans, treedef = self.plan(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [not p.compressed for p in plans]
    )

  def is_factors(self, x: Any) -> bool:
    return all(hasattr(x, a) for a in self.fields)

  def specs(self, plan: masking.LeafPlan) -> tuple:
    view = plan.view
    return self.compressor.specs(
        view.batch_shape, view.rows, view.cols, plan.rank
    )

  def zeros(self, plan: masking.LeafPlan, low_rank: bool, leaf: Any) -> Any:
    """Initial moment of a compressed leaf: zero factors, or dense zeros.

    A concrete ``leaf`` with a ``NamedSharding`` places the moment by the
    rule of :mod:`mlorc_optax._src.sharding`.
    """
    view = plan.view
    placed = None
    if not isinstance(leaf, jax.core.Tracer):
      placed = sharding.factor_shardings(plan, getattr(leaf, 'sharding', None))
    u_sh, s_sh, v_sh, dense_sh = placed or (None,) * 4
    dtype = self.factor_dtype
    if not low_rank:
      return jnp.zeros(
          (*view.batch_shape, view.rows, view.cols), dtype, device=dense_sh
      )
    where = {'rows': u_sh, 'batch': s_sh, 'cols': v_sh}
    return self.compressor.factor_type(*(
        jnp.zeros(spec.shape, dtype, device=where[spec.placement])
        for spec in self.specs(plan)
    ))

  def read(
      self, moment: Any, *, second_moment: bool, decay: Any, count: Any
  ) -> jax.Array:
    """Dense float32 matrices ``[*batch, m, n]`` of a stored moment."""
    if self.is_factors(moment):
      return self.compressor.read(
          moment, second_moment=second_moment, decay=decay, count=count
      )
    return jnp.asarray(moment, jnp.float32)

  def write(
      self,
      x: jax.Array,
      like: Any,
      key: jax.Array,
      *,
      grad: jax.Array,
      decay: Any,
      second_moment: bool,
  ) -> Any:
    """Stores the new dense moment ``x`` in the form of ``like``."""
    if not self.is_factors(like):
      return x.astype(self.factor_dtype)
    f = self.compressor.update(
        like,
        moment=x,
        grad=grad,
        key=key,
        decay=decay,
        second_moment=second_moment,
    )
    return type(f)(*(a.astype(self.factor_dtype) for a in f))

  def check_moment(self, moment: Any, plan: masking.LeafPlan, name: str):
    """Raises if a stored moment does not fit the plan of its leaf."""
    view = plan.view
    if view is None:
      if self.is_factors(moment) or hasattr(moment, 'shape'):
        raise ValueError(
            f'The optimizer state holds a {name} for {plan.path!r}, which is '
            'not compressed now: was the state made with other params or '
            'another low_rank_mask?'
        )
      return
    if self.is_factors(moment):
      got = tuple(tuple(np.shape(getattr(moment, a))) for a in self.fields)
      want = tuple(spec.shape for spec in self.specs(plan))
    else:
      got = tuple(np.shape(moment)) if hasattr(moment, 'shape') else None
      want = (*view.batch_shape, view.rows, view.cols)
    if got != want:
      raise ValueError(
          f'The optimizer state of {plan.path!r} ({name}) has shapes {got}, '
          f'expected {want} for the leaf of shape {plan.shape} at rank '
          f'{self.rank}: was the state made with other params or settings?'
      )


def _flatten_up_to(treedef: Any, subtree: Any, name: str) -> list[Any]:
  try:
    return treedef.flatten_up_to(subtree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'The optimizer state ({name}) does not have the structure of the '
        f'updates: was it initialised with a different parameter tree? ({e})'
    ) from None


def _boxed_layout(tree: Any) -> tuple[Any, list[Any]]:
  """The treedef of ``tree`` with flax boxes as leaves, and each leaf's box.

  Parameters boxed by ``nn.with_logical_partitioning`` (kept boxed, as
  ``TrainState.create(params=variables['params'])`` does) give factors boxed
  with their own logical names (:func:`logical.box_moment`), so the moment
  trees share this outer structure with the params but not their boxes'
  names. Every box holds one array, so the list aligns with the plans.
  """
  leaves, outer = jax.tree_util.tree_flatten(tree, is_leaf=logical.is_box)
  return outer, [x if logical.is_box(x) else None for x in leaves]


def _unboxed(moment: Any, store: _LowRankMoments) -> Any:
  """A stored per-leaf moment with its arrays taken out of their boxes."""
  if store.is_factors(moment):
    return type(moment)(*(logical.unbox(x) for x in moment))
  return logical.unbox(moment)


def _reboxed(old: Any, new: Any, store: _LowRankMoments) -> Any:
  """``new`` (per-leaf moment) in the boxes of the stored ``old``."""
  if store.is_factors(old) and store.is_factors(new):
    return type(new)(*(logical.rebox_like(o, n) for o, n in zip(old, new)))
  return logical.rebox_like(old, new)


def _boxed_zeros(
    store: _LowRankMoments, box: Any, plan: masking.LeafPlan, low_rank: bool,
    leaf: Any
) -> Any:
  """Initial moment of a compressed leaf, boxed like a boxed parameter."""
  placements = tuple(spec.placement for spec in store.specs(plan))
  return logical.box_moment(
      box, plan, store.zeros(plan, low_rank, leaf), placements
  )


def _split_moment(
    treedef: Any, moment: Any, low_rank: bool, name: str, store: _LowRankMoments
):
  """A stored moment -> per leaf: factors, dense array or MaskedNode.

  The state keeps each factor (``u``, ``s`` and ``v``, or the fields of the
  compressor's factors) as a params-shaped tree (each leaf a plain array, or
  a flax box of one), the layout ``nnx.Optimizer`` and checkpointers handle
  like any optax moment; this regroups them per leaf. ``treedef`` is the
  :func:`_boxed_layout` of the updates.
  """
  if not low_rank:
    return _flatten_up_to(treedef, moment, name)
  if not store.is_factors(moment):
    raise ValueError(
        f'The optimizer state ({name}) holds no ({", ".join(store.fields)}) '
        'factors: was it made with other settings (compress, compressor)?'
    )
  parts = [
      _flatten_up_to(treedef, getattr(moment, a), f'{name}.{a}')
      for a in store.fields
  ]
  factor_type = store.compressor.factor_type
  return [
      factor_type(*f)
      if hasattr(f[0], 'shape') or logical.is_box(f[0])
      else f[0]
      for f in zip(*parts)
  ]


def _join_moment(
    treedef: Any, leaves: list[Any], low_rank: bool, store: _LowRankMoments
) -> Any:
  """Inverse of :func:`_split_moment`."""
  if not low_rank:
    return jax.tree_util.tree_unflatten(treedef, leaves)
  return store.compressor.factor_type(*(
      jax.tree_util.tree_unflatten(
          treedef,
          [getattr(x, a) if store.is_factors(x) else x for x in leaves],
      )
      for a in store.fields
  ))


def _leaf_keys(key: jax.Array, count: jax.Array, index: int) -> tuple:
  leaf = jax.random.fold_in(jax.random.fold_in(key, count), index)
  return jax.random.fold_in(leaf, 0), jax.random.fold_in(leaf, 1)


def _validate_compress(compress: Sequence[str]) -> tuple[str, ...]:
  if isinstance(compress, str):
    compress = (compress,)
  compress = tuple(compress)
  unknown = [c for c in compress if c not in _MOMENTS]
  if unknown or not compress or len(set(compress)) != len(compress):
    raise ValueError(
        f'compress must be a non-empty subset of {_MOMENTS} without '
        f'repeats, got {compress!r}.'
    )
  return compress


def _sketched(plan: masking.LeafPlan, store: _LowRankMoments) -> bool:
  """Whether the RSVD of a compressed leaf sketches (the sketch is not the
  identity, which the two-pass step leaves to the reference)."""
  view = plan.view
  return rsvd.sketch_width(view.rows, view.cols, plan.rank,
                           store.compressor.oversample) < view.cols


def _two_pass_inputs(
    g: jax.Array,
    moments: Sequence[rsvd.LowRankFactors],
    keys: Sequence[jax.Array],
    plan: masking.LeafPlan,
    store: _LowRankMoments,
) -> tuple[jax.Array, list[rsvd.LowRankFactors], list[jax.Array]] | None:
  """One leaf's gradient, factors and sketches for the two-pass step.

  The gradient as ``[B, m, n]`` and each moment's factors and this step's
  sketch with the batch axes flattened to one. Same sketches (same keys,
  same ``compressor.sketch``) as the reference path, so both compute the
  same randomized SVDs up to float32 rounding. None where a sketch is the
  identity (a subclass may return None for it): that leaf takes the
  reference step.
  """
  view = plan.view
  batch = tuple(view.batch_shape)
  width = rsvd.sketch_width(view.rows, view.cols, plan.rank,
                            store.compressor.oversample)
  omegas = [
      store.compressor.sketch(f, k, batch, view.cols, width)
      for f, k in zip(moments, keys)
  ]
  if any(o is None for o in omegas):
    return None
  flat = lambda x: jnp.reshape(x, (-1, *x.shape[len(batch):]))
  return (flat(view.to_matrix(g)),
          [rsvd.LowRankFactors(*map(flat, f)) for f in moments],
          [flat(o) for o in omegas])


def _two_pass_outputs(
    direction: jax.Array,
    moments: Sequence[rsvd.LowRankFactors],
    g: jax.Array,
    plan: masking.LeafPlan,
    store: _LowRankMoments,
) -> tuple[jax.Array, list[rsvd.LowRankFactors]]:
  """Inverse of :func:`_two_pass_inputs` for the update and new factors."""
  batch = tuple(plan.view.batch_shape)
  unflat = lambda x: jnp.reshape(x, (*batch, *x.shape[1:]))
  update = plan.view.from_matrix(unflat(direction)).astype(g.dtype)
  return update, [
      rsvd.LowRankFactors(*(unflat(x).astype(store.factor_dtype) for x in f))
      for f in moments
  ]


def _adam_coefficients(b1, b2, eps, eps_root, nesterov, count_inc):
  """:class:`fused.AdamCoefficients` of the step that makes ``count_inc``."""
  bias = lambda decay, t: 1.0 / (1.0 - jnp.asarray(decay, jnp.float32) ** t)
  if nesterov:
    k_m = b1 * bias(b1, optax.safe_increment(count_inc))
    k_g = (1.0 - b1) * bias(b1, count_inc)
  else:
    k_m, k_g = bias(b1, count_inc), 0.0
  return fused.AdamCoefficients(
      b1=b1, b2=b2, k_m=k_m, k_g=k_g, c_v=bias(b2, count_inc), eps=eps,
      eps_root=eps_root)


def _scale_by_low_rank_adam(
    b1, b2, eps, eps_root, nesterov, atan2, compress, store: _LowRankMoments,
    key, implementation: str | None = None,
) -> optax.GradientTransformation:
  """Algorithm 1 (without lr and weight decay) on the compressed leaves only.

  Leaves that are not compressed pass through unchanged with an empty state.
  ``implementation`` (checked by :func:`fused.check_implementation`) picks the
  reference step or the two-pass step per leaf
  (:func:`fused.leaf_implementation`).
  """
  blocker = fused.two_pass_blocker(
      compressor=store.compressor, compress=compress, atan2=atan2
  )

  def init_fn(params):
    plans, treedef = store.plan(params)
    outer, boxes = _boxed_layout(params)
    mu, nu = [], []
    for p, leaf, box in zip(plans, treedef.flatten_up_to(params), boxes):
      if p.compressed:
        mu.append(_boxed_zeros(store, box, p, 'mu' in compress, leaf))
        nu.append(_boxed_zeros(store, box, p, 'nu' in compress, leaf))
      else:
        mu.append(optax.MaskedNode())
        nu.append(optax.MaskedNode())
    return MLorcAdamState(
        count=jnp.zeros([], jnp.int32),
        key=jnp.array(key),  # a fresh buffer: states may be donated
        mu=_join_moment(outer, mu, 'mu' in compress, store),
        nu=_join_moment(outer, nu, 'nu' in compress, store),
    )

  def update_fn(updates, state, params=None):
    del params
    plans, treedef = store.plan(updates)
    grads = treedef.flatten_up_to(updates)
    outer, _ = _boxed_layout(updates)
    stored_mus = _split_moment(outer, state.mu, 'mu' in compress, 'mu', store)
    stored_nus = _split_moment(outer, state.nu, 'nu' in compress, 'nu', store)
    count_inc = optax.safe_increment(state.count)
    out, new_mu, new_nu = [], [], []
    two_pass, two_pass_inputs = [], []
    index = 0
    for g, stored_mu, stored_nu, p in zip(grads, stored_mus, stored_nus,
                                          plans):
      mu, nu = _unboxed(stored_mu, store), _unboxed(stored_nu, store)
      store.check_moment(mu, p, 'mu')
      store.check_moment(nu, p, 'nu')
      if not p.compressed:
        out.append(g)
        new_mu.append(stored_mu)
        new_nu.append(stored_nu)
        continue
      key_mu, key_nu = _leaf_keys(state.key, state.count, index)
      index += 1
      impl = fused.leaf_implementation(
          implementation,
          blocker=blocker,
          rows=p.view.rows,
          cols=p.view.cols,
          sketched=blocker is None and _sketched(p, store),
      )
      inputs = None if impl == 'reference' else _two_pass_inputs(
          g, (mu, nu), (key_mu, key_nu), p, store)
      if inputs is not None:
        # Filled in below, once all two-pass leaves are known.
        g_flat, (mu_flat, nu_flat), (omega_m, omega_v) = inputs
        two_pass.append((len(out), g, p, stored_mu, stored_nu))
        two_pass_inputs.append(fused.LeafInputs(
            g_flat, mu_flat, nu_flat, omega_m, omega_v, impl == 'pallas'))
        out.append(None)
        new_mu.append(None)
        new_nu.append(None)
        continue
      g32 = p.view.to_matrix(g).astype(jnp.float32)
      m_prev = store.read(mu, second_moment=False, decay=b1,
                          count=state.count)
      v_prev = store.read(nu, second_moment=True, decay=b2,
                          count=state.count)
      m = (1 - b1) * g32 + b1 * m_prev
      v = (1 - b2) * (g32 * g32) + b2 * v_prev
      if nesterov:
        m_hat = b1 * optax.tree.bias_correction(
            m, b1, optax.safe_increment(count_inc)
        ) + (1 - b1) * optax.tree.bias_correction(g32, b1, count_inc)
      else:
        m_hat = optax.tree.bias_correction(m, b1, count_inc)
      v_hat = optax.tree.bias_correction(v, b2, count_inc)
      if atan2:
        direction = extras.atan2_direction(m_hat, v_hat)
      else:
        direction = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
      out.append(p.view.from_matrix(direction).astype(g.dtype))
      new_mu.append(_reboxed(stored_mu, store.write(
          m, mu, key_mu, grad=g32, decay=b1, second_moment=False), store))
      new_nu.append(_reboxed(stored_nu, store.write(
          v, nu, key_nu, grad=g32, decay=b2, second_moment=True), store))
    if two_pass:
      results = fused.adam_step(
          two_pass_inputs,
          _adam_coefficients(b1, b2, eps, eps_root, nesterov, count_inc),
      )
      for (slot, g, p, stored_mu, stored_nu), (direction, *moments) in zip(
          two_pass, results):
        direction, (mu_f, nu_f) = _two_pass_outputs(direction, moments, g, p,
                                                     store)
        out[slot] = direction
        new_mu[slot] = _reboxed(stored_mu, mu_f, store)
        new_nu[slot] = _reboxed(stored_nu, nu_f, store)
    new_state = MLorcAdamState(
        count=count_inc,
        key=state.key,
        mu=_join_moment(outer, new_mu, 'mu' in compress, store),
        nu=_join_moment(outer, new_nu, 'nu' in compress, store),
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_low_rank_lion(
    b1, b2, store: _LowRankMoments, key, implementation: str | None = None
) -> optax.GradientTransformation:
  """Algorithm 2 (without lr and weight decay) on the compressed leaves only.

  ``implementation``: None or ``'reference'`` for the reference step,
  ``'pallas'`` / ``'xla'`` for :func:`fused.lion_step` (per leaf as
  :func:`fused.leaf_implementation`).
  """
  blocker = fused.two_pass_blocker(
      compressor=store.compressor, compress=_MOMENTS, atan2=False)

  def init_fn(params):
    plans, treedef = store.plan(params)
    outer, boxes = _boxed_layout(params)
    mu = [
        _boxed_zeros(store, box, p, True, leaf)
        if p.compressed else optax.MaskedNode()
        for p, leaf, box in zip(plans, treedef.flatten_up_to(params), boxes)
    ]
    return MLorcLionState(
        count=jnp.zeros([], jnp.int32),
        key=jnp.array(key),  # a fresh buffer: states may be donated
        mu=_join_moment(outer, mu, True, store),
    )

  def update_fn(updates, state, params=None):
    del params
    plans, treedef = store.plan(updates)
    grads = treedef.flatten_up_to(updates)
    outer, _ = _boxed_layout(updates)
    stored_mus = _split_moment(outer, state.mu, True, 'mu', store)
    out, new_mu = [], []
    two_pass, two_pass_inputs = [], []
    index = 0
    for g, stored_mu, p in zip(grads, stored_mus, plans):
      mu = _unboxed(stored_mu, store)
      store.check_moment(mu, p, 'mu')
      if not p.compressed:
        out.append(g)
        new_mu.append(stored_mu)
        continue
      key_mu, _ = _leaf_keys(state.key, state.count, index)
      index += 1
      impl = 'reference' if implementation is None else (
          fused.leaf_implementation(
              implementation, blocker=blocker, rows=p.view.rows,
              cols=p.view.cols, sketched=_sketched(p, store)))
      inputs = None if impl == 'reference' else _two_pass_inputs(
          g, (mu,), (key_mu,), p, store)
      if inputs is not None:
        # Filled in below, once all two-pass leaves are known.
        g_flat, (mu_flat,), (omega,) = inputs
        two_pass.append((len(out), g, p, stored_mu))
        two_pass_inputs.append(fused.LionLeafInputs(
            g_flat, mu_flat, omega, impl == 'pallas'))
        out.append(None)
        new_mu.append(None)
        continue
      g32 = p.view.to_matrix(g).astype(jnp.float32)
      m_prev = store.read(mu, second_moment=False, decay=b2,
                          count=state.count)
      c = (1.0 - b1) * g32 + b1 * m_prev
      m = (1 - b2) * g32 + b2 * m_prev
      out.append(p.view.from_matrix(jnp.sign(c)).astype(g.dtype))
      new_mu.append(_reboxed(stored_mu, store.write(
          m, mu, key_mu, grad=g32, decay=b2, second_moment=False), store))
    if two_pass:
      results = fused.lion_step(two_pass_inputs, b1, b2)
      for (slot, g, p, stored_mu), (direction, mu_f) in zip(two_pass,
                                                              results):
        out[slot], (mu_f,) = _two_pass_outputs(direction, (mu_f,), g, p,
                                               store)
        new_mu[slot] = _reboxed(stored_mu, mu_f, store)
    new_state = MLorcLionState(
        count=optax.safe_increment(state.count),
        key=state.key,
        mu=_join_moment(outer, new_mu, True, store),
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_mlorc_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    rank: int = 4,
    oversample: int = 0,
    power_iters: int = 0,
    seed: int | jax.Array = 0,
    factor_dtype: jax.typing.DTypeLike = jnp.float32,
    compress: Sequence[str] = ('mu', 'nu'),
    low_rank_mask: masking.MaskSpec = None,
    dimension_numbers: masking.DimensionSpec = None,
    compressor: str | compressors.MomentCompressor = 'rsvd',
    atan2: bool = False,
    implementation: str | None = None,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with low-rank compressed moments (MLorc).

  Paper Algorithm 1 without the learning rate and weight decay, a drop-in
  replacement for ``optax.scale_by_adam``. For each compressed leaf (viewed as
  a batch of ``m x n`` matrices), with factors kept from the previous step:

  .. math::

    \\tilde m = U_m S_m V_m^\\top,\\quad
    \\tilde v = \\mathrm{fix}(U_v S_v V_v^\\top),\\quad
    m = \\beta_1 \\tilde m + (1-\\beta_1) g,\\quad
    v = \\beta_2 \\tilde v + (1-\\beta_2) g^2,

    u = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t) + \\epsilon_{root}}
    + \\epsilon},\\qquad
    (U_m, S_m, V_m) = \\mathrm{RSVD}(m, r),\\ (U_v, S_v, V_v) =
    \\mathrm{RSVD}(v, r),

  where ``fix`` is :func:`nonnegative_second_moment`. The update ``u`` uses the
  uncompressed ``m`` and ``v``; the factors start at zero, so the first step is
  exactly Adam's first step. Leaves that are not compressed get
  ``optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)``
  through ``optax.masked``, so they are never skipped or frozen.

  ``compressor`` replaces how the factors are read and refreshed (the lines
  with ``RSVD`` and ``fix`` above): ``'rsvd'`` is the paper's, ``'warm'``
  sketches with the previous factors, ``'lorapre'`` keeps ``B A`` factors
  refreshed by least squares (see :mod:`mlorc_optax._src.compressors` and
  ``docs/compressors.md``). With ``atan2=True`` the last line becomes
  Adam-atan2's ``u = a * atan2(m_hat, b * sqrt(v_hat))`` (``a = 1.27``,
  ``b = 1``; see :func:`mlorc_optax.scale_by_adam_atan2`) on every leaf, and
  ``eps`` and ``eps_root`` are not used.

  .. warning::
    Which leaves are compressed is decided by ``low_rank_mask`` (default: see
    :func:`mlorc_optax.compression_plan`, which also shows the decision per
    leaf). Embeddings, biases and norm scales are not compressed by default.

  Args:
    b1: decay of the first moment (the paper recommends 0.8 for MLorc-AdamW to
      damp the compression error; 0.9 is optax's default).
    b2: decay of the second moment.
    eps: added to the denominator outside the square root (as optax and the
      official code; the paper's line 15 writes it inside).
    eps_root: added inside the square root (the paper's ``epsilon``).
    mu_dtype: dtype of the first moment of the leaves that are not compressed
      (as in ``optax.scale_by_adam``).
    nesterov: Nadam-style update, as ``optax.scale_by_adam(nesterov=True)``.
    rank: rank ``r`` of the factors (static; >= 1).
    oversample: extra sketch columns ``p`` of the RSVD (static; >= 0).
    power_iters: power iterations of the RSVD (static; >= 0).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: dtype in which factors (and moments kept dense by
      ``compress``) are stored; computation is always float32.
    compress: which moments of the compressed leaves are stored low-rank:
      ``('mu', 'nu')`` (the paper), or ``('mu',)`` / ``('nu',)`` for the
      paper's ablation (Table 7), the other moment then kept dense.
    low_rank_mask: which leaves are compressed: None (default rule), a bool, a
      pytree of bools (matched to the params by path; prefix trees allowed) or
      a callable ``params -> pytree of bools``.
    dimension_numbers: how leaves are viewed as matrices: None (last two axes
      are rows and columns, leading axes batch), a
      :class:`MatrixDimensionNumbers` for all leaves, or a pytree / callable
      giving one per leaf.
    compressor: how the compressed moments are stored and refreshed (static):
      a name, ``'rsvd'`` (default, the paper's), ``'warm'`` or ``'lorapre'``,
      or a :class:`MomentCompressor` object (then set its own
      ``oversample`` / ``power_iters``; the transform's must stay 0).
    atan2: use Adam-atan2's update, without ``eps`` (static).
    implementation: how the step is computed (static): None (default:
      automatic), ``'reference'`` (the algorithm as written: dense moments,
      Householder QR and SVD), ``'pallas'`` (two streaming passes over the
      gradient in Pallas kernels, the moments rebuilt block by block and never
      stored; Gram-based small factorizations) or ``'xla'`` (the same two
      passes in ``jax.numpy``). All compute the same update and the same
      randomized SVD (same sketches) up to float32 rounding. Automatic picks
      ``'pallas'`` on a single NVIDIA GPU where the settings allow it
      (``compressor`` ``'rsvd'`` or ``'warm'`` without power iterations, both
      moments compressed, no ``atan2``) and ``'reference'`` otherwise; see
      :mod:`mlorc_optax._src.fused` and ``docs/mlorc.md``.

  Returns:
    An ``optax.GradientTransformation``; its state is
    ``(MLorcAdamState, optax.MaskedState(ScaleByAdamState))``; with
    ``compressor='lorapre'`` the moments of ``MLorcAdamState`` are
    :class:`LoRAPreFactors` ``(b, a)`` trees instead of ``(u, s, v)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((16, 8)), 'b': jnp.zeros(8)}
    >>> tx = optax.chain(mlorc_optax.scale_by_mlorc_adam(rank=2),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0][0].mu.u['w'].shape  # factors, not a 16 x 8 moment
    (16, 2)
    >>> updates, state = tx.update(params, state)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897;
    Everett et al., *Scaling Exponents Across Parameterizations and
    Optimizers* (Adam-atan2), https://arxiv.org/abs/2407.05872.
  """
  checks.check_beta('b1', b1)
  checks.check_beta('b2', b2)
  checks.check_nonnegative('eps', eps)
  checks.check_nonnegative('eps_root', eps_root)
  compress = _validate_compress(compress)
  atan2 = checks.check_bool('atan2', atan2)
  store = _LowRankMoments(
      rank=rank,
      oversample=oversample,
      power_iters=power_iters,
      compressor=compressor,
      factor_dtype=factor_dtype,
      low_rank_mask=low_rank_mask,
      dimension_numbers=dimension_numbers,
  )
  if atan2:
    dense = extras.scale_by_adam_atan2(b1, b2, mu_dtype, nesterov=nesterov)
  else:
    dense = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype,
                                nesterov=nesterov)
  implementation = fused.check_implementation(
      implementation,
      blocker=fused.two_pass_blocker(
          compressor=store.compressor, compress=compress, atan2=atan2
      ),
  )
  return optax.chain(
      _scale_by_low_rank_adam(
          b1, b2, eps, eps_root, nesterov, atan2, compress, store,
          _key_data(seed), implementation
      ),
      optax.masked(dense, store.dense_mask),
  )


def scale_by_mlorc_lion(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    rank: int = 4,
    oversample: int = 0,
    power_iters: int = 0,
    seed: int | jax.Array = 0,
    factor_dtype: jax.typing.DTypeLike = jnp.float32,
    low_rank_mask: masking.MaskSpec = None,
    dimension_numbers: masking.DimensionSpec = None,
    compressor: str | compressors.MomentCompressor = 'rsvd',
    implementation: str | None = None,
) -> optax.GradientTransformation:
  """Rescales updates by Lion with a low-rank compressed momentum (MLorc).

  Paper Algorithm 2 without the learning rate and weight decay, a drop-in
  replacement for ``optax.scale_by_lion``. For each compressed leaf:

  .. math::

    \\tilde m = U S V^\\top,\\quad
    c = \\beta_1 \\tilde m + (1-\\beta_1) g,\\quad
    m = \\beta_2 \\tilde m + (1-\\beta_2) g,\\quad
    u = \\mathrm{sign}(c),\\quad (U, S, V) = \\mathrm{RSVD}(m, r).

  Leaves that are not compressed get ``optax.scale_by_lion(b1, b2, mu_dtype)``
  through ``optax.masked``. ``compressor`` replaces the RSVD as in
  :func:`scale_by_mlorc_adam` (LoRA-Pre's momentum then decays with ``b2``).

  Args:
    b1: rate combining the momentum and the current gradient.
    b2: decay of the momentum.
    mu_dtype: dtype of the momentum of the leaves that are not compressed.
    rank: rank ``r`` of the factors (static; >= 1).
    oversample: extra sketch columns of the RSVD (static; >= 0).
    power_iters: power iterations of the RSVD (static; >= 0).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: dtype in which the factors are stored.
    low_rank_mask: which leaves are compressed (see
      :func:`scale_by_mlorc_adam`).
    dimension_numbers: how leaves are viewed as matrices (see
      :func:`scale_by_mlorc_adam`).
    compressor: ``'rsvd'`` (default), ``'warm'``, ``'lorapre'`` or a
      :class:`MomentCompressor` (static; see :func:`scale_by_mlorc_adam`).
    implementation: ``None`` or ``'reference'`` (default: the algorithm as
      written), or the two-pass step of :func:`scale_by_mlorc_adam`'s
      ``implementation``, ``'pallas'`` or ``'xla'`` (static). Lion's two
      passes need only ``g Omega`` and ``Q^T g`` besides the update, since
      its momentum is linear in ``g``. Unlike Adam's, ``None`` does not pick
      them automatically: they have not been timed on a GPU yet.

  Returns:
    An ``optax.GradientTransformation``; its state is
    ``(MLorcLionState, optax.MaskedState(ScaleByLionState))``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((16, 8)), 'b': jnp.zeros(8)}
    >>> tx = mlorc_optax.scale_by_mlorc_lion(rank=2)
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'][0, :3]
    Array([1., 1., 1.], dtype=float32)

  References:
    Shen et al., https://arxiv.org/abs/2506.01897, Algorithm 2; Chen et al.,
    *Symbolic Discovery of Optimization Algorithms*,
    https://arxiv.org/abs/2302.06675.
  """
  checks.check_beta('b1', b1)
  checks.check_beta('b2', b2)
  store = _LowRankMoments(
      rank=rank,
      oversample=oversample,
      power_iters=power_iters,
      compressor=compressor,
      factor_dtype=factor_dtype,
      low_rank_mask=low_rank_mask,
      dimension_numbers=dimension_numbers,
  )
  return optax.chain(
      _scale_by_low_rank_lion(
          b1, b2, store, _key_data(seed),
          fused.check_implementation(
              implementation,
              blocker=fused.two_pass_blocker(
                  compressor=store.compressor, compress=_MOMENTS,
                  atan2=False),
          ),
      ),
      optax.masked(optax.scale_by_lion(b1, b2, mu_dtype), store.dense_mask),
  )
