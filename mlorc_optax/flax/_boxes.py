"""Flax Linen boxes around the plain-array MLorc transforms.

Linen parameters made with ``nn.with_logical_partitioning`` (or
``nn.with_partitioning``) are ``nn.LogicallyPartitioned`` (``nn.Partitioned``)
boxes: pytree nodes that carry each array's axis names. Flaxformer / T5X /
MaxText-style code keeps them boxed in its ``TrainState`` and places the
whole state with ``nn.get_partition_spec`` and ``nn.logical_to_mesh_sharding``,
which needs every box's names to fit its array.

The MLorc transforms work on plain arrays and know nothing of Flax. Given
boxed parameters, the boxes are ordinary pytree nodes to them, kept around
each array of a compressed moment's factors, ``LowRankFactors(Box(u),
Box(s), Box(v))``, with the parameter's names, which fit none of them.
:func:`boxed` renames the boxes after ``init`` and runs ``update`` on
unboxed trees.
"""

from __future__ import annotations

from typing import Any

import flax.core.meta
import flax.linen as nn
import jax
import optax
from jax.sharding import PartitionSpec

import mlorc_optax
from mlorc_optax._src import moment_fields
from mlorc_optax.flax import _logical



def _unbox(tree: Any) -> Any:
  """``tree`` with every box replaced by its value."""
  return jax.tree_util.tree_map(
      lambda x: _logical.box_value(x) if _logical.is_box(x) else x,
      tree, is_leaf=_logical.is_box)


def _rebox_like(old: Any, new: Any) -> Any:
  """``new`` (``old`` unboxed, new values) in the boxes of ``old``."""
  return jax.tree_util.tree_map(
      lambda o, n: o.replace_boxed(n) if _logical.is_box(o) else n,
      old, new, is_leaf=_logical.is_box)


def _placement_names(
    box: Any, leaf: mlorc_optax.plan.LeafPlan
) -> dict[str, PartitionSpec] | None:
  """Names of factors placed ``'rows'``/``'batch'``/``'cols'``, or None.

  ``nn.LogicallyPartitioned`` gets :func:`~mlorc_optax.flax.
  factor_logical_axes`, ``nn.Partitioned`` (mesh axis names) the mesh axes
  of :func:`mlorc_optax.factor_partition_specs`; other boxes, and boxes
  whose names do not fit the parameter, None (the factors stay unboxed).
  """
  names = getattr(box, 'names', None)
  if names is None or len(names) != len(leaf.shape):
    return None
  if isinstance(box, nn.LogicallyPartitioned):
    specs = _logical.factor_logical_axes(leaf, names)
  elif isinstance(box, flax.core.meta.Partitioned):
    specs = mlorc_optax.factor_partition_specs(leaf, PartitionSpec(*names))
  else:
    return None
  return {'rows': specs[0], 'batch': specs[1], 'cols': specs[2]}


def _box_factors(
    x: Any, leaf: mlorc_optax.plan.LeafPlan, compressor: Any,
    nonnegative: bool
) -> Any:
  """A compressed leaf's factors, each in the parameter's box, renamed.

  The core keeps the parameter's box around each factor array (with the
  parameter's names, which fit none of them); each box gets the names of
  the axes its factor spans, or is dropped for other box types.
  """
  if not leaf.compressed:
    return x
  view = leaf.view
  specs = compressor.specs(view.batch_shape, view.rows, view.cols, leaf.rank,
                           nonnegative=nonnegative)
  if not isinstance(x, type(specs)):
    return x
  box = next((a for a in x if _logical.is_box(a)), None)
  if box is None:
    return x
  names = _placement_names(box, leaf)
  return type(x)(*(
      _logical.box_value(a) if names is None
      else a.replace(names=tuple(names[spec.placement]))
      for a, spec in zip(x, specs)
  ))


