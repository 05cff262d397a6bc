"""Runs each fused pass a few times on one stack, for a kernel profiler.

Nsight Compute (``ncu``) profiles kernels by name; this program compiles the
four passes (:data:`mlorc_optax.kernels.PASSES`) and MLorc-AdamW's pass 2
as the step runs it with the first moment's complement (``project_v``, no
``q_m``; the kernel keeps its name, ``mlorc_adam_project``, so it is the
fifth launch of a round) with the default
:class:`~mlorc_optax.kernels.KernelConfig`, runs each once to compile and
warm up, then ``--rounds`` more times in turn, so that ``--launch-skip 5
--launch-count 5`` profiles one warm launch of each. The operands are those
of :mod:`benchmarks.fused_passes`
(:func:`~benchmarks.fused_passes.pass_calls`: random factors, sketches and
bases; sketches of ``rank + oversample`` columns, padded as the step pads
them). On a machine without a GPU the passes run in Pallas' interpreter (CI
runs it on a tiny stack as a smoke test).

Usage (on the GPU machine)::

  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none \\
      --section SpeedOfLight --section MemoryWorkloadAnalysis \\
      --section Occupancy --section LaunchStats --section WarpStateStats \\
      -k regex:mlorc --launch-skip 5 --launch-count 5 \\
      python -m benchmarks.pass_profile --dtype bfloat16 > PROFILE.txt

(``XLA_PYTHON_CLIENT_PREALLOCATE=false``: ncu saves the device memory a
kernel writes before each replay, which fails when JAX holds most of it.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import tyro

from benchmarks import fused_passes
from mlorc_optax import kernels
from mlorc_optax._src.transform import DEFAULT_OVERSAMPLE


@dataclasses.dataclass(frozen=True)
class Config:
  """Runs each fused pass a few times on one stack, for a kernel profiler."""

  shape: tuple[int, int, int] = (8, 4096, 11008)
  """The stack ``B M N``: B matrices of M x N."""
  rank: int = 4
  """Rank of the factors."""
  oversample: int = DEFAULT_OVERSAMPLE
  """Sketch columns beyond the rank (``mlorc_adamw``'s default)."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Gradient dtype."""
  rounds: int = 2
  """Warm rounds after the first (each runs every pass once)."""


def run(cfg: Config) -> list[str]:
  """Runs the passes; returns their names in launch order."""
  interpret = jax.default_backend() != 'gpu'
  sketch_cols = cfg.rank + cfg.oversample
  key, g_key = jax.random.split(jax.random.key(0))
  ops = fused_passes.pass_operands(key, *cfg.shape, sketch_cols)
  calls = fused_passes.pass_calls(ops, cfg.rank, sketch_cols, interpret)
  g = jax.random.normal(g_key, cfg.shape, cfg.dtype)
  config = kernels.KernelConfig()
  compiled = {name: jax.jit(functools.partial(fn, config=config))
              for name, fn in calls.items()}
  launched = []
  for _ in range(1 + cfg.rounds):
    for name, fn in compiled.items():
      jax.block_until_ready(fn(g))
      launched.append(name)
  return launched


def main(argv: Sequence[str] | None = None) -> list[str]:
  cfg = tyro.cli(Config, args=argv)
  launched = run(cfg)
  print(f'ran {len(launched)} passes: {cfg}')
  return launched


if __name__ == '__main__':
  main()
