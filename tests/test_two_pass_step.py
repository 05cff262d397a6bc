"""Specification of the two-pass step as the MLorc transforms take it.

The plan of :func:`mlorc_optax.low_rank_moments` gives each compressed leaf a
step (``'reference'``, ``'xla'`` or ``'pallas'``); these tests check that the
two-pass steps compute what the reference step and the dense NumPy
Algorithms 1 and 2 compute, that the plan chooses and explains the step, and
that settings the two passes cannot compute are refused. The kernels
themselves are specified in ``test_kernels.py``.

The Pallas kernels run in interpret mode on CPU. Updates of one step agree to
1e-4 of the largest update entry: where the reconstructed second moment
nearly cancels (``v~ ~ 0``), the float32 rounding of either reconstruction is
a large relative error of that entry, and ``m / sqrt(v)`` magnifies it. Over
several steps those differences feed the next factors, so the multi-step
comparisons use ``eps = 1e-2``, which bounds how much ``m / (sqrt(v) + eps)``
can magnify them, and agree to 5e-4, except at the few entries where the fix
of equation (2) is discontinuous (:func:`closeness.assert_close_but_for_the_fix`).
On a GPU the kernels' sketch and projection products are TF32 unless the
kernel config asks otherwise; these tests ask for float32-level products
(``FULL``), so they hold compiled too.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax import kernels
from mlorc_optax._src import plan as plan_lib

import numpy_reference as ref
from closeness import assert_close, assert_close_but_for_the_fix, grads_for
from helpers import FULL, run_steps

B1, B2 = 0.9, 0.999


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_two_pass_matches_dense_numpy_algorithm_1(implementation):
  shapes = {'a': (32, 48), 'b': (2, 16, 64), 'c': (48, 96)}
  rank, seed = 3, 42
  grads = grads_for(shapes, 6)
  tx = mlorc_optax.scale_by_mlorc_adam(
      B1, B2, 1e-2, rank=rank, seed=seed, low_rank_mask=True,
      implementation=implementation, kernel_config=FULL, complement=0.0,
      oversample=0)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcAdamW(shapes, jax.random.PRNGKey(seed), rank, B1, B2,
                             1e-2)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs = reference.step(g)
    for k in shapes:
      assert_close_but_for_the_fix(ours[k], theirs[k], 5e-4,
                                   f'step {t}, leaf {k}')
  for k in shapes:
    ours = mlorc_optax.compressors.reconstruct(state.inner_state.mu[k])
    assert_close(ours, ref.reconstruct(*reference.factors[k]['mu']), 1e-4)


@pytest.mark.parametrize('settings', [
    dict(),
    dict(compressor=mlorc_optax.contrib.WarmStartCompressor()),
    dict(nesterov=True, eps_root=1e-12),
    dict(oversample=3),
    dict(factor_dtype=jnp.bfloat16),
    dict(b1=0.8, b2=0.95, rank=8),
])
def test_pallas_step_equals_reference_step(settings):
  shapes = {'w': (3, 64, 128)}
  if not settings:  # once: padded to tiles, exact, not compressed, and
    # two equal-shaped leaves, whose sketches the fast step draws in one call
    shapes.update({'x': (128, 32), 'y': (128, 32), 'bias': (32,),
                   'odd': (20, 30), 'full': (64, 4)})
  grads = grads_for(shapes, 4, seed=1)
  results = {}
  for impl in ('reference', 'pallas'):
    tx = mlorc_optax.scale_by_mlorc_adam(
        eps=1e-2, implementation=impl, kernel_config=FULL,
        low_rank_mask=lambda p: {k: v.ndim >= 2 for k, v in p.items()},
        **settings)
    results[impl] = run_steps(tx, grads)
  for t, (ours, theirs) in enumerate(zip(results['pallas'][0],
                                         results['reference'][0])):
    for k in shapes:
      if 'factor_dtype' in settings:
        # bfloat16 factors round the two runs' float32 factors apart by up to
        # one bfloat16 ulp (4e-3), which moves many more entries of the
        # reconstructed second moment across zero.
        assert_close_but_for_the_fix(ours[k], theirs[k], 2e-2,
                                     f'step {t}, leaf {k}')
      else:
        # With oversampling the RSVD truncates at the r-th singular value;
        # where the gap to the next is small, two float32 computations keep
        # slightly different subspaces of the second moment, which moves
        # more entries across zero (0.55% after 4 steps on an H100).
        assert_close_but_for_the_fix(
            ours[k], theirs[k], 5e-4, f'step {t}, leaf {k}',
            1e-2 if 'oversample' in settings else 1e-3)
  shapes_dtypes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert shapes_dtypes(results['pallas'][1].inner_state) == shapes_dtypes(
      results['reference'][1].inner_state)


def test_the_plan_records_which_leaf_takes_which_step_and_why():
  params = {'w': jnp.zeros((3, 64, 128)), 'odd': jnp.zeros((20, 30)),
            'full': jnp.zeros((64, 4)), 'bias': jnp.zeros(32)}
  tx = mlorc_optax.mlorc_adamw(1e-3, implementation='pallas',
                               low_rank_mask=lambda p: jax.tree.map(
                                   lambda x: x.ndim >= 2, p))
  plan = mlorc_optax.compression_plan(tx, params)
  assert plan['w'].step == 'pallas'
  assert (plan['odd'].step, plan['odd'].step_reason) == (
      'pallas', "implementation='pallas'; 20x30 padded to 32x32 tiles")
  assert plan['full'].step == 'reference'
  assert 'identity' in plan['full'].step_reason
  assert (plan['bias'].step, plan['bias'].step_reason) == (
      'dense', 'not compressed')
  table = mlorc_optax.format_plan(plan)
  assert '| pallas |' in table and 'padded to 32x32 tiles' in table


@pytest.mark.parametrize('make', [mlorc_optax.mlorc_adamw,
                                  mlorc_optax.mlorc_lion])
def test_automatic_choice_is_the_kernels_on_one_nvidia_gpu_only(make):
  params = {'w': jnp.zeros((64, 128))}
  plan = mlorc_optax.compression_plan(make(1e-3), params)['w']
  on_one_gpu = (jax.default_backend() == 'gpu' and jax.device_count() == 1
                and 'nvidia' in jax.devices()[0].device_kind.lower())
  assert plan.step == ('pallas' if on_one_gpu else 'reference')
  assert plan.step_reason.startswith('automatic: ')
  blocked = mlorc_optax.compression_plan(make(1e-3, power_iters=1), params)
  assert blocked['w'].step == 'reference'
  assert 'power iterations' in blocked['w'].step_reason


def test_bfloat16_params_keep_their_dtype_and_match():
  shapes = {'w': (2, 64, 128)}
  grads = grads_for(shapes, 4, dtype=jnp.bfloat16, seed=2)
  outs = {}
  for impl in ('reference', 'pallas'):
    outs[impl], _ = run_steps(mlorc_optax.mlorc_adamw(
        1.0, eps=1e-2, weight_decay=0.0, implementation=impl,
        kernel_config=FULL), grads)
  for ours, theirs in zip(outs['pallas'], outs['reference']):
    assert ours['w'].dtype == jnp.bfloat16
    # One bfloat16 rounding of the update apart at most.
    assert_close(ours['w'].astype(jnp.float32),
                 theirs['w'].astype(jnp.float32), 1e-2)


def test_first_step_is_adams_first_step():
  params = {'w': jnp.zeros((64, 64))}
  g = {'w': jax.random.normal(jax.random.key(0), (64, 64))}
  tx = mlorc_optax.scale_by_mlorc_adam(implementation='pallas')
  ours, _ = tx.update(g, tx.init(params))
  theirs, _ = optax.scale_by_adam().update(
      g, optax.scale_by_adam().init(params))
  np.testing.assert_allclose(ours['w'], theirs['w'], rtol=1e-6)


@pytest.mark.parametrize('scale', [0.0, 1e19])
def test_zero_and_overflowing_gradients_stay_finite(scale):
  """g = 0 gives zero factors; |g| > 1.8e19 overflows g**2 to inf."""
  params = {'w': jnp.zeros((64, 128))}
  tx = mlorc_optax.scale_by_mlorc_adam(implementation='pallas')
  state = tx.init(params)
  g = {'w': scale * jnp.ones((64, 128)).at[0, 0].set(1.0)}
  for _ in range(3):
    u, state = jax.jit(tx.update)(g, state)
    assert np.all(np.isfinite(u['w']))
    for f in jax.tree.leaves(state.inner_state):
      assert np.all(np.isfinite(f))


@pytest.mark.parametrize('settings,reason', [
    (dict(compressor=mlorc_optax.contrib.LoRAPreCompressor()),
     'not a randomized SVD'),
    (dict(power_iters=1), 'power iterations'),
    (dict(compress=('mu',)), 'dense moment'),
])
def test_two_pass_refuses_settings_it_cannot_compute(settings, reason):
  with pytest.raises(ValueError, match=f'implementation.*{reason}'):
    mlorc_optax.scale_by_mlorc_adam(implementation='pallas', **settings)
  # Automatic selection quietly uses the reference step for them.
  params = {'w': jnp.zeros((64, 128))}
  plan = mlorc_optax.compression_plan(
      mlorc_optax.scale_by_mlorc_adam(**settings), params)
  assert plan['w'].step == 'reference' and reason in plan['w'].step_reason


def test_optimizers_without_a_two_pass_step_refuse_it():
  with pytest.raises(ValueError, match='no two-pass step'):
    mlorc_optax.low_rank_moments(optax.contrib.scale_by_adopt(),
                                 implementation='xla')


def test_a_blocker_found_per_leaf_refuses_an_explicit_two_pass_step():
  """The plan's per-leaf choice applies the same rule as the factory: an
  explicit two-pass implementation the leaf cannot take is an error, not a
  step run without one of its moments."""
  leaf = mlorc_optax.compression_plan(
      mlorc_optax.mlorc_adamw(1e-3), {'w': jnp.zeros((64, 128))})['w']
  with pytest.raises(ValueError, match='implementation.*masks a moment'):
    plan_lib.choose_step(
        leaf, implementation='xla',
        blocker='the inner optimizer masks a moment out', sketched=True,
        kernel_config=kernels.KernelConfig())
  assert plan_lib.choose_step(
      leaf, implementation=None, blocker='the inner optimizer masks a '
      'moment out', sketched=True, kernel_config=kernels.KernelConfig())[0] == (
          'reference')


def test_unknown_implementation_is_an_error_naming_it():
  with pytest.raises(ValueError, match='implementation must be'):
    mlorc_optax.mlorc_adamw(1e-3, implementation='triton')


def test_a_compressor_whose_sketch_is_the_identity_takes_the_reference():
  """A subclass that only overrides ``sketch`` may return None (identity)."""

  @dataclasses.dataclass(frozen=True)
  class TruncatedSVD(mlorc_optax.compressors.RSVDCompressor):
    name: ClassVar[str] = 'truncated_svd'

    def sketch(self, factors, key, batch_shape, cols, width):
      return None

  grads = grads_for({'w': (64, 128)}, 2)
  outs = {}
  for impl in ('reference', 'pallas'):
    outs[impl], _ = run_steps(mlorc_optax.scale_by_mlorc_adam(
        compressor=TruncatedSVD(), implementation=impl), grads)
  for ours, theirs in zip(outs['pallas'], outs['reference']):
    np.testing.assert_array_equal(ours['w'], theirs['w'])


def test_injected_hyperparameters_reach_the_kernels():
  """b1 and b2 traced by optax.inject_hyperparams (STATIC_ARGS is enough)."""
  grads = grads_for({'w': (64, 128)}, 3, seed=4)
  outs = {}
  for impl in ('reference', 'pallas'):
    tx = optax.inject_hyperparams(
        mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
            learning_rate=1.0, b1=0.85, b2=0.99, eps=1e-2, weight_decay=0.0,
            implementation=impl, kernel_config=FULL)
    outs[impl], _ = run_steps(tx, grads)
  for t, (ours, theirs) in enumerate(zip(outs['pallas'], outs['reference'])):
    assert_close_but_for_the_fix(ours['w'], theirs['w'], 5e-4, f'step {t}')


# MLorc-Lion's two passes.


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_lion_two_pass_matches_dense_numpy_algorithm_2(implementation):
  shapes = {'a': (32, 48), 'b': (2, 16, 64)}
  rank, seed = 3, 7
  grads = grads_for(shapes, 6, seed=1)
  tx = mlorc_optax.scale_by_mlorc_lion(0.9, 0.99, rank=rank, seed=seed,
                                       low_rank_mask=True,
                                       implementation=implementation,
                                       kernel_config=FULL,
                                       **mlorc_optax.PAPER_LION)
  outs, state = run_steps(tx, grads)
  reference = ref.MLorcLion(shapes, jax.random.PRNGKey(seed), rank, 0.9, 0.99)
  for t, (g, ours) in enumerate(zip(grads, outs)):
    theirs = reference.step(g)
    for k in shapes:  # signs; an entry with c ~ 0 may flip
      assert np.mean(np.asarray(ours[k]) != theirs[k]) <= 1e-2, (t, k)
  for k in shapes:
    assert_close(mlorc_optax.compressors.reconstruct(state.inner_state.mu[k]),
                 ref.reconstruct(*reference.factors[k]), 1e-4)


@pytest.mark.parametrize('compressor', [
    'rsvd', mlorc_optax.contrib.WarmStartCompressor()])
def test_lion_pallas_step_equals_reference_step(compressor):
  shapes = {'w': (3, 64, 128), 'odd': (20, 30), 'bias': (30,)}
  grads = grads_for(shapes, 4, seed=2)
  results = {}
  for impl in ('reference', 'pallas'):
    tx = mlorc_optax.mlorc_lion(1.0, weight_decay=0.0, compressor=compressor,
                                implementation=impl, kernel_config=FULL)
    results[impl] = run_steps(tx, grads)
  for ours, theirs in zip(results['pallas'][0], results['reference'][0]):
    for k in shapes:
      assert np.mean(np.asarray(ours[k]) != np.asarray(theirs[k])) <= 1e-3
  for ours, theirs in zip(jax.tree.leaves(results['pallas'][1]),
                          jax.tree.leaves(results['reference'][1])):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


def test_low_rank_moments_takes_a_public_fast_step():
  """The wrapper around optax.scale_by_adam with low_rank.AdamFastStep, the
  complement and Adam's update bound is scale_by_mlorc_adam, bit for bit."""
  grads = grads_for({'w': (2, 64, 128)}, 3, seed=5)
  low_rank = mlorc_optax.low_rank
  wrapped = mlorc_optax.low_rank_moments(
      optax.scale_by_adam(0.8, 0.99, 1e-2),
      moments={'mu': low_rank.MomentSpec(decay=0.8, complement=0.5),
               'nu': low_rank.MomentSpec(True, 0.99)},
      fast_step=low_rank.AdamFastStep(0.8, 0.99, 1e-2, 0.0, False),
      implementation='xla',
      update_bound=lambda t: low_rank.adam_update_bound(0.8, 0.99, t, False))
  ours, _ = run_steps(wrapped, grads)
  theirs, _ = run_steps(mlorc_optax.scale_by_mlorc_adam(
      0.8, 0.99, 1e-2, implementation='xla', complement=0.5, oversample=0),
      grads)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a['w'], b['w'])


