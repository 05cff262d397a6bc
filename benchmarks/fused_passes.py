"""Where the two-pass MLorc-AdamW step spends its time, kernel by kernel.

For one stack of matrices ``[B, m, n]`` (default: 8 x 4096 x 11008, the
gate/up projections of LLaMA-7B) this times, on the default device:

* ``copy`` (``y = 2 x``: read + write) and ``read`` (``sum(x)``): the
  memory bandwidth the kernels should reach, measured in the same run,
  before the passes and again after them (rows with ``"order": "last"``,
  ``apply`` too): on an H200 the first copy of a run once took longer
  than the three-array ``apply`` after it (``benchmarks/README.md``,
  sixteenth session), so a pass's ratio should take the faster of each
  pair;
* ``sketch``: pass 1 (:func:`mlorc_optax.kernels.sketch_pass`), which reads
  the gradient once;
* ``project``: pass 2 (:func:`mlorc_optax.kernels.project_pass`), which
  reads the gradient and writes the update; ``project_v``: the same pass
  projecting the second moment only (``q_m=None``), as the step runs it
  with the first moment's complement (the default);
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
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import tyro

import mlorc_optax
from benchmarks import sketch_precision
from benchmarks.toolkit import environment
from benchmarks.toolkit import results
from benchmarks.toolkit import timing
from mlorc_optax import kernels
from mlorc_optax._src.kernels import launch
from mlorc_optax._src.transform import DEFAULT_OVERSAMPLE


@dataclasses.dataclass(frozen=True)
class Config:
  """Where the two-pass MLorc-AdamW step spends its time, kernel by kernel."""

  shape: tuple[int, int, int] = (8, 4096, 11008)
  """The stack ``B M N``: B matrices of M x N."""
  ranks: tuple[int, ...] = (4,)
  """Ranks to time."""
  oversample: int = DEFAULT_OVERSAMPLE
  """Sketch columns beyond the rank (``mlorc_adamw``'s default): the passes
  take sketches of ``rank + oversample`` columns, padded as the step pads
  them (:func:`mlorc_optax.kernels.kernel_widths`; rank 32 with the default
  sketches 36 columns, padded to 64)."""
  passes: tuple[str, ...] = kernels.PASSES
  """Which passes to time (:data:`mlorc_optax.kernels.PASSES`)."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Gradient and weight dtype."""
  calls: int = 10
  """Timed calls per piece (median)."""
  sweep: bool = False
  """Also try other tiles, warps, stages, precisions and program targets."""
  variants: tuple[str, ...] = ()
  """Also time these dot precisions, each
  ``RECONSTRUCT/SKETCH_RECONSTRUCT/SKETCH/PROJECT``
  (:func:`benchmarks.sketch_precision.variant_config`), with the default
  tiling."""
  json: str | None = None
  """Append the rows here as JSON lines."""


#: The sweep's tilings ``(block_rows, block_cols, num_warps, num_stages)``:
#: square and narrow tiles on 2-8 warps (narrow tiles on 2 warps cut pass 1
#: by 41 % for bfloat16 gradients, ``benchmarks/README.md``).
SWEEP_TILINGS = (
    (32, 32, 2, 3), (64, 32, 2, 3), (32, 64, 2, 3), (64, 32, 4, 3),
    (64, 64, 2, 3), (64, 64, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3),
    (32, 128, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3),
    (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (64, 64, 2, 2))


#: The sweep's dot precisions
#: (``RECONSTRUCT/SKETCH_RECONSTRUCT/SKETCH/PROJECT``): float32-level, the
#: defaults before bfloat16 projections, and coarser.
SWEEP_VARIANTS = ('tf32x3/tf32x3/tf32x3/tf32x3', 'tf32x3/tf32x3/bf16/tf32',
                  'tf32/tf32/bf16/bf16', 'bf16/bf16/bf16/bf16')


def sweep_configs(sweep: bool, variants: Sequence[str] = ()) -> list[Any]:
  """The :class:`~mlorc_optax.kernels.KernelConfig` values the passes run with.

  The default and the same with dot reconstructions at every rank, then the
  default at each precision of ``variants``; with ``sweep`` also other
  tiles, warps and stages, dot precisions and program targets, one setting
  group at a time.
  """
  default = kernels.KernelConfig()
  replace = functools.partial(dataclasses.replace, default)
  # Dot reconstructions at every rank, next to the default's choice.
  configs = [default, replace(fma_max_rank=0)]
  configs += [sketch_precision.variant_config(v) for v in variants]
  if sweep:
    # Each tiling for every pass and dtype (no per-pass entries).
    configs += [replace(block_rows=bm, block_cols=bn, num_warps=w,
                        num_stages=st, pass_tilings=())
                for bm, bn, w, st in SWEEP_TILINGS]
    configs += [sketch_precision.variant_config(v) for v in SWEEP_VARIANTS]
    configs += [replace(target_programs=t) for t in (1024, 8192)]
  return configs


class PassOperands(NamedTuple):
  """Random operands of the passes for one stack: factors, sketches and
  bases as wide as the widest padding a config gives them (each pass takes
  the first :func:`mlorc_optax.kernels.kernel_widths` columns)."""

  a: jax.Array
  v: jax.Array
  omega: jax.Array
  q: jax.Array


#: Pass 2's scalars (``b2 * zeta = 0.01``).
COEFFICIENTS = kernels.AdamCoefficients(
    one_minus_b1=0.1, one_minus_b2=0.001, k_m=1.0, k_g=0.0, c_v=1.0,
    eps=1e-8, eps_root=0.0)
ZETA = 0.01


def pass_operands(key: jax.Array, batch: int, rows: int, cols: int,
                  sketch_cols: int) -> PassOperands:
  """:class:`PassOperands` for sketches of ``sketch_cols`` columns."""
  pad = launch.pow2_at_least(sketch_cols)
  keys = jax.random.split(key, 4)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
  return PassOperands(
      normal(keys[0], (batch, rows, pad)), normal(keys[1], (batch, cols, pad)),
      normal(keys[2], (batch, cols, pad)),
      jnp.linalg.qr(normal(keys[3], (batch, rows, pad)))[0])


def pass_calls(ops: PassOperands, rank: int, sketch_cols: int,
               interpret: bool) -> dict[str, Any]:
  """Each pass of :data:`mlorc_optax.kernels.PASSES` as ``(g, config) ->
  outputs`` on ``ops``, with factors of ``rank`` columns and sketches of
  ``sketch_cols``, padded as ``config`` pads them; and ``project_v``, pass 2
  without ``q_m``."""
  a, v, om, q = ops

  def widths(config):
    return kernels.kernel_widths(rank, sketch_cols, config)

  def sketch(g, config):
    r, l = widths(config)
    return kernels.sketch_pass(g, a[..., :r], v[..., :r], om[..., :l],
                               om[..., :l], COEFFICIENTS.one_minus_b2,
                               config=config, interpret=interpret)

  def project(g, config, project_m=True):
    r, l = widths(config)
    return kernels.project_pass(g, a[..., :r], v[..., :r], a[..., :r],
                                v[..., :r], q[..., :l] if project_m else None,
                                q[..., :l], COEFFICIENTS, ZETA, config=config,
                                interpret=interpret)

  def lion_sketch(g, config):
    return kernels.lion_sketch_pass(g, om[..., :widths(config)[1]],
                                    config=config, interpret=interpret)

  def lion_project(g, config):
    r, l = widths(config)
    return kernels.lion_project_pass(
        g, a[..., :r], v[..., :r], q[..., :l],
        kernels.LionCoefficients(0.9, 0.1), config=config,
        interpret=interpret)

  calls = dict(zip(kernels.PASSES,
                   (sketch, project, lion_sketch, lion_project)))
  # With the complement the step has Q_m^T m from outside the pass.
  calls['project_v'] = functools.partial(project, project_m=False)
  return calls


def measure(batch: int, rows: int, cols: int, rank: int, dtype: str,
            calls: int, sweep: bool, oversample: int = DEFAULT_OVERSAMPLE,
            passes: Sequence[str] = kernels.PASSES,
            variants: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Times every piece of one stack at one rank; returns the rows.

  The passes take factors of ``rank`` columns and sketches of ``rank +
  oversample`` (each padded as :func:`mlorc_optax.kernels.kernel_widths`
  says); only those named in ``passes`` are timed.
  """
  unknown = set(passes) - set(kernels.PASSES)
  if unknown:
    raise ValueError(f'passes must be among {kernels.PASSES}, got '
                     f'{sorted(unknown)}.')
  sketch_cols = rank + oversample
  # The benchmark's choice, not the library's: Triton on a GPU.
  interpret = jax.default_backend() != 'gpu'
  dt = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.key(0), 5)
  g = jax.random.normal(keys[0], (batch, rows, cols), dt)
  w = jax.random.normal(keys[1], (batch, rows, cols), dt)
  ops = pass_operands(keys[2], batch, rows, cols, sketch_cols)
  f32 = jnp.float32
  # The step's coefficients (Adam at t = 1).
  factors = mlorc_optax.LowRankFactors(
      u=ops.q[..., :rank], s=jnp.ones((batch, rank)),
      v=jnp.linalg.qr(ops.v)[0][..., :rank])
  step_coefficients = COEFFICIENTS._replace(k_m=10.0, c_v=1000.0)
  size = batch * rows * cols
  item = dt.itemsize
  y = jax.random.normal(keys[3], (batch, rows, sketch_cols), f32)
  b = jax.random.normal(keys[4], (batch, sketch_cols, cols), f32)

  def small(y, b):
    qs = kernels.orthonormal_bases([y, y])
    return kernels.svds_of_projections(qs, [b, b], [rank, rank])

  base = dict(batch=batch, rows=rows, cols=cols, rank=rank,
              sketch_cols=sketch_cols, dtype=dtype,
              device=jax.devices()[0].device_kind,
              jax_version=jax.__version__,
              mlorc_optax_source=environment.library_source())
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

  def references(**extra):
    record('copy', lambda x: x * 2, (g,), 2 * size * item, **extra)
    record('read', lambda x: jnp.sum(x, dtype=f32), (g,), size * item,
           **extra)
    record('apply', lambda p, d: p - 1e-4 * (d + 1e-4 * p), (w, g),
           3 * size * item, **extra)

  references()
  record('small', small, (y, b), 0)
  record('leaf_step', lambda g, f: kernels.adam_step(
      [kernels.AdamLeafInputs(g, f, f, ops.omega[..., :sketch_cols],
                              ops.omega[..., :sketch_cols], True)],
      step_coefficients, config=kernels.KernelConfig(), interpret=interpret),
         (g, factors), 3 * size * item)

  calls_of = pass_calls(ops, rank, sketch_cols, interpret)
  # Each call's row name, its kernel (which --passes names and whose tiling
  # it takes) and the arrays it must move (in gradients).
  timed = {'mlorc_adam_sketch': ('sketch', 'mlorc_adam_sketch', 1),
           'mlorc_adam_project': ('project', 'mlorc_adam_project', 2),
           'project_v': ('project_v', 'mlorc_adam_project', 2),
           'mlorc_lion_sketch': ('lion_sketch', 'mlorc_lion_sketch', 1),
           'mlorc_lion_project': ('lion_project', 'mlorc_lion_project', 2)}
  for config in sweep_configs(sweep, variants):
    fields = dataclasses.asdict(config)
    for call, (name, kernel, moved) in timed.items():
      if kernel not in passes:
        continue
      # The tiling this pass took (its pass_tilings entry or the fields).
      tiling = config.tiling(
          kernel, dt, kernels.kernel_widths(rank, sketch_cols, config)[1]
      )._asdict()
      record(name, functools.partial(calls_of[call], config=config), (g,),
             moved * size * item, **fields, tiling=tiling)
  references(order='last')
  return rows_out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = tyro.cli(Config, args=argv)
  out = []
  for rank in cfg.ranks:
    out += measure(*cfg.shape, rank, cfg.dtype, cfg.calls, cfg.sweep,
                   cfg.oversample, cfg.passes, cfg.variants)
  if cfg.json:
    results.append_json_lines(out, cfg.json)
  return out


if __name__ == '__main__':
  main()
