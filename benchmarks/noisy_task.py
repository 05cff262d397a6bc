"""A small task whose gradients are mostly noise: where MLorc's options may hurt.

Issue #18 asks that a default option "must not lose on either benchmark or
on a small noisy-gradient task": an option that helps a language model,
whose gradients keep their directions for many steps, may hurt where they do
not. The complement of the first moment (``complement=``) is the case in
point: it gives every direction outside the rank-r subspace a momentum-free
step, which on noisy gradients is a step along the noise.

The task, synthetic and exactly repeatable:

* **Data.** ``x ~ N(0, I_d)``; labels drawn from the softmax of a random
  teacher MLP (``d -> teacher_width -> classes``, tanh) at temperature
  ``temperature``: the labels are noisy (the teacher's own cross-entropy,
  printed as the noise floor, is far above 0), so a batch's gradient is
  mostly noise. Separate draws for training (``train``), tuning (``val``,
  which picks each method's rate) and the reported test set (``test``).
* **Model.** A student MLP ``d -> width -> width -> classes`` (ReLU), its
  three kernels the matrices MLorc compresses.
* **Training.** ``steps`` steps of ``batch`` examples, the method at rate 1
  times a constant rate (warmup then constant), decoupled weight decay as in
  the Shakespeare benchmark. Two regimes: ``--train 0`` (the default) draws
  fresh examples every step, so the test cross-entropy above the noise floor
  measures optimization under noisy gradients alone; ``--train N`` samples
  batches from N fixed examples, where the final training loss measures how
  far each method minimizes a fixed objective from noisy minibatch
  gradients (and the test loss mixes in overfitting).
* **Methods** are the Shakespeare benchmark's specs
  (:mod:`benchmarks.shakespeare.methods`: ``mlorc_adamw_r4:complement=0``
  and so on). Each method's rate is chosen on the tuning set (test
  cross-entropy of seed 0 over ``lr x lr_multipliers``), then ``seeds``
  runs at that rate report the final training loss (on the whole training
  set), test cross-entropy and test accuracy, with paired differences to
  AdamW's run of the same seed (same data order, same initial weights).

All runs of one method (every rate, then every seed) are one compiled
program: ``jax.vmap`` over runs, ``lax.scan`` over steps. The default
configuration takes a few minutes on a 2-core CPU; ``--preset tiny`` runs
in CI.

Usage::

  python -m benchmarks.noisy_task --json benchmarks/results/noisy_task/cpu.json \\
      --table benchmarks/results/noisy_task/cpu.md
  python -m benchmarks.noisy_task --preset tiny  # CI
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from benchmarks.shakespeare import methods as methods_lib
from benchmarks.shakespeare import train as shakespeare_train
from benchmarks.toolkit import environment
from benchmarks.toolkit import results as results_lib

#: The comparison by default: AdamW and Lion against MLorc at the library
#: defaults (complement 1, oversample 4), the paper's Algorithm 1, and the
#: options that act on the first moment or the update size.
DEFAULT_METHODS = (
    'adamw',
    'mlorc_adamw_r4',
    'mlorc_adamw_r4:b1=0.8,complement=0,oversample=0,update_bound=none',
    'mlorc_adamw_r4:complement=0,oversample=0',
    'mlorc_adamw_r4:complement=0.3',
    'mlorc_adamw_r4:oversample=0',
    'lion',
    'mlorc_lion_r4',
    'mlorc_lion_r4:complement=0,oversample=0',
)


@dataclasses.dataclass(frozen=True)
class Config:
  """A small noisy-gradient classification task for every method."""

  preset: Literal['default', 'tiny'] = 'default'
  """'tiny' shrinks everything for CI (a few seconds a method)."""
  methods: tuple[str, ...] = DEFAULT_METHODS
  """Method specs (benchmarks/shakespeare/methods.py)."""
  dim: int = 64
  """Input dimension d."""
  classes: int = 10
  """Number of classes."""
  teacher_width: int = 64
  """Hidden width of the teacher MLP."""
  temperature: float = 1.0
  """Teacher softmax temperature: larger, noisier labels."""
  width: int = 256
  """Hidden width of the student MLP."""
  train: int = 0
  """Training examples; 0: fresh examples every step (online)."""
  val: int = 4096
  """Tuning examples (pick each method's rate)."""
  test: int = 16384
  """Test examples (reported)."""
  batch: int = 32
  """Examples per step."""
  steps: int = 2000
  """Training steps."""
  warmup: int = 100
  """Linear warmup steps, then a constant rate."""
  lr_multipliers: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
  """The tuning grid, times each method's reference rate."""
  seeds: tuple[int, ...] = (0, 1, 2)
  """Seeds of the reported runs (initial weights, data order, sketches)."""
  json: str | None = None
  """Write the results here."""
  table: str | None = None
  """Write the markdown table here."""

  def resolved(self) -> Config:
    if self.preset == 'tiny':
      return dataclasses.replace(
          self, preset='default', width=32, val=256, test=512,
          steps=60, warmup=5, lr_multipliers=(0.5, 2.0), seeds=(0, 1),
          methods=('adamw', 'mlorc_adamw_r4',
                   'mlorc_adamw_r4:complement=0,oversample=0',
                   'mlorc_lion_r4'))
    return self


@dataclasses.dataclass(frozen=True)
class Task:
  """The teacher, the drawn splits (numpy) and the teacher's noise floor."""

  teacher: tuple[np.ndarray, np.ndarray]
  temperature: float
  x: dict[str, np.ndarray]
  y: dict[str, np.ndarray]
  noise_floor: float

  def teacher_logits(self, x: Any) -> Any:
    """The teacher's logits (numpy or jax arrays)."""
    w1, w2 = self.teacher
    lib = np if isinstance(x, np.ndarray) else jnp
    return lib.tanh(x @ w1) @ w2 / self.temperature

  def draw(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``n`` fresh examples (the online regime's batches)."""
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, self.teacher[0].shape[0]))
    return x, jax.random.categorical(ky, self.teacher_logits(x))


def make_task(cfg: Config) -> Task:
  """Draws the teacher and the fixed splits (seed 12345)."""
  rng = np.random.default_rng(12345)
  teacher = (
      (rng.normal(size=(cfg.dim, cfg.teacher_width)) / np.sqrt(cfg.dim)
       ).astype(np.float32),
      (rng.normal(size=(cfg.teacher_width, cfg.classes)) * 3.0
       / np.sqrt(cfg.teacher_width)).astype(np.float32))
  task = Task(teacher, cfg.temperature, {}, {}, 0.0)
  floor = 0.0
  for name in ('train', 'val', 'test'):
    x = rng.normal(size=(getattr(cfg, name), cfg.dim)).astype(np.float32)
    logits = task.teacher_logits(x)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random(size=(len(x), 1))
    task.y[name] = np.minimum((p.cumsum(-1) < u).sum(-1), cfg.classes - 1)
    task.x[name] = x
    if name == 'test':
      floor = float(-np.mean(np.log(p[np.arange(len(x)), task.y[name]])))
  return dataclasses.replace(task, noise_floor=floor)


def init_params(cfg: Config, seed: int) -> dict[str, Any]:
  """The student's weights (He-initialised kernels, zero biases)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  sizes = [(cfg.dim, cfg.width), (cfg.width, cfg.width),
           (cfg.width, cfg.classes)]
  return {f'dense{i}': {
      'kernel': jax.random.normal(k, s) * jnp.sqrt(2.0 / s[0]),
      'bias': jnp.zeros(s[1])} for i, (k, s) in enumerate(zip(keys, sizes))}


def logits_of(params: Any, x: jax.Array) -> jax.Array:
  h = x
  for i in range(3):
    h = h @ params[f'dense{i}']['kernel'] + params[f'dense{i}']['bias']
    if i < 2:
      h = jax.nn.relu(h)
  return h


def cross_entropy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits_of(params, x), y))


def accuracy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits_of(params, x), -1) == y)


def optimizer(method: methods_lib.Method, cfg: Config
              ) -> optax.GradientTransformationExtraArgs:
  """The method at rate 1, the warmup, then x ``lr`` (an update argument)."""
  return optax.chain(
      method.build(),
      optax.scale_by_schedule(optax.linear_schedule(
          1.0 / cfg.warmup, 1.0, cfg.warmup)),
      shakespeare_train.scale_by_lr_argument())


def train_runs(method: methods_lib.Method, runs: Sequence[tuple[float, int]],
               task: Task, cfg: Config) -> list[dict[str, Any]]:
  """Trains ``(lr, seed)`` runs of ``method`` together and scores them."""
  tx = optimizer(method, cfg)
  seeds = [seed for _, seed in runs]
  params = jax.jit(jax.vmap(functools.partial(init_params, cfg)))(
      jnp.asarray(seeds))
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     params)
  axes = methods_lib.batch_axes(jax.eval_shape(tx.init, one))
  state = shakespeare_train.seed_sketches(
      jax.jit(jax.vmap(tx.init, out_axes=axes))(params), seeds)
  lrs = jnp.asarray([lr for lr, _ in runs], jnp.float32)
  if cfg.train:  # batch indices into the fixed training set
    order = jnp.asarray(np.stack([np.random.default_rng(seed).integers(
        0, cfg.train, size=(cfg.steps, cfg.batch)) for seed in seeds], 1))
  else:  # a key per step and run: fresh examples
    order = jax.vmap(lambda s: jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(s), 1), cfg.steps), out_axes=1)(
            jnp.asarray(seeds))
  x_train, y_train = jnp.asarray(task.x['train']), jnp.asarray(
      task.y['train'])

  def step(params, state, batch, lr):
    if cfg.train:
      x, y = x_train[batch], y_train[batch]
    else:
      x, y = task.draw(batch, cfg.batch)
    loss, grads = jax.value_and_grad(cross_entropy)(params, x, y)
    updates, state = tx.update(grads, state, params, lr=lr)
    return optax.apply_updates(params, updates), state, loss

  lanes = jax.vmap(step, in_axes=(0, axes, 0, 0), out_axes=(0, axes, 0))

  @jax.jit
  def run(params, state, order, lrs):
    def body(carry, idx):
      params, state, loss = lanes(*carry, idx, lrs)
      return (params, state), loss
    (params, state), losses = jax.lax.scan(body, (params, state), order)
    return params, losses

  clock = time.perf_counter()
  params, losses = run(params, state, order, lrs)
  seconds = time.perf_counter() - clock
  scores = {}
  for split in ('train', 'val', 'test') if cfg.train else ('val', 'test'):
    x, y = jnp.asarray(task.x[split]), jnp.asarray(task.y[split])
    scores[f'{split}_loss'] = np.asarray(jax.vmap(
        lambda p: cross_entropy(p, x, y))(params))
    scores[f'{split}_accuracy'] = np.asarray(jax.vmap(
        lambda p: accuracy(p, x, y))(params))
  last = np.asarray(jnp.mean(losses[-max(1, cfg.steps // 10):], axis=0))
  out = []
  for i, (lr, seed) in enumerate(runs):
    record = {'method': method.spec, 'lr': lr, 'seed': seed,
              'seconds': seconds, 'last_batch_loss': _finite(last[i])}
    record.update({k: _finite(v[i]) for k, v in scores.items()})
    record.setdefault('train_loss', record['last_batch_loss'])
    out.append(record)
  return out


def _finite(x: Any) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None


def run(cfg: Config, log: Any = print) -> dict[str, Any]:
  """Tunes every method's rate, then runs its seeds; returns all records."""
  cfg = cfg.resolved()
  methods = [methods_lib.parse(spec) for spec in cfg.methods]
  task = make_task(cfg)
  log(f'noise floor (teacher test cross-entropy): {task.noise_floor:.4f}')
  tuning, final = [], []
  for method in methods:
    grid = [method.lr * m for m in cfg.lr_multipliers]
    tuned = train_runs(method, [(lr, cfg.seeds[0]) for lr in grid], task, cfg)
    tuning += tuned
    scored = [r for r in tuned if r['val_loss'] is not None]
    best = min(scored, key=lambda r: r['val_loss'])['lr'] if scored else grid[0]
    if best in (grid[0], grid[-1]) and len(grid) > 1:
      log(f'{method.spec}: the tuned rate {best:g} is at the edge of the grid')
    runs = train_runs(method, [(best, s) for s in cfg.seeds], task, cfg)
    final += runs
    log(f'{method.spec}: lr {best:g}, test CE '
        + ' '.join(f'{r["test_loss"]:.4f}' for r in runs if r['test_loss'])
        + ', train loss '
        + ' '.join(f'{r["train_loss"]:.4f}' for r in runs if r['train_loss'])
        + ('' if cfg.train else ' (online: the last tenth of the batches)'))
  rows = summarize(final, [m.spec for m in methods])
  return dict(config=dataclasses.asdict(cfg), noise_floor=task.noise_floor,
              device=environment.device_description(),
              versions=environment.versions(), tuning=tuning, final=final,
              rows=rows)


def summarize(final: Sequence[dict[str, Any]],
              order: Sequence[str]) -> list[dict[str, Any]]:
  """Per method: means over seeds and paired differences to AdamW's."""
  base = {r['seed']: r for r in final if r['method'] == 'adamw'}
  rows = []
  for spec in order:
    runs = [r for r in final if r['method'] == spec]
    row: dict[str, Any] = {'method': spec, 'lr': runs[0]['lr'],
                           'seeds': len(runs)}
    for key in ('train_loss', 'test_loss', 'test_accuracy'):
      values = [r[key] for r in runs if r[key] is not None]
      row[key], row[f'{key}_std'] = results_lib.mean_std(values)
      diffs = [r[key] - base[r['seed']][key] for r in runs
               if r['seed'] in base and r[key] is not None
               and base[r['seed']][key] is not None]
      row[f'{key}_vs_adamw'], row[f'{key}_vs_adamw_std'] = (
          results_lib.mean_std(diffs) if base and spec != 'adamw'
          else (None, None))
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict[str, Any]], online: bool) -> str:
  """Means ± sample std over seeds; paired differences signed.

  ``online``: the training loss is the mean over the last tenth of the
  batches (fresh examples), not the loss on a fixed training set.
  """
  column = results_lib.Column

  def pm(key, fmt):
    def cell(r):
      if r[key] is None:
        return None
      text = format(r[key], fmt)
      std = r[f'{key}_std']
      return text if std is None else f'{text} ± {abs(std):.4f}'
    return cell

  return results_lib.markdown_table(rows, [
      column('method', 'method'),
      column('lr', 'lr', '.2g'),
      column(pm('train_loss', '.4f'),
             'last 10% of batches, loss' if online else 'final train loss'),
      column(pm('train_loss_vs_adamw', '+.4f'), 'vs AdamW (paired)'),
      column(pm('test_loss', '.4f'), 'test CE'),
      column(pm('test_loss_vs_adamw', '+.4f'), 'vs AdamW (paired)'),
      column(pm('test_accuracy', '.4f'), 'test accuracy'),
      column(pm('test_accuracy_vs_adamw', '+.4f'), 'vs AdamW (paired)'),
  ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  environment.configure_xla()
  cfg = tyro.cli(Config, args=argv)
  out = run(cfg)
  table = format_table(out['rows'], online=not cfg.train)
  print(f'\nnoise floor {out["noise_floor"]:.4f}\n{table}')
  results_lib.write_outputs(
      out, table, json_path=cfg.json, table_path=cfg.table,
      header=(f'{environment.device_line(out["device"])}; noise floor '
              f'(teacher test CE) {out["noise_floor"]:.4f}'))
  return out


if __name__ == '__main__':
  main()
