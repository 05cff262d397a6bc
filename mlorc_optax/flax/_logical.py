"""Matrix views, factor names and plan tables from logical axis names.

Flax Linen codebases (Flaxformer, T5X, MaxText) name every parameter axis
with a *logical* name through ``nn.with_logical_partitioning`` and map the
names to mesh axes with rules (``nn.logical_to_mesh_sharding``). Their
attention kernels are multi-axis ``DenseGeneral`` tensors and their layers
are stacked by ``nn.scan``, so "the last two axes are the matrix" is wrong:

=======================  ======================  ===========================
leaf (logical names)     rows (input axes)       columns (output axes)
=======================  ======================  ===========================
q/k/v ``(embed, heads,   ``embed``               ``heads*kv``
kv)``
out ``(heads, kv,        ``heads*kv``            ``embed``
embed)``
MLP in ``(embed, mlp)``  ``embed``               ``mlp``
MLP out ``(mlp, embed)`` ``mlp``                 ``embed``
``(layers, ...)``        as above; ``layers`` is a batch axis
=======================  ======================  ===========================

:func:`logical_dimension_numbers` derives these views from the names, and
:func:`factor_logical_axes` gives each factor the logical names of the
parameter axes it spans, so that the optimizer state is placed by the same
rules as the parameters (:func:`mlorc_optax.flax.boxed` boxes the factors
with them).

Flax names each array dimension with one logical name, but a factor's row
dimension may flatten several parameter axes (``heads`` and ``kv``). It takes
the name of the major-most named axis among them (``heads``): that places it
exactly like the flattened parameter (and like
:func:`mlorc_optax.factor_partition_specs`) whenever the minor axes are not
sharded, as ``kv`` (the head dimension) never is in T5X or MaxText rules. If
your rules shard a minor axis too, the factor is sharded by the major axis'
mesh axes only: a valid placement of a small array, not the parameter's.
Likewise, Flax resolves each array's names on their own, so rules with
fallbacks (a name listed twice) may resolve a name differently in a factor
than in its parameter; :func:`mlorc_optax.factor_partition_specs` of the
parameter's resolved spec is the exact parameter-following placement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.core.meta
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mlorc_optax._src import inspection
from mlorc_optax._src import plan as plan_lib
from mlorc_optax._src import views

#: Logical name of the rank axis of every factor. No rule needs to mention
#: it: ``nn.logical_to_mesh_axes`` leaves names without a rule unsharded, so
#: the rank axis is replicated. (Add ``('mlorc_rank', None)`` to your rules
#: to say so explicitly.)
RANK_AXIS_NAME = 'mlorc_rank'

#: The ``joined_names`` of :func:`logical_dimension_numbers` for the
#: ``DenseGeneral`` attention kernels of Flaxformer / T5X, whose head axes are
#: named ``heads`` (number of heads) and ``kv`` (head dimension).
DENSE_GENERAL_JOINED_NAMES: tuple[tuple[str, ...], ...] = (('heads', 'kv'),)

Names = tuple[Any, ...]  # one logical name (str) or None per axis


def is_box(x: Any) -> bool:
  """Whether ``x`` is a Flax metadata box (``nn.LogicallyPartitioned``, ...)."""
  return isinstance(x, flax.core.meta.AxisMetadata)


def box_value(box: Any) -> Any:
  """The value inside a box, without Flax's sharding constraint.

  ``nn.Partitioned.unbox()`` constrains the value to the box's sharding when
  a mesh is defined; the optimizer works on arrays that ``jit`` has placed
  already, so it reads ``value`` directly. Other boxes are ``unbox()``-ed.
  """
  if isinstance(box, flax.core.meta.Partitioned):
    return box.value
  return box.unbox()


def _names_of(x: Any, where: str, argname: str) -> Names | None:
  """The logical names of a leaf of ``logical_axes`` (None: unnamed)."""
  if x is None:
    return None
  if is_box(x) or hasattr(x, 'names'):
    x = getattr(x, 'names', None)
    if x is None:
      return None
  if isinstance(x, (PartitionSpec, tuple, list)):
    names = tuple(x)
    for n in names:
      if n is not None and not isinstance(n, str):
        raise TypeError(
            f'{argname} must give one logical name (a str) or None per axis; '
            f'{where!r} has {names!r}.'
        )
    return names
  if hasattr(x, 'shape'):  # an unboxed array: no names
    return None
  raise TypeError(
      f'{argname} must be a pytree of PartitionSpecs or tuples of logical '
      f'names (e.g. nn.get_partition_spec(variables["params"])); {where!r} '
      f'is {x!r}.'
  )


def _is_names_leaf(x: Any) -> bool:
  return (
      x is None
      or isinstance(x, PartitionSpec)
      or is_box(x)
      or (
          isinstance(x, (tuple, list))
          and all(n is None or isinstance(n, str) for n in x)
      )
  )


def names_by_path(tree: Any, argname: str) -> dict[str, Names | None]:
  """``{path: names}`` of a pytree of names, specs or boxes."""
  entries = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_names_leaf)
  out = {}
  for keypath, leaf in entries[0]:
    path = views.path_str(keypath)
    out[path] = _names_of(leaf, path, argname)
  return out


def _check_name_groups(argname: str, value: Any) -> tuple[str, ...]:
  if isinstance(value, str) or not all(isinstance(n, str) for n in value):
    raise TypeError(
        f'{argname} must be a sequence of logical names (str), got {value!r}.'
    )
  return tuple(value)


def _view_from_names(
    names: Names,
    batch_names: tuple[str, ...],
    joined: tuple[tuple[str, ...], ...],
    where: str,
) -> views.MatrixDimensionNumbers | None:
  """Rows and columns from logical names (see logical_dimension_numbers)."""
  groups: list[list[int]] = []
  group_of_last = None
  for axis, name in enumerate(names):
    if name is not None and name in batch_names:
      group_of_last = None
      continue
    group = next((g for g in joined if name is not None and name in g), None)
    if group is not None and group is group_of_last and groups:
      groups[-1].append(axis)
    else:
      groups.append([axis])
    group_of_last = group
  if len(groups) < 2:
    return None
  if len(groups) > 2:
    raise ValueError(
        f'logical_dimension_numbers cannot split {where!r} with logical axes '
        f'{names} into rows and columns: its non-batch axes form '
        f'{len(groups)} groups {[[names[a] for a in g] for g in groups]}. '
        'Join the axes that flatten together with joined_names, mark batch '
        'axes with batch_names, or give this leaf a MatrixDimensionNumbers.'
    )
  return views.MatrixDimensionNumbers(tuple(groups[0]), tuple(groups[1]))


def logical_dimension_numbers(
    logical_axes: Any = None,
    *,
    batch_names: Sequence[str] = ('layers',),
    joined_names: Sequence[Sequence[str]] = DENSE_GENERAL_JOINED_NAMES,
    unnamed: views.MatrixDimensionNumbers | None = (
        views.MatrixDimensionNumbers()
    ),
) -> Callable[[Any], Any]:
  """A ``dimension_numbers`` that views leaves by their logical axis names.

  For each leaf, axes named in ``batch_names`` are batch axes (a stack of
  ``nn.scan`` layers is compressed layer by layer). The other axes, in order,
  form groups: consecutive axes whose names belong to one tuple of
  ``joined_names`` are one group, every other axis is a group of its own.
  Two groups are the rows and the columns of the matrix view; one group (a
  bias, a norm scale, a stacked ``(layers, embed)`` scale) is no matrix, and
  the leaf is never compressed; more groups are an error naming the leaf.

  With the defaults (Flaxformer / T5X names) this gives the views of
  ``DenseGeneral`` kernels: ``(embed, heads, kv)`` is ``embed x heads*kv``,
  ``(heads, kv, embed)`` is ``heads*kv x embed``, ``(layers, embed, mlp)`` is
  a batch of ``embed x mlp`` matrices and an embedding ``(vocab, embed)`` is
  ``vocab x embed`` (compressed only if ``low_rank_mask`` asks: the default
  mask excludes leaves named ``embedding``).

  Args:
    logical_axes: the logical names of the parameters' axes: a pytree with
      the structure of the params (matched by path) whose leaves are
      ``PartitionSpec``\\s or tuples of names, e.g.
      ``nn.get_partition_spec(variables['params'])``, or the boxed
      parameters themselves. None reads the names from the
      ``nn.LogicallyPartitioned`` boxes of the tree the transform's ``init``
      is given (params kept boxed, as in ``TrainState.create(params=
      variables['params'], tx=mlorc_optax.flax.boxed(tx))``).
    batch_names: logical names of batch axes.
    joined_names: tuples of logical names whose consecutive axes are
      flattened into one matrix dimension.
    unnamed: the view of leaves without logical names (None: never
      compressed).

  Returns:
    A callable ``params -> pytree of MatrixDimensionNumbers or None`` for the
    ``dimension_numbers`` argument of :func:`mlorc_optax.mlorc_adamw`,
    :func:`mlorc_optax.mlorc_lion` and :func:`mlorc_optax.low_rank_moments`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import mlorc_optax
    >>> import mlorc_optax.flax
    >>> params = {'query': jnp.zeros((2, 64, 4, 16)),   # scanned DenseGeneral
    ...           'out': jnp.zeros((2, 4, 16, 64)),
    ...           'scale': jnp.zeros((2, 64))}
    >>> names = {'query': P('layers', 'embed', 'heads', 'kv'),
    ...          'out': P('layers', 'heads', 'kv', 'embed'),
    ...          'scale': P('layers', 'embed')}
    >>> dims = mlorc_optax.flax.logical_dimension_numbers(names)
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4, dimension_numbers=dims)
    >>> plan = mlorc_optax.compression_plan(tx, params)
    >>> plan['query'].view.describe(), plan['out'].view.describe()
    ('2x[64x64]', '2x[64x64]')
    >>> plan['query'].view.row_axes, plan['query'].view.col_axes
    ((1,), (2, 3))
    >>> plan['scale'].reason
    'dimension_numbers gives no matrix view'
  """
  batch = _check_name_groups('batch_names', batch_names)
  if isinstance(joined_names, str):
    raise TypeError(
        'joined_names must be a sequence of tuples of names, e.g. '
        f"(('heads', 'kv'),), got {joined_names!r}."
    )
  joined = tuple(_check_name_groups('joined_names', g) for g in joined_names)
  if unnamed is not None and not isinstance(
      unnamed, views.MatrixDimensionNumbers
  ):
    raise TypeError(
        f'unnamed must be a MatrixDimensionNumbers or None, got {unnamed!r}.'
    )
  table = (
      None
      if logical_axes is None
      else names_by_path(logical_axes, 'logical_axes')
  )

  def dimension_numbers(params: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=is_box
    )
    out = []
    for keypath, leaf in leaves:
      path = views.path_str(keypath)
      if table is None:
        names = _names_of(leaf, path, 'logical_axes')
      elif path in table:
        names = table[path]
      else:
        raise ValueError(
            f'logical_axes has no entry for the parameter {path!r}: it must '
            'have the structure of the params, e.g. '
            'nn.get_partition_spec(variables["params"]).'
        )
      ndim = np.ndim(box_value(leaf) if is_box(leaf) else leaf)
      if names is None or not names:
        out.append(unnamed)
        continue
      if len(names) != ndim:
        raise ValueError(
            f'logical_axes gives {path!r} the names {names}, one per axis '
            f'expected for its {ndim} axes.'
        )
      out.append(_view_from_names(names, batch, joined, path))
    return jax.tree_util.tree_unflatten(treedef, out)

  return dimension_numbers


def _joined(names: Names, axes: tuple[int, ...]) -> Any:
  """One logical name for a dimension that flattens ``axes``."""
  named = [names[a] for a in axes if names[a] is not None]
  return named[0] if named else None


def factor_logical_axes(
    plan: plan_lib.LeafPlan,
    names: Sequence[str | None],
    *,
    rank_name: str | None = RANK_AXIS_NAME,
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, PartitionSpec]:
  """Logical names ``(u, s, v, dense)`` of a compressed leaf's moments.

  The logical counterpart of :func:`mlorc_optax.factor_partition_specs`:
  with the view ``[*batch, rows, cols]`` of a parameter whose axes are named
  ``names``,

  * ``u`` ``[*batch, rows, k]`` gets the batch axes' names, the rows' name
    and ``rank_name``;
  * ``v`` ``[*batch, cols, k]`` likewise with the columns;
  * ``s`` ``[*batch, k]`` the batch names and ``rank_name``;
  * the view of a dense moment, ``[*batch, rows, cols]``.

  Factors of other compressors take the names of their placement
  (:class:`~mlorc_optax.compressors.FactorSpec`): ``'rows'`` those of
  ``u``, ``'cols'`` those of ``v``, ``'batch'`` those of ``s``.

  A dimension that flattens several axes takes the name of the major-most
  named one (``heads`` for ``(heads, kv)``; see the module docstring for why
  this places it like the parameter). :func:`mlorc_optax.flax.boxed` boxes
  every factor of params boxed with ``nn.with_logical_partitioning`` with
  these names, so ``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding``
  place the optimizer state by the parameters' rules.

  Args:
    plan: the leaf's plan (from :func:`mlorc_optax.compression_plan`).
    names: the parameter's logical axis names, one per axis.
    rank_name: the name of the rank axis (:data:`RANK_AXIS_NAME`: no rule
      maps it, so it is replicated).

  Returns:
    Logical ``PartitionSpec``\\s for ``u``, ``s``, ``v`` and a dense moment's
    view.

  Raises:
    ValueError: if the leaf is not compressed or ``names`` does not give one
      name per axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import mlorc_optax
    >>> import mlorc_optax.flax
    >>> names = ('layers', 'embed', 'heads', 'kv')
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, rank=4, dimension_numbers=(
    ...         mlorc_optax.flax.logical_dimension_numbers({'q': names})))
    >>> plan = mlorc_optax.compression_plan(
    ...     tx, {'q': jnp.zeros((2, 64, 4, 16))})
    >>> u, s, v, _ = mlorc_optax.flax.factor_logical_axes(plan['q'], names)
    >>> u  # (layers, rows, rank)
    P('layers', 'embed', 'mlorc_rank')
    >>> v  # (layers, cols, rank): heads*kv is named by heads
    P('layers', 'heads', 'mlorc_rank')
    >>> rules = (('embed', 'data'), ('heads', 'model'), ('kv', None))
    >>> nn.logical_to_mesh_axes(v, rules)  # the columns' mesh axis
    P(None, 'model', None)
  """
  view = plan.view
  if view is None:
    raise ValueError(f'{plan.path!r} is not compressed; it has no factors.')
  names = tuple(names)
  if len(names) != len(plan.shape):
    raise ValueError(
        f'names must give one logical name per axis of {plan.path!r} '
        f'{plan.shape}, got {names}.'
    )
  batch = tuple(names[a] for a in view.batch_axes)
  rows = _joined(names, view.row_axes)
  cols = _joined(names, view.col_axes)
  return (
      PartitionSpec(*batch, rows, rank_name),
      PartitionSpec(*batch, rank_name),
      PartitionSpec(*batch, cols, rank_name),
      PartitionSpec(*batch, rows, cols),
  )


def _describe_view(view: views.MatrixView, names: Names | None) -> str:
  def name(axis: int) -> str:
    if names is not None and names[axis] is not None:
      return names[axis]
    return f'axis{axis}'

  def dim(axes: tuple[int, ...]) -> str:
    size = math.prod(view.shape[a] for a in axes)
    return f'{"*".join(name(a) for a in axes)}={size}'

  batch = ''.join(f'{name(a)}={view.shape[a]} x ' for a in view.batch_axes)
  return f'{batch}[{dim(view.row_axes)} x {dim(view.col_axes)}]'


def _itemsize(dtype: str) -> int:
  try:
    return jnp.dtype(dtype).itemsize
  except TypeError:  # not an array (e.g. a Python scalar leaf)
    return 0


def format_logical_plan(
    plan: Any,
    logical_axes: Any = None,
    *,
    factor_dtype: Any = np.float32,
) -> str:
  """A markdown table of a plan in logical names, with state bytes.

  One row per leaf: its path, logical axes, shape, matrix view in logical
  names (``layers=2 x [embed=64 x heads*kv=64]``: a batch of 2 matrices
  whose rows are ``embed`` and whose columns flatten ``heads`` and ``kv``),
  rank, the bytes the optimizer state keeps for its moments (factors in
  ``factor_dtype``, dense moments in the leaf's dtype), the bytes of the
  inner optimizer's dense moments (for Adam, ``optax.adamw``'s state), why
  the leaf is or is not compressed and the step that computes its update
  (:attr:`~mlorc_optax.plan.LeafPlan.step`); then the totals.

  Args:
    plan: a :func:`mlorc_optax.compression_plan` (params kept boxed are
      fine).
    logical_axes: the parameters' logical names, as for
      :func:`logical_dimension_numbers` (a pytree of ``PartitionSpec``\\s or
      the boxed params); None prints no names.
    factor_dtype: the transform's ``factor_dtype``.

  Returns:
    The table as a string.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import mlorc_optax
    >>> import mlorc_optax.flax
    >>> names = {'q': P('embed', 'heads', 'kv')}
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, rank=4,
    ...     dimension_numbers=mlorc_optax.flax.logical_dimension_numbers(names))
    >>> plan = mlorc_optax.compression_plan(tx, {'q': jnp.zeros((64, 4, 16))})
    >>> print(mlorc_optax.flax.format_logical_plan(plan, names))  # on a CPU
    ... # doctest: +NORMALIZE_WHITESPACE
    | path | logical axes | shape | matrix view | rank | state bytes | dense \
