"""Multi-device scaling of the LLaMA example: one device vs DP vs FSDP.

For each optimizer this runs the same model, global batch, data and seed in
each placement mode, every run in its own process (exact per-device peaks;
a failure cannot poison the rest):

* ``none``: one device, no mesh (the baseline);
* ``dp``: ``--devices`` devices, parameters and optimizer state replicated;
* ``fsdp``: ``--devices`` devices, parameters and optimizer state sharded
  (``parallel.py``).

It reports tokens/s, the speed-up over the same optimizer on one device,
the ratio to ``optax.adamw`` in the same mode, every device's peak, the
optimizer state per device, the cross-device transfers of the compiled
optimizer update (MLorc must never move a dense moment:
:func:`examples.llama.parallel.moves_dense_moment`) and the largest
difference of the per-step losses from the one-device run of the same
optimizer, checked against ``--loss-tol``.

Usage (2 GPUs, about 8 minutes at 1B)::

  python -m examples.llama.scaling 1b --devices 2 \\
      --result-json /tmp/llama_1b_2x.json --table /tmp/llama_1b_2x.md
  # 8 simulated CPU devices, seconds:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m examples.llama.scaling cpu --devices 4
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from collections.abc import Sequence
from typing import Any, Literal

import tyro

from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import measure
from examples.llama import report

Mode = Literal['none', 'dp', 'fsdp']


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
  """The settings of every run and which placements to compare.

  Attributes:
    run: model, optimizer and training settings shared by all runs, and
      devices for dp/fsdp (None: all JAX sees); sharding is set by
      modes, and every run has its own process.
    modes: placements to run (none = one device).
    loss_tol: largest allowed |loss - one-device loss| at any step.
    timeout: seconds per run.
    table: also write the markdown table here.
  """

  run: tyro.conf.OmitArgPrefixes[config_lib.Config] = config_lib.Config()
  modes: tuple[Mode, ...] = ('none', 'dp', 'fsdp')
  loss_tol: float = 0.02
  timeout: float = 600.0
  table: str | None = None


_GPU_1B = config_lib.PRESETS['gpu'][1].replace(
    optimizers=('adamw', 'mlorc_adamw'), isolate=False)

#: Named settings: the first word on the command line.
PRESETS: dict[str, tuple[str, ScalingConfig]] = {
    'cpu': ('Tiny model, synthetic tokens (simulated CPU devices).',
            ScalingConfig(run=config_lib.Config(
                optimizers=('adamw', 'mlorc_adamw'), vocab_size=256,
                seq_len=16, steps=4, warmup=1, lr=3e-3, log_every=0))),
    '1b': ('TinyLlama-1.1B shapes, bfloat16, remat, 16 x 1024 review tokens.',
           ScalingConfig(run=_GPU_1B)),
    'small': ('106M parameters in float32, 16 x 512 tokens: loss agreement.',
              ScalingConfig(run=_GPU_1B.replace(
                  model='small', param_dtype='float32', remat=False,
                  seq_len=512), loss_tol=1e-3)),
}


def loss_difference(result: dict[str, Any], baseline: dict[str, Any] | None
                    ) -> float | None:
  """Largest ``|loss - baseline loss|`` over the common steps (or None)."""
  if not (baseline and result.get('status') == baseline.get('status') == 'ok'):
    return None
  pairs = list(zip(result['losses'], baseline['losses']))
  return max(abs(a - b) for a, b in pairs) if pairs else None


def summarise(results: Sequence[dict[str, Any]], loss_tol: float
              ) -> list[dict[str, Any]]:
  """Adds ``speedup``, ``ratio_vs_adamw``, ``max_loss_diff``, ``losses_match``.

  ``speedup``: tokens/s over the same optimizer's one-device run;
  ``ratio_vs_adamw``: tokens/s over ``adamw``'s in the same mode.
  """
  results = [dict(r, mode=r['settings']['sharding'],
                  tokens_per_s=r.get('tokens_per_s') if r['status'] == 'ok'
                  else None) for r in results]
  toolkit.results.add_ratios(
      results, value='tokens_per_s', group_by=('optimizer',),
      baseline=lambda r: r['mode'] == 'none', key='speedup')
  toolkit.results.add_ratios(
      results, value='tokens_per_s', group_by=('mode',),
      baseline=lambda r: r['optimizer'] == 'adamw', key='ratio_vs_adamw')
  single = {r['optimizer']: r for r in results if r['mode'] == 'none'}
  for r in results:
    diff = loss_difference(r, single.get(r['optimizer']))
    r['max_loss_diff'] = diff
    r['losses_match'] = None if diff is None else bool(diff <= loss_tol)
  return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the summarised records."""
  config = tyro.extras.overridable_config_cli(
      PRESETS, args=argv, prog='python -m examples.llama.scaling',
      description=__doc__.splitlines()[0])
  toolkit.environment.configure_xla()
  devices = (config.run.devices
             or toolkit.environment.device_description()['count'])
  results = []
  for mode in config.modes:
    for optimizer in config.run.optimizers:
      run = config.run.replace(sharding=mode,
                               devices=1 if mode == 'none' else devices)
      r = measure.run_isolated(run, optimizer, timeout=config.timeout)
      print(f'{optimizer:12s} {mode:5s} x{run.devices}: {r["status"]} '
            + (f'{r["tokens_per_s"]:,.0f} tokens/s' if r['status'] == 'ok'
               else str(r.get('error'))[:300]), flush=True)
      results.append(r)
  results = summarise(results, config.loss_tol)
  header = (f'{report.setup_line(results)}; global batch {config.run.batch};'
            f' {datetime.date.today().isoformat()}')
  table = report.scaling_table(results)
  print(header, table, sep='\n')
  if config.run.result_json:
    toolkit.results.write_json(results, config.run.result_json)
  if config.table:
    path = pathlib.Path(config.table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + '\n\n' + table + '\n')
  return results


if __name__ == '__main__':
  main()
