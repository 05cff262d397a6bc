"""The optimizers the Shakespeare benchmark compares, named by a spec string.

A method is ``NAME[:KEY=VALUE[,KEY=VALUE...]]``: a base name of
:data:`BASES` (with the rank for the low-rank ones) and keyword arguments
passed through to its factory, e.g.::

  adamw
  mlorc_adamw_r4                      mlorc_optax.mlorc_adamw(rank=4)
  mlorc_adamw_r4:b1=0.8               the paper's first-moment decay
  mlorc_adamw_r4:compress=nu          only the second moment compressed
  mlorc_adamw_r4:compressor=warm      contrib.WarmStartCompressor()
  mlorc_adamw_r4:complement=0         without the first moment's complement
  mlorc_adamw_r4:compressor=factored  contrib.FactoredSecondMoment()
  mlorc_adamw_r4:low_rank_mask=with_embeddings   the embedding compressed too
  galore_r4:update_proj_gap=50
  adamw:lr=3e-3                       another reference rate for the grid

The options are read by :mod:`benchmarks.toolkit.method_options`, as the
fine-tuning example reads its own: values parsed as ``int``, ``float``,
``true``/``false``, ``none`` or strings, ``+`` lists (``compress=mu+nu``) as
tuples, :data:`VALUE_ALIASES` naming objects (``compressor=warm``), and
every key a parameter of the factory; ``lr`` is this benchmark's own key,
the reference rate of the grid.

Every method is built at learning rate 1 (the training loop multiplies the
update by the tuned rate and the schedule) with the same weight-decay rule:
decoupled, on kernels and the embedding only (:func:`decay_mask`), of a
strength per family (:data:`WEIGHT_DECAY`) such that ``lr * wd`` is about
``1e-4`` per step at the family's usual rate, so every family shrinks weights
alike.

GaLore: ``optax.contrib.galore`` needs every axis of a leaf in its dimension
numbers (no batch axes), so a stacked ``(layers, m, n)`` kernel could only be
projected as one ``layers*m x n`` matrix, one subspace shared by all layers.
:func:`per_layer` runs it on each layer's ``m x n`` matrix instead (and
``optax.partition`` the plain one on the other leaves); it projects exactly
the matrices MLorc compresses (the fine-tuning example's
``galore_dimension_numbers``, applied to one layer's leaves).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import mlorc_optax
from benchmarks.toolkit import method_options
from examples.finetune.methods import COMPRESSORS
from examples.finetune.methods import LOW_RANK_MASKS
from examples.finetune.methods import galore_dimension_numbers


@dataclasses.dataclass(frozen=True)
class Base:
  """A family of methods.

  Attributes:
    factory: the optax-style factory (first argument: the learning rate).
    family: ``'adam'``, ``'lion'`` or ``'adafactor'`` (sets the weight decay).
    lr: reference learning rate: the grid is ``lr`` times
      ``Config.lr_multipliers``.
    ranked: the name carries ``_r<rank>``.
    decay_kwargs: how the factory names (weight decay, mask).
    options_of: the function whose parameters are the accepted options
      (None: ``factory``).
  """

  factory: Callable[..., optax.GradientTransformation]
  family: str
  lr: float
  ranked: bool = False
  decay_kwargs: tuple[str, str] = ('weight_decay', 'mask')
  options_of: Callable[..., Any] | None = None


def _galore(learning_rate, *, rank, **kwargs):
  """``optax.contrib.galore`` of MLorc's matrices, per layer when stacked."""
  kwargs.setdefault('update_proj_gap', GALORE_UPDATE_PROJ_GAP)

  def galore():
    return optax.contrib.galore(
        learning_rate, rank=rank,
        weight_dimension_numbers=galore_dimension_numbers(rank), **kwargs)

  return optax.partition(
      {'stacked': per_layer(galore()), 'single': galore()},
      lambda params: jax.tree.map(
          lambda x: 'stacked' if x.ndim >= 3 else 'single', params))


#: Base names. Reference rates (grid: x 0.5, 1, 2, 4 by default) placed from
#: a run of the h200 preset on an H200, whose tuning chose AdamW 5e-4, MLorc
#: 1e-3 (b1=0.8) to 2e-3 (b1=0.9, then the grid's top), GaLore 8e-3,
#: Adafactor 2e-2 (a relative step, scaled by each weight's RMS), Lion 1e-4
#: (then the grid's bottom) and MLorc-Lion 2e-4.
BASES: dict[str, Base] = {
    'adamw': Base(optax.adamw, 'adam', 5e-4),
    'mlorc_adamw': Base(mlorc_optax.mlorc_adamw, 'adam', 1e-3, ranked=True),
    'galore': Base(_galore, 'adam', 4e-3, ranked=True,
                   options_of=optax.contrib.galore),
    'adafactor': Base(optax.adafactor, 'adafactor', 2e-2,
                      decay_kwargs=('weight_decay_rate', 'weight_decay_mask')),
    'lion': Base(optax.lion, 'lion', 1e-4),
    'mlorc_lion': Base(mlorc_optax.mlorc_lion, 'lion', 1e-4, ranked=True),
}

