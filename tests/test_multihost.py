"""Several hosts: 2 processes x 4 CPU devices train like one process.

Two child processes, each with 4 simulated CPU devices, join one
``jax.distributed`` job (coordinator on localhost, cross-process collectives
through Gloo) and run tests/multihost_worker.py: FSDP-sharded parameters over
a mesh of all 8 devices, ``mlorc_adamw`` with its state placed by
``state_shardings``, a global batch assembled from each process's own rows,
3 jitted steps, an Orbax checkpoint saved and restored by both processes
into a freshly initialised state, 2 more steps. Meanwhile this process runs
the same program on its own 8 devices (root conftest.py) and on one device
(unsharded); the three runs must agree. This is the proof of the "Several
hosts" recipe in docs/sharding.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import multihost_worker as worker
from helpers import EPS32

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, DEVICES_PER_PROCESS = 2, 4
STEPS = worker.STEPS_BEFORE + worker.STEPS_AFTER
#: Seconds the children may take together (about 20 s on 2 busy cores).
TIMEOUT_S = 240

# How far two float32 runs of these steps may drift apart. The runs differ
# only in the order of float32 sums (the gradient's, the sketches', the
# cross-device and cross-process reductions); the sketches themselves are
# the same, drawn from the key and step in the state. Per step, each
# parameter is rounded to float32 (EPS32 * |p|) and moved by lr times Adam's
# direction m / sqrt(v). MLorc reconstructs a moment exactly only to float32
# rounding of its largest entry (README, "Precision and bad input"); with
# every gradient entry within RHO of its leaf's largest (the premise, checked
# below), every entry of v is within RHO**2 of the largest, so the direction
# agrees to ~RHO**2 * EPS32 relative. ROUNDINGS counts the float32 operations
# an error passes through per step (gradient, sketch products, QR, small
# SVD, reconstruction, update), with room for the rank-4 truncation's
# sensitivity to rounding (these gradients' singular values near the 4th are
# a few percent apart).
RHO = 4.0
ROUNDINGS = 16


def drift_bound(initial: np.ndarray, displacement: np.ndarray) -> float:
  """Largest difference two float32 runs may show in one leaf's parameters.

  Args:
    initial: the leaf's initial value.
    displacement: the reference run's ``final - initial``.
  """
  return ROUNDINGS * EPS32 * (STEPS * np.abs(initial).max()
                              + RHO**2 * np.abs(displacement).max())


def child_env() -> dict[str, str]:
  """The environment of a child: 4 devices, not the parent's 8."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(
      flags + [f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}'])
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p])
  return env


def mesh(devices: int) -> Mesh:
  """The worker's mesh over this process's first ``devices`` devices."""
  return Mesh(np.array(jax.devices()[:devices]), (worker.AXIS,))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_children(tmp: Path) -> list[tuple[subprocess.Popen, Path]]:
  port = free_port()
  env = child_env()
  children = []
  for i in range(PROCESSES):
    log = tmp / f'process_{i}.log'
    with open(log, 'w') as out:
      proc = subprocess.Popen(
          [sys.executable, str(ROOT / 'tests' / 'multihost_worker.py'),
           '--process-id', str(i), '--num-processes', str(PROCESSES),
           '--coordinator', f'localhost:{port}',
           '--checkpoint-dir', str(tmp / 'checkpoints'),
           '--output', str(tmp / f'process_{i}.npz')],
          env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    children.append((proc, log))
  return children


def wait_for(children, deadline: float) -> None:
  """Waits for every child; when one fails or the deadline passes, kills
  those still running and fails with what each one printed."""
  procs = [proc for proc, _ in children]
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break  # the others would wait for it until their own timeouts
    time.sleep(0.1)
  if all(p.poll() == 0 for p in procs):
    return
  timed_out = any(p.poll() is None for p in procs) and (
      time.monotonic() >= deadline)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  reports = []
  for i, (proc, log) in enumerate(children):
    lines = [line for line in log.read_text().splitlines()
             if not line.startswith('[Gloo]')]
    reports.append(f'--- process {i}, exit status {proc.returncode}:\n'
                   + '\n'.join(lines[-60:]))
  why = f'timed out after {TIMEOUT_S} s' if timed_out else 'failed'
  pytest.fail(f'multi-host worker {why}:\n' + '\n'.join(reports),
              pytrace=False)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Results of the 2-process run (one per process), the 1-process 8-device
  run, the unsharded run, and the initial parameters."""
  assert jax.device_count() >= 8, (
      'needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the '
      'root conftest.py before JAX starts)')
  tmp = tmp_path_factory.mktemp('multihost')
  children = start_children(tmp)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    # The same program in this process while the children run.
    one = worker.train(mesh(8), str(tmp / 'one_process'))
    unsharded = worker.train(mesh(1), str(tmp / 'unsharded'))
  finally:
    wait_for(children, deadline)
  hosts = [dict(np.load(tmp / f'process_{i}.npz')) for i in range(PROCESSES)]
  initial = worker.gather(worker.place(worker.initial_params(), mesh(1)))
  return {'hosts': hosts, 'one': one, 'unsharded': unsharded,
          'initial': initial}


def test_each_process_has_4_of_the_8_devices_and_sees_the_whole_result(runs):
  for host in runs['hosts']:
    assert host['local_device_count'] == DEVICES_PER_PROCESS
    assert host['device_count'] == PROCESSES * DEVICES_PER_PROCESS
  first, second = runs['hosts']
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_every_process_restores_the_checkpoint_exactly(runs):
  for run in (*runs['hosts'], runs['one'], runs['unsharded']):
    assert run['restored_equal']
    assert run['step'] == STEPS  # the counter went on from the checkpoint


def test_training_goes_on_across_the_restore(runs):
  for run in (runs['hosts'][0], runs['one'], runs['unsharded']):
    assert np.all(np.diff(run['losses']) < 0), run['losses']


def test_the_premise_of_the_tolerance_holds(runs):
  """Every gradient entry is within RHO of its leaf's largest, at the start
  and at the end of the unsharded run."""
  start = worker.initial_params()
  end = jax.tree.unflatten(
      jax.tree.structure(start),
      [runs['unsharded'][jax.tree_util.keystr(path)]
       for path, _ in jax.tree_util.tree_leaves_with_path(start)])
  grad_fn = jax.jit(jax.grad(lambda p, x: worker.loss_fn(p, x)[0]))
  for params, step in ((start, 0), (end, STEPS)):
    grads = grad_fn(params, worker.global_batch(step, mesh(1)))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      g = np.abs(np.asarray(g))
      assert g.min() * RHO >= g.max(), (jax.tree_util.keystr(path), step)


@pytest.mark.parametrize('reference', ['one', 'unsharded'])
def test_two_processes_train_like_one(runs, reference):
  """Parameters after 3 steps, a checkpoint round trip and 2 steps."""
  theirs = runs[reference]
  for ours in runs['hosts']:
    for path, initial in runs['initial'].items():
      bound = drift_bound(initial, theirs[path] - initial)
      np.testing.assert_allclose(ours[path], theirs[path], rtol=0, atol=bound,
                                 err_msg=path)
    # The mean of 256 positive squares: two float32 summation orders agree
    # to 256 * EPS32 (3e-5) relative, plus the parameters' drift.
    np.testing.assert_allclose(ours['mse'], theirs['mse'], rtol=1e-4)
