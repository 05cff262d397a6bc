"""Specification of the options beyond the paper: the update bound and the
complement of the compressed first moment (``docs/quality.md``).

* ``update_bound='adam'`` (MLorc-AdamW's default) clips every update entry of
  a compressed leaf to the largest value dense Adam's update can take at that
  step (``low_rank.adam_update_bound``); ``update_bound=None`` is Algorithm 1.
* ``complement=lam`` adds ``lam (1 - decay^(t-1)) (I - U U^T) g`` to the
  previous first moment for the update only (``low_rank.MomentSpec``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from benchmarks import update_size
from mlorc_optax import kernels
from mlorc_optax import low_rank
from mlorc_optax._src import plan as plan_lib

import numpy_reference as ref
from closeness import assert_close, assert_close_but_for_the_fix, grads_for
from helpers import FULL, run_steps

F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------
# The bound is dense Adam's own, and it is tight.


@pytest.mark.parametrize('b1,b2,nesterov', [
    (0.9, 0.999, False), (0.8, 0.999, False), (0.9, 0.99, False),
    (0.95, 0.9, False), (0.9, 0.999, True)])
def test_dense_adam_never_exceeds_the_bound(b1, b2, nesterov):
  # Heavy-tailed gradients whose scale jumps by up to 1e4 between steps:
  # quiet stretches followed by spikes are where |m_hat| / sqrt(v_hat) peaks.
  rng = np.random.default_rng(0)
  steps = 60
  scales = 10.0 ** rng.uniform(-2, 2, size=(steps, 1))
  grads = scales * rng.standard_t(1.5, size=(steps, 4096))
  adam = optax.scale_by_adam(b1, b2, eps=0.0, nesterov=nesterov)
  state = adam.init(jnp.zeros(4096))
  for t, g in enumerate(grads, start=1):
    u, state = adam.update(jnp.asarray(g, jnp.float32), state)
    bound = float(low_rank.adam_update_bound(b1, b2, t, nesterov))
    # float32 rounding of the EMAs and of the bound: a few ulps relative.
    assert float(jnp.max(jnp.abs(u))) <= bound * (1 + 64 * F32_EPS), t


@pytest.mark.parametrize('t', [1, 2, 10, 80])
def test_the_bound_is_attained(t):
  """Cauchy-Schwarz is an equality for ``g_i ~ (b1 / b2)^(t - i)``."""
  b1, b2 = 0.9, 0.999
  adam = optax.scale_by_adam(b1, b2, eps=0.0)
  state = adam.init(jnp.zeros(1))
  for i in range(1, t + 1):
    u, state = adam.update(jnp.full(1, (b1 / b2) ** (t - i), jnp.float32),
                           state)
  # float32: each of the t moving-average steps rounds once, and a rounding
  # of b2**t (the only power near 1) is amplified by 1 / (1 - b2**t) in the
  # bias correction, computed in float32 by optax and by the bound alike.
  rtol = 4 * t * F32_EPS + 4 * F32_EPS / (1 - b2**t)
  np.testing.assert_allclose(u[0], low_rank.adam_update_bound(b1, b2, t, False),
                             rtol=rtol)
  # Against float64: float32(b2) itself is off by up to eps / 2, which moves
  # 1 - b2 (and every 1 - b2**t) by up to eps / (2 (1 - b2)) relative.
  np.testing.assert_allclose(low_rank.adam_update_bound(b1, b2, t, False),
                             ref.adam_bound(b1, b2, t),
                             rtol=rtol + F32_EPS / (1 - b2))


def test_the_documented_limits_of_the_bound():
  big = 10**6
  np.testing.assert_allclose(
      low_rank.adam_update_bound(0.9, 0.999, big, False), 7.27, atol=5e-3)
  np.testing.assert_allclose(
      low_rank.adam_update_bound(0.8, 0.999, big, False), 10.55, atol=5e-3)
  assert low_rank.adam_update_bound(0.9, 0.999, 1, False) == 1.0


# ----------------------------------------------------------------------------
# MLorc-AdamW's largest update entry, as a user sees it.


def _regression_max_updates(tx):
  """Per-step largest |update| / lr on the 64 x 64 regression of
  ``benchmarks/update_size.py`` (150 steps, learning rate 1e-2)."""
  return update_size.train_regression(tx, steps=150, lr=1e-2)[0]


def test_default_mlorc_adamw_updates_stay_within_adams_bound():
  """The issue's user check: with defaults the largest entry of an update is
  at most ``adam_update_bound(b1, b2, t)`` times the learning rate (<= 7.3
  for the default betas at any step), where the paper's step is not."""
  common = dict(learning_rate=1e-2, weight_decay=0.0, rank=4)
  ours = _regression_max_updates(mlorc_optax.mlorc_adamw(**common))
  paper = _regression_max_updates(
      mlorc_optax.mlorc_adamw(**common, update_bound=None))
  bounds = np.array([float(low_rank.adam_update_bound(0.9, 0.999, t, False))
                     for t in range(1, len(ours) + 1)])
  # lr * bound rounds once more in float32, and apply_updates once.
  assert np.all(ours <= bounds * (1 + 8 * F32_EPS))
  assert np.max(ours) <= 7.3
  assert np.any(paper > bounds * 1.5)  # the guard was needed on this task


