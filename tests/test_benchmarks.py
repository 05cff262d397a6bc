"""The benchmark tools run end to end on a tiny shape (no timing is checked).

Speed and memory are measured on the GPU and committed under
``benchmarks/results``; CI only proves the tools work and that the committed
results still render.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlorc_optax
from benchmarks import compressor_tracking
from benchmarks import decompositions
from benchmarks import finetune_steps
from benchmarks import memory_table
from benchmarks import step_time
from benchmarks import update_size

RESULTS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'


def _rows(table: str) -> list[list[str]]:
  """The cells of a markdown table's body lines."""
  return [[c.strip() for c in line.strip().strip('|').split('|')]
          for line in table.splitlines()[2:]]


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
    # Which source tree was measured (two trees' runs must differ here).
    assert r['mlorc_optax_source'] == str(
        Path(mlorc_optax.__file__).resolve().parent)
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
  assert ['tiny', 'float32', 'mlorc_adamw', '4', 'ok'] in [
      row[:5] for row in _rows((tmp_path / 'r.md').read_text())]


def test_step_time_with_no_calls_compiles_only(tmp_path, capsys):
  results = step_time.main([
      '--cases', 'tiny', '--ranks', '4', '--calls', '0', '--optimizers',
      'adamw', 'mlorc_adamw', '--table', str(tmp_path / 'r.md'), '--plot',
      str(tmp_path / 'r.png')])
  assert 'tiny float32 mlorc_adamw r=4: ok compiled, temporaries' in (
      capsys.readouterr().out)
  for r in results:
    assert r['status'] == 'ok', r['error']
    assert 'step_s' not in r and r['ratio_vs_adamw'] is None
    assert r['temp_bytes'] is not None and r['opt_state_bytes'] > 0
  assert (tmp_path / 'r.png').exists()
  with pytest.raises(ValueError, match='--calls'):
    step_time.main(['--calls', '-1', '--quiet'])


def test_step_time_passes_options_to_the_mlorc_factories():
  params = {'w': jnp.zeros((64, 160))}
  grads = {'w': jnp.arange(64 * 160.).reshape(64, 160) % 7 - 3}

  def two_steps(tx):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    return updates['w']

  got = two_steps(
      step_time.make_optimizer('mlorc_adamw:complement=0.5,oversample=2', 4))
  want = two_steps(mlorc_optax.mlorc_adamw(1e-4, rank=4, complement=0.5,
                                           oversample=2))
  plain = two_steps(step_time.make_optimizer('mlorc_adamw', 4))
  np.testing.assert_array_equal(got, want)
  assert not np.allclose(got, plain)
  with pytest.raises(ValueError, match='oversampl'):
    step_time.make_optimizer('mlorc_adamw:oversampl=4', 4)
  with pytest.raises(ValueError, match='only the MLorc'):
    step_time.make_optimizer('adamw:b1=0.8', None)
  with pytest.raises(ValueError, match='set by the harness'):
    step_time.make_optimizer('mlorc_lion:rank=8', 4)


def test_sketch_precision_tool_tracks_every_precision_variant():
  from benchmarks import sketch_precision  # pylint: disable=g-import-not-at-top

  out = sketch_precision.main(['--rows', '32', '--cols', '64', '--steps', '4',
                               '--seeds', '0', '--variants',
                               'tf32/bf16/bf16/bf16',
                               'tf32x3/tf32x3/tf32x3/tf32x3'])
  low, full = out['rows']
  assert [low[name] for name in sketch_precision.PRECISION_FIELDS] == [
      'tf32', 'bf16', 'bf16', 'bf16']
  assert full['variant'] == 'tf32x3/tf32x3/tf32x3/tf32x3'
  for name in ('m_error', 'v_error', 'direction_error'):
    assert 0 < low[name] < 2, name
    if jax.default_backend() != 'gpu':  # interpret mode: float32 dots
      assert low[name] == full[name], name
  with pytest.raises(ValueError, match='RECONSTRUCT/SKETCH/PROJECT'):
    sketch_precision.variant_config('bf16')
  with pytest.raises(ValueError, match='project_precision'):
    sketch_precision.variant_config('tf32/tf32/bf16/fp8')


