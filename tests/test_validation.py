"""Every invalid argument is rejected at construction, naming the argument."""

import jax
import jax.numpy as jnp
import optax
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
    (dict(implementation='cuda'), ValueError, 'implementation'),
    # The compressor names of earlier versions are objects of contrib now.
    (dict(compressor='warm'), ValueError, 'compressor.*WarmStartCompressor'),
    (dict(compressor='lorapre'), ValueError, 'compressor.*LoRAPreCompressor'),
    (dict(compressor=mlorc_optax.contrib.WarmStartCompressor(),
          oversample=2), ValueError, 'oversample'),
    (dict(compressor=mlorc_optax.contrib.LoRAPreCompressor(),
          power_iters=1), ValueError, 'power_iters'),
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
    (dict(nesterov=1), TypeError, 'nesterov'),
])
def test_invalid_adam_argument_raises_naming_it(kwargs, error, name):
  with pytest.raises(error, match=name):
    mlorc_optax.mlorc_adamw(1e-3, **kwargs)


def test_valid_edge_values_are_accepted():
  mlorc_optax.mlorc_adamw(1e-3, b1=0.0, b2=0.0, eps=0.0, rank=1,
                          compress='nu', seed=jnp.asarray(3))
  mlorc_optax.mlorc_lion(1e-3, rank=1, seed=jax.random.key(0))
  mlorc_optax.mlorc_adamw(
      1e-3, compressor=mlorc_optax.compressors.RSVDCompressor(2, 1))


@pytest.mark.parametrize('kwargs,error,name', [
    (dict(rank=0), ValueError, 'rank'),
    (dict(rank=2.5), TypeError, 'rank'),
    (dict(compressor='rsvd'), TypeError, 'compressor'),
    (dict(factor_dtype=jnp.int8), TypeError, 'factor_dtype'),
    (dict(seed=1.5), TypeError, 'seed'),
    (dict(implementation='triton'), ValueError, 'implementation'),
])
def test_invalid_low_rank_moments_argument_raises_naming_it(kwargs, error,
                                                            name):
  with pytest.raises(error, match=name):
    mlorc_optax.low_rank_moments(optax.scale_by_adam(), **kwargs)


def test_low_rank_moments_wants_an_optax_transform():
  with pytest.raises(TypeError, match='inner'):
    mlorc_optax.low_rank_moments(lambda g: g)


def test_two_pass_implementation_needs_an_optimizer_that_has_one():
  # Only MLorc-Adam and -Lion bring a two-pass step.
  with pytest.raises(ValueError, match="implementation='xla'"):
    mlorc_optax.low_rank_moments(optax.trace(0.9), implementation='xla')


def test_zero_size_leaf_forced_into_low_rank_mask_raises_naming_it():
  params = {'ok': jnp.zeros((8, 6)), 'empty': jnp.zeros((0, 16))}
  for factory in FACTORIES:
    tx = factory(1e-3, rank=2, low_rank_mask={'ok': True, 'empty': True})
    with pytest.raises(ValueError, match="'empty'.*empty"):
      tx.init(params)
  # A stack of zero matrices too: it has no factors to keep either.
  tx = mlorc_optax.low_rank_moments(optax.scale_by_adam(), low_rank_mask=True)
  with pytest.raises(ValueError, match="'layers'"):
    tx.init({'layers': jnp.zeros((0, 12, 9))})


def test_compression_plan_needs_exactly_one_low_rank_moments():
  params = {'w': jnp.zeros((8, 6))}
  with pytest.raises(ValueError, match='exactly one'):
    mlorc_optax.compression_plan(optax.adamw(1e-3), params)
  two = optax.chain(mlorc_optax.scale_by_mlorc_adam(),
                    mlorc_optax.scale_by_mlorc_lion())
  with pytest.raises(ValueError, match='exactly one'):
    mlorc_optax.compression_plan(two, params)
