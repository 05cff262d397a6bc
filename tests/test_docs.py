"""The API reference lists exactly the public names of mlorc_optax."""

import pathlib
import re

import mlorc_optax

API_PAGE = pathlib.Path(__file__).parent.parent / 'docs' / 'api.rst'


def autosummary_entries(text: str) -> list[str]:
  """Names listed in the page's ``.. autosummary::`` blocks, in order."""
  names = []
  for block in re.findall(
      r'^\.\. autosummary::\n((?:[ \t]+.*\n|[ \t]*\n)*)', text, re.MULTILINE
  ):
    for line in block.splitlines():
      line = line.strip()
      if line and not line.startswith(':'):
        names.append(line)
  return names


def test_every_public_name_is_in_the_api_reference():
  listed = autosummary_entries(API_PAGE.read_text())
  missing = sorted(set(mlorc_optax.__all__) - set(listed))
  assert not missing, (
      f'Public names missing from {API_PAGE.name}: {missing}. Add one line '
      'per name to the autosummary table of its group.'
  )


def test_the_api_reference_lists_only_public_names_once():
  listed = autosummary_entries(API_PAGE.read_text())
  stale = sorted(set(listed) - set(mlorc_optax.__all__))
  assert not stale, f'{API_PAGE.name} lists names not in __all__: {stale}'
  repeated = sorted({n for n in listed if listed.count(n) > 1})
  assert not repeated, f'{API_PAGE.name} lists names twice: {repeated}'


def test_the_parser_sees_the_page_entries():
  text = (
      'Intro\n\n.. autosummary::\n   :toctree: x\n\n   foo\n   bar\n\n'
      'Other text\n\n.. autosummary::\n\n   baz\n'
  )
  assert autosummary_entries(text) == ['foo', 'bar', 'baz']
