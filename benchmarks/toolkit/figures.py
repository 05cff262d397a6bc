"""Figures of results, written to files (matplotlib, no display needed).

:func:`line_plot` and :func:`bar_plot` make a one-panel figure. For several
panels, open :func:`panels` and draw into its axes with :func:`draw_lines`,
:func:`draw_bars` and :func:`draw_points`::

  with figures.panels('out.png', 2, figsize=(12, 4.5)) as (left, right):
    figures.draw_lines(left, curves, xlabel='step', ylabel='loss', smooth=9)
    figures.draw_points(right, points, xlabel='state MiB', ylabel='acc %')

The figures are built on ``matplotlib.figure.Figure`` directly, without
pyplot: nothing is shown, no backend is switched and no figure stays open.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Resolution of the written figures.
DPI = 120


def smoothed(ys: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
  """Moving average of ``ys`` over ``window`` points.

  Returns:
    ``(offsets, means)``: each mean with the fractional index of its
    window's centre, ``len(ys) - window + 1`` of them; ``ys`` unchanged
    (with indices ``0..len-1``) when ``window <= 1`` or longer than ``ys``.
  """
  y = np.asarray(ys, dtype=np.float64)
  if window <= 1 or len(y) < window:
    return np.arange(len(y), dtype=np.float64), y
  means = np.convolve(y, np.ones(window) / window, mode='valid')
  return np.arange(len(means)) + (window - 1) / 2, means


@contextlib.contextmanager
def panels(path: str | os.PathLike, ncols: int = 1, nrows: int = 1, *,
           figsize: tuple[float, float] | None = None,
           title: str | None = None, sharex: bool = False,
           sharey: bool = False) -> Iterator[list[Any]]:
  """A figure of ``nrows x ncols`` panels, written to ``path`` on exit.

  Args:
    path: the image file (its suffix picks the format); parent folders are
      created.
    ncols: panels per row.
    nrows: rows of panels.
    figsize: inches; default ``(5.5 ncols, 4.2 nrows)``.
    title: the figure's title, above every panel.
    sharex: panels share their x axis.
    sharey: panels share their y axis.

  Yields:
    The matplotlib ``Axes`` of the panels, row by row, as a list.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=figsize or (5.5 * ncols, 4.2 * nrows))
  axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey,
                      squeeze=False)
  yield [ax for row in axes for ax in row]
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=DPI)


def _finish(ax: Any, *, xlabel: str | None, ylabel: str | None,
            title: str | None, logx: bool, logy: bool, legend: bool) -> None:
  if logx:
    ax.set_xscale('log')
  if logy:
    ax.set_yscale('log')
  if xlabel:
    ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3, which='both' if logx or logy else 'major')
  if legend and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def draw_lines(ax: Any, series: Mapping[str, tuple[Sequence[float],
                                                   Sequence[float]]], *,
               xlabel: str | None = None, ylabel: str | None = None,
               title: str | None = None, smooth: int = 0, logx: bool = False,
               logy: bool = False, marker: str | None = None,
               styles: Mapping[str, Mapping[str, Any]] | None = None,
               legend: bool = True) -> None:
  """Draws one line per series into ``ax``.

  Args:
    ax: a matplotlib ``Axes``.
    series: ``{label: (xs, ys)}``.
    xlabel: the x axis title.
    ylabel: the y axis title.
    title: the panel's title.
    smooth: moving-average window in points (0 or 1: none); each mean sits
      at its window's centre (interpolated between the ``xs``).
    logx: logarithmic x axis.
    logy: logarithmic y axis.
    marker: a matplotlib marker for every point (e.g. ``'o'``).
    styles: ``{label: matplotlib keyword arguments}`` (color, linestyle,
      ...) for some series.
    legend: show the labels.
  """
  for label, (xs, ys) in series.items():
    x = np.asarray(xs, dtype=np.float64)
    at, y = smoothed(ys, smooth)
    if len(x):
      x = np.interp(at, np.arange(len(x)), x)
    ax.plot(x, y, label=label, marker=marker, **(styles or {}).get(label, {}))
  _finish(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx,
          logy=logy, legend=legend)


def draw_bars(ax: Any, labels: Sequence[str], values: Sequence[float], *,
              ylabel: str | None = None, title: str | None = None,
              errors: Sequence[float | None] | None = None,
              logy: bool = False) -> None:
  """Draws one bar per label into ``ax`` (optional error bars)."""
  yerr = None
  if errors is not None:
    yerr = [0.0 if e is None else e for e in errors]
  ax.bar(range(len(labels)), values, yerr=yerr, capsize=3,
         color=[f'C{i % 10}' for i in range(len(labels))])
  ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right',
                fontsize=8)
  _finish(ax, xlabel=None, ylabel=ylabel, title=title, logx=False, logy=logy,
          legend=False)


def draw_points(ax: Any, points: Mapping[str, tuple[float, float,
                                                    float | None]], *,
                xlabel: str | None = None, ylabel: str | None = None,
                title: str | None = None, logx: bool = False,
                logy: bool = False) -> None:
  """Draws one labelled point per entry, with a vertical error bar.

  Args:
    ax: a matplotlib ``Axes``.
    points: ``{label: (x, y, yerr)}``; ``yerr`` None draws no bar.
    xlabel: the x axis title.
    ylabel: the y axis title.
    title: the panel's title.
    logx: logarithmic x axis.
    logy: logarithmic y axis.
  """
  markers = 'osD^vPX*h<>'
  for i, (label, (x, y, err)) in enumerate(points.items()):
    ax.errorbar(x, y, yerr=err, fmt=markers[i % len(markers)], markersize=7,
                capsize=3, color=f'C{i % 10}', label=label)
  _finish(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx,
          logy=logy, legend=True)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              path: str | os.PathLike, *, xlabel: str, ylabel: str,
              title: str | None = None, smooth: int = 0, logy: bool = False,
              logx: bool = False) -> Path:
  """A one-panel figure of :func:`draw_lines`, written to ``path``.

  Returns:
    ``path`` as a ``Path``.
  """
  with panels(path) as (ax,):
    draw_lines(ax, series, xlabel=xlabel, ylabel=ylabel, title=title,
               smooth=smooth, logx=logx, logy=logy)
  return Path(path)


def bar_plot(labels: Sequence[str], values: Sequence[float],
             path: str | os.PathLike, *, ylabel: str,
             title: str | None = None,
             errors: Sequence[float | None] | None = None) -> Path:
  """A one-panel figure of :func:`draw_bars`, written to ``path``.

  Returns:
    ``path`` as a ``Path``.
  """
  with panels(path) as (ax,):
    draw_bars(ax, labels, values, ylabel=ylabel, title=title, errors=errors)
  return Path(path)