def _fix_state(state: mlorc_optax.LowRankMomentsState) -> Any:
  """Boxes every compressed moment's factors by the factors' own names."""
  plan = state.plan
  compressor = plan.compressor
  inner = state.inner_state
  for field in plan.fields:
    if not field.compressed:
      continue
    moment = moment_fields.get(inner, field)
    # The type of this field's factors (a compressor may store non-negative
    # moments in other factors than the rest).
    factor_type = type(compressor.specs(
        (), 2, 2, 1, nonnegative=field.nonnegative))
    leaves, treedef = jax.tree_util.tree_flatten(
        moment,
        is_leaf=lambda x: _logical.is_box(x) or isinstance(x, factor_type))
    if len(leaves) != len(plan.leaves):
      raise ValueError(
          f'The moment {field.name!r} has {len(leaves)} leaves but the plan '
          f'{len(plan.leaves)}: mlorc_optax.flax.boxed expects the state '
          'made by low_rank_moments.init.')
    moment = treedef.unflatten([
        _box_factors(x, leaf, compressor, field.nonnegative)
        for x, leaf in zip(leaves, plan.leaves)])
    inner = moment_fields.replace(inner, field, moment)
  return state._replace(inner_state=inner)


def _is_low_rank_state(x: Any) -> bool:
  return isinstance(x, mlorc_optax.LowRankMomentsState)


def boxed(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` on Flax Linen trees that keep their parameters boxed.

  For a transform that contains :func:`mlorc_optax.low_rank_moments` (for
  example :func:`mlorc_optax.mlorc_adamw`), given parameters boxed in
  ``nn.LogicallyPartitioned`` (``nn.with_logical_partitioning``) or
  ``nn.Partitioned`` (``nn.with_partitioning``):

  * ``init(params)`` calls ``tx.init`` on the boxed params (so that
    :func:`logical_dimension_numbers` can read the names from the boxes),
    then boxes each factor of a compressed moment with the names of the
    parameter axes it spans: :func:`factor_logical_axes` for
    ``nn.LogicallyPartitioned``, the mesh axes of
    :func:`mlorc_optax.factor_partition_specs` for ``nn.Partitioned``
    (other boxes: the factors are stored unboxed). Dense moments keep the
    parameter's box, as in optax; counters and keys are plain arrays. So
    ``nn.get_partition_spec(state)`` and ``nn.logical_to_mesh_sharding``
    place the whole state by the parameters' rules.
  * ``update(updates, state, params)`` unboxes its arguments, calls
    ``tx.update`` on plain arrays, and returns the updates boxed like the
    given updates and the new state boxed like the given state.

  The numbers are exactly those of ``tx`` on the unboxed trees. Plain
  (unboxed) trees pass through unchanged, so the wrapper may be used
  whether or not the parameters are boxed; it also suits any other optax
  transform (boxes are unboxed and reboxed).

  Args:
    tx: the transform, e.g. ``mlorc_optax.mlorc_adamw(...,
      dimension_numbers=mlorc_optax.flax.logical_dimension_numbers())``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra arguments of
    ``update`` are passed on to ``tx``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import mlorc_optax
    >>> import mlorc_optax.flax
    >>> params = {'q': nn.LogicallyPartitioned(
    ...     jnp.ones((2, 64, 4, 16)), ('layers', 'embed', 'heads', 'kv'))}
    >>> tx = mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
    ...     1e-3, rank=4,
    ...     dimension_numbers=mlorc_optax.flax.logical_dimension_numbers()))
    >>> state = tx.init(params)
    >>> mu = state[0].inner_state.mu['q']  # factors of boxes
    >>> mu.u.names, mu.u.value.shape
    (('layers', 'embed', 'mlorc_rank'), (2, 64, 4))
    >>> mu.v.names  # the columns heads*kv, named by heads
    ('layers', 'heads', 'mlorc_rank')
    >>> nn.get_partition_spec(state)[0].inner_state.mu['q'].s
    P('layers', 'mlorc_rank')
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates['q'].names, state[0].inner_state.mu['q'].u.names
    (('layers', 'embed', 'heads', 'kv'), ('layers', 'embed', 'mlorc_rank'))
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
        f'boxed needs an optax.GradientTransformation, got {tx!r}.')
  tx = optax.with_extra_args_support(tx)

  def init_fn(params: Any) -> Any:
    state = tx.init(params)
    return jax.tree_util.tree_map(
        lambda x: _fix_state(x) if _is_low_rank_state(x) else x,
        state, is_leaf=_is_low_rank_state)

  def update_fn(
      updates: Any, state: Any, params: Any = None, **extra_args: Any
  ) -> tuple[Any, Any]:
    new_updates, new_state = tx.update(
        _unbox(updates), _unbox(state), _unbox(params), **extra_args)
    return _rebox_like(updates, new_updates), _rebox_like(state, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
