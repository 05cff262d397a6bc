"""Tests of the LLaMA-style example (``examples/llama``) on CPU, tiny sizes."""

from __future__ import annotations

# The root conftest.py sets the XLA:CPU scheduler flag these tests need
# (benchmarks.toolkit.environment.CPU_DEADLOCK_FLAG) and 8 simulated CPU
# devices before JAX starts.
import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from flax import nnx

import mlorc_optax
from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import data as data_lib
from examples.llama import fit_search
from examples.llama import measure
from examples.llama import model as model_lib
from examples.llama import parallel
from examples.llama import report
from examples.llama import scaling
from examples.llama import train

VOCAB = 64


def tiny(**overrides) -> model_lib.LlamaConfig:
  """The ``tiny`` preset with a small vocabulary (fast on CPU)."""
  return model_lib.get_config('tiny', **{'vocab_size': VOCAB, **overrides})


def table_rows(table: str) -> list[list[str]]:
  """The cells of a markdown table's body rows."""
  return [[c.strip() for c in line.split('|')[1:-1]]
          for line in table.splitlines()[2:]]


#: The example's ``cpu`` preset with a small vocabulary and short sequences.
CPU = config_lib.PRESETS['cpu'][1].replace(
    vocab_size=VOCAB, seq_len=16, lr=3e-3, log_every=0, quiet=True)


@pytest.fixture(scope='module')
def model() -> model_lib.Llama:
  return model_lib.create_model(tiny(), seed=0)


def test_presets_have_llama_shapes():
  c = model_lib.PRESETS['7b']
  assert (c.dim, c.n_layers, c.n_heads, c.ffn_dim, c.vocab_size) == (
      4096,
      32,
      32,
      11008,
      32000,
  )
  assert abs(c.num_params() - 6.74e9) < 0.01e9  # LLaMA-2-7B
  assert 90e6 < model_lib.PRESETS['small'].num_params() < 130e6
  abstract = model_lib.abstract_model(tiny(n_kv_heads=2))
  assert model_lib.param_count(abstract) == tiny(n_kv_heads=2).num_params()


def test_forward_shape_and_dtype(model):
  tokens = jnp.zeros((2, 16), jnp.int32)
  logits = model(tokens)
  assert logits.shape == (2, 16, VOCAB)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_init_is_bfloat16_everywhere():
  # From the traced initialisation and forward pass (nothing is computed).
  cfg = tiny(param_dtype='bfloat16', compute_dtype='bfloat16', remat=True)
  m = model_lib.abstract_model(cfg)
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  logits = jax.eval_shape(
      lambda: model_lib.create_model(cfg)(jnp.zeros((1, 8), jnp.int32)))
  assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize('scan', [True, False])
def test_causal_masking(scan):
  m = model_lib.create_model(tiny(scan_layers=scan, remat=scan))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 12)), jnp.int32)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % VOCAB)
  forward = nnx.jit(lambda m, t: m(t))
  a, b = forward(m, tokens), forward(m, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
  assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-4


def test_rotary_scores_depend_only_on_relative_position():
  head_dim = 16
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))

  @jax.jit
  def dot(m, n):
    cq, sq = model_lib.rotary_angles(jnp.stack([m]), head_dim, 10000.0)
    ck, sk = model_lib.rotary_angles(jnp.stack([n]), head_dim, 10000.0)
    rq = model_lib.apply_rotary(q, cq, sq)
    rk = model_lib.apply_rotary(k, ck, sk)
    return jnp.sum(rq * rk)

  score = lambda m, n: float(dot(m, n))

  for m, n in [(3, 1), (10, 2), (5, 5), (0, 7)]:
    for shift in (1, 13, 200):
      assert score(m, n) == pytest.approx(
          score(m + shift, n + shift), rel=1e-4, abs=1e-4
      )
  assert abs(score(3, 1) - score(3, 2)) > 1e-3  # positions do matter
  c, s = model_lib.rotary_angles(jnp.arange(4), head_dim, 10000.0)
  x = jax.random.normal(jax.random.key(2), (1, 4, 2, head_dim))
  np.testing.assert_allclose(  # a rotation: norms are kept
      jnp.linalg.norm(model_lib.apply_rotary(x, c, s), axis=-1),
      jnp.linalg.norm(x, axis=-1),
      rtol=1e-5,
  )
  np.testing.assert_allclose(  # position 0 is the identity
      model_lib.apply_rotary(x, c, s)[:, 0], x[:, 0], atol=1e-6
  )


