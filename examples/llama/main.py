"""Train the LLaMA-style model with optax.adamw and mlorc_adamw; compare them.

Runs each optimizer at the same settings (``config.py``), prints a markdown
table (tokens/s and its ratio to adamw, step time, device peak, XLA's memory
estimate, optimizer-state bytes, final loss) and writes one JSON record per
run with ``--result-json``.

Usage::

  python -m examples.llama.main cpu                   # CPU, tiny model
  python -m examples.llama.main gpu --result-json /tmp/llama_1b.json
  python -m examples.llama.main cpu --model small --steps 0   # estimate only
  python -m examples.llama.main cpu --help            # every setting

Unless already set, the XLA client may use 95% of the GPU without
preallocating (``benchmarks.toolkit.environment.configure_xla``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tyro

from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import measure
from examples.llama import report


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the records of the runs."""
  config = tyro.extras.overridable_config_cli(
      config_lib.PRESETS, args=argv, prog='python -m examples.llama.main',
      description=__doc__.splitlines()[0])
  toolkit.environment.configure_xla()  # before JAX starts a backend
  results = measure.compare(config)
  print(report.setup_line(results))
  print(report.comparison_table(results))
  ratio = report.tokens_per_s_ratio(results)
  if ratio is not None:
    print(f'mlorc_adamw / adamw tokens/s (medians over runs): {ratio:.3f}')
  if config.result_json:
    toolkit.results.write_json(results, config.result_json)
  return results


if __name__ == '__main__':
  main()
