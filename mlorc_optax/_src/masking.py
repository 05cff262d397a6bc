"""Which leaves are compressed, and how each one is viewed as a matrix.

MLorc's low-rank assumption is about the matrix a layer multiplies by, so each
compressed leaf is given a *matrix view*: some of its axes form the rows, some
form the columns, and every other axis is a batch axis (stacked or scanned
layers are compressed slice by slice, in one batched computation).

Leaves are matched to user specifications by their *path*, a string such as
``'layers/0/attn/kernel'`` (dict keys, sequence indices and attribute names
joined by ``/``; the ``.value`` of a ``flax.nnx.Variable`` is dropped). Matching
by path rather than by tree structure makes a mask work identically on the
``Variable``-wrapped tree that ``nnx.Optimizer`` passes to ``init`` and on the
plain arrays it passes to ``update``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from mlorc_optax._src import compressors
from mlorc_optax._src import rsvd
from mlorc_optax._src.checks import check_int

#: Last path components that the default mask never compresses.
#:
#: Biases and norm scales (including ``nnx.scan``-stacked ones of shape
#: ``(L, d)``, which look like matrices) and token embeddings (compressing them
#: is opt-in, as LLaMA-Factory and flora-opt advise).
DEFAULT_EXCLUDED_NAMES: tuple[str, ...] = ('bias', 'scale', 'embedding')


@dataclasses.dataclass(frozen=True)
class MatrixDimensionNumbers:
  """Which axes of a leaf form the rows and the columns of its matrix view.

  Every axis in neither group is a batch axis: each batch slice is its own
  matrix with its own low-rank factors. Axes may be negative.

  For instance, the default ``MatrixDimensionNumbers()`` views
  ``[..., m, n]`` as matrices ``m x n`` with leading batch axes (scanned
  layers ``[L, m, n]``); a convolution kernel ``HWIO`` is
  ``MatrixDimensionNumbers((0, 1, 2), (3,))`` (rows ``H*W*I``, columns
  ``O``); a ``DenseGeneral`` query kernel ``(embed, heads, head_dim)`` is
  ``MatrixDimensionNumbers((0,), (1, 2))``, or
  ``MatrixDimensionNumbers((-3,), (-2, -1))`` to also view stacked kernels
  ``(layers, embed, heads, head_dim)``.

  Attributes:
    row_axes: axes flattened (in order) into the rows.
    col_axes: axes flattened (in order) into the columns.

  Examples:
    :meth:`view` gives the matrix view of a shape, which
    :meth:`MatrixView.describe` writes as ``batch x [rows x cols]``:

    >>> from mlorc_optax import MatrixDimensionNumbers
    >>> MatrixDimensionNumbers().view((6, 512, 2048)).describe()  # scanned
    '6x[512x2048]'
    >>> hwio = MatrixDimensionNumbers((0, 1, 2), (3,))  # a 3x3 convolution
    >>> hwio.view((3, 3, 16, 64)).describe()
    '[144x64]'
    >>> query = MatrixDimensionNumbers((-3,), (-2, -1))  # DenseGeneral
    >>> query.view((512, 8, 64)).describe()
    '[512x512]'
    >>> query.view((6, 512, 8, 64)).describe()
    '6x[512x512]'
    >>> print(MatrixDimensionNumbers().view((32,)))  # a vector: no view
    None
  """

  row_axes: tuple[int, ...] = (-2,)
  col_axes: tuple[int, ...] = (-1,)

  def __post_init__(self):
    for name in ('row_axes', 'col_axes'):
      axes = getattr(self, name)
      if isinstance(axes, (int, np.integer)):
        axes = (int(axes),)
      axes = tuple(axes)
      if not axes or not all(
          isinstance(a, (int, np.integer)) and not isinstance(a, bool)
          for a in axes
      ):
        raise ValueError(
            f'MatrixDimensionNumbers.{name} must be a non-empty tuple of ints, '
            f'got {getattr(self, name)!r}.'
        )
      object.__setattr__(self, name, tuple(int(a) for a in axes))

  def view(self, shape: Sequence[int]) -> 'MatrixView | None':
    """The matrix view of an array of ``shape``, or None if the axes don't fit."""
    ndim = len(shape)
    try:
      rows = tuple(_positive_axis(a, ndim) for a in self.row_axes)
      cols = tuple(_positive_axis(a, ndim) for a in self.col_axes)
    except IndexError:
      return None
    if len(set(rows + cols)) != len(rows) + len(cols):
      return None
    batch = tuple(a for a in range(ndim) if a not in rows + cols)
    return MatrixView(
        shape=tuple(shape),
        batch_axes=batch,
        row_axes=rows,
        col_axes=cols,
    )


