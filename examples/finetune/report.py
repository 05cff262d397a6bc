"""Renders the harness's ``results.json``: tables, paired differences, figure.

``python -m examples.finetune.report RESULTS.json [--out DIR]`` re-renders
``results.md`` and ``results.png`` from a saved (e.g. committed) JSON file;
``--merge PART.json ...`` first assembles ``RESULTS.json`` from runs of the
harness in separate processes (one method each, say).

Seeds are paired: every method's seed ``s`` trains on the same data order
and head initialisation as AdamW's seed ``s``, so the spread of the
per-seed differences (:func:`paired_differences`) is what tells two methods
apart, not the spread of each method's own scores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from benchmarks.toolkit import environment
from benchmarks.toolkit import figures
from benchmarks.toolkit import results as results_lib
from benchmarks.toolkit.results import Column

BASELINE = 'adamw'
"""The method the others are compared with, seed by seed."""

_MEANS = ('accuracy', 'macro_f1', 'final_train_loss', 'steps_per_s',
          'wall_time_s')
_PAIRED = ('accuracy', 'macro_f1', 'cross_entropy')


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per-method aggregates over seeds, in the order methods first appear.

  Args:
    runs: the ``runs`` of a results dict (one entry per method and seed).

  Returns:
    ``{method: {...}}``: ``label``, ``lr``, ``seeds``, ``n``; ``*_mean`` and
    ``*_std`` (sample) of the metrics, final train loss, steps/s and wall
    time; the largest state, parameter counts, steps, XLA step bytes and
    device peak over the seeds; the seed-averaged ``loss_curve``.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in runs:
    groups.setdefault(r['method'], []).append(r)
  out = {}
  for method, rs in groups.items():
    lrs = sorted({r['lr'] for r in rs})
    entry: dict[str, Any] = {
        'label': rs[0].get('label', method),
        'lr': lrs[0] if len(lrs) == 1 else lrs,
        'seeds': [r['seed'] for r in rs],
        'n': len(rs),
    }
    keys = _MEANS + (('cross_entropy',) if 'cross_entropy' in rs[0] else ())
    for key in keys:
      values = [r[key] for r in rs if r.get(key) is not None]
      entry[f'{key}_mean'], entry[f'{key}_std'] = results_lib.mean_std(values)
    for key in ('opt_state_bytes', 'trainable_params', 'total_params', 'steps'):
      entry[key] = max(int(r[key]) for r in rs) if key in rs[0] else None
    xla = [_xla_bytes(r) for r in rs if _xla_bytes(r) is not None]
    entry['xla_step_bytes'] = max(xla) if xla else None
    peaks = [r['device_peak_bytes'] for r in rs
             if r.get('device_peak_bytes') is not None]
    entry['device_peak_bytes'] = max(peaks) if peaks else None
    curves = [r['loss_curve'] for r in rs if r.get('loss_curve')]
    if curves:
      n = min(len(c) for c in curves)
      entry['loss_curve'] = np.mean(
          [np.asarray(c[:n], dtype=np.float64) for c in curves],
          axis=0).tolist()
    if rs[0].get('state_split'):
      entry['state_split'] = rs[0]['state_split']
    out[method] = entry
  return out


def _xla_bytes(run: Mapping[str, Any]) -> int | None:
  """The step's estimated footprint (``total`` in files before the toolkit)."""
  stats = run.get('xla_step_memory') or {}
  return stats.get('estimated_peak_bytes', stats.get('total'))


def paired_differences(
    runs: Sequence[Mapping[str, Any]], baseline: str = BASELINE
) -> dict[str, dict[str, Any]]:
  """Each method minus ``baseline`` on the same seed, per metric.

  Returns:
    ``{method: {metric: {'mean', 'std', 'n', 'by_seed'}}}`` over the seeds
    both ran, for accuracy, macro-F1 and cross-entropy where both have them;
    ``std``: sample std of the differences (None for one seed).
  """
  base = {r['seed']: r for r in runs if r['method'] == baseline}
  out: dict[str, dict[str, Any]] = {}
  for r in runs:
    other = base.get(r['seed'])
    if r['method'] == baseline or other is None:
      continue
    for metric in _PAIRED:
      if r.get(metric) is None or other.get(metric) is None:
        continue
      cell = out.setdefault(r['method'], {}).setdefault(metric, {'by_seed': {}})
      cell['by_seed'][r['seed']] = r[metric] - other[metric]
  for cells in out.values():
    for cell in cells.values():
      diffs = list(cell['by_seed'].values())
      cell['mean'], cell['std'] = results_lib.mean_std(diffs)
      cell['n'] = len(diffs)
  return out


