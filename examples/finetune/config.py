"""Settings of the fine-tuning example: one frozen dataclass and its presets.

Every field is a command-line flag of :mod:`examples.finetune.main` (``tyro``
turns ``batch_size`` into ``--batch-size``; the text under each field is its
``--help``). Two presets:

* :func:`full` -- the comparison of every method with tuned learning rates
  (``python -m examples.finetune.main``);
* :func:`quickstart` -- AdamW against MLorc-AdamW r=4 at fixed rates, one
  seed, two short epochs: a few minutes on a 2-core CPU
  (``python -m examples.finetune.quickstart``).

Learning rates are given per method as ``METHOD=VALUE`` (``--lr``) and tuning
grids as ``METHOD=V1,V2,...`` (``--lr-grid``); both flags repeat, and a later
entry for a method overrides an earlier one (so ``--lr`` overrides a preset's
rate).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import tyro

from examples.finetune import methods as methods_lib

TuneMetric = Literal['accuracy', 'macro_f1', 'cross_entropy']
Append = tyro.conf.UseAppendAction


@dataclasses.dataclass(frozen=True)
class Config:
  """Fine-tune MiniLM on drug reviews with every optimizer compared.

  Each method without a fixed --lr is tuned on its grid with one seed
  (--tune-seed), trained on the train split minus a held-out slice
  (--val-fraction) and scored there; the best validation --tune-metric wins
  (accuracy or macro-F1: highest; cross_entropy: lowest; ties: the next
  metric, then the smaller rate). The final runs train on the whole train
  split with every seed and are scored on the test split. Methods: adamw,
  lion, mlorc_adamw_r<R>, mlorc_lion_r<R> (suffix _warm or _lorapre for
  another moment compressor), galore_r<R>, lora_r<R>. Writes results.json,
  results.md and results.png to --out.
  """

  # Methods and seeds.
  methods: tuple[str, ...] = methods_lib.DEFAULT_METHODS
  """methods to compare (names: examples/finetune/methods.py)"""
  seeds: tuple[int, ...] = (0, 1, 2)
  """seeds of the final runs (head, dropout, data order, LoRA, sketches)"""

  # Training.
  epochs: float = 5.0
  """epochs of each final run (ignored with --steps)"""
  steps: int | None = None
  """optimizer steps of each final run (instead of --epochs)"""
  batch_size: int = 32
  """training batch"""
  eval_batch_size: int = 128
  """evaluation batch"""
  max_len: int = 128
  """tokens per review (truncated / padded; MiniLM allows 512)"""
  warmup_ratio: float = 0.06
  """fraction of the steps with a linear warmup (then linear decay to 0)"""
  galore_update_proj_gap: int = methods_lib.GALORE_UPDATE_PROJ_GAP
  """steps between GaLore projector (SVD) updates"""

  # Learning rates.
  tune: bool = True
  """tune the rate of each method without --lr (else all need --lr)"""
  lr: Append[tuple[str, ...]] = ()
  """METHOD=VALUE: a fixed peak learning rate (not tuned)"""
  lr_grid: Append[tuple[str, ...]] = ()
  """METHOD=V1,V2,...: the tuning grid of a method (default: methods.py)"""
  tune_epochs: float | None = None
  """epochs of each tuning run (default: as the final runs)"""
  tune_steps: int | None = None
  """steps of each tuning run (instead of --tune-epochs)"""
  val_fraction: float = 0.15
  """stratified held-out fraction of train that scores the tuning runs"""
  tune_seed: int = 0
  """seed of the tuning runs"""
  tune_metric: TuneMetric = 'accuracy'
  """validation metric that picks the rate (examples/finetune/study.py)"""

  # Data and model.
  train_limit: int | None = None
  """use a random subset of this many train reviews (of 600)"""
  test_limit: int | None = None
  """use a random subset of this many test reviews (of 379)"""
  split_seed: int = 0
  """seed of the subsets and of the validation split"""
  model_dir: Path | None = None
  """all-MiniLM-L6-v2 checkpoint directory; None: fetched into the cache"""
  data: Path | None = None
  """drugsCom.zip; None: fetched into the cache"""
  pooling: Literal['mean', 'cls', 'pooler'] = 'mean'
  """sentence pooling before the classifier head"""

  # Output.
  out: Path = Path('finetune_results')
  """directory for results.json, results.md, results.png"""
  progress: bool = True
  """tqdm progress bars"""
  figure: bool = True
  """write results.png"""

  def __post_init__(self) -> None:
    for name in self.methods:
      methods_lib.parse(name)  # Raises ValueError on an unknown name.
    fixed, grids = self.fixed_lrs(), self.lr_grids()
    if not self.tune:
      missing = [m for m in self.methods if m not in fixed]
      if missing:
        raise ValueError(f'without tuning, give --lr for {missing}')
    if any(not grid for grid in grids.values()):
      raise ValueError(f'an empty --lr-grid: {self.lr_grid}')

  def fixed_lrs(self) -> dict[str, float]:
    """``{method: fixed learning rate}`` for the methods being run."""
    return {name: float(value) for name, value in _by_method(self.lr, '--lr')
            if name in self.methods}

  def lr_grids(self) -> dict[str, tuple[float, ...]]:
    """``{method: tuning grid}`` of the methods given a ``--lr-grid``."""
    return {
        name: tuple(float(x) for x in value.split(',') if x)
        for name, value in _by_method(self.lr_grid, '--lr-grid')
        if name in self.methods
    }

  def run_length(self) -> tuple[float | None, int | None]:
    """``(epochs, steps)`` of a final run: exactly one is not None."""
    return (None, self.steps) if self.steps is not None else (self.epochs,
                                                              None)

  def tune_length(self) -> tuple[float | None, int | None]:
    """``(epochs, steps)`` of a tuning run (default: as a final run)."""
    if self.tune_steps is not None:
      return None, self.tune_steps
    if self.tune_epochs is not None:
      return self.tune_epochs, None
    return self.run_length()


def _by_method(items: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
  """Splits ``METHOD=VALUE`` items (a later item of a method wins).

  At the last ``=``: a method may carry options of its own
  (``mlorc_adamw_r4:complement=1.0=2e-4``).
  """
  out = {}
  for item in items:
    name, sep, value = item.rpartition('=')
    if not sep or not name or not value:
      raise ValueError(f'{flag} expects METHOD=VALUE, got {item!r}')
    methods_lib.parse(name)
    out[name] = value
  return list(out.items())


def full() -> Config:
  """Every method of the comparison, learning rates tuned, three seeds."""
  return Config()


QUICKSTART_LRS: dict[str, float] = {'adamw': 1e-4, 'mlorc_adamw_r4': 1e-4}
"""The quickstart's fixed peak learning rates (the paper: MLorc's best rate is
close to AdamW's)."""


def quickstart() -> Config:
  """AdamW vs MLorc-AdamW r=4 in a few minutes on a 2-core CPU.

  One seed, the fixed rates of :data:`QUICKSTART_LRS` (no tuning), two epochs
  over the 600 training reviews truncated to 64 tokens (batch 8: 148 steps),
  scored on the 379 test reviews.
  """
  return Config(
      methods=('adamw', 'mlorc_adamw_r4'),
      seeds=(0,),
      epochs=2.0,
      batch_size=8,
      max_len=64,
      tune=False,
      lr=tuple(f'{name}={lr:g}' for name, lr in QUICKSTART_LRS.items()),
      out=Path('quickstart_results'),
  )


PRESETS = {'full': full, 'quickstart': quickstart}
"""The named presets (functions returning a :class:`Config`)."""