# ----------------------------------------------------------------------------
# The complement.


def test_complement_leaves_the_first_step_adams():
  grads = grads_for({'w': (24, 16), 'stack': (2, 12, 20)}, 1, seed=3)[0]
  tx = mlorc_optax.scale_by_mlorc_adam(rank=2, complement=1.0)
  ours, _ = jax.jit(tx.update)(grads, tx.init(grads))
  adam = optax.scale_by_adam()
  theirs, _ = jax.jit(adam.update)(grads, adam.init(grads))
  for k in grads:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=4 * F32_EPS, atol=0)


def test_complement_credits_nothing_where_the_factors_do_not_truncate():
  """At rank >= min(m, n) the moment is exact: a tall matrix's gradient has
  columns outside its moment's span, but none of its history was lost, so
  the step stays dense Adam's (and the plan says the RSVD is exact)."""
  grads = grads_for({'w': (24, 6)}, 5, seed=8)
  tx = mlorc_optax.scale_by_mlorc_adam(rank=6, complement=1.0,
                                       low_rank_mask=True)
  plan = mlorc_optax.compression_plan(tx, grads[0])['w']
  assert plan.compressed and not plan.truncates
  ours, _ = run_steps(tx, grads)
  theirs, _ = run_steps(optax.scale_by_adam(), grads)
  # The exact RSVD's factors reproduce the moments to float32 rounding of
  # their largest entry (README, "Precision and bad input").
  for a, b in zip(ours, theirs):
    assert_close(a['w'], b['w'], 1e-4)


@pytest.mark.parametrize('lam,bounded,mode', [
    (1.0, True, 'moment'), (0.3, False, 'moment'), (1.0, True, 'state'),
    (0.5, False, 'norm')])
def test_adam_complement_matches_dense_numpy(lam, bounded, mode):
  shapes = {'a': (20, 12), 'b': (2, 10, 16), 'c': (7, 30)}
  rank, seed, eps = 3, 42, 1e-2
  grads = grads_for(shapes, 6)
  tx = mlorc_optax.scale_by_mlorc_adam(
      0.9, 0.999, eps, rank=rank, seed=seed, low_rank_mask=True,
      complement=lam, complement_mode=mode,
      update_bound='adam' if bounded else None, oversample=0)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, 0.9,
                             0.999, eps, bounded=bounded, lam=lam, mode=mode)
  plain = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.999,
                         eps, bounded=bounded)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs, without = reference.step(g), plain.step(g)
    for k in shapes:
      assert_close_but_for_the_fix(ours[k], theirs[k], 5e-4,
                                   f'step {t}, leaf {k}')
  assert not np.allclose(theirs['a'], without['a'], rtol=1e-2)
  # The stored moment: the paper's ('moment', 'norm'; the complement never
  # reaches it) or the credited one ('state'), as the reference keeps it.
  for k in shapes:
    assert_close(mlorc_optax.compressors.reconstruct(state.inner_state.mu[k]),
                 ref.reconstruct(*reference.factors[k]['mu']), 1e-4)


