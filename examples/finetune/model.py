"""A Flax NNX port of the BERT encoder (as used by all-MiniLM-L6-v2).

The architecture follows Hugging Face ``transformers.BertModel`` exactly:

* embeddings: word + absolute position + token-type embeddings, LayerNorm
  (``eps=1e-12``), dropout;
* ``num_hidden_layers`` post-LayerNorm encoder layers, each
  ``x = LN(x + Dropout(Attn(x)))`` then ``x = LN(x + Dropout(FFN(x)))`` with
  multi-head self-attention (``query``/``key``/``value``/``output`` Linear
  layers, additive padding mask) and a GELU (exact, erf-based) MLP;
* an optional pooler (``tanh(Linear(h[:, 0]))``).

Parameters use NNX names: ``nnx.Linear`` has ``kernel`` with shape
``(in, out)`` (the transpose of PyTorch's ``weight``) and ``bias``;
``nnx.LayerNorm`` has ``scale`` and ``bias``; ``nnx.Embed`` has ``embedding``.
:mod:`examples.finetune.checkpoint` loads Hugging Face weights into them.

Parameters are always stored in ``param_dtype`` (float32 by default); ``dtype``
selects the computation dtype (e.g. ``jnp.bfloat16``). Attention softmax,
LayerNorm statistics and pooling are computed in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PathLike = Union[str, os.PathLike]
Array = jax.Array
Pooling = Literal['cls', 'mean', 'pooler']


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters; the defaults are those of all-MiniLM-L6-v2."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0

  def __post_init__(self) -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'hidden_size={self.hidden_size} is not divisible by '
          f'num_attention_heads={self.num_attention_heads}'
      )

  @property
  def head_dim(self) -> int:
    """Size of one attention head."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> 'BertConfig':
    """Builds a config from a Hugging Face ``config.json`` dictionary.

    Unknown keys are ignored. Only ``hidden_act="gelu"`` and absolute
    position embeddings are supported.
    """
    if config.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f"unsupported hidden_act={config['hidden_act']!r}")
    if config.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError('only absolute position embeddings are supported')
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  @classmethod
  def from_json_file(cls, path: PathLike) -> 'BertConfig':
    """Reads a Hugging Face ``config.json`` file."""
    with open(path, encoding='utf-8') as f:
      return cls.from_dict(json.load(f))


def _linear(din: int, dout: int, config: BertConfig, dtype, param_dtype,
            rngs) -> nnx.Linear:
  init = nnx.initializers.normal(config.initializer_range)
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=init, rngs=rngs)


