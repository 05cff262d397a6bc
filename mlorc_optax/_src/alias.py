"""The MLorc optimizers ``mlorc_adamw`` and ``mlorc_lion``: chains only.

They chain :func:`mlorc_optax.scale_by_mlorc_adam` /
:func:`mlorc_optax.scale_by_mlorc_lion` exactly as ``optax.adamw`` and
``optax.lion`` chain ``scale_by_adam`` / ``scale_by_lion``, with the same
arguments in the same order, so that they are drop-in replacements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mlorc_optax._src import compressors
from mlorc_optax._src import plan
from mlorc_optax._src import transform
from mlorc_optax._src.kernels import launch

#: The arguments of the MLorc factories that set shapes or select code, which
#: ``optax.inject_hyperparams`` must not turn into traced hyperparameters:
#: ``optax.inject_hyperparams(mlorc_optax.mlorc_adamw,
#: static_args=mlorc_optax.STATIC_ARGS)(learning_rate=1e-3)``. It treats ints
#: as numbers and callables (dtypes such as ``jnp.float32``, masks) as
#: schedules; bools, strings, None and compressor or kernel-config objects
#: stay static without it. ``mask`` and ``mu_dtype`` are listed for the same
#: reasons as for ``optax.adamw``; ``complement`` because 0 (the paper's
#: step) skips its computation, which a traced 0 cannot.
STATIC_ARGS: tuple[str, ...] = (
    'rank', 'oversample', 'power_iters', 'factor_dtype', 'low_rank_mask',
    'dimension_numbers', 'mask', 'mu_dtype', 'complement',
)

def mlorc_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  """AdamW whose moments are stored as low-rank factors (MLorc-AdamW).

  Paper Algorithm 1: the optimizer state of every compressed ``m x n`` matrix
  is ``2(m + n)r`` numbers (plus ``2r`` singular values) instead of ``2mn``.
  Built like ``optax.adamw``, with the same arguments in the same order and
  the same defaults, so replacing ``optax.adamw(...)`` by
  ``mlorc_optax.mlorc_adamw(...)`` is a drop-in change::

    chain(scale_by_mlorc_adam(b1, b2, eps, eps_root, mu_dtype, ...),
          add_decayed_weights(weight_decay, mask),
          scale_by_learning_rate(learning_rate))

  For a compressed matrix ``W`` with gradient ``g_t`` and the factors of
  step ``t - 1``, learning rate ``alpha_t`` and weight decay ``lambda``:

  .. math::

    m_t = \\beta_1 U_m S_m V_m^\\top + (1-\\beta_1) g_t,\\quad
    v_t = \\beta_2 \\operatorname{fix}(U_v S_v V_v^\\top) + (1-\\beta_2) g_t^2,

    W_{t+1} = W_t - \\alpha_t \\Bigl(\\frac{m_t / (1-\\beta_1^t)}
    {\\sqrt{v_t / (1-\\beta_2^t) + \\epsilon_{root}} + \\epsilon}
    + \\lambda W_t\\Bigr),

  after which ``m_t`` and ``v_t`` are recompressed to rank ``r`` by
  :func:`mlorc_optax.randomized_svd` and ``fix`` is
  :func:`mlorc_optax.nonnegative_second_moment`. At ``rank >= min(m, n)`` for
  every compressed leaf it computes exactly what ``optax.adamw`` computes (up
  to float32 rounding of the RSVD).

  Beyond the paper, the defaults bound each update entry by dense Adam's
  (``update_bound='adam'``), add the first moment's complement
  (``complement=1.0``) and oversample the RSVD (``oversample=4``); on the
  Shakespeare benchmark they take MLorc-AdamW r=4 from +6.9 % to +0.2 % of
  AdamW's validation loss (``docs/quality.md``). The paper's algorithm and
  settings: ``mlorc_adamw(lr, b1=0.8, rank=4, **mlorc_optax.PAPER_ADAMW)``
  (rank 4 for LLaMA2-7B, 8 for RoBERTa-base; ``b1=0.8`` damps the
  compression error; a learning rate close to full fine-tuning's, 7e-5 vs
  4e-5 in their LLaMA2-7B runs).

  .. warning::
    Only the leaves chosen by ``low_rank_mask`` are compressed (default:
    floating matrices whose last path name is not ``bias``, ``scale`` or
    ``embedding`` and with ``min(rows, cols) > rank``); all other leaves get
    plain AdamW. Inspect the choice with :func:`mlorc_optax.compression_plan`.

  Args:
    learning_rate: a scalar or an ``optax`` schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    mu_dtype: first-moment dtype of the leaves that are not compressed.
    weight_decay: decoupled weight decay (scalar or schedule).
    mask: which leaves get weight decay, exactly as ``optax.adamw``'s
      ``mask`` (a pytree of bools or a callable); independent of compression.
    nesterov: Nadam-style update.
    rank: factor rank ``r`` (static).
    oversample: RSVD oversampling ``p`` (static; unset: 4, the paper's 0).
    power_iters: RSVD power iterations (static).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: storage dtype of the factors (computation is float32).
    compress: ``('mu', 'nu')``, ``('mu',)`` or ``('nu',)``: which moments are
      low-rank (the paper's ablation keeps the other one dense).
    low_rank_mask: which leaves are compressed (see
      :func:`mlorc_optax.compression_plan`).
    dimension_numbers: how leaves are viewed as matrices (see
      :class:`mlorc_optax.MatrixDimensionNumbers`).
    compressor: how the moments are compressed (static): ``'rsvd'`` (the
      paper's randomized SVD, default) or a
      :class:`mlorc_optax.compressors.MomentCompressor`, for example
      :class:`mlorc_optax.contrib.WarmStartCompressor` (see
      ``docs/compressors.md``).
    implementation: ``None`` (automatic: the fused two-pass Pallas step on
      NVIDIA GPUs, sharded where ``init`` sees a mesh; the reference step
      elsewhere), ``'reference'``, ``'pallas'`` or ``'xla'``; see
      :func:`mlorc_optax.scale_by_mlorc_adam`.
    kernel_config: the Pallas kernels' settings
      (:class:`mlorc_optax.kernels.KernelConfig`; static).
    complement: weight of the first moment's complement (unset: 1.0; 0: the
      paper's step); see :func:`mlorc_optax.scale_by_mlorc_adam`.
    complement_mode: ``'moment'`` (default), ``'state'`` or ``'norm'``
      (Fira's scaling): how the complement enters the step; see
      :func:`mlorc_optax.scale_by_mlorc_adam`.
    update_bound: ``'adam'`` (default: no update entry larger than dense
      Adam's can be), a number, or None (the paper's Algorithm 1 exactly);
      see :func:`mlorc_optax.scale_by_mlorc_adam`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((32, 16)), 'b': jnp.zeros(16)}
    >>> loss = lambda p: jnp.sum((jnp.ones(32) @ p['w'] + p['b']) ** 2)
    >>> tx = mlorc_optax.mlorc_adamw(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 32.0 ** 2 * 16)
    True
    >>> state[0].inner_state.mu['w'].u.shape  # factors, not a 32 x 16 moment
    (32, 4)

  References:
    Shen et al., *MLorc: Momentum Low-rank Compression for Memory Efficient
    Large Language Model Adaptation*, https://arxiv.org/abs/2506.01897;
    Loshchilov & Hutter, *Decoupled Weight Decay Regularization*,
    https://arxiv.org/abs/1711.05101.
  """
  return optax.chain(
      transform.scale_by_mlorc_adam(
          b1=b1,
          b2=b2,
          eps=eps,
          eps_root=eps_root,
          mu_dtype=mu_dtype,
          nesterov=nesterov,
          rank=rank,
          oversample=oversample,
          power_iters=power_iters,
          seed=seed,
          factor_dtype=factor_dtype,
          compress=compress,
          low_rank_mask=low_rank_mask,
          dimension_numbers=dimension_numbers,
          compressor=compressor,
          implementation=implementation,
          kernel_config=kernel_config,
          complement=complement,
          complement_mode=complement_mode,
          update_bound=update_bound,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def mlorc_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.99,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
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
  """Lion whose momentum is stored as low-rank factors (MLorc-Lion).

  Paper Algorithm 2, built like ``optax.lion`` with the same arguments,
  order and defaults::

    chain(scale_by_mlorc_lion(b1, b2, mu_dtype, ...),
          add_decayed_weights(weight_decay, mask),
          scale_by_learning_rate(learning_rate))

  For a compressed matrix ``W`` with gradient ``g_t``, the factors of step
  ``t - 1``, learning rate ``alpha_t`` and weight decay ``lambda``:

  .. math::

    c_t = \\beta_1 U S V^\\top + (1-\\beta_1) g_t,\\quad
    m_t = \\beta_2 U S V^\\top + (1-\\beta_2) g_t,\\quad
    W_{t+1} = W_t - \\alpha_t \\bigl(\\operatorname{sign}(c_t)
    + \\lambda W_t\\bigr),

  after which ``m_t`` is recompressed to rank ``r`` by
  :func:`mlorc_optax.randomized_svd`. The paper's MLorc-Lion beat full Lion
  on GSM8K with LLaMA2-7B at rank 4 (47.75 vs 46.38). As for Lion, use a
  learning rate 3-10x smaller than AdamW's and a larger weight decay.

  .. warning::
    Only the leaves chosen by ``low_rank_mask`` are compressed; the others
    get plain Lion. See :func:`mlorc_optax.compression_plan`.

  Args:
    learning_rate: a scalar or an ``optax`` schedule.
    b1: rate combining the momentum and the current gradient.
    b2: momentum decay.
    mu_dtype: momentum dtype of the leaves that are not compressed.
    weight_decay: decoupled weight decay (scalar or schedule).
    mask: which leaves get weight decay, as ``optax.lion``'s ``mask``.
    rank: factor rank ``r`` (static).
    oversample: RSVD oversampling (static; unset: 4, the paper's 0).
    power_iters: RSVD power iterations (static).
    seed: int seed or ``jax.random`` key for the RSVD sketches.
    factor_dtype: storage dtype of the factors.
    low_rank_mask: which leaves are compressed.
    dimension_numbers: how leaves are viewed as matrices.
    compressor: ``'rsvd'`` (default) or a
      :class:`mlorc_optax.compressors.MomentCompressor` (static; see
      :func:`mlorc_adamw`).
    implementation: ``None`` (automatic), ``'reference'``, ``'pallas'`` or
      ``'xla'``; see :func:`mlorc_optax.scale_by_mlorc_lion`.
    kernel_config: the Pallas kernels' settings (static).
    complement: weight of the momentum's complement (unset: 1.0; 0: the
      paper's step, ``**mlorc_optax.PAPER_LION`` with ``oversample=0``); see
      :func:`mlorc_optax.scale_by_mlorc_lion`.
    complement_mode: ``'moment'`` (default), ``'state'`` or ``'norm'``; see
      :func:`mlorc_optax.scale_by_mlorc_lion`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import mlorc_optax
    >>> params = {'w': jnp.ones((32, 16))}
    >>> tx = mlorc_optax.mlorc_lion(1e-3, weight_decay=0.0)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates['w'][0, :3]  # -lr * sign(g) on the first step
    Array([-0.001, -0.001, -0.001], dtype=float32)

  References:
    Shen et al., https://arxiv.org/abs/2506.01897, Algorithm 2; Chen et al.,
    *Symbolic Discovery of Optimization Algorithms*,
    https://arxiv.org/abs/2302.06675.
  """
  return optax.chain(
      transform.scale_by_mlorc_lion(
          b1=b1,
          b2=b2,
          mu_dtype=mu_dtype,
          rank=rank,
          oversample=oversample,
          power_iters=power_iters,
          seed=seed,
          factor_dtype=factor_dtype,
          low_rank_mask=low_rank_mask,
          dimension_numbers=dimension_numbers,
          compressor=compressor,
          implementation=implementation,
          kernel_config=kernel_config,
          complement=complement,
          complement_mode=complement_mode,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
