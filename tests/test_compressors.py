"""Specification of the moment compressors: the paper's randomized SVD and,
from mlorc_optax.contrib, the warm-started sketch and LoRA-Pre."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax import compressors
from mlorc_optax import contrib

import numpy_reference as ref
from helpers import EPS32
from helpers import all_matrices
from helpers import factors
from helpers import run_steps

B1, B2, EPS = 0.9, 0.999, 1e-8
#: float32 unit roundoff (half a unit in the last place of 1).
U32 = EPS32 / 2


def every_compressor():
  """One object of each compressor, the paper's first."""
  return (compressors.RSVDCompressor(), contrib.WarmStartCompressor(),
          contrib.LoRAPreCompressor())


BEYOND_THE_PAPER = pytest.mark.parametrize(
    'compressor', [contrib.WarmStartCompressor(), contrib.LoRAPreCompressor()],
    ids=['warm', 'lorapre'])  # The RSVD: tests/test_mlorc.py.


def noisy_low_rank(shapes, steps, seed=0, rank=2, noise=0.1):
  """Gradients ``L R^T + noise`` with a fixed ``L, R`` per leaf."""
  key = jax.random.key(seed)
  fixed, out = {}, []
  for name, (*batch, m, n) in sorted(shapes.items()):
    key, k1, k2 = jax.random.split(key, 3)
    fixed[name] = (jax.random.normal(k1, (*batch, m, rank)),
                   jax.random.normal(k2, (*batch, rank, n)))
  for _ in range(steps):
    g = {}
    for name, shape in sorted(shapes.items()):
      key, k = jax.random.split(key)
      left, right = fixed[name]
      g[name] = left @ right + noise * jax.random.normal(k, shape)
    out.append(g)
  return out


def read(compressor, state, name, moment, count):
  """The dense moment a compressor reads back for one leaf of the state."""
  nonnegative = moment == 'nu'
  return np.asarray(compressor.read(
      factors(state, name, moment=moment), nonnegative=nonnegative,
      decay=B2 if nonnegative else B1, count=count))


def ema(grads, name, decay, fn=lambda g: g):
  m = 0.0
  for g in grads:
    m = decay * m + (1 - decay) * np.asarray(fn(g[name]), np.float64)
  return m


SMALL = {'w': (12, 8), 'stack': (2, 6, 9)}


def small_params_and_grads():
  grads = noisy_low_rank(SMALL, 1)[0] | {'b': jnp.arange(1.0, 9.0)}
  return jax.tree.map(jnp.ones_like, grads), grads


# --------------------------------------------------------------------------
# Selection: 'rsvd' by name, every other compressor as an object.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('factory', [mlorc_optax.mlorc_adamw,
                                     mlorc_optax.mlorc_lion,
                                     mlorc_optax.scale_by_mlorc_adam,
                                     mlorc_optax.scale_by_mlorc_lion])
def test_only_rsvd_is_a_name_other_compressors_are_objects(factory):
  args = (1e-3,) if factory.__name__.startswith('mlorc') else ()
  for name in ('svd', 'warm', 'lorapre'):  # 'warm', 'lorapre': old names.
    with pytest.raises(ValueError, match="'rsvd' or a MomentCompressor.*"
                       'mlorc_optax.contrib'):
      factory(*args, compressor=name)
  with pytest.raises(TypeError, match='compressor'):
    factory(*args, compressor=3)
  with pytest.raises(TypeError, match='compressor'):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), compressor='rsvd')


def test_settings_that_would_be_ignored_are_errors():
  with pytest.raises(ValueError, match='oversample'):
    mlorc_optax.mlorc_adamw(1e-3, compressor=contrib.LoRAPreCompressor(),
                            oversample=2)
  with pytest.raises(ValueError, match='power_iters'):
    mlorc_optax.mlorc_lion(1e-3, compressor=contrib.LoRAPreCompressor(),
                           power_iters=1)
  with pytest.raises(ValueError, match='oversample.*on it'):
    mlorc_optax.mlorc_adamw(1e-3, oversample=2,
                            compressor=contrib.WarmStartCompressor())
  with pytest.raises(ValueError, match='damping'):
    contrib.LoRAPreCompressor(damping=-1.0)
  with pytest.raises(ValueError, match='init_scale'):
    contrib.LoRAPreCompressor(init_scale=0.0)
  with pytest.raises(ValueError, match='oversample'):
    compressors.RSVDCompressor(oversample=-1)


