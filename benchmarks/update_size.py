"""The largest update entry of MLorc-AdamW variants, as a user sees it.

A 64 x 64 linear regression (256 noisy samples, batches of 32, no weight
decay) trained with ``optax.adamw`` and ``mlorc_adamw`` at rank 4: the
paper's step (``**mlorc_optax.PAPER_ADAMW``), with the update bound, with
the complement, and the defaults (bound, complement, oversampling) with and
without the bound. Reports the largest ``|update| / lr`` over
the run, the number of steps at which it exceeded dense Adam's own bound
(``mlorc_optax.low_rank.adam_update_bound``), and the final full-batch loss.
Runs in seconds on a CPU.

Usage: python -m benchmarks.update_size [--steps 300] [--json PATH]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import mlorc_optax
from benchmarks.toolkit import environment
from benchmarks.toolkit import results

#: name -> mlorc_adamw keyword arguments (None: optax.adamw). The paper's
#: step, the bound alone, the complement with and without the bound, and the
#: defaults (bounded, complement=1, oversample=4) with and without the bound.
VARIANTS = {
    'adamw': None,
    'mlorc_adamw paper': dict(mlorc_optax.PAPER_ADAMW),
    'mlorc_adamw paper, bounded': dict(complement=0.0, oversample=0),
    'mlorc_adamw paper + complement=1': dict(update_bound=None,
                                             complement=1.0, oversample=0),
    'mlorc_adamw bounded + complement=1': dict(complement=1.0, oversample=0),
    'mlorc_adamw default, unbounded': dict(update_bound=None),
    'mlorc_adamw default': dict(),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """The largest update entry of MLorc-AdamW variants on a regression."""

  steps: int = 300
  """Training steps."""
  lr: float = 1e-2
  """Learning rate (constant)."""
  rank: int = 4
  """MLorc rank."""
  b1: float = 0.9
  """First-moment decay of every optimizer."""
  json: str | None = None
  """Write the rows (with device and versions) to this JSON file."""


def train_regression(tx: optax.GradientTransformation, *, steps: int,
                     lr: float) -> tuple[np.ndarray, float]:
  """Trains the regression; the largest ``|update| / lr`` of every step and
  the final full-batch loss."""
  key = jax.random.PRNGKey(0)
  kx, kw, kn = jax.random.split(key, 3)
  x = jax.random.normal(kx, (256, 64))
  y = x @ (jax.random.normal(kw, (64, 64)) / 8) + 0.1 * jax.random.normal(
      kn, (256, 64))
  loss = lambda p, xb, yb: jnp.mean((xb @ p['w'] - yb) ** 2)

  @jax.jit
  def step(p, state, i):
    rows = jax.random.randint(jax.random.fold_in(key, i), (32,), 0, 256)
    u, state = tx.update(jax.grad(loss)(p, x[rows], y[rows]), state, p)
    return optax.apply_updates(p, u), state, jnp.max(jnp.abs(u['w']))

  params = {'w': jnp.zeros((64, 64))}
  state = tx.init(params)
  largest = []
  for i in range(steps):
    params, state, top = step(params, state, i)
    largest.append(float(top) / lr)
  return np.array(largest), float(loss(params, x, y))


def run(tx: optax.GradientTransformation, cfg: Config) -> dict[str, float]:
  """The largest update, the steps over Adam's bound and the final loss."""
  largest, final_loss = train_regression(tx, steps=cfg.steps, lr=cfg.lr)
  bounds = np.array([
      float(mlorc_optax.low_rank.adam_update_bound(cfg.b1, 0.999, t, False))
      for t in range(1, cfg.steps + 1)])
  return dict(max_update_over_lr=float(largest.max()),
              steps_over_adam_bound=int(np.sum(largest > bounds * (1 + 1e-5))),
              final_loss=final_loss)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
  cfg = tyro.cli(Config, args=argv)
  rows = []
  for name, kwargs in VARIANTS.items():
    if kwargs is None:
      tx = optax.adamw(cfg.lr, b1=cfg.b1, weight_decay=0.0)
    else:
      tx = mlorc_optax.mlorc_adamw(cfg.lr, b1=cfg.b1, weight_decay=0.0,
                                   rank=cfg.rank, **kwargs)
    rows.append(dict(optimizer=name, **run(tx, cfg)))
  print(results.markdown_table(rows, [
      results.Column('optimizer', 'optimizer'),
      results.Column('max_update_over_lr', 'max |update| / lr', '.3f'),
      results.Column('steps_over_adam_bound', 'steps over Adam\'s bound'),
      results.Column('final_loss', 'final loss', '.5f'),
  ]))
  if cfg.json:
    results.write_json(dict(config=cfg, rows=rows,
                            device=environment.device_description(),
                            versions=environment.versions()), cfg.json)
  return rows


if __name__ == '__main__':
  main()
