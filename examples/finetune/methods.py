"""The optimizers compared by the fine-tuning harness, by name.

Every method is a :class:`MethodSpec` parsed from its name; :func:`transform`
gives its Optax transformation and :func:`prepare` the model it trains (LoRA
adds adapters) with the ``wrt`` filter of ``nnx.Optimizer``.

====================  =========================================================
name                  method
====================  =========================================================
``adamw``             ``optax.adamw``, every ``nnx.Param`` trained
``mlorc_adamw_r{r}``  ``mlorc_optax.mlorc_adamw(rank=r, b1=0.8)``, every param
``lion``              ``optax.lion``, every ``nnx.Param`` trained
``mlorc_lion_r{r}``   ``mlorc_optax.mlorc_lion(rank=r)``, every param
``..._r{r}_{c}``      an MLorc method with the compressor named ``c``
                      (:data:`COMPRESSORS`: ``warm``, ``lorapre``,
                      ``factored``; no
                      suffix: the paper's ``rsvd``), e.g.
                      ``mlorc_adamw_r4_lorapre``
``galore_r{r}``       ``optax.contrib.galore(rank=r)`` (GaLore-AdamW) projecting
                      the leaves MLorc compresses at rank ``r``
``lora_r{r}``         ``nnx.LoRA`` (rank ``r``) around every encoder Linear
                      (attention query/key/value/output, MLP intermediate/
                      output), base frozen; ``optax.adamw`` on the adapters
                      and the classifier head
``NAME:KEY=VALUE,...`` any of the above with keyword arguments for its
                      factory, e.g. ``mlorc_adamw_r4:complement=1.0``,
                      ``mlorc_adamw_r4:b1=0.9,update_bound=none`` (read by
                      :mod:`benchmarks.toolkit.method_options`, as the
                      Shakespeare benchmark reads its specs; the harness
                      sets the rate, weight decay, mask and rank itself;
                      named values: :data:`COMPRESSORS`,
                      :data:`LOW_RANK_MASKS`)
====================  =========================================================

Shared settings, so that methods differ only in what they are about:

* every method gets the same learning-rate schedule (built by the caller and
  passed as ``learning_rate``);
* weight decay is the same within a family (:data:`WEIGHT_DECAY`: AdamW-like
  0.01, Lion-like 0.03, i.e. the same ``lr * wd`` at Lion's 3x smaller
  learning rate) and applies to leaves with two or more axes (kernels,
  embeddings, LoRA factors), not to biases and LayerNorm scales
  (:func:`decay_mask`);
* MLorc-AdamW uses the paper's ``b1=0.8`` (Section 4.1: it damps the RSVD
  approximation error) and ``oversample=0``; all other Adam-like methods use
  optax's ``b1=0.9``; Lion-like methods use optax's defaults (``b1=0.9``,
  ``b2=0.99``);
* the low-rank methods compress/project/adapt the same matrices: the leaves
  that :func:`mlorc_optax.compression_plan` selects at rank ``r`` (for
  MiniLM: the 36 encoder attention and MLP kernels; embeddings, biases, norms
  and the 384x3 head stay dense).

LoRA note: ``nnx.LoRA`` computes ``x @ A @ B`` with no ``alpha / r`` factor
(i.e. ``alpha = r``); with Adam that factor mostly acts as a learning-rate
multiplier, which the per-method learning-rate tuning absorbs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Literal

import jax
import optax
from flax import nnx

import mlorc_optax
from benchmarks.toolkit import method_options
from mlorc_optax import contrib

Kind = Literal['full', 'mlorc', 'galore', 'lora']
Family = Literal['adamw', 'lion']

WEIGHT_DECAY: dict[str, float] = {'adamw': 0.01, 'lion': 0.03}
"""Decoupled weight decay of each optimizer family."""

MLORC_ADAMW_B1 = 0.8
"""The paper's first-moment decay for MLorc-AdamW (Section 4.1)."""

COMPRESSORS: dict[str, Any] = {
    'rsvd': 'rsvd',
    'warm': contrib.WarmStartCompressor(),
    'lorapre': contrib.LoRAPreCompressor(),
    'factored': contrib.FactoredSecondMoment(),
}
"""The ``compressor=`` of MLorc's optimizers by the name used in method
names: the paper's randomized SVD (``'rsvd'``, the default), or the
compressors of :mod:`mlorc_optax.contrib` (a warm-started sketch,
LoRA-Pre, the second moment as Adafactor's row and column statistics)."""

LOW_RANK_MASKS: dict[str, Any] = {
    'with_embeddings': mlorc_optax.path_mask(exclude=r'(^|/)(bias|scale)$'),
}
"""Named ``low_rank_mask=`` values for method options: ``with_embeddings``
compresses every matrix, the word embedding too (the default mask leaves
embeddings dense, ``mlorc_optax.plan.DEFAULT_EXCLUDED_NAMES``), e.g.
``mlorc_adamw_r4:low_rank_mask=with_embeddings``."""

