"""Tests of the LLaMA-style example (``examples/llama``) on CPU, tiny sizes."""

from __future__ import annotations

# The root conftest.py sets the XLA:CPU scheduler flag these tests need
# (examples.llama.train.CPU_DEADLOCK_FLAG) before JAX starts.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mlorc_optax
from examples.llama import data as data_lib
from examples.llama import fit_search
from examples.llama import model as model_lib
from examples.llama import train

VOCAB = 64


def tiny(**overrides) -> model_lib.LlamaConfig:
  """The ``tiny`` preset with a small vocabulary (fast on CPU)."""
  return model_lib.get_config('tiny', **{'vocab_size': VOCAB, **overrides})


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
  m = model_lib.create_model(
      tiny(param_dtype='bfloat16', compute_dtype='bfloat16', remat=True)
  )
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert m(jnp.zeros((1, 8), jnp.int32)).dtype == jnp.bfloat16


@pytest.mark.parametrize('scan', [True, False])
def test_causal_masking(scan):
  m = model_lib.create_model(tiny(scan_layers=scan, remat=scan))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 12)), jnp.int32)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % VOCAB)
  a, b = m(tokens), m(changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
  assert float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:]))) > 1e-4


def test_rotary_scores_depend_only_on_relative_position():
  head_dim = 16
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))

  def score(m, n):
    cq, sq = model_lib.rotary_angles(jnp.array([m]), head_dim, 10000.0)
    ck, sk = model_lib.rotary_angles(jnp.array([n]), head_dim, 10000.0)
    rq = model_lib.apply_rotary(q, cq, sq)
    rk = model_lib.apply_rotary(k, ck, sk)
    return float(jnp.sum(rq * rk))

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


def test_both_optimizers_lower_the_loss_and_compare_prints_a_table(capsys):
  # The step is compiled ahead of time and its output state fed back, so
  # this also checks that the state keeps its structure across steps.
  cfg = tiny()
  results = train.compare(
      cfg,
      batch=8,
      seq_len=32,
      steps=30,
      warmup=2,
      lr=3e-3,
      data='synthetic',
      verbose=True,
  )
  assert [r['optimizer'] for r in results] == ['mlorc_adamw', 'adamw']
  for r in results:
    assert r['status'] == 'ok', r['error']
    assert r['final_loss'] < r['first_loss'] - 1.0, r['optimizer']
    assert r['tokens_per_s'] > 0 and r['opt_state_bytes'] > 0
    assert r['compiled_memory']['estimated_peak_bytes'] > 0
  by_name = {r['optimizer']: r for r in results}
  assert (
      by_name['mlorc_adamw']['opt_state_bytes']
      < by_name['adamw']['opt_state_bytes']
  )
  out = capsys.readouterr().out
  assert '| mlorc_adamw (r=4) | ok |' in out
  assert 'mlorc_adamw / adamw tokens/s' in out
  ratio = train.tokens_per_s_ratio(results)
  assert ratio is not None and ratio > 0


def test_float32_moments_with_bfloat16_params():
  cfg = tiny(param_dtype='bfloat16', compute_dtype='bfloat16')
  for name, moment_dtype, want in [
      ('adamw', 'float32', {'float32'}),
      ('adamw', 'param', {'bfloat16'}),
      ('mlorc_adamw', 'float32', {'float32'}),
  ]:
    tx = train.make_optimizer(name, 1e-3, moment_dtype=moment_dtype)
    _, state = train.build(cfg, tx, abstract=True)
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