def _fmt_lr(lr: Any) -> str:
  if isinstance(lr, (list, tuple)):
    return ', '.join(_fmt_lr(x) for x in lr)
  return f'{lr:.1e}'


def _mean_pm(key: str, scale: float = 1.0, fmt: str = '.2f'):
  return lambda s: results_lib.pm(s.get(f'{key}_mean'), s.get(f'{key}_std'),
                                  fmt, scale=scale)


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  summary = results.get('summary') or summarize(results['runs'])
  base = summary.get(BASELINE, {}).get('opt_state_bytes')
  rows = []
  for s in summary.values():
    state, row = s.get('opt_state_bytes'), dict(s)
    if base and state is not None:
      row['vs_adamw'] = (f'{100 * state / base:.1f}%'
                         f' ({results_lib.fmt_bytes(state - base)})')
    rows.append(row)
  return rows


def markdown_table(results: Mapping[str, Any]) -> str:
  """The per-method table of a results dict (mean ± std over seeds)."""
  columns = [
      Column('label', 'method'),
      Column('lr', 'lr', _fmt_lr),
      Column(_mean_pm('accuracy', 100), 'test acc. (%)'),
      Column(_mean_pm('macro_f1', 100), 'macro-F1 (%)'),
      Column(_mean_pm('cross_entropy', fmt='.3f'), 'test CE (nats)'),
      Column(_mean_pm('final_train_loss'), 'final train loss'),
      Column('opt_state_bytes', 'optimizer state', results_lib.fmt_bytes),
      Column('vs_adamw', 'vs AdamW state'),
      Column('trainable_params', 'trainable params', results_lib.fmt_count),
      Column('xla_step_bytes', 'step memory (XLA)', results_lib.fmt_bytes),
      Column('device_peak_bytes', 'device peak', results_lib.fmt_bytes),
      Column('steps_per_s_mean', 'steps/s', '.2f'),
      Column('wall_time_s_mean', 'wall time / run (s)', '.1f'),
  ]
  rows = _rows(results)
  if not any(row.get('cross_entropy_mean') is not None for row in rows):
    columns.pop(4)  # Results from before the harness measured it.
  return results_lib.markdown_table(rows, columns)


def paired_table(results: Mapping[str, Any]) -> str | None:
  """Differences to AdamW on the same seed (mean ± std), or None."""
  paired = paired_differences(results['runs'])
  if not paired:
    return None
  labels = {r['method']: r.get('label', r['method']) for r in results['runs']}
  rows = [{'label': labels[m], **cells} for m, cells in paired.items()]

  def diff(metric: str, header: str, scale: float, digits: int) -> Column:
    def text(row):
      c = row.get(metric)
      if c is None:
        return None
      out = f'{c["mean"] * scale:+.{digits}f}'
      if c['std'] is not None:
        out += f' ± {c["std"] * scale:.{digits}f}'
      return f'{out} (n={c["n"]})'
    return Column(text, header)

  columns = [Column('label', 'method − AdamW, same seed'),
             diff('accuracy', 'test acc. (points)', 100, 2),
             diff('macro_f1', 'macro-F1 (points)', 100, 2),
             diff('cross_entropy', 'test CE (nats)', 1, 3)]
  if not any('cross_entropy' in row for row in rows):
    columns.pop()
  return results_lib.markdown_table(rows, columns)


def state_notes(results: Mapping[str, Any]) -> list[str]:
  """Where MLorc's optimizer state goes, one sentence per MLorc method."""
  notes = []
  for s in (results.get('summary') or summarize(results['runs'])).values():
    split = s.get('state_split')
    if not split:
      continue
    largest = split['largest_dense']
    notes.append(
        f'{s["label"]}: {split["compressed_leaves"]} compressed matrices keep'
        f' {results_lib.fmt_bytes(split["factor_bytes"])} of factors in place'
        f' of {results_lib.fmt_bytes(split["replaced_bytes"])} of dense'
        f' moments; the {split["dense_leaves"]} other leaves keep'
        f' {results_lib.fmt_bytes(split["dense_bytes"])} of dense moments,'
        f' {results_lib.fmt_bytes(largest[1])} of them for `{largest[0]}`.')
  return notes


