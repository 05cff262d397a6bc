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

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``;
``--render results.json`` writes the last two again from a saved run.

Usage: python benchmarks/compressor_tracking.py [--help]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # Run as a file (the usage above): find `benchmarks`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import mlorc_optax
from benchmarks.toolkit import environment
from benchmarks.toolkit import figures
from benchmarks.toolkit import results as results_lib
from benchmarks.toolkit import timing
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

#: The figure's color of each configuration.
COLORS = dict(zip([c[0] for c in CONFIGS], ('tab:blue', 'tab:cyan',
                                             'tab:orange', 'tab:green',
                                             'tab:olive')))


@dataclasses.dataclass(frozen=True)
class Config:
  """How well each moment compressor tracks Adam's moments, and its cost."""

  rows: int = 96
  cols: int = 64
  steps: int = 200
  ranks: tuple[int, ...] = (4, 8)
  true_rank: int = 16
  """Rank of the gradients' signal."""
  decay: float = 0.8
  """Spectrum of the signal: decay**i."""
  b1: float = 0.9
  b2: float = 0.999
  seeds: tuple[int, ...] = (0, 1, 2)
  time_shape: tuple[int, int] = (768, 3072)
  """Matrix timed for the step time."""
  time_reps: int = 30
  """Timed calls of each configuration (interleaved)."""
  out: Path = Path('benchmarks/results/compressors')
  """Folder of results.json, results.md and results.png."""
  no_figure: bool = False
  """Write no figure."""
  render: Path | None = None
  """Measure nothing: write results.md and results.png into --out from this
  results.json."""


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
  return tracking_errors(grads, tx, comp, b1, b2)


def tracking_errors(grads, tx, comp, b1, b2):
  """Per-step relative errors ``(m, v, direction)`` of ``tx`` (a
  ``scale_by_mlorc_adam`` whose one leaf ``comp`` compresses), each
  ``[steps]``, against ``optax.scale_by_adam(b1, b2)``."""
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


def step_times(shape: tuple[int, int],
               configs: dict[Any, optax.GradientTransformation],
               reps: int) -> dict[Any, float]:
  """Median seconds of one jitted update of a ``shape`` matrix, per config.

  ``configs`` maps a name to a transformation. The calls are interleaved
  (one call of each config per round), so a machine shared with other work
  slows every config alike instead of whichever ran during a busy spell.
  """
  g = {'w': jax.random.normal(jax.random.key(0), shape)}
  steps = {}
  for name, tx in configs.items():
    update = jax.jit(tx.update)
    steps[name] = (lambda s, update=update: update(g, s)[1], tx.init(g))
  times = timing.time_steps_interleaved(steps, calls=reps, warmup=3)
  return {name: t.median_s for name, t in times.items()}


def state_floats(shape, rank, compressor, kwargs):
  tx = mlorc_optax.scale_by_mlorc_adam(
      rank=rank, low_rank_mask=True,
      compressor=COMPRESSORS[compressor](**kwargs))
  state = jax.eval_shape(tx.init, {'w': jax.ShapeDtypeStruct(shape,
                                                             jnp.float32)})
  inner = state.inner_state
  return int(sum(x.size for x in jax.tree.leaves((inner.mu, inner.nu))))


def markdown(results: dict[str, Any]) -> str:
  """The table of the tracking errors, state sizes and step times."""
  cfg = results['config']
  tr, tc = cfg['time_shape']
  adam = {'label': 'optax.scale_by_adam (exact)', 'm_error': 0.0,
          'v_error': 0.0, 'direction_error': 0.0,
          'state_floats': 2 * cfg['rows'] * cfg['cols'],
          'step_s': results['adam_step_s']}
  columns = [results_lib.Column('label', 'compressor'),
             results_lib.Column('rank', 'r')]
  for name, header in (('m', 'm error'), ('v', 'v error'),
                       ('direction', 'direction error')):
    columns.append(results_lib.Column(
        lambda r, k=f'{name}_error': (r[k], r.get(k + '_std')), header,
        lambda v: '0' if v[0] == 0 else results_lib.pm(*v, '.3f')))
  columns += [
      results_lib.Column('state_floats',
                         f'state floats ({cfg["rows"]}x{cfg["cols"]})', ','),
      results_lib.Column('step_s', f'step ms ({tr}x{tc})',
                         lambda s: f'{1e3 * s:.2f}'),
  ]
  return results_lib.markdown_table([*results['rows'], adam], columns)