@pytest.mark.parametrize('mode', ['moment', 'state', 'norm'])
def test_lion_complement_matches_dense_numpy(mode):
  shapes = {'a': (20, 12), 'b': (2, 10, 16)}
  rank, seed = 3, 7
  grads = grads_for(shapes, 6, seed=1)
  tx = mlorc_optax.scale_by_mlorc_lion(0.9, 0.99, rank=rank, seed=seed,
                                       low_rank_mask=True, complement=1.0,
                                       complement_mode=mode, oversample=0)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcLion(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.99,
                            lam=1.0, mode=mode)
  changed = 0
  plain = ref.MLorcLion(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.99)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs, without = reference.step(g), plain.step(g)
    for k in shapes:
      if mode == 'norm':  # sign(c) + phi c; an entry with c ~ 0 may flip
        assert_close_but_for_the_fix(ours[k], theirs[k], 1e-3,
                                     f'step {t}, leaf {k}', 1e-2)
      else:  # signs; an entry with c ~ 0 may flip
        assert np.mean(np.asarray(ours[k]) != theirs[k]) <= 1e-2, (t, k)
      changed += np.sum(theirs[k] != without[k])
  assert changed > 0  # the complement changed the update
  for k in shapes:
    assert_close(mlorc_optax.compressors.reconstruct(state.inner_state.mu[k]),
                 ref.reconstruct(*reference.factors[k]), 1e-4)


@pytest.mark.parametrize('make', [mlorc_optax.scale_by_mlorc_adam,
                                  mlorc_optax.scale_by_mlorc_lion])
def test_two_pass_complement_equals_the_reference_step(make):
  # The complement is computed by the two-pass step itself (two_pass.py),
  # the same for the Pallas passes and their jax.numpy references: the
  # Pallas passes (interpret mode) are tested here. 'w' takes them, and
  # 'odd' too, zero-padded to whole tiles.
  implementation = 'pallas'
  shapes = {'w': (2, 64, 128), 'odd': (20, 30)}
  # The gradients of test_two_pass_step.py: with these, the second moment's
  # rank-r truncation has a clear gap at every step, so the two float32
  # computations keep the same subspace (with or without the complement).
  grads = grads_for(shapes, 4, seed=1)
  # eps keeps entries whose reconstructed second moment is ~0 (where the
  # two float32 computations may disagree on the fix) from dominating.
  eps = {'eps': 1e-2} if make is mlorc_optax.scale_by_mlorc_adam else {}
  results = {}
  for impl in ('reference', implementation):
    tx = make(implementation=impl, kernel_config=FULL, complement=0.7,
              low_rank_mask=True, **eps)
    results[impl] = run_steps(tx, grads)
  for t, (ours, theirs) in enumerate(zip(results[implementation][0],
                                         results['reference'][0])):
    for k in shapes:
      if make is mlorc_optax.scale_by_mlorc_lion:
        assert np.mean(np.asarray(ours[k]) != np.asarray(theirs[k])) <= 1e-3
      else:
        assert_close_but_for_the_fix(ours[k], theirs[k], 5e-4,
                                     f'step {t}, leaf {k}')
  for k in shapes:
    assert_close(
        mlorc_optax.compressors.reconstruct(
            results[implementation][1].inner_state.mu[k]),
        mlorc_optax.compressors.reconstruct(
            results['reference'][1].inner_state.mu[k]), 1e-4)


def test_complement_is_static_under_inject_hyperparams():
  """STATIC_ARGS lists complement: 0 must stay a Python 0 (no complement
  computed), and every other value works as given."""
  assert 'complement' in mlorc_optax.STATIC_ARGS
  grads = grads_for({'w': (24, 16)}, 3, seed=6)
  params = {'w': jnp.zeros((24, 16))}
  # Without oversampling: the comparison is of the complement's handling;
  # the unset complement (None) is static too.
  for weight in (0.0, 0.5, None):
    direct = mlorc_optax.mlorc_adamw(1e-2, complement=weight, oversample=0)
    injected = optax.inject_hyperparams(
        mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
            learning_rate=1e-2, complement=weight, oversample=0)
    a, _ = run_steps(direct, grads, params)
    b, _ = run_steps(injected, grads, params)
    # Two programs (the injected rate is an array): float32 rounding of
    # the projections differs, and Adam's division by sqrt(v) amplifies it
    # where v is small; 1e-4 of the largest entry is far below what a
    # changed weight moves (0.5 against 0: 1e-1 of it).
    for x, y in zip(a, b):
      assert_close(x['w'], y['w'], 1e-4)


