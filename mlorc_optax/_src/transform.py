"""MLorc-Adam and MLorc-Lion as optax ``scale_by`` transforms.

Each is :func:`mlorc_optax.low_rank_moments` around the optax transform of
its base optimizer (``optax.scale_by_adam``, ``optax.scale_by_lion``), which
computes the update from the reconstructed moments, with the two-pass step
(:class:`mlorc_optax.low_rank.AdamFastStep` / ``LionFastStep``) as its
accelerated implementation: paper Algorithms 1 and 2 without learning rate
and weight decay.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import checks
from mlorc_optax._src import compressors
from mlorc_optax._src import fast_steps
from mlorc_optax._src import low_rank
from mlorc_optax._src import plan
from mlorc_optax._src import step_math
from mlorc_optax._src.kernels import launch

_MOMENTS = ('mu', 'nu')

#: The RSVD's extra sketch columns when ``oversample`` is left unset with
#: ``compressor='rsvd'`` (the paper uses 0). Measured in ``docs/quality.md``:
#: on the Shakespeare benchmark (rank 4, with the complement) it took
#: MLorc-AdamW from +1.8 % to +0.2 % of AdamW's validation loss, at the same
#: state size and no measurable cost in the fused step's time (its sketches
#: are padded to 16 columns either way).
DEFAULT_OVERSAMPLE = 4

#: The complement's weight when ``complement`` is left unset (the paper's
#: step is 0): the largest lever measured in ``docs/quality.md``.
DEFAULT_COMPLEMENT = 1.0

#: The keyword arguments that turn off every default beyond the paper, so
#: that ``mlorc_adamw(lr, b1=0.8, **PAPER_ADAMW)`` is the paper's
#: Algorithm 1 exactly (``docs/quality.md``).
PAPER_ADAMW = types.MappingProxyType(
    {'oversample': 0, 'complement': 0.0, 'update_bound': None})
#: As :data:`PAPER_ADAMW`, for ``mlorc_lion`` (paper Algorithm 2).
PAPER_LION = types.MappingProxyType({'oversample': 0, 'complement': 0.0})


def _compressor(
    compressor: str | compressors.MomentCompressor, *,
    oversample: int | None, power_iters: int
) -> compressors.MomentCompressor:
  """The compressor object for ``compressor=``; raises naming the argument.

  ``'rsvd'`` builds the paper's compressor with ``oversample`` (None:
  :data:`DEFAULT_OVERSAMPLE`) and ``power_iters``; an object is used as it
  is, and then those two must keep their defaults (None, 0), so that no
  setting is silently ignored.
  """
  if oversample is not None:
    oversample = checks.check_int('oversample', oversample, 0)
  power_iters = checks.check_int('power_iters', power_iters, 0)
  if isinstance(compressor, compressors.MomentCompressor):
    given = [name for name, is_set in (('oversample', oversample is not None),
                                       ('power_iters', power_iters != 0))
             if is_set]
    if given:
      raise ValueError(
          f'compressor is a {type(compressor).__name__} object, so '
          f'{" and ".join(given)} must be set on it, not on the transform.'
      )
    return compressor
  if not isinstance(compressor, str):
    raise TypeError(
        f"compressor must be 'rsvd' or a MomentCompressor object, got "
        f'{compressor!r}.')
  if compressor == 'rsvd':
    return compressors.RSVDCompressor(
        DEFAULT_OVERSAMPLE if oversample is None else oversample, power_iters)
  raise ValueError(
      f"compressor must be 'rsvd' or a MomentCompressor object, got "
      f'{compressor!r}. The warm-started sketch and LoRA-Pre are objects of '
      'mlorc_optax.contrib (WarmStartCompressor(), LoRAPreCompressor()).'
  )


def _complement_mode(complement_mode: str) -> str:
  """``complement_mode=``, checked (:data:`low_rank.COMPLEMENT_MODES`)."""
  if complement_mode not in low_rank.COMPLEMENT_MODES:
    raise ValueError(f'complement_mode must be one of '
                     f'{low_rank.COMPLEMENT_MODES}, got {complement_mode!r}.')
  return complement_mode


def _complement(complement: jax.typing.ArrayLike | None, *,
                moments: tuple[str, ...],
                compressor: compressors.MomentCompressor
                ) -> jax.typing.ArrayLike:
  """The first moment's complement weight for ``complement=``.

  None (unset) is :data:`DEFAULT_COMPLEMENT` where a complement exists (the
  first moment among the compressed ``moments``, by a compressor with an
  orthonormal left basis) and 0 elsewhere. A weight given explicitly is used
  as it is (and checked by :func:`mlorc_optax.low_rank_moments`); a nonzero
  one for a first moment kept dense raises, naming ``complement``.
  """
  if complement is None:
    exists = 'mu' in moments and compressors.has_left_basis(compressor)
    return DEFAULT_COMPLEMENT if exists else 0.0
  if 'mu' not in moments and checks.is_nonzero_weight(complement):
    raise ValueError(
        f'complement is {complement!r}, but compress={moments!r} keeps the '
        'first moment dense: it has no complement.')
  return complement


def _compress(compress: Sequence[str]) -> tuple[str, ...]:
  if isinstance(compress, str):
    compress = (compress,)
  compress = tuple(compress)
  unknown = [c for c in compress if c not in _MOMENTS]
  if unknown or not compress or len(set(compress)) != len(compress):
    raise ValueError(
        f'compress must be a non-empty subset of {_MOMENTS} without '
        f'repeats, got {compress!r}.'
    )
  return compress


def scale_by_mlorc_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    rank: int = 4,
    oversample: int | None = None,
    power_iters: int = 0,
    seed: int | jax.Array = 0,
    factor_dtype: jax.typing.DTypeLike = jnp.float32,
    compress: Sequence[str] = ('mu', 'nu'),
    low_rank_mask: plan.MaskSpec = None,
    dimension_numbers: plan.DimensionSpec = None,
    compressor: str | compressors.MomentCompressor = 'rsvd',
    implementation: str | None = None,
    kernel_config: launch.KernelConfig | None = None,
    complement: jax.typing.ArrayLike | None = None,
    complement_mode: str = 'moment',
    update_bound: str | float | None = 'adam',
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam with low-rank compressed moments (MLorc).

  Paper Algorithm 1 without the learning rate and weight decay, a drop-in
  replacement for ``optax.scale_by_adam``. For each compressed leaf (viewed as
  a batch of ``m x n`` matrices), with factors kept from the previous step:

  .. math::

    \\tilde m = U_m S_m V_m^\\top,\\quad
    \\tilde v = \\mathrm{fix}(U_v S_v V_v^\\top),\\quad
    m = \\beta_1 \\tilde m + (1-\\beta_1) g,\\quad
    v = \\beta_2 \\tilde v + (1-\\beta_2) g^2,

    u = \\frac{m / (1-\\beta_1^t)}{\\sqrt{v / (1-\\beta_2^t) + \\epsilon_{root}}
    + \\epsilon},\\qquad
    (U_m, S_m, V_m) = \\mathrm{RSVD}(m, r),\\ (U_v, S_v, V_v) =
    \\mathrm{RSVD}(v, r),

  where ``fix`` is :func:`mlorc_optax.compressors.nonnegative_second_moment`.
  The update ``u`` uses the uncompressed ``m`` and ``v``; the factors start
  at zero, so the first step is exactly Adam's first step. Three defaults go
  beyond the paper, each chosen by measurement (``docs/quality.md``):
  every entry of ``u`` is clipped to the largest value dense Adam's update
  can take (``update_bound='adam'``), ``complement=1.0`` credits the
  gradient's part outside the first moment's rank-``r`` span with the
  history of a persistent gradient, and the RSVD oversamples by
  ``oversample=4`` columns. ``**mlorc_optax.PAPER_ADAMW`` turns all three
  off: the paper's Algorithm 1 exactly. Leaves that are not compressed keep
  Adam's own dense moments, so they are never skipped or frozen.

  It is :func:`mlorc_optax.low_rank_moments` around
  ``optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)``
  (which computes the update, bias correction included, from the
  reconstructed moments), with the two-pass step
  (:class:`mlorc_optax.low_rank.AdamFastStep`) as its accelerated
  implementation.
  ``compressor`` replaces how the factors are read and refreshed (the lines
  with ``RSVD`` and ``fix`` above): ``'rsvd'`` is the paper's; others are in
  :mod:`mlorc_optax.contrib` (see ``docs/compressors.md``).

  .. warning::
    Which leaves are compressed is decided by ``low_rank_mask`` (default: see
    :func:`mlorc_optax.compression_plan`, which also shows the decision per
    leaf). Embeddings, biases and norm scales are not compressed by default.

  Args:
    b1: decay of the first moment (the paper recommends 0.8 for MLorc-AdamW to
      damp the compression error; 0.9 is optax's default).
    b2: decay of the second moment.
    eps: added to the denominator outside the square root (as optax and the
      official code; the paper's line 15 writes it inside).
    eps_root: added inside the square root (the paper's ``epsilon``).
    mu_dtype: dtype of the first moment of the leaves that are not compressed
      (as in ``optax.scale_by_adam``).
    nesterov: Nadam-style update, as ``optax.scale_by_adam(nesterov=True)``.
    rank: rank ``r`` of the factors (static; >= 1).
    oversample: extra sketch columns ``p`` of the RSVD (static; >= 0).
      None (unset): :data:`DEFAULT_OVERSAMPLE` (4) for ``compressor='rsvd'``
      (the paper's is 0); with a compressor object, set it on the object.
    power_iters: power iterations of the RSVD (static; >= 0).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: dtype in which factors (and moments kept dense by
      ``compress``) are stored; computation is always float32.
    compress: which moments of the compressed leaves are stored low-rank:
      ``('mu', 'nu')`` (the paper), or ``('mu',)`` / ``('nu',)`` for the
      paper's ablation (Table 7), the other moment then kept dense.
    low_rank_mask: which leaves are compressed: None (default rule), a bool, a
      pytree of bools (matched to the params by path; prefix trees allowed) or
      a callable ``params -> pytree of bools``.
    dimension_numbers: how leaves are viewed as matrices: None (last two axes
      are rows and columns, leading axes batch), a
      :class:`MatrixDimensionNumbers` for all leaves, or a pytree / callable
      giving one per leaf.
    compressor: how the compressed moments are stored and refreshed (static):
      ``'rsvd'`` (default, the paper's) or a
      :class:`mlorc_optax.compressors.MomentCompressor` object (then set its
      own ``oversample`` / ``power_iters``; the transform's must stay 0).
    implementation: how the step is computed (static): None (default:
      automatic), ``'reference'`` (the algorithm as written: dense moments,
      Householder QR and SVD), ``'pallas'`` (two streaming passes over the
      gradient in Pallas kernels, the moments rebuilt block by block and never
      stored; Gram-based small factorizations) or ``'xla'`` (the same two
      passes in ``jax.numpy``). All compute the same update and the same
      randomized SVD (same sketches) up to float32 rounding. Automatic picks
      ``'pallas'`` on NVIDIA GPUs (on a mesh of several, inside
      ``jax.shard_map`` where ``init`` sees the parameter's placement) where
      the settings allow it
      (``compressor`` ``'rsvd'`` or ``'warm'`` without power iterations, both
      moments compressed) and ``'reference'`` otherwise;
      :func:`mlorc_optax.format_plan` shows the choice per leaf and why.
    kernel_config: the Pallas kernels' settings
      (:class:`mlorc_optax.kernels.KernelConfig`; static).
    complement: weight ``lambda >= 0`` of the first moment's complement
      (0: the paper's step; None, unset: 1.0 where the first moment is
      compressed by a compressor with an orthonormal left basis, else 0).
      With ``U`` the previous first moment's left factor,
      ``lambda (1 - b1^(t-1)) (I - U U^T) g`` is added to ``tilde m`` for
      the update only (the stored moment stays the paper's),
      so that at ``lambda = 1`` a gradient direction outside the rank-``r``
      span gets ``m_hat = g``, the step of a persistent gradient, instead of
      ``(1 - b1) g / (1 - b1^t)``. See
      :class:`mlorc_optax.low_rank.MomentSpec`. Costs one more read of the
      gradient per step.
    complement_mode: how the complement enters the step (static):
      ``'moment'`` (default; as above), ``'state'`` (kept in the stored
      moment too, so the compressed subspace follows a gradient that
      persists outside it) or ``'norm'`` (Fira's norm-based scaling: the
      update gets ``phi lambda (1 - b1^(t-1)) (I - U U^T) g`` with ``phi =
      ||U^T u|| / ||U^T g||``, the moments left alone);
      :class:`mlorc_optax.low_rank.MomentSpec`. Only ``'moment'`` has a
      two-pass step: the others take the reference step.
    update_bound: the largest magnitude of an update entry of a compressed
      leaf: ``'adam'`` (default) the bound that dense Adam's own update
      never exceeds with these ``b1``, ``b2`` at step ``t`` (1 at ``t = 1``,
      about 7.3 for the defaults and 10.6 for ``b1 = 0.8`` as ``t`` grows;
      :func:`mlorc_optax.low_rank.adam_update_bound`), a number, or None
      (no bound: the paper's step). A reconstructed second moment that is
      too small (the compression's error) gives steps dense Adam can never
      take; the bound removes exactly those.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`~mlorc_optax.LowRankMomentsState` around
    ``optax.ScaleByAdamState``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((16, 8)), 'b': jnp.zeros(8)}
    >>> tx = optax.chain(mlorc_optax.scale_by_mlorc_adam(rank=2),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu['w'].u.shape  # factors, not a 16 x 8 moment
    (16, 2)
    >>> updates, state = tx.update(params, state)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897,
    Algorithm 1.
  """
  checks.check_beta('b1', b1)
  checks.check_beta('b2', b2)
  checks.check_nonnegative('eps', eps)
  checks.check_nonnegative('eps_root', eps_root)
  nesterov = checks.check_bool('nesterov', nesterov)
  moments = _compress(compress)
  compressor = _compressor(compressor, oversample=oversample,
                           power_iters=power_iters)
  complement = _complement(complement, moments=moments, compressor=compressor)
  specs = {'mu': low_rank.MomentSpec(decay=b1, complement=complement,
                                     complement_mode=_complement_mode(
                                         complement_mode)),
           'nu': low_rank.MomentSpec(nonnegative=True, decay=b2)}
  return low_rank.low_rank_moments(
      optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
      rank=rank,
      compressor=compressor,
      moments={name: specs[name] for name in moments},
      seed=seed,
      factor_dtype=factor_dtype,
      low_rank_mask=low_rank_mask,
      dimension_numbers=dimension_numbers,
      implementation=implementation,
      fast_step=fast_steps.AdamFastStep(b1, b2, eps, eps_root, nesterov),
      kernel_config=kernel_config,
      update_bound=_update_bound(update_bound, b1, b2, nesterov),
  )