GALORE_UPDATE_PROJ_GAP = 50
"""Steps between GaLore projector updates (the paper's value for small GLUE
tasks, Appendix D.2)."""

COMPRESSOR_METHODS: tuple[str, ...] = (
    'adamw',
    'mlorc_adamw_r4',
    'mlorc_adamw_r4_warm',
    'mlorc_adamw_r4_lorapre',
    'mlorc_adamw_r8',
    'mlorc_adamw_r8_warm',
    'mlorc_adamw_r8_lorapre',
)
"""The comparison of the moment compressors (issue #9), in table order."""

DEFAULT_METHODS: tuple[str, ...] = (
    'adamw',
    'mlorc_adamw_r4',
    'mlorc_adamw_r8',
    'lion',
    'mlorc_lion_r4',
    'galore_r4',
    'lora_r4',
)
"""The methods of the comparison, in table order."""

# Learning-rate grids, by kind and family, for MiniLM on this small data set
# (a few hundred steps: 5e-5 and below left AdamW predicting the majority class
# after 54 steps). Lion: ~3x smaller than AdamW (its sign updates are larger);
# GaLore and LoRA: larger, as in the paper's tuned values (3e-4..1e-3; their
# updates only span a rank-r subspace). MLorc: the same grid as its base
# optimizer (the paper: MLorc's best rate is close to full fine-tuning's).
_LR_GRIDS: dict[tuple[str, str], tuple[float, ...]] = {
    ('full', 'adamw'): (5e-5, 1e-4, 2e-4),
    ('mlorc', 'adamw'): (5e-5, 1e-4, 2e-4),
    ('full', 'lion'): (1.5e-5, 3e-5, 7e-5),
    ('mlorc', 'lion'): (1.5e-5, 3e-5, 7e-5),
    ('galore', 'adamw'): (2e-4, 5e-4, 1e-3),
    ('lora', 'adamw'): (5e-4, 1e-3, 2e-3),
}

_NAME = re.compile(
    r'^(?P<kind>mlorc_adamw|mlorc_lion|galore|lora|adamw|lion)'
    r'(?:_r(?P<rank>\d+))?(?:_(?P<compressor>[a-z]+))?$'
)

LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ('attention', 'query'),
    ('attention', 'key'),
    ('attention', 'value'),
    ('attention', 'output'),
    ('intermediate',),
    ('output',),
)
"""Attribute paths (inside each encoder layer) of the Linears LoRA wraps."""

FULL_WRT = nnx.Param
"""Full-parameter methods train every ``nnx.Param``."""

LORA_WRT = nnx.Any(nnx.LoRAParam, nnx.PathContains('classifier'))
"""LoRA trains the adapters and the classifier head. A single shared object:
``nnx.Optimizer`` keeps ``wrt`` in its static graph definition, so reusing it
lets ``nnx.jit`` reuse compiled steps across runs."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One method of the comparison.

  Attributes:
    name: the registry name, e.g. ``'mlorc_adamw_r4'``.
    kind: ``'full'``, ``'mlorc'``, ``'galore'`` or ``'lora'``.
    family: ``'adamw'`` or ``'lion'`` (the base optimizer).
    rank: the rank of the low-rank methods, None for full fine-tuning.
    compressor: the name of MLorc's moment compressor, a key of
      :data:`COMPRESSORS` (``'rsvd'``, ``'warm'``, ``'lorapre'``,
      ``'factored'``);
      ``'rsvd'`` for the other kinds, which have none.
    options: ``(key, value)`` keyword arguments for the factory, from the
      name's ``:KEY=VALUE`` part, in order (they override the harness's
      defaults, e.g. MLorc-AdamW's ``b1``).
  """

  name: str
  kind: Kind
  family: Family
  rank: int | None = None
  compressor: str = 'rsvd'
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    """A display name, e.g. ``'MLorc-AdamW (r=4)'``."""
    base = {
        ('full', 'adamw'): 'AdamW (full)',
        ('full', 'lion'): 'Lion (full)',
        ('mlorc', 'adamw'): 'MLorc-AdamW',
        ('mlorc', 'lion'): 'MLorc-Lion',
        ('galore', 'adamw'): 'GaLore-AdamW',
        ('lora', 'adamw'): 'LoRA-AdamW',
    }[(self.kind, self.family)]
    details = ([] if self.rank is None else [f'r={self.rank}']) + (
        [] if self.compressor == 'rsvd' else [self.compressor]) + [
            f'{key}={_shown(value)}' for key, value in self.options]
    return f'{base} ({", ".join(details)})' if details else base

  @property
  def weight_decay(self) -> float:
    """The family's decoupled weight decay."""
    return WEIGHT_DECAY[self.family]

  @property
  def default_lr_grid(self) -> tuple[float, ...]:
    """Learning rates tried by default when tuning this method."""
    return _LR_GRIDS[(self.kind, self.family)]

  @property
  def trains_all_params(self) -> bool:
    """True unless the method freezes the pretrained weights (LoRA)."""
    return self.kind != 'lora'