def test_the_default_is_the_rsvd_compressor():
  params = {'w': jnp.ones((12, 8))}
  grads = noisy_low_rank({'w': (12, 8)}, 1)[0]
  # The factories oversample by 4 (docs/quality.md); the object keeps its own.
  a = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  b = mlorc_optax.mlorc_adamw(1e-2, rank=2,
                              compressor=compressors.RSVDCompressor(4))
  ua, sa = jax.jit(a.update)(grads, a.init(params), params)
  ub, sb = jax.jit(b.update)(grads, b.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, (ua, sa), (ub, sb))
  # low_rank_moments, the generic wrapper: the paper's RSVD, no oversampling.
  tx = mlorc_optax.low_rank_moments(optax.scale_by_adam())
  state = jax.eval_shape(tx.init, params)
  assert state.plan.compressor == compressors.RSVDCompressor()


def test_the_transform_builds_the_rsvd_from_its_settings_and_keeps_objects():
  params = {'w': jax.ShapeDtypeStruct((12, 8), jnp.float32)}

  def compressor_of(tx):
    return jax.eval_shape(tx.init, params)[0].plan.compressor

  assert compressor_of(mlorc_optax.mlorc_adamw(
      1e-3, oversample=3, power_iters=2)) == compressors.RSVDCompressor(3, 2)
  for c in (contrib.WarmStartCompressor(oversample=3, power_iters=2),
            contrib.LoRAPreCompressor(damping=1e-2)):
    assert compressor_of(mlorc_optax.mlorc_lion(1e-3, compressor=c)) == c


def test_compressors_are_moment_compressors_with_distinct_names():
  found = every_compressor()
  assert [c.name for c in found] == ['rsvd', 'warm', 'lorapre']
  for c in found:
    assert isinstance(c, compressors.MomentCompressor)
    hash(c)  # Static under jit and inject_hyperparams: hashable.
  assert compressors.streamable(compressors.RSVDCompressor())
  assert compressors.streamable(contrib.WarmStartCompressor())
  assert not compressors.streamable(contrib.LoRAPreCompressor())
  assert not compressors.streamable(compressors.RSVDCompressor(power_iters=1))
  # The complement needs an orthonormal left basis: the RSVDs have one.
  assert compressors.has_left_basis(compressors.RSVDCompressor())
  assert compressors.has_left_basis(contrib.WarmStartCompressor())
  assert compressors.has_left_basis(contrib.FactoredSecondMoment())
  assert not compressors.has_left_basis(contrib.LoRAPreCompressor())


# --------------------------------------------------------------------------
# What every compressor guarantees.
# --------------------------------------------------------------------------


