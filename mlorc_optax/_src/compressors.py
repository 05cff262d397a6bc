"""Moment compressors: how a low-rank moment is stored, read and refreshed.

The low-rank transforms of :mod:`mlorc_optax._src.mlorc` keep, for every
compressed matrix moment, a few factors instead of the dense ``m x n`` moment.
A *compressor* decides three things:

1. which factors the optimizer state holds (:meth:`MomentCompressor.specs`);
2. the dense moment read back from them before the new gradient is mixed in
   (:meth:`MomentCompressor.read`);
3. the new factors, given the previous ones, the new dense moment and the
   gradient (:meth:`MomentCompressor.update`).

The transforms always mix and step in the same way (Algorithms 1 and 2 of
the MLorc paper):

.. math::

  m_t = \\beta_1\\,\\mathrm{read}(F_{t-1}) + (1-\\beta_1)\\,g_t,\\qquad
  F_t = \\mathrm{update}(F_{t-1}, m_t, g_t),

and the step uses the *uncompressed* ``m_t``. Three compressors are built in,
selected by name with ``compressor=`` in :func:`mlorc_optax.mlorc_adamw` and
friends:

``'rsvd'`` (:class:`RSVDCompressor`, the default)
  the paper's randomized SVD of ``m_t`` with a fresh Gaussian sketch every
  step (Shen et al., Algorithm 3).
``'warm'`` (:class:`WarmStartCompressor`)
  the same randomized SVD, but the sketch is the previous right factor ``V``:
  subspace iteration carried across steps, at the cost of the plain RSVD.
``'lorapre'`` (:class:`LoRAPreCompressor`)
  LoRA-Pre's damped alternating-least-squares refresh of two factors
  ``B A`` regressed on the gradient (Wang et al., arXiv 2602.24283).

Compressors are frozen dataclasses (hashable, static under ``jit`` and
``optax.inject_hyperparams``); write your own by subclassing
:class:`MomentCompressor`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlorc_optax._src import checks
from mlorc_optax._src import rsvd


def nonnegative_second_moment(v: jax.Array) -> jax.Array:
  """The paper's fix (equation 2) of a reconstructed second moment, per matrix.

  A low-rank reconstruction of a non-negative matrix can have negative
  entries. Zeroing them (ReLU) would make ``1 / sqrt(v)`` explode, so each
  negative entry is replaced by ``zeta``, the mean absolute value of the
  matrix's negative entries:

  .. math::

    \\tilde v \\leftarrow \\mathrm{ReLU}(\\tilde v) + \\zeta(\\tilde v)\\,
    \\mathbf 1_{\\{\\tilde v < 0\\}},\\qquad
    \\zeta(\\tilde v) = \\frac{\\sum_{i: \\tilde v_i < 0} |\\tilde v_i|}
    {|\\{i: \\tilde v_i < 0\\}|}.

  Args:
    v: matrices ``[..., m, n]``; ``zeta`` is computed per matrix.

  Returns:
    ``v`` with every negative entry replaced by its matrix's ``zeta`` (> 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mlorc_optax import nonnegative_second_moment
    >>> v = jnp.array([[4.0, -1.0], [-3.0, 2.0]])
    >>> nonnegative_second_moment(v)  # zeta = (1 + 3) / 2
    Array([[4., 2.],
           [2., 2.]], dtype=float32)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    equation (2).
  """
  negative = v < 0
  count = jnp.sum(negative, axis=(-2, -1), keepdims=True)
  total = jnp.sum(jnp.where(negative, -v, 0), axis=(-2, -1), keepdims=True)
  zeta = total / jnp.maximum(count, 1).astype(v.dtype)
  return jnp.where(negative, zeta, v)


class FactorSpec(NamedTuple):
  """Shape and placement of one factor array of a compressed moment.

  Attributes:
    shape: the array's shape, ``[*batch, ...]``.
    placement: ``'rows'`` (sharded like the parameter's rows), ``'cols'``
      (like its columns) or ``'batch'`` (batch axes only); see
      :mod:`mlorc_optax._src.sharding`.

  Examples:
    The factors of the paper's compressor for 6 stacked ``512 x 2048``
    matrices at rank 4:

    >>> import mlorc_optax
    >>> specs = mlorc_optax.RSVDCompressor().specs((6,), 512, 2048, 4)
    >>> specs.u
    FactorSpec(shape=(6, 512, 4), placement='rows')
    >>> specs.s
    FactorSpec(shape=(6, 4), placement='batch')
  """

  shape: tuple[int, ...]
  placement: str


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
    >>> f = mlorc_optax.LoRAPreFactors(b=jnp.array([[1.0], [2.0]]),
    ...                                a=jnp.array([[3.0], [0.0], [1.0]]))
    >>> mlorc_optax.LoRAPreCompressor().read(  # b @ a.T
    ...     f, second_moment=False, decay=0.9, count=1)
    Array([[3., 0., 1.],
           [6., 0., 2.]], dtype=float32)

  References:
    Wang et al., *Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation* (LoRA-Pre), https://arxiv.org/abs/2602.24283.
  """

  b: jax.Array
  a: jax.Array


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _max_abs(x: jax.Array) -> jax.Array:
  """Per-matrix largest magnitude ``[..., 1, 1]``; 1 where 0 or not finite."""
  scale = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


class MomentCompressor(abc.ABC):
  """How a low-rank moment is stored, read back and refreshed.

  Subclasses are frozen dataclasses with a class attribute ``name`` and
  ``factor_type`` (the ``NamedTuple`` of factor arrays; the optimizer state
  holds one params-shaped tree per field). All computation is float32; the
  transform casts the factors to ``factor_dtype`` for storage.

  Examples:
    A compressor that keeps the exact truncated SVD (the sketch is the
    identity), by overriding the RSVD's sketch:

    >>> import dataclasses
    >>> from typing import ClassVar
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> @dataclasses.dataclass(frozen=True)
    ... class TruncatedSVD(mlorc_optax.RSVDCompressor):
    ...   name: ClassVar[str] = 'truncated_svd'
    ...   def sketch(self, factors, key, batch_shape, cols, width):
    ...     return None  # Y = A: Q spans the whole range, the SVD is exact
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=1, compressor=TruncatedSVD())
    >>> params = {'w': jnp.zeros((4, 3))}
    >>> g = {'w': jnp.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [0, 0, 0]])}
    >>> _, state = tx.update(g, tx.init(params), params)
    >>> state[0][0].mu.s['w']  # (1 - b1) * 3: the top singular value
    Array([0.3], dtype=float32)
  """

  name: ClassVar[str]
  factor_type: ClassVar[type]

  @abc.abstractmethod
  def specs(
      self, batch_shape: tuple[int, ...], rows: int, cols: int, rank: int
  ) -> tuple[FactorSpec, ...]:
    """A ``factor_type`` of :class:`FactorSpec` for ``[*batch, rows, cols]``.

    The initial factors are zeros of these shapes: an all-zero moment.
    """

  @abc.abstractmethod
  def read(
      self,
      factors: Any,
      *,
      second_moment: bool,
      decay: jax.typing.ArrayLike,
      count: jax.typing.ArrayLike,
  ) -> jax.Array:
    """The dense float32 moment ``[*batch, rows, cols]`` the factors stand for.

    Args:
      factors: a ``factor_type`` of arrays (any float dtype).
      second_moment: True for Adam's second moment, which must come back
        non-negative.
      decay: the moment's EMA decay.
      count: how many updates the factors have seen (the state's ``count``);
        the moment is read with the bias of an EMA started at zero that many
        steps ago, ``1 - decay**count``, as Adam's bias correction expects.
    """

  @abc.abstractmethod
  def update(
      self,
      factors: Any,
      *,
      moment: jax.Array,
      grad: jax.Array,
      key: jax.Array,
      decay: jax.typing.ArrayLike,
      second_moment: bool,
  ) -> Any:
    """The new factors (float32) after a step.

    Args:
      factors: the previous factors (what :meth:`read` was given this step).
      moment: the new dense float32 moment ``m_t`` (or ``v_t``).
      grad: the float32 gradient ``g_t`` as ``[*batch, rows, cols]``.
      key: a raw PRNG key for this moment and step.
      decay: the moment's EMA decay (``b1``, ``b2``; Lion's ``b2``).
      second_moment: True for Adam's second moment (``moment`` is then the
        EMA of ``g**2``).
    """


@dataclasses.dataclass(frozen=True)
class RSVDCompressor(MomentCompressor):
  """The paper's compressor: a randomized SVD of the new moment every step.

  .. math::

    \\Omega_t \\sim \\mathcal N(0, 1)^{n \\times l},\\quad
    (U_t, S_t, V_t) = \\mathrm{RSVD}(m_t, \\Omega_t, r),\\qquad
    \\mathrm{read} = U S V^\\top\\ (\\text{second moment: }
    \\mathrm{fix}(U S V^\\top)),

  with ``l = min(r + oversample, m, n)``, ``power_iters`` subspace iterations
  and ``fix`` :func:`~mlorc_optax.nonnegative_second_moment`. The state holds
  :class:`~mlorc_optax.LowRankFactors` ``(u, s, v)``: ``(m + n) r + r``
  numbers per moment. Exact at ``rank >= min(m, n)``. Selected by
  ``compressor='rsvd'`` (the default).

  Attributes:
    oversample: extra sketch columns ``p >= 0``.
    power_iters: power (subspace) iterations ``q >= 0`` per step.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, compressor=mlorc_optax.RSVDCompressor(oversample=2))
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> state[0][0].mu.u['w'].shape
    (16, 4)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    Algorithms 1-3; Halko, Martinsson & Tropp, *Finding structure with
    randomness*, https://arxiv.org/abs/0909.4061.
  """

  oversample: int = 0
  power_iters: int = 0

  name: ClassVar[str] = 'rsvd'
  factor_type: ClassVar[type] = rsvd.LowRankFactors

  def __post_init__(self):
    checks.check_int('oversample', self.oversample, 0)
    checks.check_int('power_iters', self.power_iters, 0)

  def specs(self, batch_shape, rows, cols, rank):
    return rsvd.LowRankFactors(
        u=FactorSpec((*batch_shape, rows, rank), 'rows'),
        s=FactorSpec((*batch_shape, rank), 'batch'),
        v=FactorSpec((*batch_shape, cols, rank), 'cols'),
    )

  def read(self, factors, *, second_moment, decay=None, count=None):
    del decay, count
    x = rsvd.reconstruct(factors)
    return nonnegative_second_moment(x) if second_moment else x

  def sketch(
      self,
      factors: rsvd.LowRankFactors,
      key: jax.Array,
      batch_shape: tuple[int, ...],
      cols: int,
      width: int,
  ) -> jax.Array | None:
    """This step's sketch ``Omega`` ``[*batch, cols, width]`` (None: identity).

    A fresh Gaussian, independent of the previous ``factors``.
    """
    del factors
    return rsvd.gaussian_sketch(key, batch_shape, cols, width)

  def update(self, factors, *, moment, grad, key, decay, second_moment):
    del grad, decay, second_moment
    *batch, rows, cols = moment.shape
    rank = factors.s.shape[-1]
    # Saturate overflowed entries (a float32 g**2 overflows for |g| > 1.8e19):
    # an infinite moment would give NaN factors and poison every later step,
    # while optax.adamw merely keeps an infinite moment. At this bound the
    # singular values (<= sqrt(mn) max|x|) and reconstructions stay finite,
    # and the step that overflowed still gets a ~0 update, as in adamw.
    bound = np.finfo(np.float32).max / (2.0 * np.sqrt(rows * cols))
    x = jnp.clip(moment, -bound, bound)
    width = rsvd.sketch_width(rows, cols, rank, self.oversample)
    omega = self.sketch(factors, key, tuple(batch), cols, width)
    return rsvd.randomized_svd_from_sketch(
        x, omega, rank, power_iters=self.power_iters
    )


@dataclasses.dataclass(frozen=True)
class WarmStartCompressor(RSVDCompressor):
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
  ``compressor='warm'``.

  This is an idea of this library (issue #9), not of the MLorc paper; measure
  it on your problem (``benchmarks/compressor_tracking.py``).

  Attributes:
    oversample: extra sketch columns, always fresh Gaussian.
    power_iters: power iterations per step, on top of the warm start.

  Examples:
    >>> import jax.numpy as jnp
    >>> import mlorc_optax
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4, compressor='warm')
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> state[0][0].mu.v['w'].shape  # the same (u, s, v) state as 'rsvd'
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
class LoRAPreCompressor(MomentCompressor):
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
  ``compressor='lorapre'``.

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
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=4, compressor='lorapre')
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> core = state[0][0]
    >>> core.mu.b['w'].shape, core.mu.a['w'].shape  # (m + n) r numbers
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

  def specs(self, batch_shape, rows, cols, rank):
    return LoRAPreFactors(
        b=FactorSpec((*batch_shape, rows, rank), 'rows'),
        a=FactorSpec((*batch_shape, cols, rank), 'cols'),
    )

  def read(self, factors, *, second_moment, decay, count):
    b = jnp.asarray(factors.b, jnp.float32)
    a = jnp.asarray(factors.a, jnp.float32)
    x = rsvd.matmul(b, _mT(a))
    if not second_moment:
      return x
    if not self.bias_matched:
      return x * x
    # (1 - b2^t) / (1 - b2^(t/2))^2, accurately for b2 near 1; 0 at t = 0,
    # where the factors are zero.
    t = jnp.asarray(count, jnp.float32)
    log_decay = jnp.log(jnp.asarray(decay, jnp.float32))
    ratio = -jnp.expm1(t * log_decay) / jnp.square(jnp.expm1(t * log_decay / 2))
    return jnp.where(t > 0, ratio, 0.0) * (x * x)

  def _regress(self, t: jax.Array, x: jax.Array) -> jax.Array:
    """``t x (x^T x + lambda I)^-1``: least-squares ``y`` of ``t ≈ y x^T``.

    Scale-safe: ``t`` and ``x`` are divided by their largest magnitudes
    (which multiply back as ``c_t / c_x``), so neither the products nor the
    Gram matrix over- or underflow.
    """
    c_t, c_x = _max_abs(t), _max_abs(x)
    t, x = t / c_t, x / c_x
    gram = rsvd.matmul(_mT(x), x)  # [..., k, k]  pylint: disable=protected-access
    k = gram.shape[-1]
    trace = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
    lam = jnp.where(trace > 0, self.damping * trace / k, 1.0)
    rhs = rsvd.matmul(t, x)  # [..., p, k]  pylint: disable=protected-access
    y = _mT(jnp.linalg.solve(gram + lam * jnp.eye(k), _mT(rhs)))
    return y * (c_t / c_x)

  def update(self, factors, *, moment, grad, key, decay, second_moment):
    del moment
    target = jnp.abs(grad) if second_moment else grad
    keep = decay ** 0.25 if second_moment else jnp.sqrt(decay)  # 1 - gamma
    gamma = 1 - keep
    b = jnp.asarray(factors.b, jnp.float32)
    a = jnp.asarray(factors.a, jnp.float32)  # A^T: [..., n, k]
    dead = jnp.all(a == 0, axis=(-2, -1), keepdims=True)
    noise = self.init_scale * jax.random.normal(key, a.shape, jnp.float32)
    a = jnp.where(dead, noise, a)
    b = keep * b + gamma * self._regress(target, a)
    a = keep * a + gamma * self._regress(_mT(target), b)
    return LoRAPreFactors(b=b, a=a)


