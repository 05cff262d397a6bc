"""Moment fields inside a (possibly nested) optax state.

An optax state is a ``NamedTuple`` (``ScaleByAdamState(count, mu, nu)``), or
tuples of them (``optax.chain``), or ``NamedTuple``\\s wrapping others
(``optax.masked``, ``optax.inject_hyperparams``). A *moment field* is a field
of such a ``NamedTuple`` whose value is a tree with the structure and leaf
shapes of the params (``optax.MaskedNode()`` standing for the leaves an inner
``optax.masked`` leaves out). :func:`find` locates them by name;
:func:`get` / :func:`replace` read and rebuild one, given its location (the
indices through nested tuples to its ``NamedTuple``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from mlorc_optax._src import plan as plan_lib


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, '_fields')


def _params_shaped(value: Any, treedef: Any, shapes: list[tuple]) -> bool:
  try:
    leaves = treedef.flatten_up_to(value)
  except (ValueError, TypeError):
    return False
  # optax.masked keeps MaskedNode() for the leaves it leaves out.
  return all(
      isinstance(x, optax.MaskedNode)
      or (hasattr(x, 'shape') and tuple(x.shape) == s)
      for x, s in zip(leaves, shapes)
  ) and not (leaves and all(isinstance(x, optax.MaskedNode) for x in leaves))


def find(state: Any, names: Any, treedef: Any,
         shapes: list[tuple]) -> list[tuple[tuple[int, ...], str]]:
  """``(location, name)`` of every params-shaped field named in ``names``.

  Depth first, in field order; a params-shaped field is not searched inside.

  Args:
    state: an optimizer state.
    names: the field names to look for.
    treedef: the params' treedef.
    shapes: the shapes of the params' leaves, in flatten order.
  """
  found = []

  def visit(x, location):
    if _is_namedtuple(x):
      for k, (name, value) in enumerate(zip(x._fields, x)):
        if name in names and _params_shaped(value, treedef, shapes):
          found.append((location, name))
        else:
          visit(value, location + (k,))
    elif isinstance(x, (tuple, list)):
      for k, value in enumerate(x):
        visit(value, location + (k,))

  visit(state, ())
  return found


def _holder(state: Any, location: tuple[int, ...]) -> Any:
  for k in location:
    state = state[k]
  return state


def get(state: Any, field: plan_lib.MomentField) -> Any:
  """The value of ``field`` in ``state``."""
  return getattr(_holder(state, field.location), field.name)


def replace(state: Any, field: plan_lib.MomentField, value: Any) -> Any:
  """``state`` with ``field`` set to ``value`` (rebuilt along its location)."""
  def rebuild(x, location):
    if not location:
      return x._replace(**{field.name: value})
    k, rest = location[0], location[1:]
    items = list(x)
    items[k] = rebuild(items[k], rest)
    return x._replace(**dict(zip(x._fields, items))) if _is_namedtuple(
        x) else type(x)(items)

  return rebuild(state, field.location)


def is_wrapped_leaf(x: Any) -> bool:
  """Whether ``x`` is a node around exactly one leaf (not a container).

  Such nodes (``nnx.Variable``, Flax Linen boxes) carry metadata of the one
  array inside; a moment keeps them around each of its factor arrays, so
  that a state made from ``Variable``-wrapped params has the layout of the
  states ``update`` returns once ``nnx.Optimizer`` has wrapped them.
  """
  if x is None or isinstance(x, (dict, list, tuple)):
    return False
  treedef = jax.tree_util.tree_structure(x)
  return treedef.num_leaves == 1 and not jax.tree_util.treedef_is_leaf(
      treedef)


def wrapped_like(unit: Any, factors: Any) -> Any:
  """``factors`` with each array in the single-child nodes of ``unit``."""
  return type(factors)(*(
      jax.tree_util.tree_map(lambda _, a=a: a, unit) for a in factors))