# ----------------------------------------------------------------------------
# The factored second moment (contrib.FactoredSecondMoment).


def test_factored_second_moment_matches_dense_numpy():
  shapes = {'a': (20, 12), 'b': (2, 10, 16)}
  rank, seed, eps = 3, 42, 1e-2
  grads = grads_for(shapes, 5)
  tx = mlorc_optax.scale_by_mlorc_adam(
      0.9, 0.999, eps, rank=rank, seed=seed, low_rank_mask=True,
      compressor=mlorc_optax.contrib.FactoredSecondMoment(), complement=0.0)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, 0.9,
                             0.999, eps, factored=True)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs = reference.step(g)
    for k in shapes:  # no fix, so no entry may flip: plain closeness
      assert_close(ours[k], theirs[k], 5e-4, f'step {t}, leaf {k}')
  for k, (*batch, m, n) in shapes.items():
    nu = state.inner_state.nu[k]
    assert isinstance(nu, mlorc_optax.contrib.FactoredMoment)
    assert nu.row.shape == (*batch, m, 1) and nu.col.shape == (*batch, n, 1)
    row, col = reference.factors[k]['rows_cols']
    assert_close(nu.row[..., 0], row, 1e-5)
    assert_close(nu.col[..., 0], col, 1e-5)


def test_factored_second_moment_state_size_is_m_plus_n():
  tx = mlorc_optax.mlorc_adamw(
      1e-3, rank=4, compressor=mlorc_optax.contrib.FactoredSecondMoment())
  plan = mlorc_optax.compression_plan(tx, {'w': jnp.zeros((3, 64, 32))})
  assert plan['w'].factor_sizes == (3 * ((64 + 32) * 4 + 4), 3 * (64 + 32))
  assert plan['w'].state_size == sum(plan['w'].factor_sizes)
  assert plan['w'].step == 'reference'  # the two passes compute RSVDs only


# ----------------------------------------------------------------------------
# The defaults beyond the paper, and the paper one splat away.


@pytest.mark.parametrize('make,explicit,paper', [
    (mlorc_optax.mlorc_adamw,
     dict(complement=1.0, oversample=4, update_bound='adam'),
     mlorc_optax.PAPER_ADAMW),
    (mlorc_optax.mlorc_lion, dict(complement=1.0, oversample=4),
     mlorc_optax.PAPER_LION),
])
def test_the_defaults_are_the_complement_and_oversampling(make, explicit,
                                                          paper):
  grads = grads_for({'w': (24, 20)}, 4, seed=3)
  default = run_steps(make(1e-2), grads)
  jax.tree.map(np.testing.assert_array_equal, default,
               run_steps(make(1e-2, **explicit), grads))
  plain = run_steps(make(1e-2, complement=0.0, oversample=0,
                         **({'update_bound': None} if 'update_bound' in paper
                            else {})), grads)
  jax.tree.map(np.testing.assert_array_equal,
               run_steps(make(1e-2, **paper), grads), plain)
  # Each default changes the steps after the first (the complement's weight
  # is 0 at step 1), so the splat really is the paper's step.
  assert not np.allclose(default[0][-1]['w'], plain[0][-1]['w'])


