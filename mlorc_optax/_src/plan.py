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
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

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
    factor_sizes: numbers stored as factors for each compressed moment, in
      the order of ``moments`` (the compressor's factors).
    step: ``'dense'``, ``'reference'``, ``'xla'`` or ``'pallas'`` (module
      docstring).
    step_reason: why the leaf takes that step.
    placement: for a two-pass step on a mesh of several devices, the
      parameter's mesh and ``PartitionSpec`` (:class:`Placement`): the step
      runs inside ``jax.shard_map`` on each device's shard. None otherwise.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4)
    >>> plan = mlorc_optax.compression_plan(tx, {'w': jnp.zeros((64, 32))})
    >>> p = plan['w']
    >>> p.path, p.compressed, p.rank, p.reason, p.moments
    ('w', True, 4, 'default mask', ('mu', 'nu'))
    >>> p.factor_sizes, p.size  # per moment: (64 + 32) * 4 + 4 vs 64 * 32
    ((388, 388), 2048)
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  view: views.MatrixView | None
  rank: int
  reason: str
  moments: tuple[str, ...] = ()
  dense_moments: int = 0
  factor_sizes: tuple[int, ...] = ()
  step: str = 'dense'
  step_reason: str = 'not compressed'
  placement: Placement | None = None

  @property
  def compressed(self) -> bool:
    """Whether the leaf's moments are compressed (it has a ``view``)."""
    return self.view is not None

  @property
  def truncates(self) -> bool:
    """Whether its rank-``k`` factors lose part of a moment
    (``k < min(rows, cols)``). Where they do not, the RSVD is exact and the
    moment keeps its whole history: the two-pass step is not needed and the
    first moment has no complement (``MomentSpec.complement``)."""
    return self.compressed and self.rank < min(self.view.rows, self.view.cols)

  @property
  def size(self) -> int:
    """The leaf's number of entries (the numbers of a dense moment)."""
    return math.prod(self.shape)

  @property
  def factor_size(self) -> int:
    """Numbers stored as factors for all of the leaf's compressed moments."""
    return sum(self.factor_sizes)

  @property
  def state_size(self) -> int:
    """Numbers the optimizer state keeps for this leaf's moments."""
    return self.factor_size + self.dense_moments * self.size

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
    if 0 in shape:
      return dense('empty')
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
    complement_modes: tuple[str, ...] = (),
) -> str | None:
  """Why the two-pass step cannot compute these settings, or None if it can.

  Args:
    fast_fields: the moment fields the optimizer's two-pass step computes
      (``('mu', 'nu')`` for Adam, ``('mu',)`` for Lion), or None if the
      optimizer has none.
    compressed_fields: the inner state's fields that are compressed.
    compressor: the moment compressor.
    complement_modes: the ``MomentSpec.complement_mode`` of every moment
      with a complement (the two-pass step computes ``'moment'`` only).
  """
  if fast_fields is None:
    return 'no two-pass step for this optimizer'
  if not compressors.streamable(compressor):
    return (f'compressor {compressor.name!r} is not a randomized SVD without '
            'power iterations')
  if set(compressed_fields) != set(fast_fields):
    return (f'compressed moments {compressed_fields} are not '
            f'{fast_fields}: a dense moment is kept')
  other = [mode for mode in complement_modes if mode != 'moment']
  if other:
    return f'complement_mode={other[0]!r} has no two-pass step'
  return None


def sketches(compressor: compressors.MomentCompressor, p: LeafPlan) -> bool:
  """Whether the compressor's RSVD of a leaf truncates and sketches (the
  two-pass step computes only such RSVDs of :func:`compressors.streamable`
  compressors).

  An RSVD is exact where the factors do not truncate
  (:attr:`LeafPlan.truncates`) or the sketch is the identity (None: where
  ``rank + oversample >= cols`` or a compressor's ``sketch`` says so); the
  sketch's shape is found abstractly, without drawing it.
  """
  if not compressors.streamable(compressor):
    return False
  v = p.view
  width = rsvd.sketch_width(v.rows, v.cols, p.rank, compressor.oversample)
  factors = compressor.factor_type(*(
      jax.ShapeDtypeStruct(spec.shape, jnp.float32)
      for spec in compressor.specs(v.batch_shape, v.rows, v.cols, p.rank)))
  sketch = jax.eval_shape(
      lambda f, k: compressor.sketch(f, k, v.batch_shape, v.cols, width),
      factors, jax.ShapeDtypeStruct((2,), jnp.uint32))
  return p.truncates and width < v.cols and sketch is not None


