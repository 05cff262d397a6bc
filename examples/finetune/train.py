"""Training loop of the fine-tuning example: one method, rate and seed per run.

The loop knows no model: a ``seed -> model`` factory makes an NNX classifier
called as ``model(**inputs, deterministic=...)`` on a batch's inputs (every
array of the batch but ``labels``), returning logits.

The optimizer (:func:`make_optimizer`, just below) is the method's Optax
transformation at learning rate 1 followed by a multiplication by the step's
learning rate, which the train step takes as a traced scalar
(:func:`scale_by_step_lr`). That is exactly ``learning_rate=schedule`` for
every method (each ends with ``scale_by_learning_rate``), and it lets one
compiled train step serve every learning rate and seed of a method: MLorc's
sketches are seeded with ``optax.tree.set`` on the optimizer state
(:func:`seed_sketches`) instead of building the transformation with
``seed=`` (a new transformation is a new static graph, a new compilation).

Schedule: linear warmup over ``warmup_ratio`` of the steps, then linear decay
to 0 (:func:`lr_schedule`).

Train step: :func:`train_step` (dropout on, gradients only for the method's
``wrt`` filter) is compiled ahead of time as a pure function of
``nnx.split((model, optimizer))`` with the state donated
(:func:`compiled_train_step`): one compilation per method and batch shape,
XLA's memory analysis of that very executable, and no per-step NNX graph
traversal (on an H100 that overhead was larger than the MiniLM step itself).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlorc_optax
from benchmarks.toolkit import memory
from examples.finetune import data as data_lib
from examples.finetune import methods as methods_lib
from examples.finetune import metrics

Arrays = Mapping[str, np.ndarray]
ModelFactory = Callable[[int], nnx.Module]

LOSS_TAIL = 10
"""Final train loss = mean loss of the last ``LOSS_TAIL`` steps."""


def make_optimizer(
    spec: methods_lib.MethodSpec, model: nnx.Module, seed: int, *,
    galore_update_proj_gap: int = methods_lib.GALORE_UPDATE_PROJ_GAP,
) -> tuple[nnx.Module, nnx.Optimizer]:
  """The model a method trains (LoRA adds adapters) and its optimizer."""
  model, wrt = methods_lib.prepare(spec, model, seed=seed)
  tx = step_lr_transform(spec, galore_update_proj_gap)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  if spec.kind == 'mlorc':
    seed_sketches(optimizer, seed)
  return model, optimizer


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Arrays,
               lr: jax.Array) -> jax.Array:
  """One step, dropout on: gradients w.r.t. ``optimizer.wrt`` only."""

  def loss_fn(model):
    logits = model(**inputs(batch), deterministic=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['labels']).mean()

  wrt = nnx.DiffState(0, optimizer.wrt)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=wrt)(model)
  optimizer.update(model, grads, lr=lr)
  return loss


def seed_sketches(optimizer: nnx.Optimizer, seed: int) -> None:
  """Seeds MLorc's sketches as building the optimizer with ``seed=`` would.

  ``optax.tree.set`` on the optimizer's state keeps the transformation, so
  the compiled step too (a new transformation is a new static graph);
  ``sketch_key`` is the one field of that name in the state
  (:class:`mlorc_optax.LowRankMomentsState`), a no-op for other methods.
  """
  state = optax.tree.set(nnx.state(optimizer, nnx.OptState),
                         sketch_key=jax.random.PRNGKey(seed))
  nnx.update(optimizer, state)


@functools.lru_cache(maxsize=None)
def step_lr_transform(
    spec: methods_lib.MethodSpec, galore_update_proj_gap: int
) -> optax.GradientTransformation:
  """The method at learning rate 1, then times the step's ``lr``.

  Cached: ``nnx.Optimizer`` keeps the transformation in its static graph, so
  every run of a method must get the same object to share one compiled step.
  """
  method = methods_lib.transform(
      spec, 1.0, galore_update_proj_gap=galore_update_proj_gap)
  return optax.chain(method, scale_by_step_lr())


def scale_by_step_lr() -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by the ``lr`` keyword given to ``update``.

  ``optimizer.update(model, grads, lr=...)`` forwards ``lr`` here
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
      [optax.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


def inputs(batch: Arrays) -> dict[str, Any]:
  """The model's keyword inputs: every array of the batch but ``labels``."""
  return {k: v for k, v in batch.items() if k != 'labels'}


