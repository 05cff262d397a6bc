"""Where pass 1 of the MLorc-AdamW step spends its time, stage by stage.

Issue #17 (point 2) asks for each pass at >= 80 % of the GPU's bandwidth.
Pass 1 (:func:`mlorc_optax.kernels.sketch_pass`) reads the gradient once,
yet on an H200 it took 3.8x the time of a plain read of the LLaMA-7B MLP
stack (``results/sketch_ablation/``), while MLorc-Lion's pass 1, one sketch
``g @ omega`` and nothing else, runs at the read's speed. Without hardware
counters (``ncu`` crashed on these programs) the way to place that time is
to time variants of the kernel that leave one stage out or change it, and
take differences (``.library/device/H200.md``).

The stages of a tile of pass 1 (:mod:`mlorc_optax.kernels` docs):

1. reconstruct ``r = a_v v_v^T`` (a dot at ``tf32x3``, factors padded to
   16 columns; or float32 multiply-adds over the true rank);
2. the elementwise terms (:func:`mlorc_optax._src.step_math.adam_sketch_terms`);
3. three sketches ``g @ omega_m``, ``x @ omega_v``, ``1{r < 0} @ omega_v``
   (dots at ``KernelConfig.sketch_precision``, ``bf16`` by default);
4. two row sums (negative entries and their magnitudes).

A :class:`Variant` drops or changes stages; ``full`` computes what the
library's kernel computes (a test checks that it returns what
:func:`~mlorc_optax.kernels.sketch_pass` returns). Variants that drop a
stage compute something else: they are for timing only.

The variants run this module's own copy of the kernel (commit
``fc39557``). It does not follow what the library's pass gained since:
the per-pass tilings (``KernelConfig.pass_tilings``), the bfloat16
operands of :func:`~mlorc_optax._src.kernels.launch.dot_input` and the
:data:`~mlorc_optax._src.kernels.launch.FAST` arithmetic. Its times are
therefore not the library's pass; ``library_sketch_pass`` is. The
sixteenth session's ablation switched pieces off in the library kernel
itself instead (``results/fused_passes/sixteenth/pass1_ablation.patch``).

Prints one JSON line per variant, next to a plain read and copy of the
gradient, the library's pass and Lion's pass 1, and appends them to
``--json``.

Usage::

  python -m benchmarks.sketch_ablation --shape 8 4096 11008 \\
      --dtype float32 --json benchmarks/results/sketch_ablation/RUN.jsonl
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import tyro

from benchmarks.toolkit import results
from benchmarks.toolkit import timing
from mlorc_optax import kernels
from mlorc_optax._src import step_math
from mlorc_optax._src.kernels import adam
from mlorc_optax._src.kernels import launch as launch_lib

_F32 = jnp.float32


class Variant(NamedTuple):
  """A version of pass 1's kernel (the defaults are the library's).

  Attributes:
    reconstruct: ``'dot'`` (the library's), ``'fma'`` (multiply-adds over
      the true rank) or ``'none'`` (``r = 0``: no reconstruction).
    reconstruct_precision: the reconstruction dot's precision (the
      library's ``KernelConfig.sketch_reconstruct_precision``, ``'tf32'``;
      before the eighth session ``'tf32x3'``).
    sketches: which of ``'g'``, ``'x'``, ``'neg'`` are computed.
    row_sums: whether the two row sums are computed.
    indicator_bf16: ``1{r < 0} @ omega_v`` as a bfloat16 dot (the indicator
      is exact in bfloat16; ``omega`` is rounded).
    shared_omega: ``omega_v = omega_m`` (one sketch matrix read per tile).
    sketch_precision: the sketches' dot precision (the library's default
      ``'bf16'``: both operands rounded to bfloat16, float32 sums; before
      the seventh session ``'tf32'``).
    block_rows, block_cols, num_warps, num_stages: the tiling
      (:class:`~mlorc_optax.kernels.KernelConfig`).
  """

  reconstruct: Literal['dot', 'fma', 'none'] = 'dot'
  reconstruct_precision: str = 'tf32'
  sketches: tuple[str, ...] = ('g', 'x', 'neg')
  row_sums: bool = True
  indicator_bf16: bool = False
  shared_omega: bool = False
  sketch_precision: str = 'bf16'
  block_rows: int = 64
  block_cols: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def config(self) -> kernels.KernelConfig:
    """The tiling as a :class:`~mlorc_optax.kernels.KernelConfig`."""
    return kernels.KernelConfig(
        block_rows=self.block_rows, block_cols=self.block_cols,
        num_warps=self.num_warps, num_stages=self.num_stages,
        # The pass's name is its own (not a pass 1 of launch.FIRST_PASSES):
        # both fields, so that either rule gives the variant's precision.
        reconstruct_precision=self.reconstruct_precision,
        sketch_reconstruct_precision=self.reconstruct_precision,
        sketch_precision=self.sketch_precision, pass_tilings=())


VARIANTS: dict[str, Variant] = {
    'full': Variant(),
    'only_g_sketch': Variant(reconstruct='none', sketches=('g',),
                             row_sums=False),
    'no_reconstruction': Variant(reconstruct='none'),
    'reconstruct_tf32x3': Variant(reconstruct_precision='tf32x3'),
    'reconstruct_fma': Variant(reconstruct='fma'),
    'no_indicator_sketch': Variant(sketches=('g', 'x')),
    'only_g_sketch_after_reconstruction': Variant(sketches=('g',)),
    'no_row_sums': Variant(row_sums=False),
    'indicator_bf16': Variant(indicator_bf16=True),
    'shared_omega': Variant(shared_omega=True),
    'tiles_32x128': Variant(block_rows=32, block_cols=128),
    'tiles_128x32': Variant(block_rows=128, block_cols=32),
    'tiles_128x32_8_warps': Variant(block_rows=128, block_cols=32,
                                    num_warps=8),
    'tiles_64x32': Variant(block_cols=32),
    'tiles_64x32_2_warps': Variant(block_cols=32, num_warps=2),
    'tiles_64x16': Variant(block_cols=16),
    'tiles_64x128_8_warps': Variant(block_cols=128, num_warps=8),
    'sketches_tf32': Variant(sketch_precision='tf32'),
    'sketches_tf32_tiles_64x32_2_warps': Variant(
        sketch_precision='tf32', block_cols=32, num_warps=2),
    'reconstruct_tf32x3_tiles_64x32_2_warps': Variant(
        reconstruct_precision='tf32x3', block_cols=32, num_warps=2),
    'stages_2': Variant(num_stages=2),
    'stages_4': Variant(num_stages=4),
}


def _kernel(one_b2_ref, g_ref, av_ref, vv_ref, om_ref, ov_ref, *out_refs,
            bm, bn, loop, bound, products, variant: Variant, rank: int):
  b, i, part = launch_lib.program()
  rows = launch_lib.block(i, bm)
  if variant.reconstruct == 'dot':
    a = products.rows(av_ref, b, rows)
  elif variant.reconstruct == 'fma':
    a = tuple(av_ref[b, rows, k] for k in range(rank))
  one_b2 = one_b2_ref[b]
  width = om_ref.shape[-1]

  def body(j, acc):
    cols = launch_lib.block(j, bn)
    g = g_ref[b, rows, cols].astype(_F32)
    if variant.reconstruct == 'dot':
      rec = products.outer(a, products.cols(vv_ref, b, cols))
    elif variant.reconstruct == 'fma':
      rec = sum(a[k][:, None] * vv_ref[b, cols, k][None, :]
                for k in range(rank))
    else:
      rec = jnp.zeros_like(g)
    terms = step_math.adam_sketch_terms(g, rec, one_b2, bound)
    om = om_ref[b, cols, :]
    ov = om if variant.shared_omega else ov_ref[b, cols, :]
    dot = lambda x, o: jnp.dot(x, o, precision=products.precisions.sketches)
    new = list(acc)
    if 'g' in variant.sketches:
      new[0] = acc[0] + dot(terms.g, om)
    if 'x' in variant.sketches:
      new[1] = acc[1] + dot(terms.x, ov)
    if 'neg' in variant.sketches:
      if variant.indicator_bf16:
        new[2] = acc[2] + jnp.dot(terms.negative.astype(jnp.bfloat16),
                                  ov.astype(jnp.bfloat16),
                                  preferred_element_type=_F32)
      else:
        new[2] = acc[2] + dot(terms.negative, ov)
    if variant.row_sums:
      new[3] = acc[3] + jnp.sum(terms.negative, axis=-1)
      new[4] = acc[4] - jnp.sum(terms.nonpositive, axis=-1)
    return adam.SketchPassOutputs(*new)

  zl = jnp.zeros((bm, width), _F32)
  zr = jnp.zeros((bm,), _F32)
  acc = jax.lax.fori_loop(*loop.blocks(part), body,
                          adam.SketchPassOutputs(zl, zl, zl, zr, zr))
  for ref, x in zip(out_refs, acc):
    ref[part, b, rows] = x


def sketch_variant(
    g: jax.Array, a_v: jax.Array, v_v: jax.Array, omega_m: jax.Array,
    omega_v: jax.Array, one_minus_b2: Any, variant: Variant, *,
    interpret: bool,
) -> adam.SketchPassOutputs:
  """Pass 1 as ``variant`` computes it; arguments as
  :func:`mlorc_optax.kernels.sketch_pass` (factors of the true rank: the
  ``'dot'`` reconstruction pads them, as the library does).

  Raises:
    ValueError: naming a field of ``variant`` that holds an unknown stage.
  """
  if variant.reconstruct not in ('dot', 'fma', 'none'):
    raise ValueError("variant.reconstruct must be 'dot', 'fma' or 'none', "
                     f'got {variant.reconstruct!r}.')
  unknown = sorted(set(variant.sketches) - {'g', 'x', 'neg'})
  if unknown:
    raise ValueError(f"variant.sketches: unknown {unknown}; known: 'g', "
                     "'x', 'neg'.")
  batch, rows, _ = g.shape
  width = omega_m.shape[-1]
  rank = a_v.shape[-1]
  if variant.reconstruct == 'dot':
    a_v, v_v = launch_lib.dot_operand(a_v), launch_lib.dot_operand(v_v)

  def out_shape(parts):
    sk = jax.ShapeDtypeStruct((parts, batch, rows, width), _F32)
    row = jax.ShapeDtypeStruct((parts, batch, rows), _F32)
    return adam.SketchPassOutputs(sk, sk, sk, row, row)

  def kernel(*refs, **kw):
    _kernel(*refs, **kw, variant=variant, rank=rank)

  one_minus_b2 = jnp.broadcast_to(jnp.asarray(one_minus_b2, _F32), (batch,))
  out = launch_lib.launch(
      kernel, g, over='rows', out_shape=out_shape,
      args=(one_minus_b2, g, a_v, v_v, omega_m, omega_v),
      config=variant.config(), interpret=interpret,
      name='mlorc_adam_sketch_variant', width=width)
  return adam.SketchPassOutputs(*(jnp.sum(x, axis=0) for x in out))


@dataclasses.dataclass(frozen=True)
class Config:
  """Where pass 1 of the MLorc-AdamW step spends its time."""

  shape: tuple[int, int, int] = (8, 4096, 11008)
  """The stack ``B M N``: B matrices of M x N."""
  rank: int = 4
  """Rank of the second moment's factors."""
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  """Gradient dtype."""
  variants: tuple[str, ...] = tuple(VARIANTS)
  """Which variants to time (names of ``VARIANTS``)."""
  calls: int = 20
  """Timed calls per piece (median)."""
  json: str | None = None
  """Append the rows here as JSON lines."""


