"""Tables and the figure of the Shakespeare benchmark, from its result JSON.

Everything here reads the results dictionary that ``main.py`` writes
(``results.json``), so a committed result renders again without a rerun::

  python -m benchmarks.shakespeare.report benchmarks/results/shakespeare

The figure draws every method, or only those the results name under
``figure_methods`` (a merged result holds dozens; their legend would
bury the curves). ``--figure-methods M ...`` after the folder sets that
list and writes it into ``results.json``.

The learning rate of a method is the grid point with the lowest tuning-split
loss for the first seed (:func:`choose_lr`); its final numbers are the
validation losses of that rate over the seeds, and its paired difference to
AdamW is ``100 (loss - adamw's loss) / adamw's loss`` per seed (same
initialisation and batches), summarised as mean +- standard deviation.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import toolkit

Column = toolkit.results.Column
BASELINE = 'adamw'


def grid_lrs(method_lr: float, multipliers: Sequence[float]) -> list[float]:
  """The learning-rate grid of a method (rounded to 6 significant digits)."""
  return sorted(float(f'{method_lr * m:.6g}') for m in multipliers)


def _runs(results: Mapping[str, Any], method: str) -> list[dict[str, Any]]:
  return [r for r in results['runs'] if r['method'] == method]


def choose_lr(runs: Sequence[Mapping[str, Any]], grid: Sequence[float],
              seed: int) -> tuple[float | None, bool]:
  """The grid rate with the lowest tuning loss for ``seed``.

  Returns:
    ``(lr, at_edge)``: None if no tuning run finished with a finite loss;
    ``at_edge`` when the rate is the smallest or largest of the grid (the
    grid may not bracket the optimum).
  """
  scored = [(r['tuning_loss'], r['lr']) for r in runs
            if r['seed'] == seed and r['lr'] in grid
            and r['tuning_loss'] is not None]
  if not scored:
    return None, False
  lr = min(scored)[1]
  return lr, lr in (min(grid), max(grid))


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per method (table order): chosen rate, losses, paired diffs."""
  config = results['config']
  seeds = config['seeds']
  rows = []
  finals_by_method = {}
  for spec, info in results['methods'].items():
    runs = _runs(results, spec)
    lr, edge = choose_lr(runs, info['grid'], seeds[0])
    finals = {r['seed']: r['val_loss'] for r in runs
              if r['lr'] == lr and r['seed'] in seeds}
    finals_by_method[spec] = finals
    done = [v for v in finals.values() if v is not None]
    mean, std = toolkit.results.mean_std(done)
    rows.append({
        'method': spec, 'lr': lr, 'edge': edge, 'val_mean': mean,
        'val_std': std, 'seeds': len(done), 'diverged': len(finals) - len(done),
        'state_bytes': info['state_bytes'],
        'tuning': sorted((r['lr'], r['tuning_loss']) for r in runs
                         if r['seed'] == seeds[0]),
    })
  base = finals_by_method.get(BASELINE, {})
  for row in rows:
    finals = finals_by_method[row['method']]
    diffs = [100 * (finals[s] - base[s]) / base[s] for s in finals
             if finals[s] is not None and base.get(s) is not None]
    row['diff_mean'], row['diff_std'] = toolkit.results.mean_std(diffs)
    row['paired'] = len(diffs)
  return rows


def _lr(row: Mapping[str, Any]) -> str | None:
  if row['lr'] is None:
    return None
  return f'{row["lr"]:.2g}' + (' (edge)' if row['edge'] else '')


def _diff(row: Mapping[str, Any]) -> str | None:
  """``'+1.23 ± 0.45'``: the paired difference's mean (signed) and std."""
  mean, std = row['diff_mean'], row['diff_std']
  if mean is None:
    return None
  return f'{mean:+.2f}' + ('' if std is None else f' ± {std:.2f}')


def main_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Method, rate, validation loss, paired difference to AdamW, state."""
  return toolkit.results.markdown_table(rows, [
      Column('method', 'method'),
      Column(_lr, 'lr'),
      Column(lambda r: toolkit.results.pm(r['val_mean'], r['val_std'], '.4f'),
             'val loss (nats/byte)'),
      Column(_diff, 'vs adamw, paired %'),
      Column(lambda r: f'{r["seeds"]}' + (f' ({r["diverged"]} diverged)'
                                          if r['diverged'] else ''), 'seeds'),
      Column('state_bytes', 'optimizer state', toolkit.results.fmt_bytes),
  ])


def tuning_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Tuning-split loss of every grid rate (first seed); * marks the choice."""

  def cell(row):
    return ', '.join(
        f'{lr:.2g}: ' + ('diverged' if loss is None else f'{loss:.4f}')
        + ('*' if lr == row['lr'] else '')
        for lr, loss in row['tuning'])

  return toolkit.results.markdown_table(rows, [
      Column('method', 'method'), Column(cell, 'tuning loss by lr')])


