"""Loads Hugging Face BERT checkpoints into :mod:`examples.finetune.model`.

:func:`hf_to_nnx_key_map` documents the mapping from Hugging Face checkpoint
keys to NNX parameter paths; :func:`load_hf_weights` reads a
``model.safetensors`` file with the numpy API of ``safetensors`` (no torch).
:class:`PretrainedFactory` reads a checkpoint once and builds any number of
fresh classifiers from it (one per run of the harness).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.finetune import model as model_lib

PathLike = Union[str, os.PathLike]
KeyPath = tuple[Union[str, int], ...]
def hf_to_nnx_key_map(
    config: model_lib.BertConfig, *, add_pooler: bool = False
) -> dict[str, KeyPath]:
  """Maps Hugging Face ``BertModel`` names to paths in the NNX ``BertModel``.

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
    model: model_lib.BertModel,
    weights: PathLike | Mapping[str, np.ndarray],
    *,
    strict: bool = True,
) -> model_lib.BertModel:
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
) -> model_lib.BertModel:
  """A ``BertModel`` from ``config.json`` and ``model.safetensors``."""
  model_dir = Path(model_dir)
  config = model_lib.BertConfig.from_json_file(model_dir / 'config.json')
  model = model_lib.BertModel(
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
    pooling: model_lib.Pooling = 'mean',
    classifier_dropout: float | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
) -> model_lib.BertClassifier:
  """A ``BertClassifier`` whose encoder holds the pretrained weights.

  The classification head is freshly initialised (normal, std
  ``initializer_range``; zero bias) from ``rngs`` (default ``nnx.Rngs(0)``).
  """
  model_dir = Path(model_dir)
  config = model_lib.BertConfig.from_json_file(model_dir / 'config.json')
  model = model_lib.BertClassifier(
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


@dataclasses.dataclass
class PretrainedFactory:
  """Builds fresh classifiers holding the pretrained encoder weights.

  The checkpoint is read once; each call builds a new model whose classifier
  head and dropout streams come from ``nnx.Rngs(seed)``.

  Attributes:
    config: the encoder configuration.
    weights: the checkpoint's arrays (name -> numpy array).
    num_classes: classifier outputs.
    pooling: ``'mean'``, ``'cls'`` or ``'pooler'``.
  """

  config: model_lib.BertConfig
  weights: Mapping[str, np.ndarray]
  num_classes: int
  pooling: model_lib.Pooling = 'mean'

  @classmethod
  def from_dir(cls, model_dir: PathLike, **kw: Any) -> PretrainedFactory:
    """Reads ``config.json`` and ``model.safetensors`` of ``model_dir``."""
    from safetensors.numpy import load_file  # Example-only dependency.

    model_dir = Path(model_dir)
    return cls(
        config=model_lib.BertConfig.from_json_file(model_dir / 'config.json'),
        weights=load_file(str(model_dir / 'model.safetensors')),
        **kw,
    )

  def __call__(self, seed: int) -> model_lib.BertClassifier:
    model = model_lib.BertClassifier(
        self.config, self.num_classes, pooling=self.pooling,
        rngs=nnx.Rngs(seed))
    load_hf_weights(model.bert, self.weights)
    return model