@BEYOND_THE_PAPER
def test_first_step_is_adams_first_step(compressor):
  params, grads = small_params_and_grads()
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=2,
                                       compressor=compressor,
                                       low_rank_mask=all_matrices)
  ours, _ = jax.jit(tx.update)(grads, tx.init(params))
  adam = optax.scale_by_adam(B1, B2, EPS)
  theirs, _ = adam.update(grads, adam.init(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ours, theirs)


@pytest.mark.parametrize('compressor,per_moment', [
    (compressors.RSVDCompressor(), lambda m, n, r: (m + n) * r + r),
    (contrib.WarmStartCompressor(), lambda m, n, r: (m + n) * r + r),
    (contrib.LoRAPreCompressor(), lambda m, n, r: (m + n) * r),  # No s.
], ids=['rsvd', 'warm', 'lorapre'])
def test_state_size(compressor, per_moment):
  shapes = {'tall': (40, 12), 'wide': (6, 30), 'stack': (3, 16, 10)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  rank = 4
  tx = mlorc_optax.scale_by_mlorc_adam(rank=rank, compressor=compressor)
  state = jax.eval_shape(tx.init, params)
  sizes = {}
  for k, (*batch, m, n) in shapes.items():
    expected = int(np.prod(batch)) * per_moment(m, n, rank)
    for moment in ('mu', 'nu'):
      stored = factors(state, k, moment=moment)
      assert isinstance(stored, compressor.factor_type), (k, moment)
      assert sum(x.size for x in stored) == expected, (k, moment)
    sizes[k] = expected
  # The plan's sizes (and its table's total) are the state's.
  plan = mlorc_optax.compression_plan(tx, params)
  for k, size in sizes.items():
    assert plan[k].factor_sizes == (size, size), k
    assert plan[k].state_size == 2 * size, k
  total = sum(x.size for x in jax.tree.leaves(
      (state.inner_state.mu, state.inner_state.nu)))
  assert total == 2 * sum(sizes.values())
  table = mlorc_optax.format_plan(plan)
  assert table.splitlines()[-1].startswith(f'| total | | | | | | {total:,} |')


@BEYOND_THE_PAPER
@pytest.mark.parametrize('make_tx', [
    lambda c: mlorc_optax.mlorc_adamw(1e-3, rank=2, compressor=c),
    lambda c: mlorc_optax.mlorc_lion(1e-4, rank=2, compressor=c),
], ids=['adamw', 'lion'])
def test_zero_gradients_for_100_steps_stay_finite(compressor, make_tx):
  params, _ = small_params_and_grads()
  tx = make_tx(compressor)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(zeros, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=100)
  for x in jax.tree.leaves((p, s)):
    assert np.all(np.isfinite(x))


def test_warm_start_is_exact_at_full_rank():
  # The RSVD: tests/test_alias.py. 'wide' sketches 6 of its 20 columns: there
  # the warm start really uses the previous V, which must still span the
  # moment.
  shapes = {'tall': (12, 8), 'wide': (6, 20), 'stack': (2, 9, 7)}
  grads = noisy_low_rank(shapes, 6, noise=1.0)
  c = contrib.WarmStartCompressor()
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=9, compressor=c,
                                       low_rank_mask=True)
  _, state = run_steps(tx, grads)
  for k in shapes:
    # float32 rounding of the decomposition, relative to the largest entry:
    # a few hundred units of 2^-24 (a QR and an SVD of at most 12 x 20).
    first = ema(grads, k, B1)
    np.testing.assert_allclose(read(c, state, k, 'mu', 6), first,
                               atol=256 * U32 * np.abs(first).max(),
                               err_msg=k)
    second = ema(grads, k, B2, np.square)
    np.testing.assert_allclose(read(c, state, k, 'nu', 6), second,
                               atol=256 * U32 * np.abs(second).max(),
                               err_msg=k)


def cond(x):
  return float(np.max(np.linalg.cond(np.asarray(x, np.float64))))


def test_lorapre_is_an_exact_ema_at_square_full_rank():
  """At r = m = n without damping, B A is the EMA of g (decay b1) and
  B_v A_v the EMA of |g| (decay sqrt(b2)), because A is refreshed with the
  new B (a simultaneous update would not be exact)."""
  n, steps = 6, 8
  # 3 I + noise: gradients whose EMAs (of g and of |g|) are well conditioned,
  # so the factors stay well conditioned and float32 least squares is
  # accurate enough to check exactness. (Low-rank-plus-noise gradients make
  # the factors of the EMA of |g| drift to condition numbers of 1e3-1e4,
  # where float32 normal equations lose every digit.)
  keys = jax.random.split(jax.random.key(0), steps)
  grads = [{'w': 3 * jnp.eye(n) + 0.5 * jax.random.normal(k, (n, n))}
           for k in keys]
  c = contrib.LoRAPreCompressor(damping=0.0)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=n, compressor=c,
                                       low_rank_mask=True)
  params = {'w': jnp.zeros((n, n))}
  state, step = tx.init(params), jax.jit(tx.update)
  # Tolerance from float32 precision and the conditioning: each step solves
  # the normal equations of B <- k B + gamma T A^T (A A^T)^-1 and then of
  # A <- k A + gamma (B^T B)^-1 B^T T in float32. A Gram matrix X^T X is
  # formed and solved with backward error |dG| <= n u |X|^2 (u = 2^-24), so
  # to first order the product B A moves by gamma n u cond(X)^2 |T|_2 per
  # solve; older errors decay by k^2 < 1 each step, so their sum bounds the
  # final error. cond(A) at step t is that of the A refreshed at step t - 1
  # (at step 0, of the initial noise A_0, which at square full rank the first
  # step only scales: A_1 = (1 + k) A_0), cond(B) that of the new B.
  bound = {'mu': 0.0, 'nu': 0.0}
  for g in grads:
    before = state
    _, state = step(g, state)
    for moment, gamma, target in (('mu', 1 - np.sqrt(B1), g['w']),
                                  ('nu', 1 - B2**0.25, jnp.abs(g['w']))):
      new, old = (factors(s, 'w', moment=moment) for s in (state, before))
      a = old.a if np.any(old.a) else new.a
      bound[moment] += gamma * n * U32 * (cond(a)**2 + cond(new.b)**2) * float(
          np.linalg.norm(np.asarray(target, np.float64), 2))
  for moment, decay, fn in (('mu', B1, lambda g: g),
                            ('nu', np.sqrt(B2), np.abs)):
    expected = ema(grads, 'w', decay, fn)
    # The premise: the bound is small against the moment itself, so the test
    # can tell an exact EMA from an approximate one (e.g. the simultaneous
    # update's gamma^2 T A^-1 B^-1 T term, 2.6e-3 |T| for the first moment).
    assert bound[moment] < 1e-3 * np.abs(expected).max(), (moment, bound)
    f = factors(state, 'w', moment=moment)
    np.testing.assert_allclose(f.b @ f.a.T, expected, rtol=0,
                               atol=bound[moment], err_msg=moment)


