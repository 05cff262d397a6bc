"""Training runs of the Shakespeare benchmark, several runs of a method at once.

The optimizer of every run (:func:`optimizer`): clip the global gradient
norm, apply the method at learning rate 1, multiply by the schedule and by
the run's peak learning rate. The rate is an argument of the update, not a
constant of the transformation, so one compiled step serves every rate and
seed of a method.

A group of runs of one method (different rates and seeds) is trained as
*lanes* of one ``jax.vmap``-ed step: parameters and moments get a leading
lane axis, integer scalars of the optimizer state (step counts, equal in
every lane) stay shared, so that ``lax.cond`` on the count (GaLore's SVD
every ``update_proj_gap`` steps) stays a branch rather than a ``select``. A
run's parameters and batch order are functions of its seed only (the same
for every method), its MLorc sketch key is ``PRNGKey(seed)``. Each jitted
call runs ``eval_every`` steps under ``lax.scan``, then the lanes are scored
on validation windows (the curve); at the end on every tuning and validation
window.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.shakespeare import config as config_lib
from benchmarks.shakespeare import data as data_lib
from benchmarks.shakespeare import methods as methods_lib
from examples.llama import model as llama


def optimizer(method: methods_lib.Method, config: config_lib.Config
              ) -> optax.GradientTransformationExtraArgs:
  """Clip, the method at rate 1, the schedule, then x ``lr`` (an update arg).

  ``tx.update(grads, state, params, lr=peak_lr)``.
  """
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip
      else optax.identity(),
      method.build(),
      optax.scale_by_schedule(schedule(config)),
      scale_by_lr_argument(),
  )


def scale_by_lr_argument() -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by the ``lr`` keyword of ``update``."""

  def update_fn(updates, state, params=None, *, lr, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * jnp.asarray(lr, u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def schedule(config: config_lib.Config) -> optax.Schedule:
  """Linear warm-up to 1, then cosine or linear decay to ``min_lr_ratio``."""
  decay_steps = config.steps - config.warmup_steps
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(1.0, decay_steps, config.min_lr_ratio)
  else:
    decay = optax.linear_schedule(1.0, config.min_lr_ratio, decay_steps)
  if not config.warmup_steps:
    return decay
  warmup = optax.linear_schedule(1.0 / config.warmup_steps, 1.0,
                                 config.warmup_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


# ---------------------------------------------------------------------------
# Model and data on the device.
# ---------------------------------------------------------------------------


def model_config(config: config_lib.Config) -> llama.LlamaConfig:
  """The byte-level LLaMA-style decoder of ``config``."""
  return llama.LlamaConfig(
      vocab_size=data_lib.VOCAB_SIZE, dim=config.dim,
      n_layers=config.n_layers, n_heads=config.n_heads,
      n_kv_heads=config.n_heads, ffn_dim=config.ffn_dim,
      max_seq_len=config.seq_len, compute_dtype=config.compute_dtype)


@functools.lru_cache(maxsize=8)
def _graphdef(cfg: llama.LlamaConfig) -> Any:
  return nnx.split(llama.abstract_model(cfg))[0]


def init_params(cfg: llama.LlamaConfig, seed: int) -> dict[str, Any]:
  """Parameters of the model initialised with ``seed`` (a plain dict)."""
  return nnx.to_pure_dict(nnx.state(llama.create_model(cfg, seed)))


@functools.lru_cache(maxsize=16)
def _initial(cfg: llama.LlamaConfig, seed: int) -> dict[str, Any]:
  return init_params(cfg, seed)


def init_lanes(cfg: llama.LlamaConfig, seeds: Sequence[int]) -> dict[str, Any]:
  """:func:`init_params` of each seed, stacked along a leading lane axis.

  Eager (a jitted, vmapped initialisation compiles for several seconds on a
  CPU) and cached by seed, so every method starts from the same arrays.
  """
  return jax.tree.map(lambda *x: jnp.stack(x),
                      *[_initial(cfg, s) for s in seeds])


def loss_fn(cfg: llama.LlamaConfig, params: Any, tokens: jax.Array
            ) -> jax.Array:
  """Mean next-byte cross entropy (nats) of ``tokens [batch, seq + 1]``."""
  return llama.cross_entropy_loss(nnx.merge(_graphdef(cfg), params), tokens)


class Corpus(NamedTuple):
  """What the runs read: the training stream and held-out windows."""

  train: np.ndarray       # uint8 [n]
  curve: np.ndarray       # uint8 [curve_windows, seq_len + 1]
  tuning: np.ndarray      # uint8 [windows, seq_len + 1]
  validation: np.ndarray  # uint8 [windows, seq_len + 1]


def make_corpus(texts: dict[str, bytes], splits: data_lib.Splits,
                config: config_lib.Config) -> Corpus:
  """The streams of ``splits`` (held-out windows: whole eval batches)."""

  def windows(ids, limit=0):
    tokens = data_lib.stream(texts, ids)
    n = (len(tokens) - 1) // config.seq_len
    n = min(n, limit) if limit else n
    n = max(config.eval_batch_size, n - n % config.eval_batch_size)
    return data_lib.eval_windows(tokens, seq_len=config.seq_len, limit=n)

  return Corpus(data_lib.stream(texts, splits.train),
                windows(splits.validation, config.curve_windows),
                windows(splits.tuning), windows(splits.validation))


# ---------------------------------------------------------------------------
# Lanes.
# ---------------------------------------------------------------------------


def seed_sketches(state: Any, seeds: Sequence[int]) -> Any:
  """Sets MLorc's ``sketch_key`` of lane i to ``seeds[i]`` (if any)."""
  if not optax.tree.get_all_with_path(state, 'sketch_key'):
    return state
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  return optax.tree.set(state, sketch_key=keys)


@functools.partial(jax.jit, static_argnums=0)
def _batch_loss(cfg: llama.LlamaConfig, params: Any, batch: jax.Array
                ) -> jax.Array:
  """Per-lane mean loss ``[lanes]`` of stacked ``params`` on one batch."""
  tokens = batch.astype(jnp.int32)
  return jax.vmap(lambda p: loss_fn(cfg, p, tokens))(params)


def evaluate(cfg: llama.LlamaConfig, params: Any, windows: np.ndarray,
             batch_size: int) -> np.ndarray:
  """Per-lane mean loss of stacked ``params`` over ``windows``.

  One compiled batch step serves every split (``len(windows)`` is a
  multiple of ``batch_size``, see :func:`make_corpus`).
  """
  total = sum(_batch_loss(cfg, params, windows[i:i + batch_size])
              for i in range(0, len(windows), batch_size))
  return np.asarray(total) / (len(windows) // batch_size)


class Run(NamedTuple):
  """One training run: a method's peak learning rate and seed."""

  lr: float
  seed: int


def _finite(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def train_step(cfg: llama.LlamaConfig,
               tx: optax.GradientTransformationExtraArgs, params: Any,
               state: Any, train_tokens: jax.Array, offsets: jax.Array,
               lr: jax.Array) -> tuple[Any, Any, jax.Array]:
  """One step of one run on the windows at ``offsets`` of the stream."""
  idx = offsets[:, None] + jnp.arange(cfg.max_seq_len + 1)
  tokens = train_tokens[idx].astype(jnp.int32)
  loss, grads = jax.value_and_grad(functools.partial(loss_fn, cfg))(
      params, tokens)
  updates, state = tx.update(grads, state, params, lr=lr)
  return optax.apply_updates(params, updates), state, loss


def lane_steps(cfg: llama.LlamaConfig,
               tx: optax.GradientTransformationExtraArgs, axes: Any
               ) -> Any:
  """``k`` steps of every lane (``vmap`` over lanes, ``lax.scan`` over steps).

  Args:
    cfg: the model.
    tx: the optimizer (:func:`optimizer`).
    axes: lane axes of its state (:func:`methods.batch_axes`).

  Returns:
    ``steps(params, state, stream, offsets [k, lanes, batch], lrs [lanes])
    -> (params, state, losses [k, lanes])``.
  """
  step = jax.vmap(functools.partial(train_step, cfg, tx),
                  in_axes=(0, axes, None, 0, 0), out_axes=(0, axes, 0))

  def steps(params, state, train_tokens, offsets, lrs):
    def body(carry, offs):
      params, state, loss = step(*carry, train_tokens, offs, lrs)
      return (params, state), loss
    (params, state), losses = jax.lax.scan(body, (params, state), offsets)
    return params, state, losses

  return steps


def train_group(method: methods_lib.Method, runs: Sequence[Run],
                corpus: Corpus, config: config_lib.Config,
                log: Any = print) -> list[dict[str, Any]]:
  """Trains ``runs`` of ``method`` together (lanes) and scores them.

  Returns:
    One record per run: ``method``, ``lr``, ``seed``, ``val_loss`` and
    ``tuning_loss`` (nats/byte on every window; None if not finite), the
    ``curve`` (``step``, ``val_loss`` on ``corpus.curve``, mean
    ``train_loss`` since the previous point), ``lanes`` and ``seconds``
    (``compile``, ``train``, ``eval``, shared by the group's runs).
  """
  cfg = model_config(config)
  tx = optimizer(method, config)
  seeds = [r.seed for r in runs]
  params = init_lanes(cfg, seeds)
  axes = methods_lib.batch_axes(jax.eval_shape(tx.init, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)))
  state = seed_sketches(
      jax.jit(jax.vmap(tx.init, out_axes=axes))(params), seeds)
  lrs = jnp.asarray([r.lr for r in runs], jnp.float32)
  train_tokens = jnp.asarray(corpus.train)  # an argument, not a constant
  offsets = np.stack([
      data_lib.train_offsets(len(corpus.train), seq_len=config.seq_len,
                             batch_size=config.batch_size,
                             steps=config.steps, seed=s) for s in seeds], 1)
  k = config.eval_every
  clock = time.perf_counter()
  steps = jax.jit(lane_steps(cfg, tx, axes), donate_argnums=(0, 1)).lower(
      params, state, train_tokens, offsets[:k], lrs).compile()
  seconds = {'compile': time.perf_counter() - clock, 'train': 0.0,
             'eval': 0.0}

  curve = {'step': [], 'val_loss': [], 'train_loss': []}
  for t in range(0, config.steps, k):
    clock = time.perf_counter()
    params, state, losses = steps(params, state, train_tokens,
                                  offsets[t:t + k], lrs)
    curve['train_loss'].append(np.asarray(jnp.mean(losses, axis=0)))
    seconds['train'] += time.perf_counter() - clock
    clock = time.perf_counter()
    curve['val_loss'].append(
        evaluate(cfg, params, corpus.curve, config.eval_batch_size))
    seconds['eval'] += time.perf_counter() - clock
    curve['step'].append(t + k)
    log(f'{method.spec} step {t + k}: val '
        + ' '.join(f'{v:.4f}' for v in curve['val_loss'][-1]))
  clock = time.perf_counter()
  final = {name: evaluate(cfg, params, windows, config.eval_batch_size)
           for name, windows in (('tuning_loss', corpus.tuning),
                                 ('val_loss', corpus.validation))}
  seconds['eval'] += time.perf_counter() - clock
  return [{
      'method': method.spec, 'lr': run.lr, 'seed': run.seed,
      'val_loss': _finite(final['val_loss'][i]),
      'tuning_loss': _finite(final['tuning_loss'][i]),
      'curve': {'step': curve['step'],
                'val_loss': [_finite(v[i]) for v in curve['val_loss']],
                'train_loss': [_finite(v[i]) for v in curve['train_loss']]},
      'lanes': len(runs), 'seconds': dict(seconds),
  } for i, run in enumerate(runs)]
