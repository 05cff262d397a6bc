"""Fine-tuning harness: MiniLM on drug reviews with every optimizer compared.

Runs the same model (all-MiniLM-L6-v2 with a fresh 3-class head, mean
pooling), data, learning-rate schedule and seeds with each method of
:mod:`examples.finetune.methods` (AdamW, MLorc-AdamW, Lion, MLorc-Lion,
GaLore, LoRA), then writes ``results.json``, ``results.md`` and
``results.png`` (see :mod:`examples.finetune.report`).

Protocol:

1. Tuning (unless ``--no-tune``): each method's learning-rate grid is tried
   with one seed, training on the train split minus a stratified held-out
   slice (``--val-fraction``, :func:`examples.finetune.data.
   train_validation_split`) and scoring on that slice. The best validation
   accuracy wins (ties: macro-F1, then the smaller rate; ``--tune-metric
   macro_f1`` swaps the two). The test split is never looked at.
2. Final runs: each method with its chosen rate and every seed, training on
   the whole train split and scoring on the test split.

Schedule: linear warmup over ``--warmup-ratio`` of the steps, then linear
decay to 0 (``optax.join_schedules`` of two ``optax.linear_schedule``).
The rate of each step is computed on the host and passed to the jitted step
as a traced scalar; every method's transformation is built with
``learning_rate=1.0`` and followed by a multiplication by that scalar. This is
exactly ``learning_rate=schedule`` for all of them (each ends with
``scale_by_learning_rate``), and it lets one compiled step serve every
learning rate and seed of a method.

Train step: :func:`train_step` (``nnx.jit``, dropout on, gradients only for
the method's ``wrt`` filter, model and optimizer buffers donated), run through
:class:`FastTrainStep` (the same function on ``nnx.split`` state under
``jax.jit``), which removes ``nnx.jit``'s per-call graph traversal: on an H100
that overhead was larger than the MiniLM step itself.

Usage::

  python -m examples.finetune.train --help
  python -m examples.finetune.train --methods adamw mlorc_adamw_r4 \\
      --seeds 0 --epochs 1 --no-tune --lr adamw=1e-4 --lr mlorc_adamw_r4=1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlorc_optax
from examples.finetune import bert
from examples.finetune import data as data_lib
from examples.finetune import methods as methods_lib
from examples.finetune import report as report_lib

Arrays = Mapping[str, np.ndarray]
ModelFactory = Callable[[int], nnx.Module]

LOSS_TAIL = 10
"""Final train loss = mean loss of the last ``LOSS_TAIL`` steps."""


# --------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of ``predictions`` equal to ``labels``."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or not labels.size:
    raise ValueError('predictions and labels must be non-empty, same shape')
  return float(np.mean(predictions == labels))


def macro_f1(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int
) -> float:
  """Unweighted mean of the per-class F1 scores.

  Classes absent from both ``labels`` and ``predictions`` are left out (as
  scikit-learn does by default); a class with no true positives scores 0.

  Args:
    predictions: predicted class ids.
    labels: true class ids.
    num_classes: the number of classes (ids are ``0..num_classes-1``).

  Returns:
    The macro-averaged F1 score.
  """
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  scores = []
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    if tp + fp + fn == 0:
      continue
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else 0.0


def tree_bytes(tree: Any) -> int:
  """Total ``nbytes`` of the array leaves of ``tree``."""
  return int(sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree)))


def tree_size(tree: Any) -> int:
  """Total number of elements of the array leaves of ``tree``."""
  return int(sum(getattr(x, 'size', 0) for x in jax.tree.leaves(tree)))


def device_peak_bytes() -> int | None:
  """``peak_bytes_in_use`` of the first local device, None if not reported.

  This is the process's peak so far (JAX has no reset), so with several runs
  in one process it is the maximum over every run up to now.
  """
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return None
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else int(peak)


def device_description() -> dict[str, Any]:
  """Backend, device kind and count, host CPU count."""
  dev = jax.local_devices()[0]
  return {
      'backend': jax.default_backend(),
      'device_kind': dev.device_kind,
      'device_count': jax.local_device_count(),
      'host_cpus': os.cpu_count(),
      'platform': platform.platform(),
  }


def versions() -> dict[str, str]:
  """Versions of Python and of the libraries that matter."""
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'mlorc_optax'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'unknown'
  if out['mlorc_optax'] == 'unknown':  # Imported from a checkout.
    out['mlorc_optax'] = mlorc_optax.__version__
  out['mlorc_optax_module'] = mlorc_optax.__version__
  return out


# --------------------------------------------------------------------------
# Schedule and the per-step learning rate.
# --------------------------------------------------------------------------


def lr_schedule(total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warmup to 1 then linear decay to 0, over ``total_steps``.

  Multiply by the peak learning rate. Warmup lasts
  ``max(1, round(warmup_ratio * total_steps))`` steps (none if
  ``warmup_ratio`` is 0).
  """
  if total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {total_steps}')
  warmup = int(round(warmup_ratio * total_steps))
  if warmup_ratio > 0:
    warmup = max(1, warmup)
  warmup = min(warmup, total_steps - 1)
  decay = optax.linear_schedule(1.0, 0.0, total_steps - warmup)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup]
  )