def inputs(shape: Sequence[int], rank: int, dtype: str) -> dict[str, Any]:
  """Random operands of pass 1 for a stack (sketches 16 columns wide)."""
  batch, rows, cols = shape
  width = launch_lib.pow2_at_least(rank + 4)
  keys = jax.random.split(jax.random.key(0), 5)
  normal = lambda k, s: jax.random.normal(k, s, _F32)
  return dict(
      g=normal(keys[0], (batch, rows, cols)).astype(dtype),
      a_v=0.3 * normal(keys[1], (batch, rows, rank)),
      v_v=0.3 * normal(keys[2], (batch, cols, rank)),
      omega_m=normal(keys[3], (batch, cols, width)),
      omega_v=normal(keys[4], (batch, cols, width)),
      one_minus_b2=0.001)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = tyro.cli(Config, args=argv)
  unknown = sorted(set(cfg.variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f'--variants: unknown {unknown}; known: '
                     f'{list(VARIANTS)}.')
  # The benchmark's choice, not the library's: Triton on a GPU.
  interpret = jax.default_backend() != 'gpu'
  x = inputs(cfg.shape, cfg.rank, cfg.dtype)
  g = x.pop('g')
  nbytes = g.size * g.dtype.itemsize
  base = dict(batch=cfg.shape[0], rows=cfg.shape[1], cols=cfg.shape[2],
              rank=cfg.rank, dtype=cfg.dtype,
              device=jax.devices()[0].device_kind, jax_version=jax.__version__)
  rows = []

  def record(name, fn, moved, **extra):
    try:
      s = timing.time_calls(jax.jit(fn), g, calls=cfg.calls).median_s
      row = dict(base, variant=name, ms=1e3 * s,
                 gb_per_s=moved / s / 1e9, **extra)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(base, variant=name, error=f'{type(e).__name__}: {e}'[:300],
                 **extra)
    print(json.dumps(row), flush=True)
    rows.append(row)

  record('read', lambda g: jnp.sum(g, dtype=_F32), nbytes)
  record('copy', lambda g: g * 2, 2 * nbytes)
  record('library_sketch_pass', lambda g: kernels.sketch_pass(
      g, x['a_v'], x['v_v'], x['omega_m'], x['omega_v'], x['one_minus_b2'],
      interpret=interpret), nbytes)
  record('lion_sketch_pass', lambda g: kernels.lion_sketch_pass(
      g, x['omega_m'], interpret=interpret), nbytes)
  for name in cfg.variants:
    variant = VARIANTS[name]
    record(name, lambda g, v=variant: sketch_variant(
        g, **x, variant=v, interpret=interpret), nbytes,
           **variant._asdict())
  if cfg.json:
    results.append_json_lines(rows, cfg.json)
  return rows


if __name__ == '__main__':
  main()
