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
:func:`hf_to_nnx_key_map` documents the mapping from Hugging Face checkpoint
keys, and :func:`load_hf_weights` loads a ``model.safetensors`` file with the
numpy API of ``safetensors`` (no torch).

Parameters are always stored in ``param_dtype`` (float32 by default); ``dtype``
selects the computation dtype (e.g. ``jnp.bfloat16``). Attention softmax,
LayerNorm statistics and pooling are computed in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
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


def _linear(
    din: int, dout: int, config: BertConfig, dtype, param_dtype, rngs
) -> nnx.Linear:
  return nnx.Linear(
      din,
      dout,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal(config.initializer_range),
      rngs=rngs,
  )


def _layer_norm(config: BertConfig, dtype, param_dtype, rngs) -> nnx.LayerNorm:
  # Two-pass variance (use_fast_variance=False) to match PyTorch's LayerNorm.
  return nnx.LayerNorm(
      config.hidden_size,
      epsilon=config.layer_norm_eps,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=False,
      rngs=rngs,
  )


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(
      self,
      config: BertConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
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

  def __init__(
      self,
      config: BertConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
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

  def __init__(
      self,
      config: BertConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
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

  def __init__(
      self,
      config: BertConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
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
    self.bert = BertModel(
        config,
        add_pooler=pooling == 'pooler',
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    rate = (
        config.hidden_dropout_prob
        if classifier_dropout is None
        else classifier_dropout
    )
    self.dropout = nnx.Dropout(rate, rngs=rngs)
    self.classifier = nnx.Linear(
        config.hidden_size,
        num_classes,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range),
        rngs=rngs,
    )

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


# --------------------------------------------------------------------------
# Loading Hugging Face weights.
# --------------------------------------------------------------------------

KeyPath = tuple[Union[str, int], ...]

# Checkpoint entries that are buffers rather than parameters.
_IGNORED_HF_KEYS = ('embeddings.position_ids',)


def hf_to_nnx_key_map(
    config: BertConfig, *, add_pooler: bool = False
) -> dict[str, KeyPath]:
  """Maps Hugging Face ``BertModel`` names to paths in :class:`BertModel`.

  A path is a tuple of attribute names / list indices ending with the NNX
  parameter name. HF ``*.weight`` of ``nn.Linear`` is the transpose of the
  NNX ``kernel`` (handled by :func:`load_hf_weights`).
  """
  mapping: dict[str, KeyPath] = {}

  def add_ln(hf: str, path: KeyPath) -> None:
    mapping[f'{hf}.weight'] = (*path, 'scale')
    mapping[f'{hf}.bias'] = (*path, 'bias')

  def add_linear(hf: str, path: KeyPath) -> None:
    mapping[f'{hf}.weight'] = (*path, 'kernel')
    mapping[f'{hf}.bias'] = (*path, 'bias')

  for name in (
      'word_embeddings',
      'position_embeddings',
      'token_type_embeddings',
  ):
    mapping[f'embeddings.{name}.weight'] = ('embeddings', name, 'embedding')
  add_ln('embeddings.LayerNorm', ('embeddings', 'layer_norm'))
  for i in range(config.num_hidden_layers):
    hf, nx = f'encoder.layer.{i}', ('layers', i)
    for name in ('query', 'key', 'value'):
      add_linear(f'{hf}.attention.self.{name}', (*nx, 'attention', name))
    add_linear(f'{hf}.attention.output.dense', (*nx, 'attention', 'output'))
    add_ln(f'{hf}.attention.output.LayerNorm', (*nx, 'attention_layer_norm'))
    add_linear(f'{hf}.intermediate.dense', (*nx, 'intermediate'))
    add_linear(f'{hf}.output.dense', (*nx, 'output'))
    add_ln(f'{hf}.output.LayerNorm', (*nx, 'output_layer_norm'))
  if add_pooler:
    add_linear('pooler.dense', ('pooler', 'dense'))
  return mapping


def _normalise_hf_key(key: str) -> str:
  """Strips a ``bert.`` prefix and renames legacy ``gamma``/``beta`` names."""
  if key.startswith('bert.'):
    key = key[len('bert.') :]
  if key.endswith('.gamma'):
    key = key[: -len('gamma')] + 'weight'
  elif key.endswith('.beta'):
    key = key[: -len('beta')] + 'bias'
  return key


def _get_param(module: nnx.Module, path: KeyPath) -> nnx.Param:
  node: Any = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def load_hf_weights(
    model: BertModel,
    weights: PathLike | Mapping[str, np.ndarray],
    *,
    strict: bool = True,
) -> BertModel:
  """Loads Hugging Face BERT weights into ``model`` in place (and returns it).

  Args:
    model: the NNX model to fill.
    weights: a ``model.safetensors`` path (read with
      ``safetensors.numpy.load_file``) or a name -> numpy array mapping.
      Keys may carry a ``bert.`` prefix (task checkpoints); task heads and
      the pooler (if the model has none) are ignored.
    strict: if True, every parameter of ``model`` must be present in
      ``weights``.

  Raises:
    KeyError: a parameter is missing (``strict``).
    ValueError: a shape does not match.
  """
  if not isinstance(weights, Mapping):
    from safetensors.numpy import load_file  # Example-only dependency.

    weights = load_file(str(weights))
  tensors = {_normalise_hf_key(k): v for k, v in weights.items()}
  mapping = hf_to_nnx_key_map(model.config, add_pooler=model.pooler is not None)
  missing = sorted(set(mapping) - set(tensors))
  if strict and missing:
    raise KeyError(
        f'missing weights for {len(missing)} parameters, e.g. {missing[:5]}'
    )
  for hf_key, path in mapping.items():
    if hf_key not in tensors:
      continue
    value = np.asarray(tensors[hf_key])
    if path[-1] == 'kernel':
      value = value.T  # PyTorch Linear stores (out, in).
    param = _get_param(model, path)
    current = param[...]
    if tuple(current.shape) != value.shape:
      raise ValueError(
          f"{hf_key} -> {'.'.join(map(str, path))}: shape {value.shape} "
          f'does not match {tuple(current.shape)}'
      )
    param[...] = jnp.asarray(value, dtype=current.dtype)
  return model


def load_pretrained_bert(
    model_dir: PathLike,
    *,
    add_pooler: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> BertModel:
  """A :class:`BertModel` from ``config.json`` and ``model.safetensors``."""
  model_dir = Path(model_dir)
  config = BertConfig.from_json_file(model_dir / 'config.json')
  model = BertModel(
      config,
      add_pooler=add_pooler,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs if rngs is not None else nnx.Rngs(0),
  )
  return load_hf_weights(model, model_dir / 'model.safetensors')


def load_pretrained_classifier(
    model_dir: PathLike,
    num_classes: int,
    *,
    pooling: Pooling = 'mean',
    classifier_dropout: float | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> BertClassifier:
  """A :class:`BertClassifier` whose encoder holds the pretrained weights.

  The classification head is freshly initialised (normal, std
  ``initializer_range``; zero bias) from ``rngs`` (default ``nnx.Rngs(0)``).
  """
  model_dir = Path(model_dir)
  config = BertConfig.from_json_file(model_dir / 'config.json')
  model = BertClassifier(
      config,
      num_classes,
      pooling=pooling,
      classifier_dropout=classifier_dropout,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs if rngs is not None else nnx.Rngs(0),
  )
  load_hf_weights(model.bert, model_dir / 'model.safetensors')
  return model
