"""Multi-device scaling of the LLaMA example: one device vs DP vs FSDP.

For each optimizer (``optax.adamw`` and ``mlorc_adamw``) this runs the same
model, global batch, data and seed three ways, each in its own process
(exact per-device peaks; a failure cannot poison the rest):

* ``none``: one device, no mesh (the baseline);
* ``dp``: ``--devices`` devices, parameters and optimizer state replicated;
* ``fsdp``: ``--devices`` devices, parameters and optimizer state sharded
  (:mod:`examples.llama.parallel`).

It reports tokens/s, the speed-up over the same optimizer on one device,
the ratio to ``optax.adamw`` in the same mode, the peak memory of every
device, the optimizer state per device, the cross-device transfers of the
compiled optimizer update (MLorc must never move a dense moment:
:func:`examples.llama.parallel.moves_dense_moment` flags any transfer with a
compressed matrix's ``(rows, cols)`` among its dimensions or as large as the
smallest compressed leaf) and the
largest difference of the per-step losses from the one-device run of the
same optimizer (same global batch and seed), checked against ``--loss-tol``.

Usage (2 GPUs, about 8 minutes at 1B)::

  python -m examples.llama.scaling --preset 1b --devices 2 --batch 16 \\
      --seq-len 1024 --steps 12 --param-dtype bfloat16 --remat \\
      --json benchmarks/results/multi_gpu/llama_1b_2xh100.json \\
      --table benchmarks/results/multi_gpu/llama_1b_2xh100.md

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` simulates 8
devices (``--preset tiny --data synthetic``).
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence
from typing import Any

from examples.llama import train

#: The runs, in order: (optimizer, sharding).
RUNS: tuple[tuple[str, str], ...] = (
    ('adamw', 'none'),
    ('mlorc_adamw', 'none'),
    ('adamw', 'dp'),
    ('mlorc_adamw', 'dp'),
    ('adamw', 'fsdp'),
    ('mlorc_adamw', 'fsdp'),
)


def loss_difference(
    result: dict[str, Any], baseline: dict[str, Any] | None
) -> float | None:
  """Largest ``|loss - baseline loss|`` over the common steps (or None)."""
  if (
      baseline is None
      or result.get('status') != 'ok'
      or baseline.get('status') != 'ok'
  ):
    return None
  pairs = list(zip(result['losses'], baseline['losses']))
  return max(abs(a - b) for a, b in pairs) if pairs else None


def summarise(
    results: Sequence[dict[str, Any]], loss_tol: float
) -> list[dict[str, Any]]:
  """Adds ``speedup``, ``ratio_vs_adamw``, ``max_loss_diff``, ``losses_match``.

  ``speedup``: tokens/s over the same optimizer's one-device run;
  ``ratio_vs_adamw``: tokens/s over ``adamw``'s in the same mode.
  """
  by_key = {(r['optimizer'], r.get('sharding', 'none')): r for r in results}
  for r in results:
    ok = r.get('status') == 'ok'
    single = by_key.get((r['optimizer'], 'none'))
    adamw = by_key.get(('adamw', r.get('sharding', 'none')))
    r['speedup'] = (
        r['tokens_per_s'] / single['tokens_per_s']
        if ok and single and single.get('status') == 'ok'
        else None
    )
    r['ratio_vs_adamw'] = (
        r['tokens_per_s'] / adamw['tokens_per_s']
        if ok and adamw and adamw.get('status') == 'ok'
        else None
    )
    diff = loss_difference(r, single)
    r['max_loss_diff'] = diff
    r['losses_match'] = None if diff is None else bool(diff <= loss_tol)
  return list(results)


def _fmt(x: Any, spec: str) -> str:
  return '-' if x is None else format(x, spec)


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """Markdown table of :func:`summarise`'d results."""
  rows = [
      '| optimizer | mode | devices | status | tokens/s | speed-up vs 1 '
      'device | ratio vs adamw | step ms | update ms | peak GiB per device | '
      'optimizer state GiB per device | update transfers (largest shape), '
      'dense-moment-sized | max abs loss diff vs 1 device |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    ok = r.get('status') == 'ok'
    peaks = r.get('peak_bytes_per_device')
    peak = (
        ' / '.join(f'{p / 2**30:.1f}' for p in peaks) if ok and peaks else '-'
    )
    coll = r.get('update_collectives')
    transfers = '-'
    if coll is not None:
      largest = coll['largest'][0][1] if coll['largest'] else None
      transfers = (
          f'{coll["count"]}'
          + (f' (largest {largest})' if largest else '')
          + f', {coll.get("dense_moment_transfers", "?")} dense'
      )
    state = r.get('opt_state_bytes_per_device', r.get('opt_state_bytes'))
    rows.append(
        f'| {r["optimizer"]} | {r.get("sharding", "none")} | '
        f'{r.get("devices", 1)} | '
        f'{r.get("status") if ok else (r.get("status") or "?") + ": " + str(r.get("error"))[:60]} | '
        f'{_fmt(r.get("tokens_per_s") if ok else None, ",.0f")} | '
        f'{_fmt(r.get("speedup"), ".2f")} | '
        f'{_fmt(r.get("ratio_vs_adamw"), ".3f")} | '
        f'{_fmt(r["step_time_s"] * 1e3 if ok else None, ".1f")} | '
        f'{_fmt((r.get("update_time_s") or 0) * 1e3 or None, ".1f")} | '
        f'{peak} | {_fmt(state / 2**30 if state else None, ".2f")} | '
        f'{transfers} | {_fmt(r.get("max_loss_diff"), ".2e")} |'
    )
  return '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns the summarised results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  train.add_model_args(parser)
  parser.add_argument(
      '--devices',
      type=int,
      default=None,
      help='Devices for dp/fsdp (default: all JAX sees).',
  )
  parser.add_argument(
      '--modes',
      nargs='+',
      default=['none', 'dp', 'fsdp'],
      choices=('none', 'dp', 'fsdp'),
      help='Which placements to run (none = one device).',
  )
  parser.add_argument(
      '--optimizers',
      nargs='+',
      default=list(train.OPTIMIZERS),
      choices=train.OPTIMIZERS,
      help='Optimizers to run.',
  )
  parser.add_argument('--batch', type=int, default=16, help='Global batch.')
  parser.add_argument(
      '--seq-len', type=int, default=1024, help='Tokens per sequence.'
  )
  parser.add_argument('--steps', type=int, default=12, help='Steps per run.')
  parser.add_argument(
      '--warmup', type=int, default=3, help='Untimed steps after compiling.'
  )
  parser.add_argument('--lr', type=float, default=3e-4, help='Learning rate.')
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank.')
  parser.add_argument(
      '--data',
      default='reviews',
      choices=('reviews', 'synthetic'),
      help='Drug-review text or synthetic tokens.',
  )
  parser.add_argument('--seed', type=int, default=0, help='Random seed.')
  parser.add_argument(
      '--time-update',
      type=int,
      default=5,
      help='Also time the optimizer update alone over this many calls.',
  )
  parser.add_argument(
      '--loss-tol',
      type=float,
      default=0.02,
      help='Largest allowed |loss - one-device loss| at any step.',
  )
  parser.add_argument(
      '--timeout', type=float, default=600, help='Seconds per run.'
  )
  parser.add_argument('--json', default=None, help='Write results here.')
  parser.add_argument(
      '--table', default=None, help='Write the markdown table here.'
  )
  args = parser.parse_args(argv)

  train.set_xla_env()
  import jax  # pylint: disable=g-import-not-at-top

  devices = args.devices or len(jax.devices())
  cfg = train.config_from_args(args)
  results = []
  for optimizer, mode in RUNS:
    if optimizer not in args.optimizers or mode not in args.modes:
      continue
    r = train.run_isolated(
        cfg,
        optimizer,
        timeout=args.timeout,
        batch=args.batch,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        rank=args.rank,
        data=args.data,
        seed=args.seed,
        time_update=args.time_update,
        sharding=mode,
        devices=1 if mode == 'none' else devices,
    )
    r.setdefault('sharding', mode)
    r.setdefault('devices', 1 if mode == 'none' else devices)
    results.append(r)
    print(
        f'{optimizer:12s} {mode:5s} x{r["devices"]}: {r["status"]} '
        + (
            f'{r["tokens_per_s"]:,.0f} tokens/s'
            if r['status'] == 'ok'
            else str(r.get('error'))[:300]
        ),
        flush=True,
    )
  summarise(results, args.loss_tol)
  ok = [r for r in results if 'device' in r]
  header = (
      f'{train.describe_setup(ok)}; global batch {args.batch}; '
      f'{datetime.date.today().isoformat()}'
      if ok
      else ''
  )
  table = format_table(results)
  print(header)
  print(table)
  if args.json:
    train.write_json(results, args.json)
  if args.table:
    os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
    with open(args.table, 'w') as f:
      f.write(header + '\n\n' + table + '\n')
  return results


if __name__ == '__main__':
  main()