def scale_by_step_lr() -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by the ``lr`` keyword given to ``update``.

  ``nnx.Optimizer.update(model, grads, lr=...)`` forwards ``lr`` here
  (``optax.chain`` passes extra arguments to the transformations that take
  them), so the learning rate is a traced input of the train step.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, lr, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * lr.astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.lru_cache(maxsize=None)
def harness_transform(
    spec: methods_lib.MethodSpec, galore_update_proj_gap: int
) -> optax.GradientTransformation:
  """The method's transformation at ``learning_rate=1.0``, then ``x lr``.

  Cached, so that every run of a method shares one object (and one compiled
  train step).
  """
  return optax.chain(
      methods_lib.transform(
          spec, 1.0, galore_update_proj_gap=galore_update_proj_gap
      ),
      scale_by_step_lr(),
  )


def reseed_low_rank_sketches(optimizer: nnx.Optimizer, seed: int) -> int:
  """Sets the sketch key of every MLorc state in ``optimizer`` to ``seed``.

  Equivalent to building the transformation with ``seed=seed`` (the
  :class:`mlorc_optax.LowRankMomentsState` then holds
  ``jax.random.PRNGKey(seed)`` as its ``key``), without building a new
  transformation (which would give ``nnx.Optimizer`` a new static graph and
  recompile the train step). ``nnx.Optimizer`` keeps each array of the
  state in a variable, so the key is written in place.

  Returns:
    The number of MLorc states changed (0 for other methods).
  """
  is_mlorc = lambda x: isinstance(x, mlorc_optax.LowRankMomentsState)
  count = 0
  for state in jax.tree.leaves(optimizer.opt_state, is_leaf=is_mlorc):
    if is_mlorc(state):
      state.key[...] = jax.random.PRNGKey(seed)
      count += 1
  return count


def make_optimizer(
    spec: methods_lib.MethodSpec | str,
    model: nnx.Module,
    seed: int,
    *,
    galore_update_proj_gap: int = methods_lib.GALORE_UPDATE_PROJ_GAP,
) -> tuple[nnx.Module, nnx.Optimizer]:
  """Applies a method to a fresh model and builds its ``nnx.Optimizer``.

  The transformation is :func:`harness_transform` (learning rate given to
  :func:`train_step`); MLorc sketches are seeded with ``seed``
  (:func:`reseed_low_rank_sketches`).

  Returns:
    ``(model, optimizer)``; LoRA returns the same model with adapters.
  """
  spec = methods_lib.parse(spec) if isinstance(spec, str) else spec
  built = methods_lib.build(spec, model, seed=seed)
  tx = harness_transform(spec, galore_update_proj_gap)
  optimizer = nnx.Optimizer(built.model, tx, wrt=built.wrt)
  reseed_low_rank_sketches(optimizer, seed)
  return built.model, optimizer


# --------------------------------------------------------------------------
# Jitted steps.
# --------------------------------------------------------------------------


def _loss(model: nnx.Module, batch: Arrays) -> jax.Array:
  logits = model(
      batch['input_ids'],
      batch['attention_mask'],
      batch['token_type_ids'],
      deterministic=False,
  )
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['labels']
  ).mean()


def _train_step(
    model: nnx.Module, optimizer: nnx.Optimizer, batch: Arrays, lr: jax.Array
) -> jax.Array:
  """One step (dropout on): gradients w.r.t. ``optimizer.wrt`` only."""
  grad_fn = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, optimizer.wrt))
  loss, grads = grad_fn(model, batch)
  optimizer.update(model, grads, lr=lr)
  return loss


train_step = nnx.jit(_train_step, donate_argnames=('model', 'optimizer'))
"""``nnx.jit`` train step: ``train_step(model, optimizer, batch, lr) -> loss``
updates ``model`` and ``optimizer`` in place (their buffers are donated)."""


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _functional_train_step(
    graphdef: nnx.GraphDef, state: nnx.State, batch: Arrays, lr: jax.Array
) -> tuple[nnx.State, jax.Array]:
  """:func:`train_step` on ``nnx.split((model, optimizer))``."""
  model, optimizer = nnx.merge(graphdef, state)
  loss = _train_step(model, optimizer, batch, lr)
  return nnx.state((model, optimizer)), loss


