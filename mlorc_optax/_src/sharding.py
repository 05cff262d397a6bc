"""Shardings of the optimizer state that follow the parameters' shardings.

Rule (for a compressed leaf whose matrix view is ``[*batch, rows, cols]``):

* ``u`` ``[*batch, rows, k]`` is sharded like the rows: batch axes keep the
  parameter's specs, the row dimension gets the mesh axes of the parameter's
  row axes, and the rank axis ``k`` is replicated;
* ``v`` ``[*batch, cols, k]`` likewise with the column axes;
* ``s`` ``[*batch, k]`` keeps the batch specs only;
* a moment kept dense by ``compress`` is sharded like the parameter view.

Flattening several parameter axes into the rows (or columns) flattens their
mesh axes in the same major-to-minor order, which is the sharding of the
reshaped array. ``init`` applies the rule to every parameter that is a
concrete array with a ``NamedSharding``, so ``tx.init(sharded_params)``
returns a state already placed this way; the base optimizer's moments are
created like the params (``zeros_like``) and the counters and key are
replicated. Under ``jit``, pass ``jax.tree.map(lambda x: x.sharding, state)``
as the state's in/out sharding.

With this placement the reconstruction ``u diag(s) v^T`` is computed where
the parameter shard lives, and the randomized SVD only communicates
``[rows, l]`` and ``[l, cols]`` sketches, never a dense moment.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from mlorc_optax._src import plan as plan_lib


def _axes_spec(spec: PartitionSpec, axes: tuple[int, ...], ndim: int) -> Any:
  """Mesh axes of the flattened parameter ``axes`` (None if unsharded)."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  names: list[str] = []
  for a in axes:
    entry = entries[a]
    if entry is None:
      continue
    names.extend(entry if isinstance(entry, tuple) else (entry,))
  if not names:
    return None
  return names[0] if len(names) == 1 else tuple(names)


def factor_partition_specs(
    plan: plan_lib.LeafPlan, param_spec: PartitionSpec
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, PartitionSpec]:
  """PartitionSpecs ``(u, s, v, dense)`` of a compressed leaf's moments.

  The factors follow the parameter's own placement. For a leaf whose matrix
  view is ``[*batch, rows, cols]`` and factors of rank ``k``:

  * ``u`` ``[*batch, rows, k]`` is sharded like the rows: each batch axis
    keeps the parameter's spec of that axis, the row dimension gets the mesh
    axes of the parameter's row axes, and the rank axis ``k`` is replicated;
  * ``v`` ``[*batch, cols, k]`` likewise, with the column axes;
  * ``s`` ``[*batch, k]`` keeps the batch specs only;
  * a moment kept dense by ``compress``, ``[*batch, rows, cols]``, is sharded
    like the parameter's view.

  Where several parameter axes are flattened into the rows (or columns),
  their mesh axes are concatenated in the same major-to-minor order, which is
  the sharding of the reshaped array. Other compressors' factors use the
  spec of their :class:`~mlorc_optax.FactorSpec` placement: ``'rows'`` that
  of ``u``, ``'cols'`` that of ``v`` and ``'batch'`` that of ``s`` (so
  LoRA-Pre's ``b`` and ``a`` are placed like ``u`` and ``v``).

  Args:
    plan: the leaf's plan (from :func:`mlorc_optax.compression_plan`).
    param_spec: the parameter's ``PartitionSpec``.

  Returns:
    Specs for the ``u``, ``s`` and ``v`` factors and for a moment kept dense.

  Raises:
    ValueError: if the leaf is not compressed (``plan.view`` is None).

  Examples:
    Six stacked ``512 x 2048`` matrices, rows on ``'data'`` and columns on
    ``'model'`` (no devices are needed: the specs are only names):

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import mlorc_optax
    >>> leaf = jax.ShapeDtypeStruct((6, 512, 2048), jnp.float32)
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4)
    >>> plan = mlorc_optax.compression_plan(tx, {'w': leaf})['w']
    >>> u, s, v, dense = mlorc_optax.factor_partition_specs(
    ...     plan, P(None, 'data', 'model'))
    >>> u, s, v
    (P(None, 'data', None), P(None, None), P(None, 'model', None))
    >>> dense
    P(None, 'data', 'model')

    A ``DenseGeneral`` kernel ``(embed, heads, head_dim)`` whose flattened
    columns are sharded over two mesh axes:

    >>> leaf = jax.ShapeDtypeStruct((512, 8, 64), jnp.float32)
    >>> dims = mlorc_optax.MatrixDimensionNumbers((0,), (1, 2))
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4, dimension_numbers=dims)
    >>> plan = mlorc_optax.compression_plan(tx, {'q': leaf})['q']
    >>> mlorc_optax.factor_partition_specs(plan, P('data', 'model', 'seq'))[2]
    P(('model', 'seq'), None)
  """
  view = plan.view
  if view is None:
    raise ValueError(f'{plan.path!r} is not compressed; it has no factors.')
  ndim = len(plan.shape)
  batch = tuple(_axes_spec(param_spec, (a,), ndim) for a in view.batch_axes)
  rows = _axes_spec(param_spec, view.row_axes, ndim)
  cols = _axes_spec(param_spec, view.col_axes, ndim)
  return (
      PartitionSpec(*batch, rows, None),
      PartitionSpec(*batch, None),
      PartitionSpec(*batch, cols, None),
      PartitionSpec(*batch, rows, cols),
  )


