"""Moment compressors: how a low-rank moment is stored, read and refreshed.

:func:`mlorc_optax.low_rank_moments` keeps, for every compressed matrix
moment, a few factors instead of the dense ``m x n`` moment. A *compressor*
decides three things:

1. which factors the optimizer state holds (:meth:`MomentCompressor.specs`);
2. the dense moment read back from them before the inner optimizer mixes in
   the new gradient (:meth:`MomentCompressor.read`);
3. the new factors, given the previous ones, the new dense moment and the
   gradient (:meth:`MomentCompressor.update`).

The wrapper always steps in the same way (the MLorc paper's claim that it
applies to any momentum optimizer, Algorithms 1 and 2 being two instances):

.. math::

  \\tilde M_{t-1} = \\mathrm{read}(F_{t-1}),\\quad
  (u_t, M_t) = \\mathrm{inner}(g_t, \\tilde M_{t-1}),\\quad
  F_t = \\mathrm{update}(F_{t-1}, M_t, g_t),

and the update ``u_t`` uses the *uncompressed* ``M_t``. The paper's
compressor, :class:`RSVDCompressor`, is a randomized SVD of ``M_t`` with a
fresh Gaussian sketch every step (Algorithm 3). Others, beyond the paper,
live in :mod:`mlorc_optax.contrib` (a warm-started sketch, LoRA-Pre).

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

from mlorc_optax._src import checks
from mlorc_optax._src import rsvd
from mlorc_optax._src import step_math


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
    >>> from mlorc_optax.compressors import nonnegative_second_moment
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

    >>> from mlorc_optax import compressors
    >>> specs = compressors.RSVDCompressor().specs((6,), 512, 2048, 4)
    >>> specs.u
    FactorSpec(shape=(6, 512, 4), placement='rows')
    >>> specs.s
    FactorSpec(shape=(6, 4), placement='batch')
  """

  shape: tuple[int, ...]
  placement: str


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
    ... class TruncatedSVD(mlorc_optax.compressors.RSVDCompressor):
    ...   name: ClassVar[str] = 'truncated_svd'
    ...   def sketch(self, factors, key, batch_shape, cols, width):
    ...     return None  # Y = A: Q spans the whole range, the SVD is exact
    >>> tx = mlorc_optax.mlorc_adamw(1e-3, rank=1, compressor=TruncatedSVD())
    >>> params = {'w': jnp.zeros((4, 3))}
    >>> g = {'w': jnp.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [0, 0, 0]])}
    >>> _, state = tx.update(g, tx.init(params), params)
    >>> state[0].inner_state.mu['w'].s  # (1 - b1) * 3: the top singular value
    Array([0.3], dtype=float32)
  """

  name: ClassVar[str]
  factor_type: ClassVar[type]

  @abc.abstractmethod
  def specs(
      self, batch_shape: tuple[int, ...], rows: int, cols: int, rank: int,
      *, nonnegative: bool = False,
  ) -> tuple[FactorSpec, ...]:
    """A ``NamedTuple`` of :class:`FactorSpec` for ``[*batch, rows, cols]``.

    The initial factors are zeros of these shapes: an all-zero moment. Its
    type is the type of the factors this compressor stores for such a
    moment: ``factor_type``, unless the compressor stores non-negative
    moments (``nonnegative=True``) differently.
    """

  @abc.abstractmethod
  def read(
      self,
      factors: Any,
      *,
      nonnegative: bool,
      decay: jax.typing.ArrayLike | None,
      count: jax.typing.ArrayLike,
  ) -> jax.Array:
    """The dense float32 moment ``[*batch, rows, cols]`` the factors stand for.

    Args:
      factors: a ``factor_type`` of arrays (any float dtype).
      nonnegative: True for a non-negative moment (Adam's second moment),
        which must come back non-negative.
      decay: the moment's EMA decay where the optimizer declares it (the
        MLorc-Adam and -Lion transforms do), else None.
      count: how many updates the factors have seen (the state's ``count``);
        the moment is read with the bias of an EMA started at zero that many
        steps ago, ``1 - decay**count``, as Adam's bias correction expects.
    """

  def left_basis(self, factors: Any) -> jax.Array | None:
    """An orthonormal basis ``[*batch, rows, k]`` of the moment's column span.

    The span in which the compressed moment keeps its history; the first
    moment's complement (``MomentSpec.complement``) is the gradient's part
    outside it. None (the default): the factors have no such basis, and the
    complement cannot be used with this compressor.
    """
    del factors
    return None

  @abc.abstractmethod
  def update(
      self,
      factors: Any,
      *,
      moment: jax.Array,
      grad: jax.Array,
      key: jax.Array,
      decay: jax.typing.ArrayLike | None,
      nonnegative: bool,
  ) -> Any:
    """The new factors (float32) after a step.

    Args:
      factors: the previous factors (what :meth:`read` was given this step).
      moment: the new dense float32 moment ``m_t`` (or ``v_t``).
      grad: the float32 gradient ``g_t`` as ``[*batch, rows, cols]``.
      key: a raw PRNG key for this moment and step.
      decay: the moment's EMA decay (``b1``, ``b2``; Lion's ``b2``) where
        the optimizer declares it, else None.
      nonnegative: True for a non-negative moment (for Adam's second moment
        ``moment`` is the EMA of ``g**2``).
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
    >>> from mlorc_optax import compressors
    >>> tx = mlorc_optax.mlorc_adamw(
    ...     1e-3, compressor=compressors.RSVDCompressor(oversample=2))
    >>> state = tx.init({'w': jnp.zeros((16, 8))})
    >>> state[0].inner_state.mu['w'].u.shape
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

  def specs(self, batch_shape, rows, cols, rank, *, nonnegative=False):
    del nonnegative
    return rsvd.LowRankFactors(
        u=FactorSpec((*batch_shape, rows, rank), 'rows'),
        s=FactorSpec((*batch_shape, rank), 'batch'),
        v=FactorSpec((*batch_shape, cols, rank), 'cols'),
    )

  def read(self, factors, *, nonnegative, decay=None, count=None):
    del decay, count
    x = rsvd.reconstruct(factors)
    return nonnegative_second_moment(x) if nonnegative else x

  def left_basis(self, factors):
    """``U``: orthonormal columns from the SVD (zeros before the first step).
    """
    return jnp.asarray(factors.u, jnp.float32)

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

  def update(self, factors, *, moment, grad, key, decay, nonnegative):
    del grad, decay, nonnegative
    *batch, rows, cols = moment.shape
    rank = factors.s.shape[-1]
    bound = step_math.overflow_bound(rows, cols)
    x = jnp.clip(moment, -bound, bound)
    width = rsvd.sketch_width(rows, cols, rank, self.oversample)
    omega = self.sketch(factors, key, tuple(batch), cols, width)
    return rsvd.randomized_svd_from_sketch(
        x, omega, rank, power_iters=self.power_iters
    )


def has_left_basis(compressor: MomentCompressor) -> bool:
  """Whether ``compressor`` overrides :meth:`MomentCompressor.left_basis`,
  so that the first moment's complement can be computed with it."""
  return type(compressor).left_basis is not MomentCompressor.left_basis


def streamable(compressor: MomentCompressor) -> bool:
  """Whether the two-pass step can compute ``compressor``'s factors.

  The two-pass step (:mod:`mlorc_optax._src.two_pass`) computes the
  randomized SVD of :class:`RSVDCompressor` itself, with the compressor's
  own :meth:`RSVDCompressor.sketch`: so it serves the RSVD and subclasses
  that change only the sketch (such as the warm start of
  :mod:`mlorc_optax.contrib`), without power iterations.
  """
  base = RSVDCompressor
  return (
      isinstance(compressor, base)
      and all(getattr(type(compressor), f) is getattr(base, f)
              for f in ('read', 'update', 'specs'))
      and compressor.power_iters == 0
  )
