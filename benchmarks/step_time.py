"""Optimizer step time and memory: MLorc against optax's optimizers.

Each measurement is one jitted optimizer step (``tx.update`` then
``optax.apply_updates``; parameters and state donated) on a tree of
LLaMA-7B-shaped matrices, with fixed random gradients:

* ``llama7b_L1`` / ``llama7b_L8``: per layer 4 x ``4096 x 4096`` (q, k, v,
  o), 2 x ``4096 x 11008`` (gate, up) and 1 x ``11008 x 4096`` (down),
  each stacked over ``L`` layers as ``[L, m, n]`` (how scanned models store
  them; MLorc treats ``L`` as a batch of matrices);
* ``small_32x1024x2816``: 32 matrices of ``1024 x 2816`` stacked, to expose
  per-matrix overhead;
* ``minilm_L6_unstacked``: the 36 matrices of MiniLM-L6 (the fine-tuning
  example's model), each its own leaf, as in an unstacked model: a step
  bound by the fixed cost of each launch;
* ``bert_vocab``: one ``30522 x 384`` matrix, MiniLM's word embedding
  (compressed when ``low_rank_mask=`` includes it): no power-of-two tile
  divides its rows, so the kernels take it zero-padded to whole tiles;
* ``tiny``: a few small matrices, for CI.

Optimizers: ``adamw``, ``lion``, ``adafactor`` (optax), ``mlorc_adamw`` and
``mlorc_lion`` at each ``--ranks`` rank, with options of their factories as
``NAME:KEY=VALUE,...`` (``mlorc_adamw:complement=1.0,oversample=4``;
:mod:`benchmarks.toolkit.method_options`) (``mlorc_adamw_reference``,
``_xla`` and ``_pallas`` force one implementation of the step;
``mlorc_lion_reference``, ``_xla`` and ``_pallas`` likewise for Lion), and
``optax.contrib.galore`` (same
ranks, AdamW inside) amortised over its projection gap: ``(t_svd + (gap - 1)
t_step) / gap``, with ``t_svd`` the step that recomputes the projectors (one warm call timed). GaLore
cannot treat a leading axis as a batch, so it gets the same matrices as a list
of ``[m, n]`` leaves.

Reported per configuration: median warm step time (``block_until_ready``
after each call), its ratio to ``optax.adamw``'s in the same run and dtype,
XLA's compiled memory (``memory_analysis()``: temporaries, and the step's
estimated peak, :func:`benchmarks.toolkit.memory.compiled_memory`),
optimizer-state bytes and, with ``--isolate`` (one process per
configuration; the device's peak counter never resets), the device's
``peak_bytes_in_use``. Writes JSON, a markdown table and a plot of step time
against parameter count.

Usage (GPU; both dtypes in parallel on two GPUs, or one after the other)::

  python -m benchmarks.step_time --cases llama7b_L1 llama7b_L8 \\
      small_32x1024x2816 --dtypes float32 --isolate \\
      --json benchmarks/results/step_time/h100_float32.json
  python -m benchmarks.step_time --cases tiny --dtypes float32  # CPU, CI
  python -m benchmarks.step_time --cases llama7b_L8 --calls 0 \\
      --optimizers mlorc_adamw mlorc_lion  # compiled memory only
  python -m benchmarks.step_time --render RESULTS.json ... --table T.md \\
      --plot P.png  # re-render saved results, measuring nothing
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
import tyro

import mlorc_optax
from benchmarks.toolkit import environment
from benchmarks.toolkit import figures
from benchmarks.toolkit import isolation
from benchmarks.toolkit import memory
from benchmarks.toolkit import method_options
from benchmarks.toolkit import results as results_lib
from benchmarks.toolkit import timing

#: Matrices per case: (name, count, (m, n)) stacked as [count, m, n].
LLAMA7B_LAYER = (
    ('wq', (4096, 4096)),
    ('wk', (4096, 4096)),
    ('wv', (4096, 4096)),
    ('wo', (4096, 4096)),
    ('w_gate', (4096, 11008)),
    ('w_up', (4096, 11008)),
    ('w_down', (11008, 4096)),
)

#: The matrices of a MiniLM-L6 layer (BERT-style, hidden 384): the model of
#: ``examples/finetune``.
MINILM_LAYER = (
    ('query', (384, 384)),
    ('key', (384, 384)),
    ('value', (384, 384)),
    ('attention_out', (384, 384)),
    ('intermediate', (384, 1536)),
    ('output', (1536, 384)),
)

#: Cases whose layers are separate leaves, as in an unstacked (not scanned)
#: model, for every optimizer.
UNSTACKED = ('minilm_L6_unstacked',)

CASES: dict[str, tuple[int, tuple[tuple[str, tuple[int, int]], ...]]] = {
    'llama7b_L1': (1, LLAMA7B_LAYER),
    'llama7b_L8': (8, LLAMA7B_LAYER),
    'small_32x1024x2816': (32, (('w', (1024, 2816)),)),
    'tiny': (2, (('wq', (64, 64)), ('w_up', (64, 160)), ('w_down', (160, 64)))),
    'minilm_L6_unstacked': (6, MINILM_LAYER),
    'bert_vocab': (1, (('vocab', (30522, 384)),)),
}

#: ``mlorc_adamw`` and ``mlorc_lion`` pick their implementation
#: automatically (the two-pass Pallas step on one NVIDIA GPU, the reference
#: step elsewhere); the suffixed names force one (``implementation=`` of
#: :func:`mlorc_optax.mlorc_adamw` / :func:`mlorc_optax.mlorc_lion`).
MLORC_ADAMW_IMPLEMENTATIONS = ('mlorc_adamw_reference', 'mlorc_adamw_xla',
                               'mlorc_adamw_pallas')
MLORC_LION_IMPLEMENTATIONS = ('mlorc_lion_reference', 'mlorc_lion_xla',
                              'mlorc_lion_pallas')
#: The default step with every leaf launched on its own
#: (``KernelConfig(group_max_elements=0)``): what equal-shaped leaves sharing
#: one launch saves.
MLORC_ALONE = ('mlorc_adamw_alone', 'mlorc_lion_alone')
OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'mlorc_adamw', 'mlorc_lion',
              'galore', *MLORC_ADAMW_IMPLEMENTATIONS,
              *MLORC_LION_IMPLEMENTATIONS, *MLORC_ALONE)
LOW_RANK = ('mlorc_adamw', 'mlorc_lion', 'galore',
            *MLORC_ADAMW_IMPLEMENTATIONS, *MLORC_LION_IMPLEMENTATIONS,
            *MLORC_ALONE)
GALORE_GAP = 200

# The command line's choices, from the tables above.
Case = Literal[tuple(CASES)]  # pytype: disable=invalid-annotation


@dataclasses.dataclass(frozen=True)
class Config:
  """Optimizer step time and memory: MLorc against optax's optimizers."""

  cases: tuple[Case, ...] = ('tiny',)
  """Parameter trees."""
  dtypes: tuple[Literal['float32', 'bfloat16'], ...] = ('float32',)
  """Parameter (and gradient) dtypes."""
  optimizers: tuple[str, ...] = OPTIMIZERS[:6]
  """Optimizers to measure: names of OPTIMIZERS, the MLorc ones with
  options of their factory as NAME:KEY=VALUE,... (e.g.
  mlorc_adamw:complement=1.0)."""
  ranks: tuple[int, ...] = (4, 32)
  """Ranks of the low-rank optimizers."""
  galore_ranks: tuple[int, ...] | None = None
  """Ranks of GaLore (default: --ranks)."""
  calls: int = 10
  """Timed calls per configuration (median); 0 compiles only: XLA's memory
  analysis and the state's size, no time."""
  warmup: int = 2
  """Untimed calls after compiling."""
  isolate: bool = False
  """One process per configuration (exact device peak; OOM-safe)."""
  timeout: float = 300
  """Seconds per isolated configuration."""
  json: str | None = None
  """Write the results here (after every configuration)."""
  table: str | None = None
  """Write the markdown table here."""
  plot: str | None = None
  """Write the figure here."""
  quiet: bool = False
  """Less output."""
  render: tuple[str, ...] = ()
  """Measure nothing: merge these result files and write --json, --table and
  --plot from them."""
  result_json: str | None = None
  """Write the one configuration's result here (set by --isolate's parent)."""