class FastTrainStep:
  """:func:`train_step` with the NNX graph traversal done once, not per step.

  ``nnx.jit`` flattens the model and optimizer graphs on every call, which
  costs milliseconds per step for MiniLM's hundreds of variables (more than the
  step itself on a GPU). This follows Flax's performance advice:
  ``nnx.split`` once, ``jax.jit`` a function that merges, and write the state
  back with :meth:`finish`. Same computation and donation as
  :func:`train_step` (the tests check that they agree).

  Usage::

    step = FastTrainStep(model, optimizer)
    for batch, lr in ...:
      loss = step(batch, lr)
    step.finish()  # model and optimizer now hold the trained state
  """

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
    self._objects = (model, optimizer)
    self.graphdef, self.state = nnx.split(self._objects)

  def __call__(self, batch: Arrays, lr: jax.Array) -> jax.Array:
    self.state, loss = _functional_train_step(
        self.graphdef, self.state, batch, lr
    )
    return loss

  def lower(self, batch: Arrays, lr: jax.Array) -> Any:
    """``jax.jit(...).lower`` of the step (for XLA's memory analysis)."""
    return _functional_train_step.lower(self.graphdef, self.state, batch, lr)

  def finish(self) -> None:
    """Writes the trained state back into the model and the optimizer."""
    nnx.update(self._objects, self.state)


@nnx.jit
def predict_step(model: nnx.Module, batch: Arrays) -> jax.Array:
  """Predicted class ids (dropout off)."""
  logits = model(
      batch['input_ids'],
      batch['attention_mask'],
      batch['token_type_ids'],
      deterministic=True,
  )
  return jnp.argmax(logits, axis=-1)


def predict(model: nnx.Module, arrays: Arrays, batch_size: int) -> np.ndarray:
  """Predictions for every example of ``arrays``, in order.

  The last batch is padded to ``batch_size`` (one compiled shape).
  """
  n = len(arrays['labels'])
  inputs = ('input_ids', 'attention_mask', 'token_type_ids')
  out = []
  for start in range(0, n, batch_size):
    batch = {k: arrays[k][start : start + batch_size] for k in inputs}
    size = len(batch['input_ids'])
    if size < batch_size:
      batch = {
          k: np.pad(v, ((0, batch_size - size), (0, 0)))
          for k, v in batch.items()
      }
    out.append(np.asarray(predict_step(model, batch))[:size])
  return np.concatenate(out)


# --------------------------------------------------------------------------
# Model and data.
# --------------------------------------------------------------------------


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

  config: bert.BertConfig
  weights: Mapping[str, np.ndarray]
  num_classes: int = data_lib.NUM_CLASSES
  pooling: str = 'mean'

  @classmethod
  def from_dir(cls, model_dir: str | os.PathLike, **kw) -> 'PretrainedFactory':
    """Reads ``config.json`` and ``model.safetensors`` of ``model_dir``."""
    from safetensors.numpy import load_file  # Example-only dependency.

    model_dir = Path(model_dir)
    return cls(
        config=bert.BertConfig.from_json_file(model_dir / 'config.json'),
        weights=load_file(str(model_dir / 'model.safetensors')),
        **kw,
    )

  def __call__(self, seed: int) -> bert.BertClassifier:
    model = bert.BertClassifier(
        self.config,
        self.num_classes,
        pooling=self.pooling,
        rngs=nnx.Rngs(seed),
    )
    bert.load_hf_weights(model.bert, self.weights)
    return model


def random_subset(
    split: data_lib.ReviewSplit, limit: int | None, seed: int = 0
) -> data_lib.ReviewSplit:
  """A seeded random subset of ``limit`` reviews (kept in file order)."""
  if limit is None or limit >= len(split):
    return split
  idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
  return split.subset(idx)


@dataclasses.dataclass
class Datasets:
  """Tokenised splits.

  Attributes:
    train: the whole train split (final runs).
    test: the test split (final runs).
    tune_train: train minus the held-out slice (tuning).
    tune_val: the held-out slice of train (tuning).
  """

  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  tune_train: dict[str, np.ndarray]
  tune_val: dict[str, np.ndarray]

  def sizes(self) -> dict[str, int]:
    return {
        name: len(getattr(self, name)['labels'])
        for name in ('train', 'test', 'tune_train', 'tune_val')
    }