def test_compression_plan_compresses_kernels_not_norms_or_embedding(model):
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=4)
  plan = mlorc_optax.compression_plan(tx, nnx.state(model, nnx.Param))
  leaves = {
      p.path: p
      for p in jax.tree.leaves(
          plan, is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan)
      )
  }
  compressed = {path for path, p in leaves.items() if p.compressed}
  assert compressed == {
      f'layers/{name}/kernel'
      for name in (
          'attn/q_proj',
          'attn/k_proj',
          'attn/v_proj',
          'attn/o_proj',
          'mlp/gate_proj',
          'mlp/up_proj',
          'mlp/down_proj',
      )
  } | {'lm_head/kernel'}
  for path in (
      'embed/embedding',
      'norm/scale',
      'layers/attn_norm/scale',
      'layers/mlp_norm/scale',
  ):
    assert not leaves[path].compressed, path
  # Stacked kernels are a batch of n_layers matrices.
  assert leaves['layers/mlp/up_proj/kernel'].view.batch_shape == (2,)
  assert 'embed/embedding' in mlorc_optax.format_plan(plan)


def test_synthetic_and_packed_batches_are_seeded():
  stream = data_lib.synthetic_stream(5000, VOCAB, seed=1)
  assert stream.dtype == np.int32 and stream.max() < VOCAB
  a = next(data_lib.packed_batches(stream, 3, 32, seed=4))
  b = next(data_lib.packed_batches(stream, 3, 32, seed=4))
  c = next(data_lib.packed_batches(stream, 3, 32, seed=5))
  assert a.shape == (3, 33) and a.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match='vocab_size'):
    next(data_lib.packed_batches(stream, 1, 8, vocab_size=VOCAB // 2))


@pytest.mark.assets
def test_review_token_stream_is_real_text():
  stream = data_lib.review_token_stream('test', limit=20)
  assert stream.dtype == np.int32
  assert stream.max() < data_lib.WORDPIECE_VOCAB_SIZE
  assert int(np.sum(stream == 102)) == 20  # one [SEP] after each review
  assert len(stream) > 20 * 30  # not truncated to a few tokens
  batch = next(data_lib.packed_batches(stream, 2, 64, vocab_size=32000))
  assert batch.shape == (2, 65)


# ---------------------------------------------------------------------------
# Settings and command line.
# ---------------------------------------------------------------------------


def test_model_names_are_the_model_presets():
  assert set(typing.get_args(config_lib.ModelName)) == set(model_lib.PRESETS)
  assert CPU.model_config() == tiny(n_kv_heads=2)
  # Giving n_heads alone gives plain multi-head attention.
  assert CPU.replace(n_heads=2).model_config().n_kv_heads == 2


@pytest.mark.parametrize('preset', sorted(config_lib.PRESETS))
def test_cli_args_parse_back_into_the_same_config(preset):
  config = config_lib.PRESETS[preset][1].replace(
      b1=0.85, optimizers=('adamw',), remat=True, scan=False, devices=None,
      result_json='/tmp/not/written.json')
  for first in sorted(config_lib.PRESETS):  # any preset: every flag is set
    args = config_lib.cli_args(config, first)
    parsed = tyro.extras.overridable_config_cli(config_lib.PRESETS, args=args)
    assert parsed == config.replace(result_json=None)


# ---------------------------------------------------------------------------
# Training and measuring, in this process.
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def runs():
  """Runs of the CPU preset by (optimizer, sharding), on 4 of the 8 devices.

  30 steps on one device for both optimizers (adamw also times its update
  alone); 4 steps of mlorc_adamw fully sharded.
  """
  out = {}
  for optimizer, mode, steps, time_update in [
      ('mlorc_adamw', 'none', 30, 0), ('adamw', 'none', 30, 2),
      ('mlorc_adamw', 'fsdp', 4, 0)]:
    config = CPU.replace(sharding=mode, devices=4, steps=steps,
                         time_update=time_update)
    out[optimizer, mode] = measure.run(config, optimizer)
  return out


def test_both_optimizers_lower_the_loss_and_the_table_compares_them(runs):
  results = [runs['mlorc_adamw', 'none'], runs['adamw', 'none']]
  for r in results:
    assert r['status'] == 'ok', r['error']
    assert r['final_loss'] < r['first_loss'] - 1.0, r['optimizer']
    assert r['tokens_per_s'] > 0 and r['opt_state_bytes'] > 0
    assert r['compiled_memory']['estimated_peak_bytes'] > 0
    assert r['timed_steps'] == 28 and len(r['losses']) == 30
    assert r['command'].startswith('python -m examples.llama.main cpu ')
  mlorc, adamw = results
  assert mlorc['opt_state_bytes'] < adamw['opt_state_bytes']
  assert 0 < adamw['update_time_s'] < adamw['step_time_s'] * 2
  rows = table_rows(report.comparison_table(results))
  assert [row[:2] for row in rows] == [['mlorc_adamw (r=4)', 'ok'],
                                       ['adamw', 'ok']]
  assert rows[1][3] == '1.000'  # tokens/s relative to adamw's
  assert report.tokens_per_s_ratio(results) == pytest.approx(
      mlorc['tokens_per_s'] / adamw['tokens_per_s'])
  assert 'batch 8 x seq 16' in report.setup_line(results)


def test_float32_moments_with_bfloat16_params():
  config = CPU.replace(param_dtype='bfloat16')
  create = lambda: model_lib.create_model(config.model_config())
  for name, moment_dtype, want in [
      ('adamw', 'float32', {'float32'}),
      ('adamw', 'param', {'bfloat16'}),
      ('mlorc_adamw', 'float32', {'float32'}),
  ]:
    tx = train.make_optimizer(name, config.replace(moment_dtype=moment_dtype))
    _, state = train.build(create, tx, abstract=True)
    floats = {
        str(x.dtype)
        for x in jax.tree.leaves(state[1]['opt_state'])
        if jnp.issubdtype(x.dtype, jnp.floating)
    }
    assert floats == want, (name, moment_dtype)


def test_mlorc_state_keeps_its_structure_under_nnx_optimizer():
  """Else nnx.jit recompiles at step 2 and an AOT-compiled step fails."""
  m = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(m, mlorc_optax.mlorc_adamw(1e-3, rank=2), wrt=nnx.Param)
  before = jax.tree.structure(nnx.state(opt))

  @nnx.jit
  def step(m, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 16))) ** 2))(m)
    opt.update(m, grads)

  step(m, opt)
  same = jax.tree.structure(nnx.state(opt)) == before
  assert same, 'the optimizer state changed structure after one update'


