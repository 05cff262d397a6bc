"""Memory: bytes of a state, the device's peak, XLA's compiled estimate.

Three views of memory, each with its limits:

* :func:`tree_bytes`: what a pytree stores, exactly (arrays, abstract
  ``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``, an ``nnx.State``);
* :func:`device_peak_bytes`: the allocator's ``peak_bytes_in_use`` since the
  process started (None on CPU). JAX cannot reset it, so a second
  measurement in one process reports at least the first one's peak: measure
  in a fresh process (:func:`~benchmarks.toolkit.isolation.run_isolated`) for
  an exact peak;
* :func:`compiled_memory`: XLA's memory analysis of one compiled program
  (its arguments, outputs, temporaries), available before running it and on
  every backend.
"""

from __future__ import annotations

import gc
import math
from typing import Any

import jax

#: Fragments of the messages of XLA's and the allocators' out-of-memory
#: errors (:func:`is_oom`).
OOM_MESSAGES = (
    'RESOURCE_EXHAUSTED',
    'Out of memory',
    'out of memory',
    'OOM',
    'Failed to allocate',
    'failed to allocate',
    'Allocator',
    'exceeds the memory',
    'ALLOC_FAILED',
    'cudaErrorMemoryAllocation',
)

#: The fields of XLA's ``CompiledMemoryStats`` :func:`compiled_memory` keeps.
COMPILED_FIELDS = (
    'argument_size_in_bytes',
    'output_size_in_bytes',
    'alias_size_in_bytes',
    'temp_size_in_bytes',
    'generated_code_size_in_bytes',
    'peak_memory_in_bytes',
)


def _array_leaves(tree: Any) -> list[Any]:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, 'shape') and hasattr(x, 'dtype')]


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree`` (concrete or abstract).

  Leaves without a shape and dtype (Python numbers, None) count 0; a typed
  PRNG key counts the bytes of its key data.
  """
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in _array_leaves(tree))


def tree_size(tree: Any) -> int:
  """Number of elements of every array leaf of ``tree``."""
  return sum(math.prod(x.shape) for x in _array_leaves(tree))


def _device(device: Any) -> Any:
  return jax.local_devices()[0] if device is None else device


def device_memory_stats(device: Any = None) -> dict[str, int] | None:
  """The allocator's statistics of ``device`` (default: the first local one).

  Returns:
    ``memory_stats()`` as a dict (``bytes_in_use``, ``peak_bytes_in_use``,
    ``bytes_limit``, ...), or None where the backend reports none (CPU).
  """
  try:
    stats = _device(device).memory_stats()
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    return None
  return {k: int(v) for k, v in stats.items()} if stats else None


def device_peak_bytes(device: Any = None) -> int | None:
  """``peak_bytes_in_use`` of ``device`` since this process started.

  Args:
    device: a ``jax.Device``; None: the first local device.

  Returns:
    The peak in bytes, or None where the backend does not report it (CPU).
    It never resets: with several measurements in one process it is the
    largest so far.
  """
  stats = device_memory_stats(device)
  if stats is None or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use']


def peak_bytes_per_device() -> list[int] | None:
  """:func:`device_peak_bytes` of every local device, or None if unreported."""
  peaks = [device_peak_bytes(d) for d in jax.local_devices()]
  return None if any(p is None for p in peaks) else peaks


def bytes_on_device(tree: Any, device: Any) -> int:
  """Bytes of the shards of ``tree``'s arrays that live on ``device``."""
  return sum(shard.data.nbytes
             for x in jax.tree.leaves(tree)
             for shard in getattr(x, 'addressable_shards', ())
             if shard.device == device)


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled program, as a dict.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args)
      .compile()``).

  Returns:
    The fields of :data:`COMPILED_FIELDS` the backend reports, with their
    XLA names (``argument_size_in_bytes``, ``output_size_in_bytes``,
    ``alias_size_in_bytes`` (donated inputs reused as outputs),
    ``temp_size_in_bytes``, ``generated_code_size_in_bytes``,
    ``peak_memory_in_bytes``), plus ``estimated_peak_bytes``: the larger of
    ``argument + output - alias + temp`` and ``peak_memory_in_bytes`` (which
    leaves out temporaries on some backends). None if the backend has no
    analysis.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Backend-dependent.
    return None
  if stats is None:
    return None
  out = {name: int(getattr(stats, name)) for name in COMPILED_FIELDS
         if getattr(stats, name, None) is not None}
  total = (out.get('argument_size_in_bytes', 0)
           + out.get('output_size_in_bytes', 0)
           - out.get('alias_size_in_bytes', 0)
           + out.get('temp_size_in_bytes', 0))
  out['estimated_peak_bytes'] = max(total, out.get('peak_memory_in_bytes', 0))
  return out


def is_oom(error: BaseException) -> bool:
  """Whether ``error`` is an out-of-memory error of XLA or an allocator."""
  text = f'{type(error).__name__}: {error}'
  return any(fragment in text for fragment in OOM_MESSAGES)


def release_memory() -> None:
  """Drops garbage and JAX's caches of compiled programs.

  Call between two measurements in one process so that the second does not
  run next to the first one's buffers and executables.
  """
  gc.collect()
  jax.clear_caches()
  gc.collect()
