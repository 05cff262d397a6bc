"""Meta-gradients through unrolled ``mlorc_adamw`` updates (public API only).

The problem of the issue "silent wrong meta-gradients": a 16 x 12 ``tanh``
regression trained for 5 steps of ``mlorc_adamw(1e-2, rank=4)``, one sample
per step (batch 1), differentiated with ``jax.grad`` with respect to the
initial weights ``W0`` and projected on a random unit direction ``D``.

With batch 1 every gradient ``r x^T`` and every ``g * g`` is a rank-1
matrix, so the moments compressed after steps 1-4 have rank ``t <= 4`` and
keep it when ``W0`` moves: each of those compressions is exact on both sides
of a finite difference, and the compression after step 5 does not reach the
final weights (the step uses the dense moment). The final loss is therefore
the same function of ``W0`` as with ``optax.adamw``. Differentiating through
the QR and SVD of the rank-deficient sketches gave ``+474`` (warm sketch) or
``-0.78`` (random sketch) against the true ``+0.430`` for the first problem
below.

Finite-difference tolerance. The loss ``L`` (~6 to 9 here) is a float32
computation through 5 optimizer steps and their randomized SVDs. Its
absolute rounding error is dominated by the final sum of 12 squared
residuals (at most ``12 u L ~ 7e-6``, ``u = 2^-24``) plus the effect of the
rounding of the weights' trajectory (float32 Adam directions and ~1e-6
relative RSVD reconstruction errors, ~1e-8 per entry and step, ~3e-6 on
``L``); we allow ``delta = 2e-5``. The fourth-order central difference

    f'(0) ~ [8 (f(e) - f(-e)) - (f(2e) - f(-2e))] / (12 e)

turns that into at most ``(16 + 2) delta / (12 e) = 1.5 delta / e = 1.5e-3``
at ``e = 0.02`` (``D`` has unit Frobenius norm). Its truncation error,
``e^4 |f^(5)| / 30``, is a property of the exact function, not of any
machine's rounding: the same difference of the float64 ``optax.adamw`` loss
(the same function, see above) is within 1e-6 of the float64 derivative at
``e = 0.02`` for the problems used (2.6e-8 and 7.1e-7 for seeds 1 and 5).
Hence the tolerance 2e-3, 2-5 orders of magnitude below the errors
of the old derivative (measured |AD - FD| now: <= 5e-5). With a larger batch
the finite differences are unusable at any float32-friendly step: Adam's
first step is ~``sign(g)``, and with 16 samples some entries of ``g`` change
sign within ``|dW| ~ 1e-2`` (the float64 difference is off by 1e-2 there),
so the full-rank test at batch 16 compares with ``optax.adamw`` only.

Analytic gradients of the same function in float32 agree with much less
slack: ``mlorc_adamw`` and ``optax.adamw`` differ by the float32 rounding of
the randomized SVD (relative ~1e-6 per reconstruction, through Adam's
``m / sqrt(v)``); the tests allow ``1e-4`` of the largest gradient entry
(every entry compared).
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlorc_optax

ROWS, COLS, STEPS, LR = 16, 12, 5, 1e-2
FD_STEP = 0.02
FD_TOL = 2e-3
GRAD_RTOL = 1e-4


def _problem(seed, batch=1):
  """W0, per-step samples (x [STEPS + 1, batch, ROWS], y) and a unit D."""
  kw, kx, ky, kd = jax.random.split(jax.random.key(seed), 4)
  w0 = jax.random.normal(kw, (ROWS, COLS), jnp.float32) / np.sqrt(ROWS)
  xs = jax.random.normal(kx, (STEPS + 1, batch, ROWS), jnp.float32)
  ys = jax.random.normal(ky, (STEPS + 1, batch, COLS), jnp.float32)
  d = jax.random.normal(kd, (ROWS, COLS), jnp.float32)
  return w0, xs, ys, d / jnp.linalg.norm(d)


def _loss(w, x, y):
  return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ w) - y) ** 2, axis=-1))


def _final_loss(w0, tx, xs, ys):
  """Loss on a last sample after STEPS unrolled updates from ``w0``."""

  def step(carry, sample):
    params, state = carry
    grads = jax.grad(lambda p: _loss(p['w'], *sample))(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  params = {'w': w0}
  (params, _), _ = jax.lax.scan(
      step, (params, tx.init(params)), (xs[:STEPS], ys[:STEPS]))
  return _loss(params['w'], xs[STEPS], ys[STEPS])


def _meta_grad(tx, w0, xs, ys):
  return jax.jit(jax.grad(lambda w: _final_loss(w, tx, xs, ys)))(w0)


def _finite_difference(tx, w0, xs, ys, d, e=FD_STEP):
  """Fourth-order central difference of the final loss along ``d``."""
  f = jax.jit(jax.vmap(lambda w: _final_loss(w, tx, xs, ys)))
  l_p1, l_m1, l_p2, l_m2 = np.asarray(
      f(jnp.stack([w0 + e * d, w0 - e * d, w0 + 2 * e * d, w0 - 2 * e * d])),
      np.float64)
  return (8 * (l_p1 - l_m1) - (l_p2 - l_m2)) / (12 * e)


def _assert_close_to_adamw(grad, w0, xs, ys):
  reference = _meta_grad(optax.adamw(LR), w0, xs, ys)
  np.testing.assert_allclose(
      grad, reference, rtol=0,
      atol=GRAD_RTOL * float(jnp.max(jnp.abs(reference))))


def _mlorc(rank, **kwargs):
  return mlorc_optax.mlorc_adamw(
      LR, rank=rank, implementation='reference', **kwargs)


@pytest.mark.parametrize('seed,kwargs', [
    (1, {}),
    (5, {}),
    (1, {'low_rank_mask': True}),
    (1, {'compressor': mlorc_optax.contrib.WarmStartCompressor()}),
    (5, {'compressor': mlorc_optax.contrib.WarmStartCompressor()}),
], ids=['rsvd-1', 'rsvd-5', 'rsvd-masked-1', 'warm-1', 'warm-5'])
def test_meta_gradient_with_rank_deficient_moments_matches_fd(seed, kwargs):
  # The paper's first moment (complement=0): where a moment's own rank is
  # below r its compression is exact, but the complement still credits the
  # directions outside the moment's span, so only without it is the step
  # optax.adamw's (checked last).
  tx = _mlorc(4, complement=0.0, **kwargs)
  w0, xs, ys, d = _problem(seed)
  # W is compressed: the state holds rank-4 factors, not dense moments.
  shapes = {x.shape for x in jax.tree.leaves(tx.init({'w': w0}))}
  assert (ROWS, 4) in shapes and (ROWS, COLS) not in shapes
  grad = _meta_grad(tx, w0, xs, ys)
  assert np.all(np.isfinite(grad))
  fd = _finite_difference(tx, w0, xs, ys, d)
  assert abs(float(jnp.sum(grad * d)) - fd) < FD_TOL
  # The compressions that reach the final weights are exact: the same
  # function of W0 as optax.adamw's, so the same gradient (every entry).
  _assert_close_to_adamw(grad, w0, xs, ys)


@pytest.mark.parametrize('batch', [1, 16])
def test_meta_gradient_at_full_rank_equals_adamw(batch):
  """rank >= min(m, n): every compression is exact, the moments being
  rank-deficient (batch 1) or of full rank (batch 16)."""
  tx = _mlorc(min(ROWS, COLS), low_rank_mask=True)
  w0, xs, ys, _ = _problem(3, batch)
  # W is compressed (the default rule would leave a rank-12 16 x 12 dense):
  # the state holds singular values.
  assert (COLS,) in {x.shape for x in jax.tree.leaves(tx.init({'w': w0}))}
  _assert_close_to_adamw(_meta_grad(tx, w0, xs, ys), w0, xs, ys)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
def test_the_two_pass_step_refuses_to_be_differentiated(implementation):
  """Its Gram-based factorizations have no derivative rule: a clear error,
  not NaN (the reference step is the one to differentiate)."""
  w0, xs, ys, _ = _problem(1)
  tx = mlorc_optax.mlorc_adamw(LR, rank=4, low_rank_mask=True,
                               implementation=implementation)
  with pytest.raises(TypeError, match="implementation='reference'"):
    jax.grad(lambda w: _final_loss(w, tx, xs, ys))(w0)
