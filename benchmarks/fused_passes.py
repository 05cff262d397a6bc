"""Where the two-pass MLorc-AdamW step spends its time, kernel by kernel.

For one stack of matrices ``[B, m, n]`` (default: 8 x 4096 x 11008, the
gate/up projections of LLaMA-7B) this times, on the default device:

* ``copy`` (``y = 2 x``: read + write) and ``read`` (``sum(x)``): the
  memory bandwidth the kernels should reach, measured in the same run;
* ``sketch``: pass 1 (:func:`mlorc_optax._src.fused.sketch_pass`), which
  reads the gradient once;
* ``project``: pass 2 (:func:`mlorc_optax._src.fused.project_pass`), which
  reads the gradient and writes the update;
* ``small``: the Gram-based factorizations between and after the passes;
* ``leaf_step``: the whole :func:`mlorc_optax._src.fused.adam_step` of the
  stack;
* ``apply``: what follows in ``mlorc_adamw`` (weight decay, learning rate and
  ``apply_updates``: read the update and the weights, write the weights);

each as the median of ``--calls`` warm calls, with its achieved bandwidth
(bytes it must move / time). ``--sweep`` also times the passes for other
tile sizes, warp and stage counts and dot precisions (the module's
``BLOCK_ROWS``, ``BLOCK_COLS``, ``NUM_WARPS``, ``NUM_STAGES``,
``RECONSTRUCT_PRECISION``, ``ACCUMULATE_PRECISION`` and ``TARGET_PROGRAMS``).
Writes JSON lines.

  python -m benchmarks.fused_passes --dtype float32 --ranks 4 32 --sweep
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from benchmarks.decompositions import median_time


def measure(batch: int, rows: int, cols: int, rank: int, dtype: str,
            calls: int, sweep: bool) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mlorc_optax._src import fused  # pylint: disable=g-import-not-at-top
  from mlorc_optax._src import rsvd  # pylint: disable=g-import-not-at-top

  dt = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(0), 8)
  g = jax.random.normal(keys[0], (batch, rows, cols), dt)
  w = jax.random.normal(keys[1], (batch, rows, cols), dt)
  pad = fused._pow2_at_least(rank, 16)  # pylint: disable=protected-access
  f32 = jnp.float32
  a = jax.random.normal(keys[2], (batch, rows, pad), f32)
  v = jax.random.normal(keys[3], (batch, cols, pad), f32)
  om = jax.random.normal(keys[4], (batch, cols, pad), f32)
  q = jnp.linalg.qr(jax.random.normal(keys[5], (batch, rows, pad)))[0]
  coef = jnp.tile(jnp.array([[0.1, 0.001, 0.01, 1.0, 0.0, 1.0, 0.0, 1e-8]],
                            f32), (batch, 1))
  factors = rsvd.LowRankFactors(
      u=q[..., :rank], s=jnp.ones((batch, rank)), v=jnp.linalg.qr(v)[0][
          ..., :rank])
  coefficients = fused.AdamCoefficients(0.9, 0.999, 10.0, 0.0, 1000.0, 1e-8,
                                        0.0)
  size = batch * rows * cols
  item = dt.itemsize
  y = jax.random.normal(keys[6], (batch, rows, rank), f32)
  b = jax.random.normal(keys[7], (batch, rank, cols), f32)

  def small(y, b):
    qs = fused.orthonormal_bases([y, y])
    return fused.svds_of_projections(qs, [b, b], [rank, rank])

  base = dict(batch=batch, rows=rows, cols=cols, rank=rank, dtype=dtype,
              device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  rows_out = []

  def record(name, fn, args, nbytes, **extra):
    try:
      s = median_time(fn, *args, calls=calls)
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
  record('leaf_step', lambda g, f: fused.adam_step(
      [fused.LeafInputs(g, f, f, om[..., :rank], om[..., :rank], True)],
      coefficients), (g, factors), 3 * size * item)
  settings = ('BLOCK_ROWS', 'BLOCK_COLS', 'NUM_WARPS', 'NUM_STAGES',
              'RECONSTRUCT_PRECISION', 'ACCUMULATE_PRECISION',
              'TARGET_PROGRAMS')
  default = tuple(getattr(fused, k) for k in settings)
  configs = [default]
  if sweep:
    configs += [(bm, bn, w, st, *default[4:]) for bm, bn, w, st in (
        (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2),
        (128, 64, 8, 2), (32, 32, 4, 2))]
    configs += [(*default[:4], rp, ap, default[6]) for rp, ap in (
        ('tf32x3', 'tf32x3'), ('tf32', 'tf32'))]
    configs += [(*default[:6], t) for t in (1, 1024, 4096, 8192)]
  for config in configs:
    for k, x in zip(settings, config):
      setattr(fused, k, x)
    tiles = {k.lower(): x for k, x in zip(settings, config)}
    record('sketch', lambda g: fused.sketch_pass(g, a, v, om, om, coef),
           (g,), size * item, **tiles)
    record('project', lambda g: fused.project_pass(
        g, a, v, a, v, q, q, coef), (g,), 2 * size * item, **tiles)
  for k, x in zip(settings, default):
    setattr(fused, k, x)
  return rows_out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--shape', nargs=3, type=int, default=[8, 4096, 11008],
                      metavar=('B', 'M', 'N'))
  parser.add_argument('--ranks', nargs='+', type=int, default=[4])
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--calls', type=int, default=10)
  parser.add_argument('--sweep', action='store_true',
                      help='Also try other tiles and warp counts.')
  parser.add_argument('--json', default=None, help='Append JSON lines here.')
  args = parser.parse_args(argv)
  out = []
  for rank in args.ranks:
    out += measure(*args.shape, rank, args.dtype, args.calls, args.sweep)
  if args.json:
    with open(args.json, 'a') as f:
      for r in out:
        f.write(json.dumps(r) + '\n')
  return out


if __name__ == '__main__':
  main()