def param_count(case: str) -> int:
  layers, mats = CASES[case]
  return layers * sum(m * n for _, (m, n) in mats)


def _with_default_tilings(*entries: Any) -> Any:
  """The default :class:`~mlorc_optax.kernels.KernelConfig` with these
  :class:`~mlorc_optax.kernels.PassTiling` entries in place of the defaults'
  for the same pass, gradient width and ``min_width``."""
  keys = {(e.kernel, e.itemsize, e.min_width) for e in entries}
  default = mlorc_optax.kernels.KernelConfig().pass_tilings
  return mlorc_optax.kernels.KernelConfig(pass_tilings=entries + tuple(
      e for e in default if (e.kernel, e.itemsize, e.min_width) not in keys))


#: Kernel settings an MLorc option may name
#: (``mlorc_adamw:kernel_config=uniform_tiling``), each the default
#: :class:`~mlorc_optax.kernels.KernelConfig` but for its precisions or
#: tiling: ``uniform_tiling``, every pass in the same tiles (as before
#: per-pass tilings existed); ``tf32_sketches``, pass 1's sketches at TF32
#: (as before bfloat16 sketches); ``tf32_projections``, pass 2's projections
#: at TF32; ``exact_pass1_tf32_projections``, that and pass 1's
#: reconstruction at float32 level (the defaults before the eighth session).
KERNEL_CONFIGS = {
    'uniform_tiling': mlorc_optax.kernels.KernelConfig(pass_tilings=()),
    'tf32_sketches': mlorc_optax.kernels.KernelConfig(sketch_precision='tf32'),
    'tf32_projections': mlorc_optax.kernels.KernelConfig(
        project_precision='tf32'),
    'exact_pass1_tf32_projections': mlorc_optax.kernels.KernelConfig(
        sketch_reconstruct_precision='tf32x3', project_precision='tf32'),
    'project_2_stages': mlorc_optax.kernels.KernelConfig(
        pass_tilings=tuple(
            e._replace(num_stages=2) if e.kernel == 'mlorc_adam_project'
            else e for e in mlorc_optax.kernels.KernelConfig().pass_tilings)),
    # The ninth session's defaults: one tiling per pass and dtype, whatever
    # the sketch width.
    'width_blind_tilings': mlorc_optax.kernels.KernelConfig(
        pass_tilings=mlorc_optax.kernels.KernelConfig().pass_tilings[:1]),
    # The fastest tilings of the tenth session's sweep of MLorc-AdamW's
    # passes (8 x 4096 x 11008, r=4; benchmarks/README.md), for every sketch
    # width, with today's other default entries.
    'swept_tilings': _with_default_tilings(
        mlorc_optax.kernels.PassTiling('mlorc_adam_sketch', 2, 128, 32, 4, 3),
        mlorc_optax.kernels.PassTiling('mlorc_adam_sketch', 4, 128, 32, 4, 3),
        mlorc_optax.kernels.PassTiling('mlorc_adam_project', 2, 64, 32, 2, 3),
        mlorc_optax.kernels.PassTiling('mlorc_adam_project', 4, 32, 64, 2,
                                       3)),
    'target_programs_8192': mlorc_optax.kernels.KernelConfig(
        target_programs=8192),
    # Both passes 2 with sketches under 64 columns (the default tiling of
    # each, at 16 columns) aiming for 4096 or 8192 programs
    # (PassTiling.target_programs), the others at the config's 2048.
    **{f'project_programs_{n}': _with_default_tilings(*(
        mlorc_optax.kernels.KernelConfig().tiling(kernel, dtype, 16)._replace(
            target_programs=n)
        for kernel in ('mlorc_adam_project', 'mlorc_lion_project')
        for dtype in (jnp.bfloat16, jnp.float32))) for n in (4096, 8192)},
    'plain_math': mlorc_optax.kernels.KernelConfig(fast_math=False),
}