def test_lorapre_second_moment_is_read_with_adams_bias():
  f = contrib.LoRAPreFactors(b=jnp.array([[2.0]]), a=jnp.array([[3.0]]))
  plain = contrib.LoRAPreCompressor(bias_matched=False)
  matched = contrib.LoRAPreCompressor()
  kw = dict(nonnegative=True, decay=0.99)
  np.testing.assert_allclose(plain.read(f, count=7, **kw), [[36.0]])
  # (1 - 0.99^7) / (1 - 0.99^3.5)^2 * 36: the EMA of |g| bias-corrected,
  # squared, then given the bias 1 - b2^t that Adam's correction removes.
  ratio = (1 - 0.99**7) / (1 - 0.99**3.5) ** 2
  np.testing.assert_allclose(matched.read(f, count=7, **kw), [[36 * ratio]],
                             rtol=1e-5)
  np.testing.assert_array_equal(matched.read(f, count=0, **kw), [[0.0]])
  # The first moment's product already has Adam's bias: read as it is.
  np.testing.assert_allclose(
      matched.read(f, nonnegative=False, decay=0.9, count=7), [[6.0]])


def test_lorapre_needs_the_decay_that_mlorc_adamw_and_lion_pass():
  params, grads = small_params_and_grads()
  c = contrib.LoRAPreCompressor()
  # A bare low_rank_moments does not know optax's decays: a clear error ...
  tx = mlorc_optax.low_rank_moments(optax.scale_by_adam(), compressor=c)
  with pytest.raises(ValueError, match='decay'):
    tx.update(grads, tx.init(params))
  # ... unless each moment declares it, which is what mlorc_adamw does.
  spec = mlorc_optax.low_rank.MomentSpec
  tx = mlorc_optax.low_rank_moments(
      optax.scale_by_adam(B1, B2, EPS), compressor=c, rank=2,
      moments={'mu': spec(decay=B1), 'nu': spec(nonnegative=True, decay=B2)})
  ours, _ = tx.update(grads, tx.init(params))
  alias = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=2, compressor=c)
  theirs, _ = alias.update(grads, alias.init(params))
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  lion = mlorc_optax.scale_by_mlorc_lion(rank=2, compressor=c)
  lion.update(grads, lion.init(params))  # Lion passes its b2.