# --------------------------------------------------------------------------
# The compiled step and evaluation.
# --------------------------------------------------------------------------


def _pure_train_step(graphdef, state, batch, lr):
  model, optimizer = nnx.merge(graphdef, state)
  loss = train_step(model, optimizer, batch, lr)
  return nnx.state((model, optimizer)), loss


_jitted_train_step = jax.jit(
    _pure_train_step, static_argnums=0, donate_argnums=1)
_COMPILED: dict[Any, jax.stages.Compiled] = {}


def compiled_train_step(graphdef: Any, state: Any, batch: Arrays,
                        lr: jax.Array) -> jax.stages.Compiled:
  """:func:`train_step` compiled for a split ``(model, optimizer)``.

  Call it as ``state, loss = step(state, batch, lr)`` (``state`` donated),
  then ``nnx.update((model, optimizer), state)``. Cached per graph (method),
  state and batch shapes: every seed and learning rate of a method shares it.
  """
  avals = lambda tree: tuple((x.shape, str(x.dtype))
                             for x in jax.tree.leaves(tree))
  key = (graphdef, jax.tree.structure(state), avals(state), avals(batch))
  if key not in _COMPILED:
    _COMPILED[key] = _jitted_train_step.lower(graphdef, state, batch,
                                              lr).compile()
  return _COMPILED[key]


@nnx.jit
def _logits(model: nnx.Module, batch: Arrays) -> jax.Array:
  return model(**batch, deterministic=True)


def predict_logits(model: nnx.Module, arrays: Arrays,
                   batch_size: int) -> np.ndarray:
  """Logits of every example of ``arrays`` (dropout off), in order.

  The last batch is padded to ``batch_size`` (one compiled shape).
  """
  arrays = inputs(arrays)
  n = len(next(iter(arrays.values())))
  out = []
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    size = len(next(iter(batch.values())))
    pad = ((0, batch_size - size), (0, 0))
    batch = {k: np.pad(v, pad) for k, v in batch.items()}
    out.append(np.asarray(_logits(model, batch), np.float32)[:size])
  return np.concatenate(out)


def evaluate(model: nnx.Module, arrays: Arrays, batch_size: int,
             num_classes: int) -> dict[str, float]:
  """``accuracy``, ``macro_f1`` and ``cross_entropy`` on ``arrays``."""
  logits = predict_logits(model, arrays, batch_size)
  labels = np.asarray(arrays['labels'])
  preds = logits.argmax(-1)
  return {'accuracy': metrics.accuracy(preds, labels),
          'macro_f1': metrics.macro_f1(preds, labels, num_classes),
          'cross_entropy': metrics.cross_entropy(logits, labels)}


# --------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------