# ---------------------------------------------------------------------------
# One run per process (main.py as the child), and the fit search.
# ---------------------------------------------------------------------------


def test_isolated_compile_only_attempt_in_the_fit_search_settings():
  # The h100 search's settings (bfloat16 parameters, remat, scanned blocks)
  # at the tiny size, compiled from shapes only (--steps 0, what the cpu
  # search does): main.py runs in a child process and writes its record.
  search = fit_search.PRESETS['h100'][1]
  run = search.run.replace(model='tiny', n_layers=1, seq_len=16, steps=0)
  assert run.param_dtype == 'bfloat16' and run.remat and run.scan
  r = fit_search.attempt(dataclasses.replace(search, timeout=300), run,
                         'adamw')
  assert r['status'] == 'estimated', r.get('error')
  assert 'init_s' not in r and 'losses' not in r  # nothing allocated
  num_params = run.model_config().num_params()
  assert r['param_count'] == num_params
  assert r['param_bytes'] == 2 * num_params  # bfloat16
  assert r['config']['n_layers'] == 1
  assert r['compiled_memory']['estimated_peak_bytes'] > r['param_bytes']
  assert r['versions']['jax'] == jax.__version__
  assert fit_search.fits(r)  # CPU: no allocator limit
  row = table_rows(report.fit_table([r]))[0]
  assert row[:2] + row[3:5] == ['adamw', 'tiny', '1', 'estimated']
  assert fit_search.largest_fitting([r]) == {'adamw': r}


