"""Where one optimizer step spends its device time, op by op.

:mod:`benchmarks.step_time` says how long a step takes; this says where the
time goes. For one configuration of the same cases and optimizers (the same
jitted ``tx.update`` + ``optax.apply_updates``, parameters and state
donated) it records ``--steps`` warm steps with :func:`jax.profiler.trace`,
reads the trace that the profiler writes (Chrome trace JSON,
``*.trace.json.gz``) and sums the device events per name:

* ``ops``: XLA's operations (the profiler's "XLA Ops" line of the device:
  fusions, custom calls such as the Pallas passes ``mlorc_adam_sketch`` /
  ``mlorc_adam_project`` and the solver's ``eigh``, copies), and
* ``kernels``: the kernels on the device's streams,

each as milliseconds per step and share of the step, largest first, plus
``categories``: the ops (or, where the trace has no op line, the kernels)
grouped by what they are (:data:`CATEGORIES`). The step's device time is
the sum of its "XLA Modules" events, or, where the trace has none (jax
0.11.2 on an H200 recorded only the stream's kernels), of its kernels:
the time the device was busy, which launch gaps leave below the step's wall
time.

On a CPU the trace has no device lines; the command still runs (CI checks
that it does) and reports the host's events instead.

Usage (GPU)::

  python -m benchmarks.step_profile --case llama7b_L8 --dtype float32 \\
      --optimizer mlorc_adamw --rank 4 --json PROFILE.json
  python -m benchmarks.step_profile --case tiny  # CPU, CI
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import tyro

from benchmarks import step_time
from benchmarks.toolkit import environment
from benchmarks.toolkit import results as results_lib

#: Op-name patterns and the category they count towards, first match wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ('pass 1 (sketch)', r'sketch'),
    ('pass 2 (project)', r'project'),
    ('eigh', r'eigh|syevd|syevj|cusolver|solver'),
    ('matmul', r'gemm|dot|cublas|matmul|triton_gemm|cutlass'),
    ('copy / transpose', r'copy|transpose|concatenate|slice|pad|bitcast'),
    ('reduce', r'reduce'),
    ('fusion', r'fusion|loop_|input_'),
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Where one optimizer step spends its device time, op by op."""

  case: step_time.Case = 'tiny'
  """The tree of matrices (benchmarks/step_time.py)."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Parameter and gradient dtype."""
  optimizer: str = 'mlorc_adamw'
  """The optimizer, with options as NAME:KEY=VALUE,...
  (benchmarks/step_time.py)."""
  rank: int = 4
  """Rank of the low-rank optimizers."""
  steps: int = 5
  """Warm steps recorded in the trace (the report is per step)."""
  top: int = 25
  """Rows of each table printed."""
  json: str | None = None
  """Write the report here."""
  trace_dir: str | None = None
  """Keep the profiler's files here (default: a temporary directory)."""


def categorize(name: str) -> str:
  """The :data:`CATEGORIES` entry an op name falls in (``'other'`` if none)."""
  lowered = name.lower()
  for category, pattern in CATEGORIES:
    if re.search(pattern, lowered):
      return category
  return 'other'


def _lines(events: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, Any], str]:
  """``(pid, tid) -> 'process / thread'`` from the trace's metadata."""
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') != 'M':
      continue
    if e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  return {key: f'{processes.get(key[0], key[0])} / {name}'
          for key, name in threads.items()}


def summarize(events: Sequence[Mapping[str, Any]],
              steps: int) -> dict[str, Any]:
  """Per-step device time by op, by kernel and by category.

  Args:
    events: the Chrome-trace events of ``steps`` recorded steps.
    steps: how many steps the trace holds (times are divided by it).

  Returns:
    ``{'device_lines', 'step_ms', 'span_ms', 'launches', 'ops', 'kernels',
    'categories'}``: ``span_ms`` is the time from a step's first kernel's
    start to its last kernel's end (the mean over the steps; ``step_ms``
    less the gaps between kernels, which launch overhead leaves idle; None
    on a host-only trace) and ``launches`` its kernels; each table a list
    of ``{'name', 'ms', 'calls', 'share'}`` rows per step, largest first
    (``share``: of ``step_ms``, the device's busy time, or of the table's
    total on a host-only trace).
  """
  lines = _lines(events)
  device = {key: name for key, name in lines.items()
            if '/device:' in name}
  if not device:  # CPU: the host's lines are all there is.
    device = dict(lines)
  durations: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  calls: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter)
  launched: list[tuple[float, float]] = []
  for e in events:
    key = (e.get('pid'), e.get('tid'))
    if e.get('ph') != 'X' or key not in device:
      continue
    thread = device[key].rsplit(' / ', 1)[-1]
    table = ('modules' if 'XLA Modules' in thread else
             'ops' if 'XLA Ops' in thread else
             'kernels' if 'Stream' in thread or 'stream' in thread else
             'host' if not any('/device:' in n for n in device.values())
             else None)
    if table is None:
      continue
    durations[table][e['name']] += float(e.get('dur', 0.0)) / 1e3
    calls[table][e['name']] += 1
    if table == 'kernels':
      start = float(e.get('ts', 0.0))
      launched.append((start, start + float(e.get('dur', 0.0))))
  busy_ms = sum(durations['modules'].values()) / steps or sum(
      durations['kernels'].values()) / steps

  def rows(table: str) -> list[dict[str, Any]]:
    total = busy_ms or sum(durations[table].values()) / steps
    out = [dict(name=name, ms=ms / steps, calls=calls[table][name] / steps,
                share=(ms / steps) / total if total else None)
           for name, ms in durations[table].items()]
    return sorted(out, key=lambda r: -r['ms'])

  ops = rows('ops') or rows('kernels') or rows('host')
  by_category: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for row in ops:
    by_category[categorize(row['name'])] += row['ms']
    count[categorize(row['name'])] += row['calls']
  total = busy_ms or sum(by_category.values())
  categories = sorted(
      (dict(name=name, ms=ms, calls=count[name],
            share=ms / total if total else None)
       for name, ms in by_category.items()), key=lambda r: -r['ms'])
  return dict(device_lines=sorted(set(device.values())), step_ms=busy_ms,
              span_ms=_span_ms(launched, steps),
              launches=len(launched) / steps, ops=ops,
              kernels=rows('kernels'), categories=categories)