def test_step_time_names_kernel_configs(monkeypatch):
  seen = {}
  factory = mlorc_optax.mlorc_adamw

  @functools.wraps(factory)
  def spy(*args, **kwargs):
    seen.update(kwargs)
    return factory(*args, **kwargs)

  monkeypatch.setattr(mlorc_optax, 'mlorc_adamw', spy)
  step_time.make_optimizer('mlorc_adamw:kernel_config=uniform_tiling', 4)
  assert seen['kernel_config'] == mlorc_optax.kernels.KernelConfig(
      pass_tilings=())


def test_step_time_child_writes_its_one_configuration(tmp_path):
  # What `--isolate` runs in each fresh process (here in this one).
  out = tmp_path / 'child.json'
  step_time.main(['--cases', 'tiny', '--optimizers', 'adamw', '--calls', '1',
                  '--warmup', '0', '--quiet', '--result-json', str(out)])
  child = json.loads(out.read_text())
  assert (child['optimizer'], child['status']) == ('adamw', 'ok')


def test_the_committed_step_times_render(tmp_path):
  parts = sorted(RESULTS.glob('step_time/h100_fused_*.json'))
  assert parts
  rendered = step_time.main([
      '--render', *map(str, parts), '--table', str(tmp_path / 't.md'),
      '--plot', str(tmp_path / 't.png'), '--quiet'])
  rows = _rows((tmp_path / 't.md').read_text())
  assert len(rows) == len(rendered) == sum(
      len(json.loads(p.read_text())) for p in parts)
  adamw = [r for r in rendered if r['optimizer'] == 'adamw']
  assert adamw and all(r['ratio_vs_adamw'] == 1.0 for r in adamw)
  assert (tmp_path / 't.png').read_bytes().startswith(b'\x89PNG')


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


def test_decompositions_tool_times_every_piece_on_a_tiny_stack(tmp_path):
  out = tmp_path / 'd.json'
  rows = decompositions.main(['--batch', '1', '--shapes', '32', '48',
                              '--ranks', '4', '--calls', '1', '--json',
                              str(out)])
  assert [(r['m'], r['n'], r['rank']) for r in rows] == [(32, 48, 4)]
  for key in ('copy_ms', 'sketch_ms', 'project_ms', 'qr_ms',
              'cholesky_qr2_ms', 'svd_ms', 'gram_svd_ms',
              'qr_then_small_svd_ms'):
    assert rows[0][key] > 0, key
  assert rows[0]['cholesky_qr2_orthogonality'] < 1e-4
  assert json.loads(out.read_text()) == rows


def test_fused_passes_tool_times_every_piece_on_a_tiny_stack(tmp_path):
  from benchmarks import fused_passes  # pylint: disable=g-import-not-at-top

  out = tmp_path / 'p.jsonl'
  rows = fused_passes.main(['--shape', '1', '32', '64', '--calls', '1',
                            '--json', str(out)])
  # The four passes with the default config, then with dot reconstructions
  # (fma_max_rank=0); pass 2 also as the complement runs it (project_v);
  # the bandwidth references before and after them.
  passes = ('sketch', 'project', 'project_v', 'lion_sketch', 'lion_project')
  references = ('copy', 'read', 'apply')
  assert [(r['kernel'], r.get('fma_max_rank'), r.get('order'))
          for r in rows] == [
              *((k, None, None) for k in references), ('small', None, None),
              ('leaf_step', None, None), *((p, 8, None) for p in passes),
              *((p, 0, None) for p in passes),
              *((k, None, 'last') for k in references)]
  for r in rows:
    assert 'error' not in r, r
    assert r['ms'] > 0
    assert r['mlorc_optax_source'] == str(
        Path(mlorc_optax.__file__).resolve().parent)
  assert len(out.read_text().splitlines()) == len(rows)