_NOTES = (
    'Columns: mean ± sample std over seeds. *test CE*: mean cross-entropy'
    ' (nats) of the test labels. *Optimizer state*: bytes of every'
    ' optimizer-state array (MLorc: rank-r factors of the compressed'
    ' matrices plus the exact dense state of every other leaf); *vs AdamW'
    ' state*: its share of AdamW\'s and the difference in bytes.'
    ' *Step memory (XLA)*: the compiler\'s estimate of one train step\'s'
    ' footprint (params, optimizer state, gradients, activations).'
    " *Device peak*: the backend's process-wide `peak_bytes_in_use` after the"
    ' run (cumulative over the runs of one process; - where the backend'
    ' reports none, e.g. CPU). *steps/s*: after the first step of each run.'
    ' *Wall time / run*: model build, training (with compilation in the'
    ' first run of a method) and evaluation.'
)


def markdown_report(results: Mapping[str, Any]) -> str:
  """``results.md``: setting, tables, memory notes and the chosen rates."""
  cfg, dev = results.get('config', {}), results.get('device', {})
  ver = results.get('versions', {})
  lines = ['# MiniLM fine-tuning on drug reviews: optimizer comparison', '']
  if cfg:
    sizes = cfg.get('data_sizes', {})
    lines += [
        f'Model {cfg.get("model", "?")}, {cfg.get("dataset", "?")};'
        f' train {sizes.get("train", "?")} / test {sizes.get("test", "?")}'
        f' reviews, max_len {cfg.get("max_len")}, batch'
        f' {cfg.get("batch_size")}, seeds {cfg.get("seeds")},'
        f' {cfg.get("schedule", "")}.', '']
  if dev:
    device = (environment.device_line(dev) if 'count' in dev else  # Toolkit.
              f'{dev.get("backend")} ({dev.get("device_kind")}),'
              f' {dev.get("host_cpus")} host CPUs')
    lines += [
        f'Device: {device}; jax {ver.get("jax")}, flax'
        f' {ver.get("flax")}, optax {ver.get("optax")}, mlorc_optax'
        f' {ver.get("mlorc_optax_module", ver.get("mlorc_optax"))}.', '']
  lines += [markdown_table(results), '', _NOTES, '']
  paired = paired_table(results)
  if paired:
    lines += ['Paired differences to AdamW (each method minus AdamW on the'
              ' same seed; mean ± sample std over seeds):', '', paired, '']
  notes = state_notes(results)
  if notes:
    lines += ['Where the optimizer state goes:', '']
    lines += [f'- {note}' for note in notes] + ['']
  lines += _tuning_lines(results.get('tuning') or {}, cfg)
  return '\n'.join(lines)


def _tuning_lines(tuning: Mapping[str, Any], cfg: Mapping[str, Any]
                  ) -> list[str]:
  if not tuning:
    return []
  if all('fixed' in t for t in tuning.values()):
    lines = ['Learning rates:', '']
  else:
    metric = cfg.get('tune_metric', 'accuracy')
    lines = [f'Learning rates (tuned on validation {metric}; trials as lr:'
             ' accuracy / macro-F1 in %):', '']
  for method, t in tuning.items():
    if 'fixed' in t:
      lines.append(f'- {method}: {_fmt_lr(t["fixed"])} (fixed, not tuned)')
      continue
    trials = ', '.join(
        f'{_fmt_lr(x["lr"])}: {100 * x["accuracy"]:.1f} /'
        f' {100 * x["macro_f1"]:.1f}' for x in t['trials'])
    chosen = _fmt_lr(t['chosen']) if 'chosen' in t else '(unfinished)'
    lines.append(f'- {method}: chose {chosen} ({trials})')
  return lines + ['']