def test_the_default_complement_applies_only_where_there_is_one():
  grads = grads_for({'w': (24, 20)}, 3, seed=4)
  # The first moment dense, or a compressor without an orthonormal basis:
  # the unset complement is 0 there (an explicit one raises, below).
  for kwargs in (dict(compress=('nu',)),
                 dict(compressor=mlorc_optax.contrib.LoRAPreCompressor())):
    got = run_steps(mlorc_optax.mlorc_adamw(1e-2, **kwargs), grads)
    want = run_steps(mlorc_optax.mlorc_adamw(1e-2, complement=0.0, **kwargs),
                     grads)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_compressor_object_keeps_its_own_oversampling():
  warm = mlorc_optax.contrib.WarmStartCompressor()
  tx = mlorc_optax.mlorc_adamw(1e-2, compressor=warm)
  grads = grads_for({'w': (24, 20)}, 3, seed=5)
  jax.tree.map(
      np.testing.assert_array_equal, run_steps(tx, grads),
      run_steps(mlorc_optax.mlorc_adamw(1e-2, compressor=warm, complement=1.0),
                grads))
  with pytest.raises(ValueError, match='oversample must be set on it'):
    mlorc_optax.mlorc_adamw(1e-2, compressor=warm, oversample=4)


# ----------------------------------------------------------------------------
# Bad input names the argument.


@pytest.mark.parametrize('make,kwargs,error,match', [
    (mlorc_optax.mlorc_adamw, dict(complement=-0.5), ValueError,
     'complement'),
    (mlorc_optax.mlorc_adamw, dict(complement=1.0, compress=('nu',)),
     ValueError, 'complement.*first moment dense'),
    (mlorc_optax.mlorc_adamw,
     dict(complement=1.0, compressor=mlorc_optax.contrib.LoRAPreCompressor()),
     ValueError, r"moments\['mu'\].complement.*left_basis"),
    (mlorc_optax.mlorc_adamw, dict(update_bound='dense'), ValueError,
     'update_bound'),
    (mlorc_optax.mlorc_adamw, dict(update_bound=0.0), ValueError,
     'update_bound'),
    (mlorc_optax.mlorc_lion, dict(complement=float('nan')), ValueError,
     'complement'),
    (mlorc_optax.mlorc_adamw, dict(complement_mode='fira'), ValueError,
     r"complement_mode must be one of \('moment', 'state', 'norm'\)"),
    (mlorc_optax.mlorc_lion, dict(complement_mode='norm',
                                  implementation='pallas'), ValueError,
     "complement_mode='norm' has no two-pass step"),
])
def test_bad_options_are_rejected_naming_the_argument(make, kwargs, error,
                                                      match):
  with pytest.raises(error, match=match):
    make(1e-3, **kwargs)


@pytest.mark.parametrize('make', [mlorc_optax.mlorc_adamw,
                                  mlorc_optax.mlorc_lion])
@pytest.mark.parametrize('mode', ['state', 'norm'])
def test_other_complement_modes_take_the_reference_step(make, mode,
                                                        monkeypatch):
  """Only complement_mode='moment' has a two-pass step; the automatic
  choice says why it keeps the reference step, even on a GPU."""
  monkeypatch.setattr(plan_lib, 'on_nvidia_gpu', lambda: True)
  plan = mlorc_optax.compression_plan(make(1e-3, complement_mode=mode),
                                      {'w': jnp.zeros((64, 128))})['w']
  assert (plan.step, plan.step_reason) == (
      'reference', f"automatic: complement_mode={mode!r} has no two-pass "
      'step')
  # Without a complement the mode changes nothing: the two-pass step runs.
  plan = mlorc_optax.compression_plan(
      make(1e-3, complement=0.0, complement_mode=mode,
           implementation='pallas'), {'w': jnp.zeros((64, 128))})['w']
  assert plan.step == 'pallas'


def test_low_rank_moments_rejects_a_complement_it_cannot_compute():
  with pytest.raises(ValueError, match=r"moments\['nu'\].complement.*non-neg"):
    mlorc_optax.low_rank_moments(
        optax.scale_by_adam(),
        moments={'nu': low_rank.MomentSpec(True, 0.999, complement=1.0)})
  with pytest.raises(ValueError, match=r"moments\['mu'\].complement.*decay"):
    mlorc_optax.low_rank_moments(
        optax.scale_by_adam(), moments={'mu': low_rank.MomentSpec(
            complement=1.0)})
  with pytest.raises(TypeError, match='update_bound'):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), update_bound=3.0)
  with pytest.raises(ValueError,
                     match=r"moments\['mu'\].complement_mode must be one of"):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), moments={
        'mu': low_rank.MomentSpec(decay=0.9, complement_mode='fira')})
