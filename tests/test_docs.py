"""The API reference lists exactly the public names of mlorc_optax.

Public are the names in ``mlorc_optax.__all__`` and in the ``__all__`` of
each public submodule (every module of the package whose name does not start
with ``_``: ``mlorc_optax.compressors``, ``.contrib``, ``.flax``,
``.kernels``, ``.low_rank``, ``.plan``). ``docs/api.rst`` lists each once in
an ``.. autosummary::`` table, relative to the ``.. currentmodule::`` in
force (``compressors.RSVDCompressor`` under ``mlorc_optax``, or
``RSVDCompressor`` under ``mlorc_optax.compressors``). A submodule name that
is the same object as a top-level name of the same name (``plan.format_plan``
is ``mlorc_optax.format_plan``) is documented once, at the top level.
"""

import importlib
import pathlib
import pkgutil
import re

import mlorc_optax

API_PAGE = pathlib.Path(__file__).parent.parent / 'docs' / 'api.rst'
PACKAGE = 'mlorc_optax'


def public_submodules() -> list[str]:
  """Full names of the package's public submodules."""
  return sorted(
      f'{PACKAGE}.{m.name}' for m in pkgutil.iter_modules(mlorc_optax.__path__)
      if not m.name.startswith('_'))


def public_names() -> dict[str, object]:
  """Every public name, fully qualified, and the object it names."""
  names = {}
  for module_name in [PACKAGE] + public_submodules():
    module = importlib.import_module(module_name)
    assert hasattr(module, '__all__'), f'{module_name} has no __all__'
    for name in module.__all__:
      names[f'{module_name}.{name}'] = getattr(module, name)
  return names


_DIRECTIVE = re.compile(
    r'^\.\. (?:py:)?(currentmodule|module|automodule|autosummary)::'
    r'[ \t]*(\S*)[ \t]*\n((?:[ \t]+.*\n|[ \t]*\n)*)', re.MULTILINE)


def autosummary_entries(text: str) -> list[str]:
  """Fully qualified names listed in the ``.. autosummary::`` blocks.

  Each entry is qualified by the module in force where its block stands (the
  last ``.. currentmodule::``, ``.. module::`` or ``.. automodule::``, as in
  Sphinx), unless it starts with the package name.
  """
  names, current = [], ''
  for kind, argument, body in _DIRECTIVE.findall(text):
    if kind != 'autosummary':
      current = argument
      continue
    for line in body.splitlines():
      line = line.strip()
      if not line or line.startswith(':'):
        continue
      if line.split('.')[0] != PACKAGE and current:
        line = f'{current}.{line}'
      names.append(line)
  return names


def automodules(text: str) -> set[str]:
  return set(re.findall(r'^\.\. automodule::[ \t]*(\S+)', text, re.MULTILINE))


def undocumented(names: dict[str, object], listed: list[str]) -> list[str]:
  """Public names that the listed entries do not document."""
  missing = []
  for qualified, obj in names.items():
    if qualified in listed:
      continue
    top = f'{PACKAGE}.{qualified.rsplit(".", 1)[1]}'
    if top in listed and top in names and names[top] is obj:
      continue  # A re-export, documented once at the top level.
    missing.append(qualified)
  return sorted(missing)


def test_every_public_name_is_in_the_api_reference():
  text = API_PAGE.read_text()
  missing = undocumented(public_names(), autosummary_entries(text))
  assert not missing, (
      f'Public names missing from {API_PAGE.name}: {missing}. Add one line '
      'per name to the autosummary table of its group.'
  )
  no_section = sorted(set(public_submodules()) - automodules(text))
  assert not no_section, (
      f'{API_PAGE.name} has no ".. automodule::" for {no_section}.')


def test_the_api_reference_lists_only_public_names_once():
  names = public_names()
  listed = autosummary_entries(API_PAGE.read_text())
  stale = sorted(set(listed) - set(names))
  assert not stale, f'{API_PAGE.name} lists names that are not public: {stale}'
  repeated = sorted({n for n in listed if listed.count(n) > 1})
  assert not repeated, f'{API_PAGE.name} lists names twice: {repeated}'
  # The same object under two names (a re-export) gets one page, not two.
  by_object = {}
  for name in listed:
    obj = names[name]
    if not isinstance(obj, (str, int, float, tuple, type(None))):
      by_object.setdefault(id(obj), []).append(name)
  twice = sorted(v for v in by_object.values() if len(v) > 1)
  assert not twice, f'{API_PAGE.name} documents objects twice: {twice}'


def test_the_parser_sees_the_page_entries():
  text = (
      'Intro\n\n.. currentmodule:: mlorc_optax\n\n'
      '.. autosummary::\n   :toctree: x\n\n   foo\n   plan.bar\n\n'
      'Other text\n\n.. currentmodule:: mlorc_optax.contrib\n\n'
      '.. autosummary::\n\n   baz\n   mlorc_optax.qux\n\n'
      '.. automodule:: mlorc_optax.kernels\n   :no-members:\n\n'
      '.. autosummary::\n\n   quux\n'
  )
  assert autosummary_entries(text) == [
      'mlorc_optax.foo', 'mlorc_optax.plan.bar', 'mlorc_optax.contrib.baz',
      'mlorc_optax.qux', 'mlorc_optax.kernels.quux']


def test_a_re_export_is_documented_at_the_top_level():
  shared, other = object(), object()
  names = {'mlorc_optax.f': shared, 'mlorc_optax.plan.f': shared,
           'mlorc_optax.plan.g': other, 'mlorc_optax.kernels.f': other}
  assert undocumented(names, ['mlorc_optax.f']) == [
      'mlorc_optax.kernels.f', 'mlorc_optax.plan.g']
