"""Where the two-pass MLorc-AdamW step spends its time, kernel by kernel.

For one stack of matrices ``[B, m, n]`` (default: 8 x 4096 x 11008, the
gate/up projections of LLaMA-7B) this times, on the default device:

* ``copy`` (``y = 2 x``: read + write) and ``read`` (``sum(x)``): the
  memory bandwidth the kernels should reach, measured in the same run;
* ``sketch``: pass 1 (:func:`mlorc_optax.kernels.sketch_pass`), which reads
  the gradient once;
* ``project``: pass 2 (:func:`mlorc_optax.kernels.project_pass`), which
  reads the gradient and writes the update;
* ``lion_sketch``, ``lion_project``: MLorc-Lion's two passes;
* ``small``: the Gram-based factorizations between and after the passes;
* ``leaf_step``: the whole :func:`mlorc_optax.kernels.adam_step` of the
  stack;
* ``apply``: what follows in ``mlorc_adamw`` (weight decay, learning rate and
  ``apply_updates``: read the update and the weights, write the weights);

each as the median of ``--calls`` warm calls, with its achieved bandwidth
(bytes it must move / time). The passes run with the default
:class:`mlorc_optax.kernels.KernelConfig` (multiply-add reconstructions up
to rank 8) and with dot reconstructions at every rank (``fma_max_rank=0``);
``--sweep`` also times all four passes for other tile sizes, warp and stage
counts (:data:`SWEEP_TILINGS`), dot precisions and program targets (the
config's fields, recorded with each row). The kernels are compiled through
Triton on a GPU and interpreted elsewhere (CI times nothing). Prints one JSON
line per row and appends them to ``--json``.

Usage::

  python -m benchmarks.fused_passes --dtype float32 --ranks 4 32 --sweep \
      --json benchmarks/results/fused_passes/RUN.jsonl
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import tyro

import mlorc_optax
from benchmarks.toolkit import results
from benchmarks.toolkit import timing
from mlorc_optax import kernels


@dataclasses.dataclass(frozen=True)
class Config:
  """Where the two-pass MLorc-AdamW step spends its time, kernel by kernel."""

  shape: tuple[int, int, int] = (8, 4096, 11008)
  """The stack ``B M N``: B matrices of M x N."""
  ranks: tuple[int, ...] = (4,)
  """Ranks to time."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Gradient and weight dtype."""
  calls: int = 10
  """Timed calls per piece (median)."""
  sweep: bool = False
  """Also try other tiles, warps, stages, precisions and program targets."""
  json: str | None = None
  """Append the rows here as JSON lines."""


#: The sweep's tilings ``(block_rows, block_cols, num_warps, num_stages)``:
#: square and narrow tiles on 2-8 warps (narrow tiles on 2 warps cut pass 1
#: by 41 % for bfloat16 gradients, ``benchmarks/README.md``).
SWEEP_TILINGS = (
    (32, 32, 2, 3), (64, 32, 2, 3), (32, 64, 2, 3), (64, 32, 4, 3),
    (64, 64, 2, 3), (64, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3),
    (32, 128, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3))


def sweep_configs(sweep: bool) -> list[Any]:
  """The :class:`~mlorc_optax.kernels.KernelConfig` values the passes run with.

  The default and the same with dot reconstructions at every rank, or with
  ``sweep`` also other tiles, warps and stages, dot precisions and program
  targets, one setting group at a time.
  """
  default = kernels.KernelConfig()
  replace = functools.partial(dataclasses.replace, default)
  # Dot reconstructions at every rank, next to the default's choice.
  configs = [default, replace(fma_max_rank=0)]
  if sweep:
    # Each tiling for every pass and dtype (no per-pass entries).
    configs += [replace(block_rows=bm, block_cols=bn, num_warps=w,
                        num_stages=st, pass_tilings=())
                for bm, bn, w, st in SWEEP_TILINGS]
    configs += [replace(reconstruct_precision=rp, sketch_precision=sp,
                        project_precision=pp)
                for rp, sp, pp in (('tf32x3', 'tf32x3', 'tf32x3'),
                                   ('tf32x3', 'tf32', 'tf32'),
                                   ('tf32', 'tf32', 'tf32'))]
    configs += [replace(target_programs=t) for t in (1024, 8192)]
  return configs


