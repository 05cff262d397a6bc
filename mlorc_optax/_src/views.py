"""Matrix views of leaves, and leaves named by their paths.

MLorc's low-rank assumption is about the matrix a layer multiplies by, so each
compressed leaf is given a *matrix view*: some of its axes form the rows, some
form the columns, and every other axis is a batch axis (stacked or scanned
layers are compressed slice by slice, in one batched computation).

Leaves are matched to user specifications (masks, dimension numbers) by their
*path*, a string such as ``'layers/0/attn/kernel'`` (dict keys, sequence
indices and attribute names joined by ``/``; the ``.value`` of a
``flax.nnx.Variable`` or a Flax Linen box is dropped). Matching by path rather
than by tree structure makes a mask work identically on the
``Variable``-wrapped tree that ``nnx.Optimizer`` passes to ``init`` and on the
plain arrays it passes to ``update``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _is_axes(x: Any) -> bool:
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return True
  return isinstance(x, (tuple, list)) and bool(x) and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in x)


def as_dimension_numbers(value: Any) -> MatrixDimensionNumbers | None:
  """``value`` as :class:`MatrixDimensionNumbers` if it is one or a pair.

  A pair ``(row_axes, col_axes)`` of ints or tuples of ints, such as
  ``((0, 1, 2), (3,))``, is read as ``MatrixDimensionNumbers(row_axes,
  col_axes)``, the way ``jax.lax.dot_general`` takes its dimension numbers.
  Anything else gives None (a pytree or callable of per-leaf values).

  Examples:
    >>> from mlorc_optax._src.views import as_dimension_numbers
    >>> as_dimension_numbers(((0, 1, 2), (3,)))
    MatrixDimensionNumbers(row_axes=(0, 1, 2), col_axes=(3,))
  """
  if isinstance(value, MatrixDimensionNumbers):
    return value
  if (isinstance(value, tuple) and len(value) == 2
      and all(_is_axes(x) for x in value)):
    return MatrixDimensionNumbers(*value)
  return None


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
  return x is None or as_dimension_numbers(x) is not None


def match_by_path(
    spec: Any, paths: list[tuple[str, ...]], argname: str
) -> list[Any]:
  """Values of ``spec`` (a tree or prefix tree) for each parameter path.

  Raises ``ValueError`` naming ``argname`` for a parameter without an entry
  and for entries that match no parameter.
  """
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


def resolve_by_path(
    spec: Any, tree: Any, paths: list[tuple[str, ...]], argname: str
) -> list[Any]:
  """:func:`match_by_path` of ``spec``, or of ``spec(tree)`` if callable."""
  if callable(spec) and not isinstance(spec, MatrixDimensionNumbers):
    spec = spec(tree)
  return match_by_path(spec, paths, argname)


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Flattens ``tree`` to (paths, leaves, treedef)."""
  entries, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_tuple(k) for k, _ in entries]
  leaves = [leaf for _, leaf in entries]
  return paths, leaves, treedef


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
    def select(keypath: Sequence[Any], leaf: Any) -> bool:
      path = path_str(keypath)
      return bool(
          np.ndim(leaf) >= 2
          and (inc is None or inc.search(path) is not None)
          and (exc is None or exc.search(path) is None)
      )

    return jax.tree_util.tree_map_with_path(select, params)

  return mask_fn
