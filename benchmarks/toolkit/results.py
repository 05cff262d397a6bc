"""Result files and the markdown tables made from them.

A measuring program writes plain JSON (:func:`write_json`; numpy and JAX
values, dataclasses and paths converted by :func:`to_json`) and renders its
tables from that JSON alone (:func:`markdown_table`, over ``tabulate``), so a
committed result file renders again without rerunning anything;
:func:`write_outputs` writes both files of a command.

>>> rows = [dict(name='adamw', step_s=0.0116, state_bytes=12 * 2**30),
...         dict(name='mlorc_adamw', step_s=0.0213, state_bytes=None)]
>>> rows = add_ratios(rows, value='step_s', group_by=(),
...                   baseline=lambda r: r['name'] == 'adamw')
>>> round(rows[1]['ratio'], 3)
1.836
>>> print(markdown_table(rows, [
...     Column('name', 'optimizer'),
...     Column('step_s', 'step ms', lambda s: f'{1e3 * s:.2f}'),
...     Column('ratio', 'ratio', '.2f'),
...     Column('state_bytes', 'state', fmt_bytes)]))
| optimizer   |   step ms |   ratio | state     |
|-------------|-----------|---------|-----------|
| adamw       |     11.60 |    1.00 | 12.00 GiB |
| mlorc_adamw |     21.30 |    1.84 | -         |
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tabulate

#: What a table shows for a missing value (None or an absent key).
MISSING = '-'


# ---------------------------------------------------------------------------
# JSON.
# ---------------------------------------------------------------------------


def to_json(obj: Any) -> Any:
  """``obj`` made of JSON types only.

  Mappings (keys as strings), lists, tuples and sets (as lists), named tuples
  and dataclass instances (as dicts of their fields), numpy and JAX scalars
  and arrays (as numbers and nested lists), numpy dtypes, enums and paths (as
  strings). Non-finite floats become None (JSON has no NaN or infinity).

  Raises:
    TypeError: for any other object.
  """
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, Mapping):
    return {str(k): to_json(v) for k, v in obj.items()}
  if hasattr(obj, '_asdict'):  # a NamedTuple
    return to_json(obj._asdict())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return to_json({f.name: getattr(obj, f.name)
                    for f in dataclasses.fields(obj)})
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (set, frozenset)):
    return [to_json(v) for v in sorted(obj, key=str)]
  if isinstance(obj, (os.PathLike, np.dtype, enum.Enum)):
    return str(obj.value if isinstance(obj, enum.Enum) else
               os.fspath(obj) if isinstance(obj, os.PathLike) else obj)
  if hasattr(obj, '__array__') and hasattr(obj, 'shape'):  # numpy, JAX
    return to_json(np.asarray(obj).tolist())
  raise TypeError(f'to_json cannot convert {type(obj).__name__}: {obj!r:.80}')


def write_json(obj: Any, path: str | os.PathLike) -> Path:
  """Writes :func:`to_json` of ``obj`` to ``path`` (indented, atomically).

  Creates the parent folders. The file is replaced in one step, so a
  program that rewrites its results after every configuration never leaves
  a truncated file when it is killed.

  Returns:
    The path written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(to_json(obj), indent=1) + '\n'
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def write_outputs(obj: Any, table: str, *, header: str,
                  json_path: str | os.PathLike | None = None,
                  table_path: str | os.PathLike | None = None) -> None:
  """A command's two result files, each where its path is given.

  ``obj`` goes to ``json_path`` (:func:`write_json`); ``header`` (one line:
  the device and the setting), a blank line and the markdown ``table`` go
  to ``table_path``.
  """
  if json_path:
    write_json(obj, json_path)
  if table_path:
    path = Path(table_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{header}\n\n{table}\n')


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in ``path``."""
  with open(path) as f:
    return json.load(f)


def append_json_lines(rows: Iterable[Any], path: str | os.PathLike) -> Path:
  """Appends each row as one JSON line (:func:`to_json`) to ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    for row in rows:
      f.write(json.dumps(to_json(row)) + '\n')
  return path


def read_json_lines(path: str | os.PathLike) -> list[Any]:
  """The JSON values of the non-empty lines of ``path``."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


class Column(NamedTuple):
  """One column of :func:`markdown_table`.

  Attributes:
    key: the row's key, or a function of the whole row (for cells made of
      several fields).
    header: the column's title.
    fmt: how a present value is written: a format spec (``'.2f'``), a
      function of the value returning the cell, or None (``str``). Missing
      values (None, an absent key) are written :data:`MISSING`.
  """

  key: str | Callable[[Mapping[str, Any]], Any]
  header: str
  fmt: str | Callable[[Any], str] | None = None


def cell(row: Mapping[str, Any], column: Column) -> str:
  """The text of ``column`` in ``row``."""
  value = column.key(row) if callable(column.key) else row.get(column.key)
  if value is None:
    return MISSING
  if column.fmt is None:
    return str(value)
  if callable(column.fmt):
    return column.fmt(value)
  return format(value, column.fmt)


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[Column]) -> str:
  """A GitHub markdown table of ``rows``, one line per row.

  Args:
    rows: the results (mappings).
    columns: what to show, in order (:class:`Column`).

  Returns:
    The table (``tabulate``'s ``github`` format), without a final newline.
  """
  body = [[cell(row, c) for c in columns] for row in rows]
  return tabulate.tabulate(body, headers=[c.header for c in columns],
                           tablefmt='github', disable_numparse=True,
                           colalign=_alignment(body, len(columns)))


def _alignment(body: Sequence[Sequence[str]], n: int) -> list[str]:
  """Numbers (and missing values) to the right, text to the left."""

  def numeric(text: str) -> bool:
    try:
      float(text.replace(',', '').rstrip('x%'))
    except ValueError:
      return text == MISSING
    return True

  return ['right' if body and all(numeric(r[i]) for r in body) else 'left'
          for i in range(n)]


# ---------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
  """Bytes with a binary unit: ``'1.23 GiB'``, ``'22.5 MiB'``, ``'512 B'``."""
  if n is None:
    return MISSING
  for unit, size, digits in (('GiB', 2**30, 2), ('MiB', 2**20, 1),
                             ('KiB', 2**10, 1)):
    if abs(n) >= size:
      return f'{n / size:.{digits}f} {unit}'
  return f'{int(n)} B'


def fmt_gib(n: float | None, digits: int = 2) -> str:
  """Bytes as a number of GiB without the unit (for a ``... GiB`` column)."""
  return MISSING if n is None else f'{n / 2**30:.{digits}f}'


def fmt_count(n: float | None) -> str:
  """A count with three significant digits: ``'22.7M'``, ``'1.62B'``."""
  if n is None:
    return MISSING
  for suffix, size in (('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(n) >= size:
      v = n / size
      digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
      return f'{v:,.{digits}f}{suffix}'
  return f'{n:g}'


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation of ``values``.

  Returns:
    ``(mean, std)``; ``std`` is None for a single value, both are None for
    no values.
  """
  arr = np.asarray(values, dtype=np.float64)
  if not arr.size:
    return None, None
  return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def pm(mean: float | None, std: float | None,
       fmt: str | Callable[[float], str] = '.2f', *,
       scale: float = 1.0) -> str:
  """``'mean ± std'`` (or ``'mean'`` without a std), both times ``scale``.

  Args:
    mean: the mean; None gives :data:`MISSING`.
    std: the standard deviation, or None.
    fmt: a format spec or a function of a number.
    scale: multiplies both (100 for a percentage of a fraction).
  """
  if mean is None:
    return MISSING
  write = fmt if callable(fmt) else (lambda x: format(x, fmt))
  text = write(mean * scale)
  return text if std is None else f'{text} ± {write(std * scale)}'


def add_ratios(rows: Sequence[dict[str, Any]], *, value: str,
               group_by: Sequence[str],
               baseline: Callable[[Mapping[str, Any]], bool],
               key: str = 'ratio') -> Sequence[dict[str, Any]]:
  """Sets ``row[key] = row[value] / baseline's value`` in every row.

  The baseline of a row is the first row of its group (equal values of
  ``group_by``; ``()``: one group) for which ``baseline(row)`` holds and
  ``value`` is present. Rows without a value, or in a group without a
  baseline, get None.

  Args:
    rows: the results, changed in place.
    value: the key of the measured number (e.g. ``'step_s'``).
    group_by: the keys whose values define a group (e.g. the case and the
      dtype).
    baseline: picks the baseline row (e.g. the ``optax.adamw`` run).
    key: where the ratio goes.

  Returns:
    ``rows``.
  """

  def group(row):
    return tuple(row.get(g) for g in group_by)

  base: dict[tuple[Any, ...], float] = {}
  for row in rows:
    if row.get(value) is not None and baseline(row):
      base.setdefault(group(row), row[value])
  for row in rows:
    b, v = base.get(group(row)), row.get(value)
    row[key] = v / b if v is not None and b else None
  return rows
