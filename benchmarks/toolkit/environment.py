"""What a result was measured on: the devices, the host and the versions.

Every result file records :func:`device_description` and :func:`versions`,
so a committed number says where it came from. :func:`configure_xla` sets the
XLA client variables a measuring program wants; it must run before JAX
creates its backends (before the first computation or device query). The
root ``conftest.py`` calls it too, so the tests run under the same settings.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Appended to ``XLA_FLAGS`` by :func:`configure_xla`. With jaxlib 0.10,
#: XLA:CPU's concurrency-optimised scheduler can deadlock a program that runs
#: several independent batched QR + SVD chains (MLorc's update of stacked
#: layers, e.g. two ``(8, 768, 768)`` kernels): the executable waits forever
#: with every worker idle. Turning that scheduler off avoids it; GPUs are
#: unaffected.
CPU_DEADLOCK_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'

#: XLA:CPU threads per CPU device that :func:`configure_xla` asks for.
#: jaxlib before 0.11.1 splits a batched LAPACK call (the QR, SVD and
#: ``eigh`` of MLorc's compression of stacked leaves) into chunks on
#: XLA:CPU's thread pool and blocks its own pool thread until they finish
#: (jax-ml/jax 859992407d ends that). The pool has ``max(cores, devices)``
#: threads: on 2 cores with 8 simulated devices the 8 device programs of one
#: sharded step reach their decompositions together, block all 8 threads,
#: and no thread is left to run a chunk; the program then waits forever.
#: XLA sizes the pool from ``NPROC`` when it is set, and this many threads
#: per device leave threads free for the chunks even when every device
#: blocks several at once.
CPU_THREADS_PER_DEVICE = 8

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'

#: The distributions :func:`versions` reports (``flax`` only if installed).
PACKAGES = ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'mlorc_optax')


def _flag_name(flag: str) -> str:
  return flag.partition('=')[0]


def with_xla_flag(xla_flags: str, flag: str) -> str:
  """``xla_flags`` with ``flag`` (``--name=value``) appended, unless a flag
  of that name is already in it (an existing setting is kept)."""
  if _flag_name(flag) in map(_flag_name, xla_flags.split()):
    return xla_flags
  return f'{xla_flags} {flag}'.strip()


def add_xla_flags(*flags: str, probe: bool = False) -> str:
  """Appends each of ``flags`` to the ``XLA_FLAGS`` variable unless a flag
  of its name is already set (:func:`with_xla_flag`); returns the variable.
  XLA reads it once, when JAX creates its backends.

  With ``probe``, a flag not yet set is added only if the installed XLA
  accepts it (:func:`xla_knows_flag`): for flags that only speed something
  up and that other jaxlib releases may not have. A child process that
  inherits the variable then finds the flag set and probes nothing.
  """
  value = os.environ.get('XLA_FLAGS', '')
  for flag in flags:
    added = with_xla_flag(value, flag)
    if added != value and (not probe or xla_knows_flag(flag)):
      value = added
  os.environ['XLA_FLAGS'] = value
  return value


def xla_knows_flag(flag: str) -> bool:
  """Whether the installed XLA accepts ``flag`` in ``XLA_FLAGS``.

  XLA aborts the process on a flag it does not know, and flags come and go
  between jaxlib releases (``--xla_cpu_use_fusion_emitters`` is in 0.10.2,
  not in 0.11.2); so a flag that only speeds something up is probed first,
  in a child process that starts JAX's CPU backend with it (a second or
  two).
  """
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS='cpu')
  probe = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.devices("cpu")'], env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
  return probe.returncode == 0


def _device_count(name: str, value: str) -> int:
  try:
    count = int(value)
  except ValueError:
    count = -1
  if count < 0:
    raise ValueError(f'{name} must be a whole number of CPU devices, got '
                     f'{value!r}.')
  return count


def cpu_pool_threads(xla_flags: str, num_cpu_devices: str | None = None,
                     cores: int | None = None) -> int:
  """The XLA:CPU pool size :func:`configure_xla` asks for (``NPROC``).

  :data:`CPU_THREADS_PER_DEVICE` per CPU device, and never fewer than the
  host's cores (XLA's own default). The devices are those
  ``JAX_NUM_CPU_DEVICES`` asks for (when positive), else ``xla_flags``'
  ``--xla_force_host_platform_device_count``, else 1.

  Args:
    xla_flags: the ``XLA_FLAGS`` the backend will read.
    num_cpu_devices: the ``JAX_NUM_CPU_DEVICES`` it will read, or None.
    cores: the host's cores; None: ``os.cpu_count()``.

  Raises:
    ValueError: naming the setting whose device count is not a whole number.
  """
  devices = 1
  for flag in xla_flags.split():
    name, _, value = flag.partition('=')
    if name == _DEVICE_COUNT_FLAG:
      devices = _device_count(f'XLA_FLAGS {name}', value)
  if num_cpu_devices:
    count = _device_count('JAX_NUM_CPU_DEVICES', num_cpu_devices)
    devices = count or devices
  return max(cores or os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * devices)


def configure_xla(*, mem_fraction: float = 0.95) -> dict[str, str]:
  """Sets the XLA client variables a measuring program wants, if unset.

  * ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: the device's peak counter then
    shows what the program used, not a preallocated pool;
  * ``XLA_PYTHON_CLIENT_MEM_FRACTION=mem_fraction``: the allocator's limit
    (75% of the device by default, even without preallocation), so large
    models may use (almost) the whole device;
  * :data:`CPU_DEADLOCK_FLAG` appended to ``XLA_FLAGS``;
  * ``NPROC``: XLA:CPU's thread pool (:func:`cpu_pool_threads`), large
    enough that jaxlib's batched LAPACK calls leave threads free to run
    their chunks (:data:`CPU_THREADS_PER_DEVICE`). Set the CPU device count
    (``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES``) before calling this.

  A variable (or the scheduler flag) that is already set is kept. XLA reads
  them when JAX creates its backends, so call this first thing in ``main``,
  before any computation or device query; child processes
  (:func:`~benchmarks.toolkit.isolation.run_isolated`) inherit them.

  Args:
    mem_fraction: the allocator's share of each device's memory.

  Returns:
    The effective values of the four variables.
  """
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{mem_fraction:g}')
  flags = add_xla_flags(CPU_DEADLOCK_FLAG)
  os.environ.setdefault('NPROC', str(cpu_pool_threads(
      flags, os.environ.get('JAX_NUM_CPU_DEVICES'))))
  return {k: os.environ[k] for k in ('XLA_PYTHON_CLIENT_PREALLOCATE',
                                     'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                     'XLA_FLAGS', 'NPROC')}


def repo_root() -> Path:
  """The checkout's root: the folder that holds the ``benchmarks`` package."""
  return Path(__file__).resolve().parents[2]