def test_fused_passes_tool_times_the_named_passes_at_the_step_sketch_width():
  from benchmarks import fused_passes  # pylint: disable=g-import-not-at-top

  rows = fused_passes.main(['--shape', '1', '32', '64', '--calls', '1',
                            '--oversample', '20', '--passes',
                            'mlorc_adam_sketch', 'mlorc_lion_project',
                            '--variants', 'tf32/tf32/bf16/tf32'])
  # The default, dot reconstructions, then the variant.
  assert [r['kernel'] for r in rows][5:-3] == ['sketch', 'lion_project'] * 3
  assert [(r['reconstruct_precision'], r['project_precision'])
          for r in rows[-5:-3]] == [('tf32', 'tf32')] * 2
  # rank 4 + 20 sketch columns, padded to 32 for the dots.
  assert {r['sketch_cols'] for r in rows} == {24}
  for r in rows:
    assert 'error' not in r, r
  with pytest.raises(ValueError, match='passes must be among'):
    fused_passes.measure(1, 32, 64, 4, 'float32', 1, False,
                         passes=('mlorc_adam_sketchy',))


def test_pass_profile_runs_each_pass_once_per_round_in_order():
  from benchmarks import pass_profile  # pylint: disable=g-import-not-at-top

  launched = pass_profile.main(['--shape', '1', '32', '64', '--rounds', '1'])
  # ncu's --launch-skip 5 --launch-count 5 then takes one warm launch each.
  assert launched == [*mlorc_optax.kernels.PASSES, 'project_v'] * 2


def _trace(events):
  """A Chrome trace of one GPU stream: ``(name, microseconds)`` kernels, or
  ``(name, microseconds, start)``."""
  meta = [dict(ph='M', pid=1, name='process_name',
               args=dict(name='/device:GPU:0')),
          dict(ph='M', pid=1, tid=7, name='thread_name',
               args=dict(name='Stream #7(Compute)')),
          dict(ph='M', pid=2, name='process_name', args=dict(name='/host:CPU')),
          dict(ph='M', pid=2, tid=1, name='thread_name',
               args=dict(name='python'))]
  host = [dict(ph='X', pid=2, tid=1, name='PjitFunction(step)', dur=1e4)]
  return meta + host + [dict(ph='X', pid=1, tid=7, name=n, dur=d, ts=t)
                        for n, d, t, *_ in (e + (0.0,) for e in events)]


def test_step_profile_sums_the_device_kernels_per_step():
  from benchmarks import step_profile  # pylint: disable=g-import-not-at-top

  # Two steps: two sketch passes of 1 ms, a 3 ms and a 1 ms fusion, an eigh.
  report = step_profile.summarize(_trace([
      ('mlorc_adam_sketch', 1000.0), ('loop_add_fusion_1', 3000.0),
      ('mlorc_adam_sketch', 1000.0), ('loop_add_fusion_1', 1000.0),
      ('void batch_parallel_jacobi_algo1<syevj>', 500.0)]), steps=2)
  assert report['device_lines'] == ['/device:GPU:0 / Stream #7(Compute)']
  assert report['step_ms'] == pytest.approx(3.25)  # the kernels, not the host
  kernels = {r['name']: (r['ms'], r['calls']) for r in report['kernels']}
  assert kernels == {'loop_add_fusion_1': (2.0, 1.0),
                     'mlorc_adam_sketch': (1.0, 1.0),
                     'void batch_parallel_jacobi_algo1<syevj>': (0.25, 0.5)}
  assert [(r['name'], r['ms']) for r in report['categories']] == [
      ('fusion', 2.0), ('pass 1 (sketch)', 1.0), ('eigh', 0.25)]
  assert report['categories'][0]['share'] == pytest.approx(2.0 / 3.25)


def test_step_profile_measures_each_steps_span_from_its_kernels():
  from benchmarks import step_profile  # pylint: disable=g-import-not-at-top

  # Two steps of two kernels (listed out of order): busy 3 and 2 ms; idle
  # 1 ms between the first step's kernels, 0.5 ms in the second's.
  report = step_profile.summarize(_trace([
      ('b', 2000.0, 13000.0), ('a', 1000.0, 10000.0),
      ('a', 1000.0, 50000.0), ('b', 1000.0, 51500.0)]), steps=2)
  assert report['step_ms'] == pytest.approx(2.5)
  assert report['span_ms'] == pytest.approx((5.0 + 2.5) / 2)
  assert report['launches'] == 2
  # A trace whose kernels do not split into equal steps has no span.
  odd = step_profile.summarize(_trace([('a', 1.0, 0.0)] * 3), steps=2)
  assert odd['span_ms'] is None


