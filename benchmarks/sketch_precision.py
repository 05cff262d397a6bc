"""What the precision of pass 1's sketches does to the MLorc-AdamW step.

``KernelConfig.sketch_precision`` sets the dots of pass 1 (the range
finder's sketches ``tile @ omega``): ``'bf16'`` (the default, both operands
rounded to bfloat16), ``'tf32'`` or ``'tf32x3'`` (float32-level). The
projections that make the new factors keep ``project_precision``. This runs
the synthetic moment-tracking task of :mod:`benchmarks.compressor_tracking`
(noisy low-rank gradients, exact Adam alongside) through
``scale_by_mlorc_adam(implementation='pallas')`` with each precision, the
same gradients and sketches, and reports the relative errors of the stored
moments and of the update against Adam's, averaged over the last half of
the run and the seeds. On a GPU the passes compile through Triton; in
interpret mode every dot is float32, so all rows agree there (CI runs it
only as a smoke test).

Usage::

  python -m benchmarks.sketch_precision --rows 1024 --cols 2816 \\
      --json benchmarks/results/sketch_precision/RUN.json
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tyro

import mlorc_optax
from benchmarks import compressor_tracking
from benchmarks.toolkit import environment
from mlorc_optax import kernels


@dataclasses.dataclass(frozen=True)
class Config:
  """What the precision of pass 1's sketches does to the MLorc-AdamW step."""

  rows: int = 256
  cols: int = 512
  steps: int = 60
  rank: int = 4
  true_rank: int = 16
  decay: float = 0.8
  b1: float = 0.9
  b2: float = 0.999
  seeds: tuple[int, ...] = (0, 1, 2)
  precisions: tuple[str, ...] = ('bf16', 'tf32', 'tf32x3')
  """Values of ``KernelConfig.sketch_precision`` to compare."""
  json: str | None = None
  """Write the results here."""


def run(cfg: Config) -> dict[str, Any]:
  """The tracking errors per sketch precision; returns the results dict."""
  half = cfg.steps // 2
  rows = []
  for precision in cfg.precisions:
    config = kernels.KernelConfig(sketch_precision=precision)
    errs = []
    for seed in cfg.seeds:
      grads = compressor_tracking.gradients(
          jax.random.key(1000 + seed), cfg.steps, cfg.rows, cfg.cols,
          cfg.true_rank, cfg.decay)
      comp = mlorc_optax.compressors.RSVDCompressor()
      tx = mlorc_optax.scale_by_mlorc_adam(
          cfg.b1, cfg.b2, rank=cfg.rank, seed=seed, compressor=comp,
          low_rank_mask=True, implementation='pallas', kernel_config=config)
      errs.append(compressor_tracking.tracking_errors(grads, tx, comp,
                                                      cfg.b1, cfg.b2))
    tail = np.stack(errs)[:, half:].mean(axis=1)  # [seeds, 3]
    row = {'sketch_precision': precision}
    for i, name in enumerate(('m_error', 'v_error', 'direction_error')):
      row[name] = float(tail[:, i].mean())
      row[name + '_std'] = float(tail[:, i].std())
    print(json.dumps(row), flush=True)
    rows.append(row)
  device = environment.device_description()
  return {'config': dataclasses.asdict(cfg), 'rows': rows,
          'device': device, 'versions': environment.versions()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  cfg = tyro.cli(Config, args=argv)
  results = run(cfg)
  if cfg.json:
    with open(cfg.json, 'w') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