def make_optimizer(name: str, rank: int | None) -> optax.GradientTransformation:
  """The optimizer called ``name`` (see :data:`OPTIMIZERS`) at ``rank``.

  An MLorc name may carry options of its factory after a colon
  (``mlorc_adamw:complement=1.0,oversample=4``; ``kernel_config`` by a name
  of :data:`KERNEL_CONFIGS`); the tool sets the learning rate and the rank
  itself.
  """
  lr = 1e-4
  base, options = method_options.split(name)
  if base not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}.')
  if options and not base.startswith('mlorc_'):
    raise ValueError(f'optimizer {name!r}: only the MLorc optimizers take '
                     'options.')
  implementation = base.rsplit('_', 1)[-1]
  if base in ('adamw', 'lion', 'adafactor'):
    return getattr(optax, base)(lr)
  if base == 'galore':
    return optax.contrib.galore(lr, rank=rank, update_proj_gap=GALORE_GAP)
  make = (mlorc_optax.mlorc_lion if base.startswith('mlorc_lion')
          else mlorc_optax.mlorc_adamw)
  kwargs = method_options.parse_options(
      name, make, fixed=('learning_rate', 'rank', 'implementation'),
      aliases={'kernel_config': KERNEL_CONFIGS})
  if base in MLORC_ALONE:
    kwargs['kernel_config'] = mlorc_optax.kernels.KernelConfig(
        group_max_elements=0)
  elif implementation in mlorc_optax.plan.IMPLEMENTATIONS:
    kwargs['implementation'] = implementation
  return make(lr, rank=rank, **kwargs)


