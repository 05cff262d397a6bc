"""The plan: per leaf, whether it is compressed, how, and which step it takes.

:func:`mlorc_optax.low_rank_moments` makes one plan in ``init`` and keeps it
in its state, as static data of the state's tree structure (a
:class:`PlanNode`, an empty ``NamedTuple``): every later ``update`` reads
its decisions instead of making them again, and
:func:`compression_plan` / :func:`format_plan` show them to the user.

Per leaf (:class:`LeafPlan`) the plan says

* whether the leaf's moments are compressed, and why (the default rule or
  ``low_rank_mask``), with its matrix view (:mod:`mlorc_optax._src.views`)
  and factor rank;
* which *step* computes its update: ``'dense'`` (not compressed: the inner
  optimizer's own step), ``'reference'`` (the moments reconstructed densely
  and handed to the inner optimizer, paper Algorithm 1 as written), or the
  two-pass step of :mod:`mlorc_optax._src.two_pass` in Pallas kernels
  (``'pallas'``) or in ``jax.numpy`` (``'xla'``), and why. This module is
  the one place that decides it (:func:`choose_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from mlorc_optax._src import compressors
from mlorc_optax._src import rsvd
from mlorc_optax._src import views
from mlorc_optax._src.kernels import launch

#: Last path components that the default mask never compresses.
#:
#: Biases and norm scales (including ``nnx.scan``-stacked ones of shape
#: ``(L, d)``, which look like matrices) and token embeddings (compressing them
#: is opt-in, as LLaMA-Factory and flora-opt advise).
DEFAULT_EXCLUDED_NAMES: tuple[str, ...] = ('bias', 'scale', 'embedding')

#: The values of ``implementation=`` besides None (automatic).
IMPLEMENTATIONS: tuple[str, ...] = ('reference', 'xla', 'pallas')

# A mask is a bool, a pytree of bools matched to the params by path (a prefix
# tree is fine), or a callable params -> such a pytree.
MaskSpec = Union[bool, Any, Callable[[Any], Any], None]
# Per leaf: a MatrixDimensionNumbers (or a (row_axes, col_axes) pair), or None
# for "this leaf is no matrix".
DimensionSpec = Union[
    views.MatrixDimensionNumbers, tuple, Any, Callable[[Any], Any], None
]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How :func:`mlorc_optax.low_rank_moments` treats one leaf.

  Attributes:
    path: the leaf's path, e.g. ``'layers/0/mlp/kernel'``.
    shape: the leaf's shape.
    dtype: the leaf's dtype name.
    view: the matrix view if the leaf is compressed, else None.
    rank: rank ``k = min(rank, rows, cols)`` of its factors (0 if dense).
    reason: why the leaf is or is not compressed.
    moments: the inner state's fields whose moment of this leaf is stored as
      factors (empty if the leaf is not compressed).
    dense_moments: how many of the inner state's moment fields keep this
      leaf's moment dense.
    factor_size: numbers stored per compressed moment (the compressor's
      factors; 0 if dense).
    step: ``'dense'``, ``'reference'``, ``'xla'`` or ``'pallas'`` (module
      docstring).
    step_reason: why the leaf takes that step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4)
    >>> plan = mlorc_optax.compression_plan(tx, {'w': jnp.zeros((64, 32))})
    >>> p = plan['w']
    >>> p.path, p.compressed, p.rank, p.reason, p.moments
    ('w', True, 4, 'default mask', ('mu', 'nu'))
    >>> p.factor_size, p.size  # per moment: (64 + 32) * 4 + 4 vs 64 * 32
    (388, 2048)
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  view: views.MatrixView | None
  rank: int
  reason: str
  moments: tuple[str, ...] = ()
  dense_moments: int = 0
  factor_size: int = 0
  step: str = 'dense'
  step_reason: str = 'not compressed'

  @property
  def compressed(self) -> bool:
    """Whether the leaf's moments are compressed (it has a ``view``)."""
    return self.view is not None

  @property
  def size(self) -> int:
    """The leaf's number of entries (the numbers of a dense moment)."""
    return math.prod(self.shape)

  @property
  def state_size(self) -> int:
    """Numbers the optimizer state keeps for this leaf's moments."""
    return len(self.moments) * self.factor_size + self.dense_moments * self.size

  @property
  def dense_state_size(self) -> int:
    """Numbers the inner optimizer alone would keep for them."""
    return (len(self.moments) + self.dense_moments) * self.size