def test_lorapre_factors_are_b_and_a_transposed_placed_like_rows_and_cols():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  w = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P('data',
                                                               'model')))
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=2,
                               compressor=contrib.LoRAPreCompressor())
  state = tx.init({'w': w})
  assert isinstance(state[0], mlorc_optax.LowRankMomentsState)
  mu, nu = (factors(state, 'w', moment=m) for m in ('mu', 'nu'))
  assert isinstance(mu, contrib.LoRAPreFactors)
  assert mu.b.shape == (16, 2) and mu.a.shape == (8, 2)
  assert mu.b.sharding.spec == P('data', None)
  assert nu.a.sharding.spec == P('model', None)


def test_a_state_from_another_compressor_is_a_clear_error(params):
  rsvd_state = mlorc_optax.mlorc_adamw(1e-3, rank=2).init(params)
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=2,
                               compressor=contrib.LoRAPreCompressor())
  with pytest.raises(ValueError, match='compressor'):
    tx.update(params, rsvd_state, params)


def test_compressor_is_static_under_inject_hyperparams():
  params, grads = small_params_and_grads()
  c = contrib.LoRAPreCompressor()
  tx = optax.inject_hyperparams(
      mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
          learning_rate=1e-2, b1=0.8, rank=2, compressor=c)
  plain = mlorc_optax.mlorc_adamw(1e-2, b1=0.8, rank=2, compressor=c)
  s, sp = tx.init(params), plain.init(params)
  for _ in range(2):
    u, s = jax.jit(tx.update)(grads, s, params)
    up, sp = jax.jit(plain.update)(grads, sp, params)
  # Traced betas vs Python floats: float32 rounding only, but 1 - b2**t and
  # the bias ratio of LoRA-Pre's second moment are as sensitive to b2 as
  # 1 / (1 - b2): a few units of 2^-24 in b2 move each entry of the update
  # by up to 1 / (1 - b2) = 1000 times that, relatively.
  rtol = 4 * U32 / (1 - 0.999)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol,
                                                       atol=1e-6), u, up)


@BEYOND_THE_PAPER
def test_factor_dtype_and_lion(compressor):
  params, grads = small_params_and_grads()
  tx = mlorc_optax.scale_by_mlorc_adam(rank=2, compressor=compressor,
                                       factor_dtype=jnp.bfloat16)
  _, state = jax.jit(tx.update)(grads, tx.init(params))
  for moment in ('mu', 'nu'):
    for k in SMALL:
      assert {x.dtype for x in factors(state, k, moment=moment)} == {
          jnp.dtype(jnp.bfloat16)}, (k, moment)
    # The leaf that is not compressed keeps Adam's float32 moment.
    assert factors(state, 'b', moment=moment).dtype == jnp.float32
  lion = mlorc_optax.scale_by_mlorc_lion(rank=2, compressor=compressor)
  u, _ = jax.jit(lion.update)(grads, lion.init(params))
  jax.tree.map(lambda a, g: np.testing.assert_array_equal(a, jnp.sign(g)),
               u, grads)


def test_second_moment_reads_are_never_negative():
  g = noisy_low_rank({'w': (16, 12)}, 1, noise=1.0)[0]['w']
  for c in every_compressor():
    k = 2
    zero = c.factor_type(*(jnp.zeros(s.shape) for s in c.specs((), 16, 12, k)))
    f = c.update(zero, moment=g * g, grad=g, key=jax.random.PRNGKey(0),
                 decay=0.999, nonnegative=True)
    v = c.read(f, nonnegative=True, decay=0.999, count=1)
    assert np.all(np.asarray(v) >= 0), c.name


# --------------------------------------------------------------------------
# The warm-started sketch.
# --------------------------------------------------------------------------