def test_a_failed_child_is_a_record_not_an_exception():
  r = measure.run_isolated(CPU, 'adamw', timeout=0.01)  # cannot start JAX
  assert r['status'] == 'timeout' and r['optimizer'] == 'adamw'
  assert not fit_search.largest_fitting([r])
  assert table_rows(report.fit_table([r]))[0][4].startswith('timeout')


def test_layer_search_finds_the_most_layers_that_fit():
  def attempts(limit):
    tried = []

    def try_layers(n):
      tried.append(n)
      return {'status': 'ok' if n <= limit else 'oom', 'optimizer': 'x',
              'param_count': n}

    return tried, try_layers

  tried, try_layers = attempts(limit=37)
  results = fit_search.search_layers(try_layers, 1, 64)
  assert tried[:2] == [1, 64] and len(tried) <= 2 + 6  # log2(63) bisections
  assert fit_search.largest_fitting(results)['x']['param_count'] == 37
  tried, try_layers = attempts(limit=0)
  assert not fit_search.largest_fitting(fit_search.search_layers(try_layers, 1,
                                                                 64))
  assert tried == [1]  # the smallest does not fit: stop


def test_compile_only_attempts_fit_by_the_estimate():
  estimated = {'status': 'estimated', 'bytes_limit': 100,
               'compiled_memory': {'estimated_peak_bytes': 90}}
  assert fit_search.fits(estimated)
  assert not fit_search.fits({**estimated, 'bytes_limit': 80})
  assert fit_search.fits({**estimated, 'bytes_limit': None})  # CPU: no limit
  assert not fit_search.fits({'status': 'oom'})


def test_scaling_summary_relates_each_run_to_its_baselines():
  def record(optimizer, mode, tokens_per_s, losses):
    return {'optimizer': optimizer, 'status': 'ok', 'settings':
            {'sharding': mode}, 'tokens_per_s': tokens_per_s,
            'losses': losses}

  results = scaling.summarise([
      record('adamw', 'none', 100.0, [3.0, 2.0]),
      record('mlorc_adamw', 'none', 80.0, [3.0, 2.5]),
      record('adamw', 'dp', 180.0, [3.0, 2.01]),
      record('mlorc_adamw', 'dp', 120.0, [3.0, 2.6]),
  ], loss_tol=0.02)
  by = {(r['optimizer'], r['mode']): r for r in results}
  assert by['mlorc_adamw', 'dp']['speedup'] == pytest.approx(1.5)
  assert by['mlorc_adamw', 'dp']['ratio_vs_adamw'] == pytest.approx(2 / 3)
  assert by['adamw', 'dp']['max_loss_diff'] == pytest.approx(0.01)
  assert by['adamw', 'dp']['losses_match']
  assert not by['mlorc_adamw', 'dp']['losses_match']  # 0.1 > 0.02
  rows = table_rows(report.scaling_table(results))
  assert [row[:2] for row in rows] == [
      ['adamw', 'none'], ['mlorc_adamw', 'none'], ['adamw', 'dp'],
      ['mlorc_adamw', 'dp']]
  assert rows[3][5:7] == ['1.50', '0.667']  # speed-up, ratio vs adamw


