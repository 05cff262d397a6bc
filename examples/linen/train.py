"""Training loop of the Linen example: optimizer, TrainState step, runs.

A Flaxformer / MaxText-style loop: the parameters stay boxed in
``nn.LogicallyPartitioned`` (logical axis names), a
``flax.training.train_state.TrainState`` holds them with the optimizer
state, and ``nn.get_partition_spec`` + ``nn.logical_to_mesh_sharding`` place
the whole state, MLorc's factors included, by
:data:`~examples.linen.model.LOGICAL_AXIS_RULES`. MLorc views each leaf as a
matrix by its logical names (``mlorc_optax.flax.logical_dimension_numbers``)
and ``mlorc_optax.flax.boxed`` boxes each factor with the names of the axes
it spans. The optimizer is built by :func:`make_optimizer` and applied by
:func:`train_step`, the first two functions below.

Entry point: ``python -m examples.linen.main`` (``main.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import mlorc_optax
import mlorc_optax.flax
from benchmarks import toolkit
from benchmarks.toolkit.results import Column
from examples.linen import config as config_lib
from examples.linen import model as model_lib
from examples.llama import data as llama_data
from examples.llama import train as llama_train


def make_optimizer(
    name: str, config: config_lib.Config, logical_axes: Any
) -> optax.GradientTransformation:
  """``optax.adamw`` or ``mlorc_adamw`` viewing leaves by logical names.

  Args:
    name: ``'adamw'`` or ``'mlorc_adamw'``.
    config: learning rate (and warm-up), ``b1``, weight decay, rank, seed.
    logical_axes: the parameters' logical names
      (:func:`~examples.linen.model.logical_axes`).

  Returns:
    The optimizer; ``mlorc_adamw`` wrapped in ``mlorc_optax.flax.boxed`` so
    that it takes the boxed parameters of the ``TrainState`` and boxes its
    factors with logical names (``optax.adamw`` handles boxes on its own).
  """
  b1 = config.b1 if config.b1 is not None else (
      0.8 if name == 'mlorc_adamw' else 0.9)
  lr = config.lr if not config.lr_warmup else optax.linear_schedule(
      0.0, config.lr, config.lr_warmup)
  if name == 'adamw':
    return optax.adamw(lr, b1=b1, weight_decay=config.weight_decay)
  dims = mlorc_optax.flax.logical_dimension_numbers(logical_axes)
  return mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
      lr, b1=b1, weight_decay=config.weight_decay, rank=config.rank,
      seed=config.seed, dimension_numbers=dims))


def train_step(state: train_state.TrainState, tokens: jax.Array) -> Any:
  """One step on ``tokens int32 [batch, seq_len + 1]``: (state, loss)."""

  def loss_fn(params: Any) -> jax.Array:
    return model_lib.cross_entropy_loss(state.apply_fn, params, tokens)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss  # tx.update + apply


def init_fn(cfg: model_lib.T5Config, tx: optax.GradientTransformation,
            seed: int = 0) -> Any:
  """``() -> TrainState`` with boxed params (for ``eval_shape`` / ``jit``)."""
  model = model_lib.T5Decoder(cfg)
  return lambda: train_state.TrainState.create(
      apply_fn=model.apply, params=model_lib.init_params(cfg, seed), tx=tx)


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = model_lib.LOGICAL_AXIS_RULES,
) -> Any:
  """``NamedSharding``\\s of a (boxed) train state from its logical names.

  The standard Linen recipe: ``nn.get_partition_spec`` reads the names of
  every box (parameters, ``optax.adamw``'s moments, MLorc's factors) and
  ``nn.logical_to_mesh_sharding`` maps them by ``rules``.
  """
  return nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract_state), mesh, tuple(rules))


def jit_train_step(shardings: Any = None, token_sharding: Any = None) -> Any:
  """:func:`train_step` jitted, donating the state (placed if ``shardings``)."""
  if shardings is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, in_shardings=(shardings, token_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)


def parse_mesh(spec: str | None) -> Mesh | None:
  """``'2x4'`` -> a ``('data', 'model')`` mesh of the first 8 devices."""
  if not spec:
    return None
  try:
    data, model = (int(x) for x in spec.lower().split('x'))
  except ValueError:
    raise ValueError(
        f"mesh must look like '2x4' (data x model), got {spec!r}.") from None
  if data * model > jax.device_count():
    raise ValueError(
        f'mesh {spec} needs {data * model} devices, have {jax.device_count()}.')
  devices = np.array(jax.devices()[: data * model]).reshape(data, model)
  return Mesh(devices, ('data', 'model'))


def run(config: config_lib.Config, optimizer: str) -> dict[str, Any]:
  """Trains one optimizer for ``config.steps`` steps; returns measurements.

  Returns:
    A JSON-ready record: ``tokens_per_s`` and ``step_time_s`` (median after
    ``config.warmup``), ``losses``, ``opt_state_bytes``, ``param_bytes``,
    ``peak_bytes`` (None on CPU), the settings, device and versions. With
    ``config.steps == 0`` only the bytes, from shapes (nothing is built).
  """
  log = (lambda s: None) if config.quiet else (
      lambda s: print(f'[{optimizer}] {s}', flush=True))
  cfg = config.model_config()
  tx = make_optimizer(optimizer, config, model_lib.logical_axes(cfg))
  init = init_fn(cfg, tx, config.seed)
  abstract = jax.eval_shape(init)
  mesh = parse_mesh(config.mesh)
  result: dict[str, Any] = {
      'optimizer': optimizer,
      'rank': config.rank if optimizer == 'mlorc_adamw' else None,
      'config': dataclasses.asdict(cfg),
      'settings': dataclasses.asdict(config.replace(optimizers=(optimizer,))),
      'param_count': cfg.num_params(),
      'param_bytes': toolkit.memory.tree_bytes(abstract.params),
      'opt_state_bytes': toolkit.memory.tree_bytes(abstract.opt_state),
      **toolkit.environment.device_description(),
      'versions': toolkit.environment.versions(),
  }
  log(f'params {cfg.num_params() / 1e6:,.2f}M, optimizer state '
      f'{toolkit.results.fmt_bytes(result["opt_state_bytes"])}')
  if not config.steps:
    return result
  shardings = token_sharding = None
  if mesh is not None:
    shardings = state_shardings(abstract, mesh)
    token_sharding = NamedSharding(mesh, PartitionSpec('data'))
  t0 = time.perf_counter()
  # One jitted program creates the state, already placed.
  state = jax.block_until_ready(jax.jit(init, out_shardings=shardings)())
  result['init_s'] = time.perf_counter() - t0
  batches = llama_data.make_batches(config.data, config.batch, config.seq_len,
                                    cfg.vocab_size, seed=config.seed)
  state, losses, timing = llama_train.train_steps(
      jit_train_step(shardings, token_sharding), state, batches,
      steps=config.steps, warmup=min(config.warmup, config.steps - 1),
      log=log, log_every=config.log_every)
  result.update(
      losses=losses, first_loss=losses[0], final_loss=losses[-1],
      step_time_s=timing.median_s, timed_steps=len(timing.times_s),
      tokens_per_s=config.batch * config.seq_len / timing.median_s)
  log(f'{result["tokens_per_s"]:,.0f} tokens/s (median step '
      f'{timing.median_s * 1e3:.1f} ms)')
  result['peak_bytes'] = toolkit.memory.device_peak_bytes()
  del state
  toolkit.memory.release_memory()
  return result


def plan_table(cfg: model_lib.T5Config, rank: int = 4) -> str:
  """The leaf -> matrix-view table of ``mlorc_adamw`` on this model.

  From shapes alone (``compression_plan`` traces ``init`` abstractly). The
  ``step`` column is the step this machine would run.
  """
  params = model_lib.abstract_params(cfg)
  names = nn.get_partition_spec(params)
  tx = make_optimizer('mlorc_adamw', config_lib.Config(rank=rank), names)
  plan = mlorc_optax.compression_plan(tx, params)
  return mlorc_optax.flax.format_logical_plan(plan, names)


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of :func:`run` records (ratios to the adamw run)."""
  rows = [dict(r, name=r['optimizer'] + (f' (r={r["rank"]})' if r.get('rank')
                                         else ''),
               step_ms=r['step_time_s'] * 1e3 if 'step_time_s' in r else None,
               state=r['opt_state_bytes']) for r in results]
  is_adamw = lambda r: r['optimizer'] == 'adamw'
  toolkit.results.add_ratios(rows, value='tokens_per_s', group_by=(),
                             baseline=is_adamw, key='speed_ratio')
  toolkit.results.add_ratios(rows, value='state', group_by=(),
                             baseline=is_adamw, key='state_ratio')
  return toolkit.results.markdown_table(rows, [
      Column('name', 'optimizer', None),
      Column('tokens_per_s', 'tokens/s', ',.0f'),
      Column('speed_ratio', 'vs adamw', '.3f'),
      Column('step_ms', 'step ms', '.1f'),
      Column('state', 'optimizer state', toolkit.results.fmt_bytes),
      Column('state_ratio', 'vs adamw', '.2%'),
      Column('peak_bytes', 'peak', toolkit.results.fmt_bytes),
      Column('first_loss', 'first loss', '.3f'),
      Column('final_loss', 'final loss', '.3f'),
  ])


def compare(config: config_lib.Config) -> list[dict[str, Any]]:
  """Runs ``config.optimizers`` back to back at the same settings."""
  return [run(config, name) for name in config.optimizers]
