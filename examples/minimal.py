"""Smallest complete example: train an MLP with optax.adamw and mlorc_adamw.

Learns a noisy low-rank linear map with a two-layer MLP (256-512-256), the
same steps and seed for both optimizers, and prints final loss and
optimizer-state bytes side by side.

Usage: python -m examples.minimal [--steps 300] [--rank 4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import mlorc_optax


def make_problem(key, d_in=256, d_hidden=512, d_out=256, true_rank=8):
  k = jax.random.split(key, 4)
  target = (jax.random.normal(k[0], (d_in, true_rank))
            @ jax.random.normal(k[1], (true_rank, d_out))) / d_in**0.5
  params = {
      'hidden': {'kernel': jax.random.normal(k[2], (d_in, d_hidden)) / d_in**0.5,
                 'bias': jnp.zeros(d_hidden)},
      'out': {'kernel': jax.random.normal(k[3], (d_hidden, d_out))
                        / d_hidden**0.5,
              'bias': jnp.zeros(d_out)},
  }
  return target, params


def loss_fn(params, x, y):
  h = jax.nn.gelu(x @ params['hidden']['kernel'] + params['hidden']['bias'])
  return jnp.mean((h @ params['out']['kernel'] + params['out']['bias'] - y) ** 2)


def train(tx, params, target, steps, key):
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    x = jax.random.normal(key, (64, target.shape[0]))
    y = x @ target + 0.01 * jax.random.normal(key, (64, target.shape[1]))
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for key in jax.random.split(key, steps):
    params, state, loss = step(params, state, key)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return float(loss), state_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300, help='Training steps.')
  parser.add_argument('--rank', type=int, default=4, help='MLorc rank.')
  parser.add_argument('--lr', type=float, default=1e-3, help='Learning rate.')
  args = parser.parse_args()
  target, params = make_problem(jax.random.key(0))
  print('| optimizer | final loss | optimizer state |')
  print('|---|---|---|')
  for name, tx in [
      ('optax.adamw', optax.adamw(args.lr)),
      (f'mlorc_adamw (r={args.rank})',
       mlorc_optax.mlorc_adamw(args.lr, b1=0.8, rank=args.rank)),
  ]:
    loss, nbytes = train(tx, params, target, args.steps, jax.random.key(1))
    print(f'| {name} | {loss:.4f} | {nbytes / 1024:,.1f} KiB |')


if __name__ == '__main__':
  main()
