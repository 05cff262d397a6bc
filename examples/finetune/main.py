"""Fine-tunes MiniLM on drug reviews with every optimizer compared.

The same model (all-MiniLM-L6-v2 with a fresh 3-class head, mean pooling),
data, learning-rate schedule and seeds for each method of
:mod:`examples.finetune.methods` (AdamW, MLorc-AdamW, Lion, MLorc-Lion,
GaLore, LoRA); learning rates tuned per method on a held-out slice of the
train split (:mod:`examples.finetune.study`); results written to ``--out``
as ``results.json``, ``results.md`` and ``results.png``
(:mod:`examples.finetune.report`). Settings: :mod:`examples.finetune.config`.

Usage::

  python -m examples.finetune.main --help
  python -m examples.finetune.main                      # the full comparison
  python -m examples.finetune.main --methods adamw mlorc_adamw_r4 --seeds 0 1 \\
      --steps 4 --tune-steps 2 --lr-grid adamw=1e-4,2e-4 \\
      --lr-grid mlorc_adamw_r4=1e-4,2e-4 --train-limit 64 --test-limit 32 \\
      --max-len 32 --batch-size 8 --no-progress --out /tmp/finetune_smoke
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import tyro

from benchmarks.toolkit import environment
from benchmarks.toolkit import results as results_lib
from examples.finetune import assets
from examples.finetune import checkpoint
from examples.finetune import config as config_lib
from examples.finetune import data as data_lib
from examples.finetune import methods as methods_lib
from examples.finetune import report
from examples.finetune import study


def main(argv: Sequence[str] | None = None, *,
         default: config_lib.Config | None = None,
         prog: str = 'python -m examples.finetune.main',
         description: str | None = None) -> dict[str, Any]:
  """Parses the flags over ``default`` (the full preset) and runs."""
  config = tyro.cli(config_lib.Config, args=argv, prog=prog,
                    description=description,
                    default=default or config_lib.full())
  return run(config)


def run(config: config_lib.Config) -> dict[str, Any]:
  """Runs the study of ``config``; prints and writes the results.

  Returns:
    The results dict written to ``config.out / 'results.json'``: ``config``,
    ``versions``, ``device``, ``tuning``, ``chosen_lr``, ``runs``,
    ``summary``, ``paired`` (differences to AdamW by seed) and
    ``total_wall_time_s``.
  """
  start = time.perf_counter()
  model_dir = config.model_dir or assets.fetch_minilm()
  datasets = data_lib.load_datasets(
      data_lib.load_tokenizer(model_dir),
      max_len=config.max_len,
      data_path=config.data or assets.fetch_drug_reviews(),
      train_limit=config.train_limit,
      test_limit=config.test_limit,
      val_fraction=config.val_fraction,
      split_seed=config.split_seed,
  )
  factory = checkpoint.PretrainedFactory.from_dir(
      model_dir, num_classes=data_lib.NUM_CLASSES, pooling=config.pooling)
  print(f'device: {environment.device_line()}; data: {datasets.sizes()}',
        flush=True)
  partial = config.out / 'partial.json'
  results = study.study(
      config, model_factory=factory, datasets=datasets,
      checkpoint=lambda so_far: results_lib.write_json(so_far, partial))
  partial.unlink(missing_ok=True)
  epochs, steps = config.run_length()
  tune_epochs, tune_steps = config.tune_length()
  settings = {
      **results_lib.to_json(config),
      'epochs': epochs, 'steps': steps,
      'tune_epochs': tune_epochs, 'tune_steps': tune_steps,
      'data_sizes': datasets.sizes(),
      'model': 'sentence-transformers/all-MiniLM-L6-v2',
      'dataset': 'UCI drug reviews (drugs.com), 3 classes',
      'schedule': (f'linear warmup {config.warmup_ratio:g} of the steps,'
                   ' then linear decay to 0'),
      'weight_decay': dict(methods_lib.WEIGHT_DECAY),
      'mlorc_adamw_b1': methods_lib.MLORC_ADAMW_B1,
  }
  results = {
      'config': settings,
      'versions': environment.versions(),
      'device': environment.device_description(),
      **results,
      'summary': report.summarize(results['runs']),
      'paired': report.paired_differences(results['runs']),
      'total_wall_time_s': time.perf_counter() - start,
  }
  paths = report.write_outputs(results, config.out, figure=config.figure)
  print(report.markdown_table(results))
  paired = report.paired_table(results)
  if paired:
    print(f'\nEach method minus AdamW on the same seed:\n{paired}')
  for note in report.state_notes(results):
    print(f'\n{note}')
  print(f'\ntotal wall time {results["total_wall_time_s"]:.1f}s; wrote '
        + ', '.join(str(p) for p in paths))
  return results


if __name__ == '__main__':
  main()