def test_warm_sketch_is_the_previous_v_with_fresh_columns_where_s_is_zero():
  key = jax.random.key(0)
  v = jax.random.normal(jax.random.key(1), (2, 10, 3))
  s = jnp.array([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
  f = mlorc_optax.LowRankFactors(jnp.zeros((2, 7, 3)), s, v)
  warm = contrib.WarmStartCompressor(oversample=2)
  omega = warm.sketch(f, key, (2,), 10, 5)
  fresh = compressors.RSVDCompressor(oversample=2).sketch(f, key, (2,), 10, 5)
  np.testing.assert_array_equal(omega[0, :, :2], v[0, :, :2])
  np.testing.assert_array_equal(omega[1, :, :1], v[1, :, :1])
  np.testing.assert_array_equal(omega[0, :, 2:], fresh[0, :, 2:])
  np.testing.assert_array_equal(omega[1, :, 1:], fresh[1, :, 1:])
  # Sketching the whole column space stays the identity (exact).
  assert warm.sketch(f, key, (2,), 10, 10) is None


def test_warm_start_equals_rsvd_sketched_with_the_previous_v():
  shapes = {'w': (20, 12)}
  grads = noisy_low_rank(shapes, 4)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=3,
                                       compressor=contrib.WarmStartCompressor())
  params = {'w': jnp.zeros((20, 12))}
  state = tx.init(params)
  for g in grads:
    prev = state
    _, state = tx.update(g, state)
  # Recompute the last first-moment refresh by hand.
  f = factors(prev, 'w')
  m = B1 * compressors.reconstruct(f) + (1 - B1) * grads[-1]['w']
  m, v = np.asarray(m, np.float64), np.asarray(f.v, np.float64)
  expected = ref.reconstruct(*ref.rsvd(m, v, 3))
  # The projection onto the range of Y = m V is accurate to float32 rounding
  # times the condition number of Y (a few units of 2^-24).
  atol = 8 * U32 * cond(m @ v) * np.abs(expected).max()
  np.testing.assert_allclose(compressors.reconstruct(factors(state, 'w')),
                             expected, rtol=0, atol=atol)


# --------------------------------------------------------------------------
# LoRA-Pre against a dense NumPy version written from the specification.
# --------------------------------------------------------------------------


class NumpyLoRAPreAdam:
  """LoRA-Pre Adam in float64 NumPy (lr = 1, no decay), leaves sorted."""

  def __init__(self, shapes, key, rank, b1, b2, eps, damping, init_scale):
    self.key, self.b1, self.b2, self.eps = key, b1, b2, eps
    self.damping, self.init_scale = damping, init_scale
    self.t = 0
    self.f = {}
    for name, (*batch, m, n) in shapes.items():
      k = min(rank, m, n)
      zero = (np.zeros((*batch, m, k)), np.zeros((*batch, n, k)))
      self.f[name] = {'mu': zero, 'nu': zero}

  def regress(self, t, x):
    """t x (x^T x + damping tr(x^T x) / k I)^-1."""
    gram = np.swapaxes(x, -1, -2) @ x
    k = gram.shape[-1]
    lam = self.damping * np.trace(gram, axis1=-2, axis2=-1) / k
    return t @ x @ np.linalg.inv(gram + lam[..., None, None] * np.eye(k))

  def refresh(self, b, at, target, keep, key):
    if not np.any(at):
      at = self.init_scale * np.asarray(
          jax.random.normal(key, at.shape, jnp.float32), np.float64)
    b = keep * b + (1 - keep) * self.regress(target, at)
    at = keep * at + (1 - keep) * self.regress(np.swapaxes(target, -1, -2), b)
    return b, at

  def step(self, grads):
    out = {}
    # B_v A_v: EMA of |g| with decay sqrt(b2), read with Adam's bias.
    bias = 0.0 if self.t == 0 else (
        (1 - self.b2**self.t) / (1 - self.b2**(self.t / 2)) ** 2)
    for i, name in enumerate(sorted(grads)):
      g = np.asarray(grads[name], np.float64)
      (bm, am), (bv, av) = self.f[name]['mu'], self.f[name]['nu']
      m = self.b1 * bm @ np.swapaxes(am, -1, -2) + (1 - self.b1) * g
      v_read = bias * (bv @ np.swapaxes(av, -1, -2)) ** 2
      v = self.b2 * v_read + (1 - self.b2) * g**2
      t = self.t + 1
      m_hat, v_hat = m / (1 - self.b1**t), v / (1 - self.b2**t)
      out[name] = m_hat / (np.sqrt(v_hat) + self.eps)
      keys = [jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
          self.key, self.t), i), j) for j in (0, 1)]
      self.f[name]['mu'] = self.refresh(bm, am, g, np.sqrt(self.b1), keys[0])
      self.f[name]['nu'] = self.refresh(bv, av, np.abs(g), self.b2**0.25,
                                        keys[1])
    self.t += 1
    return out


