"""Train the Linen T5-style decoder with optax.adamw or mlorc_adamw.

A Flaxformer / MaxText-style training loop: the model's parameters stay boxed
in ``nn.LogicallyPartitioned`` (logical axis names), a
``flax.training.train_state.TrainState`` holds them with the optimizer state,
and ``nn.get_partition_spec`` + ``nn.logical_to_mesh_sharding`` place the
whole state, MLorc's factors included, by :data:`model.LOGICAL_AXIS_RULES`.
MLorc views each leaf as a matrix by its logical names
(``mlorc_optax.flax.logical_dimension_numbers``), and
``mlorc_optax.flax.boxed`` boxes each factor with the names of the axes it
spans.

It measures, for each optimizer at the same settings, tokens/s (median
step time over the steps after ``--warmup``, ``block_until_ready`` after
each), optimizer-state bytes and the loss.

Usage::

  python -m examples.linen.train --preset tiny --steps 30      # CPU, seconds
  python -m examples.linen.train --preset large --plan-only   # the table
  python -m examples.linen.train --preset tiny --mesh 2x4      # 8 devices
  python -m examples.linen.train --preset large --batch 16 --seq-len 512 \\
      --dtype bfloat16 --remat --steps 40 --json results/linen.json  # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator, Sequence
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
from examples.linen import model as model_lib
from examples.llama import data as data_lib
from examples.llama import model as llama_model
from examples.llama import train as llama_train

#: Optimizer names accepted by :func:`make_optimizer`.
OPTIMIZERS: tuple[str, ...] = ('adamw', 'mlorc_adamw')

#: Default ``b1`` per optimizer (MLorc-AdamW: the paper's 0.8).
DEFAULT_B1 = llama_train.DEFAULT_B1


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    logical_axes: Any,
    b1: float | None = None,
    weight_decay: float = 0.0,
    rank: int = 4,
    lr_warmup: int = 0,
    seed: int = 0,
) -> optax.GradientTransformation:
  """``optax.adamw`` or ``mlorc_adamw`` viewing leaves by logical names.

  ``mlorc_adamw`` is wrapped in ``mlorc_optax.flax.boxed`` so that it takes
  the boxed parameters of the ``TrainState`` and boxes its factors with their
  logical names (``optax.adamw`` handles boxes on its own).

  Args:
    name: ``'adamw'`` or ``'mlorc_adamw'``.
    learning_rate: peak learning rate.
    logical_axes: the parameters' logical names
      (:func:`model.logical_axes`), for
      ``mlorc_optax.flax.logical_dimension_numbers``.
    b1: first-moment decay; None for :data:`DEFAULT_B1`.
    weight_decay: decoupled weight decay.
    rank: MLorc rank.
    lr_warmup: steps of linear learning-rate warm-up from 0 (0: constant).
    seed: seed of MLorc's sketches.

  Returns:
    The optimizer.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}.')
  b1 = DEFAULT_B1[name] if b1 is None else b1
  lr = learning_rate
  if lr_warmup:
    lr = optax.linear_schedule(0.0, learning_rate, lr_warmup)
  if name == 'adamw':
    return optax.adamw(lr, b1=b1, weight_decay=weight_decay)
  return mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
      lr, b1=b1, weight_decay=weight_decay, rank=rank, seed=seed,
      dimension_numbers=mlorc_optax.flax.logical_dimension_numbers(
          logical_axes),
  ))


def init_fn(
    cfg: model_lib.T5Config, tx: optax.GradientTransformation, seed: int = 0
) -> Any:
  """``() -> TrainState`` with boxed params (for ``eval_shape`` / ``jit``)."""
  model = model_lib.T5Decoder(cfg)

  def init() -> train_state.TrainState:
    return train_state.TrainState.create(
        apply_fn=model.apply, params=model_lib.init_params(cfg, seed), tx=tx
    )

  return init


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = model_lib.LOGICAL_AXIS_RULES,
) -> Any:
  """``NamedSharding``\\s of a (boxed) train state from its logical names.

  The standard Linen recipe: ``nn.get_partition_spec`` reads the names of
  every box (parameters, ``optax.adamw``'s moments, MLorc's factors, which
  ``mlorc_optax.flax.boxed`` boxes with
  :func:`mlorc_optax.flax.factor_logical_axes`) and
  ``nn.logical_to_mesh_sharding`` maps them by ``rules``.
  """
  return nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract_state), mesh, tuple(rules)
  )


