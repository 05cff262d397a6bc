"""How well each moment compressor tracks Adam's moments, and what it costs.

Synthetic moment tracking: a single ``rows x cols`` matrix receives ``steps``
noisy low-rank gradients

  g_t = P diag(sigma * (1 + xi_t)) Q^T + tau * N_t,

with fixed orthonormal ``P``, ``Q`` of ``true_rank`` columns, a decaying
spectrum ``sigma_i = decay**i``, per-step fluctuations ``xi_t ~ N(0, 1)``
and Gaussian noise ``N_t`` scaled so that the noise has the Frobenius norm of
the signal's mean (``tau = ||sigma|| / sqrt(rows * cols)``). The same
sequence goes through ``scale_by_mlorc_adam`` with each compressor (every
leaf compressed) and through ``optax.scale_by_adam`` (exact moments). At
every step we record the relative Frobenius errors

* of the stored first and second moments, ``||read(F_t) - M_t|| / ||M_t||``
  with ``M_t`` the exact dense EMA (``b1``, ``b2``);
* of the update direction, ``||u_t - u_t^Adam|| / ||u_t^Adam||``;

and report their means over the last half of the run, averaged over seeds.
Step time: the jitted ``scale_by_mlorc_adam`` update of one ``--time-shape``
matrix per compressor and rank, median of ``--time-reps`` calls interleaved
across configurations, next to ``optax.scale_by_adam`` in the same run.

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.

Usage: python benchmarks/compressor_tracking.py [--help]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mlorc_optax
from mlorc_optax import compressors
from mlorc_optax import contrib

#: The compressors by their ``name``.
COMPRESSORS = {
    'rsvd': compressors.RSVDCompressor,
    'warm': contrib.WarmStartCompressor,
    'lorapre': contrib.LoRAPreCompressor,
}

# (label, compressor name, keyword arguments of its class)
CONFIGS = (
    ('rsvd', 'rsvd', {}),
    ('rsvd, power_iters=1', 'rsvd', {'power_iters': 1}),
    ('warm', 'warm', {}),
    ('lorapre', 'lorapre', {}),
    ('lorapre, bias_matched=False', 'lorapre', {'bias_matched': False}),
)


def gradients(key, steps, rows, cols, true_rank, decay):
  """The ``[steps, rows, cols]`` gradient sequence described above."""
  kp, kq, kx, kn = jax.random.split(key, 4)
  p, _ = jnp.linalg.qr(jax.random.normal(kp, (rows, true_rank)))
  q, _ = jnp.linalg.qr(jax.random.normal(kq, (cols, true_rank)))
  sigma = decay ** jnp.arange(true_rank, dtype=jnp.float32)
  xi = jax.random.normal(kx, (steps, true_rank))
  tau = jnp.linalg.norm(sigma) / np.sqrt(rows * cols)
  signal = jnp.einsum('ik,tk,jk->tij', p, sigma * (1 + xi), q)
  return signal + tau * jax.random.normal(kn, (steps, rows, cols))


def _rel(a, b):
  return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)


def track(grads, rank, compressor, kwargs, b1, b2, seed):
  """Per-step relative errors ``(m, v, direction)``, each ``[steps]``."""
  comp = COMPRESSORS[compressor](**kwargs)
  tx = mlorc_optax.scale_by_mlorc_adam(
      b1, b2, rank=rank, seed=seed, compressor=comp, low_rank_mask=True)
  adam = optax.scale_by_adam(b1, b2)
  params = {'w': jnp.zeros(grads.shape[1:])}

  def read(factors, second, count):
    return comp.read(factors, nonnegative=second, decay=b2 if second else b1,
                     count=count)

  def body(carry, g):
    s, sa = carry
    u, s = tx.update({'w': g}, s)
    ua, sa = adam.update({'w': g}, sa)
    core, exact = s, sa  # LowRankMomentsState, optax's ScaleByAdamState
    errs = jnp.stack([
        _rel(read(core.inner_state.mu['w'], False, core.step), exact.mu['w']),
        _rel(read(core.inner_state.nu['w'], True, core.step), exact.nu['w']),
        _rel(u['w'], ua['w']),
    ])
    return (s, sa), errs

  _, errs = jax.jit(lambda g: jax.lax.scan(
      body, (tx.init(params), adam.init(params)), g))(grads)
  return np.asarray(errs)


def step_times(shape, configs, reps):
  """Median seconds of one jitted update of a ``shape`` matrix, per config.

  ``configs`` maps a name to a transformation. The calls are interleaved
  (one call of each config per round), so a machine shared with other work
  slows every config alike instead of whichever ran during a busy spell.
  """
  g = {'w': jax.random.normal(jax.random.key(0), shape)}
  calls = {}
  for name, tx in configs.items():
    state = tx.init(g)
    update = jax.jit(tx.update)
    for _ in range(3):  # compile, then warm up
      _, state = update(g, state)
    jax.block_until_ready(state)
    calls[name] = [update, state]
  times = {name: [] for name in configs}
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      _, call[1] = call[0](g, call[1])
      jax.block_until_ready(call[1])
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def state_floats(shape, rank, compressor, kwargs):
  tx = mlorc_optax.scale_by_mlorc_adam(
      rank=rank, low_rank_mask=True,
      compressor=COMPRESSORS[compressor](**kwargs))
  state = jax.eval_shape(tx.init, {'w': jax.ShapeDtypeStruct(shape,
                                                             jnp.float32)})
  inner = state.inner_state
  return int(sum(x.size for x in jax.tree.leaves((inner.mu, inner.nu))))


def markdown(results) -> str:
  cfg = results['config']
  rows, cols = cfg['rows'], cfg['cols']
  tr, tc = cfg['time_shape']
  lines = [
      f'| compressor | r | m error | v error | direction error | '
      f'state floats ({rows}x{cols}) | step ms ({tr}x{tc}) |',
      '|---|---|---|---|---|---|---|',
  ]
  for r in results['rows']:
    lines.append(
        f"| {r['label']} | {r['rank']} | {r['m_error']:.3f} ± "
        f"{r['m_error_std']:.3f} | {r['v_error']:.3f} ± {r['v_error_std']:.3f}"
        f" | {r['direction_error']:.3f} ± {r['direction_error_std']:.3f} | "
        f"{r['state_floats']:,} | {1e3 * r['step_s']:.2f} |"
    )
  lines.append(
      f"| optax.scale_by_adam (exact) | - | 0 | 0 | 0 | "
      f"{2 * rows * cols:,} | {1e3 * results['adam_step_s']:.2f} |"
  )
  return '\n'.join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
  titles = ('first moment m', 'second moment v', 'update direction')
  colors = dict(zip([c[0] for c in CONFIGS],
                    ('tab:blue', 'tab:cyan', 'tab:orange', 'tab:green',
                     'tab:olive')))
  for r in results['rows']:
    style = '-' if r['rank'] == results['config']['ranks'][0] else '--'
    for ax, curve in zip(axes, r['curves']):
      ax.plot(np.arange(1, len(curve) + 1), curve, style,
              color=colors[r['label']], label=f"{r['label']}, r={r['rank']}")
  for ax, title in zip(axes, titles):
    ax.set_title(f'relative error: {title}')
    ax.set_xlabel('step')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  cfg = results['config']
  fig.suptitle(
      f"{cfg['rows']}x{cfg['cols']} noisy rank-{cfg['true_rank']} gradients, "
      f"b1={cfg['b1']}, b2={cfg['b2']}, mean of {len(cfg['seeds'])} seeds "
      f"({results['device']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--rows', type=int, default=96)
  parser.add_argument('--cols', type=int, default=64)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--ranks', type=int, nargs='+', default=[4, 8])
  parser.add_argument('--true-rank', type=int, default=16,
                      help='rank of the gradients\' signal')
  parser.add_argument('--decay', type=float, default=0.8,
                      help='spectrum of the signal: decay**i')
  parser.add_argument('--b1', type=float, default=0.9)
  parser.add_argument('--b2', type=float, default=0.999)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--time-shape', type=int, nargs=2, default=[768, 3072],
                      help='matrix timed for the step time')
  parser.add_argument('--time-reps', type=int, default=30)
  parser.add_argument('--out', type=Path,
                      default=Path('benchmarks/results/compressors'))
  parser.add_argument('--no-figure', action='store_true')
  args = parser.parse_args(argv)

  device = (f'{jax.devices()[0].platform.upper()} '
            f'({platform.processor() or platform.machine()}, '
            f'{os.cpu_count()} cores)')
  rows_out = []
  half = args.steps // 2
  for rank in args.ranks:
    for label, compressor, kwargs in CONFIGS:
      errs = []
      for seed in args.seeds:
        grads = gradients(jax.random.key(1000 + seed), args.steps, args.rows,
                          args.cols, args.true_rank, args.decay)
        errs.append(track(grads, rank, compressor, kwargs, args.b1, args.b2,
                          seed))
      errs = np.stack(errs)  # [seeds, steps, 3]
      tail = errs[:, half:].mean(axis=1)  # [seeds, 3]
      row = {
          'label': label, 'compressor': compressor, 'kwargs': kwargs,
          'rank': rank,
          'curves': errs.mean(axis=0).T.tolist(),
          'state_floats': state_floats((args.rows, args.cols), rank,
                                       compressor, kwargs),
      }
      for i, name in enumerate(('m_error', 'v_error', 'direction_error')):
        row[name] = float(tail[:, i].mean())
        row[name + '_std'] = float(tail[:, i].std())
      rows_out.append(row)
      print(f"{label:28s} r={rank}: m {row['m_error']:.3f} v "
            f"{row['v_error']:.3f} dir {row['direction_error']:.3f}",
            flush=True)
  timed = {'adam': optax.scale_by_adam()}
  for row in rows_out:
    timed[row['label'], row['rank']] = mlorc_optax.scale_by_mlorc_adam(
        rank=row['rank'], low_rank_mask=True,
        compressor=COMPRESSORS[row['compressor']](**row['kwargs']))
  seconds = step_times(tuple(args.time_shape), timed, args.time_reps)
  for row in rows_out:
    row['step_s'] = seconds[row['label'], row['rank']]
  results = {
      'config': {**{k: v for k, v in vars(args).items() if k != 'out'},
                 'time_shape': list(args.time_shape)},
      'command': ' '.join(['python', *sys.argv]),
      'device': device,
      'versions': {'jax': jax.__version__, 'optax': optax.__version__,
                   'numpy': np.__version__,
                   'python': platform.python_version()},
      'rows': rows_out,
      'adam_step_s': seconds['adam'],
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
  table = markdown(results)
  (args.out / 'results.md').write_text(
      f"# Moment compressors: tracking error and step time\n\n"
      f"Device: {device}; jax {jax.__version__}, optax {optax.__version__}.\n"
      f"Command: `{results['command']}`\n\n"
      f"Errors: relative Frobenius error vs the exact EMA (optax.scale_by_adam"
      f"), mean over steps {half + 1}-{args.steps}, mean ± std over seeds "
      f"{args.seeds}. Step times: median of {args.time_reps} calls, "
      f"interleaved across the configurations.\n\n{table}\n")
  print(table)
  if not args.no_figure:
    plot(results, args.out / 'results.png')


if __name__ == '__main__':
  main()