def measure(batch: int, rows: int, cols: int, rank: int, dtype: str,
            calls: int, sweep: bool) -> list[dict[str, Any]]:
  """Times every piece of one stack at one rank; returns the rows."""
  # The benchmark's choice, not the library's: Triton on a GPU.
  interpret = jax.default_backend() != 'gpu'
  dt = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(0), 8)
  g = jax.random.normal(keys[0], (batch, rows, cols), dt)
  w = jax.random.normal(keys[1], (batch, rows, cols), dt)
  # Widest factor and sketch widths a config pads them to; each config's
  # passes take the first kernels.kernel_widths columns.
  pad = max(16, 1 << (rank - 1).bit_length())
  f32 = jnp.float32
  a = jax.random.normal(keys[2], (batch, rows, pad), f32)
  v = jax.random.normal(keys[3], (batch, cols, pad), f32)
  om = jax.random.normal(keys[4], (batch, cols, pad), f32)
  q = jnp.linalg.qr(jax.random.normal(keys[5], (batch, rows, pad)))[0]
  # Pass 2's scalars (b2 * zeta = 0.01) and the step's (Adam at t = 1).
  coefficients = kernels.AdamCoefficients(
      one_minus_b1=0.1, one_minus_b2=0.001, k_m=1.0, k_g=0.0, c_v=1.0,
      eps=1e-8, eps_root=0.0)
  zeta = 0.01
  factors = mlorc_optax.LowRankFactors(
      u=q[..., :rank], s=jnp.ones((batch, rank)), v=jnp.linalg.qr(v)[0][
          ..., :rank])
  step_coefficients = coefficients._replace(k_m=10.0, c_v=1000.0)
  size = batch * rows * cols
  item = dt.itemsize
  y = jax.random.normal(keys[6], (batch, rows, rank), f32)
  b = jax.random.normal(keys[7], (batch, rank, cols), f32)

  def small(y, b):
    qs = kernels.orthonormal_bases([y, y])
    return kernels.svds_of_projections(qs, [b, b], [rank, rank])

  base = dict(batch=batch, rows=rows, cols=cols, rank=rank, dtype=dtype,
              device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  rows_out = []

  def record(name, fn, args, nbytes, **extra):
    try:
      s = timing.time_calls(jax.jit(fn), *args, calls=calls).median_s
      r = dict(base, kernel=name, ms=1e3 * s, **extra)
      if nbytes:
        r['gb_per_s'] = nbytes / s / 1e9
    except Exception as e:  # pylint: disable=broad-except
      r = dict(base, kernel=name, error=f'{type(e).__name__}: {e}'[:300],
               **extra)
    print(json.dumps(r), flush=True)
    rows_out.append(r)

  record('copy', lambda x: x * 2, (g,), 2 * size * item)
  record('read', lambda x: jnp.sum(x, dtype=f32), (g,), size * item)
  record('apply', lambda p, d: p - 1e-4 * (d + 1e-4 * p), (w, g),
         3 * size * item)
  record('small', small, (y, b), 0)
  record('leaf_step', lambda g, f: kernels.adam_step(
      [kernels.AdamLeafInputs(g, f, f, om[..., :rank], om[..., :rank], True)],
      step_coefficients, config=kernels.KernelConfig(), interpret=interpret),
         (g, factors), 3 * size * item)

  def sketch(g, config):
    r, l = kernels.kernel_widths(rank, rank, config)
    return kernels.sketch_pass(g, a[..., :r], v[..., :r], om[..., :l],
                               om[..., :l], coefficients.one_minus_b2,
                               config=config, interpret=interpret)

  def project(g, config):
    r, l = kernels.kernel_widths(rank, rank, config)
    return kernels.project_pass(g, a[..., :r], v[..., :r], a[..., :r],
                                v[..., :r], q[..., :l], q[..., :l],
                                coefficients, zeta, config=config,
                                interpret=interpret)

  def lion_sketch(g, config):
    l = kernels.kernel_widths(rank, rank, config)[1]
    return kernels.lion_sketch_pass(g, om[..., :l], config=config,
                                    interpret=interpret)

  def lion_project(g, config):
    r, l = kernels.kernel_widths(rank, rank, config)
    return kernels.lion_project_pass(
        g, a[..., :r], v[..., :r], q[..., :l],
        kernels.LionCoefficients(0.9, 0.1), config=config,
        interpret=interpret)

  passes = (('sketch', sketch, 1), ('project', project, 2),
            ('lion_sketch', lion_sketch, 1), ('lion_project', lion_project, 2))
  for config in sweep_configs(sweep):
    fields = dataclasses.asdict(config)
    for (name, fn, moved), kernel in zip(passes, kernels.PASSES):
      # The tiling this pass took (its pass_tilings entry or the fields).
      tiling = config.tiling(kernel, dt)._asdict()
      record(name, functools.partial(fn, config=config), (g,),
             moved * size * item, **fields, tiling=tiling)
  return rows_out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = tyro.cli(Config, args=argv)
  out = []
  for rank in cfg.ranks:
    out += measure(*cfg.shape, rank, cfg.dtype, cfg.calls, cfg.sweep)
  if cfg.json:
    results.append_json_lines(out, cfg.json)
  return out


if __name__ == '__main__':
  main()
