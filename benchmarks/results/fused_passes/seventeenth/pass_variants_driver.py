"""A/B of pass variants in one process (exp tree): compile each, then time in alternating rounds."""
import json, os, sys, statistics, functools
import jax, jax.numpy as jnp
from mlorc_optax import kernels
from mlorc_optax._src.kernels import adam as adam_k
from benchmarks import fused_passes as fp
from benchmarks.toolkit import timing

dtype = sys.argv[1]; rank = int(sys.argv[2]); rounds = int(sys.argv[3])
shape = tuple(int(x) for x in sys.argv[4].split('x')) if len(sys.argv) > 4 else (8, 4096, 11008)
out = sys.argv[5] if len(sys.argv) > 5 else None
VARIANTS = json.loads(os.environ.get('AB_VARIANTS'))  # [[name, call, exp, {tp}], ...]
interpret = jax.default_backend() != 'gpu'
B, M, N = shape
sk = rank + fp.DEFAULT_OVERSAMPLE
keys = jax.random.split(jax.random.key(0), 3)
g = jax.random.normal(keys[0], shape, jnp.dtype(dtype))
ops = fp.pass_operands(keys[1], B, M, N, sk)
calls = fp.pass_calls(ops, rank, sk, interpret)
config = kernels.KernelConfig()
compiled = {}
for name, call, exp, tp in VARIANTS:
  adam_k.EXP.clear(); adam_k.EXP.update(exp)
  for k in list(os.environ):
    if k.startswith('MLORC_TP_'): del os.environ[k]
  for k, v in tp.items(): os.environ['MLORC_TP_' + k] = str(v)
  f = jax.jit(functools.partial(calls[call], config=config))
  compiled[name] = f.lower(g).compile()
  res = compiled[name](g)
  compiled[name + ':out'] = jax.tree.map(lambda x: x.astype(jnp.float32), res)
base = VARIANTS[0][0]
for name, call, exp, tp in VARIANTS:
  ref = [v for v in VARIANTS if v[1] == call][0][0]
  a, b = compiled[name + ':out'], compiled[ref + ':out']
  errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)
  print('check', name, 'vs', ref, errs, flush=True)
times = {v[0]: [] for v in VARIANTS}
copy = jax.jit(lambda x: x * 2).lower(g).compile(); times['copy'] = []
for r in range(rounds):
  for name, *_ in VARIANTS:
    times[name].append(timing.time_calls(compiled[name], g, calls=10).median_s * 1e3)
  times['copy'].append(timing.time_calls(copy, g, calls=10).median_s * 1e3)
rows = []
for name, ts in times.items():
  row = dict(name=name, dtype=dtype, rank=rank, shape=shape, median_ms=statistics.median(ts), min_ms=min(ts), rounds=[round(t, 4) for t in ts],
             device=jax.devices()[0].device_kind, jax=jax.__version__,
             variant=[v for v in VARIANTS if v[0] == name][0][1:] if name != 'copy' else None)
  rows.append(row); print(json.dumps(row), flush=True)
if out:
  with open(out, 'a') as f:
    for row in rows: f.write(json.dumps(row) + '\n')