def load_datasets(
    tokenizer: Any,
    *,
    max_len: int,
    data_path: str | os.PathLike | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    val_fraction: float = 0.15,
    split_seed: int = 0,
) -> Datasets:
  """Loads, subsets, splits and tokenises the drug reviews."""
  splits = data_lib.load_drug_reviews(data_path)
  train = random_subset(splits['train'], train_limit, split_seed)
  test = random_subset(splits['test'], test_limit, split_seed)
  tune_train, tune_val = data_lib.train_validation_split(
      train, val_fraction=val_fraction, seed=split_seed
  )
  encode = functools.partial(
      data_lib.encode_split, tokenizer=tokenizer, max_len=max_len
  )
  return Datasets(
      train=encode(train),
      test=encode(test),
      tune_train=encode(tune_train),
      tune_val=encode(tune_val),
  )


# --------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------


def count_steps(
    num_examples: int,
    batch_size: int,
    *,
    epochs: float | None = None,
    steps: int | None = None,
) -> int:
  """Optimizer steps of a run: ``steps``, or ``epochs`` of full batches."""
  if (epochs is None) == (steps is None):
    raise ValueError('give exactly one of epochs and steps')
  if num_examples < batch_size:
    raise ValueError(
        f'{num_examples} training examples < batch size {batch_size}'
    )
  if steps is None:
    steps = int(round(epochs * (num_examples // batch_size)))
  if steps < 1:
    raise ValueError(f'a run needs at least one step, got {steps}')
  return steps


def batches(arrays: Arrays, batch_size: int, steps: int, seed: int) -> Any:
  """``steps`` shuffled full batches (epoch ``e`` shuffled with seed
  ``1000 * seed + e``; the incomplete last batch of an epoch is dropped)."""
  done, epoch = 0, 0
  while done < steps:
    for batch in data_lib.batch_iterator(
        arrays, batch_size, seed=1000 * seed + epoch, drop_last=True
    ):
      yield batch
      done += 1
      if done == steps:
        return
    epoch += 1


_STEP_MEMORY: dict[tuple, dict[str, int]] = {}


def _xla_step_memory(step: FastTrainStep, batch, lr, key) -> dict[str, int]:
  """XLA's memory analysis of the compiled train step (cached per key)."""
  if key not in _STEP_MEMORY:
    stats = {}
    try:
      analysis = step.lower(batch, lr).compile().memory_analysis()
    except Exception:  # pylint: disable=broad-except  # Backend-dependent.
      analysis = None
    if analysis is not None:
      for name in ('argument', 'output', 'alias', 'temp'):
        stats[name] = int(getattr(analysis, f'{name}_size_in_bytes', 0))
      stats['total'] = (
          stats['argument'] + stats['output'] - stats['alias'] + stats['temp']
      )
    _STEP_MEMORY[key] = stats
  return _STEP_MEMORY[key]


def run(
    method: str | methods_lib.MethodSpec,
    lr: float,
    seed: int,
    *,
    model_factory: ModelFactory,
    train: Arrays,
    evaluation: Arrays,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    warmup_ratio: float = 0.06,
    galore_update_proj_gap: int = methods_lib.GALORE_UPDATE_PROJ_GAP,
    num_classes: int = data_lib.NUM_CLASSES,
    progress: bool = True,
    desc: str | None = None,
) -> dict[str, Any]:
  """Trains one method with one learning rate and seed, then evaluates.

  Args:
    method: a method name or spec (:mod:`examples.finetune.methods`).
    lr: the peak learning rate.
    seed: seeds the head, dropout, LoRA factors, MLorc sketches, data order.
    model_factory: ``seed -> fresh model``.
    train: tokenised training arrays (``input_ids``, ``attention_mask``,
      ``token_type_ids``, ``labels``).
    evaluation: tokenised arrays to score at the end.
    epochs: training length in epochs (or give ``steps``).
    steps: training length in optimizer steps.
    batch_size: training batch size.
    eval_batch_size: evaluation batch size.
    warmup_ratio: fraction of the steps spent warming up.
    galore_update_proj_gap: steps between GaLore projector updates.
    num_classes: for macro-F1.
    progress: show a tqdm bar.
    desc: the bar's label.

  Returns:
    A JSON-serialisable dict: ``method``, ``label``, ``lr``, ``seed``,
    ``steps``, ``accuracy``, ``macro_f1``, ``final_train_loss``,
    ``loss_curve``, ``opt_state_bytes``, ``param_bytes``, ``trainable_params``,
    ``total_params``, ``xla_step_memory`` (bytes: argument, output, alias,
    temp, total), ``device_peak_bytes`` (process peak so far, or None),
    ``compile_time_s`` (from the start of the run to the end of the first
    step: model build, tracing and compilation if not cached),
    ``train_time_s``, ``eval_time_s``, ``wall_time_s`` and ``steps_per_s``
    (after the first step).
  """
  spec = methods_lib.parse(method) if isinstance(method, str) else method
  start = time.perf_counter()
  total = count_steps(
      len(train['labels']), batch_size, epochs=epochs, steps=steps
  )
  schedule = lr_schedule(total, warmup_ratio)
  lrs = (np.asarray(schedule(np.arange(total))) * lr).astype(np.float32)

  model, optimizer = make_optimizer(
      spec,
      model_factory(seed),
      seed,
      galore_update_proj_gap=galore_update_proj_gap,
  )
  model.train()

  trainable_params = tree_size(nnx.state(model, optimizer.wrt))
  all_params = nnx.state(model, nnx.Param)
  total_params, param_bytes = tree_size(all_params), tree_bytes(all_params)
  data_iter = batches(train, batch_size, total, seed)
  first = next(data_iter)
  memory_key = (spec, galore_update_proj_gap, first['input_ids'].shape)
  step = FastTrainStep(model, optimizer)
  xla_memory = _xla_step_memory(step, first, jnp.float32(lrs[0]), memory_key)

  bar = None
  if progress:
    from tqdm.auto import tqdm  # Example-only dependency.

    bar = tqdm(total=total, desc=desc or spec.name, leave=False, unit='step')
  losses = []
  for t, batch in enumerate(_chain_first(first, data_iter)):
    losses.append(step(batch, jnp.float32(lrs[t])))
    if t == 0 or t == total - 1:
      losses[-1].block_until_ready()
      if t == 0:
        compile_time = time.perf_counter() - start
        t_steady = time.perf_counter()
    if bar is not None:
      bar.update(1)
      if t % 10 == 0 or t == total - 1:
        bar.set_postfix(loss=f'{float(losses[-1]):.4f}', lr=f'{lrs[t]:.2e}')
  train_end = time.perf_counter()
  step.finish()
  if bar is not None:
    bar.close()
  loss_curve = [float(x) for x in losses]
  steady_steps = total - 1
  steps_per_s = (
      steady_steps / (train_end - t_steady) if steady_steps > 0 else None
  )

  model.eval()
  eval_start = time.perf_counter()
  preds = predict(model, evaluation, eval_batch_size)
  eval_time = time.perf_counter() - eval_start
  labels = np.asarray(evaluation['labels'])
  opt_state = nnx.state(optimizer.opt_state)
  return {
      'method': spec.name,
      'label': spec.label,
      'lr': float(lr),
      'seed': int(seed),
      'steps': total,
      'batch_size': batch_size,
      'num_train': int(len(train['labels'])),
      'num_eval': int(len(labels)),
      'accuracy': accuracy(preds, labels),
      'macro_f1': macro_f1(preds, labels, num_classes),
      'final_train_loss': float(np.mean(loss_curve[-LOSS_TAIL:])),
      'loss_curve': loss_curve,
      'opt_state_bytes': tree_bytes(opt_state),
      'param_bytes': param_bytes,
      'trainable_params': trainable_params,
      'total_params': total_params,
      'xla_step_memory': xla_memory,
      'device_peak_bytes': device_peak_bytes(),
      'compile_time_s': compile_time,
      'train_time_s': train_end - start,
      'eval_time_s': eval_time,
      'wall_time_s': time.perf_counter() - start,
      'steps_per_s': steps_per_s,
  }


def _chain_first(first, rest):
  yield first
  yield from rest


# --------------------------------------------------------------------------
# Tuning and the whole study.
# --------------------------------------------------------------------------


TUNE_METRICS = ('accuracy', 'macro_f1')


def choose_lr(
    trials: Sequence[Mapping[str, Any]], metric: str = 'accuracy'
) -> float:
  """The learning rate of the best trial.

  Args:
    trials: dicts with ``lr``, ``accuracy`` and ``macro_f1``.
    metric: ``'accuracy'`` (ties: macro-F1) or ``'macro_f1'`` (ties:
      accuracy); remaining ties go to the smaller rate.

  Returns:
    The chosen learning rate.
  """
  if metric not in TUNE_METRICS:
    raise ValueError(f'metric must be one of {TUNE_METRICS}, got {metric!r}')
  other = 'macro_f1' if metric == 'accuracy' else 'accuracy'
  best = max(trials, key=lambda r: (r[metric], r[other], -r['lr']))
  return float(best['lr'])


def _strip(result: Mapping[str, Any]) -> dict[str, Any]:
  keep = ('lr', 'accuracy', 'macro_f1', 'final_train_loss', 'wall_time_s')
  return {k: result[k] for k in keep}


def study(
    method_names: Sequence[str],
    seeds: Sequence[int],
    *,
    model_factory: ModelFactory,
    datasets: Datasets,
    lr_grids: Mapping[str, Sequence[float]],
    fixed_lrs: Mapping[str, float],
    tune: bool,
    epochs: float | None,
    steps: int | None,
    tune_epochs: float | None,
    tune_steps: int | None,
    tune_seed: int = 0,
    tune_metric: str = 'accuracy',
    progress: bool = True,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    **run_kwargs: Any,
) -> dict[str, Any]:
  """Tunes (where needed) and runs every method; returns the results dict.

  Args:
    method_names: registry names.
    seeds: seeds of the final runs.
    model_factory: ``seed -> fresh model``.
    datasets: the tokenised splits.
    lr_grids: grid per method (methods missing here use their default).
    fixed_lrs: methods with a fixed learning rate (not tuned).
    tune: tune the methods that have no fixed rate; if False, each of them
      must have one in ``fixed_lrs``.
    epochs, steps: final-run length (one of them).
    tune_epochs, tune_steps: tuning-run length (one of them).
    tune_seed: the seed of the tuning runs.
    tune_metric: validation metric that picks the rate (:func:`choose_lr`).
    progress: tqdm bars.
    log: where progress lines go.
    checkpoint: called with the partial results after every run.
    **run_kwargs: passed to :func:`run` (batch sizes, warmup, ...).

  Returns:
    ``{'tuning': {...}, 'chosen_lr': {...}, 'runs': [...]}``.
  """
  specs = [methods_lib.parse(name) for name in method_names]
  missing = [s.name for s in specs if s.name not in fixed_lrs and not tune]
  if missing:
    raise ValueError(f'without tuning, give --lr for {missing}')
  tuning: dict[str, Any] = {}
  chosen: dict[str, float] = {}
  runs: list[dict[str, Any]] = []

  def save():
    if checkpoint is not None:
      checkpoint({'tuning': tuning, 'chosen_lr': chosen, 'runs': runs})

  for spec in specs:
    if spec.name in fixed_lrs:
      chosen[spec.name] = float(fixed_lrs[spec.name])
      tuning[spec.name] = {'fixed': chosen[spec.name]}
      continue
    grid = [float(x) for x in lr_grids.get(spec.name, spec.default_lr_grid)]
    trials = []
    for lr in grid:
      result = run(
          spec,
          lr,
          tune_seed,
          model_factory=model_factory,
          train=datasets.tune_train,
          evaluation=datasets.tune_val,
          epochs=tune_epochs,
          steps=tune_steps,
          progress=progress,
          desc=f'tune {spec.name} lr={lr:.1e}',
          **run_kwargs,
      )
      trials.append(_strip(result))
      tuning[spec.name] = {'grid': grid, 'trials': trials}
      save()
      log(
          f'tune {spec.name:16s} lr={lr:.1e} val_acc={result["accuracy"]:.4f}'
          f' val_f1={result["macro_f1"]:.4f}'
          f' loss={result["final_train_loss"]:.4f}'
          f' ({result["wall_time_s"]:.1f}s)'
      )
    chosen[spec.name] = choose_lr(trials, tune_metric)
    tuning[spec.name] = {
        'grid': grid,
        'trials': trials,
        'chosen': chosen[spec.name],
    }
    log(f'tune {spec.name:16s} chose lr={chosen[spec.name]:.1e}')

  for spec in specs:
    for seed in seeds:
      result = run(
          spec,
          chosen[spec.name],
          seed,
          model_factory=model_factory,
          train=datasets.train,
          evaluation=datasets.test,
          epochs=epochs,
          steps=steps,
          progress=progress,
          desc=f'{spec.name} seed={seed}',
          **run_kwargs,
      )
      runs.append(result)
      save()
      log(
          f'run  {spec.name:16s} seed={seed} lr={result["lr"]:.1e}'
          f' test_acc={result["accuracy"]:.4f}'
          f' test_f1={result["macro_f1"]:.4f}'
          f' loss={result["final_train_loss"]:.4f}'
          f' ({result["wall_time_s"]:.1f}s,'
          f' {result["steps_per_s"] or float("nan"):.2f} steps/s)'
      )
  return {'tuning': tuning, 'chosen_lr': chosen, 'runs': runs}


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def _method_values(
    items: Sequence[str] | None, flag: str, parse_value: Callable[[str], Any]
) -> dict[str, Any]:
  out = {}
  for item in items or ():
    name, sep, value = item.partition('=')
    if not sep or not name or not value:
      raise SystemExit(f'{flag} expects METHOD=VALUE, got {item!r}')
    methods_lib.parse(name)
    out[name] = parse_value(value)
  return out


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(',') if x)


def _grid_help() -> str:
  lines = []
  for name in methods_lib.DEFAULT_METHODS:
    grid = methods_lib.parse(name).default_lr_grid
    lines.append(f'{name}: {",".join(f"{x:g}" for x in grid)}')
  return '; '.join(lines)


_EPILOG = (
    'Protocol: each method without --lr is tuned on its grid with one seed'
    ' (--tune-seed), trained on the train split minus a held-out slice'
    ' (--val-fraction) and scored there; the best validation --tune-metric'
    ' wins. The final runs train on the whole train split with'
    ' every seed and are scored on the test split. Writes results.json,'
    ' results.md and results.png to --out.'
)


def build_parser(
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
  """The command-line interface (shared with the quickstart)."""
  parser = argparse.ArgumentParser(
      prog=prog,
      description=description or __doc__.split('\n\n')[0],
      epilog=epilog or _EPILOG,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  g = parser.add_argument_group('methods and seeds')
  g.add_argument(
      '--methods',
      nargs='+',
      default=list(methods_lib.DEFAULT_METHODS),
      metavar='METHOD',
      help=(
          'methods to compare: adamw, lion, mlorc_adamw_r<R>, '
          'mlorc_lion_r<R> (suffix _warm or _lorapre for another moment '
          'compressor), galore_r<R>, lora_r<R> (any rank R)'
      ),
  )
  g.add_argument(
      '--seeds',
      nargs='+',
      type=int,
      default=[0, 1, 2],
      help=(
          'seeds of the final runs (head init, dropout, data order, LoRA '
          'init, MLorc sketches)'
      ),
  )
  g = parser.add_argument_group('training')
  length = g.add_mutually_exclusive_group()
  length.add_argument(
      '--epochs',
      type=float,
      default=5.0,
      help='epochs of each final run (ignored with --steps)',
  )
  length.add_argument(
      '--steps', type=int, default=None, help='optimizer steps of each run'
  )
  g.add_argument('--batch-size', type=int, default=32, help='train batch')
  g.add_argument(
      '--eval-batch-size', type=int, default=128, help='evaluation batch'
  )
  g.add_argument(
      '--max-len',
      type=int,
      default=128,
      help='tokens per review (truncated / padded; MiniLM allows 512)',
  )
  g.add_argument(
      '--warmup-ratio',
      type=float,
      default=0.06,
      help='fraction of the steps with a linear warmup (then linear decay)',
  )
  g.add_argument(
      '--galore-update-proj-gap',
      type=int,
      default=methods_lib.GALORE_UPDATE_PROJ_GAP,
      help='steps between GaLore projector (SVD) updates',
  )
  g = parser.add_argument_group('learning rates')
  g.add_argument(
      '--tune',
      action=argparse.BooleanOptionalAction,
      default=True,
      help=(
          'tune the learning rate of every method without --lr on the grid;'
          ' with --no-tune every method needs a fixed rate (--lr)'
      ),
  )
  g.add_argument(
      '--lr',
      action='append',
      metavar='METHOD=VALUE',
      help='fixed peak learning rate of a method (not tuned); repeatable',
  )
  g.add_argument(
      '--lr-grid',
      action='append',
      metavar='METHOD=V1,V2,...',
      help=f'tuning grid of a method; repeatable. Defaults: {_grid_help()}',
  )
  tl = g.add_mutually_exclusive_group()
  tl.add_argument(
      '--tune-epochs',
      type=float,
      default=None,
      help='epochs of each tuning run (default: as the final runs)',
  )
  tl.add_argument(
      '--tune-steps',
      type=int,
      default=None,
      help='steps of each tuning run (default: as the final runs)',
  )
  g.add_argument(
      '--val-fraction',
      type=float,
      default=0.15,
      help='stratified held-out fraction of train used to score tuning runs',
  )
  g.add_argument(
      '--tune-seed', type=int, default=0, help='seed of the tuning runs'
  )
  g.add_argument(
      '--tune-metric',
      choices=TUNE_METRICS,
      default='accuracy',
      help=(
          'validation metric that picks the rate (ties: the other one, then'
          ' the smaller rate); macro_f1 is less noisy on the imbalanced,'
          ' small validation slice (a majority-class predictor already scores'
          ' ~64%% accuracy there)'
      ),
  )
  g = parser.add_argument_group('data and model')
  g.add_argument(
      '--train-limit',
      type=int,
      default=None,
      help='use a random subset of this many train reviews (of 600)',
  )
  g.add_argument(
      '--test-limit',
      type=int,
      default=None,
      help='use a random subset of this many test reviews (of 379)',
  )
  g.add_argument(
      '--split-seed',
      type=int,
      default=0,
      help='seed of the subsets and of the validation split',
  )
  g.add_argument(
      '--model-dir',
      type=Path,
      default=None,
      help=(
          'all-MiniLM-L6-v2 directory (config.json, model.safetensors, '
          'tokenizer.json); None: fetched into the cache'
      ),
  )
  g.add_argument(
      '--data',
      type=Path,
      default=None,
      help='drugsCom.zip; None: fetched into the cache',
  )
  g.add_argument(
      '--pooling',
      choices=('mean', 'cls', 'pooler'),
      default='mean',
      help='sentence pooling before the classifier head',
  )
  g = parser.add_argument_group('output')
  g.add_argument(
      '--out',
      type=Path,
      default=Path('finetune_results'),
      help='directory for results.json, results.md, results.png',
  )
  g.add_argument(
      '--no-progress', action='store_true', help='no tqdm progress bars'
  )
  g.add_argument('--no-figure', action='store_true', help='skip results.png')
  return parser


def _write_partial(path: Path, partial: Mapping[str, Any]) -> None:
  """Saves the results so far (a killed run keeps what it finished)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report_lib.to_json(partial)) + '\n')


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    default_lrs: Mapping[str, float] | None = None,
) -> dict:
  """Runs the study from command-line arguments; returns the results.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).
    prog: program name shown by ``--help``.
    description: description shown by ``--help``.
    epilog: text shown after the flags by ``--help``.
    defaults: flag defaults overriding the harness's (by ``dest`` name).
    default_lrs: fixed learning rates of methods not given ``--lr`` when
      tuning is off.

  Returns:
    The results dict (also written to ``--out``).
  """
  parser = build_parser(prog=prog, description=description, epilog=epilog)
  if defaults:
    parser.set_defaults(**defaults)
  args = parser.parse_args(argv)
  wall_start = time.perf_counter()
  fixed = _method_values(args.lr, '--lr', float)
  if not args.tune:
    for name, value in (default_lrs or {}).items():
      if name in args.methods:
        fixed.setdefault(name, value)
  grids = _method_values(args.lr_grid, '--lr-grid', _floats)
  for name in list(fixed) + list(grids):
    if name not in args.methods:
      raise SystemExit(f'{name} is not in --methods')
  epochs = None if args.steps is not None else args.epochs
  tune_epochs, tune_steps = args.tune_epochs, args.tune_steps
  if tune_epochs is None and tune_steps is None:
    tune_epochs, tune_steps = epochs, args.steps

  from examples.finetune import assets  # Imported late: network helpers.

  model_dir = args.model_dir or assets.fetch_minilm()
  data_path = args.data or assets.fetch_drug_reviews()
  tokenizer = data_lib.load_tokenizer(model_dir)
  datasets = load_datasets(
      tokenizer,
      max_len=args.max_len,
      data_path=data_path,
      train_limit=args.train_limit,
      test_limit=args.test_limit,
      val_fraction=args.val_fraction,
      split_seed=args.split_seed,
  )
  factory = PretrainedFactory.from_dir(model_dir, pooling=args.pooling)
  print(
      f'device: {jax.default_backend()} ({jax.local_devices()[0].device_kind});'
      f' data: {datasets.sizes()}',
      flush=True,
  )
  results = study(
      args.methods,
      args.seeds,
      model_factory=factory,
      datasets=datasets,
      lr_grids=grids,
      fixed_lrs=fixed,
      tune=args.tune,
      epochs=epochs,
      steps=args.steps,
      tune_epochs=tune_epochs,
      tune_steps=tune_steps,
      tune_seed=args.tune_seed,
      tune_metric=args.tune_metric,
      progress=not args.no_progress,
      batch_size=args.batch_size,
      eval_batch_size=args.eval_batch_size,
      warmup_ratio=args.warmup_ratio,
      galore_update_proj_gap=args.galore_update_proj_gap,
      checkpoint=functools.partial(_write_partial, args.out / 'partial.json'),
  )
  (args.out / 'partial.json').unlink(missing_ok=True)
  config = {
      k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
  }
  config.update(
      epochs=epochs,
      tune_epochs=tune_epochs,
      tune_steps=tune_steps,
      data_sizes=datasets.sizes(),
      model='sentence-transformers/all-MiniLM-L6-v2',
      dataset='UCI drug reviews (drugs.com), 3 classes',
      schedule=(
          f'linear warmup {args.warmup_ratio:g} of the steps, then linear'
          ' decay to 0'
      ),
      weight_decay=dict(methods_lib.WEIGHT_DECAY),
      mlorc_adamw_b1=methods_lib.MLORC_ADAMW_B1,
  )
  results = {
      'config': config,
      'versions': versions(),
      'device': device_description(),
      **results,
      'total_wall_time_s': time.perf_counter() - wall_start,
  }
  results['summary'] = report_lib.summarize(results['runs'])
  paths = report_lib.write_outputs(results, args.out, figure=not args.no_figure)
  print(report_lib.markdown_table(results))
  print(
      f'\ntotal wall time {results["total_wall_time_s"]:.1f}s; wrote '
      + ', '.join(str(p) for p in paths)
  )
  return results


if __name__ == '__main__':
  main()