def test_lorapre_matches_dense_numpy_lorapre():
  shapes = {'a': (20, 12), 'b': (2, 10, 16)}
  rank, seed, damping = 3, 5, 1e-3
  grads = noisy_low_rank(shapes, 10, seed=2)
  c = contrib.LoRAPreCompressor(damping=damping, init_scale=0.1)
  # The reference is Algorithm 1 with LoRA-Pre's factors: no update bound.
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=rank, seed=seed,
                                       compressor=c, update_bound=None)
  reference = NumpyLoRAPreAdam(shapes, jax.random.PRNGKey(seed), rank, B1, B2,
                               EPS, damping, 0.1)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  # Not a trajectory: the gradients do not depend on the updates, so float32
  # rounding does not feed back. The damping bounds the condition number of
  # every Gram matrix solved by 1 + rank / damping = 3001, so each solve is
  # accurate to about 3001 * 2^-24 = 2e-4 relative at worst (1e-6 measured),
  # damped by gamma <= 0.05 per step; the tolerances below are 5-10x that.
  for t, g in enumerate(grads):
    ours, state = step(g, state)
    theirs = reference.step(g)
    for k in shapes:
      np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-3, atol=2e-4,
                                 err_msg=f'step {t}, leaf {k}')
      for moment in ('mu', 'nu'):
        f = factors(state, k, moment=moment)
        b, at = reference.f[k][moment]
        np.testing.assert_allclose(
            f.b @ jnp.swapaxes(f.a, -1, -2),
            b @ np.swapaxes(at, -1, -2), rtol=1e-3, atol=1e-4,
            err_msg=f'step {t}, leaf {k}, {moment}')


def test_lorapre_regression_is_scale_invariant():
  """Gradients 1e-30 or 1e30 times larger give factors exactly that much
  larger in B: the damping is relative and the solves are normalised."""
  g = noisy_low_rank({'w': (12, 8)}, 1)[0]['w']
  c = contrib.LoRAPreCompressor()
  zero = contrib.LoRAPreFactors(jnp.zeros((12, 3)), jnp.zeros((8, 3)))
  key = jax.random.PRNGKey(0)
  base = c.update(zero, moment=g, grad=g, key=key, decay=0.9,
                  nonnegative=False)
  for scale in (1e-30, 1e30):
    f = c.update(zero, moment=g, grad=scale * g, key=key, decay=0.9,
                 nonnegative=False)
    assert np.all(np.isfinite(f.b)) and np.all(np.isfinite(f.a))
    # float32 rounding of the rescaling only.
    np.testing.assert_allclose(f.b / scale, base.b, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(f.a, base.a, rtol=2e-3, atol=1e-6)


def test_lorapre_redraws_a_that_has_underflowed_to_zero():
  c = contrib.LoRAPreCompressor()
  g = noisy_low_rank({'w': (12, 8)}, 1)[0]['w']
  dead = contrib.LoRAPreFactors(jnp.zeros((12, 3)), jnp.zeros((8, 3)))
  f = c.update(dead, moment=g, grad=g, key=jax.random.PRNGKey(1), decay=0.9,
               nonnegative=False)
  # Not stuck at B = A = 0: the product picked up the gradient.
  product = c.read(f, nonnegative=False, decay=0.9, count=1)
  assert np.linalg.norm(product) > 0.01 * np.linalg.norm(g)
  # A live A is kept (not redrawn): a zero gradient only shrinks it.
  shrunk = c.update(f, moment=g, grad=jnp.zeros_like(g),
                    key=jax.random.PRNGKey(2), decay=0.81,
                    nonnegative=False)
  np.testing.assert_allclose(shrunk.a, 0.9 * f.a, rtol=1e-6)
  np.testing.assert_allclose(shrunk.b, 0.9 * f.b, rtol=1e-6)
