"""Optimizer step time and memory: MLorc against optax's optimizers.

Each measurement is one jitted optimizer step (``tx.update`` then
``optax.apply_updates``; parameters and state donated) on a tree of
LLaMA-7B-shaped matrices, with fixed random gradients:

* ``llama7b_L1`` / ``llama7b_L8``: per layer 4 x ``4096 x 4096`` (q, k, v,
  o), 2 x ``4096 x 11008`` (gate, up) and 1 x ``11008 x 4096`` (down),
  each stacked over ``L`` layers as ``[L, m, n]`` (how scanned models store
  them; MLorc treats ``L`` as a batch of matrices);
* ``small_32x1024x2816``: 32 matrices of ``1024 x 2816`` stacked, to expose
  per-matrix overhead;
* ``minilm_L6_unstacked``: the 36 matrices of MiniLM-L6 (the fine-tuning
  example's model), each its own leaf, as in an unstacked model: a step
  bound by the fixed cost of each launch;
* ``tiny``: a few small matrices, for CI.

Optimizers: ``adamw``, ``lion``, ``adafactor`` (optax), ``mlorc_adamw`` and
``mlorc_lion`` at each ``--ranks`` rank (``mlorc_adamw_reference``,
``_xla`` and ``_pallas`` force one implementation of the step;
``mlorc_lion_reference``, ``_xla`` and ``_pallas`` likewise for Lion), and
``optax.contrib.galore`` (same
ranks, AdamW inside) amortised over its projection gap: ``(t_svd + (gap - 1)
t_step) / gap``, with ``t_svd`` the step that recomputes the projectors (one warm call timed). GaLore
cannot treat a leading axis as a batch, so it gets the same matrices as a list
of ``[m, n]`` leaves.

Reported per configuration: median warm step time (``block_until_ready``
after each call), its ratio to ``optax.adamw``'s in the same run and dtype,
XLA's compiled memory (``memory_analysis()``: temporaries, and arguments +
outputs - aliased + temporaries as the step's estimated peak),
optimizer-state bytes and, with ``--isolate`` (one process per
configuration; the device's peak counter never resets), the device's
``peak_bytes_in_use``. Writes JSON, a markdown table and a plot of step time
against parameter count.

Usage (GPU; both dtypes in parallel on two GPUs, or one after the other)::

  python -m benchmarks.step_time --cases llama7b_L1 llama7b_L8 \\
      small_32x1024x2816 --dtypes float32 --isolate \\
      --json benchmarks/results/step_time/h100_float32.json
  python -m benchmarks.step_time --cases tiny --dtypes float32  # CPU, CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

#: Matrices per case: (name, count, (m, n)) stacked as [count, m, n].
LLAMA7B_LAYER = (
    ('wq', (4096, 4096)),
    ('wk', (4096, 4096)),
    ('wv', (4096, 4096)),
    ('wo', (4096, 4096)),
    ('w_gate', (4096, 11008)),
    ('w_up', (4096, 11008)),
    ('w_down', (11008, 4096)),
)

#: The matrices of a MiniLM-L6 layer (BERT-style, hidden 384): the model of
#: ``examples/finetune``.
MINILM_LAYER = (
    ('query', (384, 384)),
    ('key', (384, 384)),
    ('value', (384, 384)),
    ('attention_out', (384, 384)),
    ('intermediate', (384, 1536)),
    ('output', (1536, 384)),
)

#: Cases whose layers are separate leaves, as in an unstacked (not scanned)
#: model, for every optimizer.
UNSTACKED = ('minilm_L6_unstacked',)

CASES: dict[str, tuple[int, tuple[tuple[str, tuple[int, int]], ...]]] = {
    'llama7b_L1': (1, LLAMA7B_LAYER),
    'llama7b_L8': (8, LLAMA7B_LAYER),
    'small_32x1024x2816': (32, (('w', (1024, 2816)),)),
    'tiny': (2, (('wq', (64, 64)), ('w_up', (64, 160)), ('w_down', (160, 64)))),
    'minilm_L6_unstacked': (6, MINILM_LAYER),
}

#: ``mlorc_adamw`` and ``mlorc_lion`` pick their implementation
#: automatically (the two-pass Pallas step on one NVIDIA GPU, the reference
#: step elsewhere); the suffixed names force one (``implementation=`` of
#: :func:`mlorc_optax.mlorc_adamw` / :func:`mlorc_optax.mlorc_lion`).
MLORC_ADAMW_IMPLEMENTATIONS = ('mlorc_adamw_reference', 'mlorc_adamw_xla',
                               'mlorc_adamw_pallas')
MLORC_LION_IMPLEMENTATIONS = ('mlorc_lion_reference', 'mlorc_lion_xla',
                              'mlorc_lion_pallas')
#: The default step with every leaf launched on its own
#: (``KernelConfig(group_max_elements=0)``): what equal-shaped leaves sharing
#: one launch saves.
MLORC_ALONE = ('mlorc_adamw_alone', 'mlorc_lion_alone')
OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'mlorc_adamw', 'mlorc_lion',
              'galore', *MLORC_ADAMW_IMPLEMENTATIONS,
              *MLORC_LION_IMPLEMENTATIONS, *MLORC_ALONE)
LOW_RANK = ('mlorc_adamw', 'mlorc_lion', 'galore',
            *MLORC_ADAMW_IMPLEMENTATIONS, *MLORC_LION_IMPLEMENTATIONS,
            *MLORC_ALONE)
GALORE_GAP = 200


def param_count(case: str) -> int:
  layers, mats = CASES[case]
  return layers * sum(m * n for _, (m, n) in mats)


def make_optimizer(name: str, rank: int | None):
  import optax  # pylint: disable=g-import-not-at-top
  import mlorc_optax  # pylint: disable=g-import-not-at-top

  lr = 1e-4
  if name == 'adamw':
    return optax.adamw(lr)
  if name == 'lion':
    return optax.lion(lr)
  if name == 'adafactor':
    return optax.adafactor(lr)
  if name == 'mlorc_adamw':
    return mlorc_optax.mlorc_adamw(lr, rank=rank)
  if name in MLORC_ADAMW_IMPLEMENTATIONS:
    return mlorc_optax.mlorc_adamw(
        lr, rank=rank, implementation=name.rsplit('_', 1)[1])
  if name == 'mlorc_lion':
    return mlorc_optax.mlorc_lion(lr, rank=rank)
  if name in MLORC_LION_IMPLEMENTATIONS:
    return mlorc_optax.mlorc_lion(
        lr, rank=rank, implementation=name.rsplit('_', 1)[1])
  if name in MLORC_ALONE:
    make = (mlorc_optax.mlorc_adamw if name == 'mlorc_adamw_alone'
            else mlorc_optax.mlorc_lion)
    return make(lr, rank=rank, kernel_config=mlorc_optax.kernels.KernelConfig(
        group_max_elements=0))
  if name == 'galore':
    return optax.contrib.galore(lr, rank=rank, update_proj_gap=GALORE_GAP)
  raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}.')


def implementation_of(tx: Any, params: Any) -> str:
  """Which step the compressed leaves take (for the JSON record).

  Read from the transform's own plan (:func:`mlorc_optax.compression_plan`,
  made once in ``init``): the steps of the compressed leaves, e.g.
  ``'pallas'``, or ``'pallas+xla'`` when some matrix cannot be tiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import mlorc_optax  # pylint: disable=g-import-not-at-top

  plan = mlorc_optax.compression_plan(tx, params)
  steps = {p.step for p in jax.tree.leaves(plan) if p.compressed}
  return '+'.join(sorted(steps)) or 'dense'


