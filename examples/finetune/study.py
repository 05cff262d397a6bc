"""The comparison protocol: tune each method's learning rate, then run seeds.

1. Tuning (``Config.tune``): each method without a fixed rate tries every
   rate of its grid with one seed (``tune_seed``), training on the train
   split minus a stratified held-out slice (``val_fraction``) and scoring on
   that slice; the best validation ``tune_metric`` wins (:func:`choose_lr`).
   The test split is never looked at.
2. Final runs: each method with its rate and every seed, training on the
   whole train split and scoring on the test split.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from examples.finetune import config as config_lib
from examples.finetune import data as data_lib
from examples.finetune import methods as methods_lib
from examples.finetune import train as train_lib

TUNE_METRICS = typing.get_args(config_lib.TuneMetric)
"""Validation metrics that can pick a learning rate."""

_TRIAL_KEYS = ('lr', 'accuracy', 'macro_f1', 'cross_entropy',
               'final_train_loss', 'wall_time_s')


def choose_lr(trials: Sequence[Mapping[str, Any]],
              metric: str = 'accuracy') -> float:
  """The learning rate of the best trial.

  Args:
    trials: dicts with ``lr`` and the metrics of :data:`TUNE_METRICS`
      (``cross_entropy`` may be missing unless it is the ``metric``).
    metric: the highest ``'accuracy'`` (ties: macro-F1) or ``'macro_f1'``
      (ties: accuracy), or the lowest ``'cross_entropy'`` (ties: accuracy);
      remaining ties go to the smaller rate.

  Returns:
    The chosen learning rate.
  """
  if metric not in TUNE_METRICS:
    raise ValueError(f'metric must be one of {TUNE_METRICS}, got {metric!r}')
  if metric == 'cross_entropy':
    score = lambda r: (-r['cross_entropy'], r['accuracy'], -r['lr'])
  else:
    other = 'macro_f1' if metric == 'accuracy' else 'accuracy'
    score = lambda r: (r[metric], r[other], -r['lr'])
  return float(max(trials, key=score)['lr'])


def study(
    config: config_lib.Config,
    *,
    model_factory: train_lib.ModelFactory,
    datasets: data_lib.Datasets,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Tunes (where needed) and runs every method of ``config``.

  Args:
    config: methods, seeds, rates, grids, run lengths and batch sizes.
    model_factory: ``seed -> fresh model``.
    datasets: the tokenised splits.
    log: where one line per finished run goes.
    checkpoint: called with the results so far after every run (a killed
      study keeps what it finished).

  Returns:
    ``{'tuning': {method: ...}, 'chosen_lr': {method: lr}, 'runs': [...]}``
    (one :func:`examples.finetune.train.run` result per method and seed).
  """
  specs = [methods_lib.parse(name) for name in config.methods]
  fixed, grids = config.fixed_lrs(), config.lr_grids()
  tuning: dict[str, Any] = {}
  chosen: dict[str, float] = {}
  runs: list[dict[str, Any]] = []

  def run(spec, lr, seed, length, train, evaluation, desc):
    epochs, steps = length
    result = train_lib.run(
        spec, lr, seed, model_factory=model_factory, train=train,
        evaluation=evaluation, epochs=epochs, steps=steps,
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        warmup_ratio=config.warmup_ratio,
        galore_update_proj_gap=config.galore_update_proj_gap,
        progress=config.progress, desc=desc)
    log(f'{desc:34s} acc={result["accuracy"]:.4f}'
        f' f1={result["macro_f1"]:.4f} ce={result["cross_entropy"]:.4f}'
        f' train_loss={result["final_train_loss"]:.4f}'
        f' ({result["wall_time_s"]:.1f}s,'
        f' {result["steps_per_s"] or float("nan"):.2f} steps/s)')
    return result

  def save():
    if checkpoint is not None:
      checkpoint({'tuning': tuning, 'chosen_lr': chosen, 'runs': runs})

  for spec in specs:
    if spec.name in fixed:
      chosen[spec.name] = fixed[spec.name]
      tuning[spec.name] = {'fixed': fixed[spec.name]}
      continue
    grid = [float(x) for x in grids.get(spec.name, spec.default_lr_grid)]
    trials = []
    tuning[spec.name] = {'grid': grid, 'trials': trials}
    for lr in grid:
      result = run(spec, lr, config.tune_seed, config.tune_length(),
                   datasets.tune_train, datasets.tune_val,
                   f'tune {spec.name} lr={lr:.1e}')
      trials.append({k: result[k] for k in _TRIAL_KEYS})
      save()
    chosen[spec.name] = choose_lr(trials, config.tune_metric)
    tuning[spec.name]['chosen'] = chosen[spec.name]
    log(f'tune {spec.name} chose lr={chosen[spec.name]:.1e}')

  for spec in specs:
    for seed in config.seeds:
      runs.append(run(spec, chosen[spec.name], seed, config.run_length(),
                      datasets.train, datasets.test,
                      f'{spec.name} seed={seed} lr={chosen[spec.name]:.1e}'))
      save()
  return {'tuning': tuning, 'chosen_lr': chosen, 'runs': runs}