state bytes | why | step |
    |---|---|---|---|---|---|---|---|---|
    | q | (embed, heads, kv) | (64, 4, 16) | [embed=64 x heads*kv=64] | 4 | \
4,128 | 32,768 | default mask | reference |
    | total | | | | | 4,128 | 32,768 | 12.60% of dense | |
  """
  table = (
      {} if logical_axes is None
      else names_by_path(logical_axes, 'logical_axes')
  )
  factor_itemsize = jnp.dtype(factor_dtype).itemsize
  rows, total, dense_total = [], 0, 0
  for p in inspection.leaf_plans(plan):
    names = table.get(p.path)
    itemsize = _itemsize(p.dtype)
    state = (p.factor_size * factor_itemsize
             + p.dense_moments * p.size * itemsize)
    dense = p.dense_state_size * itemsize
    view = '-' if p.view is None else _describe_view(p.view, names)
    total += state
    dense_total += dense
    shown = '-' if not names else f'({", ".join(str(n) for n in names)})'
    rows.append([p.path, shown, str(p.shape), view, str(p.rank or '-'),
                 f'{state:,}', f'{dense:,}', p.reason, p.step])
  ratio = total / dense_total if dense_total else 0.0
  rows.append(['total', '', '', '', '', f'{total:,}', f'{dense_total:,}',
               f'{ratio:.2%} of dense', ''])
  return inspection.markdown_table(
      ['path', 'logical axes', 'shape', 'matrix view', 'rank', 'state bytes',
       'dense state bytes', 'why', 'step'], rows)
