"""Settings of the Linen example: one frozen dataclass and named presets.

``main.py`` reads :class:`Config` from the command line with ``tyro``: the
first word names a preset of :data:`PRESETS`, every field is a flag that
overrides it::

  python -m examples.linen.main cpu --steps 20 --mesh 2x4
  python -m examples.linen.main plan          # the leaf -> view table
  python -m examples.linen.main gpu --help
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from examples.linen import model as model_lib


@dataclasses.dataclass(frozen=True)
class Config:
  """A comparison of ``optax.adamw`` and ``mlorc_adamw`` on the T5 decoder.

  Attributes:
    model: model size preset (tiny: CPU tests; large: 374M, the GPU run).
    layers: override of the preset's number of layers.
    vocab_size: override of the preset's vocabulary size.
    dtype: activation dtype (parameters and moments stay float32).
    remat: rematerialise each layer in the backward pass (nn.remat).
    optimizers: optimizers to run, in this order (the device peak never
      resets, so the one expected to use less memory goes first).
    lr: peak learning rate.
    lr_warmup: steps of linear learning-rate warm-up from 0 (0: constant).
    b1: first-moment decay (None: 0.9 for adamw, the paper's 0.8 for
      mlorc_adamw).
    weight_decay: decoupled weight decay.
    rank: MLorc rank.
    batch: sequences per step.
    seq_len: tokens per sequence.
    steps: training steps per run (0: build the state only).
    warmup: untimed steps at the start (the first one compiles).
    data: a learnable synthetic stream, or the drug-review texts (needs the
      assets of examples/finetune and a vocabulary >= 30522).
    mesh: shard on a DATAxMODEL mesh, e.g. '2x4' (None: one device).
    seed: seed of the parameters, sketches and data.
    log_every: print the loss every this many steps (0: never).
    print_plan: print MLorc's leaf -> matrix-view table first.
    plan_only: print that table and exit (from shapes alone: nothing is
      allocated or trained).
    quiet: print only the table.
    result_json: write the results (a list, one record per run) here.
  """

  model: Literal['tiny', 'small', 'base', 'large'] = 'tiny'
  layers: int | None = None
  vocab_size: int | None = None
  dtype: Literal['float32', 'bfloat16'] = 'float32'
  remat: bool = False

  optimizers: tuple[Literal['adamw', 'mlorc_adamw'], ...] = (
      'mlorc_adamw', 'adamw')
  lr: float = 1e-3
  lr_warmup: int = 0
  b1: float | None = None
  weight_decay: float = 0.0
  rank: int = 4

  batch: int = 8
  seq_len: int = 64
  steps: int = 30
  warmup: int = 2
  data: Literal['synthetic', 'reviews'] = 'synthetic'
  mesh: str | None = None
  seed: int = 0

  log_every: int = 10
  print_plan: bool = False
  plan_only: bool = False
  quiet: bool = False
  result_json: str | None = None

  def model_config(self) -> model_lib.T5Config:
    """The :class:`~examples.linen.model.T5Config` these settings select."""
    overrides = {'num_layers': self.layers, 'vocab_size': self.vocab_size}
    return model_lib.get_config(
        self.model, dtype=self.dtype, remat=self.remat,
        **{k: v for k, v in overrides.items() if v is not None})

  def replace(self, **changes) -> Config:
    """A copy with some fields changed (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


#: Named settings: ``main.py``'s first word.
PRESETS: dict[str, tuple[str, Config]] = {
    'cpu': ('Tiny model, both optimizers, with the plan (CPU, seconds).',
            Config(print_plan=True)),
    'plan': ('The leaf -> matrix-view table of the 374M model (no training).',
             Config(model='large', plan_only=True)),
    'gpu': ('374M parameters, bfloat16, remat, 32 x 512 tokens, 40 steps '
            '(one GPU, about 3 minutes).',
            Config(model='large', dtype='bfloat16', remat=True, batch=32,
                   seq_len=512, steps=40, warmup=5, lr_warmup=10)),
}