@pytest.mark.parametrize('make', [mlorc_optax.scale_by_mlorc_adam,
                                  mlorc_optax.scale_by_mlorc_lion])
def test_equal_shaped_leaves_share_one_launch_and_change_nothing(make):
  """Unstacked models have many small leaves of a few shapes: each group of
  equal shapes runs each pass once. Every computation is per matrix, so
  only the summation order of XLA's batched small products changes with
  the batch size: the two agree as two float32 implementations do (module
  docstring)."""
  shapes = {f'q{i}': (64, 64) for i in range(3)}
  shapes.update({'up0': (64, 128), 'up1': (64, 128), 'big': (2, 64, 128)})
  grads = grads_for(shapes, 3, seed=6)
  outs, jaxprs = {}, {}
  for name, config in (('grouped', FULL), ('alone', dataclasses.replace(
      FULL, group_max_elements=0))):
    kwargs = {'eps': 1e-2} if make is mlorc_optax.scale_by_mlorc_adam else {}
    tx = make(implementation='pallas', kernel_config=config,
              low_rank_mask=True, **kwargs)
    outs[name] = run_steps(tx, grads)
    params = jax.tree.map(jnp.zeros_like, grads[0])
    jaxprs[name] = str(jax.make_jaxpr(tx.update)(
        grads[0], tx.init(params), params))
  for t, (ours, theirs) in enumerate(zip(outs['grouped'][0],
                                         outs['alone'][0])):
    for k in shapes:
      assert_close_but_for_the_fix(ours[k], theirs[k], 5e-4,
                                   f'step {t}, leaf {k}')
  # 'big' and the 2 x 64x128 pair have equal matrices (batch aside): one
  # group; the three 64x64 another. Two passes each.
  assert jaxprs['grouped'].count('pallas_call[') == 4
  assert jaxprs['alone'].count('pallas_call[') == 12
