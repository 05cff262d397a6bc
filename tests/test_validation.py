"""Every invalid argument is rejected at construction, naming the argument."""

import jax
import jax.numpy as jnp
import pytest

import mlorc_optax

FACTORIES = [mlorc_optax.mlorc_adamw, mlorc_optax.mlorc_lion]


@pytest.mark.parametrize('factory', FACTORIES)
@pytest.mark.parametrize('kwargs,error,name', [
    (dict(rank=0), ValueError, 'rank'),
    (dict(rank=-3), ValueError, 'rank'),
    (dict(rank=2.0), TypeError, 'rank'),
    (dict(rank=True), TypeError, 'rank'),
    (dict(rank=jnp.asarray(4)), TypeError, 'rank'),
    (dict(oversample=-1), ValueError, 'oversample'),
    (dict(power_iters=-1), ValueError, 'power_iters'),
    (dict(b1=1.0), ValueError, 'b1'),
    (dict(b1=-0.1), ValueError, 'b1'),
    (dict(b2=1.5), ValueError, 'b2'),
    (dict(b2=float('nan')), ValueError, 'b2'),
    (dict(factor_dtype=jnp.int32), TypeError, 'factor_dtype'),
    (dict(seed='abc'), TypeError, 'seed'),
])
def test_invalid_argument_raises_naming_it(factory, kwargs, error, name):
  with pytest.raises(error, match=name):
    factory(1e-3, **kwargs)


@pytest.mark.parametrize('kwargs,error,name', [
    (dict(eps=-1e-8), ValueError, 'eps'),
    (dict(eps_root=-1.0), ValueError, 'eps_root'),
    (dict(compress=('mu', 'sigma')), ValueError, 'compress'),
    (dict(compress=()), ValueError, 'compress'),
    (dict(compress=('mu', 'mu')), ValueError, 'compress'),
])
def test_invalid_adam_argument_raises_naming_it(kwargs, error, name):
  with pytest.raises(error, match=name):
    mlorc_optax.mlorc_adamw(1e-3, **kwargs)


def test_valid_edge_values_are_accepted():
  mlorc_optax.mlorc_adamw(1e-3, b1=0.0, b2=0.0, eps=0.0, rank=1,
                          compress='nu', seed=jnp.asarray(3))
  mlorc_optax.mlorc_lion(1e-3, rank=1, seed=jax.random.key(0))


def test_compression_plan_validates_rank():
  with pytest.raises(ValueError, match='rank'):
    mlorc_optax.compression_plan({'w': jnp.zeros((4, 4))}, rank=0)