# ---------------------------------------------------------------------------
# Data parallel and FSDP on simulated CPU devices (examples/llama/parallel.py).
# ---------------------------------------------------------------------------


def test_fsdp_shards_the_largest_axis_but_never_the_layer_axis():
  from jax.sharding import PartitionSpec as P

  spec = parallel.param_spec
  assert spec(('layers', 'mlp', 'up_proj', 'kernel'), (4, 64, 192), 'fsdp',
              4) == P(None, None, 'data')
  assert spec(('layers', 'attn', 'o_proj', 'kernel'), (8, 64, 64), 'fsdp',
              8) == P(None, 'data', None)
  assert spec(('embed', 'embedding'), (64, 32), 'fsdp', 4) == P('data', None)
  assert spec(('norm', 'scale'), (64,), 'fsdp', 4) == P()
  assert spec(('lm_head', 'kernel'), (63, 35), 'fsdp', 4) == P()
  assert spec(('lm_head', 'kernel'), (64, 32), 'dp', 4) == P()
  with pytest.raises(ValueError, match='mode'):
    spec(('w',), (4, 4), 'tp', 2)
  with pytest.raises(ValueError, match='devices'):
    parallel.make_mesh(len(jax.devices()) + 1)


def test_dense_moment_transfers_are_recognised_by_shape():
  views = [(4, 64, 192), (1, 64, 64)]  # (slices, rows, cols)
  assert parallel.moves_dense_moment((64, 192), views)
  assert parallel.moves_dense_moment((4, 192, 64), views)
  assert parallel.moves_dense_moment((4096 * 2,), views)  # >= a whole leaf
  assert not parallel.moves_dense_moment((4, 64, 8), views)  # a sketch
  assert not parallel.moves_dense_moment((8, 192), views)


def test_fsdp_losses_equal_the_single_device_run(runs):
  base, fsdp = runs['mlorc_adamw', 'none'], runs['mlorc_adamw', 'fsdp']
  assert fsdp['status'] == 'ok', fsdp['error']
  assert fsdp['devices'] == 4
  # The same batches; float32 sums in another order (rounding only).
  np.testing.assert_allclose(fsdp['losses'], base['losses'][:4], rtol=1e-5)


def test_fsdp_state_is_sharded_and_never_gathers_a_dense_moment(runs):
  fsdp = runs['mlorc_adamw', 'fsdp']
  # About a quarter of the optimizer state on each device.
  assert fsdp['opt_state_bytes_per_device'] < 0.5 * fsdp['opt_state_bytes']
  # The update moves only the randomized SVD's sketches, each smaller than
  # any compressed matrix.
  coll = fsdp['update_collectives']
  assert coll['count'] > 0
  assert coll['dense_moment_transfers'] == 0
  assert fsdp['gathers_dense_moment'] is False
  # Sketches: one side is the sketch width, rank 4 + the default
  # oversampling 4 (or the rank, for U^T g).
  for _, shape in coll['largest']:
    assert min(shape[-2:]) <= 4 + 4, shape


def test_dp_replicates_the_state_and_its_update_needs_no_transfer():
  mesh = parallel.make_mesh(4)
  graphdef, state, shardings = parallel.build_sharded(
      lambda: model_lib.create_model(CPU.model_config()),
      train.make_optimizer('mlorc_adamw', CPU), mesh, 'dp')
  opt_state = state[1]['opt_state']
  assert toolkit.memory.bytes_on_device(
      opt_state, mesh.devices.flat[0]) == toolkit.memory.tree_bytes(opt_state)
  # Every device runs the whole update on its replica: nothing to exchange.
  assert measure.update_transfers(graphdef, state, shardings,
                                  CPU.rank)['count'] == 0
