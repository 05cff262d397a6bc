"""The plan shown to the user: :func:`compression_plan` and :func:`format_plan`.

The plan of :func:`mlorc_optax.low_rank_moments` lives in its state
(:mod:`mlorc_optax._src.plan`); these functions read it back from a
transform (abstractly, with ``jax.eval_shape``) or a state, and print it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from mlorc_optax._src import plan as plan_lib
from mlorc_optax._src.plan import LeafPlan


def _is_plan(x: Any) -> bool:
  return isinstance(x, plan_lib.PlanNode)


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
  rows, total, dense_total = [], 0, 0
  for p in leaf_plans(plan):
    total += p.state_size
    dense_total += p.dense_state_size
    view = p.view.describe() if p.view is not None else '-'
    rows.append([
        p.path, str(p.shape), p.dtype, 'yes' if p.compressed else 'no', view,
        str(p.rank or '-'), f'{p.state_size:,}', f'{p.dense_state_size:,}',
        p.reason, p.step, p.step_reason])
  ratio = total / dense_total if dense_total else 0.0
  rows.append(['total', '', '', '', '', '', f'{total:,}', f'{dense_total:,}',
               f'{ratio:.2%} of dense', '', ''])
  return markdown_table(
      ['path', 'shape', 'dtype', 'compressed', 'matrix view', 'rank',
       'state (numbers)', 'dense state', 'reason', 'step', 'why'], rows)


def leaf_plans(plan: Any) -> list[LeafPlan]:
  """The :class:`LeafPlan`\\s of a :func:`compression_plan`, in order."""
  return [p for p in jax.tree_util.tree_leaves(
      plan, is_leaf=lambda x: isinstance(x, LeafPlan))
          if isinstance(p, LeafPlan)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table: ``| a | b |`` lines (empty cells as ``| |``)."""
  line = lambda cells: '|' + '|'.join(f' {c} ' if c else ' '
                                      for c in cells) + '|'
  return '\n'.join([line(header), '|' + '---|' * len(header)]
                   + [line(r) for r in rows])
