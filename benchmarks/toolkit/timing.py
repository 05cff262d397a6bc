"""Wall-clock time of warm calls, waiting for the device after each.

JAX dispatches asynchronously: a call returns before the device finishes.
Every timed call here ends with ``jax.block_until_ready`` on its outputs, so
a time is the call's whole latency. Compile first (``jax.jit(f).lower(*args)
.compile()``, or one warm-up call) so that no time includes tracing and
compiling, and compare programs by their medians measured in the same
process, next to a baseline: a shared or throttled machine shifts every
time, not the ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax


class Timing(NamedTuple):
  """Seconds of the timed calls.

  Attributes:
    median_s: the median (what results report).
    min_s: the fastest call (the least disturbed by other work).
    times_s: every timed call, in order.
  """

  median_s: float
  min_s: float
  times_s: tuple[float, ...]

  @classmethod
  def of(cls, times_s: Sequence[float]) -> 'Timing':
    """The timing of the given call times (at least one)."""
    if not times_s:
      raise ValueError('Timing.of needs at least one time.')
    return cls(statistics.median(times_s), min(times_s), tuple(times_s))


def _check(calls: int, warmup: int) -> None:
  if calls < 1 or warmup < 0:
    raise ValueError(
        f'calls must be >= 1 and warmup >= 0, got calls={calls}, '
        f'warmup={warmup}.')


def time_calls(fn: Callable[..., Any], *args: Any, calls: int,
               warmup: int = 1) -> Timing:
  """Times ``fn(*args)``: ``warmup`` untimed calls, then ``calls`` timed ones.

  ``warmup + calls`` calls in all, one after the other, each followed by
  ``jax.block_until_ready`` on its output (inside the timed span).

  Args:
    fn: the function, usually jitted or compiled; it must not donate
      ``args`` (use :func:`time_steps` to thread donated state).
    *args: its arguments, the same for every call.
    calls: timed calls (at least 1).
    warmup: untimed calls first (the first call of a jitted function
      compiles it).

  Returns:
    The :class:`Timing` of the timed calls.
  """
  _check(calls, warmup)
  times = []
  for i in range(warmup + calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return Timing.of(times)


def time_steps(step: Callable[[Any], Any], carry: Any, *, calls: int,
               warmup: int = 1) -> tuple[Timing, Any]:
  """Times ``carry = step(carry)``, each call fed the previous one's output.

  For steps that donate their input (parameters and optimizer state): the
  input of a call is the output of the last one, never a donated buffer.
  ``warmup + calls`` calls in all, in order (so a ``step`` that records
  something, e.g. its loss, sees every call, the warm-up ones first), each
  followed by ``jax.block_until_ready`` on the new carry (inside the timed
  span).

  Args:
    step: ``carry -> carry``; close over the inputs that do not change
      (gradients, a batch).
    carry: the first input.
    calls: timed calls (at least 1).
    warmup: untimed calls first.

  Returns:
    ``(timing, carry)``: the :class:`Timing` of the timed calls and the last
    output.
  """
  _check(calls, warmup)
  times = []
  for i in range(warmup + calls):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return Timing.of(times), carry


def time_steps_interleaved(
    steps: Mapping[str, tuple[Callable[[Any], Any], Any]], *, calls: int,
    warmup: int = 1) -> dict[str, Timing]:
  """:func:`time_steps` of several steps, one call of each per round.

  A machine shared with other work then slows every configuration alike,
  rather than whichever ran during a busy spell.

  Args:
    steps: ``{name: (step, carry)}`` as for :func:`time_steps`.
    calls: timed rounds (at least 1).
    warmup: untimed rounds first.

  Returns:
    ``{name: Timing}`` in the order of ``steps``.
  """
  _check(calls, warmup)
  carries = {name: carry for name, (_, carry) in steps.items()}
  times: dict[str, list[float]] = {name: [] for name in steps}
  for i in range(warmup + calls):
    for name, (step, _) in steps.items():
      start = time.perf_counter()
      carries[name] = jax.block_until_ready(step(carries[name]))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: Timing.of(t) for name, t in times.items()}
