"""One measurement in a fresh Python process.

A device's peak-memory counter never resets and an out-of-memory error can
leave a process unusable, so a program that compares configurations by
their peak memory, or tries sizes until one fails, runs each in its own
process: :func:`run_isolated` starts ``python -m <module> <argv>
--result-json <file>`` from the repository root and returns the JSON the
child wrote there (with :func:`benchmarks.toolkit.results.write_json`).

The child is an ordinary command-line program that accepts
:data:`RESULT_FLAG`; with a ``tyro`` config, a field ``result_json: str |
None = None`` is that flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.toolkit import environment
from benchmarks.toolkit import results

#: The flag through which the child learns where to write its result.
RESULT_FLAG = '--result-json'

#: Characters of the child's error output kept in an error result.
ERROR_TAIL = 2000


def run_isolated(module: str, argv: Sequence[str], *,
                 timeout: float | None = None,
                 env: Mapping[str, str] | None = None) -> Any:
  """Runs ``python -m module *argv --result-json FILE`` in a new process.

  The child runs from the repository root (which is put on its
  ``PYTHONPATH``), with this process's environment plus ``env`` (merged
  over ``os.environ``, not replacing it), and its output is captured.

  Args:
    module: the child's module, e.g. ``'benchmarks.step_time'``.
    argv: its command-line arguments (strings).
    timeout: seconds before the child is killed; None: no limit.
    env: variables to add to, or override in, the child's environment.

  Returns:
    What the child wrote to ``FILE`` (a dict by convention), or
    ``{'error': 'timeout'}`` if it ran out of time, or ``{'error': 'exit N:
    <the end of its error output>'}`` if it wrote no result.
  """
  root = environment.repo_root()
  child_env = dict(os.environ)
  child_env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(root), child_env.get('PYTHONPATH')) if p)
  child_env.update(env or {})
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / 'result.json'
    command = [sys.executable, '-m', module, *map(str, argv), RESULT_FLAG,
               str(path)]
    try:
      proc = subprocess.run(command, cwd=root, env=child_env, timeout=timeout,
                            capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired:
      return {'error': 'timeout'}
    if path.exists():
      return results.read_json(path)
  tail = (proc.stderr.strip() or proc.stdout.strip())[-ERROR_TAIL:]
  return {'error': f'exit {proc.returncode}: {tail}'}