def make_tree(case: str, dtype: str, seed: int, as_list: bool) -> Any:
  """Random arrays of ``case`` (stacked, or a list of matrices if as_list)."""
  import jax  # pylint: disable=g-import-not-at-top

  layers, mats = CASES[case]
  keys = iter(jax.random.split(jax.random.key(seed), len(mats) * layers))

  def draw(shape):
    return jax.jit(lambda k: 0.02 * jax.random.normal(k, shape, dtype))(
        next(keys))

  if as_list:
    return {name: [draw((m, n)) for _ in range(layers)]
            for name, (m, n) in mats}
  return {name: draw((layers, m, n)) for name, (m, n) in mats}


def _tree_bytes(tree: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, 'dtype'))


def _peak() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top

  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['peak_bytes_in_use']) if stats else None


def measure(case: str, dtype: str, optimizer: str, rank: int | None,
            calls: int, warmup: int) -> dict[str, Any]:
  """Times one configuration in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  result: dict[str, Any] = dict(
      case=case, dtype=dtype, optimizer=optimizer, rank=rank,
      params=param_count(case), backend=jax.default_backend(),
      device=jax.local_devices()[0].device_kind, jax_version=jax.__version__,
      optax_version=optax.__version__, status='error', error=None)
  try:
    tx = make_optimizer(optimizer, rank)
    as_list = optimizer == 'galore' or case in UNSTACKED
    params = make_tree(case, dtype, 0, as_list)
    grads = make_tree(case, dtype, 1, as_list)
    if optimizer.startswith('mlorc_'):
      result['implementation'] = implementation_of(tx, params)
    state = tx.init(params)
    result['param_bytes'] = _tree_bytes(params)
    result['opt_state_bytes'] = _tree_bytes(state)

    def step(params, state, grads, count=None):
      if count is not None:  # pin the step counter (GaLore's SVD steps)
        state = optax.tree_utils.tree_set(state, count=count)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    count = None
    if optimizer == 'galore':
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      count = jnp.asarray(1, jnp.int32)  # a step that keeps the projectors
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, grads, count).compile()
    result['compile_s'] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
      result['temp_bytes'] = int(mem.temp_size_in_bytes)
      result['estimated_peak_bytes'] = int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

    def timed(n, count, warmup=warmup):
      nonlocal params, state
      times = []
      for i in range(n + warmup):
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(
            compiled(params, state, grads, count))
        if i >= warmup:
          times.append(time.perf_counter() - t0)
      return times

    times = timed(calls, count)
    result['step_s'] = statistics.median(times)
    result['step_min_s'] = min(times)
    if optimizer == 'galore':
      svd = timed(1, jnp.asarray(0, jnp.int32), warmup=1)
      result['svd_step_s'] = statistics.median(svd)
      result['regular_step_s'] = result['step_s']
      result['step_s'] = (result['svd_step_s']
                          + (GALORE_GAP - 1) * result['regular_step_s']
                          ) / GALORE_GAP
    result['peak_bytes'] = _peak()
    result['status'] = 'ok'
  except Exception as e:  # pylint: disable=broad-except
    text = f'{type(e).__name__}: {e}'
    result['error'] = text[:500]
    result['status'] = 'oom' if 'RESOURCE_EXHAUSTED' in text else 'error'
  return result


def measure_isolated(case, dtype, optimizer, rank, calls, warmup,
                     timeout) -> dict[str, Any]:
  """:func:`measure` in a fresh process (exact device peak; OOM-safe)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'r.json')
    args = [sys.executable, '-m', 'benchmarks.step_time', '--cases', case,
            '--dtypes', dtype, '--optimizers', optimizer, '--calls',
            str(calls), '--warmup', str(warmup), '--json', path, '--quiet']
    if rank is not None:
      args += ['--ranks', str(rank)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (root, env.get('PYTHONPATH')) if p)
    try:
      proc = subprocess.run(args, cwd=root, env=env, timeout=timeout,
                            capture_output=True, text=True, check=False)
      tail = (proc.stdout + proc.stderr)[-500:]
    except subprocess.TimeoutExpired:
      tail = f'timed out after {timeout}s'
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)[0]
  return dict(case=case, dtype=dtype, optimizer=optimizer, rank=rank,
              params=param_count(case), status='error', error=tail)


