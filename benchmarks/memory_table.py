"""Optimizer-state bytes of optax.adamw vs mlorc_adamw for LLaMA-sized matrices.

Computed from the real ``init`` functions with ``jax.eval_shape`` (no memory is
allocated), so the table is exactly what the optimizers would store.

Usage: python benchmarks/memory_table.py [--rank 4] [--dtype float32]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

if not __package__:  # Run as a file (the usage above): find `benchmarks`.
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import optax
import tyro

import mlorc_optax
from benchmarks.toolkit import memory
from benchmarks.toolkit import results

#: LLaMA-7B's matrix shapes: attention (q, k, v, o) and the MLP.
SHAPES = ((4096, 4096), (4096, 11008))


@dataclasses.dataclass(frozen=True)
class Config:
  """Optimizer-state bytes of optax.adamw vs mlorc_adamw."""

  rank: int = 4
  """MLorc rank r."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Parameter dtype."""


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  """Bytes of every array in ``tx.init(params)`` (shapes only, no allocation)."""
  return memory.tree_bytes(jax.eval_shape(tx.init, params))


def table(shapes: Sequence[tuple[int, int]], rank: int, dtype) -> str:
  """The markdown table of the state bytes of each ``m x n`` matrix."""
  rows = []
  for m, n in shapes:
    params = {'w': jax.ShapeDtypeStruct((m, n), dtype)}
    rows.append(dict(
        matrix=f'{m} x {n}', params=memory.tree_bytes(params),
        adam=state_bytes(optax.adamw(1e-3), params),
        mlorc=state_bytes(mlorc_optax.mlorc_adamw(1e-3, rank=rank), params)))
  return results.markdown_table(rows, [
      results.Column('matrix', 'matrix'),
      results.Column('params', 'params', results.fmt_bytes),
      results.Column('adam', 'optax.adamw state', results.fmt_bytes),
      results.Column('mlorc', f'mlorc_adamw state (r={rank})',
                     results.fmt_bytes),
      results.Column(lambda r: r['mlorc'] / r['adam'], 'ratio', '.3%'),
  ])


def main(argv: Sequence[str] | None = None) -> None:
  cfg = tyro.cli(Config, args=argv)
  print(table(SHAPES, cfg.rank, jnp.dtype(cfg.dtype)))


if __name__ == '__main__':
  main()