def implementation_of(tx: Any, params: Any) -> str:
  """Which step the compressed leaves take (for the JSON record).

  Read from the transform's own plan (:func:`mlorc_optax.compression_plan`,
  made once in ``init``): the steps of the compressed leaves, e.g.
  ``'pallas'``, or ``'pallas+xla'`` when some matrix cannot be tiled.
  """
  plan = mlorc_optax.compression_plan(tx, params)
  steps = {p.step for p in jax.tree.leaves(plan) if p.compressed}
  return '+'.join(sorted(steps)) or 'dense'


def make_tree(case: str, dtype: str, seed: int, as_list: bool) -> Any:
  """Random arrays of ``case`` (stacked, or a list of matrices if as_list)."""
  layers, mats = CASES[case]
  keys = iter(jax.random.split(jax.random.key(seed), len(mats) * layers))

  def draw(shape):
    return jax.jit(lambda k: 0.02 * jax.random.normal(k, shape, dtype))(
        next(keys))

  if as_list:
    return {name: [draw((m, n)) for _ in range(layers)]
            for name, (m, n) in mats}
  return {name: draw((layers, m, n)) for name, (m, n) in mats}


def make_problem(case: str, dtype: str, optimizer: str, rank: int | None
                 ) -> tuple[optax.GradientTransformation, Any, Any]:
  """``(tx, params, grads)`` of one configuration: GaLore (which cannot
  treat a leading axis as a batch) and the unstacked cases get lists of
  matrices."""
  tx = make_optimizer(optimizer, rank)
  as_list = optimizer == 'galore' or case in UNSTACKED
  return (tx, make_tree(case, dtype, 0, as_list),
          make_tree(case, dtype, 1, as_list))


