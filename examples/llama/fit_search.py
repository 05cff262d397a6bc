"""Largest LLaMA-style model whose full training step fits on the device.

For each optimizer, tries model sizes in increasing order: the presets
(``small``, ``1b``, ``3b``, ``7b``, ``13b``) and/or a number of layers at one
preset's width (``--layers-at 7b``: binary search on ``n_layers``). Every
attempt runs in its own Python process (an out-of-memory error or a crash
cannot poison the search) with synthetic tokens: it compiles the full step
(forward, backward, optimizer update; parameters and state donated) from
abstract shapes, records XLA's compiled memory estimate, allocates the model
and optimizer on the device and runs ``--steps`` steps. The device's
``peak_bytes_in_use`` is recorded, and the error for what did not fit.

Usage (GPU)::

  python -m examples.llama.fit_search --presets small 1b 3b 7b 13b \\
      --batch 1 --seq-len 512 --json /tmp/fit.json
  python -m examples.llama.fit_search --presets --layers-at 7b \\
      --min-layers 24 --max-layers 80 --json /tmp/fit_layers.json

Defaults: bfloat16 parameters and activations, rematerialised scanned blocks,
float32 optimizer moments (``--moment-dtype``), rank 4, batch 1 x 512
tokens, ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` in the attempts (``--mem-fraction``;
the allocator limit is reported as ``bytes_limit``). ``--estimate-only``
compiles without allocating (any backend, e.g. CPU) and reports XLA's
estimate alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

#: Presets tried by default, smallest first.
DEFAULT_PRESETS: tuple[str, ...] = ('small', '1b', '3b', '7b', '13b')

#: Default optimizers, in search order.
DEFAULT_OPTIMIZERS: tuple[str, ...] = ('adamw', 'mlorc_adamw')


@dataclasses.dataclass(frozen=True)
class AttemptSpec:
  """One attempt: a model, an optimizer and a batch shape.

  Attributes:
    preset: model preset name.
    optimizer: ``'adamw'`` or ``'mlorc_adamw'``.
    n_layers: override of the preset's depth (None: the preset's).
    batch: sequences per step.
    seq_len: tokens per sequence.
    steps: steps to run (0 with ``estimate_only``).
    rank: MLorc rank.
    param_dtype: parameter dtype.
    compute_dtype: activation dtype.
    remat: rematerialise the blocks.
    remat_policy: see ``model.REMAT_POLICIES``.
    scan_layers: scan over stacked blocks.
    attention: ``'xla'`` or ``'cudnn'``.
    moment_dtype: ``'float32'`` or ``'param'`` (see ``train.make_optimizer``).
    estimate_only: compile only; allocate nothing.
  """

  preset: str
  optimizer: str
  n_layers: int | None = None
  batch: int = 1
  seq_len: int = 512
  steps: int = 2
  rank: int = 4
  param_dtype: str = 'bfloat16'
  compute_dtype: str = 'bfloat16'
  remat: bool = True
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = True
  attention: str = 'xla'
  moment_dtype: str = 'float32'
  estimate_only: bool = False

  def config(self) -> Any:
    """The ``LlamaConfig`` of this attempt."""
    from examples.llama import model as model_lib

    overrides = {} if self.n_layers is None else {'n_layers': self.n_layers}
    return model_lib.get_config(
        self.preset,
        param_dtype=self.param_dtype,
        compute_dtype=self.compute_dtype,
        remat=self.remat,
        remat_policy=self.remat_policy,
        scan_layers=self.scan_layers,
        attention=self.attention,
        **overrides,
    )

  def label(self) -> str:
    depth = '' if self.n_layers is None else f' ({self.n_layers} layers)'
    return f'{self.preset}{depth}'


def analytic_bytes(spec: AttemptSpec) -> dict[str, int]:
  """Parameter, gradient and optimizer-state bytes (from shapes only).

  ``total_bytes`` is their sum: what a step needs if every gradient is live
  when the update runs (true of the stacked layers, whose gradients all come
  out of the backward scan together), before activations and the
  optimizer's temporaries.
  """
  from examples.llama import model as model_lib
  from examples.llama import train

  cfg = spec.config()
  tx = train.make_optimizer(
      spec.optimizer, 1e-4, rank=spec.rank, moment_dtype=spec.moment_dtype
  )
  _, state = train.build(cfg, tx, abstract=True)
  params = model_lib.tree_bytes(state[0])
  opt = train.optimizer_state_bytes(state)
  return {
      'param_bytes': params,
      'grad_bytes': params,
      'opt_state_bytes': opt,
      'total_bytes': 2 * params + opt,
  }


def attempt(spec: AttemptSpec) -> dict[str, Any]:
  """Runs one attempt in this process (call it in a fresh one).

  Returns:
    :func:`examples.llama.train.run`'s result (``status`` ``'ok'``,
    ``'oom'`` or ``'error'``), or for ``estimate_only`` the compile
    information, plus ``spec`` and ``analytic`` (:func:`analytic_bytes`).
  """
  from examples.llama import train

  train.set_xla_env()
  cfg = spec.config()
  analytic = analytic_bytes(spec)
  if spec.estimate_only:
    import jax

    result: dict[str, Any] = {
        'optimizer': spec.optimizer,
        'param_count': cfg.num_params(),
        'backend': jax.default_backend(),
        'device': str(jax.local_devices()[0].device_kind),
        'status': 'estimated',
        'error': None,
    }
    try:
      tx = train.make_optimizer(
          spec.optimizer, 1e-4, rank=spec.rank, moment_dtype=spec.moment_dtype
      )
      _, info = train.compile_step(
          cfg, tx, batch=spec.batch, seq_len=spec.seq_len
      )
      result.update(info)
    except Exception as e:  # pylint: disable=broad-except
      result['status'] = 'oom' if train.is_oom(e) else 'error'
      result['error'] = f'{type(e).__name__}: {e}'[:600]
    stats = train.device_memory_stats()
    result['bytes_limit'] = stats.get('bytes_limit') if stats else None
  else:
    result = train.run(
        cfg,
        spec.optimizer,
        batch=spec.batch,
        seq_len=spec.seq_len,
        steps=spec.steps,
        warmup=min(1, spec.steps - 1),
        rank=spec.rank,
        moment_dtype=spec.moment_dtype,
        data='synthetic',
        log_every=0,
        verbose=False,
    )
    result.pop('losses', None)
  result['spec'] = dataclasses.asdict(spec)
  result['analytic'] = analytic
  return result


def attempt_in_subprocess(
    spec: AttemptSpec,
    *,
    timeout: float | None = 1800.0,
    mem_fraction: float | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
  """Runs :func:`attempt` in a fresh Python process and returns its result.

  A process that dies (e.g. killed by the host's OOM killer) or times out
  yields ``status`` ``'crashed'`` or ``'timeout'`` with the tail of its
  output as ``error``.

  Args:
    spec: the attempt.
    timeout: seconds before the process is killed (None: no limit).
    mem_fraction: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` for the attempt (None:
      inherited, else 0.95).
    verbose: print a line when the attempt ends.

  Returns:
    The attempt's result with ``wall_s`` added.
  """
  from examples.llama import train  # imports JAX but starts no backend

  env = train.subprocess_env()
  if mem_fraction is not None:
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(mem_fraction)
  root = train.repo_root()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'attempt.json')
    cmd = [
        sys.executable,
        '-m',
        'examples.llama.fit_search',
        '--attempt',
        json.dumps(dataclasses.asdict(spec)),
        '--attempt-out',
        out,
    ]
    try:
      proc = subprocess.run(
          cmd,
          env=env,
          timeout=timeout,
          capture_output=True,
          text=True,
          check=False,
          cwd=root,
      )
      status, tail = 'crashed', (
          f'exit code {proc.returncode}: '
          + (proc.stdout + proc.stderr).strip()[-1500:]
      )
    except subprocess.TimeoutExpired as e:
      status = 'timeout'
      tail = f'timed out after {timeout}s: ' + str(e.stderr or '')[-1000:]
    if os.path.exists(out):
      with open(out) as f:
        result = json.load(f)
    else:
      cfg = spec.config()
      result = {
          'optimizer': spec.optimizer,
          'param_count': cfg.num_params(),
          'status': status,
          'error': tail,
          'spec': dataclasses.asdict(spec),
      }
  result['wall_s'] = time.perf_counter() - t0
  if verbose:
    print(
        f'  {spec.optimizer:12s} {spec.label():18s} '
        f'{result["status"]:9s} peak {_gib(result.get("peak_bytes"))} GiB, '
        f'XLA estimate {_gib(_estimate(result))} GiB, '
        f'{result["wall_s"]:.0f}s',
        flush=True,
    )
  return result


def _estimate(result: dict[str, Any]) -> int | None:
  return (result.get('compiled_memory') or {}).get('estimated_peak_bytes')


def _gib(x: float | None) -> str:
  return '-' if x is None else f'{x / 2**30:.2f}'


def _count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'


def _fits(result: dict[str, Any]) -> bool:
  return result['status'] in ('ok', 'estimated') and (
      result['status'] == 'ok' or _estimate_fits(result)
  )


def _estimate_fits(result: dict[str, Any]) -> bool:
  """For compile-only attempts: estimate below the allocator limit."""
  limit, est = result.get('bytes_limit'), _estimate(result)
  return result['status'] == 'estimated' and (
      limit is None or est is None or est <= limit
  )


def search_presets(
    base: AttemptSpec,
    presets: Sequence[str],
    *,
    stop_after_failure: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
  """Tries ``presets`` in order with ``base``'s settings.

  Args:
    base: the settings (its ``preset`` is replaced).
    presets: preset names, smallest first.
    stop_after_failure: skip the larger presets after the first failure.
    **kwargs: passed to :func:`attempt_in_subprocess`.

  Returns:
    One result per preset tried.
  """
  results = []
  for preset in presets:
    r = attempt_in_subprocess(
        dataclasses.replace(base, preset=preset, n_layers=None), **kwargs
    )
    results.append(r)
    if stop_after_failure and not _fits(r):
      break
  return results


def search_layers(
    base: AttemptSpec,
    lo: int,
    hi: int,
    **kwargs: Any,
) -> list[dict[str, Any]]:
  """Binary search for the most layers in ``[lo, hi]`` that fit.

  ``base.preset`` fixes the width; ``lo`` is tried first (if it does not
  fit the search stops), then ``hi``, then bisection.

  Returns:
    Every attempt's result, in the order made.
  """
  results = []

  def fits(n: int) -> bool:
    r = attempt_in_subprocess(dataclasses.replace(base, n_layers=n), **kwargs)
    results.append(r)
    return _fits(r)

  if not fits(lo):
    return results
  if fits(hi):
    return results
  good, bad = lo, hi
  while bad - good > 1:
    mid = (good + bad) // 2
    if fits(mid):
      good = mid
    else:
      bad = mid
  return results


def largest_fitting(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """``{optimizer: result with the most parameters that fit}``."""
  best: dict[str, Any] = {}
  for r in results:
    if _fits(r):
      name = r['optimizer']
      if name not in best or r['param_count'] > best[name]['param_count']:
        best[name] = r
  return best


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of attempt results."""
  from examples.llama import model as model_lib  # no device use

  rows = [
      '| optimizer | model | params | layers | status | peak GiB | '
      'XLA estimate GiB | params+grads+state GiB | optimizer state GiB | '
      'limit GiB | step s | error |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    spec = r.get('spec', {})
    layers = spec.get('n_layers') or model_lib.PRESETS[spec['preset']].n_layers
    analytic = r.get('analytic') or {}
    name = r['optimizer'] + (
        f' (r={spec["rank"]})' if r['optimizer'] == 'mlorc_adamw' else ''
    )
    step = f'{r["step_time_s"]:.2f}' if r.get('step_time_s') else '-'
    error = (r.get('error') or '').replace('|', '/').replace('\n', ' ')
    rows.append(
        f'| {name} | {spec.get("preset")} | {_count(r["param_count"])} | '
        f'{layers} | {r["status"]} | {_gib(r.get("peak_bytes"))} | '
        f'{_gib(_estimate(r))} | {_gib(analytic.get("total_bytes"))} | '
        f'{_gib(analytic.get("opt_state_bytes"))} | '
        f'{_gib(r.get("bytes_limit"))} | {step} | {error[:120]} |'
    )
  return '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command-line entry point; returns every attempt's result."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--optimizers',
      nargs='+',
      default=DEFAULT_OPTIMIZERS,
      choices=DEFAULT_OPTIMIZERS,
      help='Optimizers to try.',
  )
  parser.add_argument(
      '--presets',
      nargs='*',
      default=list(DEFAULT_PRESETS),
      help='Presets to try, smallest first (none: skip).',
  )
  parser.add_argument(
      '--layers-at',
      default=None,
      help="Also binary-search n_layers at this preset's " 'width.',
  )
  parser.add_argument(
      '--min-layers', type=int, default=1, help='Lower end of the layer search.'
  )
  parser.add_argument(
      '--max-layers',
      type=int,
      default=64,
      help='Upper end of the layer search.',
  )
  parser.add_argument('--batch', type=int, default=1, help='Batch size.')
  parser.add_argument(
      '--seq-len', type=int, default=512, help='Tokens per sequence.'
  )
  parser.add_argument(
      '--steps', type=int, default=2, help='Steps run per attempt.'
  )
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank.')
  parser.add_argument(
      '--param-dtype', default='bfloat16', choices=('float32', 'bfloat16')
  )
  parser.add_argument(
      '--compute-dtype',
      default=None,
      choices=('float32', 'bfloat16'),
      help='Default: the parameter dtype.',
  )
  parser.add_argument(
      '--no-remat', action='store_true', help='Do not rematerialise the blocks.'
  )
  parser.add_argument('--remat-policy', default='nothing_saveable')
  parser.add_argument(
      '--no-scan',
      action='store_true',
      help='Python list of blocks instead of nnx.scan.',
  )
  parser.add_argument('--attention', default='xla', choices=('xla', 'cudnn'))
  parser.add_argument(
      '--moment-dtype',
      default='float32',
      choices=('float32', 'param'),
      help='Optimizer moments in float32 or in the parameter '
      "dtype (optax's rule).",
  )
  parser.add_argument(
      '--estimate-only',
      action='store_true',
      help='Compile only (no allocation); works on CPU.',
  )
  parser.add_argument(
      '--keep-going',
      action='store_true',
      help='Try larger presets after a failure.',
  )
  parser.add_argument(
      '--timeout', type=float, default=1800.0, help='Seconds per attempt.'
  )
  parser.add_argument(
      '--mem-fraction',
      type=float,
      default=None,
      help='XLA_PYTHON_CLIENT_MEM_FRACTION for the attempts '
      '(default: inherited, else 0.95).',
  )
  parser.add_argument('--json', default=None, help='Write results here.')
  parser.add_argument('--attempt', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--attempt-out', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.attempt is not None:  # Child process: one attempt.
    result = attempt(AttemptSpec(**json.loads(args.attempt)))
    with open(args.attempt_out, 'w') as f:
      json.dump(result, f, default=str)
    return [result]

  base = AttemptSpec(
      preset=(args.presets or [args.layers_at or '7b'])[0],
      optimizer=args.optimizers[0],
      batch=args.batch,
      seq_len=args.seq_len,
      steps=0 if args.estimate_only else args.steps,
      rank=args.rank,
      param_dtype=args.param_dtype,
      compute_dtype=args.compute_dtype or args.param_dtype,
      remat=not args.no_remat,
      remat_policy=args.remat_policy,
      scan_layers=not args.no_scan,
      attention=args.attention,
      moment_dtype=args.moment_dtype,
      estimate_only=args.estimate_only,
  )
  kwargs = dict(timeout=args.timeout, mem_fraction=args.mem_fraction)
  print(
      f'batch {args.batch} x seq {args.seq_len}; params '
      f'{base.param_dtype}, remat {base.remat}, scan {base.scan_layers}, '
      f'moments {base.moment_dtype}, rank {args.rank}'
      + ('; compile-only estimates' if args.estimate_only else '')
  )
  results: list[dict[str, Any]] = []
  for name in args.optimizers:
    spec = dataclasses.replace(base, optimizer=name)
    if args.presets:
      results += search_presets(
          spec, args.presets, stop_after_failure=not args.keep_going, **kwargs
      )
    if args.layers_at:
      results += search_layers(
          dataclasses.replace(spec, preset=args.layers_at),
          args.min_layers,
          args.max_layers,
          **kwargs,
      )
  print()
  print(format_table(results))
  print()
  for name, r in largest_fitting(results).items():
    spec = r['spec']
    print(
        f'largest that fits with {name}: {spec["preset"]}'
        + (f' at {spec["n_layers"]} layers' if spec['n_layers'] else '')
        + f' ({_count(r["param_count"])} parameters), batch '
        f'{spec["batch"]} x seq {spec["seq_len"]}'
    )
  if args.json:
    from examples.llama.train import write_json

    write_json(results, args.json)
  return results


if __name__ == '__main__':
  main()
