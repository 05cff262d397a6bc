"""Fine-tuning steps per second of each optimizer, timed in interleaved rounds.

Issue #17 (point 4) asks for ``mlorc_adamw`` at 0.7x or more of AdamW's
steps per second on the MiniLM fine-tuning example, and ``mlorc_lion`` at
0.7x of Lion's. The example reports steps/s run by run, one method after
the other. Its step is bound by the host and the launches, and the
baselines moved by up to 30 % between two such runs. This tool builds the
example's own compiled train step for every method
(:func:`examples.finetune.train.compiled_train_step`: forward, backward,
optimizer update, with dropout) on one fixed batch. It times all the steps
in the same rounds (:func:`benchmarks.toolkit.timing.time_steps_interleaved`),
so a busy spell of the host slows every method alike.

The weights are random: MiniLM-L6's architecture (``BertConfig``'s
defaults, its 30,522-row vocabulary included) with a fresh 3-class head.
A step's time does not depend on the weights' values, so no assets are
needed. Each MLorc method is compared with its base optimizer (same family,
full fine-tuning): ``speed`` is base step time / step time.

Usage::

  python -m benchmarks.finetune_steps --json OUT.json --table OUT.md  # GPU
  python -m benchmarks.finetune_steps --preset tiny   # CPU, CI (a few s)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

from benchmarks.toolkit import environment
from benchmarks.toolkit import results as results_lib
from benchmarks.toolkit import timing
from examples.finetune import data as data_lib
from examples.finetune import methods as methods_lib
from examples.finetune import model as model_lib
from examples.finetune import train


@dataclasses.dataclass(frozen=True)
class Config:
  """Fine-tuning steps per second of each optimizer, interleaved."""

  preset: Literal['minilm', 'tiny'] = 'minilm'
  """'minilm': MiniLM-L6's architecture; 'tiny': a 1-layer model for CI."""
  methods: tuple[str, ...] = ('adamw', 'mlorc_adamw_r4', 'lion',
                              'mlorc_lion_r4')
  """Method specs of examples/finetune/methods.py."""
  batch_size: int = 16
  """Examples per step (the example's GPU speed runs used 16)."""
  max_len: int = 128
  """Tokens per example."""
  calls: int = 200
  """Timed rounds (each round runs every method's step once)."""
  warmup: int = 10
  """Untimed rounds first."""
  seed: int = 0
  """Seeds the weights, the batch and the sketches."""
  json: str | None = None
  """Write the results here."""
  table: str | None = None
  """Write the markdown table here."""

  def resolved(self) -> Config:
    if self.preset == 'tiny':
      return dataclasses.replace(self, batch_size=4, max_len=16, calls=3,
                                 warmup=1)
    return self

  def model_config(self) -> model_lib.BertConfig:
    if self.preset == 'tiny':
      return model_lib.BertConfig(
          vocab_size=100, hidden_size=32, num_hidden_layers=1,
          num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=self.max_len)
    return model_lib.BertConfig()


def fixed_batch(cfg: Config, vocab_size: int) -> dict[str, np.ndarray]:
  """One batch of random token ids (no padding) and labels."""
  rng = np.random.default_rng(cfg.seed)
  ids = rng.integers(1, vocab_size, (cfg.batch_size, cfg.max_len),
                     dtype=np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'labels': rng.integers(0, data_lib.NUM_CLASSES, cfg.batch_size,
                                 dtype=np.int32)}


def compiled_steps(cfg: Config) -> dict[str, Any]:
  """``{method: (step, state, compile seconds)}``: each method's compiled
  train step, as :func:`timing.time_steps` takes it, on the same batch."""
  model_cfg = cfg.model_config()
  batch = fixed_batch(cfg, model_cfg.vocab_size)
  lr = jnp.asarray(1e-5, jnp.float32)
  out = {}
  for name in cfg.methods:
    spec = methods_lib.parse(name)
    model = model_lib.BertClassifier(model_cfg, data_lib.NUM_CLASSES,
                                     rngs=nnx.Rngs(cfg.seed))
    model, optimizer = train.make_optimizer(spec, model, cfg.seed)
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    start = time.perf_counter()
    compiled = train.compiled_train_step(graphdef, state, batch, lr)
    seconds = time.perf_counter() - start
    print(f'{name}: compiled in {seconds:.1f} s', flush=True)
    # The state is donated: each call returns the next one.
    out[name] = (lambda s, c=compiled: c(s, batch, lr)[0], state, seconds)
  return out


TABLE = (
    results_lib.Column('method', 'method'),
    results_lib.Column('step_s', 'step ms (median)', lambda s: f'{s * 1e3:.3f}'),
    results_lib.Column('step_min_s', 'step ms (min)',
                       lambda s: f'{s * 1e3:.3f}'),
    results_lib.Column('steps_per_s', 'steps/s', '.1f'),
    results_lib.Column('base', 'base optimizer'),
    results_lib.Column('speed', 'speed vs base', '.3f'),
    results_lib.Column('compile_s', 'compile s', '.1f'),
)


def run(cfg: Config) -> dict[str, Any]:
  """Times every method; returns the results (rows in method order)."""
  cfg = cfg.resolved()
  steps = compiled_steps(cfg)
  timings = timing.time_steps_interleaved(
      {name: (step, state) for name, (step, state, _) in steps.items()},
      calls=cfg.calls, warmup=cfg.warmup)
  rows = []
  for name, t in timings.items():
    spec = methods_lib.parse(name)
    rows.append(dict(
        method=name, family=spec.family, kind=spec.kind,
        base=spec.family if spec.kind != 'full' else None,
        step_s=t.median_s, step_min_s=t.min_s, steps_per_s=1 / t.median_s,
        compile_s=steps[name][2]))
  results_lib.add_ratios(rows, value='step_s', group_by=('family',),
                         baseline=lambda r: r['kind'] == 'full',
                         key='time_vs_base')
  for r in rows:
    full = r['kind'] == 'full'
    r['speed'] = None if full or not r['time_vs_base'] else (
        1 / r['time_vs_base'])
  return dict(config=dataclasses.asdict(cfg),
              device=environment.device_description(),
              versions=environment.versions(), rows=rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  cfg = tyro.cli(Config, args=argv)
  environment.configure_xla()
  out = run(cfg)
  table = results_lib.markdown_table(out['rows'], TABLE)
  print(f'{environment.device_line(out["device"])}\n{table}')
  config = out['config']
  results_lib.write_outputs(
      out, table, json_path=cfg.json, table_path=cfg.table,
      header=(f'{environment.device_line(out["device"])}; batch '
              f'{config["batch_size"]} x {config["max_len"]} tokens, '
              f'{config["calls"]} interleaved rounds'))
  return out


if __name__ == '__main__':
  main()