def test_fit_search_attempt_in_subprocess():
  # The search's defaults: bfloat16 parameters, remat, scanned blocks.
  spec = fit_search.AttemptSpec(
      preset='tiny',
      optimizer='mlorc_adamw',
      n_layers=1,
      batch=1,
      seq_len=16,
      steps=2,
  )
  assert spec.param_dtype == 'bfloat16' and spec.remat and spec.scan_layers
  r = fit_search.attempt_in_subprocess(spec, timeout=300, verbose=False)
  assert r['status'] == 'ok', r.get('error')
  assert r['param_bytes'] == 2 * spec.config().num_params()
  assert r['spec']['n_layers'] == 1
  assert r['param_count'] == spec.config().num_params()
  assert r['analytic']['total_bytes'] > r['analytic']['param_bytes'] > 0
  assert r['compiled_memory']['estimated_peak_bytes'] > 0
  table = fit_search.format_table([r])
  assert '| mlorc_adamw (r=4) | tiny |' in table
  best = fit_search.largest_fitting([r])
  assert best['mlorc_adamw'] is r


def test_fit_search_reports_failures_without_raising():
  spec = fit_search.AttemptSpec(
      preset='tiny', optimizer='adamw', n_layers=1, batch=1, seq_len=8
  )
  r = fit_search.attempt_in_subprocess(
      spec, timeout=0.01, verbose=False
  )  # cannot even start JAX
  assert r['status'] in ('timeout', 'crashed')
  assert not fit_search.largest_fitting([r])
  assert 'timeout' in fit_search.format_table([r]) or 'crashed' in (
      fit_search.format_table([r])
  )


# ---------------------------------------------------------------------------
# Data parallel and FSDP on simulated CPU devices (examples/llama/parallel.py).
# ---------------------------------------------------------------------------


def test_fsdp_shards_the_largest_axis_but_never_the_layer_axis():
  from examples.llama import parallel
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
  from examples.llama import parallel

  views = [(4, 64, 192), (1, 64, 64)]  # (slices, rows, cols)
  assert parallel.moves_dense_moment((64, 192), views)
  assert parallel.moves_dense_moment((4, 192, 64), views)
  assert parallel.moves_dense_moment((4096 * 2,), views)  # >= a whole leaf
  assert not parallel.moves_dense_moment((4, 64, 8), views)  # a sketch
  assert not parallel.moves_dense_moment((8, 192), views)


@pytest.fixture(scope='module')
def sharded_runs():
  """Single-device, DP and FSDP runs of mlorc_adamw on 4 CPU devices."""
  kwargs = dict(batch=8, seq_len=16, steps=4, warmup=1, lr=1e-2,
                data='synthetic', seed=0, verbose=False)
  return {
      mode: train.run(tiny(), 'mlorc_adamw', sharding=mode, devices=4,
                      **kwargs)
      for mode in ('none', 'dp', 'fsdp')
  }


def test_dp_and_fsdp_losses_equal_the_single_device_run(sharded_runs):
  base = sharded_runs['none']
  assert base['status'] == 'ok', base['error']
  assert base['losses'][-1] < base['losses'][0]
  for mode in ('dp', 'fsdp'):
    r = sharded_runs[mode]
    assert r['status'] == 'ok', r['error']
    assert r['devices'] == 4
    np.testing.assert_allclose(r['losses'], base['losses'], rtol=1e-5)


def test_fsdp_state_is_sharded_and_never_gathers_a_dense_moment(sharded_runs):
  fsdp, dp = sharded_runs['fsdp'], sharded_runs['dp']
  # FSDP keeps about a quarter of the optimizer state on each device; DP a
  # full replica.
  assert dp['opt_state_bytes_per_device'] == dp['opt_state_bytes']
  assert fsdp['opt_state_bytes_per_device'] < 0.5 * fsdp['opt_state_bytes']
  # DP's update needs no communication at all; FSDP's moves only the
  # randomized SVD's sketches, each smaller than any compressed matrix.
  assert dp['update_collectives']['count'] == 0
  coll = fsdp['update_collectives']
  assert coll['count'] > 0
  assert coll['dense_moment_transfers'] == 0
  assert fsdp['gathers_dense_moment'] is False
  for _, shape in coll['largest']:  # sketches: one side is the rank, 4
    assert 4 in shape, shape