def _is_floating(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _plan_leaf(
    path: tuple[str, ...],
    leaf: Any,
    rank: int,
    wanted: bool | None,
    dims: views.MatrixDimensionNumbers | None,
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
    if 0 in shape:
      raise ValueError(
          f'low_rank_mask selects {name!r} of shape {shape}, which is empty: '
          'an empty matrix has no factors to keep. Exclude it from the mask.'
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
  """Plans whether each leaf of ``tree`` is compressed (flatten order).

  Returns:
    ``(plans, treedef)``: one :class:`LeafPlan` per leaf (its step not yet
    chosen) and ``tree``'s treedef.
  """
  paths, leaves, treedef = views.flatten_with_paths(tree)
  if low_rank_mask is None:
    wanted = [None] * len(leaves)
  else:
    wanted = views.resolve_by_path(low_rank_mask, tree, paths, 'low_rank_mask')
    for path, value in zip(paths, wanted):
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f'low_rank_mask must give a Python bool for each leaf, got '
            f'{value!r} for {"/".join(path)!r}.'
        )
    wanted = [bool(w) for w in wanted]
  one = (views.MatrixDimensionNumbers() if dimension_numbers is None
         else views.as_dimension_numbers(dimension_numbers))
  if one is not None:
    dims = [one] * len(leaves)
  else:
    dims = views.resolve_by_path(
        dimension_numbers, tree, paths, 'dimension_numbers')
    for i, (path, value) in enumerate(zip(paths, dims)):
      if value is not None:
        dims[i] = views.as_dimension_numbers(value)
      if value is not None and dims[i] is None:
        raise TypeError(
            'dimension_numbers must give a MatrixDimensionNumbers, a '
            '(row_axes, col_axes) pair or None (no matrix view) for each '
            f'leaf, got {value!r} for {"/".join(path)!r}.'
        )
  plans = [
      _plan_leaf(p, leaf, rank, w, d)
      for p, leaf, w, d in zip(paths, leaves, wanted, dims)
  ]
  return plans, treedef


# ----------------------------------------------------------------------------
# Which step a compressed leaf takes.


def on_nvidia_gpu() -> bool:
  """Whether the default backend is an NVIDIA GPU (where the kernels ran).

  The kernels were written and measured for NVIDIA GPUs (Triton, TF32
  tensor cores); other GPUs get the reference step automatically.
  """
  if jax.default_backend() != 'gpu':
    return False
  return 'nvidia' in jax.devices()[0].device_kind.lower()


def two_pass_blocker(
    *,
    fast_fields: tuple[str, ...] | None,
    compressed_fields: tuple[str, ...],
    compressor: compressors.MomentCompressor,
) -> str | None:
  """Why the two-pass step cannot compute these settings, or None if it can.

  Args:
    fast_fields: the moment fields the optimizer's two-pass step computes
      (``('mu', 'nu')`` for Adam, ``('mu',)`` for Lion), or None if the
      optimizer has none.
    compressed_fields: the inner state's fields that are compressed.
    compressor: the moment compressor.
  """
  if fast_fields is None:
    return 'no two-pass step for this optimizer'
  if not compressors.streamable(compressor):
    return (f'compressor {compressor.name!r} is not a randomized SVD without '
            'power iterations')
  if set(compressed_fields) != set(fast_fields):
    return (f'compressed moments {compressed_fields} are not '
            f'{fast_fields}: a dense moment is kept')
  return None


def check_implementation(
    implementation: str | None, *, blocker: str | None
) -> str | None:
  """Validates ``implementation=`` (None: automatic); raises naming it."""
  if implementation is None:
    return None
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'implementation must be None or one of {IMPLEMENTATIONS}, got '
        f'{implementation!r}.'
    )
  if implementation != 'reference' and blocker is not None:
    raise ValueError(
        f'implementation={implementation!r} (the two-pass step) cannot run: '
        f'{blocker}; use implementation=None or \'reference\'.'
    )
  return implementation


def choose_step(
    plan: LeafPlan,
    *,
    implementation: str | None,
    blocker: str | None,
    sketched: bool,
    kernel_config: launch.KernelConfig,
) -> tuple[str, str]:
  """``(step, reason)`` for a compressed leaf.

  ``implementation=None`` (automatic) picks ``'pallas'`` on a single NVIDIA
  GPU when the settings allow the two-pass step (``blocker`` is None), and
  ``'reference'`` otherwise (CPU, TPU, several devices: a Pallas call has no
  sharding rule, so under ``NamedSharding`` XLA would gather its operands).
  ``'pallas'`` falls back to ``'xla'`` (the same two passes in
  ``jax.numpy``) for a matrix the kernels cannot tile, and every two-pass
  choice falls back to ``'reference'`` where the sketch is the identity
  (``rank + oversample >= cols``: the RSVD is exact there).
  """
  if implementation is None:
    if blocker is not None:
      return 'reference', f'automatic: {blocker}'
    if not on_nvidia_gpu():
      return 'reference', 'automatic: not on an NVIDIA GPU'
    if jax.device_count() != 1:
      return 'reference', 'automatic: several devices'
    implementation, why = 'pallas', 'automatic: one NVIDIA GPU'
  elif implementation == 'reference':
    return 'reference', "implementation='reference'"
  else:
    why = f'implementation={implementation!r}'
  if not sketched:
    return 'reference', 'the sketch is the identity (exact RSVD)'
  view = plan.view
  if implementation == 'pallas' and not launch.supports(
      view.rows, view.cols, kernel_config):
    return 'xla', f'{why}; {view.rows}x{view.cols} does not tile'
  return implementation, why


# ----------------------------------------------------------------------------
# The plan kept in the state.


@dataclasses.dataclass(frozen=True)
class MomentField:
  """A params-shaped moment tree of the inner optimizer's state.

  Attributes:
    location: indices into nested tuples of the inner state leading to the
      ``NamedTuple`` that holds the field (``()``: the state itself).
    name: the field's name (``'mu'``, ``'nu'``, ...).
    index: its position among the inner state's moment fields (the ``j`` of
      the sketch keys).
    nonnegative: whether the moment is non-negative (gets the fix of paper
      equation 2).
    compressed: whether its matrix leaves are stored as factors.
  """

  location: tuple[int, ...]
  name: str
  index: int
  nonnegative: bool
  compressed: bool


@dataclasses.dataclass(frozen=True)
class LowRankPlan:
  """Everything :func:`mlorc_optax.low_rank_moments` decided in ``init``.

  The state holds it as :func:`plan_node`: an empty ``NamedTuple`` whose
  type carries the plan, so it lives in the treedef of the state: static
  under ``jit``, no memory, and every tool that handles optax states
  (``flax.serialization``, Orbax, ``nnx.Optimizer``, pickle) handles it.

  Attributes:
    leaves: one :class:`LeafPlan` per parameter leaf, in flatten order.
    fields: the inner state's moment fields (:class:`MomentField`).
    compressor: the moment compressor.
    interpret: whether the Pallas steps run in interpret mode (not on an
      NVIDIA GPU).
  """

  leaves: tuple[LeafPlan, ...]
  fields: tuple[MomentField, ...]
  compressor: compressors.MomentCompressor
  interpret: bool


class PlanNode(NamedTuple):
  """An empty ``NamedTuple`` whose type holds a :class:`LowRankPlan`.

  Its attributes are the plan's (``node.leaves``, ``node.fields``, ...;
  ``node.plan`` is the plan itself). Made by :func:`plan_node`.
  """

  def __reduce__(self):
    return plan_node, (self.plan,)


@functools.cache
def _node_type(plan: LowRankPlan) -> type[PlanNode]:
  # One type per plan (equal plans share it), so that states made from the
  # same params have equal treedefs, and an empty instance restored by type
  # (flax.serialization does type(node)()) keeps its plan.
  attrs = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
  return type('LowRankPlanNode', (PlanNode,),
              {'__slots__': (), 'plan': plan, **attrs})


def plan_node(plan: LowRankPlan) -> PlanNode:
  """The state's node for ``plan`` (see :class:`PlanNode`)."""
  return _node_type(plan)()


def _is_plan(x: Any) -> bool:
  return isinstance(x, PlanNode)


def compression_plan(tx: Any, params: Any) -> Any:
  """Says, per leaf, whether and how an MLorc transform compresses it.

  Traces ``tx.init(params)`` abstractly (``jax.eval_shape``: nothing is
  allocated) and returns the plan that the transform made, with the
  structure of ``params``: for each leaf, whether its moments are
  compressed, its matrix view and rank, and the step that computes its
  update, each with the reason (:class:`LeafPlan`). :func:`format_plan`
  prints it as a table.

  The default rule (``low_rank_mask=None``) compresses a leaf iff it is a
  floating-point array with a matrix view (two or more axes; by default the
  last two are the rows and columns and leading axes are batch axes), its
  last path component is not one of :data:`DEFAULT_EXCLUDED_NAMES`
  (``bias``, ``scale``, ``embedding``), and ``min(rows, cols) > rank``.
  Every leaf that is not compressed is updated by the exact inner optimizer.

  Args:
    tx: a transform that contains exactly one
      :func:`mlorc_optax.low_rank_moments` (for example
      :func:`mlorc_optax.mlorc_adamw`, chained or wrapped in any way), or an
      optimizer state of one.
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); not
      needed when ``tx`` is a state.

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    :class:`LeafPlan`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> plan = mlorc_optax.compression_plan(mlorc_optax.mlorc_adamw(1e-3),
    ...                                     params)
    >>> plan['w'].compressed, plan['b'].compressed
    (True, False)
    >>> plan['w'].step, plan['b'].step  # on a CPU
    ('reference', 'dense')
  """
  if hasattr(tx, 'init') and callable(tx.init):
    state = jax.eval_shape(tx.init, params)
  else:
    state = tx
  plans = [x for x in jax.tree_util.tree_leaves(state, is_leaf=_is_plan)
           if _is_plan(x)]
  if len(plans) != 1:
    raise ValueError(
        f'compression_plan needs a transform with exactly one '
        f'low_rank_moments, found {len(plans)}.'
    )
  plan = plans[0].plan
  if params is None:
    return {p.path: p for p in plan.leaves}
  treedef = jax.tree_util.tree_structure(params)
  return jax.tree_util.tree_unflatten(treedef, plan.leaves)


def format_plan(plan: Any) -> str:
  """A markdown table of a :func:`compression_plan`, with state sizes.

  One row per leaf: path, shape, dtype, whether it is compressed, its
  matrix view and rank, the numbers the optimizer state keeps for its
  moments against the inner optimizer's dense moments, why it is (not)
  compressed, and the step that computes its update and why; then the
  totals.

  Args:
    plan: the output of :func:`compression_plan`.

  Returns:
    The table as a string.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> params = {'w': jnp.zeros((64, 32)), 'b': jnp.zeros(32)}
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4)
    >>> table = mlorc_optax.format_plan(mlorc_optax.compression_plan(tx, params))
    >>> print(table.splitlines()[3])
    | w | (64, 32) | float32 | yes | [64x32] | 4 | 776 | 4,096 | default mask \
| reference | automatic: not on an NVIDIA GPU |
    >>> print(table.splitlines()[-1])  # Adam: two moments per leaf
    | total | | | | | | 840 | 4,160 | 20.19% of dense | | |
  """
  plans = [p for p in jax.tree_util.tree_leaves(
      plan, is_leaf=lambda x: isinstance(x, LeafPlan))
           if isinstance(p, LeafPlan)]
  rows = [
      '| path | shape | dtype | compressed | matrix view | rank | state '
      '(numbers) | dense state | reason | step | why |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  total = dense_total = 0
  for p in plans:
    total += p.state_size
    dense_total += p.dense_state_size
    view = p.view.describe() if p.view is not None else '-'
    rows.append(
        f'| {p.path} | {p.shape} | {p.dtype} | '
        f'{"yes" if p.compressed else "no"} | {view} | {p.rank or "-"} | '
        f'{p.state_size:,} | {p.dense_state_size:,} | {p.reason} | '
        f'{p.step} | {p.step_reason} |'
    )
  ratio = total / dense_total if dense_total else 0.0
  rows.append(
      f'| total | | | | | | {total:,} | {dense_total:,} | {ratio:.2%} of '
      'dense | | |'
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
    def select(keypath: Sequence[Any], leaf: Any) -> bool:
      path = views.path_str(keypath)
      return bool(
          np.ndim(leaf) >= 2
          and (inc is None or inc.search(path) is not None)
          and (exc is None or exc.search(path) is None)
      )

    return jax.tree_util.tree_map_with_path(select, params)

  return mask_fn