def test_step_profile_runs_on_the_cpu(tmp_path):
  from benchmarks import step_profile  # pylint: disable=g-import-not-at-top

  report = step_profile.main(['--case', 'tiny', '--steps', '1', '--top', '3',
                              '--json', str(tmp_path / 'p.json')])
  assert report['ops'] and report['categories']
  assert json.loads((tmp_path / 'p.json').read_text())['case'] == 'tiny'


def test_memory_table_counts_the_states_of_both_optimizers():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import mlorc_optax  # pylint: disable=g-import-not-at-top

  params = {'w': jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  # adamw: two dense float32 moments and an int32 step count.
  assert memory_table.state_bytes(optax.adamw(1e-3), params) == (
      2 * 64 * 32 * 4 + 4)
  # mlorc_adamw: two moments of (m + n) r + r floats, plus a few scalars
  # (step counts, the sketch key).
  mlorc = memory_table.state_bytes(mlorc_optax.mlorc_adamw(1e-3, rank=4),
                                   params)
  assert 0 <= mlorc - 2 * ((64 + 32) * 4 + 4) * 4 < 64
  rows = _rows(memory_table.table([(64, 32)], 4, jnp.float32))
  assert rows[0][:3] == ['64 x 32', '8.0 KiB', '16.0 KiB']
  assert rows[0][4] == f'{mlorc / (2 * 64 * 32 * 4 + 4):.3%}'


def test_memory_table_runs_as_a_file_as_the_docs_build_does(monkeypatch):
  # docs/conf.py runs `benchmarks/memory_table.py` with runpy, as a script.
  script = Path(memory_table.__file__)
  monkeypatch.setattr(sys, 'argv', [str(script), '--rank', '8'])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    runpy.run_path(str(script), run_name='__main__')
  assert [row[0] for row in _rows(out.getvalue())] == [
      '4096 x 4096', '4096 x 11008']


def test_compressor_tracking_is_exact_at_full_rank_with_rsvd():
  import jax  # pylint: disable=g-import-not-at-top

  grads = compressor_tracking.gradients(jax.random.key(0), steps=5, rows=12,
                                        cols=8, true_rank=3, decay=0.8)
  errors = compressor_tracking.track(grads, 8, 'rsvd', {}, 0.9, 0.999, seed=0)
  assert errors.shape == (5, 3)
  # Rank 8 = min(rows, cols): the factors hold the moments to float32
  # rounding (m, v, and the update direction), far from rank 2's ~0.5.
  assert float(errors.max()) < 1e-4


def test_the_committed_compressor_results_render(tmp_path):
  saved = RESULTS / 'compressors' / 'results.json'
  results = compressor_tracking.main(['--render', str(saved), '--out',
                                      str(tmp_path)])
  rows = _rows((tmp_path / 'results.md').read_text().split('\n\n')[-1])
  assert len(rows) == len(results['rows']) + 1  # and the exact Adam row
  assert rows[0][:3] == ['rsvd', '4', '0.767 ± 0.018']
  assert (tmp_path / 'results.png').read_bytes().startswith(b'\x89PNG')
  assert not (tmp_path / 'results.json').exists()  # nothing was measured


def test_update_size_tool_reports_every_variant(tmp_path):
  out = tmp_path / 'update_size.json'
  rows = update_size.main(['--steps', '3', '--json', str(out)])
  assert [r['optimizer'] for r in rows] == list(update_size.VARIANTS)
  # Dense Adam never exceeds its own bound, and the default MLorc step is
  # clipped to it.
  by_name = {r['optimizer']: r for r in rows}
  assert by_name['adamw']['steps_over_adam_bound'] == 0
  assert by_name['mlorc_adamw default']['steps_over_adam_bound'] == 0
  assert json.loads(out.read_text())['rows'] == rows


def test_finetune_steps_times_each_method_against_its_base(tmp_path):
  out = finetune_steps.main([
      '--preset', 'tiny', '--methods', 'adamw', 'mlorc_adamw_r4', 'lion',
      'mlorc_lion_r4', '--json', str(tmp_path / 'f.json'), '--table',
      str(tmp_path / 'f.md')])
  rows = {r['method']: r for r in out['rows']}
  assert list(rows) == ['adamw', 'mlorc_adamw_r4', 'lion', 'mlorc_lion_r4']
  assert rows['mlorc_adamw_r4']['base'] == 'adamw'
  assert rows['mlorc_lion_r4']['base'] == 'lion'
  for r in rows.values():
    assert r['step_min_s'] <= r['step_s'] and r['steps_per_s'] > 0
  # speed = the base's step time / the method's; none for the bases.
  assert rows['mlorc_lion_r4']['speed'] == pytest.approx(
      rows['lion']['step_s'] / rows['mlorc_lion_r4']['step_s'])
  assert rows['adamw']['speed'] is None
  assert out['config']['calls'] == 3  # the tiny preset
  assert 'mlorc_adamw_r4' in (tmp_path / 'f.md').read_text()



def test_sketch_ablation_full_variant_is_the_library_pass(tmp_path):
  """The ablation's ``full`` kernel computes what the library's pass 1 does,
  so the other variants' times are differences from the real kernel; a
  variant that leaves a stage out changes only that stage's output."""
  from benchmarks import sketch_ablation  # pylint: disable=g-import-not-at-top

  x = sketch_ablation.inputs((2, 64, 128), 4, 'float32')
  library = mlorc_optax.kernels.sketch_pass(**x, interpret=True)
  run = lambda name, **kw: sketch_ablation.sketch_variant(
      **dict(x, **kw), variant=sketch_ablation.VARIANTS[name], interpret=True)
  full = run('full')
  # Interpret mode computes every dot in float32: the same expressions as
  # the library's kernel, equal to float32 rounding.
  for name, ours, theirs in zip(library._fields, full, library):
    scale = float(jnp.max(jnp.abs(theirs))) + 1.0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale,
                               err_msg=name)
  assert float(jnp.sum(library.neg_count)) > 0  # the fix's terms are exercised
  for name, same in (('reconstruct_fma', library),
                     ('shared_omega', mlorc_optax.kernels.sketch_pass(
                         **dict(x, omega_v=x['omega_m']), interpret=True))):
    for field, ours, theirs in zip(library._fields, run(name), same):
      scale = float(jnp.max(jnp.abs(theirs))) + 1.0
      np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale,
                                 err_msg=f'{name}: {field}')
  dropped = run('no_indicator_sketch')
  assert not np.any(dropped.neg_omega)
  np.testing.assert_array_equal(dropped.x_omega, full.x_omega)

  out = tmp_path / 'a.jsonl'
  rows = sketch_ablation.main(['--shape', '1', '32', '64', '--calls', '1',
                               '--variants', 'full', 'no_reconstruction',
                               '--json', str(out)])
  assert [r['variant'] for r in rows] == [
      'read', 'copy', 'library_sketch_pass', 'lion_sketch_pass', 'full',
      'no_reconstruction']
  for r in rows:
    assert 'error' not in r, r
  assert len(out.read_text().splitlines()) == len(rows)
  with pytest.raises(ValueError, match="--variants: unknown \\['nope'\\]"):
    sketch_ablation.main(['--variants', 'nope'])
  bad = sketch_ablation.Variant
  with pytest.raises(ValueError, match='variant.reconstruct'):
    sketch_ablation.sketch_variant(**x, variant=bad(reconstruct='dots'),
                                   interpret=True)
  with pytest.raises(ValueError, match=r"variant.sketches: unknown \['v'\]"):
    sketch_ablation.sketch_variant(**x, variant=bad(sketches=('g', 'v')),
                                   interpret=True)
