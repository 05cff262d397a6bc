"""Flax Linen support: logical axis names and boxed parameters.

Not imported by ``import mlorc_optax`` (Flax is optional)::

  import mlorc_optax.flax

* :func:`logical_dimension_numbers`: the matrix view of each leaf from its
  logical axis names (``DenseGeneral`` kernels, ``nn.scan``-stacked layers),
  for the ``dimension_numbers`` argument of the MLorc transforms;
* :func:`boxed`: runs a transform on parameters kept in
  ``nn.LogicallyPartitioned`` / ``nn.Partitioned`` boxes, with each factor of
  its state boxed by the names of the axes it spans
  (:func:`factor_logical_axes`), so ``nn.get_partition_spec`` and
  ``nn.logical_to_mesh_sharding`` place the state like the parameters;
* :func:`format_logical_plan`: the plan of a transform as a table in logical
  names, with state bytes.

See ``docs/linen.md``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mlorc_optax
  >>> import mlorc_optax.flax
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     init = nn.initializers.lecun_normal()
  ...     x = nn.Dense(64, kernel_init=nn.with_logical_partitioning(
  ...         init, ('embed', 'mlp')))(x)
  ...     return nn.Dense(16, kernel_init=nn.with_logical_partitioning(
  ...         init, ('mlp', 'embed')))(nn.relu(x))
  >>> params = MLP().init(jax.random.key(0), jnp.ones((1, 16)))['params']
  >>> tx = mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
  ...     1e-3, rank=4,
  ...     dimension_numbers=mlorc_optax.flax.logical_dimension_numbers()))
  >>> state = tx.init(params)
  >>> specs = nn.get_partition_spec(state)[0].inner_state.mu['Dense_0']
  >>> specs['kernel'].u, specs['kernel'].v, specs['bias']
  (P('embed', 'mlorc_rank'), P('mlp', 'mlorc_rank'), P())
"""

from mlorc_optax.flax._boxes import boxed
from mlorc_optax.flax._logical import DENSE_GENERAL_JOINED_NAMES
from mlorc_optax.flax._logical import RANK_AXIS_NAME
from mlorc_optax.flax._logical import factor_logical_axes
from mlorc_optax.flax._logical import format_logical_plan
from mlorc_optax.flax._logical import logical_dimension_numbers

__all__ = (
    'DENSE_GENERAL_JOINED_NAMES',
    'RANK_AXIS_NAME',
    'boxed',
    'factor_logical_axes',
    'format_logical_plan',
    'logical_dimension_numbers',
)
