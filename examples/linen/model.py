"""A T5-style decoder-only language model in Flax Linen, Flaxformer-style.

What makes it a test of ``mlorc_optax`` on Linen trees (issue #10):

* attention kernels are multi-axis ``nn.DenseGeneral`` tensors, query / key /
  value ``(embed, heads, kv)`` and output ``(heads, kv, embed)`` (``kv`` is
  the head dimension, T5X's name);
* the layers are stacked by ``nn.scan``, so every layer parameter has a
  leading ``layers`` axis;
* every parameter is annotated with logical axis names
  (``nn.with_logical_partitioning``, the T5X names ``vocab``, ``embed``,
  ``heads``, ``kv``, ``mlp``, ``layers``), placed on a mesh by
  :data:`LOGICAL_AXIS_RULES` or any other rules.

The architecture is T5 v1.1's decoder without cross-attention: pre-norm
RMSNorm (T5's ``LayerNorm``, no bias, no centring), T5 relative position
biases (one table shared by all layers, causal buckets), gated-GELU MLP
(``wi_0``, ``wi_1``, ``wo``), no biases anywhere, an untied output layer.

Parameter tree (``L`` layers, ``E`` embed, ``H`` heads, ``D`` head dim,
``F`` mlp, ``V`` vocab, ``B`` relative position buckets)::

  path                                     shape        logical axes
  token_embedder/embedding                 (V, E)       vocab, embed
  relpos_bias/embedding                    (B, H)       relpos_buckets, heads
  layers/pre_self_attention_layer_norm/scale
                                           (L, E)       layers, embed
  layers/self_attention/{query,key,value}/kernel
                                           (L, E, H, D) layers, embed, heads, kv
  layers/self_attention/out/kernel         (L, H, D, E) layers, heads, kv, embed
  layers/pre_mlp_layer_norm/scale          (L, E)       layers, embed
  layers/mlp/{wi_0,wi_1}/kernel            (L, E, F)    layers, embed, mlp
  layers/mlp/wo/kernel                     (L, F, E)    layers, mlp, embed
  decoder_norm/scale                       (E,)         embed
  logits_dense/kernel                      (E, V)       embed, vocab
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: Logical-to-mesh rules for a ``('data', 'model')`` mesh: FSDP-style
#: sharding of ``embed`` over ``data``, tensor parallelism over ``model``
#: (heads, mlp, vocab); the head dimension, the layer axis and MLorc's rank
#: axis are not sharded.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', 'data'),
    ('embed', 'data'),
    ('heads', 'model'),
    ('mlp', 'model'),
    ('vocab', 'model'),
    ('kv', None),
    ('layers', None),
    ('relpos_buckets', None),
    ('length', None),
    ('mlorc_rank', None),
)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shapes and numerics of :class:`T5Decoder`.

  Attributes:
    vocab_size: number of token ids.
    embed_dim: model width ``E``.
    num_heads: attention heads ``H``.
    head_dim: width ``D`` of one head (``H * D`` need not equal ``E``).
    mlp_dim: hidden width ``F`` of the gated MLP.
    num_layers: decoder layers ``L`` (stacked by ``nn.scan``).
    relpos_buckets: relative position buckets.
    relpos_max_distance: distance at which the log-spaced buckets end.
    dtype: activation dtype (``'float32'`` or ``'bfloat16'``).
    param_dtype: parameter dtype.
    remat: rematerialise each layer in the backward pass (``nn.remat``).
  """

  vocab_size: int = 32128
  embed_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  num_layers: int = 6
  relpos_buckets: int = 32
  relpos_max_distance: int = 128
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False

  def num_params(self) -> int:
    """Number of parameters, from the shapes alone."""
    e, h, d, f = self.embed_dim, self.num_heads, self.head_dim, self.mlp_dim
    per_layer = 4 * e * h * d + 3 * e * f + 2 * e
    return (
        self.num_layers * per_layer
        + 2 * self.vocab_size * e  # embedding and output layer
        + self.relpos_buckets * h
        + e
    )


#: ``tiny`` trains in seconds on a CPU (tests); ``small`` (60M), ``base``
#: (T5 v1.1-base widths: ``E=768``, 12 heads of 64, ``F=2048``, 12 layers,
#: 134M) and ``large`` (T5 v1.1-large widths: ``E=1024``, 16 heads of 64,
#: ``F=2816``, 24 layers, 374M) use T5's 32128 ids and are for the GPU.
PRESETS: dict[str, T5Config] = {
    'tiny': T5Config(
        vocab_size=128, embed_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
        num_layers=2, relpos_buckets=8, relpos_max_distance=16,
    ),
    'small': T5Config(
        vocab_size=32128, embed_dim=512, num_heads=8, head_dim=64,
        mlp_dim=1024, num_layers=8,
    ),
    'base': T5Config(
        vocab_size=32128, embed_dim=768, num_heads=12, head_dim=64,
        mlp_dim=2048, num_layers=12,
    ),
    'large': T5Config(
        vocab_size=32128, embed_dim=1024, num_heads=16, head_dim=64,
        mlp_dim=2816, num_layers=24,
    ),
}


def get_config(preset: str, **overrides: Any) -> T5Config:
  """A preset of :data:`PRESETS` with some fields replaced.

  Args:
    preset: a key of :data:`PRESETS`.
    **overrides: :class:`T5Config` fields.

  Returns:
    The configuration.
  """
  if preset not in PRESETS:
    raise ValueError(
        f'preset must be one of {sorted(PRESETS)}, got {preset!r}.'
    )
  return dataclasses.replace(PRESETS[preset], **overrides)


