"""Specification of the moment compressors ('rsvd', 'warm', 'lorapre')."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax._src import compressors as comp_lib

import numpy_reference as ref
from helpers import all_matrices
from helpers import run_steps

NAMES = ('rsvd', 'warm', 'lorapre')
B1, B2, EPS = 0.9, 0.999, 1e-8


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


def leaf(factors_tree, name):
  """The factors of one leaf from a moment of the state."""
  return type(factors_tree)(*(getattr(factors_tree, a)[name]
                              for a in factors_tree._fields))


def read(compressor, factors_tree, name, second_moment, count):
  """The dense moment a compressor reads back for one leaf of the state."""
  return np.asarray(compressor.read(
      leaf(factors_tree, name), second_moment=second_moment,
      decay=B2 if second_moment else B1, count=count))


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
# Selection by name.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('factory', [mlorc_optax.mlorc_adamw,
                                     mlorc_optax.mlorc_lion,
                                     mlorc_optax.scale_by_mlorc_adam,
                                     mlorc_optax.scale_by_mlorc_lion])
def test_unknown_name_is_a_value_error_listing_the_valid_names(factory):
  args = (1e-3,) if factory.__name__.startswith('mlorc') else ()
  with pytest.raises(ValueError, match="compressor.*'rsvd', 'warm', 'lorapre'"):
    factory(*args, compressor='svd')
  with pytest.raises(TypeError, match='compressor'):
    factory(*args, compressor=3)


def test_settings_that_would_be_ignored_are_errors():
  with pytest.raises(ValueError, match='oversample'):
    mlorc_optax.mlorc_adamw(1e-3, compressor='lorapre', oversample=2)
  with pytest.raises(ValueError, match='power_iters'):
    mlorc_optax.mlorc_lion(1e-3, compressor='lorapre', power_iters=1)
  with pytest.raises(ValueError, match='oversample.*on it'):
    mlorc_optax.mlorc_adamw(1e-3, oversample=2,
                            compressor=mlorc_optax.WarmStartCompressor())
  with pytest.raises(ValueError, match='damping'):
    mlorc_optax.LoRAPreCompressor(damping=-1.0)
  with pytest.raises(ValueError, match='init_scale'):
    mlorc_optax.LoRAPreCompressor(init_scale=0.0)
  with pytest.raises(ValueError, match='oversample'):
    mlorc_optax.RSVDCompressor(oversample=-1)


def test_the_default_is_the_rsvd_compressor():
  params = {'w': jnp.ones((12, 8))}
  grads = noisy_low_rank({'w': (12, 8)}, 1)[0]
  a = mlorc_optax.mlorc_adamw(1e-2, rank=2)
  b = mlorc_optax.mlorc_adamw(1e-2, rank=2,
                              compressor=mlorc_optax.RSVDCompressor())
  ua, sa = jax.jit(a.update)(grads, a.init(params), params)
  ub, sb = jax.jit(b.update)(grads, b.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, (ua, sa), (ub, sb))


def test_names_are_registered():
  assert tuple(mlorc_optax.COMPRESSORS) == NAMES
  for name, cls in mlorc_optax.COMPRESSORS.items():
    assert cls.name == name
    assert issubclass(cls, mlorc_optax.MomentCompressor)


# --------------------------------------------------------------------------
# What every compressor guarantees.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('name', ('warm', 'lorapre'))  # rsvd: test_mlorc.
def test_first_step_is_adams_first_step(name):
  params, grads = small_params_and_grads()
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=2, compressor=name,
                                       low_rank_mask=all_matrices)
  ours, _ = jax.jit(tx.update)(grads, tx.init(params))
  adam = optax.scale_by_adam(B1, B2, EPS)
  theirs, _ = adam.update(grads, adam.init(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ours, theirs)


@pytest.mark.parametrize('name,per_moment', [
    ('rsvd', lambda m, n, r: (m + n) * r + r),
    ('warm', lambda m, n, r: (m + n) * r + r),
    ('lorapre', lambda m, n, r: (m + n) * r),  # No singular values.
])
def test_state_size(name, per_moment):
  shapes = {'tall': (40, 12), 'wide': (6, 30), 'stack': (3, 16, 10)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  rank = 4
  tx = mlorc_optax.scale_by_mlorc_adam(rank=rank, compressor=name)
  core = jax.eval_shape(tx.init, params)[0]
  for k, (*batch, m, n) in shapes.items():
    size = sum(np.prod(leaf[k].shape) for moment in (core.mu, core.nu)
               for leaf in moment)
    assert size == int(np.prod(batch)) * 2 * per_moment(m, n, rank), k
  # The plan's sizes (and its tables' totals) are the state's.
  plan = mlorc_optax.compression_plan(params, rank)
  for k in shapes:
    size = sum(np.prod(leaf[k].shape) for leaf in core.mu)
    assert plan[k].moment_size(name) == size, k
    assert plan[k].moment_size(tx_compressor(name)) == size, k
  total = sum(x.size for x in jax.tree.leaves((core.mu, core.nu)))
  table = mlorc_optax.format_plan(plan, compressor=name)
  assert table.splitlines()[-1].startswith(f'| total | | | | | | {total:,} |')


def tx_compressor(name):
  """The compressor object a name stands for."""
  return mlorc_optax.COMPRESSORS[name]()


@pytest.mark.parametrize('name', ('warm', 'lorapre'))  # rsvd: test_mlorc.
@pytest.mark.parametrize('make_tx', [
    lambda c: mlorc_optax.mlorc_adamw(1e-3, rank=2, compressor=c),
    lambda c: mlorc_optax.mlorc_lion(1e-4, rank=2, compressor=c),
], ids=['adamw', 'lion'])
def test_zero_gradients_for_100_steps_stay_finite(name, make_tx):
  params, _ = small_params_and_grads()
  tx = make_tx(name)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(zeros, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=100)
  for x in jax.tree.leaves((p, s)):
    assert np.all(np.isfinite(x))


def test_warm_start_is_exact_at_full_rank():
  # rsvd: test_alias. 'wide' sketches 6 of its 20 columns: there the warm
  # start really uses the previous V, which must still span the moment.
  shapes = {'tall': (12, 8), 'wide': (6, 20), 'stack': (2, 9, 7)}
  grads = noisy_low_rank(shapes, 6, noise=1.0)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=9, compressor='warm',
                                       low_rank_mask=True)
  _, state = run_steps(tx, grads)
  c = mlorc_optax.WarmStartCompressor()
  for k in shapes:
    np.testing.assert_allclose(read(c, state[0].mu, k, False, 6),
                               ema(grads, k, B1), atol=2e-5, err_msg=k)
    np.testing.assert_allclose(read(c, state[0].nu, k, True, 6),
                               ema(grads, k, B2, np.square), atol=2e-5,
                               err_msg=k)


def test_lorapre_is_an_exact_ema_at_square_full_rank():
  """At r = m = n without damping, B A is the EMA of g (decay b1) and
  B_v A_v the EMA of |g| (decay sqrt(b2)), because A is refreshed with the
  new B (a simultaneous update would not be exact)."""
  n = 6
  grads = noisy_low_rank({'w': (n, n)}, 8, noise=1.0)
  c = mlorc_optax.LoRAPreCompressor(damping=0.0)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=n, compressor=c,
                                       low_rank_mask=True)
  _, state = run_steps(tx, grads)
  first = read(c, state[0].mu, 'w', False, 8)
  np.testing.assert_allclose(first, ema(grads, 'w', B1), atol=1e-4)
  f = leaf(state[0].nu, 'w')
  np.testing.assert_allclose(f.b @ f.a.T,
                             ema(grads, 'w', np.sqrt(B2), np.abs), atol=1e-4)


def test_lorapre_second_moment_is_read_with_adams_bias():
  f = mlorc_optax.LoRAPreFactors(b=jnp.array([[2.0]]), a=jnp.array([[3.0]]))
  plain = mlorc_optax.LoRAPreCompressor(bias_matched=False)
  matched = mlorc_optax.LoRAPreCompressor()
  kw = dict(second_moment=True, decay=0.99)
  np.testing.assert_allclose(plain.read(f, count=7, **kw), [[36.0]])
  # (1 - 0.99^7) / (1 - 0.99^3.5)^2 * 36: the EMA of |g| bias-corrected,
  # squared, then given the bias 1 - b2^t that Adam's correction removes.
  ratio = (1 - 0.99**7) / (1 - 0.99**3.5) ** 2
  np.testing.assert_allclose(matched.read(f, count=7, **kw), [[36 * ratio]],
                             rtol=1e-5)
  np.testing.assert_array_equal(matched.read(f, count=0, **kw), [[0.0]])
  # The first moment's product already has Adam's bias: read as it is.
  np.testing.assert_allclose(
      matched.read(f, second_moment=False, decay=0.9, count=7), [[6.0]])


def test_lorapre_factors_are_b_and_a_transposed_placed_like_rows_and_cols():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  w = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P('data',
                                                               'model')))
  state = mlorc_optax.mlorc_adamw(1e-3, rank=2, compressor='lorapre').init(
      {'w': w})
  core = state[0][0]
  assert isinstance(core, mlorc_optax.MLorcAdamState)
  assert isinstance(core.mu, mlorc_optax.LoRAPreFactors)
  assert core.mu.b['w'].shape == (16, 2) and core.mu.a['w'].shape == (8, 2)
  assert core.mu.b['w'].sharding.spec == P('data', None)
  assert core.nu.a['w'].sharding.spec == P('model', None)


def test_a_state_from_another_compressor_is_a_clear_error(params):
  rsvd_state = mlorc_optax.mlorc_adamw(1e-3, rank=2).init(params)
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=2, compressor='lorapre')
  with pytest.raises(ValueError, match=r'no \(b, a\) factors.*compressor'):
    tx.update(params, rsvd_state, params)


def test_compressor_is_static_under_inject_hyperparams():
  params, grads = small_params_and_grads()
  static = ('rank', 'oversample', 'power_iters', 'factor_dtype')
  tx = optax.inject_hyperparams(mlorc_optax.mlorc_adamw, static_args=static)(
      learning_rate=1e-2, b1=0.8, rank=2, compressor='lorapre')
  plain = mlorc_optax.mlorc_adamw(1e-2, b1=0.8, rank=2, compressor='lorapre')
  s, sp = tx.init(params), plain.init(params)
  for _ in range(2):
    u, s = jax.jit(tx.update)(grads, s, params)
    up, sp = jax.jit(plain.update)(grads, sp, params)
  # Traced betas vs Python floats: float32 rounding only (amplified by the
  # bias ratio of the second moment, whose log and expm1 are then traced).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), u, up)


@pytest.mark.parametrize('name', ('warm', 'lorapre'))  # rsvd: test_mlorc.
def test_factor_dtype_and_lion(name):
  params, grads = small_params_and_grads()
  tx = mlorc_optax.scale_by_mlorc_adam(rank=2, compressor=name,
                                       factor_dtype=jnp.bfloat16)
  _, state = jax.jit(tx.update)(grads, tx.init(params))
  for moment in (state[0].mu, state[0].nu):
    assert {x.dtype for x in jax.tree.leaves(moment)} == {
        jnp.dtype(jnp.bfloat16)}
  lion = mlorc_optax.scale_by_mlorc_lion(rank=2, compressor=name)
  u, _ = jax.jit(lion.update)(grads, lion.init(params))
  jax.tree.map(lambda a, g: np.testing.assert_array_equal(a, jnp.sign(g)),
               u, grads)


# --------------------------------------------------------------------------
# The warm-started sketch.
# --------------------------------------------------------------------------


def test_warm_sketch_is_the_previous_v_with_fresh_columns_where_s_is_zero():
  key = jax.random.key(0)
  v = jax.random.normal(jax.random.key(1), (2, 10, 3))
  s = jnp.array([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
  f = mlorc_optax.LowRankFactors(jnp.zeros((2, 7, 3)), s, v)
  warm = mlorc_optax.WarmStartCompressor(oversample=2)
  omega = warm.sketch(f, key, (2,), 10, 5)
  fresh = mlorc_optax.RSVDCompressor(oversample=2).sketch(f, key, (2,), 10, 5)
  np.testing.assert_array_equal(omega[0, :, :2], v[0, :, :2])
  np.testing.assert_array_equal(omega[1, :, :1], v[1, :, :1])
  np.testing.assert_array_equal(omega[0, :, 2:], fresh[0, :, 2:])
  np.testing.assert_array_equal(omega[1, :, 1:], fresh[1, :, 1:])
  # Sketching the whole column space stays the identity (exact).
  assert warm.sketch(f, key, (2,), 10, 10) is None


def test_warm_start_equals_rsvd_sketched_with_the_previous_v():
  shapes = {'w': (20, 12)}
  grads = noisy_low_rank(shapes, 4)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=3, compressor='warm')
  params = {'w': jnp.zeros((20, 12))}
  state = tx.init(params)
  for g in grads:
    prev = state[0]
    _, state = tx.update(g, state)
  # Recompute the last first-moment refresh by hand.
  f = mlorc_optax.LowRankFactors(prev.mu.u['w'], prev.mu.s['w'],
                                 prev.mu.v['w'])
  m = B1 * mlorc_optax.reconstruct(f) + (1 - B1) * grads[-1]['w']
  expected = ref.rsvd(np.asarray(m, np.float64),
                      np.asarray(f.v, np.float64), 3)
  np.testing.assert_allclose(
      mlorc_optax.reconstruct(mlorc_optax.LowRankFactors(
          state[0].mu.u['w'], state[0].mu.s['w'], state[0].mu.v['w'])),
      ref.reconstruct(*expected), atol=1e-5)


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
  c = mlorc_optax.LoRAPreCompressor(damping=damping, init_scale=0.1)
  tx = mlorc_optax.scale_by_mlorc_adam(B1, B2, EPS, rank=rank, seed=seed,
                                       compressor=c)
  reference = NumpyLoRAPreAdam(shapes, jax.random.PRNGKey(seed), rank, B1, B2,
                               EPS, damping, 0.1)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    ours, state = step(g, state)
    theirs = reference.step(g)
    for k in shapes:
      np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-3, atol=2e-4,
                                 err_msg=f'step {t}, leaf {k}')
      for moment in ('mu', 'nu'):
        f = getattr(state[0], moment)
        b, at = reference.f[k][moment]
        np.testing.assert_allclose(
            f.b[k] @ jnp.swapaxes(f.a[k], -1, -2),
            b @ np.swapaxes(at, -1, -2), rtol=1e-3, atol=1e-4,
            err_msg=f'step {t}, leaf {k}, {moment}')


def test_lorapre_regression_is_scale_invariant():
  """Gradients 1e-30 or 1e30 times larger give factors exactly that much
  larger in B: the damping is relative and the solves are normalised."""
  g = noisy_low_rank({'w': (12, 8)}, 1)[0]['w']
  c = mlorc_optax.LoRAPreCompressor()
  zero = mlorc_optax.LoRAPreFactors(jnp.zeros((12, 3)), jnp.zeros((8, 3)))
  key = jax.random.PRNGKey(0)
  base = c.update(zero, moment=g, grad=g, key=key, decay=0.9,
                  second_moment=False)
  for scale in (1e-30, 1e30):
    f = c.update(zero, moment=g, grad=scale * g, key=key, decay=0.9,
                 second_moment=False)
    assert np.all(np.isfinite(f.b)) and np.all(np.isfinite(f.a))
    # float32 rounding of the rescaling only.
    np.testing.assert_allclose(f.b / scale, base.b, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(f.a, base.a, rtol=2e-3, atol=1e-6)


def test_lorapre_redraws_a_that_has_underflowed_to_zero():
  c = mlorc_optax.LoRAPreCompressor()
  g = noisy_low_rank({'w': (12, 8)}, 1)[0]['w']
  dead = mlorc_optax.LoRAPreFactors(jnp.zeros((12, 3)), jnp.zeros((8, 3)))
  f = c.update(dead, moment=g, grad=g, key=jax.random.PRNGKey(1), decay=0.9,
               second_moment=False)
  # Not stuck at B = A = 0: the product picked up the gradient.
  product = c.read(f, second_moment=False, decay=0.9, count=1)
  assert np.linalg.norm(product) > 0.01 * np.linalg.norm(g)
  # A live A is kept (not redrawn): a zero gradient only shrinks it.
  shrunk = c.update(f, moment=g, grad=jnp.zeros_like(g),
                    key=jax.random.PRNGKey(2), decay=0.81,
                    second_moment=False)
  np.testing.assert_allclose(shrunk.a, 0.9 * f.a, rtol=1e-6)
  np.testing.assert_allclose(shrunk.b, 0.9 * f.b, rtol=1e-6)


def test_second_moment_reads_are_never_negative():
  g = noisy_low_rank({'w': (16, 12)}, 1, noise=1.0)[0]['w']
  for name in NAMES:
    c = mlorc_optax.COMPRESSORS[name]()
    k = 2
    zero = c.factor_type(*(jnp.zeros(s.shape) for s in c.specs((), 16, 12, k)))
    f = c.update(zero, moment=g * g, grad=g, key=jax.random.PRNGKey(0),
                 decay=0.999, second_moment=True)
    v = c.read(f, second_moment=True, decay=0.999, count=1)
    assert np.all(np.asarray(v) >= 0), name


def test_resolve_builds_rsvd_compressors_with_the_transform_settings():
  c = comp_lib.resolve_compressor('warm', oversample=3, power_iters=2)
  assert c == mlorc_optax.WarmStartCompressor(oversample=3, power_iters=2)
  assert comp_lib.resolve_compressor('lorapre', oversample=0,
                                     power_iters=0) == (
                                         mlorc_optax.LoRAPreCompressor())