def make_train_step(
    shardings: Any = None, token_sharding: Any = None
) -> Any:
  """The jitted step ``(state, tokens) -> (state, loss)``; donates ``state``.

  ``tokens`` is ``int32 [batch, seq_len + 1]``.
  """

  def step(state: train_state.TrainState, tokens: jax.Array) -> Any:
    def loss_fn(params: Any) -> jax.Array:
      return model_lib.cross_entropy_loss(state.apply_fn, params, tokens)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(
      step,
      in_shardings=(shardings, token_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
  )


def parse_mesh(spec: str | None) -> Mesh | None:
  """``'2x4'`` -> a ``('data', 'model')`` mesh of the first 8 devices."""
  if not spec:
    return None
  try:
    data, model = (int(x) for x in spec.lower().split('x'))
  except ValueError:
    raise ValueError(f"mesh must look like '2x4' (data x model), got {spec!r}.")
  if data * model > jax.device_count():
    raise ValueError(
        f'mesh {spec} needs {data * model} devices, have {jax.device_count()}.'
    )
  devices = np.array(jax.devices()[: data * model]).reshape(data, model)
  return Mesh(devices, ('data', 'model'))


def run(
    cfg: model_lib.T5Config,
    optimizer: str,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    warmup: int = 2,
    lr: float = 1e-3,
    b1: float | None = None,
    weight_decay: float = 0.0,
    rank: int = 4,
    lr_warmup: int = 0,
    data: str = 'synthetic',
    batches: Iterator[np.ndarray] | None = None,
    mesh: Mesh | None = None,
    seed: int = 0,
    log_every: int = 10,
    verbose: bool = True,
) -> dict[str, Any]:
  """Trains ``steps`` steps; returns measurements.

  Args:
    cfg: model configuration.
    optimizer: ``'adamw'`` or ``'mlorc_adamw'``.
    batch: sequences per step.
    seq_len: tokens per sequence.
    steps: training steps (the first ``warmup`` are not timed; 0 only
      builds the state).
    warmup: untimed steps (the first compiles).
    lr: peak learning rate.
    b1: first-moment decay (None: :data:`DEFAULT_B1`).
    weight_decay: decoupled weight decay.
    rank: MLorc rank.
    lr_warmup: learning-rate warm-up steps.
    data: ``'synthetic'`` or ``'reviews'`` (ignored if ``batches`` given).
    batches: an iterator of ``int32 [batch, seq_len + 1]`` arrays.
    mesh: a ``('data', 'model')`` mesh to shard on (None: one device).
    seed: seed of the parameters, sketches and data.
    log_every: print the loss every this many steps (0: never).
    verbose: print progress.

  Returns:
    A JSON-serialisable dict: ``tokens_per_s``, ``step_time_s``,
    ``opt_state_bytes``, ``param_count``, ``param_bytes``, ``losses``,
    ``peak_bytes`` (None on CPU) and the settings.
  """
  log = print if verbose else (lambda *a, **k: None)
  names = model_lib.logical_axes(cfg)
  tx = make_optimizer(
      optimizer, lr, logical_axes=names, b1=b1, weight_decay=weight_decay,
      rank=rank, lr_warmup=lr_warmup, seed=seed,
  )
  init = init_fn(cfg, tx, seed)
  abstract = jax.eval_shape(init)
  result: dict[str, Any] = {
      'optimizer': optimizer,
      'config': dataclasses.asdict(cfg),
      'param_count': cfg.num_params(),
      'param_bytes': llama_model.tree_bytes(abstract.params),
      'opt_state_bytes': llama_model.tree_bytes(abstract.opt_state),
      'batch': batch,
      'seq_len': seq_len,
      'tokens_per_step': batch * seq_len,
      'steps': steps,
      'warmup': warmup,
      'lr': lr,
      'lr_warmup': lr_warmup,
      'b1': DEFAULT_B1[optimizer] if b1 is None else b1,
      'weight_decay': weight_decay,
      'rank': rank if optimizer == 'mlorc_adamw' else None,
      'data': 'custom' if batches is not None else data,
      'mesh': dict(mesh.shape) if mesh is not None else None,
      'backend': jax.default_backend(),
      'device': str(jax.local_devices()[0].device_kind),
      'jax_version': jax.__version__,
      'flax_version': _flax_version(),
  }
  log(
      f'[{optimizer}] params {cfg.num_params() / 1e6:,.2f}M, optimizer state '
      f'{result["opt_state_bytes"] / 2**20:,.2f} MiB'
  )
  shardings = token_sharding = None
  if mesh is not None:
    shardings = state_shardings(abstract, mesh)
    token_sharding = NamedSharding(mesh, PartitionSpec('data'))
  t0 = time.perf_counter()
  # One jitted program creates the state, already placed (the shardings
  # are matched to the TrainState whose apply_fn and tx come from ``init``).
  state = jax.jit(init, out_shardings=shardings)()
  jax.block_until_ready(state)
  result['init_s'] = time.perf_counter() - t0
  if batches is None:
    batches = data_lib.make_batches(
        data, batch, seq_len, cfg.vocab_size, seed=seed
    )
  step_fn = make_train_step(shardings, token_sharding)
  state, losses, times = llama_train.timed_steps(
      step_fn,
      state,
      batches,
      steps,
      warmup=warmup,
      log=log,
      log_every=log_every,
      label=f'[{optimizer}]',
  )
  if steps:
    step_time = statistics.median(times)
    result.update(
        losses=losses,
        first_loss=losses[0],
        final_loss=losses[-1],
        step_time_s=step_time,
        timed_steps=len(times),
        tokens_per_s=batch * seq_len / step_time,
    )
  stats = llama_train.device_memory_stats()
  result['peak_bytes'] = stats.get('peak_bytes_in_use') if stats else None
  if steps:
    log(
        f'[{optimizer}] {result["tokens_per_s"]:,.0f} tokens/s (median step '
        f'{result["step_time_s"] * 1e3:.1f} ms)'
    )
  del state
  llama_train.release_memory()
  return result


def _flax_version() -> str:
  import flax  # pylint: disable=g-import-not-at-top

  return flax.__version__


def plan_table(cfg: model_lib.T5Config, rank: int = 4) -> str:
  """The leaf -> matrix-view table of ``mlorc_adamw`` on this model.

  From shapes alone (``compression_plan`` traces ``init`` abstractly). The
  ``step`` column is the step this machine would run.
  """
  params = model_lib.abstract_params(cfg)
  names = nn.get_partition_spec(params)
  tx = make_optimizer('mlorc_adamw', 1e-3, logical_axes=names, rank=rank)
  plan = mlorc_optax.compression_plan(tx, params)
  return mlorc_optax.flax.format_logical_plan(plan, names)


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of :func:`run` results (ratios vs the adamw run)."""
  base = next((r for r in results if r['optimizer'] == 'adamw'), None)
  rows = [
      '| optimizer | tokens/s | vs adamw | step ms | optimizer state MiB | '
      'vs adamw | peak GiB | first loss | final loss |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    name = r['optimizer'] + (f' (r={r["rank"]})' if r.get('rank') else '')
    state = f'{r["opt_state_bytes"] / 2**20:,.2f}'
    state_ratio = (
        f'{r["opt_state_bytes"] / base["opt_state_bytes"]:.2%}' if base else '-'
    )
    tps = r.get('tokens_per_s')
    if not tps:
      rows.append(f'| {name} | - | - | - | {state} | {state_ratio} | - | - '
                  '| - |')
      continue
    ratio = (
        f'{tps / base["tokens_per_s"]:.3f}'
        if base and base.get('tokens_per_s') else '-'
    )
    peak = r.get('peak_bytes')
    peak = '-' if peak is None else f'{peak / 2**30:.2f}'
    rows.append(
        f'| {name} | {tps:,.0f} | {ratio} | {r["step_time_s"] * 1e3:.1f} | '
        f'{state} | {state_ratio} | {peak} | {r["first_loss"]:.3f} | '
        f'{r["final_loss"]:.3f} |'
    )
  return '\n'.join(rows)


def compare(
    cfg: model_lib.T5Config,
    *,
    optimizers: Sequence[str] = ('mlorc_adamw', 'adamw'),
    json_path: str | None = None,
    verbose: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
  """Runs the optimizers back to back at the same settings; prints a table.

  ``mlorc_adamw`` runs first: the device's peak-memory counter never resets,
  so the later (larger) adamw peak is then exact.
  """
  results = [run(cfg, name, verbose=verbose, **kwargs) for name in optimizers]
  if verbose:
    print()
    print(format_table(results))
  if json_path:
    llama_train.write_json(results, json_path)
  return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--preset', default='tiny', choices=sorted(model_lib.PRESETS),
      help='Model size (tiny: CPU tests; large: 374M, the GPU run).',
  )
  parser.add_argument(
      '--layers', type=int, default=None,
      help="Override the preset's number of layers.",
  )
  parser.add_argument(
      '--vocab-size', type=int, default=None,
      help="Override the preset's vocabulary size.",
  )
  parser.add_argument(
      '--dtype', default='float32', choices=('float32', 'bfloat16'),
      help='Activation dtype (parameters and moments stay float32).',
  )
  parser.add_argument(
      '--remat', action='store_true',
      help='Rematerialise each layer in the backward pass (nn.remat).',
  )
  parser.add_argument(
      '--optimizer', default='both', choices=OPTIMIZERS + ('both',),
      help="'both' runs mlorc_adamw, then adamw, and compares them.",
  )
  parser.add_argument('--steps', type=int, default=30, help='Steps per run.')
  parser.add_argument(
      '--warmup', type=int, default=2,
      help='Untimed steps at the start (the first compiles).',
  )
  parser.add_argument('--batch', type=int, default=8, help='Batch size.')
  parser.add_argument(
      '--seq-len', type=int, default=64, help='Tokens per sequence.'
  )
  parser.add_argument('--lr', type=float, default=1e-3, help='Learning rate.')
  parser.add_argument(
      '--lr-warmup', type=int, default=0,
      help='Steps of linear learning-rate warm-up (0: constant).',
  )
  parser.add_argument(
      '--b1', type=float, default=None,
      help='First-moment decay (default 0.9 adamw, 0.8 mlorc_adamw).',
  )
  parser.add_argument(
      '--weight-decay', type=float, default=0.0,
      help='Decoupled weight decay.',
  )
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank.')
  parser.add_argument(
      '--data', default='synthetic', choices=('synthetic', 'reviews'),
      help='Learnable synthetic tokens, or the drug-review texts (needs the '
      'assets of examples/finetune and a vocabulary >= 30522).',
  )
  parser.add_argument(
      '--mesh', default=None,
      help="Shard on a DATAxMODEL mesh, e.g. '2x4' (default: one device).",
  )
  parser.add_argument('--seed', type=int, default=0, help='Random seed.')
  parser.add_argument(
      '--log-every', type=int, default=10,
      help='Print the loss every this many steps (0: never).',
  )
  parser.add_argument(
      '--print-plan', action='store_true',
      help="Print MLorc's leaf -> matrix-view table for the model first.",
  )
  parser.add_argument(
      '--plan-only', action='store_true',
      help='Print the leaf -> matrix-view table and exit (from shapes '
      'alone: nothing is allocated or trained).',
  )
  parser.add_argument(
      '--json', default=None, help='Write the results (a list) to this file.'
  )
  parser.add_argument('--quiet', action='store_true', help='Less output.')
  args = parser.parse_args(argv)

  llama_train.set_xla_env()
  overrides = {}
  if args.layers is not None:
    overrides['num_layers'] = args.layers
  if args.vocab_size is not None:
    overrides['vocab_size'] = args.vocab_size
  cfg = model_lib.get_config(
      args.preset, dtype=args.dtype, remat=args.remat, **overrides
  )
  if args.print_plan or args.plan_only:
    print(plan_table(cfg, args.rank))
    if args.plan_only:
      return []
    print()
  kwargs = dict(
      batch=args.batch, seq_len=args.seq_len, steps=args.steps,
      warmup=args.warmup, lr=args.lr, lr_warmup=args.lr_warmup, b1=args.b1,
      weight_decay=args.weight_decay, rank=args.rank, data=args.data,
      mesh=parse_mesh(args.mesh), seed=args.seed, log_every=args.log_every,
  )
  if not args.quiet:
    print(f'{jax.default_backend()}: {jax.local_devices()[0].device_kind}, '
          f'{jax.device_count()} devices, jax {jax.__version__}, '
          f'flax {_flax_version()}')
  optimizers = (
      ('mlorc_adamw', 'adamw') if args.optimizer == 'both'
      else (args.optimizer,)
  )
  return compare(
      cfg, optimizers=optimizers, json_path=args.json,
      verbose=not args.quiet, **kwargs,
  )


if __name__ == '__main__':
  main()