def optimizer_step(tx, params, state, grads, count=None):
  """One optimizer step; ``count`` pins the step counter (GaLore's SVD)."""
  if count is not None:
    state = optax.tree_utils.tree_set(state, count=count)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def measure(case: str, dtype: str, optimizer: str, rank: int | None,
            calls: int, warmup: int) -> dict[str, Any]:
  """Times one configuration in this process."""
  result: dict[str, Any] = dict(
      case=case, dtype=dtype, optimizer=optimizer, rank=rank,
      params=param_count(case), backend=jax.default_backend(),
      device=jax.local_devices()[0].device_kind, jax_version=jax.__version__,
      optax_version=optax.__version__,
      mlorc_optax_source=environment.library_source(), status='error',
      error=None)
  try:
    tx, params, grads = make_problem(case, dtype, optimizer, rank)
    if optimizer.startswith('mlorc_'):
      result['implementation'] = implementation_of(tx, params)
    state = tx.init(params)
    result['param_bytes'] = memory.tree_bytes(params)
    result['opt_state_bytes'] = memory.tree_bytes(state)
    # GaLore: a step that keeps the projectors; its SVD step is timed apart.
    count = jnp.asarray(1, jnp.int32) if optimizer == 'galore' else None
    start = time.perf_counter()
    compiled = jax.jit(functools.partial(optimizer_step, tx),
                       donate_argnums=(0, 1)
                       ).lower(params, state, grads, count).compile()
    result['compile_s'] = time.perf_counter() - start
    analysis = memory.compiled_memory(compiled)
    if analysis is not None:
      result['temp_bytes'] = analysis.get('temp_size_in_bytes')
      result['estimated_peak_bytes'] = analysis['estimated_peak_bytes']
    if calls == 0:  # compile only
      result['status'] = 'ok'
      return result
    times, carry = timing.time_steps(
        lambda c: compiled(*c, grads, count), (params, state), calls=calls,
        warmup=warmup)
    result['step_s'], result['step_min_s'] = times.median_s, times.min_s
    if optimizer == 'galore':
      svd_count = jnp.asarray(0, jnp.int32)
      svd, carry = timing.time_steps(
          lambda c: compiled(*c, grads, svd_count), carry, calls=1, warmup=1)
      result['svd_step_s'] = svd.median_s
      result['regular_step_s'] = result['step_s']
      result['step_s'] = (svd.median_s + (GALORE_GAP - 1) * times.median_s
                          ) / GALORE_GAP
    result['peak_bytes'] = memory.device_peak_bytes()
    result['status'] = 'ok'
  except Exception as e:  # pylint: disable=broad-except
    result['error'] = f'{type(e).__name__}: {e}'[:500]
    result['status'] = 'oom' if memory.is_oom(e) else 'error'
  return result


def measure_isolated(case: str, dtype: str, optimizer: str, rank: int | None,
                     calls: int, warmup: int,
                     timeout: float | None) -> dict[str, Any]:
  """:func:`measure` in a fresh process (exact device peak; OOM-safe)."""
  argv = ['--cases', case, '--dtypes', dtype, '--optimizers', optimizer,
          '--calls', str(calls), '--warmup', str(warmup), '--quiet']
  if rank is not None:
    argv += ['--ranks', str(rank)]
  out = isolation.run_isolated('benchmarks.step_time', argv, timeout=timeout)
  if 'status' in out:
    return out
  return dict(case=case, dtype=dtype, optimizer=optimizer, rank=rank,
              params=param_count(case), status='error', error=out['error'])


def _ok(key: str):
  """A table cell that shows ``key`` of successful rows only."""
  return lambda r: r.get(key) if r['status'] == 'ok' else None


def _temp_per_param(r: dict[str, Any]) -> float | None:
  temp, params = _ok('temp_bytes')(r), r.get('param_bytes')
  return None if temp is None or not params else temp / params


TABLE = (
    results_lib.Column('case', 'case'),
    results_lib.Column('dtype', 'dtype'),
    results_lib.Column('optimizer', 'optimizer'),
    results_lib.Column('rank', 'rank'),
    results_lib.Column(lambda r: r['status'] if r['status'] == 'ok' else
                       f'{r["status"]}: {str(r["error"])[:60]}', 'status'),
    results_lib.Column(_ok('step_s'), 'step ms', lambda s: f'{1e3 * s:.2f}'),
    results_lib.Column(_ok('ratio_vs_adamw'), 'ratio vs adamw', '.2f'),
    results_lib.Column(_ok('temp_bytes'), 'temp GiB', results_lib.fmt_gib),
    results_lib.Column(_temp_per_param, 'temp / params', '.2f'),
    results_lib.Column(_ok('estimated_peak_bytes'), 'estimated peak GiB',
                       results_lib.fmt_gib),
    results_lib.Column(_ok('peak_bytes'), 'device peak GiB',
                       results_lib.fmt_gib),
    results_lib.Column(_ok('opt_state_bytes'), 'state GiB',
                       results_lib.fmt_gib),
)


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """A markdown table of the results."""
  return results_lib.markdown_table(results, TABLE)


