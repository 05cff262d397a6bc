"""Data-parallel and FSDP placement of the LLaMA example on a device mesh.

Both modes use one mesh axis, ``'data'``, over ``n`` devices, ``jax.jit``
with ``NamedSharding`` (no ``pmap``, no ``shard_map``), and split the global
batch along it:

* ``'dp'`` (data parallel): every parameter and every optimizer-state array
  is replicated; XLA all-reduces the gradients and each device runs the
  same optimizer update.
* ``'fsdp'`` (fully sharded): every parameter with an axis divisible by
  ``n`` is sharded along its largest such axis (never the stacked layer
  axis, which ``nnx.scan`` slices; 1-D norm scales stay replicated). XLA
  gathers the weights where the forward and backward passes need them and
  reduce-scatters the gradients. ``tx.init`` on the sharded parameters
  places MLorc's factors by :func:`mlorc_optax.factor_partition_specs` (the
  row factor ``u`` like the parameter's rows, ``v`` like its columns, the
  rank axis replicated) and optax's dense moments like the parameters.

:func:`update_collectives` reads the compiled optimizer update and lists
every cross-device transfer in it, which is how the run shows that MLorc
never gathers a dense moment: only the ``[rows, l]`` / ``[l, cols]``
sketches of the randomized SVD cross devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlorc_optax

#: Placement modes (``'none'``: one device, no mesh).
MODES: tuple[str, ...] = ('none', 'dp', 'fsdp')

#: Name of the mesh axis that splits the batch (and, for FSDP, the params).
AXIS = 'data'


def make_mesh(devices: int) -> Mesh:
  """A 1-D mesh named :data:`AXIS` over the first ``devices`` devices."""
  available = jax.devices()
  if not 1 <= devices <= len(available):
    raise ValueError(
        f'devices must be in [1, {len(available)}] (the devices JAX sees), '
        f'got {devices}.'
    )
  return Mesh(np.array(available[:devices]), (AXIS,))


def param_spec(path: Sequence[str], shape: Sequence[int], mode: str, n: int):
  """The ``PartitionSpec`` of one parameter under ``mode`` on ``n`` devices.

  Args:
    path: the parameter's path names (``('layers', 'attn', 'q_proj',
      'kernel')``); a leaf under ``layers`` of a scanned model has a leading
      layer axis.
    shape: its shape.
    mode: ``'dp'`` or ``'fsdp'``.
    n: devices on the mesh axis.

  Returns:
    ``P()`` (replicated) for ``'dp'``, 1-D leaves and leaves with no axis
    divisible by ``n``; else the largest divisible axis (the first of equal
    ones) sharded over :data:`AXIS`.
  """
  if mode not in ('dp', 'fsdp'):
    raise ValueError(f"mode must be 'dp' or 'fsdp', got {mode!r}.")
  if mode == 'dp' or len(shape) < 2:
    return P()
  first = 1 if (path and path[0] == 'layers' and len(shape) >= 3) else 0
  candidates = [a for a in range(first, len(shape)) if shape[a] % n == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: (shape[a], -a))
  spec = [None] * len(shape)
  spec[axis] = AXIS
  return P(*spec)


def _names(keypath: Sequence[Any]) -> tuple[str, ...]:
  names = []
  for entry in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return tuple(n for n in names if n != 'value')


def param_shardings(abstract_params: Any, mesh: Mesh, mode: str) -> Any:
  """``NamedSharding`` of every leaf of a parameter tree (``param_spec``)."""
  n = mesh.shape[AXIS]
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(
          mesh, param_spec(_names(kp), x.shape, mode, n)
      ),
      abstract_params,
  )


def build_sharded(
    create_model: Any,
    tx: Any,
    mesh: Mesh,
    mode: str,
) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """The model and its ``nnx.Optimizer`` placed on ``mesh`` under ``mode``.

  The parameters are created by one jitted program whose outputs are
  already sharded; ``nnx.Optimizer`` then initialises ``tx`` on them, so
  MLorc's factors (and optax's moments) follow the parameters' shardings
  (:func:`mlorc_optax.state_shardings`); counters and keys are replicated.

  Args:
    create_model: ``() -> nnx.Module``.
    tx: the optimizer.
    mesh: from :func:`make_mesh`.
    mode: ``'dp'`` or ``'fsdp'``.

  Returns:
    ``(graphdef, state, shardings)`` of ``nnx.split((model, optimizer))``,
    with ``shardings`` the ``NamedSharding`` tree of ``state``.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(create_model))
  shardings = param_shardings(abstract, mesh, mode)
  params = jax.jit(
      lambda: nnx.split(create_model())[1], out_shardings=shardings
  )()
  model = nnx.merge(graphdef, params)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  state_shardings = mlorc_optax.state_shardings(state, mesh)
  return graphdef, jax.device_put(state, state_shardings), state_shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Tokens ``[batch, seq]`` split along the batch over :data:`AXIS`."""
  return NamedSharding(mesh, P(AXIS, None))


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(kind, shape)`` of every collective's result in compiled HLO text.

  Kinds: all-gather, all-reduce, reduce-scatter, all-to-all and
  collective-permute (asynchronous ``-start`` forms included); a tuple
  result (XLA combines small collectives) lists each element.
  """
  found = []
  pattern = re.compile(
      r'= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|'
      r'collective-permute)(?:-start)?\('
  )
  for line in hlo.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    for shape in re.findall(r'[a-z0-9]+\[([0-9,]*)\]', m.group(1)):
      found.append((m.group(2), tuple(int(d) for d in shape.split(',') if d)))
  return found