def host_description() -> str:
  """The host CPU in a few words, e.g. ``'x86_64, 16 cores'``."""
  return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'


def device_description() -> dict[str, Any]:
  """The devices this process computes on, and its host.

  Returns:
    ``platform`` (JAX's default backend: ``'cpu'``, ``'gpu'``, ``'tpu'``),
    ``device_kind`` (of the first local device, e.g. ``'NVIDIA H100 80GB
    HBM3'``), ``count`` (devices in the whole job), ``local_count`` (this
    process's), ``process_count``, ``host_cpus`` and ``host`` (the CPU and
    operating system).
  """
  import jax  # pylint: disable=g-import-not-at-top

  return {
      'platform': jax.default_backend(),
      'device_kind': jax.local_devices()[0].device_kind,
      'count': jax.device_count(),
      'local_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'host_cpus': os.cpu_count(),
      'host': f'{host_description()}; {platform.platform()}',
  }


def device_line(description: dict[str, Any] | None = None) -> str:
  """One line for a report, e.g. ``'1 x NVIDIA H100 80GB HBM3 (gpu)'``.

  Args:
    description: a :func:`device_description` (e.g. read back from a result
      file); None: this process's.
  """
  d = description or device_description()
  if d['platform'] == 'cpu':
    return f'CPU ({d["host_cpus"]} cores)'
  return f'{d["count"]} x {d["device_kind"]} ({d["platform"]})'


def library_source() -> str:
  """The folder the imported ``mlorc_optax`` package comes from.

  A result names it so that a comparison of two source trees shows which
  tree each run imported: ``python -m`` puts the current folder first on
  ``sys.path``, so run from a checkout's root it imports that checkout's
  package whatever ``PYTHONPATH`` says (``benchmarks/README.md``).
  """
  import mlorc_optax  # pylint: disable=g-import-not-at-top

  return str(Path(mlorc_optax.__file__).resolve().parent)


def versions() -> dict[str, str]:
  """Versions of Python and of the libraries a result depends on.

  ``mlorc_optax`` is the imported module's ``__version__`` when it runs from
  a checkout that is not installed; ``flax`` is left out if not installed.
  """
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      if name == 'mlorc_optax':
        import mlorc_optax  # pylint: disable=g-import-not-at-top

        out[name] = mlorc_optax.__version__
  return out
