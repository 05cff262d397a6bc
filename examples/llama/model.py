"""A LLaMA-style decoder-only language model in Flax NNX.

Pre-norm blocks (RMSNorm -> causal self-attention with rotary position
embeddings and optional grouped-query attention -> residual, RMSNorm ->
SwiGLU MLP -> residual), a final RMSNorm and an untied ``lm_head``, as in
LLaMA / LLaMA-2 (https://arxiv.org/abs/2302.13971,
https://arxiv.org/abs/2307.09288).

The blocks are stacked with ``nnx.vmap`` and applied with ``nnx.scan`` (one
compiled block whatever the depth), optionally rematerialised with
``nnx.remat``. Stacked kernels have shape ``(n_layers, d_in, d_out)``, which
``mlorc_optax`` treats as a batch of ``n_layers`` matrices. Parameter names
follow the conventions of ``mlorc_optax``'s default mask: RMSNorm weights are
called ``scale`` and the token embedding ``embedding`` (both kept dense), the
projections ``kernel`` (compressed). Check with::

  tx = mlorc_optax.mlorc_adamw(1e-4, rank=4)
  plan = mlorc_optax.compression_plan(tx, nnx.state(model, nnx.Param))
  print(mlorc_optax.format_plan(plan))

Set ``scan_layers=False`` for a Python list of blocks instead (one leaf per
layer and matrix; larger programs, but the optimizer then sees single
matrices).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

#: Remat policies selectable by name (``LlamaConfig.remat_policy``).
REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a :class:`Llama` model.

  Attributes:
    vocab_size: number of token ids.
    dim: model (residual stream) width.
    n_layers: number of decoder blocks.
    n_heads: attention (query) heads; ``head_dim = dim // n_heads``.
    n_kv_heads: key/value heads (grouped-query attention when smaller than
      ``n_heads``; must divide it).
    ffn_dim: hidden width of the SwiGLU MLP.
    max_seq_len: longest sequence the model is meant for (informational;
      rotary embeddings are computed for the actual length).
    rope_theta: base of the rotary frequencies.
    norm_eps: epsilon of RMSNorm.
    param_dtype: dtype of every parameter (``'float32'`` or ``'bfloat16'``).
    compute_dtype: dtype of activations and matmuls; norms, softmax, rotary
      and the loss are computed in float32.
    remat: rematerialise each block in the backward pass (``nnx.remat``).
    remat_policy: a key of :data:`REMAT_POLICIES` (what the remat may save).
    scan_layers: stack the blocks and ``nnx.scan`` over them (else a list).
    attention: ``jax.nn.dot_product_attention`` implementation: ``'xla'``
      or ``'cudnn'`` (GPU only, bf16/fp16, ``head_dim`` a multiple of 8).
  """

  vocab_size: int = 32000
  dim: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  ffn_dim: int = 192
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = True
  attention: str = 'xla'

  def __post_init__(self):
    if self.dim % self.n_heads:
      raise ValueError(
          f'dim {self.dim} is not divisible by n_heads ' f'{self.n_heads}.'
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f'n_heads {self.n_heads} is not a multiple of '
          f'n_kv_heads {self.n_kv_heads}.'
      )
    if (self.dim // self.n_heads) % 2:
      raise ValueError('head_dim must be even for rotary embeddings.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f'remat_policy must be one of {list(REMAT_POLICIES)}, '
          f'got {self.remat_policy!r}.'
      )
    if self.attention not in ('xla', 'cudnn'):
      raise ValueError(
          f"attention must be 'xla' or 'cudnn', got " f'{self.attention!r}.'
      )
    jnp.dtype(self.param_dtype)
    jnp.dtype(self.compute_dtype)

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def replace(self, **changes: Any) -> 'LlamaConfig':
    """A copy with some fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Number of parameters of the model (computed from the shapes)."""
    d, h = self.dim, self.head_dim
    attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
    mlp = 3 * d * self.ffn_dim
    block = attn + mlp + 2 * d
    return self.n_layers * block + 2 * self.vocab_size * d + d


#: Named model sizes. ``tiny`` is for CPU tests; ``1b`` has TinyLlama-1.1B's
#: shapes, ``3b`` OpenLLaMA-3B's, ``7b`` and ``13b`` LLaMA-2's (all with the
#: 32000-token LLaMA vocabulary).
PRESETS: dict[str, LlamaConfig] = {
    'tiny': LlamaConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    'small': LlamaConfig(vocab_size=32000, dim=768, n_layers=8, n_heads=12,
                         n_kv_heads=12, ffn_dim=2048, max_seq_len=1024),
    '1b': LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32,
                      n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
    '3b': LlamaConfig(vocab_size=32000, dim=3200, n_layers=26, n_heads=32,
                      n_kv_heads=32, ffn_dim=8640, max_seq_len=2048),
    '7b': LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                      n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
    '13b': LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40,
                       n_kv_heads=40, ffn_dim=13824, max_seq_len=4096),
}