def add_ratios(results: Sequence[dict[str, Any]]) -> None:
  """``ratio_vs_adamw``: step time over adamw's (same case and dtype)."""
  base = {(r['case'], r['dtype']): r['step_s'] for r in results
          if r['optimizer'] == 'adamw' and r['status'] == 'ok'}
  for r in results:
    b = base.get((r['case'], r['dtype']))
    r['ratio_vs_adamw'] = (r['step_s'] / b if b and r['status'] == 'ok'
                           else None)


def _gib(x):
  return '-' if x is None else f'{x / 2**30:.2f}'


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of the results."""
  rows = ['| case | dtype | optimizer | rank | status | step ms | ratio vs '
          'adamw | temp GiB | temp / params | estimated peak GiB | device '
          'peak GiB | state GiB |',
          '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    cells = [r['case'], r['dtype'], r['optimizer'], r['rank'] or '-']
    if r['status'] != 'ok':
      cells += [f'{r["status"]}: {str(r["error"])[:60]}'] + ['-'] * 7
    else:
      temp, pb = r.get('temp_bytes'), r.get('param_bytes')
      ratio = r.get('ratio_vs_adamw')
      cells += [
          'ok',
          f'{r["step_s"] * 1e3:.2f}',
          '-' if ratio is None else f'{ratio:.2f}',
          _gib(temp),
          '-' if temp is None or not pb else f'{temp / pb:.2f}',
          _gib(r.get('estimated_peak_bytes')),
          _gib(r.get('peak_bytes')),
          _gib(r.get('opt_state_bytes')),
      ]
    rows.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(rows)


def plot(results: Sequence[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), sharey=True)
  for ax, dtype in zip(axes, ('float32', 'bfloat16')):
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
      if r['status'] != 'ok' or r['dtype'] != dtype:
        continue
      label = r['optimizer'] + (f' r={r["rank"]}' if r['rank'] else '')
      series.setdefault(label, []).append((r['params'], r['step_s'] * 1e3))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p for p, _ in pts], [t for _, t in pts], 'o-', label=label)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('parameters')
    ax.set_title(dtype)
    ax.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel('optimizer step (ms)')
  axes[1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--cases', nargs='+', default=['tiny'],
                      choices=sorted(CASES), help='Parameter trees.')
  parser.add_argument('--dtypes', nargs='+', default=['float32'],
                      choices=('float32', 'bfloat16'),
                      help='Parameter (and gradient) dtypes.')
  parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS[:6]),
                      choices=OPTIMIZERS, help='Optimizers to measure.')
  parser.add_argument('--ranks', nargs='+', type=int, default=[4, 32],
                      help='Ranks of the low-rank optimizers.')
  parser.add_argument('--galore-ranks', nargs='+', type=int, default=None,
                      help='Ranks of GaLore (default: --ranks).')
  parser.add_argument('--calls', type=int, default=10,
                      help='Timed calls per configuration (median).')
  parser.add_argument('--warmup', type=int, default=2,
                      help='Untimed calls after compiling.')
  parser.add_argument('--isolate', action='store_true',
                      help='One process per configuration (device peak).')
  parser.add_argument('--timeout', type=float, default=300,
                      help='Seconds per isolated configuration.')
  parser.add_argument('--json', default=None, help='Write results here.')
  parser.add_argument('--table', default=None,
                      help='Write the markdown table here.')
  parser.add_argument('--plot', default=None, help='Write the figure here.')
  parser.add_argument('--quiet', action='store_true', help='Less output.')
  parser.add_argument('--render', nargs='+', default=None, metavar='JSON',
                      help='Measure nothing: merge these result files and '
                      'write --json/--table/--plot from them.')
  args = parser.parse_args(argv)
  if args.render:
    results = []
    for path in args.render:
      with open(path) as f:
        results.extend(json.load(f))
    return _write(results, args)

  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  results = []
  for case in args.cases:
    for dtype in args.dtypes:
      for optimizer in args.optimizers:
        ranks = [None]
        if optimizer in LOW_RANK:
          ranks = args.ranks
          if optimizer == 'galore' and args.galore_ranks:
            ranks = args.galore_ranks
        for rank in ranks:
          if args.isolate:
            r = measure_isolated(case, dtype, optimizer, rank, args.calls,
                                 args.warmup, args.timeout)
          else:
            r = measure(case, dtype, optimizer, rank, args.calls, args.warmup)
          results.append(r)
          if args.json:  # after every configuration: a cut-off run keeps data
            _dump(results, args.json)
          if not args.quiet:
            print(f'{case} {dtype} {optimizer} r={rank}: {r["status"]} '
                  + (f'{r["step_s"] * 1e3:.2f} ms' if r['status'] == 'ok'
                     else str(r['error'])[:200]), flush=True)
  return _write(results, args)


def _dump(results: list[dict[str, Any]], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)


def _write(results: list[dict[str, Any]], args: Any) -> list[dict[str, Any]]:
  """Adds the ratios, prints and writes the outputs named in ``args``."""
  add_ratios(results)
  table = format_table(results)
  if not args.quiet:
    print(table)
  if args.json:
    _dump(results, args.json)
  if args.table:
    with open(args.table, 'w') as f:
      f.write(table + '\n')
  if args.plot:
    plot(results, args.plot)
  return results


if __name__ == '__main__':
  main()
