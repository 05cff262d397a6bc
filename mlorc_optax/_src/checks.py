"""Argument validation shared by the factories.

Every check names the argument it rejects. Values that are tracers (for example
hyperparameters injected by ``optax.inject_hyperparams`` inside ``jit``) cannot
be inspected and are accepted as they are; they were checked when concrete.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_nonzero_weight(weight: Any) -> bool:
  """Whether an optional weight (0 turns its option off) is in use.

  Anything but a concrete zero: a traced weight (``optax.inject_hyperparams``
  without ``mlorc_optax.STATIC_ARGS``) is in use, even if 0.
  """
  if isinstance(weight, jax.core.Tracer):
    return True
  return not (np.ndim(weight) == 0 and float(weight) == 0)


def check_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as an int ``>= minimum``; raises naming ``name``."""
  if isinstance(value, bool):
    raise TypeError(f'{name} must be a Python int, got the bool {value!r}.')
  try:
    if isinstance(value, jax.Array):  # traced, or would be under jit
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise TypeError(
        f'{name} must be a Python int, got {value!r} of type '
        f'{type(value).__name__}. It sets array shapes, so it must be static: '
        f'under optax.inject_hyperparams, pass '
        f'static_args=mlorc_optax.STATIC_ARGS (it lists {name!r}).'
    ) from None
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')
  return value


def _concrete_float(value: Any) -> float | None:
  if isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value)
  if array.shape != ():
    raise ValueError(f'expected a scalar, got shape {array.shape}')
  return float(array)


def check_beta(name: str, value: Any) -> None:
  """Raises unless ``0 <= value < 1`` (tracers pass unchecked)."""
  try:
    x = _concrete_float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a scalar in [0, 1), got {value!r}.') from e
  if x is not None and not 0.0 <= x < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {x}.')


def check_nonnegative(name: str, value: Any) -> None:
  """Raises unless ``value >= 0`` (tracers pass unchecked)."""
  try:
    x = _concrete_float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a scalar >= 0, got {value!r}.') from e
  if x is not None and not x >= 0.0:  # also rejects NaN
    raise ValueError(f'{name} must be >= 0, got {x}.')


def check_positive(name: str, value: Any) -> None:
  """Raises unless ``value > 0`` (tracers pass unchecked)."""
  try:
    x = _concrete_float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a scalar > 0, got {value!r}.') from e
  if x is not None and not x > 0.0:  # also rejects NaN
    raise ValueError(f'{name} must be > 0, got {x}.')


def check_float_dtype(name: str, value: Any) -> np.dtype:
  """Returns ``value`` as a floating numpy dtype or raises naming ``name``."""
  if isinstance(value, jax.Array):
    raise TypeError(
        f'{name} must be a dtype, got an array. Under '
        f'optax.inject_hyperparams, pass static_args=mlorc_optax.STATIC_ARGS '
        f'(it lists {name!r}).'
    )
  try:
    dtype = np.dtype(value)
  except TypeError as e:
    raise TypeError(f'{name} must be a floating dtype, got {value!r}.') from e
  if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
    raise TypeError(f'{name} must be a floating dtype, got {dtype}.')
  return dtype


def check_bool(name: str, value: Any) -> bool:
  """Returns ``value`` as a Python bool or raises naming ``name``."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
        f'{name} must be a Python bool, got {value!r} of type '
        f'{type(value).__name__}. It selects the computation, so it must be '
        f'static: under optax.inject_hyperparams, list {name!r} in '
        'static_args.'
    )
  return bool(value)


def key_data(seed: Any) -> jax.Array:
  """A raw ``uint32[2]`` key from an int seed, a typed key or raw key data."""
  if isinstance(seed, (jax.Array, np.ndarray)) and jnp.issubdtype(
      seed.dtype, jax.dtypes.prng_key
  ):
    return jax.random.key_data(seed)
  if isinstance(seed, jax.Array) and seed.shape == () and jnp.issubdtype(
      seed.dtype, jnp.integer
  ):  # possibly traced, e.g. a seed injected by optax.inject_hyperparams
    return jax.random.PRNGKey(seed)
  array = np.asarray(seed)
  if array.dtype == np.uint32 and array.shape == (2,):
    return jnp.asarray(array)
  if array.shape == () and np.issubdtype(array.dtype, np.integer):
    return jax.random.PRNGKey(seed)
  raise TypeError(
      f'seed must be an int, a jax.random key or raw uint32[2] key data, got '
      f'{seed!r}.'
  )