def _layer_norm(config: BertConfig, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  # Two-pass variance (use_fast_variance=False) to match PyTorch's LayerNorm.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                       dtype=dtype, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, config: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    embed = lambda n: nnx.Embed(  # noqa: E731
        n,
        config.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=init,
        rngs=rngs,
    )
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_position_embeddings)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.layer_norm = _layer_norm(config, dtype, param_dtype, rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(
      self,
      input_ids: Array,
      token_type_ids: Array,
      position_ids: Array,
      *,
      deterministic: bool | None = None,
  ) -> Array:
    x = (
        self.word_embeddings(input_ids)
        + self.position_embeddings(position_ids)
        + self.token_type_embeddings(token_type_ids)
    )
    return self.dropout(self.layer_norm(x), deterministic=deterministic)


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention (``query``/``key``/``value``/``output`` Linears).

  Returns the projected attention output *before* the residual connection
  (the residual + LayerNorm live in :class:`BertLayer`).
  """

  def __init__(self, config: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.query = _linear(h, h, config, dtype, param_dtype, rngs)
    self.key = _linear(h, h, config, dtype, param_dtype, rngs)
    self.value = _linear(h, h, config, dtype, param_dtype, rngs)
    self.output = _linear(h, h, config, dtype, param_dtype, rngs)
    self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

  def __call__(
      self, x: Array, mask_bias: Array, *, deterministic: bool | None = None
  ) -> Array:
    """Attention output.

    Args:
      x: ``(batch, length, hidden)``.
      mask_bias: ``(batch, 1, 1, length)`` additive mask.
      deterministic: disables dropout if True.
    """
    b, n, _ = x.shape
    split = lambda t: t.reshape(  # noqa: E731
        b, n, self.num_heads, self.head_dim
    )
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum(
        'bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32
    )
    scores = scores / np.sqrt(self.head_dim).astype(np.float32) + mask_bias
    probs = jax.nn.softmax(scores, axis=-1)
    probs = self.dropout(probs, deterministic=deterministic).astype(v.dtype)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, -1)
    return self.output(context)


class BertLayer(nnx.Module):
  """One post-LayerNorm transformer encoder layer."""

  def __init__(self, config: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    h, i = config.hidden_size, config.intermediate_size
    self.attention = BertSelfAttention(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.attention_layer_norm = _layer_norm(config, dtype, param_dtype, rngs)
    self.intermediate = _linear(h, i, config, dtype, param_dtype, rngs)
    self.output = _linear(i, h, config, dtype, param_dtype, rngs)
    self.output_layer_norm = _layer_norm(config, dtype, param_dtype, rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(
      self, x: Array, mask_bias: Array, *, deterministic: bool | None = None
  ) -> Array:
    attn = self.attention(x, mask_bias, deterministic=deterministic)
    x = self.attention_layer_norm(
        x + self.dropout(attn, deterministic=deterministic)
    )
    y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
    return self.output_layer_norm(
        x + self.dropout(y, deterministic=deterministic)
    )


class BertPooler(nnx.Module):
  """BERT pooler: ``tanh(dense(hidden[:, 0]))``."""

  def __init__(self, config: BertConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dense = _linear(
        config.hidden_size, config.hidden_size, config, dtype, param_dtype, rngs
    )

  def __call__(self, hidden: Array) -> Array:
    return jnp.tanh(self.dense(hidden[:, 0]))


def attention_mask_bias(attention_mask: Array) -> Array:
  """A ``(batch, length)`` 0/1 mask as an additive ``(batch, 1, 1, length)``."""
  keep = attention_mask[:, None, None, :].astype(bool)
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertModel(nnx.Module):
  """BERT encoder returning the last hidden states ``(batch, length, hidden)``.

  Dropout follows NNX conventions: modules start in training mode
  (dropout active); use ``model.eval()`` / ``model.train()``, ``nnx.view`` or
  the ``deterministic`` call argument to switch.
  """

  def __init__(
      self,
      config: BertConfig,
      *,
      add_pooler: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = BertEmbeddings(config, **kw)
    self.layers = nnx.List(
        [BertLayer(config, **kw) for _ in range(config.num_hidden_layers)]
    )
    self.pooler = BertPooler(config, **kw) if add_pooler else None

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      token_type_ids: Array | None = None,
      position_ids: Array | None = None,
      *,
      deterministic: bool | None = None,
  ) -> Array:
    """Runs the encoder.

    Args:
      input_ids: ``(batch, length)`` integer token ids.
      attention_mask: ``(batch, length)``, 1 for real tokens and 0 for
        padding; all ones if omitted.
      token_type_ids: ``(batch, length)`` segment ids; zeros if omitted.
      position_ids: ``(batch, length)`` or ``(length,)``; ``arange`` if omitted.
      deterministic: disables dropout if True; if None the modules' own
        ``deterministic`` attributes are used.

    Returns:
      ``last_hidden_state`` of shape ``(batch, length, hidden_size)``.
    """
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[-1])[None, :]
    x = self.embeddings(
        input_ids,
        jnp.asarray(token_type_ids),
        jnp.asarray(position_ids),
        deterministic=deterministic,
    )
    bias = attention_mask_bias(jnp.asarray(attention_mask))
    for layer in self.layers:
      x = layer(x, bias, deterministic=deterministic)
    return x

  def pooled_output(self, hidden: Array) -> Array:
    """HF pooled output ``tanh(W h_[CLS] + b)`` (needs ``add_pooler=True``)."""
    if self.pooler is None:
      raise ValueError('this BertModel was built with add_pooler=False')
    return self.pooler(hidden)


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Averages ``hidden`` ``(batch, length, dim)`` over real tokens, in float32.

  This is the sentence-transformers pooling of all-MiniLM-L6-v2.
  """
  mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  return summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def sentence_embedding(
    model: BertModel,
    input_ids: Array,
    attention_mask: Array,
    token_type_ids: Array | None = None,
) -> Array:
  """all-MiniLM-L6-v2 sentence embeddings: mean pooling then L2 normalisation.

  Dropout is disabled.
  """
  hidden = model(input_ids, attention_mask, token_type_ids, deterministic=True)
  pooled = mean_pool(hidden, attention_mask)
  return pooled / jnp.maximum(
      jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12
  )


class BertClassifier(nnx.Module):
  """Sequence classifier: BERT encoder, pooling, dropout and a Linear head.

  Pooling modes:

  * ``"cls"``: hidden state of the first ([CLS]) token;
  * ``"mean"``: masked mean over tokens (how all-MiniLM-L6-v2 was trained);
  * ``"pooler"``: ``tanh(dense(h_[CLS]))`` as in
    ``BertForSequenceClassification``.

  The logits are returned in float32 whatever the computation dtype.
  """

  def __init__(
      self,
      config: BertConfig,
      num_classes: int,
      *,
      pooling: Pooling = 'mean',
      classifier_dropout: float | None = None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if pooling not in ('cls', 'mean', 'pooler'):
      raise ValueError(f'unknown pooling={pooling!r}')
    self.pooling = pooling
    self.bert = BertModel(config, add_pooler=pooling == 'pooler', dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    if classifier_dropout is None:
      classifier_dropout = config.hidden_dropout_prob
    self.dropout = nnx.Dropout(classifier_dropout, rngs=rngs)
    # The head computes in float32 whatever the encoder's dtype.
    self.classifier = _linear(config.hidden_size, num_classes, config,
                              jnp.float32, param_dtype, rngs)

  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      token_type_ids: Array | None = None,
      *,
      deterministic: bool | None = None,
  ) -> Array:
    """Returns ``(batch, num_classes)`` float32 logits."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(jnp.asarray(input_ids))
    hidden = self.bert(
        input_ids, attention_mask, token_type_ids, deterministic=deterministic
    )
    if self.pooling == 'mean':
      pooled = mean_pool(hidden, attention_mask)
    elif self.pooling == 'cls':
      pooled = hidden[:, 0]
    else:
      pooled = self.bert.pooled_output(hidden)
    pooled = self.dropout(
        pooled.astype(jnp.float32), deterministic=deterministic
    )
    return self.classifier(pooled)