#: Decoupled weight decay by family: ``lr * wd`` about 1e-4 per step at
#: AdamW's 1e-3, Lion's 2e-4 and Adafactor's 1e-2.
WEIGHT_DECAY = {'adam': 0.1, 'lion': 0.5, 'adafactor': 0.01}
#: Steps between GaLore's SVDs (its paper's value for pre-training).
GALORE_UPDATE_PROJ_GAP = 200
#: Named objects usable as option values, by option.
VALUE_ALIASES: dict[str, dict[str, Any]] = {
    'compressor': COMPRESSORS,
    'low_rank_mask': LOW_RANK_MASKS,
}
#: Options the benchmark sets itself.
_FIXED = ('learning_rate', 'rank', 'seed', 'weight_dimension_numbers')

_NAME = re.compile(r'(?P<base>[a-z_]+?)(?:_r(?P<rank>\w+))?')


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed method spec (hashable: one optax transform per spec).

  Attributes:
    spec: the text it was parsed from (its name in every result).
    base: a key of :data:`BASES`.
    rank: the low-rank methods' rank, else None.
    options: ``(key, value)`` pairs for the factory, in spec order.
    lr: its reference learning rate (the grid is lr x the multipliers).
  """

  spec: str
  base: str
  rank: int | None
  options: tuple[tuple[str, Any], ...]
  lr: float

  @property
  def family(self) -> str:
    return BASES[self.base].family

  def build(self) -> optax.GradientTransformation:
    """The transformation at learning rate 1 (see the module docstring)."""
    return _build(self)


def parse(spec: str) -> Method:
  """Parses ``NAME[:KEY=VALUE,...]`` (see the module docstring).

  Raises:
    ValueError: naming the bad part: an unknown base name, a missing or
      non-integer rank, an option without ``=``, a repeated option, a key
      the factory does not take, or a bad ``lr``.
  """
  name, _ = method_options.split(spec)
  match = _NAME.fullmatch(name)
  base = BASES.get(match.group('base')) if match else None
  if base is None:
    raise ValueError(
        f'unknown method {name!r} in {spec!r}; known: '
        + ', '.join(f'{b}_r<rank>' if v.ranked else b
                    for b, v in BASES.items()) + '.')
  rank = match.group('rank')
  if base.ranked and rank is None:
    raise ValueError(f'{name!r} in {spec!r} needs a rank, e.g. {name}_r4.')
  if not base.ranked and rank is not None:
    raise ValueError(f'{name!r} in {spec!r}: {match.group("base")} takes '
                     'no rank.')
  if rank is not None and not (rank.isdigit() and int(rank) > 0):
    raise ValueError(f'rank {rank!r} of {name!r} in {spec!r} is not a '
                     'positive integer.')
  options = method_options.parse_options(
      spec, base.options_of or base.factory, fixed=_FIXED,
      own={'lr': functools.partial(_number, spec=spec)},
      aliases=VALUE_ALIASES)
  lr = options.pop('lr', base.lr)
  return Method(spec, match.group('base'), int(rank) if rank else None,
                tuple(options.items()), lr)


def _number(text: str, *, spec: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f'lr={text!r} of {spec!r} is not a positive number.')
  return value


def decay_mask(params: Any) -> Any:
  """True for kernels and the embedding (not norm scales), by path."""

  def decayed(path, _):
    names = {getattr(k, 'key', None) for k in path}
    return bool(names & {'kernel', 'embedding'})

  return jax.tree_util.tree_map_with_path(decayed, params)


@functools.lru_cache(maxsize=None)
def _build(method: Method) -> optax.GradientTransformation:
  base = BASES[method.base]
  decay, mask = base.decay_kwargs
  kwargs = {decay: WEIGHT_DECAY[base.family], mask: decay_mask}
  if method.rank is not None:
    kwargs['rank'] = method.rank
  kwargs.update(method.options)
  return base.factory(1.0, **kwargs)


# ---------------------------------------------------------------------------
# GaLore on stacked layers.
# ---------------------------------------------------------------------------


def batch_axes(state: Any) -> Any:
  """``jax.vmap`` axes of a state: None (shared) for integer scalars, else 0.

  Step counts are equal in every layer (or run) of a batch; keeping them
  shared keeps a ``lax.cond`` on the count (GaLore's SVD every
  ``update_proj_gap`` steps) a branch rather than a ``select`` of both.
  """
  return jax.tree.map(
      lambda x: None if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)
      else 0, state)


def per_layer(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` on each layer of stacked ``(layers, ...)`` leaves (``jax.vmap``).

  A scanned model's ``(layers, m, n)`` kernel reaches ``inner`` as a batch of
  ``m x n`` matrices, so a transformation that handles matrices one by one,
  such as ``optax.contrib.galore``, treats each layer as its own matrix.
  Every leaf given to it must be stacked (route the others elsewhere with
  ``optax.partition``).
  """

  def axes(tree):
    layer = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
    return batch_axes(jax.eval_shape(inner.init, layer))

  def init_fn(params):
    return jax.vmap(inner.init, out_axes=axes(params))(params)

  def update_fn(updates, state, params=None):
    a = axes(updates)
    return jax.vmap(inner.update, in_axes=(0, a, None if params is None else 0),
                    out_axes=(0, a))(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)
