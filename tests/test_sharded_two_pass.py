"""Specification of the two-pass step on sharded parameters.

On 8 simulated CPU devices (the root conftest.py sets them; these tests fail,
not skip, without them), parameters placed with ``NamedSharding`` on a
``(2, 4)`` mesh ``('data', 'model')``, as FSDP and tensor parallelism place
stacked ``[L, m, n]`` leaves: rows split, columns split, both, the layer
axis split too, and replicated (data parallel). ``init`` sees the placement
and the plan runs the two-pass step inside ``jax.shard_map``, each device
on its own shard, with the rank-sized sums completed across devices.

What the sharded step must compute is the single-device step's: the same
sketches (drawn whole from the same keys), the same sums in another order.
Two float32 implementations of one step differ by rounding, which the fix of
paper equation (2) and Adam's division magnify at a few entries, so the
comparisons are those of ``test_two_pass_step.py`` (``eps = 1e-2``, 5e-4 of
the largest update entry but for the fix's discontinuity,
:mod:`closeness`); the Pallas kernels run in interpret mode.

And it must not move a dense moment: only rank-sized sketches and
projections may cross devices (read from the compiled HLO).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mlorc_optax
from mlorc_optax import kernels
from mlorc_optax._src import plan as plan_lib

from closeness import assert_close, assert_close_but_for_the_fix, grads_for
from helpers import FULL

RANK = 2
SHAPE = (2, 64, 64)  # [layers, rows, cols]: shards of at least 16 x 16
SPECS = {
    'rows': P(None, 'data', None),        # FSDP on the rows
    'cols': P(None, None, 'model'),       # tensor parallel on the columns
    'both': P(None, 'data', 'model'),
    'layers': P('data', None, 'model'),   # the stacked axis split too
    'replicated': P(),                    # data parallel
}
STEPS = 3


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() >= 8, (
      'needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the '
      'root conftest.py before JAX starts)')
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))


def collectives(hlo):
  """``(kind, shape)`` of each collective's result in compiled HLO text.

  A tuple result (XLA combines small collectives) lists each element.
  """
  found = []
  pattern = re.compile(
      r'^\s*(?:ROOT )?%?[\w.-]+ = (.*?) (all-gather|all-reduce|reduce-scatter|'
      r'all-to-all|collective-permute)(?:-start)?\(')
  for line in hlo.splitlines():
    m = pattern.search(re.sub(r'/\*.*?\*/', '', line))  # /*index=5*/
    if m:
      for shape in re.findall(r'[a-z0-9]+\[([0-9,]*)\]', m.group(1)):
        found.append((m.group(2),
                      tuple(int(d) for d in shape.split(',') if d)))
  return found


def run(tx, grads, shardings=None):
  """``(updates per step, final state, compiled HLO)`` of jitted updates.

  With ``shardings`` (a tree of ``NamedSharding``), params and gradients are
  placed by them and the state keeps its placement
  (``mlorc_optax.state_shardings``).
  """
  params = jax.tree.map(jnp.zeros_like, grads[0])
  if shardings is None:
    state = tx.init(params)
    update = jax.jit(tx.update)
  else:
    params = jax.device_put(params, shardings)
    grads = [jax.device_put(g, shardings) for g in grads]
    state = tx.init(params)
    state_sh = mlorc_optax.state_shardings(state)
    update = jax.jit(tx.update, in_shardings=(shardings, state_sh),
                     out_shardings=(shardings, state_sh))
  update = update.lower(grads[0], state).compile()
  outs = []
  for g in grads:
    out, state = update(g, state)
    outs.append(out)
  return outs, state, update.as_text()


def shardings_on(mesh, specs):
  return {k: NamedSharding(mesh, s) for k, s in specs.items()}


ADAM = [
    ('xla', dict(complement=0.7)),
    ('pallas', dict()),
]


@pytest.fixture(scope='module', params=ADAM, ids=[a for a, _ in ADAM])
def adam_runs(request, mesh):
  """Sharded, single-device and reference runs of one MLorc-Adam setting."""
  implementation, settings = request.param
  grads = grads_for({k: SHAPE for k in SPECS}, STEPS, seed=3)

  def make(impl):
    return mlorc_optax.scale_by_mlorc_adam(
        eps=1e-2, rank=RANK, implementation=impl, kernel_config=FULL,
        **settings)

  return dict(
      implementation=implementation,
      sharded=run(make(implementation), grads, shardings_on(mesh, SPECS)),
      single=run(make(implementation), grads),
      reference=run(make('reference'), grads))


def test_the_plan_runs_the_two_pass_step_on_the_shards(adam_runs):
  state = adam_runs['sharded'][1]
  implementation = adam_runs['implementation']
  for leaf in state.plan.leaves:
    assert leaf.step == implementation, (leaf.path, leaf.step_reason)
    assert leaf.placement is not None
    assert leaf.placement.spec == P(*SPECS[leaf.path],
                                    *[None] * (3 - len(SPECS[leaf.path])))
  reasons = {leaf.path: leaf.step_reason for leaf in state.plan.leaves}
  assert reasons['both'] == (
      f"implementation={implementation!r}; P(None, 'data', 'model') on "
      'data=2, model=4: shards 2x[32x16]')
  assert reasons['replicated'].endswith('replicated on 8 devices')
  # One device alone (no mesh): no placement, as before.
  assert all(leaf.placement is None
             for leaf in adam_runs['single'][1].plan.leaves)


def test_sharded_adam_equals_the_single_device_and_reference_steps(
    adam_runs):
  sharded, single, reference = (
      adam_runs[k][0] for k in ('sharded', 'single', 'reference'))
  for t in range(STEPS):
    for k in SPECS:
      assert_close_but_for_the_fix(sharded[t][k], single[t][k], 5e-4,
                                   f'step {t}, leaf {k}, single device')
      assert_close_but_for_the_fix(sharded[t][k], reference[t][k], 5e-4,
                                   f'step {t}, leaf {k}, reference')


def test_sharded_factors_keep_their_placement_and_values(adam_runs, mesh):
  state, single = adam_runs['sharded'][1], adam_runs['single'][1]
  for k, spec in SPECS.items():
    for moment in ('mu', 'nu'):
      ours = getattr(state.inner_state, moment)[k]
      theirs = getattr(single.inner_state, moment)[k]
      u, s, v, _ = mlorc_optax.factor_partition_specs(
          state.plan.leaves[sorted(SPECS).index(k)],
          P(*spec, *[None] * (3 - len(spec))))
      for x, want in ((ours.u, u), (ours.s, s), (ours.v, v)):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim)
      assert_close(mlorc_optax.compressors.reconstruct(ours),
                   mlorc_optax.compressors.reconstruct(theirs), 1e-4,
                   f'{moment} of {k}')


def test_sharded_update_moves_no_dense_moment(adam_runs):
  found = collectives(adam_runs['sharded'][2])
  assert found, 'expected rank-sized sums across the devices'
  # Only rank-sized sums: sketches [..., rows, l] and, for the complement,
  # [U Q]^T g [..., k + l, cols] (k = rank 2, l = k + oversample = 6). The
  # smallest moment shard, 'both', is [32 x 16] per device: no axis of a
  # dense moment is that short.
  width = 2 * RANK + adam_runs['sharded'][1].plan.compressor.oversample
  wide = [c for c in found if len(c[1]) >= 2 and min(c[1][-2:]) > width]
  assert not wide, wide
  assert not [c for c in found if c[0] in ('all-gather', 'all-to-all')], found


def test_sharded_lion_equals_the_single_device_and_reference_steps(mesh):
  specs = {k: SPECS[k] for k in ('rows', 'layers', 'replicated')}
  shapes = {k: SHAPE for k in specs}
  # Shards of 48 x 10 that the kernels take zero-padded to 48 x 16 tiles.
  specs['odd'], shapes['odd'] = SPECS['cols'], (2, 48, 40)
  grads = grads_for(shapes, STEPS, seed=4)

  def make(impl):
    return mlorc_optax.scale_by_mlorc_lion(rank=RANK, complement=0.5,
                                           implementation=impl,
                                           kernel_config=FULL)

  sharded, state, _ = run(make('pallas'), grads, shardings_on(mesh, specs))
  assert all(leaf.placement is not None for leaf in state.plan.leaves)
  single, single_state, _ = run(make('pallas'), grads)
  reference, _, _ = run(make('reference'), grads)
  for t in range(STEPS):
    for k in specs:  # signs: an entry whose argument is ~0 may flip
      for theirs in (single[t][k], reference[t][k]):
        assert np.mean(np.asarray(sharded[t][k]) != np.asarray(theirs)) <= (
            1e-3), (t, k)
  for k in specs:
    assert_close(
        mlorc_optax.compressors.reconstruct(state.inner_state.mu[k]),
        mlorc_optax.compressors.reconstruct(single_state.inner_state.mu[k]),
        1e-4, k)


def test_data_parallel_update_computes_everywhere_without_collectives():
  """Params replicated, gradients all-reduced by the backward pass: every
  device runs the same two-pass step on the whole matrices (what it
  computes: the ``'replicated'`` leaf above), and the update itself moves
  nothing."""
  mesh = Mesh(np.array(jax.devices()[:8]), ('batch',))
  grads = grads_for({'w': SHAPE}, 1, seed=5)
  tx = mlorc_optax.scale_by_mlorc_adam(eps=1e-2, rank=RANK,
                                       implementation='pallas')
  _, state, hlo = run(tx, grads, {'w': NamedSharding(mesh, P())})
  assert state.plan.leaves[0].placement is not None
  assert collectives(hlo) == []


def test_meshes_with_explicit_axes_run_the_sharded_step():
  """Under ``Explicit`` mesh axes the sharding is part of each array's type:
  the step's inputs are resharded to the specs of the shard_map, and the
  update comes back typed like its parameter."""
  explicit = jax.sharding.AxisType.Explicit
  mesh = jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(explicit, explicit),
                       devices=jax.devices()[:8])
  specs = {'both': SPECS['both']}
  grads = grads_for({'both': SHAPE}, 2, seed=6)
  tx = mlorc_optax.scale_by_mlorc_adam(eps=1e-2, rank=RANK,
                                       implementation='xla')
  shardings = shardings_on(mesh, specs)
  params = jax.device_put(jax.tree.map(jnp.zeros_like, grads[0]), shardings)
  state = tx.init(params)
  assert state.plan.leaves[0].placement is not None
  update = jax.jit(tx.update)
  theirs, _, _ = run(tx, grads)
  for g, want in zip(grads, theirs):
    ours, state = update(jax.device_put(g, shardings), state)
    assert ours['both'].sharding.is_equivalent_to(shardings['both'], 3)
    assert_close_but_for_the_fix(ours['both'], want['both'], 5e-4)


# The choice of the step (no update runs).


def test_shards_that_are_no_blocks_of_the_matrix_take_the_reference(mesh):
  """Rows flattened from two sharded axes: a device's shard is not a block
  of the matrix (its rows are not those of its shard of ``u``)."""
  dims = mlorc_optax.MatrixDimensionNumbers((0, 1), (2,))
  params = {'w': jax.device_put(jnp.zeros((4, 8, 64)),
                                NamedSharding(mesh, P('data', 'model')))}
  tx = mlorc_optax.scale_by_mlorc_adam(rank=RANK, dimension_numbers=dims,
                                       implementation='xla')
  leaf = tx.init(params).plan.leaves[0]
  assert leaf.step == 'reference' and leaf.placement is None
  assert 'a shard is not a block of the matrix' in leaf.step_reason


def test_automatic_choice_on_several_gpus_needs_the_placement(monkeypatch,
                                                              mesh):
  """On NVIDIA GPUs the automatic choice is the kernels where ``init`` sees
  the parameter's mesh or its one device, else (a traced ``init`` under
  ``Auto`` axes) the reference step, whose sharding XLA handles."""
  monkeypatch.setattr(plan_lib, 'on_nvidia_gpu', lambda: True)
  leaf = jax.device_put(jnp.zeros(SHAPE), NamedSharding(mesh, SPECS['both']))
  tx = mlorc_optax.scale_by_mlorc_adam(rank=RANK)
  placed = tx.init({'w': leaf}).plan.leaves[0]
  assert placed.step == 'pallas' and placed.placement is not None
  assert placed.step_reason.startswith('automatic: NVIDIA GPUs; ')
  traced = jax.eval_shape(tx.init, {'w': leaf}).plan.leaves[0]
  assert traced.step == 'reference' and traced.placement is None
  assert traced.step_reason == (
      'automatic: several devices, and init did not see the parameter on '
      'a mesh')
  # A parameter on one of several devices takes the kernels, unsharded.
  alone = tx.init({'w': jax.device_put(jnp.zeros(SHAPE), jax.devices()[3])}
                  ).plan.leaves[0]
  assert (alone.step, alone.step_reason, alone.placement) == (
      'pallas', 'automatic: one NVIDIA GPU', None)
  # Shards the kernels cannot tile are padded to whole tiles.
  odd = jax.device_put(jnp.zeros((2, 48, 40)), NamedSharding(
      mesh, P(None, None, 'model')))
  leaf = tx.init({'w': odd}).plan.leaves[0]
  assert (leaf.step, leaf.step_reason.split('; ')[-1]) == (
      'pallas', '48x10 shards padded to 48x16 tiles')
