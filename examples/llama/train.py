"""Train the LLaMA-style model with optax.adamw or mlorc_adamw and measure it.

One jitted full training step (forward, backward, optimizer update through
``nnx.Optimizer``; parameters and optimizer state donated) is timed over warm
steps (median, ``block_until_ready`` after each step), and the run reports
tokens/s, peak device memory (``memory_stats()['peak_bytes_in_use']``; None
on CPU), optimizer-state bytes, parameter count and XLA's compiled memory
estimate of the step.

Usage::

  # one optimizer
  python -m examples.llama.train --preset small --optimizer mlorc_adamw \\
      --steps 50 --batch 8 --seq-len 256 --rank 4 \\
      --param-dtype bfloat16 --remat --json /tmp/run.json
  # both, back to back at the same config, with a markdown table
  python -m examples.llama.train --preset 1b --optimizer both --steps 30 \\
      --batch 8 --seq-len 1024 --param-dtype bfloat16 --remat

``--moment-dtype float32`` (the default) runs both optimizers on float32
copies of the gradients and parameters, so every moment they keep (optax's
dense ``mu``/``nu``, MLorc's factors and the dense moments of the leaves it
does not compress) is float32 even with bfloat16 parameters. ``param`` keeps
optax's own rule instead: ``optax.adamw``'s moments then take the parameter
dtype (bfloat16), and ``mlorc_adamw`` keeps float32 factors and parameter-
dtype moments for its uncompressed leaves.

Environment: unless already set, ``main`` sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` before JAX starts, so large models may
use (almost) the whole GPU (the default fraction is 0.75 even without
preallocation), and works around an XLA:CPU deadlock (see
:data:`CPU_DEADLOCK_FLAG`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlorc_optax
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import parallel

#: Optimizer names accepted by :func:`make_optimizer`.
OPTIMIZERS: tuple[str, ...] = ('adamw', 'mlorc_adamw')

#: Default ``b1`` per optimizer (MLorc-AdamW: the paper's 0.8).
DEFAULT_B1 = {'adamw': 0.9, 'mlorc_adamw': 0.8}

_ENV_DEFAULTS = {
    'XLA_PYTHON_CLIENT_PREALLOCATE': 'false',
    'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.95',
}

#: XLA:CPU flag added to ``XLA_FLAGS`` by :func:`set_xla_env`. With jaxlib
#: 0.10.2, XLA:CPU's concurrency-optimised scheduler can deadlock a program
#: that runs several independent batched QR + SVD chains (MLorc's update of
#: stacked layers, e.g. two ``(8, 768, 768)`` kernels): the executable waits
#: forever with every worker idle. Turning the scheduler off avoids it; GPUs
#: are unaffected.
CPU_DEADLOCK_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def set_xla_env() -> dict[str, str]:
  """Sets XLA client variables (if unset) before JAX starts.

  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and
  ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (the allocator's limit is 0.75 of
  the GPU even without preallocation), and appends :data:`CPU_DEADLOCK_FLAG`
  to ``XLA_FLAGS``. Has no effect once JAX's backends are initialised.

  Returns:
    The effective values.
  """
  for key, value in _ENV_DEFAULTS.items():
    os.environ.setdefault(key, value)
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_enable_concurrency_optimized_scheduler' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_DEADLOCK_FLAG}'.strip()
  return {key: os.environ[key] for key in (*_ENV_DEFAULTS, 'XLA_FLAGS')}


# ---------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------


def with_float32_moments(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Runs ``tx`` on float32 copies of the updates and parameters.

  ``optax.scale_by_adam`` keeps its second moment in the parameter dtype
  (and the first one too unless ``mu_dtype`` is given), so with bfloat16
  parameters ``optax.adamw`` has bfloat16 moments. Initialising and updating
  on float32 copies makes every moment float32 (mixed-precision training
  without float32 master weights); the updates are cast back to the dtype of
  the incoming updates.

  Args:
    tx: the transformation to wrap.

  Returns:
    The wrapped transformation.
  """

  def to_f32(tree: Any) -> Any:
    if tree is None:
      return None
    return jax.tree.map(
        lambda x: x.astype(jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x,
        tree,
    )

  def init_fn(params: optax.Params) -> optax.OptState:
    return tx.init(to_f32(params))

  def update_fn(
      updates: optax.Updates,
      state: optax.OptState,
      params: optax.Params | None = None,
  ) -> tuple[optax.Updates, optax.OptState]:
    new_updates, state = tx.update(to_f32(updates), state, to_f32(params))
    return optax.tree.cast_like(new_updates, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    b1: float | None = None,
    weight_decay: float = 0.0,
    rank: int = 4,
    moment_dtype: str = 'float32',
    seed: int = 0,
) -> optax.GradientTransformation:
  """``optax.adamw`` or ``mlorc_optax.mlorc_adamw`` with shared settings.

  Args:
    name: ``'adamw'`` or ``'mlorc_adamw'``.
    learning_rate: constant learning rate.
    b1: first-moment decay; None for :data:`DEFAULT_B1`.
    weight_decay: decoupled weight decay (applied to every parameter).
    rank: MLorc rank.
    moment_dtype: ``'float32'`` (see :func:`with_float32_moments`) or
      ``'param'`` (optax's rule: moments in the parameter dtype).
    seed: seed of MLorc's sketches.

  Returns:
    The optimizer.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}.')
  if moment_dtype not in ('float32', 'param'):
    raise ValueError(
        f"moment_dtype must be 'float32' or 'param', got " f'{moment_dtype!r}.'
    )
  b1 = DEFAULT_B1[name] if b1 is None else b1
  if name == 'adamw':
    tx = optax.adamw(learning_rate, b1=b1, weight_decay=weight_decay)
  else:
    tx = mlorc_optax.mlorc_adamw(
        learning_rate, b1=b1, weight_decay=weight_decay, rank=rank, seed=seed
    )
  if moment_dtype == 'float32':
    tx = with_float32_moments(tx)
  return tx


# ---------------------------------------------------------------------------
# Training step.
# ---------------------------------------------------------------------------


def build(
    cfg: model_lib.LlamaConfig,
    tx: optax.GradientTransformation,
    *,
    seed: int = 0,
    abstract: bool = False,
) -> tuple[nnx.GraphDef, nnx.State]:
  """The model and its ``nnx.Optimizer``, split into (graphdef, state).

  Args:
    cfg: model configuration.
    tx: the optimizer.
    seed: parameter initialisation seed.
    abstract: build with ``nnx.eval_shape`` (``ShapeDtypeStruct`` leaves,
      nothing allocated).

  Returns:
    ``nnx.split((model, optimizer))``. The concrete state is created by one
    jitted program, so the device holds only the final arrays (no eager
    temporaries, e.g. the float32 parameter copies that
    :func:`with_float32_moments` casts for ``tx.init``).
  """

  def make() -> tuple[model_lib.Llama, nnx.Optimizer]:
    model = model_lib.create_model(cfg, seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  if abstract:
    return graphdef, abstract_state
  state = jax.jit(lambda: nnx.split(make())[1])()
  return graphdef, state


def make_train_step(
    graphdef: nnx.GraphDef,
    shardings: Any = None,
    tokens_sharding: Any = None,
) -> Any:
  """The jitted step ``(state, tokens) -> (state, loss)``; donates ``state``.

  ``tokens`` is ``int32 [batch, seq_len + 1]``; the step computes the
  next-token loss and its gradient with respect to every ``nnx.Param`` and
  applies ``nnx.Optimizer.update``. With ``shardings`` (the state's
  ``NamedSharding`` tree, :func:`examples.llama.parallel.build_sharded`) and
  ``tokens_sharding`` the state keeps its placement across steps and the
  loss is replicated.
  """

  def step(state: nnx.State, tokens: jax.Array) -> tuple[nnx.State, Any]:
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(model_lib.cross_entropy_loss)(
        model, tokens
    )
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(
      tokens_sharding.mesh, jax.sharding.PartitionSpec()
  )
  return jax.jit(
      step,
      in_shardings=(shardings, tokens_sharding),
      out_shardings=(shardings, replicated),
      donate_argnums=0,
  )


def compile_step(
    cfg: model_lib.LlamaConfig,
    tx: optax.GradientTransformation,
    *,
    batch: int,
    seq_len: int,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
  """Compiles the training step from abstract shapes (allocates nothing).

  Args:
    cfg: model configuration.
    tx: the optimizer.
    batch: sequences per step.
    seq_len: tokens per sequence.
    seed: parameter seed (only the structure matters here).

  Returns:
    ``(compiled, info)``: the executable, to be called as
    ``compiled(state, tokens)`` with the state of :func:`build`, and a dict
    with ``param_bytes``, ``opt_state_bytes``, ``compile_s`` and
    ``compiled_memory`` (:func:`memory_analysis_dict`).
  """
  t0 = time.perf_counter()
  graphdef, abstract_state = build(cfg, tx, seed=seed, abstract=True)
  token_spec = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  compiled = (
      make_train_step(graphdef).lower(abstract_state, token_spec).compile()
  )
  info = {
      'param_bytes': model_lib.tree_bytes(abstract_state[0]),
      'opt_state_bytes': optimizer_state_bytes(abstract_state),
      'compile_s': time.perf_counter() - t0,
      'compiled_memory': memory_analysis_dict(compiled),
  }
  return compiled, info


def make_update_step(
    graphdef: nnx.GraphDef, shardings: Any = None, grad_shardings: Any = None
) -> Any:
  """The jitted optimizer update alone: ``(state, grads) -> state``.

  Runs ``nnx.Optimizer.update`` with given gradients (no forward or
  backward pass), donating ``state``; for attributing step time. With
  ``shardings`` (of the state) and ``grad_shardings`` the placement is
  pinned as in :func:`make_train_step`.
  """

  def update(state: nnx.State, grads: Any) -> nnx.State:
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  if shardings is None:
    return jax.jit(update, donate_argnums=0)
  return jax.jit(
      update,
      in_shardings=(shardings, grad_shardings),
      out_shardings=shardings,
      donate_argnums=0,
  )


def time_update_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    calls: int,
    *,
    seed: int = 0,
    shardings: Any = None,
) -> tuple[float, nnx.State]:
  """Median seconds of :func:`make_update_step` over ``calls`` calls.

  Gradients are standard normal (times 1e-3) in the parameter dtypes,
  placed like the parameters.

  Returns:
    ``(median seconds, new state)``; the input ``state`` is donated.
  """
  grads = parallel.random_grads_like(
      nnx.state(nnx.merge(graphdef, state)[0], nnx.Param), seed
  )
  update = make_update_step(
      graphdef, shardings, jax.tree.map(lambda g: g.sharding, grads)
  )
  times = []
  for i in range(calls + 1):
    t0 = time.perf_counter()
    state = jax.block_until_ready(update(state, grads))
    if i:  # the first call compiles
      times.append(time.perf_counter() - t0)
  return statistics.median(times), state


def timed_steps(
    step_fn: Any,
    state: Any,
    batches: Iterator[np.ndarray],
    steps: int,
    *,
    warmup: int,
    place: Any = jnp.asarray,
    log: Any = None,
    log_every: int = 0,
    label: str = '',
) -> tuple[Any, list[float], list[float]]:
  """Runs ``steps`` training steps, timing each to ``block_until_ready``.

  Args:
    step_fn: ``(state, tokens) -> (state, loss)`` (``state`` donated).
    state: the initial state.
    batches: an iterator of token arrays.
    steps: steps to run.
    warmup: the first steps, not timed.
    place: puts a host batch on the device(s).
    log: a print function for progress (None: quiet).
    log_every: log the loss every this many steps (0: never).
    label: prefix of the log lines.

  Returns:
    ``(state, losses, times)``: the final state, every step's loss and the
    seconds of the timed steps (the last step's if all were warm-up).

  Raises:
    FloatingPointError: on a non-finite loss.
  """
  times, losses, dt = [], [], 0.0
  for i in range(steps):
    tokens = place(next(batches))
    t0 = time.perf_counter()
    state, loss = step_fn(state, tokens)
    loss = float(jax.block_until_ready(loss))
    dt = time.perf_counter() - t0
    if i >= warmup:
      times.append(dt)
    losses.append(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(f'{label} loss is {loss} at step {i}.'.strip())
    if log and log_every and (i % log_every == 0 or i == steps - 1):
      log(f'{label} step {i:5d}  loss {loss:.4f}  {dt * 1e3:8.1f} ms')
  return state, losses, (times or [dt])


def optimizer_state_bytes(state: nnx.State) -> int:
  """Bytes of the optimizer state (``opt_state``, without the step count)."""
  optimizer = state[1]
  if 'opt_state' not in optimizer:  # e.g. optax.sgd: no state at all
    return 0
  return model_lib.tree_bytes(optimizer['opt_state'])


def memory_analysis_dict(compiled: Any) -> dict[str, int] | None:
  """XLA's compiled memory statistics as a dict (None if unavailable).

  Adds ``estimated_peak_bytes``: the larger of ``peak_memory_in_bytes``
  (where the backend reports it; on CPU it leaves out temporaries) and
  ``argument + output - alias + temp``.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  names = (
      'argument_size_in_bytes',
      'output_size_in_bytes',
      'alias_size_in_bytes',
      'temp_size_in_bytes',
      'generated_code_size_in_bytes',
      'peak_memory_in_bytes',
  )
  out = {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}
  total = (
      out.get('argument_size_in_bytes', 0)
      + out.get('output_size_in_bytes', 0)
      - out.get('alias_size_in_bytes', 0)
      + out.get('temp_size_in_bytes', 0)
  )
  out['estimated_peak_bytes'] = max(total, out.get('peak_memory_in_bytes', 0))
  return out


def device_memory_stats() -> dict[str, int] | None:
  """``memory_stats()`` of the first local device (None on CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return dict(stats) if stats else None


def is_oom(error: BaseException) -> bool:
  """Whether ``error`` is an XLA / allocator out-of-memory error."""
  text = f'{type(error).__name__}: {error}'
  return any(
      s in text
      for s in (
          'RESOURCE_EXHAUSTED',
          'Out of memory',
          'out of memory',
          'OOM',
          'Failed to allocate',
          'failed to allocate',
          'Allocator',
          'exceeds the memory',
          'ALLOC_FAILED',
          'cudaErrorMemoryAllocation',
      )
  )


def _short_error(error: BaseException, limit: int = 600) -> str:
  text = f'{type(error).__name__}: {error}'.strip()
  return text if len(text) <= limit else text[:limit] + ' ...'


def _gib(x: float | None) -> str:
  return '-' if x is None else f'{x / 2**30:.2f}'


def run(
    cfg: model_lib.LlamaConfig,
    optimizer: str,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int = 2,
    lr: float = 3e-4,
    b1: float | None = None,
    weight_decay: float = 0.0,
    rank: int = 4,
    moment_dtype: str = 'float32',
    data: str = 'reviews',
    batches: Iterator[np.ndarray] | None = None,
    seed: int = 0,
    log_every: int = 10,
    time_update: int = 0,
    sharding: str = 'none',
    devices: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
  """Trains ``steps`` steps and returns measurements (never raises on OOM).

  On one device (``sharding='none'``) the step is compiled ahead of time
  from abstract shapes (recording XLA's memory estimate) before any
  parameter is allocated. With ``'dp'`` or ``'fsdp'`` the model and
  optimizer are placed on a mesh of ``devices`` devices first
  (:mod:`examples.llama.parallel`) and the step is compiled for that
  placement; the global batch is ``batch`` either way.

  Args:
    cfg: model configuration.
    optimizer: ``'adamw'`` or ``'mlorc_adamw'``.
    batch: sequences per step.
    seq_len: tokens per sequence (model input length).
    steps: training steps (the first ``warmup`` are not timed).
    warmup: untimed steps after compilation.
    lr: learning rate.
    b1: first-moment decay (None: :data:`DEFAULT_B1`).
    weight_decay: decoupled weight decay.
    rank: MLorc rank.
    moment_dtype: see :func:`make_optimizer`.
    data: ``'reviews'`` or ``'synthetic'`` (ignored if ``batches`` given).
    batches: an iterator of ``int32 [batch, seq_len + 1]`` arrays.
    seed: seed of the parameters, sketches and data windows.
    log_every: print the loss every this many steps (0: never).
    time_update: after training, also time the optimizer update alone
      (:func:`make_update_step`, random gradients) over this many calls
      (0: skip); adds ``update_time_s`` and ``update_fraction``.
    sharding: ``'none'``, ``'dp'`` or ``'fsdp'``
      (:data:`examples.llama.parallel.MODES`).
    devices: devices on the mesh (with ``'dp'`` / ``'fsdp'``); must divide
      ``batch``.
    verbose: print progress.

  Returns:
    A JSON-serialisable dict: ``status`` (``'ok'``, ``'oom'`` or
    ``'error'``), ``tokens_per_s``, ``step_time_s`` (median of timed steps),
    ``peak_bytes`` (device peak, None on CPU; the largest over the mesh's
    devices) and ``peak_bytes_per_device``, ``opt_state_bytes`` (global),
    ``param_count``, ``param_bytes``, ``compiled_memory`` (XLA's estimate,
    per device), ``losses`` and the settings. Sharded runs add
    ``update_collectives`` (:func:`examples.llama.parallel.update_collectives`
    of the optimizer update) and ``gathers_dense_moment`` (whether any of
    its transfers could hold a dense moment,
    :func:`examples.llama.parallel.moves_dense_moment`).
  """
  log = print if verbose else (lambda *a, **k: None)
  result: dict[str, Any] = {
      'optimizer': optimizer,
      'config': dataclasses.asdict(cfg),
      'param_count': cfg.num_params(),
      'batch': batch,
      'seq_len': seq_len,
      'tokens_per_step': batch * seq_len,
      'steps': steps,
      'warmup': warmup,
      'lr': lr,
      'b1': DEFAULT_B1[optimizer] if b1 is None else b1,
      'weight_decay': weight_decay,
      'rank': rank if optimizer == 'mlorc_adamw' else None,
      'moment_dtype': moment_dtype,
      'data': 'custom' if batches is not None else data,
      'sharding': sharding,
      'devices': devices if sharding != 'none' else 1,
      'backend': jax.default_backend(),
      'device': str(jax.local_devices()[0].device_kind),
      'jax_version': jax.__version__,
      'status': 'error',
      'error': None,
  }
  before = device_memory_stats()
  peaks_before = parallel.per_device_peak_bytes()
  result['peak_bytes_before'] = max(peaks_before) if peaks_before else None
  result['bytes_limit'] = before.get('bytes_limit') if before else None
  state = None
  try:
    if steps < 1:
      raise ValueError('steps must be >= 1.')
    tx = make_optimizer(
        optimizer,
        lr,
        b1=b1,
        weight_decay=weight_decay,
        rank=rank,
        moment_dtype=moment_dtype,
        seed=seed,
    )
    if sharding not in parallel.MODES:
      raise ValueError(
          f'sharding must be one of {parallel.MODES}, got {sharding!r}.'
      )
    mesh = None
    if sharding != 'none':
      mesh = parallel.make_mesh(devices)
      if batch % devices:
        raise ValueError(
            f'batch {batch} must be divisible by devices {devices}.'
        )
      t0 = time.perf_counter()
      graphdef, state, shardings = parallel.build_sharded(
          lambda: model_lib.create_model(cfg, seed), tx, mesh, sharding
      )
      jax.block_until_ready(state)
      result['init_s'] = time.perf_counter() - t0
      tokens_sharding = parallel.batch_sharding(mesh)
      t0 = time.perf_counter()
      compiled = (
          make_train_step(graphdef, shardings, tokens_sharding)
          .lower(state, jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32))
          .compile()
      )
      result.update(
          param_bytes=model_lib.tree_bytes(state[0]),
          opt_state_bytes=optimizer_state_bytes(state),
          opt_state_bytes_per_device=parallel.bytes_on_device(
              state[1].get('opt_state', {}), mesh.devices.flat[0]
          ),
          compile_s=time.perf_counter() - t0,
          compiled_memory=memory_analysis_dict(compiled),
      )
      params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
      grad_specs = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          params,
      )
      views = parallel.compressed_views(params, rank)
      result['update_collectives'] = parallel.update_collectives(
          make_update_step(
              graphdef, shardings, jax.tree.map(lambda g: g.sharding, grad_specs)
          ),
          state,
          grad_specs,
          views,
      )
      del params
      result['compressed_views'] = len(views)
      result['gathers_dense_moment'] = bool(
          result['update_collectives']['dense_moment_transfers']
      )
    else:
      tokens_sharding = None
      shardings = None
      # Ahead-of-time compilation from shapes: nothing is allocated yet.
      compiled, info = compile_step(
          cfg, tx, batch=batch, seq_len=seq_len, seed=seed
      )
      result.update(info)
    est = (result['compiled_memory'] or {}).get('estimated_peak_bytes')
    log(
        f'[{optimizer}] params {cfg.num_params() / 1e6:,.1f}M '
        f'({_gib(result["param_bytes"])} GiB), optimizer state '
        f'{_gib(result["opt_state_bytes"])} GiB, compiled in '
        f'{result["compile_s"]:.1f}s, XLA estimate {_gib(est)} GiB'
    )

    if batches is None:
      batches = data_lib.make_batches(
          data, batch, seq_len, cfg.vocab_size, seed=seed
      )
    if mesh is None:
      t0 = time.perf_counter()
      graphdef, state = build(cfg, tx, seed=seed)
      jax.block_until_ready(state)
      result['init_s'] = time.perf_counter() - t0
    after_init = device_memory_stats()
    result['bytes_in_use_after_init'] = (
        after_init.get('bytes_in_use') if after_init else None
    )

    place = (
        jnp.asarray
        if tokens_sharding is None
        else lambda t: jax.device_put(np.asarray(t), tokens_sharding)
    )
    state, losses, times = timed_steps(
        compiled,
        state,
        batches,
        steps,
        warmup=warmup,
        place=place,
        log=log,
        log_every=log_every,
        label=f'[{optimizer}]',
    )
    step_time = statistics.median(times)
    result.update(
        status='ok',
        losses=losses,
        first_loss=losses[0],
        final_loss=losses[-1],
        step_time_s=step_time,
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        timed_steps=len(times),
        tokens_per_s=batch * seq_len / step_time,
        # 6 N flops per token for the matmuls (N without the embedding).
        model_tflops_per_s=6
        * (cfg.num_params() - cfg.vocab_size * cfg.dim)
        * batch
        * seq_len
        / step_time
        / 1e12,
    )
    if time_update:
      try:
        update_time, state = time_update_step(
            graphdef, state, time_update, seed=seed, shardings=shardings
        )
        result['update_time_s'] = update_time
        result['update_fraction'] = update_time / step_time
        log(
            f'[{optimizer}] optimizer update alone: '
            f'{update_time * 1e3:.1f} ms ({update_time / step_time:.1%} of '
            'the step)'
        )
      except Exception as e:  # pylint: disable=broad-except
        result['update_error'] = _short_error(e)
        log(f'[{optimizer}] update timing failed: {result["update_error"]}')
  except Exception as e:  # pylint: disable=broad-except
    result['status'] = 'oom' if is_oom(e) else 'error'
    result['error'] = _short_error(e)
    log(f'[{optimizer}] {result["status"].upper()}: {result["error"]}')
  finally:
    del state
    gc.collect()
  peaks = parallel.per_device_peak_bytes()
  result['peak_bytes_per_device'] = (
      peaks[: result['devices']] if peaks else None
  )
  result['peak_bytes'] = (
      max(result['peak_bytes_per_device']) if peaks else None
  )
  # The device peak is process-wide and never resets: a run whose own peak
  # stays below an earlier run's reports that earlier peak (an upper bound).
  result['peak_is_upper_bound'] = bool(
      result['peak_bytes'] is not None
      and result['peak_bytes_before']
      and result['peak_bytes'] <= result['peak_bytes_before']
  )
  if result['status'] == 'ok':
    log(
        f'[{optimizer}] {result["tokens_per_s"]:,.0f} tokens/s '
        f'(median step {result["step_time_s"] * 1e3:.1f} ms), peak '
        f'{_gib(result["peak_bytes"])} GiB'
    )
  return result


def release_memory() -> None:
  """Drops compiled executables and garbage so the next run starts clean."""
  gc.collect()
  jax.clear_caches()
  gc.collect()


# ---------------------------------------------------------------------------
# Comparison.
# ---------------------------------------------------------------------------


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of :func:`run` results, with tokens/s ratios.

  The ratio column is each run's tokens/s over the first ``adamw`` run's.
  """
  base = next(
      (r for r in results if r['optimizer'] == 'adamw' and r['status'] == 'ok'),
      None,
  )
  rows = [
      '| optimizer | status | tokens/s | ratio vs adamw | step ms | '
      'update alone ms | peak GiB | XLA estimate GiB | optimizer state GiB | '
      'params | final loss |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    name = r['optimizer'] + (f' (r={r["rank"]})' if r.get('rank') else '')
    if r.get('sharding', 'none') != 'none':
      name += f' {r["sharding"]} x{r["devices"]}'
    ok = r['status'] == 'ok'
    tps = f'{r["tokens_per_s"]:,.0f}' if ok else '-'
    ratio = (
        f'{r["tokens_per_s"] / base["tokens_per_s"]:.3f}'
        if ok and base
        else '-'
    )
    step = f'{r["step_time_s"] * 1e3:.1f}' if ok else '-'
    update = (
        f'{r["update_time_s"] * 1e3:.1f}' if r.get('update_time_s') else '-'
    )
    peak = _gib(r.get('peak_bytes'))
    if r.get('peak_is_upper_bound'):
      peak = f'<= {peak}'
    est = _gib((r.get('compiled_memory') or {}).get('estimated_peak_bytes'))
    loss = f'{r["final_loss"]:.3f}' if ok else '-'
    status = r['status'] if ok else f'{r["status"]}: {(r["error"] or "")[:80]}'
    rows.append(
        f'| {name} | {status} | {tps} | {ratio} | {step} | {update} | '
        f'{peak} | {est} | '
        f'{_gib(r.get("opt_state_bytes"))} | '
        f'{r["param_count"] / 1e6:,.1f}M | {loss} |'
    )
  return '\n'.join(rows)


def describe_setup(results: Sequence[dict[str, Any]]) -> str:
  """One line with the shared settings of a comparison."""
  r = results[0]
  c = r['config']
  return (
      f'{r["device"]} ({r["backend"]}, jax {r["jax_version"]}); '
      f'{r["param_count"] / 1e6:,.1f}M params, dim {c["dim"]}, '
      f'{c["n_layers"]} layers; batch {r["batch"]} x seq {r["seq_len"]}; '
      f'params {c["param_dtype"]}, compute {c["compute_dtype"]}, remat '
      f'{c["remat"]}, scan {c["scan_layers"]}, attention '
      f'{c["attention"]}; moments {r["moment_dtype"]}; data {r["data"]}; '
      f'{r["steps"]} steps ({r["warmup"]} warm-up)'
  )


def _cli_args(
    cfg: model_lib.LlamaConfig,
    optimizer: str,
    kwargs: dict[str, Any],
    json_path: str,
) -> list[str]:
  """The ``train`` command line reproducing one :func:`run` call."""
  args = [
      sys.executable,
      '-m',
      'examples.llama.train',
      '--optimizer',
      optimizer,
      '--vocab-size',
      str(cfg.vocab_size),
      '--dim',
      str(cfg.dim),
      '--n-layers',
      str(cfg.n_layers),
      '--n-heads',
      str(cfg.n_heads),
      '--n-kv-heads',
      str(cfg.n_kv_heads),
      '--ffn-dim',
      str(cfg.ffn_dim),
      '--param-dtype',
      cfg.param_dtype,
      '--compute-dtype',
      cfg.compute_dtype,
      '--remat-policy',
      cfg.remat_policy,
      '--attention',
      cfg.attention,
      '--json',
      json_path,
      '--quiet',
  ]
  args += ['--remat'] if cfg.remat else []
  args += [] if cfg.scan_layers else ['--no-scan']
  for key in (
      'batch',
      'seq_len',
      'steps',
      'warmup',
      'lr',
      'weight_decay',
      'rank',
      'moment_dtype',
      'data',
      'seed',
      'time_update',
      'sharding',
      'devices',
  ):
    if key in kwargs:
      args += ['--' + key.replace('_', '-'), str(kwargs[key])]
  if kwargs.get('b1') is not None:
    args += ['--b1', str(kwargs['b1'])]
  return args


def repo_root() -> str:
  """The repository root (the directory holding the ``examples`` package)."""
  return os.path.dirname(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )


def subprocess_env(**overrides: str) -> dict[str, str]:
  """This process's environment with the repository root on PYTHONPATH."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (repo_root(), env.get('PYTHONPATH')) if p
  )
  env.update(overrides)
  return env


def run_isolated(
    cfg: model_lib.LlamaConfig,
    optimizer: str,
    timeout: float | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
  """:func:`run` in a fresh Python process (exact peak memory, OOM-safe)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'result.json')
    try:
      proc = subprocess.run(
          _cli_args(cfg, optimizer, kwargs, path),
          timeout=timeout,
          env=subprocess_env(),
          cwd=repo_root(),
          capture_output=True,
          text=True,
          check=False,
      )
      tail = (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
      proc, tail = None, f'timed out after {timeout}s'
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)[0]
  return {
      'optimizer': optimizer,
      'config': dataclasses.asdict(cfg),
      'param_count': cfg.num_params(),
      'status': 'error',
      'rank': kwargs.get('rank') if optimizer == 'mlorc_adamw' else None,
      'error': (
          f'subprocess exited with {proc.returncode if proc else None}'
          f': {tail}'
      ),
  }


def compare(
    cfg: model_lib.LlamaConfig,
    *,
    optimizers: Sequence[str] = ('mlorc_adamw', 'adamw'),
    isolate: bool = False,
    repeats: int = 1,
    json_path: str | None = None,
    verbose: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
  """Runs the optimizers back to back at the same config; prints a table.

  By default both run in this process, ``mlorc_adamw`` first: the device's
  peak-memory counter never resets, so a later run with a smaller peak can
  only report an upper bound (flagged ``<=`` in the table); running the
  expected smaller one first keeps both peaks exact in the usual case. With
  ``isolate`` each run gets its own process (exact peaks; OOM-safe).

  Args:
    cfg: model configuration.
    optimizers: names, in run order.
    isolate: run each in a subprocess.
    repeats: run the whole sequence this many times (alternating order
      keeps drift from favouring one optimizer); the table shows every run.
    json_path: write the list of results here.
    verbose: print progress.
    **kwargs: passed to :func:`run` (``batch``, ``seq_len``, ``steps``, ...).

  Returns:
    The results, in run order.
  """
  results = []
  for rep in range(repeats):
    order = list(optimizers) if rep % 2 == 0 else list(optimizers)[::-1]
    for name in order:
      if isolate:
        r = run_isolated(cfg, name, **kwargs)
      else:
        r = run(cfg, name, verbose=verbose, **kwargs)
        release_memory()
      results.append(r)
  if verbose:
    print()
    print(
        describe_setup([r for r in results if 'device' in r] or results)
        if any('device' in r for r in results)
        else ''
    )
    print(format_table(results))
    ratio = tokens_per_s_ratio(results)
    if ratio is not None:
      print(
          f'\nmlorc_adamw / adamw tokens/s (medians over runs): ' f'{ratio:.3f}'
      )
  if json_path:
    write_json(results, json_path)
  return results


def tokens_per_s_ratio(results: Sequence[dict[str, Any]]) -> float | None:
  """Median mlorc_adamw tokens/s over median adamw tokens/s (or None)."""
  per = {}
  for r in results:
    if r['status'] == 'ok':
      per.setdefault(r['optimizer'], []).append(r['tokens_per_s'])
  if 'adamw' not in per or 'mlorc_adamw' not in per:
    return None
  return statistics.median(per['mlorc_adamw']) / statistics.median(per['adamw'])


def write_json(results: Any, path: str) -> None:
  """Writes ``results`` as indented JSON (creating parent directories)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2, default=str)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
  """Model-shape and numerics flags shared with ``fit_search``."""
  parser.add_argument(
      '--preset',
      default='tiny',
      choices=sorted(model_lib.PRESETS),
      help='Model size preset.',
  )
  for name in (
      'vocab-size',
      'dim',
      'n-layers',
      'n-heads',
      'n-kv-heads',
      'ffn-dim',
  ):
    parser.add_argument(
        f'--{name}',
        type=int,
        default=None,
        help=f"Override the preset's {name}.",
    )
  parser.add_argument(
      '--param-dtype',
      default='float32',
      choices=('float32', 'bfloat16'),
      help='Parameter dtype.',
  )
  parser.add_argument(
      '--compute-dtype',
      default=None,
      choices=('float32', 'bfloat16'),
      help='Activation dtype (default: the parameter dtype).',
  )
  parser.add_argument(
      '--remat',
      action='store_true',
      help='Rematerialise each block (nnx.remat).',
  )
  parser.add_argument(
      '--remat-policy',
      default='nothing_saveable',
      choices=sorted(model_lib.REMAT_POLICIES),
      help='What remat may keep.',
  )
  parser.add_argument(
      '--no-scan',
      action='store_true',
      help='A Python list of blocks instead of nnx.scan.',
  )
  parser.add_argument(
      '--attention',
      default='xla',
      choices=('xla', 'cudnn'),
      help='jax.nn.dot_product_attention implementation.',
  )


def config_from_args(args: argparse.Namespace) -> model_lib.LlamaConfig:
  """The :class:`LlamaConfig` selected by :func:`add_model_args` flags."""
  overrides = {
      key: getattr(args, key)
      for key in (
          'vocab_size',
          'dim',
          'n_layers',
          'n_heads',
          'n_kv_heads',
          'ffn_dim',
      )
      if getattr(args, key) is not None
  }
  if 'n_heads' in overrides and 'n_kv_heads' not in overrides:
    overrides['n_kv_heads'] = overrides['n_heads']
  return model_lib.get_config(
      args.preset,
      param_dtype=args.param_dtype,
      compute_dtype=args.compute_dtype or args.param_dtype,
      remat=args.remat,
      remat_policy=args.remat_policy,
      scan_layers=not args.no_scan,
      attention=args.attention,
      **overrides,
  )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(parser)
  parser.add_argument(
      '--optimizer',
      default='both',
      choices=OPTIMIZERS + ('both',),
      help="'both' runs compare() (mlorc_adamw, then adamw).",
  )
  parser.add_argument('--steps', type=int, default=30, help='Steps per run.')
  parser.add_argument(
      '--warmup', type=int, default=2, help='Untimed steps after compilation.'
  )
  parser.add_argument('--batch', type=int, default=8, help='Batch size.')
  parser.add_argument(
      '--seq-len', type=int, default=128, help='Tokens per sequence.'
  )
  parser.add_argument('--lr', type=float, default=3e-4, help='Learning rate.')
  parser.add_argument(
      '--b1',
      type=float,
      default=None,
      help='First-moment decay (default 0.9 adamw, 0.8 ' 'mlorc_adamw).',
  )
  parser.add_argument(
      '--weight-decay', type=float, default=0.0, help='Decoupled weight decay.'
  )
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank.')
  parser.add_argument(
      '--moment-dtype',
      default='float32',
      choices=('float32', 'param'),
      help="float32 moments for both optimizers, or optax's "
      'rule (moments in the parameter dtype).',
  )
  parser.add_argument(
      '--data',
      default='reviews',
      choices=('reviews', 'synthetic'),
      help='Drug-review text or synthetic tokens.',
  )
  parser.add_argument('--seed', type=int, default=0, help='Random seed.')
  parser.add_argument(
      '--log-every',
      type=int,
      default=10,
      help='Print the loss every this many steps.',
  )
  parser.add_argument(
      '--time-update',
      type=int,
      default=0,
      help='Also time the optimizer update alone over this many calls.',
  )
  parser.add_argument(
      '--sharding',
      default='none',
      choices=parallel.MODES,
      help="'none': one device; 'dp': data parallel (params and optimizer "
      "state replicated); 'fsdp': params and optimizer state sharded. Both "
      'split the batch over --devices devices (jit + NamedSharding).',
  )
  parser.add_argument(
      '--devices',
      type=int,
      default=None,
      help='Devices on the mesh with --sharding dp/fsdp (default: all).',
  )
  parser.add_argument(
      '--repeats',
      type=int,
      default=1,
      help='With --optimizer both: repeat the pair.',
  )
  parser.add_argument(
      '--isolate',
      action='store_true',
      help='With --optimizer both: one process per run.',
  )
  parser.add_argument(
      '--json', default=None, help='Write the results (a list) to this file.'
  )
  parser.add_argument('--quiet', action='store_true', help='Less output.')
  args = parser.parse_args(argv)

  env = set_xla_env()
  cfg = config_from_args(args)
  kwargs = dict(
      batch=args.batch,
      seq_len=args.seq_len,
      steps=args.steps,
      warmup=args.warmup,
      lr=args.lr,
      b1=args.b1,
      weight_decay=args.weight_decay,
      rank=args.rank,
      moment_dtype=args.moment_dtype,
      data=args.data,
      seed=args.seed,
      time_update=args.time_update,
      sharding=args.sharding,
      devices=(
          1
          if args.sharding == 'none'
          else (args.devices or len(jax.devices()))
      ),
  )
  if not args.quiet:
    print(f'{env}; backend {jax.default_backend()}')
  if args.optimizer == 'both':
    return compare(
        cfg,
        isolate=args.isolate,
        repeats=args.repeats,
        json_path=args.json,
        verbose=not args.quiet,
        **kwargs,
    )
  result = run(
      cfg,
      args.optimizer,
      log_every=args.log_every,
      verbose=not args.quiet,
      **kwargs,
  )
  if args.json:
    write_json([result], args.json)
  if not args.quiet:
    print(format_table([result]))
  return [result]


if __name__ == '__main__':
  main()