def _update_bound(update_bound, b1, b2, nesterov):
  """``update_bound=`` as a function of the step number; raises naming it."""
  if update_bound is None:
    return None
  if isinstance(update_bound, str):
    if update_bound != 'adam':
      raise ValueError(
          f"update_bound must be 'adam', a positive number or None, got "
          f'{update_bound!r}.')
    return lambda t: step_math.adam_update_bound(b1, b2, t, nesterov)
  checks.check_positive('update_bound', update_bound)
  return lambda t: jnp.asarray(update_bound, jnp.float32)


def scale_by_mlorc_lion(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    rank: int = 4,
    oversample: int | None = None,
    power_iters: int = 0,
    seed: int | jax.Array = 0,
    factor_dtype: jax.typing.DTypeLike = jnp.float32,
    low_rank_mask: plan.MaskSpec = None,
    dimension_numbers: plan.DimensionSpec = None,
    compressor: str | compressors.MomentCompressor = 'rsvd',
    implementation: str | None = None,
    kernel_config: launch.KernelConfig | None = None,
    complement: jax.typing.ArrayLike | None = None,
    complement_mode: str = 'moment',
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Lion with a low-rank compressed momentum (MLorc).

  Paper Algorithm 2 without the learning rate and weight decay, a drop-in
  replacement for ``optax.scale_by_lion``. For each compressed leaf:

  .. math::

    \\tilde m = U S V^\\top,\\quad
    c = \\beta_1 \\tilde m + (1-\\beta_1) g,\\quad
    m = \\beta_2 \\tilde m + (1-\\beta_2) g,\\quad
    u = \\mathrm{sign}(c),\\quad (U, S, V) = \\mathrm{RSVD}(m, r).

  It is :func:`mlorc_optax.low_rank_moments` around
  ``optax.scale_by_lion(b1, b2, mu_dtype)``, whose own momentum the leaves
  that are not compressed keep, with the two-pass step as its accelerated
  implementation. ``compressor`` replaces the RSVD as in
  :func:`scale_by_mlorc_adam`.

  Args:
    b1: rate combining the momentum and the current gradient.
    b2: decay of the momentum.
    mu_dtype: dtype of the momentum of the leaves that are not compressed.
    rank: rank ``r`` of the factors (static; >= 1).
    oversample: extra sketch columns of the RSVD (static; >= 0; None, unset:
      4 for ``compressor='rsvd'``, the paper's is 0).
    power_iters: power iterations of the RSVD (static; >= 0).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: dtype in which the factors are stored.
    low_rank_mask: which leaves are compressed (see
      :func:`scale_by_mlorc_adam`).
    dimension_numbers: how leaves are viewed as matrices (see
      :func:`scale_by_mlorc_adam`).
    compressor: ``'rsvd'`` (default) or a
      :class:`mlorc_optax.compressors.MomentCompressor` (static; see
      :func:`scale_by_mlorc_adam`).
    implementation: as :func:`scale_by_mlorc_adam`'s (static). Lion's two
      passes need only ``g Omega`` and ``Q^T g`` besides the update, since
      its momentum is linear in ``g``.
    kernel_config: the Pallas kernels' settings (static).
    complement: weight ``lambda >= 0`` of the momentum's complement (0: the
      paper's step; None, unset: 1.0 where the compressor has an orthonormal
      left basis, else 0): ``lambda (1 - b2^(t-1)) (I - U U^T) g`` is
      added to ``tilde m`` in ``c`` (not to the stored momentum), so that at
      ``lambda = 1`` a direction outside the rank-``r`` span gets the sign
      of a persistent gradient's ``c`` instead of ``sign((1 - b1) g)`` alone
      (see :func:`scale_by_mlorc_adam`). One more read of the gradient.
    complement_mode: ``'moment'`` (default), ``'state'`` or ``'norm'``, as
      for :func:`scale_by_mlorc_adam` (static; with ``'norm'``, ``phi`` is
      the ratio by which the sign update scaled the gradient in the span).

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`~mlorc_optax.LowRankMomentsState` around
    ``optax.ScaleByLionState``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((16, 8)), 'b': jnp.zeros(8)}
    >>> tx = mlorc_optax.scale_by_mlorc_lion(rank=2)
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates['w'][0, :3]
    Array([1., 1., 1.], dtype=float32)

  References:
    Shen et al., https://arxiv.org/abs/2506.01897, Algorithm 2; Chen et al.,
    *Symbolic Discovery of Optimization Algorithms*,
    https://arxiv.org/abs/2302.06675.
  """
  checks.check_beta('b1', b1)
  checks.check_beta('b2', b2)
  compressor = _compressor(compressor, oversample=oversample,
                           power_iters=power_iters)
  complement = _complement(complement, moments=('mu',),
                           compressor=compressor)
  return low_rank.low_rank_moments(
      optax.scale_by_lion(b1, b2, mu_dtype),
      rank=rank,
      compressor=compressor,
      moments={'mu': low_rank.MomentSpec(decay=b2, complement=complement,
                                         complement_mode=_complement_mode(
                                             complement_mode))},
      seed=seed,
      factor_dtype=factor_dtype,
      low_rank_mask=low_rank_mask,
      dimension_numbers=dimension_numbers,
      implementation=implementation,
      fast_step=fast_steps.LionFastStep(b1, b2),
      kernel_config=kernel_config,
  )
