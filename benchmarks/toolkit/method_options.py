"""Keyword options of a method spec: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.

The fine-tuning example and the benchmarks name the optimizers they compare
by a spec string: a harness-specific name (``mlorc_adamw_r4``) and keyword
arguments passed through to the method's factory, e.g.
``mlorc_adamw_r4:complement=1.0,compress=mu+nu``. This module reads the
options part, the same way for every harness: each key must be a parameter
of the factory (checked against its signature, so options the library adds
later work without changes here) or one of the harness's own keys (such as
a reference learning rate), and not one the harness sets itself.

Values are parsed as ``int``, ``float``, ``true``/``false``, ``none``, else
kept as strings; a ``+`` list (``compress=mu+nu``) becomes a tuple for a
parameter annotated as a sequence; ``aliases`` names objects by option
(``compressor=warm``).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping
from typing import Any


def split(spec: str) -> tuple[str, str]:
  """``(name, options)`` of ``NAME[:OPTIONS]`` (options ``''`` if none)."""
  name, _, options = spec.partition(':')
  return name, options


def parse_options(
    spec: str,
    factory: Callable[..., Any],
    *,
    fixed: tuple[str, ...] = (),
    own: Mapping[str, Callable[[str], Any]] | None = None,
    aliases: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """The options of ``spec`` as keyword arguments, in spec order.

  Args:
    spec: the whole spec (for the messages); its options follow the first
      ``:``.
    factory: the method's factory, whose parameters are the accepted keys.
    fixed: parameters the harness sets itself (refused).
    own: the harness's own keys, each with the parser of its value (their
      values come back among the options, for the harness to pop).
    aliases: per option, names of objects its value may be.

  Raises:
    ValueError: naming the bad part: an option without ``=``, a repeated
      key, a key the harness sets, or a key the factory does not take.
  """
  own = dict(own or {})
  aliases = dict(aliases or {})
  accepted = inspect.signature(factory).parameters
  options: dict[str, Any] = {}
  text = split(spec)[1]
  for part in text.split(',') if text else ():
    key, eq, value = (s.strip() for s in part.partition('='))
    if not eq or not key:
      raise ValueError(f'option {part!r} of {spec!r} is not KEY=VALUE.')
    if key in options:
      raise ValueError(f'option {key!r} is given twice in {spec!r}.')
    if key in fixed:
      raise ValueError(f'option {key!r} of {spec!r} is set by the harness '
                       f'(it sets {", ".join(fixed)}).')
    if key in own:
      options[key] = own[key](value)
      continue
    if key not in accepted:
      takes = [*own, *(p for p in accepted if p not in fixed)]
      raise ValueError(
          f'option {key!r} of {spec!r} is not a parameter of '
          f'{getattr(factory, "__name__", "its factory")}; it takes: '
          f'{", ".join(takes)}.')
    options[key] = value_of(value, accepted[key], aliases.get(key, {}))
  return options


def value_of(text: str, parameter: inspect.Parameter | None,
             aliases: Mapping[str, Any] | None = None) -> Any:
  """An option's value from its text (see the module docstring)."""
  if aliases and text in aliases:
    return aliases[text]
  lowered = text.lower()
  if lowered in ('true', 'false', 'none'):
    return {'true': True, 'false': False, 'none': None}[lowered]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if not isinstance(value, (int, float)):
    value = text
  annotation = str(parameter.annotation) if parameter else ''
  if isinstance(value, str) and 'Sequence' in annotation:
    return tuple(value.split('+'))
  return value
