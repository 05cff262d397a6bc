"""Measured runs of the LLaMA example: tokens/s, memory, XLA's estimate.

:func:`run` trains one optimizer with the loop of ``train.py`` and records
what a full training step costs: tokens/s from the median of the timed
steps, the device's peak memory, the optimizer state's bytes and XLA's
compiled memory estimate, on one device or on a mesh (``parallel.py``).
:func:`compare` runs several optimizers back to back, in this process or
one process each (:func:`run_isolated`).

Entry point: ``python -m examples.llama.main`` (``main.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import model as model_lib
from examples.llama import parallel
from examples.llama import train


def run(
    config: config_lib.Config,
    optimizer: str,
    *,
    batches: Iterator[np.ndarray] | None = None,
) -> dict[str, Any]:
  """Trains one optimizer and measures it; never raises on OOM.

  On one device the step is compiled from abstract shapes (recording XLA's
  estimate) before anything is allocated; ``config.steps == 0`` stops there
  (status ``'estimated'``). With ``sharding`` ``'dp'``/``'fsdp'`` the model
  and optimizer are placed on a mesh first and the result adds the
  cross-device transfers of the optimizer update
  (:func:`examples.llama.parallel.update_collectives`).

  Args:
    config: the settings (its ``optimizers`` field is ignored).
    optimizer: ``'adamw'`` or ``'mlorc_adamw'``.
    batches: ``int32 [batch, seq_len + 1]`` arrays (None: ``config.data``).

  Returns:
    A JSON-ready record: :func:`describe` plus ``status`` (``'ok'``,
    ``'estimated'``, ``'oom'`` or ``'error'``), ``tokens_per_s``,
    ``step_time_s`` (median), ``losses``, ``peak_bytes`` (largest device
    peak, None on CPU) and ``peak_bytes_per_device``, ``opt_state_bytes``,
    ``param_bytes``, ``compiled_memory`` (XLA, per device).
  """
  log = (lambda s: None) if config.quiet else (
      lambda s: print(f'[{optimizer}] {s}', flush=True))
  result = describe(config, optimizer)
  result.update(toolkit.environment.device_description(),
                versions=toolkit.environment.versions())
  peaks = toolkit.memory.peak_bytes_per_device()
  result['peak_bytes_before'] = max(peaks) if peaks else None
  stats = toolkit.memory.device_memory_stats() or {}
  result['bytes_limit'] = stats.get('bytes_limit')
  state = None
  try:
    state = _prepare(config, optimizer, result, log)
    if state is not None:
      state = _train(config, state, result, log, batches)
  except Exception as e:  # pylint: disable=broad-except
    text = f'{type(e).__name__}: {e}'
    result.update(status='oom' if toolkit.memory.is_oom(e) else 'error',
                  error=text[:600])
    log(f'{result["status"].upper()}: {result["error"]}')
  finally:
    del state
  peaks = toolkit.memory.peak_bytes_per_device()
  peaks = peaks[:result['devices']] if peaks else None
  result['peak_bytes_per_device'] = peaks
  result['peak_bytes'] = max(peaks) if peaks else None
  # The device peak never resets within a process: a run whose own peak is
  # below an earlier run's can only report an upper bound.
  result['peak_is_upper_bound'] = bool(
      peaks and result['peak_bytes_before']
      and result['peak_bytes'] <= result['peak_bytes_before'])
  return result


def describe(config: config_lib.Config, optimizer: str) -> dict[str, Any]:
  """The settings part of a :func:`run` record (touches no device)."""
  cfg = config.model_config()
  one = config.replace(optimizers=(optimizer,), repeats=1, isolate=False)
  return {
      'optimizer': optimizer,
      'rank': config.rank if optimizer == 'mlorc_adamw' else None,
      'b1': train.DEFAULT_B1[optimizer] if config.b1 is None else config.b1,
      'config': dataclasses.asdict(cfg),
      'settings': dataclasses.asdict(one),
      'command': 'python -m examples.llama.main '
                 + ' '.join(config_lib.cli_args(one)),
      'param_count': cfg.num_params(),
      'tokens_per_step': config.batch * config.seq_len,
      'devices': 1 if config.sharding == 'none' else config.devices,
      'status': 'error',
      'error': None,
  }


class _Placed(NamedTuple):
  """A built, placed and compiled run, ready to train."""
  graphdef: nnx.GraphDef
  state: nnx.State
  step: Any  # compiled (state, tokens) -> (state, loss)
  place: Callable[[np.ndarray], Any]  # host batch -> device(s)
  shardings: Any  # of the state (None on one device)


def _prepare(config, optimizer, result, log) -> _Placed | None:
  """Builds, places and compiles one run (None: compiled only)."""
  cfg = config.model_config()
  create = lambda: model_lib.create_model(cfg, config.seed)
  tx = train.make_optimizer(optimizer, config)
  tokens = jax.ShapeDtypeStruct((config.batch, config.seq_len + 1), jnp.int32)
  if config.sharding == 'none':
    placed = _prepare_one_device(config, create, tx, tokens, result)
  else:
    placed = _prepare_mesh(config, create, tx, tokens, result)
  estimate = (result['compiled_memory'] or {}).get('estimated_peak_bytes')
  fmt = toolkit.results.fmt_bytes
  log(f'params {cfg.num_params() / 1e6:,.1f}M ({fmt(result["param_bytes"])}),'
      f' optimizer state {fmt(result["opt_state_bytes"])}, compiled in '
      f'{result["compile_s"]:.1f}s, XLA estimate {fmt(estimate)}')
  return placed


def _prepare_one_device(config, create, tx, tokens, result) -> _Placed | None:
  """Compiles from shapes (nothing allocated yet), then builds the state."""
  t0 = time.perf_counter()
  graphdef, abstract = train.build(create, tx, abstract=True)
  step = train.jit_train_step(graphdef).lower(abstract, tokens).compile()
  result.update(param_bytes=toolkit.memory.tree_bytes(abstract[0]),
                opt_state_bytes=train.optimizer_state_bytes(abstract),
                compile_s=time.perf_counter() - t0,
                compiled_memory=toolkit.memory.compiled_memory(step))
  if not config.steps:
    result['status'] = 'estimated'
    return None
  t0 = time.perf_counter()
  graphdef, state = train.build(create, tx)
  result['init_s'] = time.perf_counter() - t0
  return _Placed(graphdef, state, step, jnp.asarray, None)


def _prepare_mesh(config, create, tx, tokens, result) -> _Placed | None:
  """Places the model and optimizer on a mesh, then compiles for it."""
  devices = config.devices or jax.device_count()
  result['devices'] = devices
  if config.batch % devices:
    raise ValueError(f'batch {config.batch} is not divisible by {devices} '
                     'devices.')
  mesh = parallel.make_mesh(devices)
  t0 = time.perf_counter()
  graphdef, state, shardings = parallel.build_sharded(
      create, tx, mesh, config.sharding)
  result['init_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  tokens_sharding = parallel.batch_sharding(mesh)
  step = train.jit_train_step(graphdef, shardings=shardings,
                              tokens_sharding=tokens_sharding)
  step = step.lower(state, tokens).compile()
  result.update(
      param_bytes=toolkit.memory.tree_bytes(state[0]),
      opt_state_bytes=train.optimizer_state_bytes(state),
      opt_state_bytes_per_device=toolkit.memory.bytes_on_device(
          state[1].get('opt_state', {}), mesh.devices.flat[0]),
      compile_s=time.perf_counter() - t0,
      compiled_memory=toolkit.memory.compiled_memory(step))
  result['update_collectives'] = update_transfers(graphdef, state, shardings,
                                                 config.rank)
  result['gathers_dense_moment'] = bool(
      result['update_collectives']['dense_moment_transfers'])
  if not config.steps:
    result['status'] = 'estimated'
    return None
  place = lambda t: jax.device_put(np.asarray(t), tokens_sharding)
  return _Placed(graphdef, state, step, place, shardings)


def update_transfers(graphdef: nnx.GraphDef, state: nnx.State,
                     shardings: Any, rank: int) -> dict[str, Any]:
  """What crosses devices in the compiled optimizer update of ``state``.

  Compiles the update alone (:func:`train.jit_update_step`, gradients placed
  like the parameters) and reads its transfers
  (:func:`examples.llama.parallel.update_collectives`, which flags any that
  could hold a dense moment of the matrices MLorc compresses at ``rank``).
  """
  params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  grads = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  update = train.jit_update_step(graphdef, shardings,
                                 jax.tree.map(lambda g: g.sharding, grads))
  return parallel.update_collectives(
      update, state, grads, parallel.compressed_views(params, rank))


def _train(config, placed: _Placed, result, log, batches) -> nnx.State:
  """Trains and fills in the timing; returns the final state."""
  cfg = config.model_config()
  if batches is None:
    batches = data_lib.make_batches(config.data, config.batch, config.seq_len,
                                    cfg.vocab_size, seed=config.seed)
  state, losses, timing = train.train_steps(
      placed.step, placed.state, batches, steps=config.steps,
      warmup=min(config.warmup, config.steps - 1), place=placed.place,
      log=log, log_every=config.log_every)
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.dim
  result.update(
      status='ok', losses=losses, first_loss=losses[0],
      final_loss=losses[-1], step_time_s=timing.median_s,
      step_time_min_s=timing.min_s, timed_steps=len(timing.times_s),
      tokens_per_s=result['tokens_per_step'] / timing.median_s,
      # 6 N flops per token for the matmuls (N without the embedding).
      model_tflops_per_s=6 * matmul_params * result['tokens_per_step']
      / timing.median_s / 1e12)
  log(f'{result["tokens_per_s"]:,.0f} tokens/s (median step '
      f'{timing.median_s * 1e3:.1f} ms)')
  if config.time_update:
    # Random gradients placed like the parameters; no forward or backward.
    params = nnx.state(nnx.merge(placed.graphdef, state)[0], nnx.Param)
    grads = parallel.random_grads_like(params, config.seed)
    update = train.jit_update_step(placed.graphdef, placed.shardings,
                                   jax.tree.map(lambda g: g.sharding, grads))
    timing, state = toolkit.timing.time_steps(
        lambda s: update(s, grads), state, calls=config.time_update,
        warmup=1)
    result.update(update_time_s=timing.median_s,
                  update_fraction=timing.median_s / result['step_time_s'])
    log(f'optimizer update alone: {timing.median_s * 1e3:.1f} ms '
        f'({result["update_fraction"]:.1%} of the step)')
  return state


def compare(config: config_lib.Config) -> list[dict[str, Any]]:
  """Runs ``config.optimizers`` back to back, ``config.repeats`` times.

  The order alternates between repeats so that drift favours neither. With
  ``config.isolate`` each run has its own process (:func:`run_isolated`),
  else they share this one and the memory is released between them.
  """
  results = []
  for repeat in range(config.repeats):
    order = config.optimizers[::-1 if repeat % 2 else 1]
    for name in order:
      if config.isolate:
        results.append(run_isolated(config, name))
      else:
        results.append(run(config, name))
        toolkit.memory.release_memory()
  return results


def run_isolated(
    config: config_lib.Config,
    optimizer: str,
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
  """:func:`run` in a fresh process (``main.py``); exact peaks, OOM-safe.

  Returns:
    The child's record, or :func:`describe` with ``status`` ``'timeout'``
    or ``'crashed'`` and the tail of its output as ``error``.
  """
  one = config.replace(optimizers=(optimizer,), repeats=1, isolate=False,
                       quiet=True)
  out = toolkit.isolation.run_isolated(
      'examples.llama.main', config_lib.cli_args(one), timeout=timeout,
      env=env)
  if isinstance(out, list) and out:
    return out[0]
  failed = describe(config, optimizer)
  error = str(out.get('error') if isinstance(out, dict) else out)
  failed.update(status='timeout' if error == 'timeout' else 'crashed',
                error=error)
  return failed
