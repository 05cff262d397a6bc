"""Optimizer-state bytes of optax.adamw vs mlorc_adamw for LLaMA-sized matrices.

Computed from the real ``init`` functions with ``jax.eval_shape`` (no memory is
allocated), so the table is exactly what the optimizers would store.

Usage: python benchmarks/memory_table.py [--rank 4] [--dtype float32]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import mlorc_optax


def state_bytes(tx: optax.GradientTransformation, params) -> int:
  """Bytes of every array in ``tx.init(params)`` (shapes only, no allocation)."""
  state = jax.eval_shape(tx.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def table(shapes, rank: int, dtype) -> str:
  rows = [
      f'| matrix | params | optax.adamw state | mlorc_adamw state (r={rank}) '
      '| ratio |',
      '|---|---|---|---|---|',
  ]
  for m, n in shapes:
    params = {'w': jax.ShapeDtypeStruct((m, n), dtype)}
    adam = state_bytes(optax.adamw(1e-3), params)
    mlorc = state_bytes(mlorc_optax.mlorc_adamw(1e-3, rank=rank), params)
    size = m * n * jnp.dtype(dtype).itemsize
    rows.append(
        f'| {m} x {n} | {size / 2**20:,.1f} MiB | {adam / 2**20:,.1f} MiB '
        f'| {mlorc / 2**10:,.1f} KiB | {mlorc / adam:.3%} |'
    )
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank r.')
  parser.add_argument('--dtype', default='float32',
                      help='Parameter dtype (float32 or bfloat16).')
  args = parser.parse_args()
  print(table([(4096, 4096), (4096, 11008)], args.rank, jnp.dtype(args.dtype)))


if __name__ == '__main__':
  main()