def _param(init: Any, *names: str) -> Any:
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """T5's layer norm: ``x / rms(x) * scale``, no centring, no bias."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        'scale', _param(nn.initializers.ones, 'embed'), (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(
        jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon
    )
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def relative_position_bucket(
    relative_position: jax.Array, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's causal bucketing of ``key - query`` positions.

  Keys in the future (positive offsets) share bucket 0; half of the buckets
  are exact distances, the other half log-spaced up to ``max_distance``.
  """
  n = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1) / max_exact) / math.log(
      max_distance / max_exact
  )
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  """``[1, heads, q, k]`` attention biases from a ``(buckets, heads)`` table."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    table = self.param(
        'embedding',
        _param(nn.initializers.normal(1.0), 'relpos_buckets', 'heads'),
        (self.num_buckets, self.num_heads), self.param_dtype,
    )
    pos = np.arange(length)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], self.num_buckets, self.max_distance
    )
    bias = jnp.take(table, buckets, axis=0)  # [q, k, heads]
    return jnp.transpose(bias, (2, 0, 1))[None].astype(self.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention with ``DenseGeneral`` kernels."""

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    embed = x.shape[-1]

    def projection(name: str) -> jax.Array:
      return nn.DenseGeneral(
          features=(self.num_heads, self.head_dim),
          axis=-1,
          use_bias=False,
          kernel_init=_param(
              nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
              'embed', 'heads', 'kv',
          ),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name,
      )(x)

    q, k, v = projection('query'), projection('key'), projection('value')
    q = q / jnp.sqrt(self.head_dim).astype(self.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits + bias.astype(jnp.float32), -1e10)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return nn.DenseGeneral(
        features=embed,
        axis=(-2, -1),
        use_bias=False,
        kernel_init=_param(
            # DenseGeneral initialises the flattened (H * D, E) matrix.
            nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
            'heads', 'kv', 'embed',
        ),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='out',
    )(y)


class GatedMlp(nn.Module):
  """T5 v1.1's gated-GELU MLP: ``wo(gelu(wi_0 x) * wi_1 x)``."""

  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def dense(features: int, names: tuple[str, str], name: str) -> Any:
      return nn.DenseGeneral(
          features=features, use_bias=False,
          kernel_init=_param(init, *names), dtype=self.dtype,
          param_dtype=self.param_dtype, name=name,
      )

    h = nn.gelu(dense(self.mlp_dim, ('embed', 'mlp'), 'wi_0')(x))
    h = h * dense(self.mlp_dim, ('embed', 'mlp'), 'wi_1')(x)
    return dense(x.shape[-1], ('mlp', 'embed'), 'wo')(h)


class DecoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks; the body of ``nn.scan``."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype))
    h = RMSNorm(name='pre_self_attention_layer_norm', **dtypes)(x)
    x = x + Attention(cfg.num_heads, cfg.head_dim, name='self_attention',
                      **dtypes)(h, bias)
    h = RMSNorm(name='pre_mlp_layer_norm', **dtypes)(x)
    x = x + GatedMlp(cfg.mlp_dim, name='mlp', **dtypes)(h)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    return x, None


class T5Decoder(nn.Module):
  """Token ids ``int32 [batch, length]`` -> logits ``[batch, length, V]``."""

  config: T5Config

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = nn.Embed(
        cfg.vocab_size, cfg.embed_dim,
        embedding_init=_param(nn.initializers.normal(1.0), 'vocab', 'embed'),
        dtype=dtype, param_dtype=param_dtype, name='token_embedder',
    )(tokens)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    bias = RelativePositionBias(
        cfg.relpos_buckets, cfg.relpos_max_distance, cfg.num_heads,
        dtype=dtype, param_dtype=param_dtype, name='relpos_bias',
    )(tokens.shape[1])
    layer = DecoderLayer
    if cfg.remat:
      layer = nn.remat(layer, prevent_cse=False)
    x, _ = nn.scan(
        layer,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=nn.broadcast,
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )(cfg, name='layers')(x, bias)
    x = RMSNorm(dtype=dtype, param_dtype=param_dtype, name='decoder_norm')(x)
    return nn.DenseGeneral(
        cfg.vocab_size, use_bias=False,
        kernel_init=_param(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
            'embed', 'vocab',
        ),
        dtype=dtype, param_dtype=param_dtype, name='logits_dense',
    )(x)


def init_params(cfg: T5Config, seed: int = 0) -> Any:
  """The model's boxed parameters (``nn.LogicallyPartitioned`` leaves)."""
  model = T5Decoder(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(jax.random.key(seed), tokens)['params']


def abstract_params(cfg: T5Config) -> Any:
  """:func:`init_params` as ``ShapeDtypeStruct``\\s (nothing allocated)."""
  return jax.eval_shape(lambda: init_params(cfg))


def logical_axes(cfg: T5Config) -> Any:
  """The parameters' logical names: a pytree of ``PartitionSpec``\\s."""
  return nn.get_partition_spec(abstract_params(cfg))


def cross_entropy_loss(
    apply_fn: Any, params: Any, tokens: jax.Array
) -> jax.Array:
  """Mean next-token cross entropy of ``tokens [batch, length + 1]``."""
  logits = apply_fn({'params': params}, tokens[:, :-1]).astype(jnp.float32)
  targets = tokens[:, 1:]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(log_z - target)
