"""The benchmark tools run end to end on a tiny shape (no timing is checked).

Speed and memory are measured on the GPU and committed under
``benchmarks/results``; CI only proves the tools work.
"""

from __future__ import annotations

import json

from benchmarks import decompositions
from benchmarks import step_time


def test_step_time_tool_measures_every_optimizer_on_a_tiny_tree(tmp_path):
  out = tmp_path / 'r.json'
  results = step_time.main([
      '--cases', 'tiny', '--dtypes', 'float32', '--ranks', '4', '--calls',
      '1', '--warmup', '0', '--json', str(out), '--table',
      str(tmp_path / 'r.md'), '--quiet'])
  assert [(r['optimizer'], r['rank']) for r in results] == [
      ('adamw', None), ('lion', None), ('adafactor', None),
      ('mlorc_adamw', 4), ('mlorc_lion', 4), ('galore', 4)]
  for r in results:
    assert r['status'] == 'ok', r['error']
    assert r['step_s'] > 0 and r['ratio_vs_adamw'] > 0
    assert r['params'] == 2 * (64 * 64 + 2 * 64 * 160)
  by_name = {r['optimizer']: r for r in results}
  # State sizes: adamw two dense moments; MLorc B((m+n)r + r) per moment.
  assert by_name['adamw']['opt_state_bytes'] >= 2 * 4 * by_name['adamw'][
      'params']
  mlorc_moment = 2 * sum((m + n) * 4 + 4 for m, n in
                         ((64, 64), (64, 160), (160, 64)))
  assert mlorc_moment * 2 * 4 <= by_name['mlorc_adamw']['opt_state_bytes']
  assert by_name['mlorc_adamw']['opt_state_bytes'] < 0.2 * by_name['adamw'][
      'opt_state_bytes']
  assert 'svd_step_s' in by_name['galore']
  # What implementation=None picked is recorded (the reference on a CPU).
  assert by_name['mlorc_adamw']['implementation'] == 'reference'
  assert json.loads(out.read_text())[0]['optimizer'] == 'adamw'
  rendered = step_time.main(['--render', str(out), '--quiet'])
  assert len(rendered) == len(results)
  assert '| tiny | float32 | mlorc_adamw | 4 | ok |' in (
      tmp_path / 'r.md').read_text()


def test_matmul_only_factorizations_match_the_library_ones():
  import jax
  import jax.numpy as jnp

  y = jax.random.normal(jax.random.key(0), (2, 300, 6))
  q = decompositions.cholesky_qr2(y)
  assert float(jnp.max(jnp.abs(q.mT @ q - jnp.eye(6)))) < 1e-5
  # Same column space as the Householder QR's basis.
  q_ref = jnp.linalg.qr(y)[0]
  proj = q_ref @ (q_ref.mT @ q)
  assert float(jnp.max(jnp.abs(proj - q))) < 1e-5
  b = jax.random.normal(jax.random.key(1), (2, 6, 400))
  u, s, v = decompositions.gram_svd(b)
  s_ref = jnp.linalg.svd(b, compute_uv=False)
  assert jnp.allclose(jnp.sort(s, axis=-1)[..., ::-1], s_ref, rtol=1e-4)
  recon = (u * s[..., None, :]) @ v.mT
  assert float(jnp.linalg.norm(recon - b) / jnp.linalg.norm(b)) < 1e-5
  # The reference step's route: a QR of b^T, then an l x l SVD.
  u, s, vt = decompositions.qr_then_small_svd(b)
  assert jnp.allclose(s, s_ref, rtol=1e-4)
  recon = (u * s[..., None, :]) @ vt
  assert float(jnp.linalg.norm(recon - b) / jnp.linalg.norm(b)) < 1e-5


def test_fused_passes_tool_times_every_piece_on_a_tiny_stack(tmp_path):
  from benchmarks import fused_passes

  out = tmp_path / 'p.jsonl'
  rows = fused_passes.main(['--shape', '1', '32', '64', '--calls', '1',
                            '--json', str(out)])
  assert [r['kernel'] for r in rows] == [
      'copy', 'read', 'apply', 'small', 'leaf_step', 'sketch', 'project']
  for r in rows:
    assert 'error' not in r, r
    assert r['ms'] > 0
  assert len(out.read_text().splitlines()) == len(rows)