COMPRESSORS: dict[str, type[MomentCompressor]] = {
    'rsvd': RSVDCompressor,
    'warm': WarmStartCompressor,
    'lorapre': LoRAPreCompressor,
}
"""The compressors that ``compressor=`` accepts by name."""


def resolve_compressor(
    compressor: str | MomentCompressor, *, oversample: int, power_iters: int
) -> MomentCompressor:
  """The compressor object for a transform's ``compressor=`` argument.

  A name builds the compressor with the transform's ``oversample`` and
  ``power_iters`` (which only the RSVD compressors have); an object is used
  as it is, and then those two arguments must keep their defaults, so that
  no setting is silently ignored.

  Raises:
    ValueError: an unknown name (the message lists the valid ones), or
      ``oversample`` / ``power_iters`` given where they do not apply.
    TypeError: neither a name nor a :class:`MomentCompressor`.
  """
  oversample = checks.check_int('oversample', oversample, 0)
  power_iters = checks.check_int('power_iters', power_iters, 0)
  sketch_args = {'oversample': oversample, 'power_iters': power_iters}
  given = [k for k, v in sketch_args.items() if v]
  if isinstance(compressor, MomentCompressor):
    if given:
      raise ValueError(
          f'compressor is a {type(compressor).__name__} object, so '
          f'{" and ".join(given)} must be set on it, not on the transform.'
      )
    return compressor
  if not isinstance(compressor, str):
    raise TypeError(
        f'compressor must be a name ({", ".join(map(repr, COMPRESSORS))}) or '
        f'a MomentCompressor, got {compressor!r}.'
    )
  if compressor not in COMPRESSORS:
    raise ValueError(
        f'Unknown compressor {compressor!r}; valid names: '
        f'{", ".join(map(repr, COMPRESSORS))} (or pass a MomentCompressor).'
    )
  cls = COMPRESSORS[compressor]
  if issubclass(cls, RSVDCompressor):
    return cls(**sketch_args)
  if given:
    raise ValueError(
        f'compressor={compressor!r} has no sketch: {" and ".join(given)} '
        'do not apply to it.'
    )
  return cls()