def plot(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
  """Writes the figure: training loss per step (mean over seeds, moving
  average over ~7% of the steps); test accuracy (mean ± std) against the
  optimizer state (MiB, log axis)."""
  summary = results.get('summary') or summarize(results['runs'])
  curves, points = {}, {}
  for s in summary.values():
    curve = s.get('loss_curve') or []
    if curve:
      curves[s['label']] = (np.arange(1, len(curve) + 1), curve)
    if s.get('opt_state_bytes') and s.get('accuracy_mean') is not None:
      std = s['accuracy_std']
      points[s['label']] = (s['opt_state_bytes'] / 2**20,
                            100 * s['accuracy_mean'],
                            None if std is None else 100 * std)
  window = max(1, max((len(c[1]) for c in curves.values()), default=0) // 15)
  with figures.panels(path, 2, figsize=(12, 4.5)) as (left, right):
    figures.draw_lines(left, curves, xlabel='step', smooth=window,
                       ylabel='training loss (mean over seeds, smoothed)',
                       title='Training loss')
    figures.draw_points(right, points, logx=True,
                        xlabel='optimizer state (MiB, log scale)',
                        ylabel='test accuracy (%)',
                        title='Accuracy vs optimizer memory')
  return Path(path)


def write_outputs(results: Mapping[str, Any], out_dir: str | os.PathLike, *,
                  figure: bool = True) -> list[Path]:
  """Writes ``results.json``, ``results.md`` and (optionally) ``results.png``.

  Returns:
    The written paths.
  """
  out_dir = Path(out_dir)
  paths = [results_lib.write_json(results, out_dir / 'results.json'),
           out_dir / 'results.md']
  paths[1].write_text(markdown_report(results))
  if figure:
    paths.append(plot(results, out_dir / 'results.png'))
  return paths


def merge(parts: Sequence[Path], base: Path) -> dict[str, Any]:
  """One results dict from runs of the harness in separate processes.

  Every part must come from the same settings on the same device and
  versions (one method per process, say); methods, tuning, chosen rates and
  runs are concatenated in the order given, and ``config.assembled_from``
  lists the parts (paths relative to ``base``) with their methods.

  Raises:
    ValueError: parts that differ in anything but their methods, or that
      repeat a method.
  """
  loaded = [results_lib.read_json(p) for p in parts]
  first = loaded[0]
  ignore = {'methods', 'lr_grid', 'lr', 'out'}
  settings = lambda r: {k: v for k, v in r['config'].items() if k not in ignore}
  merged = {k: v for k, v in first.items() if k != 'summary'}
  merged['config'] = dict(first['config'], methods=[], lr_grid=[])
  merged['tuning'], merged['chosen_lr'], merged['runs'] = {}, {}, []
  sources = {}
  for path, r in zip(parts, loaded):
    for key in ('versions', 'device'):
      if r.get(key) != first.get(key):
        raise ValueError(f'{path}: {key} differs from {parts[0]}.')
    if settings(r) != settings(first):
      raise ValueError(f'{path}: settings differ from {parts[0]}.')
    repeated = set(r['config']['methods']) & set(merged['config']['methods'])
    if repeated:
      raise ValueError(f'{path}: methods {sorted(repeated)} appear twice.')
    merged['config']['methods'] += r['config']['methods']
    merged['config']['lr_grid'] += r['config'].get('lr_grid') or []
    merged['tuning'].update(r.get('tuning', {}))
    merged['chosen_lr'].update(r.get('chosen_lr', {}))
    merged['runs'] += r['runs']
    sources[os.path.relpath(path, base)] = ', '.join(r['config']['methods'])
  merged['config']['assembled_from'] = sources
  merged['total_wall_time_s'] = sum(r.get('total_wall_time_s') or 0.0
                                    for r in loaded)
  merged['summary'] = summarize(merged['runs'])
  return merged


@dataclasses.dataclass(frozen=True)
class Args:
  """Re-render results.md and results.png from a harness's results.json."""

  results: tyro.conf.Positional[Path]
  """a results.json file (written first with --merge)"""
  merge: tuple[Path, ...] = ()
  """write RESULTS first from these results of separate processes (same
  settings, different methods)"""
  out: Path | None = None
  """output directory (default: the JSON file's directory)"""
  figure: bool = True
  """write results.png"""


def main(argv: Sequence[str] | None = None) -> None:
  args = tyro.cli(Args, args=argv)
  if args.merge:
    results_lib.write_json(merge(args.merge, args.results.parent),
                           args.results)
  results = results_lib.read_json(args.results)
  results['summary'] = summarize(results['runs'])
  out = args.out or args.results.parent
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.md').write_text(markdown_report(results))
  written = [out / 'results.md']
  if args.figure:
    written.append(plot(results, out / 'results.png'))
  print(markdown_table(results))
  print('wrote ' + ', '.join(str(p) for p in written))


if __name__ == '__main__':
  main()
