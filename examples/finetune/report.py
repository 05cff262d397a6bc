"""Renders the harness's ``results.json`` as a markdown table and a figure.

``python -m examples.finetune.report RESULTS.json [--out DIR]`` re-renders
``results.md`` and ``results.png`` from a saved (e.g. committed) JSON file, so
the outputs can be regenerated without training; with ``--merge PART...`` it
first assembles ``RESULTS.json`` from runs of separate processes
(:func:`merge`). Only the ``runs`` list (and
optionally ``config``/``device``) is needed: the per-method summary is
recomputed from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024**2


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  arr = np.asarray(values, dtype=np.float64)
  return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per-method aggregates over seeds, in the order methods first appear.

  Args:
    runs: the ``runs`` of a results dict (one entry per method and seed).

  Returns:
    ``{method: {...}}`` with ``label``, ``lr``, ``seeds``, ``n``, mean and
    std of ``accuracy``, ``macro_f1``, ``final_train_loss``, ``steps_per_s``
    and ``wall_time_s``, plus ``opt_state_bytes``, ``trainable_params``,
    ``total_params``, ``xla_step_bytes``, ``device_peak_bytes`` (max),
    ``steps`` and the seed-averaged ``loss_curve``.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in runs:
    groups.setdefault(r['method'], []).append(r)
  out = {}
  for method, rs in groups.items():
    entry: dict[str, Any] = {
        'label': rs[0].get('label', method),
        'lr': sorted({r['lr'] for r in rs}),
        'seeds': [r['seed'] for r in rs],
        'n': len(rs),
    }
    if len(entry['lr']) == 1:
      entry['lr'] = entry['lr'][0]
    for key in (
        'accuracy',
        'macro_f1',
        'final_train_loss',
        'steps_per_s',
        'wall_time_s',
    ):
      values = [r[key] for r in rs if r.get(key) is not None]
      mean, std = _mean_std(values) if values else (None, None)
      entry[f'{key}_mean'], entry[f'{key}_std'] = mean, std
    for key in ('opt_state_bytes', 'trainable_params', 'total_params', 'steps'):
      entry[key] = max(int(r[key]) for r in rs) if key in rs[0] else None
    xla = [
        (r.get('xla_step_memory') or {}).get('total')
        for r in rs
        if (r.get('xla_step_memory') or {}).get('total') is not None
    ]
    entry['xla_step_bytes'] = max(xla) if xla else None
    peaks = [
        r['device_peak_bytes']
        for r in rs
        if r.get('device_peak_bytes') is not None
    ]
    entry['device_peak_bytes'] = max(peaks) if peaks else None
    curves = [r['loss_curve'] for r in rs if r.get('loss_curve')]
    if curves:
      n = min(len(c) for c in curves)
      entry['loss_curve'] = np.mean(
          [np.asarray(c[:n], dtype=np.float64) for c in curves], axis=0
      ).tolist()
    out[method] = entry
  return out


def _fmt_bytes(n: float | None) -> str:
  if n is None:
    return '—'
  if n >= 1024**3:
    return f'{n / 1024**3:.2f} GiB'
  if n >= MIB:
    return f'{n / MIB:.1f} MiB'
  return f'{n / 1024:.1f} KiB'


def _fmt_count(n: int | None) -> str:
  if n is None:
    return '—'
  if n >= 1e6:
    return f'{n / 1e6:.2f}M'
  if n >= 1e3:
    return f'{n / 1e3:.1f}k'
  return str(n)


def _pm(mean: float | None, std: float | None, scale: float = 1.0) -> str:
  if mean is None:
    return '—'
  if std is None:
    return f'{mean * scale:.2f}'
  return f'{mean * scale:.2f} ± {std * scale:.2f}'


def _fmt_lr(lr: Any) -> str:
  if isinstance(lr, (list, tuple)):
    return ', '.join(_fmt_lr(x) for x in lr)
  return f'{lr:.1e}'


def markdown_table(results: Mapping[str, Any]) -> str:
  """The per-method markdown table of a results dict.

  Columns: method, learning rate, test accuracy (%) and macro-F1 (%) as mean
  ± std over seeds, final train loss (mean of the last steps), optimizer state
  (and % of AdamW's, if AdamW ran), trainable parameters, XLA's memory
  estimate of one compiled train step, the device's peak memory (process-wide
  peak so far; — where the backend reports none), steps/s and wall time per
  run (compilation and evaluation included).
  """
  summary = results.get('summary') or summarize(results['runs'])
  base = summary.get('adamw', {}).get('opt_state_bytes')
  header = (
      '| method | lr | test acc. (%) | macro-F1 (%) | final train loss |'
      ' optimizer state | % of AdamW state | trainable params |'
      ' step memory (XLA) | device peak | steps/s | wall time / run (s) |'
  )
  rows = [header, '|' + '---|' * header.count(' | ') + '---|']
  for method, s in summary.items():
    state = s.get('opt_state_bytes')
    ratio = '—'
    if base and state is not None:
      ratio = f'{100 * state / base:.1f}%'
    rows.append(
        f'| {s["label"]} | {_fmt_lr(s["lr"])}'
        f' | {_pm(s["accuracy_mean"], s["accuracy_std"], 100)}'
        f' | {_pm(s["macro_f1_mean"], s["macro_f1_std"], 100)}'
        f' | {_pm(s["final_train_loss_mean"], s["final_train_loss_std"])}'
        f' | {_fmt_bytes(state)} | {ratio}'
        f' | {_fmt_count(s.get("trainable_params"))}'
        f' | {_fmt_bytes(s.get("xla_step_bytes"))}'
        f' | {_fmt_bytes(s.get("device_peak_bytes"))}'
        f' | {_pm(s["steps_per_s_mean"], None)}'
        f' | {_pm(s["wall_time_s_mean"], None)} |'
    )
  return '\n'.join(rows)


_NOTES = (
    'Columns: mean ± sample std over seeds. *Optimizer state*: bytes of every'
    ' optimizer-state array (MLorc: rank-r factors of the compressed matrices'
    " plus the exact dense Adam/Lion state of every other leaf; MiniLM's"
    ' 11.7M-parameter word embedding is not compressed and dominates).'
    ' *Step memory (XLA)*: argument + output - aliased + temporary bytes of'
    " the compiled train step (the compiler's estimate of one step's"
    ' footprint: params, optimizer state, gradients, activations).'
    " *Device peak*: the backend's process-wide `peak_bytes_in_use` after the"
    ' run (JAX cannot reset it, so it is cumulative over the runs of one'
    ' process; — where the backend reports none, e.g. CPU). *steps/s*: after'
    ' the first step of each run. *Wall time / run*: model build, training'
    ' (with compilation in the first run of a method; later runs reuse it) and'
    ' evaluation.',
)


def _mlorc_version(ver: Mapping[str, Any]) -> Any:
  version = ver.get('mlorc_optax')
  if version in (None, 'unknown'):
    version = ver.get('mlorc_optax_module', version)
  return version


def markdown_report(results: Mapping[str, Any]) -> str:
  """``results.md``: the table plus the setting and the chosen rates."""
  cfg = results.get('config', {})
  dev = results.get('device', {})
  ver = results.get('versions', {})
  lines = ['# MiniLM fine-tuning on drug reviews: optimizer comparison', '']
  if cfg:
    sizes = cfg.get('data_sizes', {})
    lines += [
        f'Model {cfg.get("model", "?")}, {cfg.get("dataset", "?")};'
        f' train {sizes.get("train", "?")} / test {sizes.get("test", "?")}'
        f' reviews, max_len {cfg.get("max_len")}, batch'
        f' {cfg.get("batch_size")}, seeds {cfg.get("seeds")},'
        f' {cfg.get("schedule", "")}.',
        '',
    ]
  if dev:
    lines += [
        f'Device: {dev.get("backend")} ({dev.get("device_kind")}),'
        f' {dev.get("host_cpus")} host CPUs; jax {ver.get("jax")}, flax'
        f' {ver.get("flax")}, optax {ver.get("optax")}, mlorc_optax'
        f' {_mlorc_version(ver)}.',
        '',
    ]
  lines += [markdown_table(results), '', *_NOTES, '']
  tuning = results.get('tuning') or {}
  if tuning:
    metric = cfg.get('tune_metric', 'accuracy')
    if all('fixed' in t for t in tuning.values()):
      lines += ['Learning rates:', '']
    else:
      lines += [
          f'Learning rates (tuned on validation {metric}; trials as lr:'
          ' accuracy / macro-F1 in %):',
          '',
      ]
    for method, t in tuning.items():
      if 'fixed' in t:
        lines.append(f'- {method}: {_fmt_lr(t["fixed"])} (fixed, not tuned)')
      else:
        trials = ', '.join(
            f'{_fmt_lr(x["lr"])}: {100 * x["accuracy"]:.1f} /'
            f' {100 * x["macro_f1"]:.1f}'
            for x in t['trials']
        )
        chosen = _fmt_lr(t['chosen']) if 'chosen' in t else '(unfinished)'
        lines.append(f'- {method}: chose {chosen} ({trials})')
    lines.append('')
  return '\n'.join(lines)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(y) < window:
    return y
  kernel = np.ones(window) / window
  return np.convolve(y, kernel, mode='valid')


def plot(results: Mapping[str, Any], path: str | Path) -> Path:
  """Writes the two-panel figure: loss curves; accuracy vs optimizer state.

  Left: training loss per step (mean over seeds, moving average over ~7% of
  the steps). Right: test accuracy (mean ± std over seeds) against optimizer
  state size (MiB) on a log axis.
  """
  import matplotlib  # Example-only dependency.

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  summary = results.get('summary') or summarize(results['runs'])
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  markers = ('o', 's', 'D', '^', 'v', 'P', 'X', '*', 'h', '<', '>')
  for i, (method, s) in enumerate(summary.items()):
    color = colors[i % len(colors)]
    curve = np.asarray(s.get('loss_curve') or [], dtype=np.float64)
    if curve.size:
      window = max(1, len(curve) // 15)
      y = _smooth(curve, window)
      x = np.arange(len(y)) + (window - 1) / 2 + 1
      ax_loss.plot(x, y, label=s['label'], color=color)
    state = s.get('opt_state_bytes')
    if state and s.get('accuracy_mean') is not None:
      ax_acc.errorbar(
          state / MIB,
          100 * s['accuracy_mean'],
          yerr=None if s['accuracy_std'] is None else 100 * s['accuracy_std'],
          fmt=markers[i % len(markers)],
          markersize=7,
          capsize=3,
          color=color,
          label=s['label'],
      )
  ax_loss.set_xlabel('step')
  ax_loss.set_ylabel('training loss (mean over seeds, smoothed)')
  ax_loss.set_title('Training loss')
  ax_loss.legend(fontsize=8)
  ax_loss.grid(alpha=0.3)
  ax_acc.set_xscale('log')
  ax_acc.set_xlabel('optimizer state (MiB, log scale)')
  ax_acc.legend(fontsize=8)
  ax_acc.set_ylabel('test accuracy (%)')
  ax_acc.set_title('Accuracy vs optimizer memory')
  ax_acc.grid(alpha=0.3, which='both')
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def to_json(obj: Any) -> Any:
  """``obj`` with numpy scalars/arrays as Python values, non-finite as None."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return None if not math.isfinite(float(obj)) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return to_json(obj.tolist())
  return obj


