"""What the precision of the passes' dots does to the MLorc-AdamW step.

A :class:`mlorc_optax.kernels.KernelConfig` sets four dot precisions:
``reconstruct_precision`` (pass 2's reconstructions ``U S V^T`` of the
previous factors, from which the update comes, for factors wider than
``fma_max_rank``), ``sketch_reconstruct_precision`` (pass 1's
reconstruction of the second moment, for its negative part),
``sketch_precision`` (pass 1's sketches ``tile @ omega``, which only find the
range) and ``project_precision`` (pass 2's projections ``Q^T tile``, from
which the new factors come): each ``'bf16'``, ``'tf32'`` or ``'tf32x3'``
(float32-level). This runs the synthetic moment-tracking task of
:mod:`benchmarks.compressor_tracking` (noisy low-rank gradients, exact Adam
alongside) through ``scale_by_mlorc_adam(implementation='pallas')`` with each
variant ``RECONSTRUCT/SKETCH_RECONSTRUCT/SKETCH/PROJECT``, the same gradients
and sketches, and reports the relative errors of the stored moments and of
the update against Adam's, averaged over the last half of the run and the
seeds. On a GPU the passes compile through Triton; in interpret mode every
dot is float32, so all rows agree there (CI runs it only as a smoke test).

Usage::

  python -m benchmarks.sketch_precision --rows 1024 --cols 2816 --rank 32 \\
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
from mlorc_optax._src.kernels import launch


@dataclasses.dataclass(frozen=True)
class Config:
  """What the precision of the passes' dots does to the MLorc-AdamW step."""

  rows: int = 256
  cols: int = 512
  steps: int = 60
  rank: int = 4
  true_rank: int = 16
  decay: float = 0.8
  b1: float = 0.9
  b2: float = 0.999
  seeds: tuple[int, ...] = (0, 1, 2)
  variants: tuple[str, ...] = ('tf32x3/tf32/bf16/bf16',
                               'tf32x3/tf32x3/bf16/tf32',
                               'tf32x3/tf32x3/tf32x3/tf32x3')
  """Dot precisions to compare, each
  ``RECONSTRUCT/SKETCH_RECONSTRUCT/SKETCH/PROJECT``: the ``KernelConfig``
  fields of :data:`PRECISION_FIELDS` (the first is the default config's,
  the second the defaults before ``sketch_reconstruct_precision`` and bf16
  projections, the third float32-level dots)."""
  json: str | None = None
  """Write the results here."""


#: The ``KernelConfig`` fields a variant sets, in its order.
PRECISION_FIELDS = launch.PRECISION_FIELDS


def variant_config(variant: str) -> kernels.KernelConfig:
  """The default ``KernelConfig`` with the precisions of ``variant``."""
  parts = variant.split('/')
  if len(parts) != len(PRECISION_FIELDS):
    raise ValueError('a variant is RECONSTRUCT/SKETCH_RECONSTRUCT/SKETCH/'
                     f'PROJECT (for example tf32x3/tf32/bf16/bf16), got '
                     f'{variant!r}.')
  return kernels.KernelConfig(**dict(zip(PRECISION_FIELDS, parts)))


def run(cfg: Config) -> dict[str, Any]:
  """The tracking errors per precision variant; returns the results dict."""
  half = cfg.steps // 2
  rows = []
  for variant in cfg.variants:
    config = variant_config(variant)
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
    row = {'variant': variant, **{
        name: getattr(config, name) for name in PRECISION_FIELDS}}
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
