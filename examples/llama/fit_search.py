"""Largest LLaMA-style model whose full training step fits on the device.

For each optimizer, tries model sizes in increasing order: presets
(``--presets small 1b 3b 7b 13b``) and/or a number of layers at one preset's
width (``--layers-at 7b``: binary search on ``n_layers``). Every attempt is
``measure.run`` in its own process (an out-of-memory error or a crash cannot
poison the search), on synthetic tokens: it compiles the full step from
abstract shapes, records XLA's memory estimate, allocates the model and
optimizer and runs ``--steps`` steps, recording the device's peak (or the
error of what did not fit). ``--steps 0`` compiles only (any backend, e.g.
CPU) and judges by XLA's estimate against the allocator's limit.

Usage (GPU)::

  python -m examples.llama.fit_search h100 --presets 3b 7b 13b \\
      --result-json /tmp/llama_fit.json
  python -m examples.llama.fit_search h100 --presets --layers-at 7b \\
      --min-layers 24 --max-layers 80
  python -m examples.llama.fit_search cpu     # compile-only, seconds
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import tyro

from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import measure
from examples.llama import report


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """What to try, and the settings of every attempt.

  Attributes:
    run: settings of each attempt (its model and n_layers are set by
      the search; optimizers are searched one after the other).
    presets: model presets to try, smallest first (none: skip).
    layers_at: also binary-search n_layers at this preset's width.
    min_layers: lower end of the layer search.
    max_layers: upper end of the layer search.
    keep_going: try larger presets after one that does not fit.
    timeout: seconds per attempt.
    mem_fraction: XLA_PYTHON_CLIENT_MEM_FRACTION of the attempts (None:
      inherited, else 0.95).
  """

  run: tyro.conf.OmitArgPrefixes[config_lib.Config] = config_lib.Config()
  presets: tuple[config_lib.ModelName, ...] = ('small', '1b', '3b', '7b',
                                               '13b')
  layers_at: config_lib.ModelName | None = None
  min_layers: int = 1
  max_layers: int = 64
  keep_going: bool = False
  timeout: float = 1800.0
  mem_fraction: float | None = None


#: Named settings: the first word on the command line.
PRESETS: dict[str, tuple[str, SearchConfig]] = {
    'h100': (
        'bfloat16, remat, batch 1 x 512, float32 moments, 98% of the GPU.',
        SearchConfig(
            run=config_lib.Config(
                optimizers=('adamw', 'mlorc_adamw'), param_dtype='bfloat16',
                remat=True, lr=3e-4, batch=1, seq_len=512, steps=2, warmup=1,
                log_every=0),
            timeout=160.0, mem_fraction=0.98)),
    'cpu': (
        'Compile-only estimates of small depths (any backend, seconds).',
        SearchConfig(
            run=config_lib.Config(optimizers=('adamw', 'mlorc_adamw'),
                                  batch=1, seq_len=64, steps=0),
            presets=('tiny',), timeout=300.0)),
}


def fits(result: dict[str, Any]) -> bool:
  """Ran, or (compile-only) XLA's estimate is within the allocator's limit."""
  if result['status'] == 'ok':
    return True
  limit = result.get('bytes_limit')
  estimate = (result.get('compiled_memory') or {}).get('estimated_peak_bytes')
  return result['status'] == 'estimated' and (
      limit is None or estimate is None or estimate <= limit)


def attempt(config: SearchConfig, run: config_lib.Config, optimizer: str
            ) -> dict[str, Any]:
  """One attempt in a fresh process; prints a line when it ends."""
  env = ({'XLA_PYTHON_CLIENT_MEM_FRACTION': str(config.mem_fraction)}
         if config.mem_fraction is not None else None)
  r = measure.run_isolated(run, optimizer, timeout=config.timeout, env=env)
  estimate = (r.get('compiled_memory') or {}).get('estimated_peak_bytes')
  print(f'  {optimizer:12s} {run.model:5s} {r["config"]["n_layers"]:3d} '
        f'layers: {r["status"]:9s} peak '
        f'{toolkit.results.fmt_bytes(r.get("peak_bytes"))}, XLA estimate '
        f'{toolkit.results.fmt_bytes(estimate)}', flush=True)
  return r


def search_layers(try_layers: Callable[[int], dict[str, Any]], lo: int,
                  hi: int) -> list[dict[str, Any]]:
  """Binary search for the most layers in ``[lo, hi]`` that fit.

  ``lo`` is tried first (if it does not fit the search stops), then ``hi``,
  then bisection.

  Args:
    try_layers: runs one attempt at that many layers.
    lo: fewest layers.
    hi: most layers.

  Returns:
    Every attempt's record, in the order made.
  """
  results = [try_layers(lo)]
  if not fits(results[-1]):
    return results
  results.append(try_layers(hi))
  if fits(results[-1]):
    return results
  good, bad = lo, hi
  while bad - good > 1:
    mid = (good + bad) // 2
    results.append(try_layers(mid))
    good, bad = (mid, bad) if fits(results[-1]) else (good, mid)
  return results


def largest_fitting(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """``{optimizer: the record with the most parameters that fit}``."""
  best: dict[str, Any] = {}
  for r in results:
    name = r['optimizer']
    if fits(r) and (name not in best
                    or r['param_count'] > best[name]['param_count']):
      best[name] = r
  return best


def search(config: SearchConfig) -> list[dict[str, Any]]:
  """Every attempt of the search, optimizer by optimizer."""
  results = []
  for optimizer in config.run.optimizers:
    for preset in config.presets:
      run = config.run.replace(model=preset, n_layers=None)
      results.append(attempt(config, run, optimizer))
      if not (fits(results[-1]) or config.keep_going):
        break
    if config.layers_at:
      run = config.run.replace(model=config.layers_at)
      results += search_layers(
          lambda n: attempt(config, run.replace(n_layers=n), optimizer),
          config.min_layers, config.max_layers)
  return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns every attempt's record."""
  config = tyro.extras.overridable_config_cli(
      PRESETS, args=argv, prog='python -m examples.llama.fit_search',
      description=__doc__.splitlines()[0])
  toolkit.environment.configure_xla()  # inherited by the attempts
  run = config.run
  print(f'batch {run.batch} x seq {run.seq_len}; params {run.param_dtype}, '
        f'remat {run.remat}, scan {run.scan}, moments {run.moment_dtype}, '
        f'rank {run.rank}' + ('; compile-only' if not run.steps else ''))
  results = search(config)
  print(report.fit_table(results))
  for name, r in largest_fitting(results).items():
    print(f'largest that fits with {name}: {r["settings"]["model"]} at '
          f'{r["config"]["n_layers"]} layers '
          f'({toolkit.results.fmt_count(r["param_count"])} parameters)')
  if run.result_json:
    toolkit.results.write_json(results, run.result_json)
  return results


if __name__ == '__main__':
  main()
