"""A/B of pass 2's projections with the tile as the dot's left operand.

Times ``mlorc_adam_project`` and ``mlorc_lion_project`` on one
8 x 4096 x 11008 stack (r=4 and 32, bfloat16 and float32), median of 10
warm calls each, with the default :class:`mlorc_optax.kernels.KernelConfig`,
with ``tile_lhs_projections=True`` and with that at other tilings, next to a
copy of the stack; ``profile DTYPE default|lhs`` runs the two passes a few
times for Nsight Compute instead. An experiment kept for the record
(``benchmarks/README.md``, "The projections' operands"); the flag was
removed after it.

Usage (GPU)::

  python -m benchmarks.tile_lhs_projections time > RUN.jsonl
  ncu --metrics ... -k regex:project --launch-skip 2 --launch-count 2 \\
      python -m benchmarks.tile_lhs_projections profile bfloat16 lhs
"""
import dataclasses, json, sys, functools
import jax, jax.numpy as jnp
from benchmarks import fused_passes as fp
from benchmarks.toolkit import timing
from mlorc_optax import kernels

mode = sys.argv[1]
D = kernels.KernelConfig()
def rep(**kw): return dataclasses.replace(D, **kw)
TILINGS = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (64, 128, 8, 3),
           (128, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 256, 8, 3)]
if mode == 'time':
  for dtype in ('bfloat16', 'float32'):
    for rank in (4, 32):
      B, M, N = 8, 4096, 11008
      sk = rank + 4
      g = jax.random.normal(jax.random.key(0), (B, M, N), dtype)
      ops = fp.pass_operands(jax.random.key(2), B, M, N, sk)
      calls = fp.pass_calls(ops, rank, sk, False)
      copy = timing.time_calls(jax.jit(lambda x: x * 2), g, calls=10).median_s
      print(json.dumps(dict(dtype=dtype, rank=rank, kernel='copy', ms=1e3 * copy)))
      configs = [('default', D), ('lhs', rep(tile_lhs_projections=True))]
      configs += [(f'lhs{t}', rep(tile_lhs_projections=True, pass_tilings=(), block_rows=t[0], block_cols=t[1], num_warps=t[2], num_stages=t[3])) for t in (TILINGS if rank == 4 else TILINGS[:2])]
      for kernel in ('mlorc_adam_project', 'mlorc_lion_project'):
        for name, cfg in configs:
          try:
            s = timing.time_calls(jax.jit(functools.partial(calls[kernel], config=cfg)), g, calls=10).median_s
            r = dict(dtype=dtype, rank=rank, kernel=kernel, config=name, ms=1e3 * s, of_copy=copy / s)
          except Exception as e:
            r = dict(dtype=dtype, rank=rank, kernel=kernel, config=name, error=str(e)[:300])
          print(json.dumps(r), flush=True)
else:  # profile: run the two project passes with config 'default' or 'lhs'
  dtype, which = sys.argv[2], sys.argv[3]
  cfg = D if which == 'default' else rep(tile_lhs_projections=True)
  B, M, N, rank = 8, 4096, 11008, 4
  g = jax.random.normal(jax.random.key(0), (B, M, N), dtype)
  ops = fp.pass_operands(jax.random.key(2), B, M, N, rank + 4)
  calls = fp.pass_calls(ops, rank, rank + 4, False)
  fns = [jax.jit(functools.partial(calls[k], config=cfg)) for k in ('mlorc_adam_project', 'mlorc_lion_project')]
  for _ in range(3):
    for f in fns:
      jax.block_until_ready(f(g))