def write_outputs(
    results: Mapping[str, Any], out_dir: str | Path, *, figure: bool = True
) -> list[Path]:
  """Writes ``results.json``, ``results.md`` and (optionally) ``results.png``.

  Returns:
    The written paths.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = [out_dir / 'results.json', out_dir / 'results.md']
  paths[0].write_text(json.dumps(to_json(results), indent=1) + '\n')
  paths[1].write_text(markdown_report(results))
  if figure:
    paths.append(plot(results, out_dir / 'results.png'))
  return paths


def merge(parts: Sequence[Path], base: Path) -> dict[str, Any]:
  """One results dict from runs of the harness in separate processes.

  Every part must come from the same settings on the same device and
  versions (one method per process, say, on a machine with a time limit per
  command); methods, tuning, chosen rates and runs are concatenated in the
  order given, and ``config.assembled_from`` lists the parts (paths relative
  to ``base``) with the methods each contributed.

  Raises:
    ValueError: parts that differ in anything but their methods, or that
      repeat a method.
  """
  loaded = [json.loads(p.read_text()) for p in parts]
  first = loaded[0]
  ignore = {'methods', 'lr_grid', 'lr', 'out'}
  settings = lambda r: {k: v for k, v in r['config'].items() if k not in ignore}
  merged = {k: v for k, v in first.items() if k not in ('summary',)}
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


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('results', type=Path,
                      help='a results.json file (written with --merge)')
  parser.add_argument(
      '--merge', type=Path, nargs='+', default=None, metavar='PART',
      help='first write RESULTS from these results of separate processes '
      '(same settings, different methods)')
  parser.add_argument(
      '--out',
      type=Path,
      default=None,
      help="output directory (default: the JSON file's directory)",
  )
  parser.add_argument(
      '--no-figure', action='store_true', help='skip results.png'
  )
  args = parser.parse_args(argv)
  if args.merge:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(
        merge(args.merge, args.results.parent), indent=1) + '\n')
  results = json.loads(args.results.read_text())
  results['summary'] = summarize(results['runs'])
  out = args.out or args.results.parent
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.md').write_text(markdown_report(results))
  written = [out / 'results.md']
  if not args.no_figure:
    written.append(plot(results, out / 'results.png'))
  print(markdown_table(results))
  print('wrote ' + ', '.join(str(p) for p in written))


if __name__ == '__main__':
  main()
