"""Compressors beyond the MLorc paper: a warm-started sketch and LoRA-Pre.

Both plug into :func:`mlorc_optax.low_rank_moments` (and the MLorc
transforms) through ``compressor=``, as objects:
``mlorc_optax.mlorc_adamw(1e-3, compressor=WarmStartCompressor())``.
``docs/compressors.md`` compares them with the paper's randomized SVD.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from mlorc_optax._src import checks
from mlorc_optax._src import compressors
from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math


class LoRAPreFactors(NamedTuple):
  """The two factors of a LoRA-Pre moment, ``moment ≈ b @ a.T``.

  ``a`` is LoRA-Pre's ``A`` (``r x n``) stored *transposed*, ``[..., n, k]``,
  so that both factors have the matrix axis first and are sharded like the
  parameter's rows (``b``) and columns (``a``), exactly as
  :class:`LowRankFactors` ``u`` and ``v``.

  Attributes:
    b: ``B``, shape ``[..., m, k]``.
    a: ``A^T``, shape ``[..., n, k]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> f = mlorc_optax.contrib.LoRAPreFactors(b=jnp.array([[1.0], [2.0]]),
    ...                                a=jnp.array([[3.0], [0.0], [1.0]]))
    >>> mlorc_optax.contrib.LoRAPreCompressor().read(  # b @ a.T
    ...     f, nonnegative=False, decay=0.9, count=1)
    Array([[3., 0., 1.],
           [6., 0., 2.]], dtype=float32)

  References:
    Wang et al., *Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation* (LoRA-Pre), https://arxiv.org/abs/2602.24283.
  """

  b: jax.Array
  a: jax.Array




@dataclasses.dataclass(frozen=True)
class WarmStartCompressor(compressors.RSVDCompressor):
  """A randomized SVD sketched with the previous right factor (warm start).

  The plain RSVD sketches every step with fresh noise, so at ``p = 0`` each
  step finds the moment's dominant subspace anew, with the error of a
  one-shot sketch. The moment changes little between steps (``m_t = b1
  m~_{t-1} + (1 - b1) g_t``), so this compressor sketches with the previous
  step's right singular vectors instead, which carries one step of subspace
  (block power) iteration across optimizer steps:

  .. math::

    \\Omega_t = [\\,V_{t-1} \\mid G_t\\,],\\qquad
    (U_t, S_t, V_t) = \\mathrm{RSVD}(m_t, \\Omega_t, r),

  where ``G_t`` holds the ``oversample`` fresh Gaussian columns and each
  column of ``V_{t-1}`` whose singular value is 0 (all of them at the first
  step, whose factors are zero) is replaced by a fresh Gaussian column. The
  sketch has the width of the plain RSVD's, so a step costs the same; state,
  reading and exactness at ``rank >= min(m, n)`` are the plain RSVD's. Only
  ``power_iters`` and ``oversample`` differ in meaning: more fresh columns
  help find directions the previous subspace misses entirely. Selected by
  ``compressor=WarmStartCompressor()``.

  This is an idea of this library (issue #9), not of the MLorc paper; measure
  it on your problem (``benchmarks/compressor_tracking.py``).

  Attributes:
    oversample: extra sketch columns, always fresh Gaussian.
    power_iters: power iterations per step, on top of the warm start.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, rank=4, compressor=mlorc_optax.contrib.WarmStartCompressor())
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> state[0].inner_state.mu['w'].v.shape  # the same (u, s, v) as 'rsvd'
    (8, 4)

  References:
    Halko, Martinsson & Tropp, *Finding structure with randomness*,
    https://arxiv.org/abs/0909.4061 (Algorithm 4.4, subspace iteration);
    Shen et al., https://arxiv.org/abs/2506.01897 (the RSVD it warm-starts).
  """

  name: ClassVar[str] = 'warm'

  def sketch(self, factors, key, batch_shape, cols, width):
    omega = super().sketch(factors, key, batch_shape, cols, width)
    if omega is None:  # The identity: already exact.
      return None
    rank = factors.s.shape[-1]
    live = (jnp.asarray(factors.s, jnp.float32) > 0)[..., None, :]
    warm = jnp.where(live, jnp.asarray(factors.v, jnp.float32),
                     omega[..., :rank])
    return jnp.concatenate([warm, omega[..., rank:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class LoRAPreCompressor(compressors.MomentCompressor):
  """LoRA-Pre: each moment as ``B A`` refreshed by damped least squares.

  LoRA-Pre (Wang et al., arXiv 2602.24283) reads the EMA ``m_t = b m_{t-1}
  + (1 - b) g_t`` as one step of online gradient flow on the regression
  ``min_m ||m - g_t||^2`` and restricts ``m`` to a product ``B A``
  (``B``: ``m x r``, ``A``: ``r x n``). Per step and moment, one
  alternating-least-squares step with damping ``gamma`` refreshes the
  factors towards the gradient:

  .. math::

    B \\leftarrow (1-\\gamma) B + \\gamma\\, T A^\\top (A A^\\top + \\lambda_A
    I)^{-1},\\qquad
    A \\leftarrow (1-\\gamma) A + \\gamma\\, (B^\\top B + \\lambda_B I)^{-1}
    B^\\top T,

  with ``T = g`` and ``1 - gamma = sqrt(b1)`` for the first moment, and
  ``T = |g|`` and ``1 - gamma = b2 ** (1/4)`` for the second, which is read
  back as the elementwise square ``(B_v A_v)^2`` (never negative, so no fix
  is needed). The transform mixes as for every compressor,
  ``m_t = b1 B A + (1 - b1) g`` and ``v_t = b2 (B_v A_v)^2 + (1 - b2) g^2``
  with the factors of the previous step, and steps with ``m_t, v_t``. The
  state is ``(m + n) r`` numbers per moment (no singular values), as
  :class:`LoRAPreFactors` ``(b, a)`` with ``a = A^T``. Selected by
  ``compressor=LoRAPreCompressor()``.

  The authors' code is unreleased, so what is implemented follows the
  paper's abstract, the specification of issue #9 and third-party
  reimplementations; where they leave a choice open, this is what was chosen
  and why:

  * **Sequential, not simultaneous, factor update**: ``A`` is refreshed with
    the *new* ``B``. This is alternating least squares (Gauss-Seidel); with
    ``B = 0`` at the start a simultaneous update would leave ``A`` untouched
    on the first step; and at ``r = m = n`` without damping it makes ``B A``
    exactly the EMA with decay ``(1 - gamma)^2`` (``b1`` for the first
    moment), while the simultaneous update adds a ``gamma^2 T A^-1 B^-1 T``
    term. The third-party reimplementation we read updates sequentially too.
  * **gamma**: the product of two ``(1 - gamma)`` shrinkages decays by
    ``(1 - gamma)^2`` per step, so ``1 - gamma1 = sqrt(b1)`` makes ``B A`` an
    EMA of ``g`` with decay ``b1``; ``1 - gamma2 = b2 ** (1/4)`` makes
    ``B_v A_v`` an EMA of ``|g|`` with decay ``sqrt(b2)``, whose square
    stands in for ``v`` (it is not the EMA of ``g^2``, even at full rank).
  * **Which moment the step uses**: the mix above (the issue's
    specification, and MLorc's Algorithm 1), so the current gradient enters
    the step at full rank and the first step is exactly Adam's. One
    reimplementation instead steps with the refreshed product ``B A``, which
    projects even the current gradient onto rank ``r``.
  * **Damping**: ``lambda = damping * tr(G) / r`` for each ``r x r`` Gram
    matrix ``G``, computed in float32 on factors divided by their largest
    entry: relative, so gradients of any scale (1e-30 or 1e30) behave alike,
    unlike an absolute ``eps``. ``damping=0`` is plain least squares (NaN
    if a factor loses rank).
  * **Bias of the second moment**: ``B_v A_v`` starts at zero and is an
    EMA with decay ``sqrt(b2)``, so after ``t`` steps it carries the bias
    ``1 - b2^(t/2)``, and its square ``(1 - b2^(t/2))^2``, while Adam's bias
    correction divides by ``1 - b2^t``. Read as it is, ``v`` is too small by
    the factor ``(1 - b2^(t/2))^2 / (1 - b2^t)``: 1/20 after 200 steps and
    1/4 after 2,000 at ``b2 = 0.999``, which makes the early steps several
    times too large (``benchmarks/compressor_tracking.py`` measures it). By
    default (``bias_matched=True``) the second moment is therefore read as
    ``(1 - b2^t) (B_v A_v / (1 - b2^(t/2)))^2``: the bias-corrected EMA of
    ``|g|``, squared, given Adam's bias; ``bias_matched=False`` reads
    ``(B_v A_v)^2`` as specified. Either way ``(E|g|)^2 <= E g^2``: for
    noise-dominated entries LoRA-Pre's ``v`` is smaller than Adam's (by
    ``2 / pi`` for Gaussian noise), even at full rank.
  * **Initialisation**: ``B = 0`` and ``A`` small Gaussian noise (std
    ``init_scale``). The state starts all zero; ``A`` is drawn from the
    step's PRNG key (the key the RSVD would sketch with) at the first update,
    and again whenever a matrix's ``A`` is entirely zero (after a long run of
    zero gradients underflows it), so ``B = A = 0`` is never a fixed point
    and re-seeding the state's key re-seeds ``A``. The noise scale changes
    only the balance between ``B`` and ``A``, not their product.

  Attributes:
    damping: relative damping of the ``r x r`` solves (>= 0).
    init_scale: standard deviation of the initial ``A`` (> 0).
    bias_matched: read the second moment with Adam's bias (below); False
      reads the plain ``(B_v A_v)^2`` of the specification.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, rank=4, compressor=mlorc_optax.contrib.LoRAPreCompressor())
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> mu = state[0].inner_state.mu['w']
    >>> mu.b.shape, mu.a.shape  # (m + n) r numbers
    ((16, 4), (8, 4))

  References:
    Wang et al., *Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation* (LoRA-Pre), https://arxiv.org/abs/2602.24283.
  """

  damping: float = 1e-4
  init_scale: float = 0.02
  bias_matched: bool = True

  name: ClassVar[str] = 'lorapre'
  factor_type: ClassVar[type] = LoRAPreFactors

  def __post_init__(self):
    checks.check_bool('bias_matched', self.bias_matched)
    checks.check_nonnegative('damping', self.damping)
    checks.check_nonnegative('init_scale', self.init_scale)
    if not float(self.init_scale) > 0:
      raise ValueError(f'init_scale must be > 0, got {self.init_scale}.')

  def specs(self, batch_shape, rows, cols, rank, *, nonnegative=False):
    del nonnegative
    return LoRAPreFactors(
        b=compressors.FactorSpec((*batch_shape, rows, rank), 'rows'),
        a=compressors.FactorSpec((*batch_shape, cols, rank), 'cols'),
    )

  def _decay(self, decay):
    if decay is None:
      raise ValueError(
          'LoRAPreCompressor models each moment as an EMA and needs its '
          'decay: use it with mlorc_adamw / mlorc_lion (or give '
          'low_rank_moments MomentSpec(decay=...) for each moment).')
    return decay

  def read(self, factors, *, nonnegative, decay, count):
    b = jnp.asarray(factors.b, jnp.float32)
    a = jnp.asarray(factors.a, jnp.float32)
    x = rsvd.matmul(b, step_math.mT(a))
    if not nonnegative:
      return x
    if not self.bias_matched:
      return x * x
    # (1 - b2^t) / (1 - b2^(t/2))^2, accurately for b2 near 1; 0 at t = 0,
    # where the factors are zero.
    t = jnp.asarray(count, jnp.float32)
    log_decay = jnp.log(jnp.asarray(self._decay(decay), jnp.float32))
    ratio = -jnp.expm1(t * log_decay) / jnp.square(jnp.expm1(t * log_decay / 2))
    return jnp.where(t > 0, ratio, 0.0) * (x * x)

  def _regress(self, t: jax.Array, x: jax.Array) -> jax.Array:
    """``t x (x^T x + lambda I)^-1``: least-squares ``y`` of ``t ≈ y x^T``.

    Scale-safe: ``t`` and ``x`` are divided by their largest magnitudes
    (which multiply back as ``c_t / c_x``), so neither the products nor the
    Gram matrix over- or underflow.
    """
    c_t, c_x = step_math.max_abs(t), step_math.max_abs(x)
    t, x = t / c_t, x / c_x
    gram = rsvd.matmul(step_math.mT(x), x)  # [..., k, k]
    k = gram.shape[-1]
    trace = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
    lam = jnp.where(trace > 0, self.damping * trace / k, 1.0)
    rhs = rsvd.matmul(t, x)  # [..., p, k]
    y = step_math.mT(jnp.linalg.solve(gram + lam * jnp.eye(k), step_math.mT(rhs)))
    return y * (c_t / c_x)

  def update(self, factors, *, moment, grad, key, decay, nonnegative):
    del moment
    target = jnp.abs(grad) if nonnegative else grad
    decay = self._decay(decay)
    keep = decay ** 0.25 if nonnegative else jnp.sqrt(decay)  # 1 - gamma
    gamma = 1 - keep
    b = jnp.asarray(factors.b, jnp.float32)
    a = jnp.asarray(factors.a, jnp.float32)  # A^T: [..., n, k]
    dead = jnp.all(a == 0, axis=(-2, -1), keepdims=True)
    noise = self.init_scale * jax.random.normal(key, a.shape, jnp.float32)
    a = jnp.where(dead, noise, a)
    b = keep * b + gamma * self._regress(target, a)
    a = keep * a + gamma * self._regress(step_math.mT(target), b)
    return LoRAPreFactors(b=b, a=a)


class FactoredMoment(NamedTuple):
  """Row and column sums of a non-negative moment (Adafactor's statistics).

  The moment is read back as ``row col^T / sum(row)``, the non-negative
  rank-1 matrix with those row and column sums.

  Attributes:
    row: row sums ``[..., m, 1]`` (placed like the parameter's rows).
    col: column sums ``[..., n, 1]`` (placed like its columns).
  """

  row: jax.Array
  col: jax.Array


@dataclasses.dataclass(frozen=True)
class FactoredSecondMoment(compressors.RSVDCompressor):
  """Adafactor's factored statistics for the second moment, RSVD for the rest.

  Non-negative moments (Adam's ``nu``) are stored as their row and column
  sums (:class:`FactoredMoment`: ``m + n`` numbers per matrix, fewer than
  the ``(m + n) r + r`` of rank-``r`` factors) and read back as

  .. math::

    \\tilde v = \\frac{R\\, C^\\top}{\\mathbf 1^\\top R},\\qquad
    R = v\\,\\mathbf 1,\\quad C = v^\\top \\mathbf 1 ,

  non-negative by construction, so the fix of paper equation 2 is not
  needed; since the reconstruction keeps the row and column sums, ``R`` and
  ``C`` are exactly the moving averages of the row and column sums of
  ``g**2`` that Adafactor keeps (without its update clipping and relative
  step size). Every other moment (the first) is compressed by the paper's
  randomized SVD with ``oversample`` and ``power_iters``.

  The two-pass step computes only the randomized SVD, so leaves compressed
  with this compressor take the reference step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> from mlorc_optax.contrib import FactoredSecondMoment
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, compressor=FactoredSecondMoment())
    >>> state = tx.init({'w': jnp.zeros((64, 32))})
    >>> mu, nu = state[0].inner_state.mu['w'], state[0].inner_state.nu['w']
    >>> mu.u.shape, nu.row.shape, nu.col.shape
    ((64, 4), (64, 1), (32, 1))

  References:
    Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost*, https://arxiv.org/abs/1804.04235; Shen et al.,
    https://arxiv.org/abs/2506.01897 (the first moment).
  """

  name: ClassVar[str] = 'factored'

  def specs(self, batch_shape, rows, cols, rank, *, nonnegative=False):
    if not nonnegative:
      return super().specs(batch_shape, rows, cols, rank)
    return FactoredMoment(
        row=compressors.FactorSpec((*batch_shape, rows, 1), 'rows'),
        col=compressors.FactorSpec((*batch_shape, cols, 1), 'cols'),
    )

  def read(self, factors, *, nonnegative, decay=None, count=None):
    if not nonnegative:
      return super().read(factors, nonnegative=False)
    row = jnp.asarray(factors.row, jnp.float32)
    col = jnp.asarray(factors.col, jnp.float32)
    total = jnp.sum(row, axis=(-2, -1), keepdims=True)
    return jnp.where(total > 0, row * step_math.mT(col)
                     / jnp.where(total > 0, total, 1.0), 0.0)

  def update(self, factors, *, moment, grad, key, decay, nonnegative):
    if not nonnegative:
      return super().update(factors, moment=moment, grad=grad, key=key,
                            decay=decay, nonnegative=False)
    # Entries at most overflow_bound: sums of up to max(m, n) stay finite.
    bound = step_math.overflow_bound(*moment.shape[-2:])
    v = jnp.minimum(moment, bound)
    return FactoredMoment(row=jnp.sum(v, axis=-1, keepdims=True),
                          col=step_math.mT(jnp.sum(v, axis=-2, keepdims=True)))
