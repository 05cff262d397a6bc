"""One process of the multi-host test (tests/test_multihost.py).

``python tests/multihost_worker.py --process-id I --num-processes P
--coordinator localhost:PORT --checkpoint-dir DIR --output FILE`` joins a
``jax.distributed`` job of ``P`` processes (each started with its own
``--xla_force_host_platform_device_count``) and runs :func:`train` on a mesh
over every device of every process. The test also imports :func:`train` and
runs the same program in one process, on 8 local devices and unsharded.

The program is the multi-host recipe of docs/sharding.md ("Several hosts"):
FSDP-sharded parameters, ``tx.init`` on them, the state placed with
:func:`mlorc_optax.state_shardings`, a global batch assembled from each
process's own rows, a few jitted steps, an Orbax checkpoint written and read
back by every process into a freshly initialised state, and a few more
steps. Each process writes its view of the result: the fully gathered
parameters and the losses.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mlorc_optax

#: Mesh axis over every device: parameters are sharded over it (FSDP) and so
#: is the batch (data parallelism).
AXIS = 'fsdp'
D_IN, D, D_OUT, LAYERS = 16, 64, 8, 2
BATCH = 32  # global: 4 rows per device on 8 devices
STEPS_BEFORE, STEPS_AFTER = 3, 2
LEARNING_RATE = 1e-2
RANK = 4

#: FSDP: each leaf sharded along one axis of size divisible by 8; the small
#: head bias is replicated.
SPECS = {
    'embed': {'kernel': P(None, AXIS)},
    'layers': {'kernel': P(None, AXIS, None), 'bias': P(None, AXIS)},
    'head': {'kernel': P(AXIS, None), 'bias': P()},
}


def initial_params() -> dict:
  """The model's parameters, as NumPy (the same in every process)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  return {
      'embed': {'kernel': normal(D_IN, D) / np.sqrt(D_IN)},
      'layers': {'kernel': normal(LAYERS, D, D) / np.sqrt(D),
                 'bias': np.zeros((LAYERS, D), np.float32)},
      'head': {'kernel': normal(D, D_OUT) / np.sqrt(D),
               'bias': np.zeros(D_OUT, np.float32)},
  }


_rng = np.random.default_rng(1)
#: The teacher whose outputs are the regression targets.
TEACHER = _rng.standard_normal((D_IN, D_OUT), np.float32)
# Linear terms with slopes of magnitude 1..2 keep every gradient entry away
# from 0 (within 4x of its leaf's largest: tests/test_multihost.py checks
# it), so that every entry of Adam's second moment is well above float32
# rounding of its largest one (README, "Precision and bad input") and two
# float32 summation orders (one process, two processes, unsharded) take the
# same steps to rounding (as in tests/test_sharding.py).
SLOPES = jax.tree.map(
    lambda p: (np.sign(_rng.standard_normal(p.shape))
               * _rng.uniform(1.0, 2.0, p.shape)).astype(np.float32),
    initial_params())


def batch_rows(step: int, rows: range) -> np.ndarray:
  """Inputs ``rows`` of the global batch of ``step``: row ``r`` alone decides
  its values, so a process makes its own rows without the others'."""
  return np.stack([
      np.random.default_rng([2, step, r]).standard_normal(D_IN, np.float32)
      for r in rows
  ])


def loss_fn(params, x):
  """Mean squared error of a stacked tanh MLP against a teacher, plus
  linear terms; returns ``(loss, mse)``."""
  h = x @ params['embed']['kernel']
  for layer in range(LAYERS):
    h = jnp.tanh(h @ params['layers']['kernel'][layer]
                 + params['layers']['bias'][layer])
  out = h @ params['head']['kernel'] + params['head']['bias']
  mse = jnp.mean((out - jnp.tanh(x @ TEACHER)) ** 2)
  linear = sum(jnp.sum(p * s) for p, s in
               zip(jax.tree.leaves(params), jax.tree.leaves(SLOPES)))
  return mse + 0.3 * linear, mse


def make_tx():
  return mlorc_optax.mlorc_adamw(LEARNING_RATE, rank=RANK)