def report(results: dict[str, Any]) -> str:
  """``results.md``: what was run, how, and the table."""
  cfg, versions = results['config'], results['versions']
  return (
      f"# Moment compressors: tracking error and step time\n\n"
      f"Device: {results['device']}; jax {versions['jax']}, optax "
      f"{versions['optax']}.\nCommand: `{results['command']}`\n\n"
      f"Errors: relative Frobenius error vs the exact EMA (optax.scale_by_adam"
      f"), mean over steps {cfg['steps'] // 2 + 1}-{cfg['steps']}, mean ± std "
      f"over seeds {list(cfg['seeds'])}. Step times: median of "
      f"{cfg['time_reps']} calls, interleaved across the configurations."
      f"\n\n{markdown(results)}\n")


def plot(results: dict[str, Any], path: Path) -> None:
  """The three error curves of every configuration, against the step."""
  cfg = results['config']
  titles = ('first moment m', 'second moment v', 'update direction')
  with figures.panels(
      path, 3, figsize=(15, 4.2), sharex=True, title=(
          f"{cfg['rows']}x{cfg['cols']} noisy rank-{cfg['true_rank']} "
          f"gradients, b1={cfg['b1']}, b2={cfg['b2']}, mean of "
          f"{len(cfg['seeds'])} seeds ({results['device']})")) as axes:
    for i, (ax, title) in enumerate(zip(axes, titles)):
      series, styles = {}, {}
      for r in results['rows']:
        label = f"{r['label']}, r={r['rank']}"
        curve = r['curves'][i]
        series[label] = (np.arange(1, len(curve) + 1), curve)
        styles[label] = dict(color=COLORS[r['label']], linestyle=(
            '-' if r['rank'] == cfg['ranks'][0] else '--'))
      figures.draw_lines(ax, series, xlabel='step', logy=True,
                         title=f'relative error: {title}', styles=styles,
                         legend=i == 0)


def run(cfg: Config) -> dict[str, Any]:
  """Tracks every configuration and times it; returns the results dict."""
  rows_out = []
  half = cfg.steps // 2
  for rank in cfg.ranks:
    for label, compressor, kwargs in CONFIGS:
      errs = []
      for seed in cfg.seeds:
        grads = gradients(jax.random.key(1000 + seed), cfg.steps, cfg.rows,
                          cfg.cols, cfg.true_rank, cfg.decay)
        errs.append(track(grads, rank, compressor, kwargs, cfg.b1, cfg.b2,
                          seed))
      errs = np.stack(errs)  # [seeds, steps, 3]
      tail = errs[:, half:].mean(axis=1)  # [seeds, 3]
      row = {
          'label': label, 'compressor': compressor, 'kwargs': kwargs,
          'rank': rank,
          'curves': errs.mean(axis=0).T.tolist(),
          'state_floats': state_floats((cfg.rows, cfg.cols), rank,
                                       compressor, kwargs),
      }
      for i, name in enumerate(('m_error', 'v_error', 'direction_error')):
        row[name] = float(tail[:, i].mean())
        row[name + '_std'] = float(tail[:, i].std())  # over seeds (ddof 0)
      rows_out.append(row)
      print(f"{label:28s} r={rank}: m {row['m_error']:.3f} v "
            f"{row['v_error']:.3f} dir {row['direction_error']:.3f}",
            flush=True)
  timed = {'adam': optax.scale_by_adam()}
  for row in rows_out:
    timed[row['label'], row['rank']] = mlorc_optax.scale_by_mlorc_adam(
        rank=row['rank'], low_rank_mask=True,
        compressor=COMPRESSORS[row['compressor']](**row['kwargs']))
  seconds = step_times(cfg.time_shape, timed, cfg.time_reps)
  for row in rows_out:
    row['step_s'] = seconds[row['label'], row['rank']]
  device = environment.device_description()
  return {
      'config': {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ('out', 'render')},
      'command': ' '.join(['python', *sys.argv]),
      'device': f"{device['platform'].upper()} "
                f"({environment.host_description()})",
      'versions': environment.versions(),
      'rows': rows_out,
      'adam_step_s': seconds['adam'],
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  cfg = tyro.cli(Config, args=argv)
  if cfg.render:
    results = results_lib.read_json(cfg.render)
  else:
    results = run(cfg)
    results_lib.write_json(results, cfg.out / 'results.json')
  cfg.out.mkdir(parents=True, exist_ok=True)
  (cfg.out / 'results.md').write_text(report(results))
  print(markdown(results))
  if not cfg.no_figure:
    plot(results, cfg.out / 'results.png')
  return results


if __name__ == '__main__':
  main()
