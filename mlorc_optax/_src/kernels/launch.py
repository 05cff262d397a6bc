"""The grid, the tiles, the tile products and the settings of the passes.

Every pass is one :func:`launch`: one grid program per matrix of the batch
and block of rows (or of columns), looping over the other axis inside the
kernel so that its accumulations never race, that loop split into several
programs when the grid alone would leave the GPU idle (:func:`splits`). The
settings are a frozen :class:`KernelConfig`, passed as a static argument:
there is no module-level state to set. Its tiling can differ by pass,
gradient dtype and sketch width (:class:`PassTiling`): MLorc-AdamW's pass 1,
which holds the most per tile, runs faster in narrower tiles on fewer warps
with 16-bit gradients, and its pass 2 with wide sketches on fewer pipeline
stages.

A pass's kernel computes three kinds of rank-sized products on each tile,
through the :class:`Products` its launch hands it: the reconstruction
``a v^T`` of a low-rank factor pair, the sketch ``tile @ omega`` summed over
the columns (pass 1) and the projection ``q^T tile`` summed over the rows
(pass 2). Sketches and projections are tensor-core dots, whose operands
Triton needs at least 16 wide (narrower sketches are padded with zero
columns, :func:`kernel_widths`). Reconstructions are dots too, but in pass 2
factors at most ``KernelConfig.fma_max_rank`` wide are reconstructed with
float32 multiply-adds over their true rank instead: a ``tf32x3`` dot of rank
4 padded to 16 is three tensor-core products over mostly zeros. On an H200
(8 x 4096 x 11008 float32, rank 4, ``benchmarks/fused_passes.py``) that took
MLorc-AdamW's pass 2 from 2.10 to 1.45 ms and MLorc-Lion's from 1.37 to
1.16 ms; in pass 1, whose factor columns stream by with every tile, the
same multiply-adds made the pass slower (3.27 against 1.74 ms), so pass 1
reconstructs with dots (its factors padded there). Multiply-adds for the
sketches and projections as well, one tile-sized accumulator per sketch
column, were slower still (pass 1 2.9 ms).

The elementwise math inside the kernels is
:mod:`~mlorc_optax._src.step_math`'s, computed with :data:`FAST` arithmetic
(``KernelConfig.fast_math``): the Triton lowering contracts no ``a * b + c``
into a fused multiply-add and emits full-range division and denormal-safe
square roots, so MLorc-AdamW's pass 2, bound by instruction issue, spent 56
instructions per entry, 32 of them separate multiplies and adds; with
:data:`FAST` it spends 37 (Nsight Compute on an H200, 8 x 4096 x 11008
bfloat16, rank 4), and the LLaMA-7B step went from 2.36x to 2.14x adamw's
in bfloat16 with ``fast_math`` off and on in one run
(``benchmarks/README.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mlorc_optax._src import step_math

#: Smallest tile side the Triton dot accepts; factor and sketch widths are
#: padded up to a power of two at least this wide.
MIN_TILE = 16

#: The dot algorithms a :class:`KernelConfig` precision names.
PRECISIONS = {
    'tf32x3': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    'tf32': jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    'ieee': jax.lax.DotAlgorithmPreset.F32_F32_F32,
    'bf16': jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
}


#: The :class:`KernelConfig` fields that name a precision of
#: :data:`PRECISIONS`.
PRECISION_FIELDS = ('reconstruct_precision', 'sketch_reconstruct_precision',
                    'sketch_precision', 'project_precision')


def _ptx(asm: str, *args: jax.Array) -> jax.Array:
  """One PTX instruction ``$0 = op($1, ...)`` per entry of float32 operands,
  broadcast against each other as ``jax.numpy`` would (inline assembly
  takes operands of one shape; compiled kernels only)."""
  args = jnp.broadcast_arrays(*args)
  [out] = plt.elementwise_inline_asm(
      asm, args=args, constraints=','.join(['=f'] + ['f'] * len(args)),
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape,
                                                        jnp.float32)])
  return out


#: The compiled kernels' :class:`~mlorc_optax._src.step_math.Arithmetic`
#: (``KernelConfig.fast_math``): ``fma.rn.f32``, one rounding where ``a * b
#: + c`` has two; ``div.approx.ftz.f32``, ``a * (1 / b)`` within 2 ulp for
#: ``|b|`` in ``[2**-126, 2**126]``; ``sqrt.approx.ftz.f32``, within
#: ``2**-23`` relative. ``ftz`` flushes subnormal inputs and results to
#: zero: Adam's denominator ``sqrt(c_v v + eps_root) + eps`` changes only
#: where ``c_v v + eps_root < 2**-126`` and ``eps`` is below ``1e-19`` (with
#: the default ``eps = 1e-8`` it never does).
FAST = step_math.Arithmetic(
    fma=lambda a, b, c: _ptx('fma.rn.f32 $0, $1, $2, $3;', a, b, c),
    div=lambda a, b: _ptx('div.approx.ftz.f32 $0, $1, $2;', a, b),
    sqrt=lambda a: _ptx('sqrt.approx.ftz.f32 $0, $1;', a))


def _is_pow2(x: Any) -> bool:
  return (isinstance(x, int) and not isinstance(x, bool) and x > 0
          and x & (x - 1) == 0)


#: The passes' names (each ``pallas_call``'s, as profiles show it), the keys
#: of :attr:`KernelConfig.pass_tilings`.
PASSES = ('mlorc_adam_sketch', 'mlorc_adam_project', 'mlorc_lion_sketch',
          'mlorc_lion_project')
#: The passes 1 among :data:`PASSES` (their reconstructions are at
#: ``KernelConfig.sketch_reconstruct_precision``).
FIRST_PASSES = ('mlorc_adam_sketch', 'mlorc_lion_sketch')


class PassTiling(NamedTuple):
  """The tiling of one pass for gradients of one dtype width and sketches of
  some width (:attr:`KernelConfig.pass_tilings`).

  Attributes:
    kernel: the pass, one of :data:`PASSES`.
    itemsize: bytes per gradient entry it applies to (2: bfloat16 or
      float16; 4: float32).
    block_rows, block_cols, num_warps, num_stages: as the
      :class:`KernelConfig` fields of these names.
    min_width: the narrowest sketch (in the kernels' columns ``L``,
      :func:`kernel_widths`) it applies to; of the entries for a pass and
      itemsize that apply, the one with the largest ``min_width`` is taken
      (:meth:`KernelConfig.tiling`). 0: every width.
    target_programs: as :attr:`KernelConfig.target_programs`, for this
      pass; None: the config's.
  """

  kernel: str
  itemsize: int
  block_rows: int
  block_cols: int
  num_warps: int
  num_stages: int
  min_width: int = 0
  target_programs: int | None = None


#: The default :attr:`KernelConfig.pass_tilings`. MLorc-AdamW's pass 1 with
#: 16-bit gradients in 64 x 32 tiles on 2 warps: on an H200 (8 x 4096 x 11008
#: bfloat16, r=4) that took it from 1.63 to 1.09 ms, where no other tiling
#: helped any pass by more than the runs' spread, in float32 or bfloat16
#: (``benchmarks/README.md``, "Tilings per pass"). With sketches 64 columns
#: wide or more (rank 29 and up at the default oversampling), its pass 2 on
#: 2 pipeline stages and, with 16-bit gradients, its pass 1 in 128 x 32
#: tiles on 4 warps: in one run on an H200 these took the rank-32 LLaMA-7B
#: step from 29.43 to 27.20 ms (float32) and from 29.57 to 23.72 ms
#: (bfloat16), where the same stages at rank 4 (16 columns) had made the
#: step slower. MLorc-Lion's pass 2 with 16-bit gradients in 64 x 128 tiles
#: for sketches narrower than 64 columns: in the same run that took its
#: rank-4 step from 7.84 to 7.28 ms, where at rank 32 (64 columns) the step
#: took 13.34 ms against 12.92 with the fields' 64 x 64
#: (``benchmarks/README.md``, "Tilings by sketch width"). No entry sets its
#: own ``target_programs``: both passes 2 aiming for 8192 programs with
#: sketches under 64 columns ran 17 % faster alone (float32, rank 4) but
#: left the step no faster and raised its temporaries from 0.24x to 0.33x
#: the parameter bytes with their partial sums; 4096 moved the step by less
#: than the runs' spread (``benchmarks/README.md``, seventeenth session).
DEFAULT_PASS_TILINGS = (
    PassTiling('mlorc_adam_sketch', 2, 64, 32, 2, 3),
    PassTiling('mlorc_adam_sketch', 2, 128, 32, 4, 3, min_width=64),
    PassTiling('mlorc_adam_project', 2, 64, 64, 4, 2, min_width=64),
    PassTiling('mlorc_adam_project', 4, 64, 64, 4, 2, min_width=64),
    PassTiling('mlorc_lion_project', 2, 64, 128, 4, 3),
    PassTiling('mlorc_lion_project', 2, 64, 64, 4, 3, min_width=64),
)


def _check_int(where: str, value: Any, minimum: int) -> None:
  """``value`` must be an int (not a bool) ``>= minimum``; ``where`` names
  it in the error."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'{where} must be an int >= {minimum}, got {value!r}.')


