"""Ablation timing of MLorc-AdamW's passes (experiment, not a benchmark)."""
import functools, json, sys
import jax, jax.numpy as jnp
from benchmarks import fused_passes as fp
from benchmarks.toolkit import timing
from mlorc_optax import kernels
from mlorc_optax._src.kernels import adam
print('adam from', adam.__file__, flush=True)
B, M, N = 8, 4096, 11008
out = open(sys.argv[1], 'a')
for dtype, rank in (('bfloat16', 4), ('float32', 4), ('bfloat16', 32)):
  dt = jnp.dtype(dtype)
  g = jax.random.normal(jax.random.key(0), (B, M, N), dt)
  l = rank + 4
  ops = fp.pass_operands(jax.random.key(1), B, M, N, l)
  calls = fp.pass_calls(ops, rank, l, interpret=False)
  size = B * M * N * dt.itemsize
  def rec(name, fn, nbytes):
    s = timing.time_calls(jax.jit(fn), g, calls=20).median_s
    r = dict(dtype=dtype, rank=rank, variant=name, ms=1e3 * s, gb_per_s=nbytes / s / 1e9)
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + '\n')
  rec('copy', lambda x: x * 2, 2 * size)
  rec('read', lambda x: jnp.sum(x, dtype=jnp.float32), size)
  cfg = kernels.KernelConfig()
  for v in [x for x in ((), ('count',), ('count', 'nsum'), ('negdot',), ('xdot',), ('gdot',),
            ('rec',), ('fmarec',), ('fmarec', 'count'), ('negdot', 'count', 'nsum'), ('xdot', 'negdot', 'gdot', 'count', 'nsum')) if rank <= 8 or 'fmarec' not in x]:
    adam.ABL = v; jax.clear_caches()
    rec('sketch:' + '+'.join(v), functools.partial(calls['mlorc_adam_sketch'], config=cfg), size)
  for v in ((), ('p2proj',)):
    adam.ABL = v; jax.clear_caches()
    rec('project_v:' + '+'.join(v), functools.partial(calls['project_v'], config=cfg), 2 * size)
  adam.ABL = ()