def global_batch(step: int, mesh: Mesh) -> jax.Array:
  """The batch of ``step``, each process contributing only its own rows."""
  sharding = NamedSharding(mesh, P(AXIS))
  shape = (BATCH, D_IN)
  # The rows on this process's devices: one block where the mesh lists each
  # process's devices together, as both meshes of the test do.
  blocks = {index[0].indices(BATCH)[:2] for index in
            sharding.addressable_devices_indices_map(shape).values()}
  first, last = min(b[0] for b in blocks), max(b[1] for b in blocks)
  if sum(stop - start for start, stop in blocks) != last - first:
    raise ValueError(f'rows {sorted(blocks)} of this process are not a block')
  local = batch_rows(step, range(first, last))
  return jax.make_array_from_process_local_data(sharding, local, shape)


def place(params, mesh: Mesh):
  """Parameters sharded over the mesh (FSDP), from every process's copy."""
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS,
                           is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
      params, shardings)


def init_state(tx, params, mesh: Mesh):
  """``tx.init``, then every array placed by ``state_shardings``."""
  state = tx.init(params)
  # tx.init places the factors like the parameters; the counters and the key
  # are replicated over the whole mesh here.
  return jax.device_put(state, mlorc_optax.state_shardings(state, mesh))


def abstract(tree):
  """Shapes, dtypes and shardings of ``tree``: Orbax's restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def gather(tree) -> dict[str, np.ndarray]:
  """Every leaf of ``tree`` as a whole NumPy array, keyed by its path."""
  tree = multihost_utils.process_allgather(tree, tiled=True)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def train(mesh: Mesh, checkpoint_dir: str) -> dict[str, np.ndarray]:
  """Train, checkpoint, restore into a fresh state, train on.

  Args:
    mesh: a one-axis mesh (axis ``'fsdp'``) over the devices to shard over
      (one device: the unsharded run).
    checkpoint_dir: an absolute directory every process can reach.

  Returns:
    ``'losses'`` and ``'mse'`` (one per step), ``'step'`` (MLorc's step
    counter at the end), ``'restored_equal'`` (whether every array read back
    equals the one saved, with its sharding, on this process's devices) and
    the final parameters, gathered whole, keyed by path.
  """
  tx = make_tx()
  params = place(initial_params(), mesh)
  state = init_state(tx, params, mesh)

  def step(params, state, x):
    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, (loss, mse)

  shardings = (jax.tree.map(lambda x: x.sharding, params),
               mlorc_optax.state_shardings(state))
  step = jax.jit(step,
                 in_shardings=(*shardings, NamedSharding(mesh, P(AXIS))),
                 out_shardings=(*shardings, NamedSharding(mesh, P())))

  losses, mses = [], []
  for t in range(STEPS_BEFORE):
    params, state, (loss, mse) = step(params, state, global_batch(t, mesh))
    losses.append(loss)
    mses.append(mse)

  # Every process saves (each writes its own shards) and restores.
  saved = {'params': params, 'opt_state': state}
  path = os.path.join(checkpoint_dir, f'step_{STEPS_BEFORE}')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, saved)
  fresh_params = place(initial_params(), mesh)
  target = abstract({'params': fresh_params,
                     'opt_state': init_state(tx, fresh_params, mesh)})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, target)
  restored_equal = all(
      a.sharding == b.sharding and all(
          np.array_equal(sa.data, sb.data) for sa, sb in
          zip(a.addressable_shards, b.addressable_shards))
      for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)))
  params, state = restored['params'], restored['opt_state']

  for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
    params, state, (loss, mse) = step(params, state, global_batch(t, mesh))
    losses.append(loss)
    mses.append(mse)

  return {
      'losses': np.array([float(x) for x in losses]),
      'mse': np.array([float(x) for x in mses]),
      'step': np.asarray(state[0].step),
      'restored_equal': np.asarray(restored_equal),
      **gather(params),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--num-processes', type=int, required=True)
  parser.add_argument('--coordinator', required=True)
  parser.add_argument('--checkpoint-dir', required=True)
  parser.add_argument('--output', required=True)
  args = parser.parse_args(argv)

  # Cross-process collectives on CPU go through Gloo (jax's default for CPU
  # since 0.5; set here to say so).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=60,
  )
  assert jax.process_count() == args.num_processes, jax.process_count()
  # Every device of every process. Auto axes, as docs/sharding.md's recipe
  # (Explicit axes are tested in test_sharding.py).
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))
  results = train(mesh, args.checkpoint_dir)
  results['local_device_count'] = np.asarray(jax.local_device_count())
  results['device_count'] = np.asarray(jax.device_count())
  np.savez(args.output, **results)
  jax.distributed.shutdown()


if __name__ == '__main__':
  sys.exit(main())
