"""Settings of the LLaMA example: one frozen dataclass and named presets.

:class:`Config` holds everything one comparison needs (model shape and
numerics, optimizer, data, steps, placement, outputs). ``main.py`` reads it
from the command line with ``tyro``: the first word names a preset of
:data:`PRESETS`, every field is a flag that overrides it::

  python -m examples.llama.main cpu --steps 20 --optimizers mlorc_adamw
  python -m examples.llama.main gpu --help

:func:`cli_args` turns a :class:`Config` back into such flags, to run it in a
fresh process (:func:`benchmarks.toolkit.isolation.run_isolated`) and to
record the command that made a result.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from examples.llama import model as model_lib

#: Model presets (keys of :data:`examples.llama.model.PRESETS`).
ModelName = Literal['tiny', 'small', '1b', '3b', '7b', '13b']
#: Optimizers the example compares.
Optimizer = Literal['adamw', 'mlorc_adamw']
Dtype = Literal['float32', 'bfloat16']


@dataclasses.dataclass(frozen=True)
class Config:
  """One comparison of ``optax.adamw`` and ``mlorc_adamw`` on the LLaMA model.

  Attributes:
    model: model size preset (examples.llama.model.PRESETS).
    vocab_size: override of the preset's vocabulary size.
    dim: override of the preset's width.
    n_layers: override of the preset's depth.
    n_heads: override of the preset's query heads (also sets n_kv_heads
      unless given).
    n_kv_heads: override of the preset's key/value heads.
    ffn_dim: override of the preset's MLP width.
    param_dtype: parameter dtype.
    compute_dtype: activation dtype (None: the parameter dtype).
    remat: rematerialise each block in the backward pass (nnx.remat).
    remat_policy: what remat may keep (model.REMAT_POLICIES).
    scan: stack the blocks and nnx.scan over them (else a Python list).
    attention: jax.nn.dot_product_attention implementation.
    optimizers: optimizers to run, in this order (the device peak never
      resets, so the one expected to use less memory goes first).
    lr: learning rate (constant).
    b1: first-moment decay (None: 0.9 for adamw, the paper's 0.8 for
      mlorc_adamw).
    weight_decay: decoupled weight decay.
    rank: MLorc rank.
    moment_dtype: 'float32' runs both optimizers on float32 copies of the
      gradients and parameters (every moment float32); 'param' keeps optax's
      rule (moments in the parameter dtype).
    batch: sequences per step (global, split over the devices).
    seq_len: tokens per sequence.
    steps: training steps per run; 0 compiles the step from shapes and
      reports XLA's memory estimate without allocating anything.
    warmup: untimed steps at the start (the first one compiles).
    data: drug-review text (fetched on first use) or a synthetic stream.
    seed: seed of the parameters, sketches and data windows.
    time_update: also time the optimizer update alone over this many calls.
    sharding: 'none' (one device), 'dp' (data parallel) or 'fsdp' (params
      and optimizer state sharded); see parallel.py.
    devices: devices on the mesh with dp/fsdp (None: all).
    repeats: run the optimizers this many times, alternating the order.
    isolate: run each optimizer in its own process (exact peaks, OOM-safe).
    log_every: print the loss every this many steps (0: never).
    quiet: print only the table.
    result_json: write the results (a list, one record per run) here.
  """

  model: ModelName = 'tiny'
  vocab_size: int | None = None
  dim: int | None = None
  n_layers: int | None = None
  n_heads: int | None = None
  n_kv_heads: int | None = None
  ffn_dim: int | None = None
  param_dtype: Dtype = 'float32'
  compute_dtype: Dtype | None = None
  remat: bool = False
  remat_policy: Literal[
      'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable'
  ] = 'nothing_saveable'
  scan: bool = True
  attention: Literal['xla', 'cudnn'] = 'xla'

  optimizers: tuple[Optimizer, ...] = ('mlorc_adamw', 'adamw')
  lr: float = 1e-3
  b1: float | None = None
  weight_decay: float = 0.0
  rank: int = 4
  moment_dtype: Literal['float32', 'param'] = 'float32'

  batch: int = 8
  seq_len: int = 128
  steps: int = 30
  warmup: int = 2
  data: Literal['reviews', 'synthetic'] = 'synthetic'
  seed: int = 0

  time_update: int = 0
  sharding: Literal['none', 'dp', 'fsdp'] = 'none'
  devices: int | None = None
  repeats: int = 1
  isolate: bool = False
  log_every: int = 10
  quiet: bool = False
  result_json: str | None = None

  def model_config(self) -> model_lib.LlamaConfig:
    """The :class:`~examples.llama.model.LlamaConfig` these settings select."""
    names = ('vocab_size', 'dim', 'n_layers', 'n_heads', 'n_kv_heads',
             'ffn_dim')
    overrides = {n: getattr(self, n) for n in names
                 if getattr(self, n) is not None}
    if 'n_heads' in overrides and 'n_kv_heads' not in overrides:
      overrides['n_kv_heads'] = overrides['n_heads']
    return model_lib.get_config(
        self.model,
        param_dtype=self.param_dtype,
        compute_dtype=self.compute_dtype or self.param_dtype,
        remat=self.remat,
        remat_policy=self.remat_policy,
        scan_layers=self.scan,
        attention=self.attention,
        **overrides,
    )

  def replace(self, **changes) -> Config:
    """A copy with some fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


#: Named settings: ``main.py``'s first word.
PRESETS: dict[str, tuple[str, Config]] = {
    'cpu': (
        'Tiny model, 256 token ids, synthetic tokens, both optimizers (CPU, '
        'half a minute).',
        Config(vocab_size=256, seq_len=64, lr=3e-3, steps=40),
    ),
    'gpu': (
        'TinyLlama-1.1B shapes, bfloat16, remat, 16 x 1024 review tokens, '
        'one process per optimizer (one GPU, about 3 minutes).',
        Config(model='1b', param_dtype='bfloat16', remat=True, lr=3e-4,
               batch=16, seq_len=1024, steps=10, warmup=3, time_update=3,
               data='reviews', isolate=True),
    ),
}


def cli_args(config: Config, preset: str = 'cpu') -> list[str]:
  """Command-line words that ``main.py`` parses back into ``config``.

  Every field but ``result_json`` is written out, so any preset gives the
  same settings.

  Args:
    config: the settings.
    preset: the first word (a key of :data:`PRESETS`).

  Returns:
    ``[preset, '--model', 'tiny', ...]``.
  """
  args = [preset]
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    flag = '--' + field.name.replace('_', '-')
    if field.name == 'result_json':
      continue
    if isinstance(value, bool):
      args.append(flag if value else '--no-' + flag[2:])
    elif isinstance(value, tuple):
      args += [flag, *map(str, value)]
    else:
      args += [flag, str(value)]
  return args