def plot(results: Sequence[dict[str, Any]], path: str) -> None:
  """Step time against parameter count, one panel per dtype (log-log)."""
  dtypes = [d for d in ('float32', 'bfloat16')
            if any(r['dtype'] == d for r in results)] or ['float32']
  with figures.panels(path, len(dtypes), figsize=(6.5 * len(dtypes), 4.2),
                      sharey=True) as axes:
    for i, (ax, dtype) in enumerate(zip(axes, dtypes)):
      points: dict[str, list[tuple[int, float]]] = {}
      for r in results:
        if r.get('step_s') is not None and r['dtype'] == dtype:
          label = r['optimizer'] + (f' r={r["rank"]}' if r['rank'] else '')
          points.setdefault(label, []).append((r['params'], 1e3 * r['step_s']))
      series = {label: tuple(zip(*sorted(pts)))
                for label, pts in sorted(points.items())}
      figures.draw_lines(ax, series, xlabel='parameters', title=dtype,
                         ylabel='optimizer step (ms)' if i == 0 else None,
                         logx=True, logy=True, marker='o',
                         legend=i == len(dtypes) - 1)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = tyro.cli(Config, args=argv)
  if cfg.render:
    return _write([r for path in cfg.render
                   for r in results_lib.read_json(path)], cfg)
  if cfg.calls < 0:
    raise ValueError(f'--calls must be >= 0 (0: compile only), got '
                     f'{cfg.calls}.')
  for optimizer in cfg.optimizers:  # a bad name or option fails at once
    make_optimizer(optimizer, cfg.ranks[0] if cfg.ranks else 4)
  environment.configure_xla()
  results = []
  for case in cfg.cases:
    for dtype in cfg.dtypes:
      for optimizer in cfg.optimizers:
        ranks = [None]
        if method_options.split(optimizer)[0] in LOW_RANK:
          ranks = cfg.ranks
          if optimizer == 'galore' and cfg.galore_ranks:
            ranks = cfg.galore_ranks
        for rank in ranks:
          if cfg.isolate:
            r = measure_isolated(case, dtype, optimizer, rank, cfg.calls,
                                 cfg.warmup, cfg.timeout)
          else:
            r = measure(case, dtype, optimizer, rank, cfg.calls, cfg.warmup)
          results.append(r)
          if cfg.json:  # after every configuration: a cut-off run keeps data
            results_lib.write_json(results, cfg.json)
          if not cfg.quiet:
            print(f'{case} {dtype} {optimizer} r={rank}: {r["status"]} '
                  + _progress(r), flush=True)
  if cfg.result_json:  # an isolated child: its one configuration
    results_lib.write_json(results[0], cfg.result_json)
  return _write(results, cfg)


def _progress(r: dict[str, Any]) -> str:
  """One configuration's result in a line: its time, or what a compile-only
  run (``--calls 0``) measured, or its error."""
  if r['status'] != 'ok':
    return str(r['error'])[:200]
  if 'step_s' in r:
    return f'{r["step_s"] * 1e3:.2f} ms'
  return f'compiled, temporaries {r["temp_bytes"] / 2**20:.1f} MiB'


def _write(results: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
  """Adds the ratios, prints and writes the outputs ``cfg`` names."""
  results_lib.add_ratios(
      results, value='step_s', group_by=('case', 'dtype'),
      baseline=lambda r: r['optimizer'] == 'adamw' and r['status'] == 'ok',
      key='ratio_vs_adamw')
  table = format_table(results)
  if not cfg.quiet:
    print(table)
  if cfg.json:
    results_lib.write_json(results, cfg.json)
  if cfg.table:
    with open(cfg.table, 'w') as f:
      f.write(table + '\n')
  if cfg.plot:
    plot(results, cfg.plot)
  return results


if __name__ == '__main__':
  main()