@dataclasses.dataclass(frozen=True)
class Placement:
  """A parameter's place on a mesh of several devices.

  The two-pass step of a leaf with a placement runs inside ``jax.shard_map``
  over ``mesh``: each device streams its own shard of the gradient, and
  rank-sized sums are completed across the mesh axes that split the rows
  or the columns (:mod:`mlorc_optax._src.two_pass`).

  Attributes:
    mesh: the parameter's mesh, as a ``jax.sharding.AbstractMesh`` (axis
      names, sizes and types, no devices: hashable and picklable, so the plan
      stays static data of the state's tree structure).
    spec: the parameter's ``PartitionSpec``, one entry per axis.
  """

  mesh: Any
  spec: PartitionSpec

  def mesh_axes(self, axis: int) -> tuple[str, ...]:
    """The mesh axes that split the parameter's ``axis`` (major first)."""
    entry = self.spec[axis]
    if entry is None:
      return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)

  def shards(self, axis: int) -> int:
    """Into how many blocks the parameter's ``axis`` is split."""
    return math.prod(self.mesh.shape[a] for a in self.mesh_axes(axis))

  @property
  def replicated(self) -> bool:
    """Whether every device holds the whole parameter."""
    return all(self.shards(a) == 1 for a in range(len(self.spec)))

  def local_view(self, view: views.MatrixView) -> views.MatrixView:
    """The matrix view of one device's shard."""
    shape = tuple(d // self.shards(a) for a, d in enumerate(view.shape))
    return dataclasses.replace(view, shape=shape)

  def describe(self, view: views.MatrixView) -> str:
    """E.g. ``"P(None, 'data', 'model') on data=2, model=4: shards
    2x[16x16]"``, or ``'replicated on 8 devices'``."""
    if self.replicated:
      return f'replicated on {self.mesh.size} devices'
    sizes = ', '.join(f'{axis}={size}'
                      for axis, size in self.mesh.shape.items())
    return (f'{self.spec} on {sizes}: shards '
            f'{self.local_view(view).describe()}')


def _concrete_sharding(leaf: Any) -> Any:
  """A concrete array's sharding; None for a tracer or a non-array."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  return getattr(leaf, 'sharding', None)


def placement(leaf: Any) -> Placement | None:
  """The placement of a leaf on a mesh of several devices, where known.

  Known for a concrete array with a ``NamedSharding``, and for any array
  (a tracer too: a jitted ``init``) whose type carries the sharding of a
  mesh with ``Explicit`` axes. None on one device, under ``Auto`` axes
  while tracing (``jax.jit``, ``jax.eval_shape``: the sharding is not
  known there) and for other shardings.
  """
  sharding = _concrete_sharding(leaf)
  if not isinstance(sharding, NamedSharding):
    try:
      sharding = getattr(jax.typeof(leaf), 'sharding', None)
    except TypeError:
      return None
    explicit = jax.sharding.AxisType.Explicit
    if not isinstance(sharding, NamedSharding) or explicit not in tuple(
        getattr(sharding.mesh, 'axis_types', ())):
      return None
  mesh = getattr(sharding.mesh, 'abstract_mesh', sharding.mesh)
  ndim = len(np.shape(leaf))
  if mesh.size <= 1 or len(sharding.spec) > ndim:
    return None
  spec = PartitionSpec(*sharding.spec, *([None] * (ndim - len(sharding.spec))))
  return Placement(mesh, spec)


def on_one_device(leaf: Any) -> bool:
  """Whether a leaf lives on one device (its step needs no collective).

  A concrete array says so by its sharding (one device in its device set,
  e.g. ``jax.device_put(x, jax.devices()[1])`` on a machine of several
  GPUs); a tracer (a jitted ``init``) only when the process sees one device.
  """
  sharding = _concrete_sharding(leaf)
  if sharding is not None:
    return len(sharding.device_set) == 1
  return jax.device_count() == 1


def shard_blocker(plan: LeafPlan, where: Placement) -> str | None:
  """Why the two-pass step cannot run on ``where``'s shards, or None.

  A device's shard must be a block of each matrix, with the rows (columns)
  of the block those of the factor ``u`` (``v``) it holds, whose rows are
  split into contiguous blocks over the mesh axes of the parameter's row
  axes (:func:`mlorc_optax.factor_partition_specs`). That holds when the
  rows (columns) flatten at most one split axis, preceded by axes of size
  1 only; and every split axis must divide evenly.
  """
  view = plan.view
  for a, d in enumerate(view.shape):
    if d % where.shards(a):
      return (f'axis {a} ({d}) is not divisible into its {where.shards(a)} '
              'shards')
  for name, axes in (('rows', view.row_axes), ('columns', view.col_axes)):
    split = [i for i, a in enumerate(axes) if where.shards(a) > 1]
    if len(split) > 1 or (split and any(
        view.shape[a] > 1 for a in axes[:split[0]])):
      return (f'the {name} of its matrix view flatten axes {axes} sharded '
              f'as {where.spec}, so a shard is not a block of the matrix')
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
    where: Placement | None = None,
    one_device: bool = True,
) -> tuple[str, str]:
  """``(step, reason)`` for a compressed leaf.

  ``implementation=None`` (automatic) picks ``'pallas'`` on NVIDIA GPUs when
  the settings allow the two-pass step (``blocker`` is None): for a
  parameter on one GPU (``one_device``, from :func:`on_one_device`), or on
  several where its placement is known (``where``, from :func:`placement`),
  so that the step runs inside ``jax.shard_map`` on each device's shard.
  Otherwise it picks ``'reference'``: on CPUs and TPUs, and on several
  devices where the placement is unknown (``init`` traced under ``Auto``
  mesh axes), since a Pallas call has no sharding rule and under
  ``NamedSharding`` XLA would gather its operands.
  ``'pallas'`` takes a matrix (or shard) the kernels cannot tile zero-padded
  to whole tiles (:func:`~mlorc_optax._src.kernels.launch.tiled_size`; the
  reason says so), and every two-pass choice falls back to ``'reference'``
  where the RSVD is exact (``sketched`` False, :func:`sketches`: no
  truncation, or the sketch is the identity, ``rank + oversample >= cols``)
  or the shards are no blocks of the matrices (:func:`shard_blocker`). An explicit
  two-pass ``implementation`` that ``blocker`` rules out is a ``ValueError``
  (:func:`check_implementation`, which the factories also call early).
  A two-pass step chosen with ``where`` runs sharded; without it (unknown
  placement), as on one device.
  """
  check_implementation(implementation, blocker=blocker)
  if implementation is None:
    if blocker is not None:
      return 'reference', f'automatic: {blocker}'
    if not on_nvidia_gpu():
      return 'reference', 'automatic: not on an NVIDIA GPU'
    if where is not None:
      implementation, why = 'pallas', 'automatic: NVIDIA GPUs'
    elif not one_device:
      return 'reference', ('automatic: several devices, and init did not see '
                           'the parameter on a mesh')
    else:
      implementation, why = 'pallas', 'automatic: one NVIDIA GPU'
  elif implementation == 'reference':
    return 'reference', "implementation='reference'"
  else:
    why = f'implementation={implementation!r}'
  if not sketched:
    return 'reference', ('the RSVD is exact (no truncation, or the sketch '
                         'is the identity)')
  view, what = plan.view, ''
  if where is not None:
    blocked = shard_blocker(plan, where)
    if blocked is not None:
      return 'reference', f'{why}; {blocked}'
    why = f'{why}; {where.describe(view)}'
    if not where.replicated:  # the kernels tile each device's shard
      view, what = where.local_view(view), ' shards'
  if implementation == 'pallas' and not launch.supports(
      view.rows, view.cols, kernel_config):
    rows = launch.tiled_size(view.rows, kernel_config.block_rows)
    cols = launch.tiled_size(view.cols, kernel_config.block_cols)
    return implementation, (f'{why}; {view.rows}x{view.cols}{what} padded '
                            f'to {rows}x{cols} tiles')
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


def check_matches(plan: PlanNode, paths: Any, grads: Any) -> None:
  """Raises if the updates are not the leaves the state was made for."""
  if len(grads) != len(plan.leaves):
    raise ValueError(
        f'The updates have {len(grads)} leaves but the optimizer state was '
        f'made for {len(plan.leaves)}: was it initialised with a different '
        'parameter tree?')
  for path, g, p in zip(paths, grads, plan.leaves):
    if '/'.join(path) != p.path or tuple(np.shape(g)) != p.shape:
      raise ValueError(
          f'The update of {"/".join(path)!r} has shape {np.shape(g)}, but the '
          f'optimizer state was made for {p.path!r} of shape {p.shape}: was '
          'it initialised with different params?')


def check_made_by(plan: PlanNode, *, compressor: Any, rank: int,
                  compressed: set[str]) -> None:
  """Raises if the state was made by a transform with other settings."""
  held = {f.name for f in plan.fields if f.compressed}
  problems = []
  if plan.compressor != compressor:
    problems.append(f'compressor {plan.compressor!r}, not {compressor!r}')
  if held != compressed & {f.name for f in plan.fields}:
    problems.append(f'compressed moments {sorted(held)}')
  for p in plan.leaves:
    if p.compressed and p.rank != rsvd.factor_rank(
        p.view.rows, p.view.cols, rank):
      problems.append(f'rank {p.rank} for {p.path!r}, not {rank}')
      break
  if problems:
    raise ValueError(
        'The optimizer state was made by a transform with other settings ('
        + '; '.join(problems) + '): initialise it with this transform.')
