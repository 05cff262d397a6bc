"""The measurement toolkit shared by the examples and the benchmarks.

One tested copy of what every measuring program needs: a description of the
machine and the library versions (:mod:`~benchmarks.toolkit.environment`),
state bytes, device peaks and XLA's memory analysis
(:mod:`~benchmarks.toolkit.memory`), warm-call timing
(:mod:`~benchmarks.toolkit.timing`), one configuration in a fresh process
(:mod:`~benchmarks.toolkit.isolation`), method specs' keyword options
(:mod:`~benchmarks.toolkit.method_options`), result JSON and markdown tables
(:mod:`~benchmarks.toolkit.results`, over ``tabulate``), figures
(:mod:`~benchmarks.toolkit.figures`, over matplotlib) and data fetched from
the package registry into a cache (:mod:`~benchmarks.toolkit.assets`).

Usage::

  from benchmarks import toolkit

  t = toolkit.timing.time_calls(jax.jit(f), x, calls=10, warmup=2)
  row = dict(step_s=t.median_s,
             state_bytes=toolkit.memory.tree_bytes(opt_state))
  print(toolkit.results.markdown_table([row], [
      toolkit.results.Column('step_s', 'step ms', lambda s: f'{1e3 * s:.2f}'),
      toolkit.results.Column('state_bytes', 'state',
                             toolkit.results.fmt_bytes)]))

The modules load on first use (``memory`` and ``timing`` import JAX,
``figures`` draws with matplotlib), so a program that only writes results, such
as a child of :func:`~benchmarks.toolkit.isolation.run_isolated`, starts
fast.
"""

import importlib
from typing import Any

__all__ = [
    'assets',
    'environment',
    'figures',
    'isolation',
    'memory',
    'method_options',
    'results',
    'timing',
]


def __getattr__(name: str) -> Any:
  if name in __all__:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(__all__)