def _positive_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise IndexError(axis)
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """A leaf seen as a batch of matrices ``[*batch_shape, rows, cols]``.

  Made by :meth:`MatrixDimensionNumbers.view`; every axis of the leaf is in
  exactly one of the three groups.

  Attributes:
    shape: the leaf's shape.
    batch_axes: the leaf's axes that index the matrices (may be empty).
    row_axes: the leaf's axes flattened, major to minor, into the rows.
    col_axes: the leaf's axes flattened, major to minor, into the columns.

  Examples:
    A ``DenseGeneral`` kernel ``(embed, heads, head_dim)`` as one ``4 x 6``
    matrix, and back:

    >>> import jax.numpy as jnp
    >>> from mlorc_optax import MatrixDimensionNumbers
    >>> view = MatrixDimensionNumbers((0,), (1, 2)).view((4, 2, 3))
    >>> view.batch_shape, view.rows, view.cols, view.describe()
    ((), 4, 6, '[4x6]')
    >>> x = jnp.arange(24.0).reshape(4, 2, 3)
    >>> view.to_matrix(x)[0]  # the first row: x[0] flattened
    Array([0., 1., 2., 3., 4., 5.], dtype=float32)
    >>> bool((view.from_matrix(view.to_matrix(x)) == x).all())
    True
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """The sizes of the batch axes, one matrix per index into them."""
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def rows(self) -> int:
    """The number of rows ``m`` of each matrix (product of the row axes)."""
    return math.prod(self.shape[a] for a in self.row_axes)

  @property
  def cols(self) -> int:
    """The number of columns ``n`` of each matrix (product of the col axes)."""
    return math.prod(self.shape[a] for a in self.col_axes)

  @property
  def _perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.row_axes + self.col_axes

  def to_matrix(self, x: jax.Array) -> jax.Array:
    """``x`` of the leaf's shape -> ``[*batch_shape, rows, cols]``."""
    x = jnp.transpose(x, self._perm)
    return x.reshape(*self.batch_shape, self.rows, self.cols)

  def from_matrix(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix`."""
    perm = self._perm
    y = y.reshape(tuple(self.shape[a] for a in perm))
    return jnp.transpose(y, np.argsort(perm))

  def describe(self) -> str:
    """The view as ``'6x[512x2048]'``: batch sizes, then ``[rows x cols]``."""
    batch = ''.join(f'{d}x' for d in self.batch_shape)
    return f'{batch}[{self.rows}x{self.cols}]'


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is treated by the MLorc transforms.

  Attributes:
    path: the leaf's path, e.g. ``'layers/0/mlp/kernel'``.
    shape: the leaf's shape.
    dtype: the leaf's dtype name.
    view: the matrix view if the leaf is compressed, else None.
    rank: rank ``k = min(rank, rows, cols)`` of its factors (0 if dense).
    reason: why the leaf is or is not compressed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import compression_plan
    >>> plan = compression_plan({'w': jnp.zeros((64, 32))}, rank=4)['w']
    >>> plan.path, plan.compressed, plan.rank, plan.reason
    ('w', True, 4, 'default mask')
    >>> plan.moment_size(), plan.size  # per moment: factors vs dense
    (388, 2048)
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  view: MatrixView | None
  rank: int
  reason: str

  @property
  def compressed(self) -> bool:
    """Whether the MLorc transforms compress the leaf (it has a ``view``)."""
    return self.view is not None

  @property
  def size(self) -> int:
    """The leaf's number of entries (the numbers of a dense moment)."""
    return math.prod(self.shape)

  def moment_size(self, compressor: Any = 'rsvd') -> int:
    """Numbers stored per moment: the compressor's factors, else ``size``.

    Args:
      compressor: a name or :class:`mlorc_optax.MomentCompressor`, as the
        transforms' ``compressor=``: ``'rsvd'`` and ``'warm'`` store
        ``B((m + n)k + k)`` numbers, ``'lorapre'`` ``B(m + n)k``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mlorc_optax import compression_plan
      >>> plan = compression_plan({'w': jnp.zeros((64, 32))}, rank=4)['w']
      >>> plan.moment_size(), plan.moment_size('lorapre')
      (388, 384)
    """
    if self.view is None:
      return self.size
    compressor = compressors.resolve_compressor(
        compressor, oversample=0, power_iters=0)
    v = self.view
    specs = compressor.specs(v.batch_shape, v.rows, v.cols, self.rank)
    return sum(math.prod(spec.shape) for spec in specs)


# A mask is a bool, a pytree of bools matched to the params by path (a prefix
# tree is fine), or a callable params -> such a pytree.
MaskSpec = Union[bool, Any, Callable[[Any], Any], None]
# Per leaf: a MatrixDimensionNumbers, or None for "this leaf is no matrix".
DimensionSpec = Union[
    MatrixDimensionNumbers, Any, Callable[[Any], Any], None
]


def _key_name(entry: Any) -> str | None:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_tuple(keypath: Sequence[Any]) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as a tuple of names (``.value`` dropped)."""
  names = [_key_name(k) for k in keypath]
  if (
      keypath
      and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
      and names[-1] in ('value', 'raw_value')
  ):
    names.pop()
  return tuple(names)


def path_str(keypath: Sequence[Any]) -> str:
  """A ``jax.tree_util`` key path as ``'a/b/0/kernel'``."""
  return '/'.join(path_tuple(keypath))


def _is_spec_leaf(x: Any) -> bool:
  return isinstance(x, MatrixDimensionNumbers) or x is None


def _match_by_path(
    spec: Any, paths: list[tuple[str, ...]], argname: str
) -> list[Any]:
  """Values of ``spec`` (a tree or prefix tree) for each parameter path."""
  entries = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_spec_leaf)[0]
  table: dict[tuple[str, ...], Any] = {}
  for keypath, value in entries:
    table[path_tuple(keypath)] = value
  used: set[tuple[str, ...]] = set()
  values = []
  for path in paths:
    for cut in range(len(path), -1, -1):
      if path[:cut] in table:
        used.add(path[:cut])
        values.append(table[path[:cut]])
        break
    else:
      raise ValueError(
          f'{argname} has no entry for the parameter {"/".join(path)!r}. A '
          f'{argname} pytree must have the structure of the params (or a '
          'prefix of it); a callable is often easier.'
      )
  unused = sorted('/'.join(p) for p in table if p not in used)
  if unused:
    raise ValueError(
        f'{argname} has entries that match no parameter: {unused}. Does it '
        'come from a different parameter tree?'
    )
  return values


def _resolve(spec: Any, tree: Any, paths, argname: str) -> list[Any]:
  if callable(spec) and not isinstance(spec, MatrixDimensionNumbers):
    spec = spec(tree)
  return _match_by_path(spec, paths, argname)


def _is_floating(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Flattens ``tree`` to (paths, leaves, treedef)."""
  entries, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_tuple(k) for k, _ in entries]
  leaves = [leaf for _, leaf in entries]
  return paths, leaves, treedef


def _plan_leaf(
    path: tuple[str, ...],
    leaf: Any,
    rank: int,
    wanted: bool | None,
    dims: MatrixDimensionNumbers | None,
) -> LeafPlan:
  """``wanted`` is the user's mask value, or None for the default rule.

  ``dims`` None means that ``dimension_numbers`` gives the leaf no matrix
  view (e.g. a vector named by logical axes).
  """
  name = '/'.join(path)
  shape = tuple(np.shape(leaf))
  dtype = str(getattr(leaf, 'dtype', type(leaf).__name__))

  def dense(reason: str) -> LeafPlan:
    return LeafPlan(name, shape, dtype, None, 0, reason)

  if wanted is False:
    return dense('low_rank_mask is False')
  floating = _is_floating(leaf)
  view = dims.view(shape) if dims is not None and len(shape) >= 2 else None
  if wanted is None:
    if not floating:
      return dense('not a floating-point array')
    if view is None:
      if len(shape) < 2:
        return dense('ndim < 2')
      if dims is None:
        return dense('dimension_numbers gives no matrix view')
      return dense('axes do not fit ndim')
    if path and path[-1] in DEFAULT_EXCLUDED_NAMES:
      return dense(f'default mask excludes {path[-1]!r}')
    if min(view.rows, view.cols) <= rank:
      return dense(f'min(rows, cols) = {min(view.rows, view.cols)} <= rank')
    reason = 'default mask'
  else:
    if not floating:
      raise ValueError(
          f'low_rank_mask selects {name!r}, which is not a floating-point '
          f'array (dtype {dtype}).'
      )
    if view is None:
      raise ValueError(
          f'low_rank_mask selects {name!r} of shape {shape}, which has no '
          f'matrix view under dimension_numbers {dims}. Only leaves with two '
          'or more axes can be compressed; exclude it from the mask.'
      )
    reason = 'low_rank_mask is True'
  return LeafPlan(
      name, shape, dtype, view, rsvd.factor_rank(view.rows, view.cols, rank),
      reason,
  )


def plan_leaves(
    tree: Any,
    *,
    rank: int,
    low_rank_mask: MaskSpec = None,
    dimension_numbers: DimensionSpec = None,
) -> tuple[list[LeafPlan], Any]:
  """Plans every leaf of ``tree``; returns (plans in flatten order, treedef)."""
  paths, leaves, treedef = flatten_with_paths(tree)
  if low_rank_mask is None:
    wanted = [None] * len(leaves)
  else:
    wanted = _resolve(low_rank_mask, tree, paths, 'low_rank_mask')
    for path, value in zip(paths, wanted):
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f'low_rank_mask must give a Python bool for each leaf, got '
            f'{value!r} for {"/".join(path)!r}.'
        )
    wanted = [bool(w) for w in wanted]
  if dimension_numbers is None:
    dims = [MatrixDimensionNumbers()] * len(leaves)
  elif isinstance(dimension_numbers, MatrixDimensionNumbers):
    dims = [dimension_numbers] * len(leaves)
  else:
    dims = _resolve(dimension_numbers, tree, paths, 'dimension_numbers')
    for path, value in zip(paths, dims):
      if value is not None and not isinstance(value, MatrixDimensionNumbers):
        raise TypeError(
            'dimension_numbers must give a MatrixDimensionNumbers (or None: '
            f'no matrix view) for each leaf, got {value!r} for '
            f'{"/".join(path)!r}.'
        )
  plans = [
      _plan_leaf(p, leaf, rank, w, d)
      for p, leaf, w, d in zip(paths, leaves, wanted, dims)
  ]
  return plans, treedef


def compression_plan(
    params: Any,
    rank: int = 4,
    *,
    low_rank_mask: MaskSpec = None,
    dimension_numbers: DimensionSpec = None,
) -> Any:
  """Says, per leaf, whether and how the MLorc transforms will compress it.

  Call it with the same ``rank``, ``low_rank_mask`` and ``dimension_numbers``
  you give :func:`mlorc_optax.mlorc_adamw` to inspect the choice before
  training; :func:`format_plan` prints it as a table.

  The default rule (``low_rank_mask=None``) compresses a leaf iff it is a
  floating-point array with a matrix view (two or more axes; by default the
  last two are the rows and columns and leading axes are batch axes), its last
  path component is not one of :data:`DEFAULT_EXCLUDED_NAMES` (``bias``,
  ``scale``, ``embedding``), and ``min(rows, cols) > rank``. Every leaf that is
  not compressed is updated by the exact base optimizer.

  Args:
    params: the parameter pytree (arrays or anything with shape and dtype,
      e.g. ``jax.ShapeDtypeStruct``).
    rank: the target rank.
    low_rank_mask: None for the default rule, or a bool, a pytree of bools
      (same structure as ``params`` or a prefix of it, matched by path) or a
      callable ``params -> pytree of bools``: True compresses the leaf (an
      error if it cannot be viewed as a matrix), False keeps it dense.
    dimension_numbers: None (last two axes), one
      :class:`MatrixDimensionNumbers` for every leaf, or a pytree / callable
      giving one per leaf (None for a leaf that has no matrix view and is
      never compressed), e.g. :func:`mlorc_optax.logical_dimension_numbers`.

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    :class:`LeafPlan`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import compression_plan
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> plan = compression_plan(params, rank=4)
    >>> plan['w'].compressed, plan['b'].compressed
    (True, False)
    >>> plan['w'].moment_size()  # (64 + 32) * 4 + 4 instead of 64 * 32
    388
  """
  rank = check_int('rank', rank, 1)
  plans, treedef = plan_leaves(
      params,
      rank=rank,
      low_rank_mask=low_rank_mask,
      dimension_numbers=dimension_numbers,
  )
  return jax.tree_util.tree_unflatten(treedef, plans)


def format_plan(
    plan: Any, *, moments: int = 2, compressor: Any = 'rsvd'
) -> str:
  """A markdown table of a :func:`compression_plan`, with state sizes.

  Args:
    plan: the output of :func:`compression_plan`.
    moments: moments per leaf (2 for Adam, 1 for Lion), for the state columns.
    compressor: the transforms' ``compressor=`` (how many numbers a
      compressed moment keeps; :meth:`LeafPlan.moment_size`).

  Returns:
    The table as a string, one row per leaf and a total row.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import compression_plan, format_plan
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> table = format_plan(compression_plan(params, rank=4))
    >>> print(table.splitlines()[3])
    | w | (64, 32) | float32 | yes | [64x32] | 4 | 776 | 4,096 | default mask |
    >>> print(table.splitlines()[-1])  # Adam: two moments per leaf
    | total | | | | | | 840 | 4,160 | 20.19% of dense |
  """
  plans = [
      p for p in jax.tree_util.tree_leaves(plan)
      if isinstance(p, LeafPlan)
  ]
  rows = [
      '| path | shape | dtype | compressed | matrix view | rank | state '
      '(numbers) | dense state | reason |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  total = dense_total = 0
  for p in plans:
    state = moments * p.moment_size(compressor)
    dense = moments * p.size
    total += state
    dense_total += dense
    view = p.view.describe() if p.view is not None else '-'
    rows.append(
        f'| {p.path} | {p.shape} | {p.dtype} | {"yes" if p.compressed else "no"}'
        f' | {view} | {p.rank or "-"} | {state:,} | {dense:,} | {p.reason} |'
    )
  ratio = total / dense_total if dense_total else 0.0
  rows.append(
      f'| total | | | | | | {total:,} | {dense_total:,} | {ratio:.2%} of dense |'
  )
  return '\n'.join(rows)


def path_mask(
    include: str | None = None, exclude: str | None = None
) -> Callable[[Any], Any]:
  """A ``low_rank_mask`` selecting matrix leaves by a regex on their path.

  A leaf is selected iff it has two or more axes, ``re.search(include, path)``
  matches (or ``include`` is None) and ``re.search(exclude, path)`` does not
  (or ``exclude`` is None). Paths look like ``'layers/0/attn/query/kernel'``.

  Args:
    include: regex a selected path must match.
    exclude: regex a selected path must not match.

  Returns:
    A callable ``params -> pytree of bools`` for ``low_rank_mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import path_mask
    >>> params = {'embed': {'embedding': jnp.zeros((100, 8))},
    ...           'mlp': {'kernel': jnp.zeros((8, 16)), 'bias': jnp.zeros(16)}}
    >>> path_mask(exclude='embed')(params)
    {'embed': {'embedding': False}, 'mlp': {'bias': False, 'kernel': True}}
  """
  inc = re.compile(include) if include is not None else None
  exc = re.compile(exclude) if exclude is not None else None

  def mask_fn(params: Any) -> Any:
    def select(keypath, leaf):
      path = path_str(keypath)
      return bool(
          np.ndim(leaf) >= 2
          and (inc is None or inc.search(path) is not None)
          and (exc is None or exc.search(path) is None)
      )

    return jax.tree_util.tree_map_with_path(select, params)

  return mask_fn