def compressed_views(params: Any, rank: int) -> list[tuple[int, int, int]]:
  """``(slices, rows, cols)`` of each matrix view ``mlorc_adamw`` compresses."""
  plan = mlorc_optax.compression_plan(
      mlorc_optax.mlorc_adamw(1.0, rank=rank), params)
  return [
      (
          math.prod(p.shape) // (p.view.rows * p.view.cols),
          p.view.rows,
          p.view.cols,
      )
      for p in jax.tree.leaves(
          plan, is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan)
      )
      if p.view is not None
  ]


def moves_dense_moment(
    shape: Sequence[int], views: Sequence[tuple[int, int, int]]
) -> bool:
  """Whether a transfer of ``shape`` can hold a dense moment of a view.

  True if two of its dimensions are a compressed matrix's ``(rows, cols)``
  in either order (a slice of a dense moment), or if it has at least as
  many elements as the smallest whole compressed leaf. The sketches of the
  randomized SVD (``[..., rows, l]`` and ``[..., l, cols]``, ``l`` the small
  sketch width) are neither.
  """
  dims = list(shape)
  for _, rows, cols in views:
    for i, a in enumerate(dims):
      for b in dims[i + 1 :]:
        if (a, b) in ((rows, cols), (cols, rows)):
          return True
  smallest_leaf = min((n * r * c for n, r, c in views), default=None)
  return smallest_leaf is not None and math.prod(dims) >= smallest_leaf


def update_collectives(
    update_fn: Any, state: nnx.State, grads: Any, views: Sequence[Any] = ()
) -> dict[str, Any]:
  """Cross-device transfers in the compiled optimizer update.

  Args:
    update_fn: a jitted ``(state, grads) -> state`` with shardings.
    state: its state argument (arrays or ``ShapeDtypeStruct``).
    grads: its gradient argument.
    views: :func:`compressed_views` of the parameters, for
      :func:`moves_dense_moment`.

  Returns:
    ``count``, ``by_kind`` (kind -> number), ``max_elements`` (largest
    transfer), ``largest`` (the 5 largest as ``[kind, shape]``) and
    ``dense_moment_transfers`` (how many :func:`moves_dense_moment` flags).
  """
  hlo = update_fn.lower(state, grads).compile().as_text()
  found = collectives(hlo)
  by_kind: dict[str, int] = {}
  for kind, _ in found:
    by_kind[kind] = by_kind.get(kind, 0) + 1
  ranked = sorted(found, key=lambda x: -math.prod(x[1]))
  return {
      'count': len(found),
      'by_kind': by_kind,
      'max_elements': math.prod(ranked[0][1]) if ranked else 0,
      'largest': [[kind, list(shape)] for kind, shape in ranked[:5]],
      'dense_moment_transfers': sum(
          moves_dense_moment(shape, views) for _, shape in found
      ),
  }


def random_grads_like(params: Any, seed: int = 0) -> Any:
  """Standard-normal (x 1e-3) arrays shaped, typed, placed like ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  shapes = [(x.shape, x.dtype) for x in leaves]

  def draw():
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [
        1e-3 * jax.random.normal(k, shape, dtype)
        for k, (shape, dtype) in zip(keys, shapes)
    ]

  shardings = [getattr(x, 'sharding', None) for x in leaves]
  if all(isinstance(s, NamedSharding) for s in shardings):
    out = jax.jit(draw, out_shardings=shardings)()
  else:
    out = jax.jit(draw)()
  return jax.tree.unflatten(treedef, out)


__all__ = [
    'AXIS',
    'MODES',
    'batch_sharding',
    'build_sharded',
    'collectives',
    'make_mesh',
    'param_shardings',
    'param_spec',
    'random_grads_like',
    'compressed_views',
    'moves_dense_moment',
    'update_collectives',
]
