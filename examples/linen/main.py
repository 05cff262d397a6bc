"""Train the Linen T5-style decoder with optax.adamw and mlorc_adamw.

Runs each optimizer at the same settings (``config.py``) and prints a
markdown table: tokens/s (median step after the warm-up, each step blocked
on), optimizer-state bytes and their ratios to adamw's, device peak, first
and last loss; ``--result-json`` writes one JSON record per run.

Usage::

  python -m examples.linen.main cpu                  # CPU, seconds
  python -m examples.linen.main plan                 # the leaf -> view table
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m examples.linen.main cpu --mesh 2x4   # 8 simulated devices
  python -m examples.linen.main gpu --result-json /tmp/linen.json   # GPU
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tyro

from benchmarks import toolkit
from examples.linen import config as config_lib
from examples.linen import train


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the records of the runs."""
  config = tyro.extras.overridable_config_cli(
      config_lib.PRESETS, args=argv, prog='python -m examples.linen.main',
      description=__doc__.splitlines()[0])
  toolkit.environment.configure_xla()  # before JAX starts a backend
  if config.print_plan or config.plan_only:
    print(train.plan_table(config.model_config(), config.rank), end='\n\n')
    if config.plan_only:
      return []
  results = train.compare(config)
  print(train.format_table(results))
  if config.result_json:
    toolkit.results.write_json(results, config.result_json)
  return results


if __name__ == '__main__':
  main()