def parse(spec: str) -> MethodSpec:
  """Parses a method name (see the module docstring) into a spec.

  Args:
    spec: e.g. ``'adamw'``, ``'mlorc_adamw_r8'``, ``'galore_r16'``,
      ``'mlorc_adamw_r4:complement=1.0'``.

  Returns:
    The :class:`MethodSpec` (its ``name`` the whole spec).

  Raises:
    ValueError: unknown name, a rank on a full method, a missing rank, a
      compressor on a method that is not MLorc, or a bad option (naming
      it).
  """
  name, _ = method_options.split(spec)
  match = _NAME.match(name)
  if match is None:
    raise ValueError(
        f'Unknown method {name!r}. Known: adamw, lion, mlorc_adamw_r<R>, '
        'mlorc_lion_r<R> (optionally suffixed '
        + ', '.join(f'_{c}' for c in COMPRESSORS if c != 'rsvd') + '), '
        'galore_r<R>, lora_r<R> (e.g. '
        f'{", ".join(DEFAULT_METHODS)}).'
    )
  kind_name, rank = match['kind'], match['rank']
  compressor = match['compressor'] or 'rsvd'
  if match['compressor'] is not None and (
      not kind_name.startswith('mlorc')
      or compressor not in COMPRESSORS
      or compressor == 'rsvd'
  ):
    raise ValueError(
        f'{name!r}: only MLorc methods take a compressor suffix, one of '
        + ', '.join(f'_{c}' for c in COMPRESSORS if c != 'rsvd')
        + ' (no suffix: rsvd).'
    )
  kind, family = {
      'adamw': ('full', 'adamw'),
      'lion': ('full', 'lion'),
      'mlorc_adamw': ('mlorc', 'adamw'),
      'mlorc_lion': ('mlorc', 'lion'),
      'galore': ('galore', 'adamw'),
      'lora': ('lora', 'adamw'),
  }[kind_name]
  if kind == 'full' and rank is not None:
    raise ValueError(f'{name!r}: full fine-tuning takes no rank.')
  if kind != 'full' and rank is None:
    raise ValueError(f'{name!r}: give a rank, e.g. {kind_name}_r4.')
  if rank is not None and int(rank) < 1:
    raise ValueError(f'{name!r}: the rank must be >= 1.')
  options = method_options.parse_options(
      spec, _factory(kind, family), fixed=_FIXED,
      aliases={'compressor': COMPRESSORS, 'low_rank_mask': LOW_RANK_MASKS})
  if 'compressor' in options and match['compressor'] is not None:
    raise ValueError(f'{spec!r} names its compressor twice (the _'
                     f'{compressor} suffix and compressor=).')
  return MethodSpec(
      name=spec,
      kind=kind,
      family=family,
      rank=None if rank is None else int(rank),
      compressor=compressor,
      options=tuple(options.items()),
  )


#: Factory arguments the harness sets itself (refused as options).
_FIXED = ('learning_rate', 'weight_decay', 'mask', 'rank',
          'weight_dimension_numbers', 'update_proj_gap')


def _factory(kind: str, family: str) -> Any:
  """The factory of a method's optimizer (whose parameters options take)."""
  if kind == 'mlorc':
    return (mlorc_optax.mlorc_adamw if family == 'adamw'
            else mlorc_optax.mlorc_lion)
  if kind == 'galore':
    return optax.contrib.galore
  return optax.adamw if family == 'adamw' else optax.lion


def _shown(value: Any) -> str:
  """An option's value in a label (objects by their alias or type)."""
  for alias, obj in (*COMPRESSORS.items(), *LOW_RANK_MASKS.items()):
    if value is obj:
      return alias
  if isinstance(value, tuple):
    return '+'.join(map(str, value))
  return str(value) if isinstance(value, (int, float, str, type(None))) else (
      type(value).__name__)