def get_config(preset: str, **overrides: Any) -> LlamaConfig:
  """The named preset with some fields overridden.

  Args:
    preset: a key of :data:`PRESETS`.
    **overrides: :class:`LlamaConfig` fields to change, e.g.
      ``param_dtype='bfloat16', remat=True``.

  Returns:
    The configuration.
  """
  if preset not in PRESETS:
    raise ValueError(
        f'Unknown preset {preset!r}; choose from ' f'{list(PRESETS)}.'
    )
  return PRESETS[preset].replace(**overrides)


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def rotary_angles(
    positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """``cos`` and ``sin`` of the rotary angles, float32 ``[..., head_dim/2]``.

  Frequency ``i`` is ``theta ** (-2i / head_dim)`` (LLaMA's convention).
  """
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freqs
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [batch, seq, heads, head_dim]`` by the rotary angles.

  Uses the "rotate half" pairing of the Hugging Face LLaMA code: feature
  ``j`` is paired with feature ``j + head_dim/2``. ``cos`` and ``sin`` are
  ``[seq, head_dim/2]`` (or broadcastable to ``[batch, seq, head_dim/2]``).
  Computed in float32, returned in ``x.dtype``.
  """
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos = cos[..., None, :]
  sin = sin[..., None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned ``scale`` (float32 math)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _linear(
    d_in: int, d_out: int, cfg: LlamaConfig, rngs: nnx.Rngs
) -> nnx.Linear:
  return nnx.Linear(
      d_in,
      d_out,
      use_bias=False,
      dtype=jnp.dtype(cfg.compute_dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nnx.initializers.normal(stddev=0.02),
      rngs=rngs,
  )


class Attention(nnx.Module):
  """Causal multi-head (or grouped-query) self-attention with rotary."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h = cfg.head_dim
    self.q_proj = _linear(cfg.dim, cfg.n_heads * h, cfg, rngs)
    self.k_proj = _linear(cfg.dim, cfg.n_kv_heads * h, cfg, rngs)
    self.v_proj = _linear(cfg.dim, cfg.n_kv_heads * h, cfg, rngs)
    self.o_proj = _linear(cfg.n_heads * h, cfg.dim, cfg, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=cfg.attention
    )
    return self.o_proj(out.reshape(b, t, cfg.n_heads * cfg.head_dim))


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
    self.up_proj = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
    self.down_proj = _linear(cfg.ffn_dim, cfg.dim, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


def _block_forward(
    block: Block, x: jax.Array, cos: jax.Array, sin: jax.Array
) -> jax.Array:
  return block(x, cos, sin)


class Llama(nnx.Module):
  """LLaMA-style decoder: ``tokens [batch, seq] -> logits [batch, seq, vocab]``.

  Attributes:
    cfg: the :class:`LlamaConfig`.
    embed: token embedding (``embed/embedding``, shape ``(vocab, dim)``).
    layers: the blocks; stacked (leading axis ``n_layers``) if
      ``cfg.scan_layers``, else a list.
    norm: final RMSNorm.
    lm_head: untied output projection, kernel ``(dim, vocab)``.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size,
        cfg.dim,
        dtype=jnp.dtype(cfg.compute_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.initializers.normal(stddev=0.02),
        rngs=rngs,
    )
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List(
          [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
      )
    self.norm = RMSNorm(
        cfg.dim, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype)
    )
    self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` (in ``compute_dtype``) of ``tokens``."""
    cfg = self.cfg
    x = self.embed(tokens)
    cos, sin = rotary_angles(
        jnp.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta
    )
    forward = _block_forward
    if cfg.remat:
      forward = nnx.remat(forward, policy=REMAT_POLICIES[cfg.remat_policy])
    if cfg.scan_layers:

      @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)
      def run(block: Block, x: jax.Array, cos, sin) -> jax.Array:
        return forward(block, x, cos, sin)

      x = run(self.layers, x, cos, sin)
    else:
      for block in self.layers:
        x = forward(block, x, cos, sin)
    return self.lm_head(self.norm(x))


def create_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialised :class:`Llama`, parameters in ``cfg.param_dtype``.

  The initialisers draw directly in the parameter dtype, so a bfloat16 model
  never holds a float32 copy of its weights.
  """
  return Llama(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: LlamaConfig) -> Llama:
  """The model with ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape``).

  Allocates nothing; use it for memory estimates, compression plans and
  ahead-of-time compilation of a training step.
  """
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def param_count(model: nnx.Module) -> int:
  """Number of parameters (``nnx.Param`` elements) of ``model``."""
  return sum(
      math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def cross_entropy_loss(model: Llama, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross entropy of ``tokens [batch, seq + 1]`` (float32).

  The model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.
  """
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  targets = tokens[:, 1:]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  return jnp.mean(log_z - target_logit[..., 0])