def _check_tiling(where: str, block_rows: Any, block_cols: Any,
                  num_warps: Any, num_stages: Any) -> None:
  for name, value in (('block_rows', block_rows), ('block_cols', block_cols)):
    if not _is_pow2(value) or value < MIN_TILE:
      raise ValueError(f'{where}.{name} must be a power of two >= {MIN_TILE}, '
                       f'got {value!r}.')
  if not _is_pow2(num_warps):
    raise ValueError(f'{where}.num_warps must be a power of two, got '
                     f'{num_warps!r}.')
  _check_int(f'{where}.num_stages', num_stages, 1)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """How the Pallas passes are tiled and compiled (hashable, static).

  The defaults are the best of the sweep of ``benchmarks/fused_passes.py
  --sweep`` on an H100 (tiles 32-128, 2-8 warps, 2-3 stages;
  ``benchmarks/README.md``). In interpret mode only the tiles and
  ``target_programs`` matter: every dot is float32 (``HIGHEST``).

  Attributes:
    block_rows: largest tile height (a power of two ``>= 16``); a matrix gets
      the largest power of two ``<= block_rows`` dividing its rows
      (:func:`tile`). With ``block_cols`` it also sets which matrices the
      kernels take unpadded and how the others are padded
      (:func:`supports`, :func:`tiled_size`).
    block_cols: largest tile width, likewise for the columns.
    num_warps: Triton warps per program (a power of two).
    num_stages: Triton software-pipelining stages (``>= 1``).
    pass_tilings: :class:`PassTiling` entries, each replacing the four
      fields above (and ``target_programs``, where it names one) for one
      pass, gradient dtype width and sketches at least ``min_width`` wide
      (at most one entry per triple); the passes without one use the fields
      (:meth:`tiling`). Any tile fits a matrix the fields fit, since both
      are multiples of 16.
    reconstruct_precision: precision of pass 2's reconstructions
      ``U S V^T`` of the previous factors, from which the update comes
      (factors wider than ``fma_max_rank``; narrower ones are rebuilt by
      exact float32 multiply-adds): ``'tf32x3'``, three TF32 tensor-core
      products per dot, float32-level accuracy; ``'tf32'``, one (10-bit
      mantissa inputs); ``'bf16'``, one with both operands rounded to
      bfloat16 (8-bit mantissa) and float32 sums; ``'ieee'``, scalar float32
      FMAs (slowest). It stays float32-level by default: the second
      moment's fix replaces each negative entry of the reconstruction, so an
      entry whose sign a coarser product flipped would change the update
      there by the whole fix.
    sketch_reconstruct_precision: precision of pass 1's reconstruction of
      the previous second moment, the same choices. It only gives the
      negative part that pass 1 sketches and the count and mean magnitude
      ``zeta`` of the negative entries. With TF32 inputs, the default, an
      entry moves by at most ``2**-9`` of the sum of its products'
      magnitudes (10 mantissa bits per input): so only entries that close
      to zero can change sign (each moves the count by one and the sum by
      less than that bound), and the sketched negative part moves by about
      the sketches' own bfloat16 rounding. On an H200 it took
      MLorc-AdamW's pass 1 from 0.96 to 0.78 ms with bfloat16 gradients
      (8 x 4096 x 11008, rank 4; ``benchmarks/README.md``).
    sketch_precision: precision of pass 1's sketches ``tile @ omega``, the
      same choices. They only find the range the moments are projected on,
      with the default ``'bf16'`` each is the sketch of a matrix within
      ``2**-8`` of the moment, entry by entry of the streamed part
      (``(1 - b1) g``, or ``(1 - b2) g**2 + r_-``, rounded to 8
      significant bits; ``omega`` rounded once, :func:`sketch_operand`).
      That moves the singular values, and so the range finder's error
      ``||(I - Q Q^T) M||``, by no more than ``2**-8`` of the streamed
      part's Frobenius norm, far below the rank-``r`` truncation error;
      the projections that make the factors stay at ``project_precision``.
      On an H200 it took MLorc-AdamW's pass 1 from 1.76 to 0.99 ms (8 x
      4096 x 11008 float32, ``benchmarks/README.md``).
    project_precision: precision of pass 2's projections ``Q^T tile``, from
      which the new factors come, the same choices. With the default
      ``'bf16'`` the new factors are those of ``Q Q^T (M + E)``, ``E``
      within ``2**-8`` of the moment ``M`` entry by entry (the rounding of
      storing it in bfloat16, as ``optax.adamw(mu_dtype=jnp.bfloat16)``
      stores its first moment), far below the rank-``r`` truncation error;
      ``Q`` is rounded too, which moves the projection by as little. On an
      H200 it took MLorc-AdamW's pass 2 at rank 32 from 5.8 to 3.8 ms
      (float32) and from 5.5 to 3.3 ms (bfloat16), where the sketches and
      projections are 64 columns wide (``benchmarks/README.md``). The
      complement's products of the gradient with rank-sized bases (``U^T
      g``, ``Q^T g``, outside the passes) take the same precision.
    target_programs: grid programs a pass aims for (an H100 has 132 SMs,
      each running up to 16 programs of 4 warps); a pass whose grid is
      smaller splits its inner loop into more programs and sums their partial
      results (:func:`splits`). A :class:`PassTiling` entry can set its own.
    group_max_elements: leaves whose gradients have at most this many
      entries and whose arrays agree in shape (but for the batch axis) and
      dtype share one launch of each pass: their arrays are concatenated
      along the batch axis (one copy of their gradients). Small unstacked
      models are bound by the fixed cost of each launch, not by memory;
      larger leaves are launched alone, where the copy would cost more than
      the launch. 0 launches every leaf alone.
    fma_max_rank: in pass 2, factors at most this wide are reconstructed
      with float32 multiply-adds at their true rank (:class:`Products`),
      wider ones with dots (padded to a power of two ``>= 16``); pass 1
      always reconstructs with dots. 0: always dots.
    fast_math: compute the kernels' elementwise math with :data:`FAST`:
      fused multiply-adds and approximate division and square root (within
      2 ulp, subnormals flushed to zero; see :data:`FAST`). False: the
      Triton lowering's own operations (separate multiplies and adds,
      full-range approximate division). In interpret mode the math is
      always plain ``jax.numpy``.
  """

  block_rows: int = 64
  block_cols: int = 64
  num_warps: int = 4
  num_stages: int = 3
  reconstruct_precision: str = 'tf32x3'
  sketch_reconstruct_precision: str = 'tf32'
  sketch_precision: str = 'bf16'
  project_precision: str = 'bf16'
  target_programs: int = 2048
  group_max_elements: int = 1 << 22
  fma_max_rank: int = 8
  pass_tilings: tuple[PassTiling, ...] = DEFAULT_PASS_TILINGS
  fast_math: bool = True

  def __post_init__(self):
    _check_tiling('KernelConfig', self.block_rows, self.block_cols,
                  self.num_warps, self.num_stages)
    if not isinstance(self.pass_tilings, tuple):
      raise ValueError('KernelConfig.pass_tilings must be a tuple of '
                       f'PassTiling, got {self.pass_tilings!r}.')
    seen = set()
    for i, entry in enumerate(self.pass_tilings):
      where = f'KernelConfig.pass_tilings[{i}]'
      if not isinstance(entry, PassTiling):
        raise ValueError(f'{where} must be a PassTiling, got {entry!r}.')
      if entry.kernel not in PASSES:
        raise ValueError(f'{where}.kernel must be one of {PASSES}, got '
                         f'{entry.kernel!r}.')
      if entry.itemsize not in (2, 4):
        raise ValueError(f'{where}.itemsize must be 2 or 4, got '
                         f'{entry.itemsize!r}.')
      key = (entry.kernel, entry.itemsize, entry.min_width)
      if key in seen:
        raise ValueError(f'{where} repeats the entry for {key}.')
      seen.add(key)
      _check_tiling(where, entry.block_rows, entry.block_cols,
                    entry.num_warps, entry.num_stages)
      _check_int(f'{where}.min_width', entry.min_width, 0)
      if entry.target_programs is not None:
        _check_int(f'{where}.target_programs', entry.target_programs, 1)
    _check_int('KernelConfig.target_programs', self.target_programs, 1)
    for name in ('group_max_elements', 'fma_max_rank'):
      _check_int(f'KernelConfig.{name}', getattr(self, name), 0)
    if not isinstance(self.fast_math, bool):
      raise ValueError('KernelConfig.fast_math must be a bool, got '
                       f'{self.fast_math!r}.')
    for name in PRECISION_FIELDS:
      value = getattr(self, name)
      if value not in PRECISIONS:
        raise ValueError(f'KernelConfig.{name} must be one of '
                         f'{tuple(PRECISIONS)}, got {value!r}.')

  def tiling(self, kernel: str, dtype: Any, width: int) -> PassTiling:
    """The tiling of pass ``kernel`` (:data:`PASSES`) for gradients of
    ``dtype`` and sketches ``width`` columns wide (as the kernels take
    them, :func:`kernel_widths`): of its :attr:`pass_tilings` entries with
    ``min_width <= width`` the one with the largest ``min_width``, else the
    config's fields; its ``target_programs`` is never None (the config's
    where the entry has none)."""
    itemsize = jnp.dtype(dtype).itemsize
    fits = [e for e in self.pass_tilings
            if (e.kernel, e.itemsize) == (kernel, itemsize)
            and e.min_width <= width]
    if fits:
      entry = max(fits, key=lambda e: e.min_width)
      if entry.target_programs is None:
        entry = entry._replace(target_programs=self.target_programs)
      return entry
    return PassTiling(kernel, itemsize, self.block_rows, self.block_cols,
                      self.num_warps, self.num_stages,
                      target_programs=self.target_programs)