def decay_mask(params: Any) -> Any:
  """Weight-decay mask: True for leaves with two or more axes."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def galore_dimension_numbers(rank: int):
  """A ``weight_dimension_numbers`` callable for ``optax.contrib.galore``.

  It projects exactly the leaves that MLorc compresses at ``rank``
  (:func:`mlorc_optax.compression_plan` with the default mask), viewing an NNX
  kernel ``(in, out)`` as the matrix ``in x out``; every other leaf gets
  ``None`` (plain Adam in full space).
  """

  mlorc = mlorc_optax.mlorc_adamw(1.0, rank=rank)  # the default mask

  def dimension_numbers(params: Any) -> Any:
    plan = mlorc_optax.compression_plan(mlorc, params)
    return jax.tree.map(
        lambda p: (
            optax.contrib.GaLoreDimensionNumbers(
                reduction_axis=p.view.row_axes, output_axis=p.view.col_axes
            )
            if p.compressed
            else None
        ),
        plan,
        is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan),
    )

  return dimension_numbers


@functools.lru_cache(maxsize=None)
def transform(
    spec: MethodSpec,
    learning_rate: float = 1.0,
    *,
    galore_update_proj_gap: int = GALORE_UPDATE_PROJ_GAP,
) -> optax.GradientTransformation:
  """The Optax transformation of ``spec`` (cached: one object per arguments).

  Args:
    spec: the method.
    learning_rate: a float (a schedule also works if hashable; the harness
      passes 1.0 and scales updates by the scheduled rate itself, see
      :mod:`examples.finetune.train`).
    galore_update_proj_gap: steps between GaLore projector updates.

  Returns:
    The ``optax.GradientTransformation``. Caching matters: ``nnx.Optimizer``
    stores it in its static graph definition, so the same object lets the
    harness reuse one compiled train step across runs.
  """
  wd = spec.weight_decay
  factory = _factory(spec.kind, spec.family)
  options = dict(spec.options)
  if spec.kind in ('full', 'lora'):
    return factory(learning_rate, weight_decay=wd, mask=decay_mask,
                   **options)
  if spec.kind == 'mlorc':
    defaults = {'compressor': COMPRESSORS[spec.compressor]}
    if spec.family == 'adamw':
      defaults['b1'] = MLORC_ADAMW_B1
    return factory(learning_rate, weight_decay=wd, mask=decay_mask,
                   rank=spec.rank, **{**defaults, **options})
  if spec.kind == 'galore':
    return factory(
        learning_rate,
        rank=spec.rank,
        update_proj_gap=galore_update_proj_gap,
        weight_decay=wd,
        mask=decay_mask,
        weight_dimension_numbers=galore_dimension_numbers(spec.rank),
        **options,
    )
  raise ValueError(f'unknown kind {spec.kind!r}')


def add_lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """Wraps the encoder Linears of a BERT classifier in ``nnx.LoRA``, in place.

  Each target ``nnx.Linear`` (see :data:`LORA_TARGETS`) becomes
  ``nnx.LoRA(in, rank, out, base_module=linear)``: ``y = linear(x) + x A B``
  with ``A`` He-uniform and ``B`` zero, so the model's function is unchanged
  at initialisation. The base kernels stay ``nnx.Param`` (frozen by
  :data:`LORA_WRT`); ``A`` and ``B`` are ``nnx.LoRAParam``.

  Args:
    model: a :class:`examples.finetune.model.BertClassifier` (or anything with
      ``.bert.layers``).
    rank: the LoRA rank.
    rngs: initialises the ``A`` factors.

  Returns:
    ``model`` (changed in place).
  """
  for layer in model.bert.layers:
    for path in LORA_TARGETS:
      parent = layer
      for attr in path[:-1]:
        parent = getattr(parent, attr)
      linear = getattr(parent, path[-1])
      if not isinstance(linear, nnx.Linear):
        raise TypeError(f'{path} is a {type(linear).__name__}, not a Linear')
      setattr(
          parent,
          path[-1],
          nnx.LoRA(
              linear.in_features,
              rank,
              linear.out_features,
              base_module=linear,
              dtype=linear.dtype,
              param_dtype=linear.param_dtype,
              rngs=rngs,
          ),
      )
  return model


def prepare(spec: MethodSpec | str, model: nnx.Module, *, seed: int = 0
            ) -> tuple[nnx.Module, Any]:
  """The model a method trains and its ``wrt`` filter (which variables).

  Args:
    spec: a :class:`MethodSpec` or a method name.
    model: a freshly built classifier (LoRA changes it in place).
    seed: seeds the LoRA ``A`` factors.

  Returns:
    ``(model, wrt)``: LoRA adds adapters to ``model`` and trains only them
    and the head (:data:`LORA_WRT`); every other method trains every
    ``nnx.Param`` (:data:`FULL_WRT`). Create the optimizer as
    ``nnx.Optimizer(model, transform(spec, ...), wrt=wrt)``.
  """
  spec = parse(spec) if isinstance(spec, str) else spec
  if spec.kind == 'lora':
    return add_lora(model, spec.rank, rngs=nnx.Rngs(params=seed)), LORA_WRT
  return model, FULL_WRT