def _span_ms(kernels: list[tuple[float, float]], steps: int) -> float | None:
  """Mean ms from a step's first kernel start to its last kernel end.

  ``kernels`` are ``(start, end)`` in microseconds, ``steps`` runs of the
  same kernels, each waited for before the next (:func:`profile`): sorted by
  start, the ``i``-th run of equal count is step ``i``.
  """
  if not kernels or len(kernels) % steps:
    return None
  kernels = sorted(kernels)
  per = len(kernels) // steps
  spans = [max(end for _, end in kernels[i * per:(i + 1) * per])
           - kernels[i * per][0] for i in range(steps)]
  return sum(spans) / steps / 1e3


def read_trace(trace_dir: str | Path) -> list[dict[str, Any]]:
  """The events of the newest ``*.trace.json.gz`` under ``trace_dir``."""
  paths = sorted(Path(trace_dir).glob('plugins/profile/*/*.trace.json.gz'),
                 key=lambda p: p.stat().st_mtime)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(paths[-1], 'rt') as f:
    return json.load(f)['traceEvents']


def profile(cfg: Config, trace_dir: str) -> dict[str, Any]:
  """Compiles the step, warms it up and traces ``cfg.steps`` steps."""
  tx, params, grads = step_time.make_problem(cfg.case, cfg.dtype,
                                             cfg.optimizer, cfg.rank)
  state = tx.init(params)
  step = jax.jit(functools.partial(step_time.optimizer_step, tx),
                 donate_argnums=(0, 1))
  for _ in range(3):
    params, state = step(params, state, grads)
  jax.block_until_ready((params, state))
  with jax.profiler.trace(trace_dir):
    for _ in range(cfg.steps):
      params, state = step(params, state, grads)
      jax.block_until_ready((params, state))
  report = summarize(read_trace(trace_dir), cfg.steps)
  report.update(case=cfg.case, dtype=cfg.dtype, optimizer=cfg.optimizer,
                rank=cfg.rank, steps=cfg.steps,
                device=environment.device_description(),
                versions=environment.versions())
  return report


def format_report(report: Mapping[str, Any], top: int) -> str:
  """Markdown: the categories, then the ``top`` ops and kernels."""
  columns = [results_lib.Column('name', 'name'),
             results_lib.Column('ms', 'ms / step', '.3f'),
             results_lib.Column('calls', 'calls / step', '.0f'),
             results_lib.Column('share', 'share', '.1%')]
  parts = [f"{report['case']} {report['dtype']} {report['optimizer']} "
           f"r={report['rank']}: {report['step_ms']:.3f} ms of device time "
           'per step' + (
               f", {report['span_ms']:.3f} ms from its first kernel's start to "
               f"its last's end, {report['launches']:.0f} kernels"
               if report.get('span_ms') else '')]
  for table in ('categories', 'ops', 'kernels'):
    if report[table]:
      parts += [f'\n{table}:\n',
                results_lib.markdown_table(report[table][:top], columns)]
  return '\n'.join(parts)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  environment.configure_xla()
  cfg = tyro.cli(Config, args=argv)
  if cfg.trace_dir is None:
    with tempfile.TemporaryDirectory() as tmp:
      report = profile(cfg, tmp)
  else:
    report = profile(cfg, cfg.trace_dir)
  print(format_report(report, cfg.top))
  if cfg.json:
    results_lib.write_json(report, cfg.json)
  return report


if __name__ == '__main__':
  main()