def tile(dim: int, target: int) -> int | None:
  """Largest power of two ``<= target`` and ``>= 16`` dividing ``dim``.

  None when there is none: the kernels then cannot tile that axis.
  """
  t = target
  while t >= MIN_TILE:
    if dim % t == 0:
      return t
    t //= 2
  return None


class LoopSplit(NamedTuple):
  """A kernel's inner loop of ``total`` blocks, split into ``parts`` parts
  of ``size`` blocks (the last part may be shorter); :func:`splits`."""

  parts: int
  size: int
  total: int

  def blocks(self, part: Any) -> tuple[Any, Any]:
    """``(first, end)``: the blocks of ``part`` (a program id)."""
    return part * self.size, jnp.minimum((part + 1) * self.size, self.total)


def splits(programs: int, loop: int, target_programs: int) -> LoopSplit:
  """How the inner loop of ``loop`` blocks is split into parts.

  Into about ``target_programs / programs`` parts (at least 1, at most
  ``loop``) of equal size but for the last, so that ``programs * parts``
  programs keep the GPU busy however ``loop`` factors (BERT's vocabulary,
  477 row blocks, an odd number, is split as finely as a power of two
  would be); each part's partial sums are added afterwards.
  """
  want = max(1, min(loop, target_programs // max(programs, 1)))
  size = -(-loop // want)
  return LoopSplit(-(-loop // size), size, loop)


def supports(rows: int, cols: int, config: KernelConfig) -> bool:
  """Whether the Pallas passes can tile an ``rows x cols`` matrix."""
  return (tile(rows, config.block_rows) is not None
          and tile(cols, config.block_cols) is not None)


def tiled_size(dim: int, target: int) -> int:
  """The size an axis of ``dim`` entries is zero-padded to for the kernels.

  ``dim`` itself where a tile divides it (:func:`tile`); else the next
  multiple of ``min(target, pow2_at_least(dim))``: full tiles of up to
  ``target``, fewer than one tile of padding (a 30,522-row vocabulary
  becomes 30,528 rows at ``target=64``; 20 rows become 32).
  """
  if tile(dim, target) is not None:
    return dim
  t = min(target, pow2_at_least(dim))
  return -(-dim // t) * t


def pow2_at_least(x: int, lo: int = MIN_TILE) -> int:
  """The smallest power of two ``>= max(x, lo)`` (``lo`` a power of two)."""
  return max(lo, 1 << (max(x, 1) - 1).bit_length())


def uses_fma(rank: int, config: KernelConfig) -> bool:
  """Whether pass 2 reconstructs factors of ``rank`` columns by multiply-adds
  (and so whether the kernels take such factors unpadded)."""
  return rank <= config.fma_max_rank


def kernel_widths(rank: int, width: int,
                  config: KernelConfig) -> tuple[int, int]:
  """The widths ``(R, L)`` the kernels take factors of ``rank`` columns and
  sketches of ``width`` columns at: the factors' own where pass 2
  reconstructs them by multiply-adds (:func:`uses_fma`; pass 1 pads them
  for its dots itself, :func:`dot_operand`), else, like every sketch,
  padded to a power of two ``>= 16`` for the dots."""
  r = rank if uses_fma(rank, config) else pow2_at_least(rank)
  return r, pow2_at_least(width)


def dot_input(x: jax.Array, precision: str, config: KernelConfig,
              interpret: bool) -> jax.Array:
  """``x`` in the dtype a compiled kernel's dot at ``config.<precision>``
  (a field of :data:`PRECISION_FIELDS`) takes its operands in.

  Cast to the preset's input type where that is narrower than ``x``'s
  (bfloat16 for ``'bf16'``), the rounding the Triton lowering would apply
  inside the kernel: the products are unchanged, but the kernel loads half
  the bytes and converts nothing (:class:`Products` casts the tile to the
  same type). Unchanged for the TF32 and ``'ieee'`` presets, whose inputs
  are float32, and in interpret mode, whose dots are float32.

  MLorc-AdamW's passes take ``omega`` and ``Q`` so: on an H200 (jax
  0.11.2, LLaMA-7B stacks, L=8, both trees in one call) that took its step
  from 1.86x to 1.64x ``optax.adamw``'s at rank 4 and from 3.77x to 3.50x
  at rank 32 in bfloat16, from 1.28x to 1.25x and from 2.19x to 1.96x in
  float32, and its bfloat16 pass 2 without ``q_m`` from 1.25 to 0.96 ms on
  an 8 x 4096 x 11008 stack (``benchmarks/README.md``). MLorc-Lion's pass
  1 takes ``omega`` so too (its bfloat16 rank-32 step from 3.17x to 2.91x
  ``optax.lion``'s, rank 4 unchanged at 1.76x, temporaries unchanged); its
  pass 2 keeps a float32 ``Q``: cast, it left the rank-4 step where it was
  (7.50 ms before, 7.58 after, ``optax.lion`` 4.28 / 4.26 ms) and raised
  the compiled temporaries from 0.23x to 0.32x the parameter bytes.

  Raises:
    ValueError: if ``precision`` is not one of :data:`PRECISION_FIELDS`.
  """
  if precision not in PRECISION_FIELDS:
    raise ValueError(f'precision must be one of {PRECISION_FIELDS}, got '
                     f'{precision!r}.')
  inputs = jnp.dtype(
      PRECISIONS[getattr(config, precision)].supported_rhs_types[0])
  if interpret or inputs.itemsize >= x.dtype.itemsize:
    return x
  return x.astype(inputs)


def sketch_operand(omega: jax.Array, config: KernelConfig,
                   interpret: bool) -> jax.Array:
  """``omega`` as the compiled kernels' sketches multiply by it, in its own
  dtype.

  Rounded as :func:`dot_input` rounds it for ``sketch_precision`` (to
  bfloat16 for ``'bf16'``) and held in ``omega``'s dtype, so that the small
  products ``V^T omega`` outside the kernels use the same sketch (the sketch
  is then exactly ``(M + E) omega`` with ``E`` only the rounding of the
  streamed tile). Unchanged for float32 inputs (the TF32 presets round
  inside the tensor cores), and in interpret mode, whose dots are float32.
  """
  rounded = dot_input(omega, 'sketch_precision', config, interpret)
  return omega if rounded is omega else rounded.astype(omega.dtype)


def pad_cols(x: jax.Array, width: int) -> jax.Array:
  """``x [..., k]`` padded with zero columns to ``[..., width]``."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def dot_operand(x: jax.Array) -> jax.Array:
  """``x [..., k]`` padded to a dot's width :func:`pow2_at_least` ``(k)``."""
  return pad_cols(x, pow2_at_least(x.shape[-1]))


def block(index: Any, size: int) -> Any:
  """The ``index``-th block of ``size`` entries of an axis, as a ref slice."""
  return pl.ds(pl.multiple_of(index * size, size), size)


def program() -> tuple[Any, Any, Any]:
  """Inside a kernel: ``(matrix, block, part)``, its place in the grid."""
  return pl.program_id(0), pl.program_id(1), pl.program_id(2)


class DotPrecisions(NamedTuple):
  """The dot precisions of a kernel's :class:`Products`."""

  reconstructions: Any
  sketches: Any
  projections: Any


def dot_precisions(config: KernelConfig, interpret: bool,
                   kernel: str) -> DotPrecisions:
  """The dot precisions of pass ``kernel`` (:data:`PASSES`): ``HIGHEST``
  for every product in interpret mode (the CPU has no TF32), else the
  config's presets, the reconstructions at
  ``sketch_reconstruct_precision`` in pass 1 and ``reconstruct_precision``
  in pass 2."""
  if interpret:
    return DotPrecisions(*[step_math.HIGHEST] * 3)
  return DotPrecisions(
      PRECISIONS[config.sketch_reconstruct_precision
                 if kernel in FIRST_PASSES else config.reconstruct_precision],
      PRECISIONS[config.sketch_precision],
      PRECISIONS[config.project_precision])


def arithmetic(config: KernelConfig,
               interpret: bool) -> step_math.Arithmetic:
  """The elementwise arithmetic of the kernels: :data:`FAST` where compiled
  with ``config.fast_math``, else plain ``jax.numpy`` (Pallas' interpreter
  runs no PTX)."""
  return FAST if config.fast_math and not interpret else step_math.PLAIN


# ----------------------------------------------------------------------------
# The products of a tile (inside a kernel).


@dataclasses.dataclass(frozen=True)
class Products:
  """The rank-sized products of a pass's tiles, inside a kernel.

  ``b`` is the matrix, ``rows`` / ``cols`` the tile's blocks
  (:func:`block`); refs hold ``[B, rows or cols, width]`` arrays. The
  sketches ``tile @ omega`` (summed over the column blocks) and projections
  ``q^T tile`` (over the row blocks) are tensor-core dots at their
  precisions with float32 sums, the tile cast to the dtype of ``omega`` or
  ``q`` (MLorc-AdamW's passes and MLorc-Lion's pass 1 hand them in the
  dot's input dtype, :func:`dot_input`); the reconstruction ``a v^T`` of a
  factor pair is a dot at its precision, or with ``fma`` float32
  multiply-adds over the factors' true rank, ``sum_k a_k v_k^T`` (exact to
  float32 rounding), the factors read a column at a time.

  Attributes:
    precisions: the dots' :class:`DotPrecisions` (:func:`dot_precisions`).
    fma: :meth:`outer` as multiply-adds (``KernelConfig.fma_max_rank``).
    arithmetic: the :class:`~mlorc_optax._src.step_math.Arithmetic` of the
      kernel's elementwise math, :meth:`outer`'s multiply-adds included
      (:func:`arithmetic`).
  """

  precisions: DotPrecisions
  fma: bool = False
  arithmetic: step_math.Arithmetic = step_math.PLAIN

  def rows(self, ref: Any, b: Any, rows: Any) -> Any:
    """A factor's rows ``ref[b, rows, :]``, as :meth:`outer` takes them."""
    if self.fma:
      return tuple(ref[b, rows, k] for k in range(ref.shape[-1]))
    return ref[b, rows, :]

  def cols(self, ref: Any, b: Any, cols: Any) -> Any:
    """A factor's rows ``ref[b, cols, :]`` for the columns of a tile."""
    if self.fma:
      return tuple(ref[b, cols, k] for k in range(ref.shape[-1]))
    return ref[b, cols, :].T

  def outer(self, a: Any, v: Any) -> jax.Array:
    """``a v^T``, ``[bm, bn]``, from :meth:`rows` and :meth:`cols`."""
    if not self.fma:
      return jnp.dot(a, v, precision=self.precisions.reconstructions)
    out = a[0][:, None] * v[0][None, :]
    for a_k, v_k in zip(a[1:], v[1:]):
      out = self.arithmetic.fma(a_k[:, None], v_k[None, :], out)
    return out

  def sketch(self, tile: jax.Array, omega_ref: Any, b: Any,
             cols: Any) -> jax.Array:
    """``tile @ omega_ref[b, cols, :]``, ``[bm, L]``, the tile in
    ``omega``'s dtype (:func:`dot_input`)."""
    omega = omega_ref[b, cols, :]
    return jnp.dot(tile.astype(omega.dtype), omega,
                   precision=self.precisions.sketches,
                   preferred_element_type=jnp.float32)

  def project(self, q_ref: Any, b: Any, rows: Any,
              tile: jax.Array) -> jax.Array:
    """``q_ref[b, rows, :]^T @ tile``, ``[L, bn]``, the tile in ``q``'s
    dtype (:func:`dot_input`)."""
    q = q_ref[b, rows, :]
    return jnp.dot(q.T, tile.astype(q.dtype),
                   precision=self.precisions.projections,
                   preferred_element_type=jnp.float32)


def launch(
    kernel: Callable[..., None],
    g: jax.Array,
    *,
    over: str,
    out_shape: Callable[[int], Any],
    args: tuple[Any, ...],
    config: KernelConfig,
    interpret: bool,
    name: str,
    width: int,
    rank: int | None = None,
) -> Any:
  """Runs a pass's ``kernel`` over ``g [B, m, n]`` and returns its outputs.

  One program per batch entry and block of rows (``over='rows'``, looping
  over the column blocks) or of columns (``over='cols'``, looping over the
  row blocks), the loop split into ``parts`` programs (:func:`splits`), each
  writing its partial sums at index ``part`` of a leading axis of size
  ``parts``.

  Args:
    kernel: the kernel body; it gets the refs of ``args`` and of the outputs,
      and the keywords ``bm``, ``bn`` (tile sides), ``loop``
      (:class:`LoopSplit`: ``loop.blocks(part)`` are its part's blocks of
      the inner loop), ``bound`` (:func:`step_math.overflow_bound`) and
      ``products`` (:class:`Products` at the pass's precisions,
      :func:`dot_precisions`, reconstructing by multiply-adds where
      :func:`uses_fma` says so for ``rank``, with the :func:`arithmetic`
      the kernel's elementwise math takes too); its grid position is
      :func:`program`.
    g: the gradients, which set the grid.
    over: ``'rows'`` or ``'cols'``, the axis the grid covers.
    out_shape: ``parts ->`` the outputs' ``jax.ShapeDtypeStruct`` tree.
    args: the kernel's inputs (a pytree each; its refs keep the structure).
    config: the static :class:`KernelConfig`.
    interpret: run in Pallas' interpreter (no GPU needed).
    name: the ``pallas_call``'s name, as profiles and HLO show it, and the
      pass whose tiling ``config`` gives (:meth:`KernelConfig.tiling`, for
      ``g``'s dtype and ``width``).
    width: the columns of the pass's sketches or bases (``L``).
    rank: the width of the factors the kernel reconstructs by
      multiply-adds where :func:`uses_fma` says so (pass 2); None: every
      reconstruction a dot (pass 1, whose factors must then be dot
      operands, :func:`dot_operand`).

  Returns:
    The outputs, as ``out_shape`` describes them.
  """
  if over not in ('rows', 'cols'):
    raise ValueError(f"over must be 'rows' or 'cols', got {over!r}.")
  batch, rows, cols = g.shape
  tiling = config.tiling(name, g.dtype, width)
  bm, bn = tile(rows, tiling.block_rows), tile(cols, tiling.block_cols)
  if bm is None or bn is None:
    raise ValueError(
        f'{name}: a {rows} x {cols} matrix cannot be tiled with block_rows='
        f'{tiling.block_rows}, block_cols={tiling.block_cols} (see '
        'supports).')
  blocks, loop = ((rows // bm, cols // bn) if over == 'rows'
                  else (cols // bn, rows // bm))
  split = splits(batch * blocks, loop, tiling.target_programs)
  products = Products(dot_precisions(config, interpret, name),
                      fma=rank is not None and uses_fma(rank, config),
                      arithmetic=arithmetic(config, interpret))
  body = functools.partial(
      kernel, bm=bm, bn=bn, loop=split,
      bound=step_math.overflow_bound(rows, cols), products=products)
  # Triton's compiler parameters select the Triton lowering (not Mosaic GPU).
  params = None if interpret else plt.CompilerParams(
      num_warps=tiling.num_warps, num_stages=tiling.num_stages)
  return pl.pallas_call(
      body, out_shape=out_shape(split.parts),
      grid=(batch, blocks, split.parts),
      interpret=interpret, compiler_params=params, name=name,
  )(*args)


# ----------------------------------------------------------------------------
# Checks of a pass's operands.


def check_operands(
    where: str,
    arrays: dict[str, tuple[Any, str]],
    scalars: dict[str, Any],
    config: KernelConfig | None,
) -> tuple[Any, ...]:
  """Checks a pass's operands; returns its scalars as one value per matrix.

  Args:
    where: the pass, for the messages.
    arrays: argument name ``-> (array, 'B m n')``: each array must have one
      axis per letter, and a letter must have the same size wherever it
      appears.
    scalars: argument name ``->`` a scalar, a ``[B]`` array, or a NamedTuple
      of those (per-matrix coefficients).
    config: None for a reference pass (any sizes); for a kernel, the factor
      and sketch widths (axes ``'R'`` and ``'L'``) must be those of
      :func:`kernel_widths`: ``R`` at most ``config.fma_max_rank`` (the
      multiply-add reconstructions) or a power of two ``>= 16`` (the Triton
      dot's smallest tile), ``L`` a power of two ``>= 16``; and the axes
      ``'m'`` and ``'n'`` tileable with ``config`` (:func:`supports`).

  Returns:
    The values of ``scalars``, in order, as float32 ``[B]`` arrays (NamedTuples
    field by field).

  Raises:
    ValueError: naming the first argument that breaks a rule.
  """
  dims: dict[str, tuple[int, str]] = {}
  for arg, (x, pattern) in arrays.items():
    axes, shape = pattern.split(), tuple(jnp.shape(x))
    if len(shape) != len(axes):
      raise ValueError(f'{where}: {arg} must have shape [{", ".join(axes)}], '
                       f'got {shape}.')
    for axis, size in zip(axes, shape):
      seen, first = dims.setdefault(axis, (size, arg))
      if seen != size:
        raise ValueError(
            f'{where}: {arg} has {axis} = {size} (shape {shape}), but {first} '
            f'has {axis} = {seen}.')
  if config is not None:
    _check_kernel_sizes(where, dims, config)
  batch = dims['B'][0]
  return tuple(_per_matrix(where, name, x, batch)
               for name, x in scalars.items())


def _check_kernel_sizes(
    where: str, dims: dict[str, tuple[int, str]], config: KernelConfig
) -> None:
  for axis, (size, arg) in ((a, dims[a]) for a in ('R', 'L') if a in dims):
    if axis == 'R' and uses_fma(size, config):
      continue
    if not _is_pow2(size) or size < MIN_TILE:
      raise ValueError(
          f'{where}: {arg} has {axis} = {size}: the kernels take factors up '
          f'to KernelConfig.fma_max_rank = {config.fma_max_rank} wide or '
          f'widths that are powers of two >= {MIN_TILE}; pad it with zero '
          'columns (pad_cols, kernel_widths).')
  for axis, target in (('m', config.block_rows), ('n', config.block_cols)):
    size, arg = dims[axis]
    if tile(size, target) is None:
      raise ValueError(
          f'{where}: {arg} has {axis} = {size}, which no power of two between '
          f'{MIN_TILE} and {target} divides; use the reference pass '
          f'(supports() says which matrices the kernels take).')


def _per_matrix(where: str, name: str, value: Any, batch: int) -> Any:
  """``value`` as float32 ``[batch]`` (a NamedTuple field by field)."""
  if isinstance(value, tuple) and hasattr(value, '_fields'):
    return type(value)(*(_per_matrix(where, f'{name}.{field}', x, batch)
                         for field, x in zip(value._fields, value)))
  x = jnp.asarray(value, jnp.float32)
  if x.shape not in ((), (batch,)):
    raise ValueError(f'{where}: {name} must be a scalar or [B] = [{batch}], '
                     f'got shape {x.shape}.')
  return jnp.broadcast_to(x, (batch,))


def expand_per_matrix(x: Any) -> Any:
  """``[B]`` values (an array or a NamedTuple of them) as ``[B, 1, 1]``.

  So that a reference pass's per-matrix scalars broadcast against its
  ``[B, m, n]`` arrays as the kernels' scalars do against a tile.
  """
  return jax.tree.map(lambda y: y[:, None, None], x)
