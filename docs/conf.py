"""Sphinx configuration of the mlorc_optax documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pkgutil
import runpy
import sys

_DOCS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_DOCS)
# Document this checkout, whatever mlorc_optax is installed elsewhere.
sys.path.insert(0, _ROOT)

import mlorc_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = 'mlorc_optax'
author = 'mlorc_optax authors'
copyright = '2026, mlorc_optax authors'  # pylint: disable=redefined-builtin
release = mlorc_optax.__version__
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'myst_parser',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', '_generated']
templates_path = ['_templates']

# Markdown pages: $...$ and $$...$$ math.
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = 'bysource'
# Signatures without annotations: the modules use postponed annotations, some
# of which evaluate (to long unions) and some don't, and the docstrings' Args
# already say what each argument takes.
autodoc_typehints = 'none'
autodoc_preserve_defaults = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False

html_theme = 'alabaster'
html_title = f'mlorc_optax {release}'
html_theme_options = {'description': 'MLorc optimizers for JAX/Optax'}


def _skip_data_members(app, what, name, obj, skip, options):
  """Classes list their methods and properties; data comes from docstrings.

  NamedTuple and dataclass fields are documented by the class docstring's
  ``Attributes:`` section (napoleon); listing them again as members would
  repeat them ("Alias for field number 0") and define them twice.
  """
  del app, name, options
  if what == 'class' and not (callable(obj) or isinstance(obj, property)):
    return True
  return skip


def _module_data_doc(name: str, obj: object) -> list[str] | None:
  """The ``#:`` comment of a public constant, read where it is defined.

  The public modules (``mlorc_optax``, its submodules, ``mlorc_optax.flax``)
  re-export their constants from private modules (``mlorc_optax._src``,
  ``mlorc_optax.flax._logical``, ...), and autodoc looks for the comment in
  the public module only. The defining module is the one whose attribute
  ``name`` is ``obj`` itself and whose source documents it.
  """
  # Imported here, not at the top: this file must import without Sphinx
  # (pytest may collect it for doctests).
  import importlib  # pylint: disable=g-import-not-at-top
  from sphinx import pycode  # pylint: disable=g-import-not-at-top

  for info in pkgutil.walk_packages(mlorc_optax.__path__, 'mlorc_optax.'):
    try:
      module = importlib.import_module(info.name)
    except ImportError:  # an optional dependency (flax) is missing
      continue
    if getattr(module, name, None) is not obj:
      continue
    analyzer = pycode.ModuleAnalyzer.for_module(info.name)
    docs = analyzer.find_attr_docs().get(('', name))
    if docs:
      return list(docs)
  return None


def _fill_data_docs(app, what, name, obj, options, lines):
  del app, options
  if what != 'data' or not name.startswith('mlorc_optax.'):
    return
  found = _module_data_doc(name.rsplit('.', 1)[-1], obj)
  if found:
    lines[:] = found


# Tables computed at build time, so that the pages show what the code
# computes rather than numbers typed once: docs/_generated/*.md, included by
# the pages (the folder is ignored by git and excluded as a source).
_GENERATED = os.path.join(_DOCS, '_generated')
_MEMORY_TABLES = {
    'memory_table_r4.md': ['--rank', '4'],
    'memory_table_r8.md': ['--rank', '8'],
    'memory_table_r4_bf16.md': ['--rank', '4', '--dtype', 'bfloat16'],
}


def _generate_tables(app):
  """Writes the output of ``benchmarks/memory_table.py`` for the pages."""
  del app
  os.makedirs(_GENERATED, exist_ok=True)
  script = os.path.join(_ROOT, 'benchmarks', 'memory_table.py')
  for name, args in _MEMORY_TABLES.items():
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [script, *args]
    try:
      with contextlib.redirect_stdout(out):
        runpy.run_path(script, run_name='__main__')
    finally:
      sys.argv = argv
    text = out.getvalue()
    path = os.path.join(_GENERATED, name)
    # Rewrite only on change: Sphinx rebuilds the pages that include it.
    if os.path.exists(path):
      with open(path) as f:
        if f.read() == text:
          continue
    with open(path, 'w') as f:
      f.write(text)


def setup(app):
  app.connect('builder-inited', _generate_tables)
  app.connect('autodoc-process-docstring', _fill_data_docs)
  app.connect('autodoc-skip-member', _skip_data_members)