def factor_shardings(
    plan: plan_lib.LeafPlan, sharding: Any
) -> tuple[Any, Any, Any, Any] | None:
  """Shardings ``(u, s, v, dense)`` for a leaf sharded by ``sharding``.

  Returns None unless ``sharding`` is a ``NamedSharding`` (other shardings,
  e.g. a single device, leave placement to JAX's defaults).
  """
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  return tuple(
      NamedSharding(mesh, spec)
      for spec in factor_partition_specs(plan, sharding.spec)
  )


def state_shardings(state: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """The ``NamedSharding`` of every array in an optimizer state.

  ``tx.init(params)`` on params sharded with ``NamedSharding`` already places
  the factors by the rule of :func:`factor_partition_specs`; counters, keys
  and other small arrays are created on the default device. This returns the
  state's shardings for ``jax.jit``'s ``in_shardings`` / ``out_shardings``:
  each array's own ``NamedSharding``, and a replicated one on the same mesh
  for the rest.

  Args:
    state: an optimizer state (arrays).
    mesh: the mesh for replicated leaves; by default the mesh of the first
      ``NamedSharding`` found in ``state``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``state``.

  Raises:
    ValueError: if ``mesh`` is None and no array of ``state`` has a
      ``NamedSharding``.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> import mlorc_optax
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ('model',))
    >>> params = jax.device_put({'w': jnp.zeros((64, 32))},
    ...                         NamedSharding(mesh, P(None, 'model')))
    >>> state = mlorc_optax.mlorc_adamw(1e-3, rank=4).init(params)
    >>> shardings = mlorc_optax.state_shardings(state)
    >>> shardings[0].inner_state.mu['w'].v.spec == P('model', None)  # columns
    True
    >>> shardings[0].inner_state.count.spec == P()  # replicated
    True
  """
  leaves, treedef = jax.tree_util.tree_flatten(state)
  if mesh is None:
    for leaf in leaves:
      if isinstance(getattr(leaf, 'sharding', None), NamedSharding):
        mesh = leaf.sharding.mesh
        break
    else:
      raise ValueError(
          'state has no array with a NamedSharding; pass mesh= explicitly.'
      )
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_unflatten(
      treedef,
      [
          leaf.sharding
          if isinstance(getattr(leaf, 'sharding', None), NamedSharding)
          else replicated
          for leaf in leaves
      ],
  )