def curves(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
           ) -> dict[str, tuple[list[int], list[float]]]:
  """Mean validation curve over the seeds at each method's chosen rate."""
  out = {}
  for row in rows:
    runs = [r for r in _runs(results, row['method'])
            if r['lr'] == row['lr'] and r['seed'] in results['config']['seeds']]
    if not runs:
      continue
    steps = runs[0]['curve']['step']
    columns = zip(*(r['curve']['val_loss'] for r in runs))
    means = [toolkit.results.mean_std([v for v in c if v is not None])[0]
             for c in columns]
    out[row['method']] = (steps, [float('nan') if m is None else m
                                  for m in means])
  return out


def figure_rows(results: Mapping[str, Any],
                rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The rows the figure draws: ``results['figure_methods']`` in that
  order, or every row when the results name none.

  Raises:
    ValueError: naming a listed method the results do not hold.
  """
  chosen = results.get('figure_methods')
  if not chosen:
    return list(rows)
  by_method = {row['method']: row for row in rows}
  missing = [m for m in chosen if m not in by_method]
  if missing:
    raise ValueError(f'figure_methods names {missing}, which the results do '
                     f'not hold; they hold {sorted(by_method)}.')
  return [by_method[m] for m in chosen]


def figure(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
           path: str | Path) -> Path:
  """Validation loss against steps: the whole run, and its second half
  (the methods of :func:`figure_rows`)."""
  series = curves(results, figure_rows(results, rows))
  windows = results['data']['windows']['curve']
  ylabel = f'validation loss, nats/byte ({windows} windows)'
  title = ('Shakespeare: validation loss, mean over seeds at each '
           "method's rate")
  with toolkit.figures.panels(path, 2, figsize=(12, 4.5),
                              title=title) as (left, right):
    toolkit.figures.draw_lines(left, series, xlabel='step', ylabel=ylabel)
    half = {k: (xs[len(xs) // 2:], ys[len(ys) // 2:])
            for k, (xs, ys) in series.items()}
    toolkit.figures.draw_lines(right, half, xlabel='step', ylabel=ylabel,
                               title='second half', marker='o')
  return Path(path)


def markdown(results: Mapping[str, Any]) -> str:
  """The results page: setup, the main table, the tuning table."""
  rows = summarize(results)
  data, model, config = results['data'], results['model'], results['config']
  tokens = config['steps'] * config['batch_size'] * config['seq_len']
  lines = [
      '# Shakespeare: byte-level language model, validation loss at a fixed '
      'budget', '',
      f'Command: `{results["command"]}`', '',
      f'Device: {toolkit.environment.device_line(results["device"])}; '
      + ', '.join(f'{k} {v}' for k, v in results['versions'].items()), '',
      'Model: LLaMA-style decoder, '
      f'{toolkit.results.fmt_count(model["params"])}'
      f' parameters (dim {config["dim"]}, {config["n_layers"]} layers, '
      f'{config["n_heads"]} heads, ffn {config["ffn_dim"]}), '
      f'{config["compute_dtype"]} compute; {config["steps"]} steps of '
      f'{config["batch_size"]} x {config["seq_len"]} bytes '
      f'({toolkit.results.fmt_count(tokens)} bytes per run), '
      f'{config["warmup_steps"]} warm-up steps, {config["schedule"]} decay to '
      f'{config["min_lr_ratio"]:g}x, clip {config["grad_clip"]:g}.', '',
      f'Data: `{data["requirement"]}` ({data["edition"]} edition), '
      f'{data["bytes"]["train"]:,} training bytes; validation: '
      f'{", ".join(data["splits"]["validation"])} '
      f'({data["bytes"]["validation"]:,} bytes); tuning: '
      f'{", ".join(data["splits"]["tuning"])} '
      f'({data["bytes"]["tuning"]:,} bytes).', '',
      f'Protocol ({config["protocol"]}): each method\'s learning rate is '
      f'the grid point (below) with the lowest loss on the tuning works for '
      f'seed {config["seeds"][0]}; final numbers: that rate with seeds '
      f'{list(config["seeds"])}, loss on every validation window; paired '
      f'difference to adamw by seed (same initialisation and batches).', '',
      main_table(rows), '', '## Learning-rate tuning', '', tuning_table(rows),
      '', 'Curves: `curves.png` (mean over seeds at the chosen rate).', '']
  return '\n'.join(lines)


def write(results: Mapping[str, Any], out: str | Path, *,
          figure_too: bool = True) -> None:
  """Writes ``results.json``, ``results.md`` and ``curves.png`` in ``out``."""
  out = Path(out)
  toolkit.results.write_json(results, out / 'results.json')
  (out / 'results.md').write_text(markdown(results))
  if figure_too:
    figure(results, summarize(results), out / 'curves.png')


def _main(argv: Sequence[str]) -> None:
  """``FOLDER [--figure-methods M ...]``: re-renders a committed result."""
  if not argv or argv[0].startswith('-') or (
      len(argv) > 1 and argv[1] != '--figure-methods'):
    raise SystemExit('usage: python -m benchmarks.shakespeare.report FOLDER '
                     '[--figure-methods METHOD ...]')
  folder = Path(argv[0])
  results_ = dict(toolkit.results.read_json(folder / 'results.json'))
  if len(argv) > 1:
    results_['figure_methods'] = list(argv[2:])
  write(results_, folder)
  print(main_table(summarize(results_)))


if __name__ == '__main__':
  _main(sys.argv[1:])
