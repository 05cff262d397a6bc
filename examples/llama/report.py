"""Markdown tables of the LLaMA example's records (``benchmarks.toolkit``).

One table per program: :func:`comparison_table` for ``main.py``,
:func:`scaling_table` for ``scaling.py`` and :func:`fit_table` for
``fit_search.py``, plus :func:`setup_line`, the settings they share.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import toolkit
from benchmarks.toolkit.results import Column

_bytes = toolkit.results.fmt_bytes
_ms = lambda seconds: f'{seconds * 1e3:.1f}'

Record = Mapping[str, Any]

# Columns several tables show.
_STATUS = Column('status', 'status')
_TOKENS_PER_S = Column('tokens_per_s', 'tokens/s', ',.0f')
_STEP_MS = Column('step_time_s', 'step ms', _ms)
_UPDATE_MS = Column('update_time_s', 'update alone ms', _ms)
_ESTIMATE = Column('estimate', 'XLA estimate', _bytes)


def _ok(r: Record) -> bool:
  return r.get('status') == 'ok'


def _estimate(r: Record) -> int | None:
  return (r.get('compiled_memory') or {}).get('estimated_peak_bytes')


def _common(r: Record) -> dict[str, Any]:
  """Display values every table shares."""
  status = r.get('status', '?')
  if status not in ('ok', 'estimated'):
    error = str(r.get('error') or '').replace('|', '/').replace('\n', ' ')
    status = f'{status}: {error[:80]}'
  ok = _ok(r)
  return {
      **r,
      'name': r['optimizer'] + (f' (r={r["rank"]})' if r.get('rank') else ''),
      'mode': r.get('settings', {}).get('sharding', 'none'),
      'status': status,
      'tokens_per_s': r.get('tokens_per_s') if ok else None,
      'step_time_s': r.get('step_time_s') if ok else None,
      'estimate': _estimate(r),
  }


def comparison_table(results: Sequence[Record]) -> str:
  """Table of ``measure.compare`` records, tokens/s relative to adamw's."""
  rows = []
  for r in results:
    row = _common(r)
    if row['mode'] != 'none':
      row['name'] += f' {row["mode"]} x{r["devices"]}'
    peak = _bytes(r.get('peak_bytes')) if r.get('peak_bytes') else None
    upper_bound = peak and r.get('peak_is_upper_bound')
    row['peak'] = f'<= {peak}' if upper_bound else peak
    rows.append(row)
  toolkit.results.add_ratios(
      rows, value='tokens_per_s', group_by=(),
      baseline=lambda r: r['optimizer'] == 'adamw' and _ok(r))
  return toolkit.results.markdown_table(rows, [
      Column('name', 'optimizer'), _STATUS, _TOKENS_PER_S,
      Column('ratio', 'ratio vs adamw', '.3f'), _STEP_MS, _UPDATE_MS,
      Column('peak', 'peak'), _ESTIMATE,
      Column('opt_state_bytes', 'optimizer state', _bytes),
      Column('param_count', 'params', toolkit.results.fmt_count),
      Column('final_loss', 'final loss', '.3f'),
  ])


def tokens_per_s_ratio(results: Sequence[Record]) -> float | None:
  """Median mlorc_adamw tokens/s over median adamw tokens/s (or None)."""
  per: dict[str, list[float]] = {}
  for r in results:
    if _ok(r):
      per.setdefault(r['optimizer'], []).append(r['tokens_per_s'])
  if 'adamw' not in per or 'mlorc_adamw' not in per:
    return None
  return statistics.median(per['mlorc_adamw']) / statistics.median(per['adamw'])


def setup_line(results: Sequence[Record]) -> str:
  """One line with the settings shared by ``results`` (from the first)."""
  if not results or 'settings' not in results[0]:
    return ''
  r, s = results[0], results[0]['settings']
  c = r['config']
  device = (toolkit.environment.device_line(r) + '; '
            if 'platform' in r else '')
  return (
      f'{device}{toolkit.results.fmt_count(r["param_count"])} params, dim '
      f'{c["dim"]}, {c["n_layers"]} layers; batch {s["batch"]} x seq '
      f'{s["seq_len"]}; params {c["param_dtype"]}, compute '
      f'{c["compute_dtype"]}, remat {c["remat"]}, scan {c["scan_layers"]}, '
      f'attention {c["attention"]}; moments {s["moment_dtype"]}; data '
      f'{s["data"]}; {s["steps"]} steps ({s["warmup"]} warm-up)')


def scaling_table(results: Sequence[Record]) -> str:
  """Table of ``scaling.py`` records (after ``scaling.summarise``)."""
  rows = []
  for r in results:
    row = _common(r)
    peaks = r.get('peak_bytes_per_device')
    row['peaks'] = (' / '.join(f'{p / 2**30:.1f}' for p in peaks)
                    if _ok(r) and peaks else None)
    row['state'] = r.get('opt_state_bytes_per_device',
                         r.get('opt_state_bytes'))
    coll = r.get('update_collectives')
    if coll is not None:
      largest = coll['largest'][0][1] if coll['largest'] else None
      row['transfers'] = (f'{coll["count"]}'
                          + (f' (largest {largest})' if largest else '')
                          + f', {coll["dense_moment_transfers"]} dense')
    rows.append(row)
  return toolkit.results.markdown_table(rows, [
      Column('optimizer', 'optimizer'), Column('mode', 'mode'),
      Column('devices', 'devices'), _STATUS, _TOKENS_PER_S,
      Column('speedup', 'speed-up vs 1 device', '.2f'),
      Column('ratio_vs_adamw', 'ratio vs adamw', '.3f'), _STEP_MS,
      _UPDATE_MS, Column('peaks', 'peak GiB per device'),
      Column('state', 'optimizer state per device', _bytes),
      Column('transfers', 'update transfers, dense-moment-sized'),
      Column('max_loss_diff', 'max abs loss diff vs 1 device', '.2e'),
  ])


def fit_table(results: Sequence[Record]) -> str:
  """Table of ``fit_search.py`` attempts."""
  rows = []
  for r in results:
    row = _common(r)
    row['model'] = r['settings']['model']
    row['layers'] = r['config']['n_layers']
    row['needed'] = 2 * r['param_bytes'] + r['opt_state_bytes'] if (
        'param_bytes' in r) else None
    rows.append(row)
  return toolkit.results.markdown_table(rows, [
      Column('name', 'optimizer'), Column('model', 'model'),
      Column('param_count', 'params', toolkit.results.fmt_count),
      Column('layers', 'layers'), _STATUS,
      Column('peak_bytes', 'peak', _bytes), _ESTIMATE,
      Column('needed', 'params+grads+state', _bytes),
      Column('opt_state_bytes', 'optimizer state', _bytes),
      Column('bytes_limit', 'limit', _bytes),
      Column('step_time_s', 'step s', '.2f'),
  ])