def count_steps(num_examples: int, batch_size: int, *,
                epochs: float | None = None, steps: int | None = None) -> int:
  """Optimizer steps of a run: ``steps``, or ``epochs`` of full batches."""
  if (epochs is None) == (steps is None):
    raise ValueError('give exactly one of epochs and steps')
  if num_examples < batch_size:
    raise ValueError(
        f'{num_examples} training examples < batch size {batch_size}')
  if steps is None:
    steps = int(round(epochs * (num_examples // batch_size)))
  if steps < 1:
    raise ValueError(f'a run needs at least one step, got {steps}')
  return steps


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
    progress: bool = False,
    desc: str | None = None,
) -> dict[str, Any]:
  """Trains one method with one peak learning rate and seed, then evaluates.

  Args:
    method: a method name or spec (:mod:`examples.finetune.methods`).
    lr: the peak learning rate.
    seed: seeds the head, dropout, LoRA factors, MLorc sketches, data order.
    model_factory: ``seed -> fresh model``.
    train: tokenised training arrays (with ``labels``).
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
    A JSON-ready dict: ``method``, ``label``, ``lr``, ``seed``, ``steps``,
    the :func:`evaluate` metrics on ``evaluation``, ``final_train_loss``,
    ``loss_curve``, ``opt_state_bytes``, ``param_bytes``,
    ``trainable_params``, ``total_params``, ``xla_step_memory`` (XLA's memory
    analysis of the compiled step), ``device_peak_bytes`` (process peak so
    far, None on CPU), ``compile_time_s`` (start of the run to the end of the
    first step), ``train_time_s``, ``eval_time_s``, ``wall_time_s`` and
    ``steps_per_s`` (after the first step).
  """
  spec = methods_lib.parse(method) if isinstance(method, str) else method
  start = time.perf_counter()
  total = count_steps(len(train['labels']), batch_size, epochs=epochs,
                      steps=steps)
  lrs = np.asarray(lr_schedule(total, warmup_ratio)(np.arange(total)))
  lrs = (lrs * lr).astype(np.float32)
  model, optimizer = make_optimizer(
      spec, model_factory(seed), seed,
      galore_update_proj_gap=galore_update_proj_gap)
  model.train()
  params = nnx.state(model, nnx.Param)
  trainable_params = memory.tree_size(nnx.state(model, optimizer.wrt))

  batches = data_lib.epoch_batches(train, batch_size, total, seed)
  first = next(batches)
  graphdef, state = nnx.split((model, optimizer))
  step = compiled_train_step(graphdef, state, first, jnp.float32(lrs[0]))
  bar = None
  if progress:
    from tqdm.auto import tqdm  # Example-only dependency.

    bar = tqdm(total=total, desc=desc or spec.name, leave=False, unit='step')
  losses = []
  for t, batch in enumerate(_chain_first(first, batches)):
    state, loss = step(state, batch, jnp.float32(lrs[t]))
    losses.append(loss)
    if t == 0:
      loss.block_until_ready()
      compile_time = time.perf_counter() - start
      steady_start = time.perf_counter()
    if bar is not None:
      bar.update(1)
      if t % 10 == 0 or t == total - 1:
        bar.set_postfix(loss=f'{float(loss):.4f}', lr=f'{lrs[t]:.2e}')
  jax.block_until_ready(losses[-1])
  train_end = time.perf_counter()
  nnx.update((model, optimizer), state)
  if bar is not None:
    bar.close()
  loss_curve = [float(x) for x in losses]

  model.eval()
  metrics = evaluate(model, evaluation, eval_batch_size, num_classes)
  eval_time = time.perf_counter() - train_end
  return {
      'method': spec.name,
      'label': spec.label,
      'lr': float(lr),
      'seed': int(seed),
      'steps': total,
      'batch_size': batch_size,
      'num_train': int(len(train['labels'])),
      'num_eval': int(len(evaluation['labels'])),
      **metrics,
      'final_train_loss': float(np.mean(loss_curve[-LOSS_TAIL:])),
      'loss_curve': loss_curve,
      'opt_state_bytes': memory.tree_bytes(nnx.state(optimizer.opt_state)),
      'state_split': (state_split(optimizer.opt_state)
                      if spec.kind == 'mlorc' else None),
      'param_bytes': memory.tree_bytes(params),
      'trainable_params': trainable_params,
      'total_params': memory.tree_size(params),
      'xla_step_memory': memory.compiled_memory(step),
      'device_peak_bytes': memory.device_peak_bytes(),
      'compile_time_s': compile_time,
      'train_time_s': train_end - start,
      'eval_time_s': eval_time,
      'wall_time_s': time.perf_counter() - start,
      'steps_per_s': ((total - 1) / (train_end - steady_start)
                      if total > 1 else None),
  }


def state_split(opt_state: Any) -> dict[str, Any]:
  """Where an MLorc optimizer state's bytes go (float32 factors).

  Returns:
    ``compressed_leaves``, ``factor_bytes`` (their factors) and
    ``replaced_bytes`` (the dense moments the factors stand for);
    ``dense_leaves`` (the others), ``dense_bytes`` (every dense moment) and
    ``largest_dense`` (``[path, bytes]`` of the leaf with the most).
  """
  plans = list(mlorc_optax.compression_plan(opt_state, None).values())
  nbytes = lambda p, numbers: numbers * np.dtype(p.dtype).itemsize
  dense = {p.path: nbytes(p, p.dense_moments * p.size) for p in plans}
  packed = [p for p in plans if p.compressed]
  return {
      'compressed_leaves': len(packed),
      'factor_bytes': sum(4 * (p.state_size - p.dense_moments * p.size)
                          for p in packed),
      'replaced_bytes': sum(nbytes(p, len(p.moments) * p.size)
                            for p in packed),
      'dense_leaves': len(plans) - len(packed),
      'dense_bytes': sum(dense.values()),
      'largest_dense': list(max(dense.items(), key=lambda kv: kv[1])),
  }


def _chain_first(first, rest):
  yield first
  yield from rest
